"""Milvus adapter for versioned item embeddings.

One collection per model version (`{prefix}_{version}`, e.g. `items_v3`) with rows (id INT64 = item
index, vec FLOAT_VECTOR). Which version serves is a pointer record in a small `{prefix}_meta`
collection, not a Milvus alias: milvus-lite 2.5.1 (pinned, see indexer/README.md) answers
UNIMPLEMENTED to every alias RPC. Flipping is one upsert of that record, so it is atomic, and every
search goes to exactly one collection, so a result never mixes versions. Where the server has aliases
(Milvus standalone, milvus-lite 3.x) `{prefix}_active` is also pointed at the active collection, for
people and tools, but the code never reads it.

The same code talks to an embedded server (stream.embedded.milvus), a local-file URI or Milvus
standalone: only `uri`/`token` change.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential
from tqdm.auto import tqdm

from indexer.wire import SearchChannel, read_results, search_request

log = logging.getLogger(__name__)

PAD_ID, OOV_ID = 0, 1
MIN_ITEM_ID = 2  # rows 0 (padding) and 1 (out-of-vocabulary) are never indexed nor returned
MAX_TOPK = 16384  # Milvus' limit on `limit`
METRICS = ("IP", "COSINE")  # recall merges by max score, so only "higher is better" metrics
INDEX_TYPES = ("FLAT", "IVF_FLAT", "AUTOINDEX", "HNSW", "IVF_SQ8")  # the first three exist in milvus-lite 2.5
DEFAULT_INDEX_PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # index type: (build params, search params)
    "FLAT": ({}, {}),
    "AUTOINDEX": ({}, {}),
    "IVF_FLAT": ({"nlist": 128}, {"nprobe": 16}),
    "IVF_SQ8": ({"nlist": 128}, {"nprobe": 16}),
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 128}),
}
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_T = TypeVar("_T")


class IndexUnavailable(RuntimeError):
    """The index cannot serve: server unreachable after retries, or the version is missing / not built."""


class VersionMismatch(RuntimeError):
    """The caller's model version is not the index's active version; mixing them would return garbage."""


class InvalidQuery(ValueError):
    """A malformed request (shape, dimension, NaN/inf, n out of range, reserved or duplicate ids)."""


def normalize_version(version: str | int) -> str:
    """Canonical version string: 3, "3" and "v3" are all "v3" (Triton versions are bare integers)."""
    v = str(version).strip()
    if v.isdigit():
        v = f"v{int(v)}"
    if not _VERSION_RE.match(v) or v.lower() == "meta":
        raise ValueError(
            f"bad model version {version!r}: use letters, digits, '_', '.', '-' (and not 'meta')"
        )
    return v


@dataclass
class VersionInfo:
    """What the meta collection records about one version (times are Unix seconds, 0 = not yet)."""

    version: str
    collection: str
    dim: int
    metric: str = "IP"
    index_type: str = "FLAT"
    index_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    built_at: float = 0.0
    activated_at: float = 0.0
    retired_at: float = 0.0
    rows: int = 0


class SearchResult(NamedTuple):
    """ids [nq, n] int64 padded with -1, scores [nq, n] float32 padded with -inf, the version searched."""

    ids: np.ndarray
    scores: np.ndarray
    version: str


@contextmanager
def _quiet_pymilvus() -> Iterator[None]:
    """pymilvus logs every failed RPC with a traceback at ERROR; silence it for calls expected to fail."""
    logger = logging.getLogger("pymilvus.decorators")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def _is_transient(exc: BaseException) -> bool:
    """Connection-level failures worth retrying; anything the server *answered* is not."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if isinstance(exc, MilvusException):
        msg = str(exc).lower()
        return exc.code == 2 or any(
            s in msg for s in ("unavailable", "fail connecting", "deadline", "timeout")
        )
    return False


class ItemIndex:
    """Versioned item index. Thread-safe for concurrent search/flip within one process (pymilvus' channel,
    plus one channel of its own for searches: indexer/wire.py)."""

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        prefix: str = "items",
        *,
        timeout_s: float = 10.0,
        retries: int = 4,
        pointer_ttl_s: float = 1.0,
        min_id: int = MIN_ITEM_ID,
        flat: bool = True,
    ) -> None:
        """flat=True reads search results as flat arrays off the wire (indexer/wire.py): 1.9x faster than
        pymilvus' per-hit objects at nq=256, top-50 (indexer/README.md); False keeps MilvusClient.search.
        Local `.db` URIs always use MilvusClient (they have no server address to open a channel to)."""
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,100}$", prefix):
            raise ValueError(f"bad collection prefix {prefix!r}")
        self.uri, self.prefix, self.timeout_s = uri, prefix, timeout_s
        self.pointer_ttl_s, self.min_id = pointer_ttl_s, min_id
        self.meta_collection = f"{prefix}_meta"
        self.alias = f"{prefix}_active"
        self._retrying = Retrying(
            stop=stop_after_attempt(max(1, retries)),
            wait=wait_exponential(multiplier=0.2, max=3.0),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        )
        self._lock = threading.Lock()
        self._seq = 0
        self._active: tuple[float, str | None] = (-math.inf, None)  # (read at, version)
        self._infos: dict[str, VersionInfo] = {}
        self._aliases_supported: bool | None = None
        self._applies_index_params: bool | None = None
        self.client: MilvusClient = self._rpc(
            "connect", lambda: MilvusClient(uri=uri, token=token or "", timeout=timeout_s)
        )
        self._ensure_meta()
        self._channel = SearchChannel.for_uri(uri, token)
        self.flat = bool(flat) and self._channel is not None

    # ---- plumbing -------------------------------------------------------------------------------

    def _rpc(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one Milvus call with retries on connection errors; give up with IndexUnavailable."""
        try:
            return self._retrying(fn)
        except Exception as exc:
            if _is_transient(exc):
                raise IndexUnavailable(
                    f"Milvus at {self.uri} did not answer ({what}) after retries: {exc}. Is the server "
                    "running? (embedded: stream.embedded.milvus.EmbeddedMilvus; else check the URI/token)"
                ) from exc
            raise

    def collection(self, version: str | int) -> str:
        return f"{self.prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', normalize_version(version))}"

    def _ensure_meta(self) -> None:
        c, name = self.client, self.meta_collection
        if not self._rpc("has meta", lambda: c.has_collection(name)):
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=256)
            schema.add_field("value", DataType.VARCHAR, max_length=8192)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field; unused
            try:
                with _quiet_pymilvus():
                    c.create_collection(name, schema=schema, consistency_level="Strong")
            except MilvusException:
                if not c.has_collection(name):  # else another process created it first: fine
                    raise
            if not c.list_indexes(name):
                ip = c.prepare_index_params()
                ip.add_index("vec", index_type="FLAT", metric_type="L2")
                c.create_index(name, ip)
        self._rpc("load meta", lambda: c.load_collection(name))

    # Meta records are append-only: each write inserts `KEY@SEQ` and readers take the highest SEQ per
    # KEY. Measured: an upsert is a delete + insert, and a concurrent reader of milvus-lite 2.5 can land
    # in between and find NO pointer at all; inserts of new keys are never half-visible.

    def _put_meta(self, rows: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            seq = self._seq = max(self._seq + 1, time.time_ns())
        data = [
            {"key": f"{k}@{seq:020d}", "value": json.dumps(v), "vec": [0.0, 0.0]} for k, v in rows.items()
        ]
        c, name = self.client, self.meta_collection
        self._rpc("write meta", lambda: c.insert(name, data, timeout=self.timeout_s))
        for k in rows:  # prune superseded records: readers take the newest, which stays
            self._delete_meta(k, before=seq)

    def _meta_keys(self, key: str) -> list[tuple[str, int]]:
        """(full primary key, SEQ) of every record of exactly `key`."""
        rows = self._rpc(
            "read meta",
            lambda: self.client.query(
                self.meta_collection, filter=f'key like "{key}@%"', output_fields=["key"]
            ),
        )
        out = []
        for r in rows:
            base, _, seq = r["key"].rpartition("@")
            if base == key:  # exact: `_` in a like pattern may match any character
                out.append((r["key"], int(seq)))
        return out

    def _delete_meta(self, key: str, before: int | None = None) -> None:
        pks = [pk for pk, seq in self._meta_keys(key) if before is None or seq < before]
        if pks:
            c, name = self.client, self.meta_collection
            self._rpc("delete meta", lambda: c.delete(name, ids=pks, timeout=self.timeout_s))

    def _query_meta(self, pattern: str) -> dict[str, dict[str, Any]]:
        """Newest record of every KEY matching `pattern` (a Milvus `like` pattern on KEY@SEQ)."""
        rows = self._rpc(
            "read meta",
            lambda: self.client.query(
                self.meta_collection,
                filter=f'key like "{pattern}"',
                output_fields=["key", "value"],
                timeout=self.timeout_s,
            ),
        )
        newest: dict[str, tuple[str, str]] = {}
        for r in rows:
            key, _, seq = r["key"].rpartition("@")
            if key not in newest or seq > newest[key][0]:
                newest[key] = (seq, r["value"])
        return {k: json.loads(v) for k, (_, v) in newest.items()}

    def _get_meta(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for k in keys:
            got = self._query_meta(f"{k}@%").get(k)  # exact KEY: `_` in a pattern may match any char
            if got is not None:
                out[k] = got
        return out

    def _save_info(self, info: VersionInfo) -> None:
        self._put_meta({f"version:{info.version}": asdict(info)})
        self._infos[info.version] = info

    # ---- versions -------------------------------------------------------------------------------

    def info(self, version: str | int, refresh: bool = False) -> VersionInfo:
        """The recorded VersionInfo; IndexUnavailable if the version was never created (or was dropped)."""
        v = normalize_version(version)
        if not refresh and v in self._infos:
            return self._infos[v]
        got = self._get_meta([f"version:{v}"]).get(f"version:{v}")
        if got is None:  # once, right after a 1M-row build, milvus-lite missed a record it had just written
            time.sleep(0.2)
            got = self._get_meta([f"version:{v}"]).get(f"version:{v}")
        if got is None:
            raise IndexUnavailable(
                f"index version {v!r} does not exist under prefix {self.prefix!r} at {self.uri}; "
                f"build it (`mind index --version {v}`) or use one of {self.versions()}"
            )
        info = VersionInfo(**got)
        self._infos[v] = info
        return info

    def versions(self) -> list[str]:
        """Versions that have a collection, oldest first."""
        infos = sorted(
            (VersionInfo(**v) for v in self._query_meta("version:%").values()), key=lambda i: i.created_at
        )
        existing = set(self._rpc("list collections", self.client.list_collections))
        return [i.version for i in infos if i.collection in existing]

    def create_version(
        self,
        version: str | int,
        dim: int,
        metric: str = "IP",
        index_type: str = "FLAT",
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> VersionInfo:
        """Create the empty collection for `version`; replace=True redoes a half-written inactive one."""
        v = normalize_version(version)
        metric, index_type = metric.upper(), index_type.upper()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS} (recall merges by max score), got {metric!r}")
        if index_type not in DEFAULT_INDEX_PARAMS:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        name, c = self.collection(v), self.client
        if self._rpc("has collection", lambda: c.has_collection(name)):
            if not replace:
                raise ValueError(f"version {v!r} already exists ({name}); pick a new version or replace=True")
            if self.active_version(max_age_s=0) == v:
                raise ValueError(
                    f"version {v!r} is active; cannot replace it (index a new version, then flip)"
                )
            self._rpc("drop collection", lambda: c.drop_collection(name))
        bp, sp = DEFAULT_INDEX_PARAMS[index_type]
        info = VersionInfo(
            version=v,
            collection=name,
            dim=int(dim),
            metric=metric,
            index_type=index_type,
            index_params=dict(index_params if index_params is not None else bp),
            search_params=dict(search_params if search_params is not None else sp),
            created_at=time.time(),
        )
        self._save_info(info)  # before the collection, so drop_old never sees an unrecorded collection
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=int(dim))
        self._rpc(
            "create collection", lambda: c.create_collection(name, schema=schema, consistency_level="Strong")
        )
        return info

    def _check_rows(self, info: VersionInfo, ids: Any, vectors: Any) -> tuple[np.ndarray, np.ndarray]:
        ids_a = np.asarray(ids)
        vec = np.asarray(vectors, dtype=np.float32)
        if ids_a.ndim != 1 or not np.issubdtype(ids_a.dtype, np.integer):
            raise InvalidQuery(
                f"ids must be a 1-D integer array, got shape {ids_a.shape} dtype {ids_a.dtype}"
            )
        if vec.ndim != 2 or vec.shape != (len(ids_a), info.dim):
            raise InvalidQuery(
                f"vectors must be [{len(ids_a)}, {info.dim}] for version {info.version}, got {vec.shape}"
            )
        if len(ids_a) and ids_a.min() < self.min_id:
            raise InvalidQuery(f"ids below {self.min_id} (0 = padding, 1 = OOV) must never be indexed")
        if len(np.unique(ids_a)) != len(ids_a):
            raise InvalidQuery("ids must be unique")
        if not np.isfinite(vec).all():
            raise InvalidQuery("vectors contain NaN or inf (the model produced them? check its training)")
        return ids_a.astype(np.int64), vec

    def _write(
        self, version: str | int, ids: Any, vectors: Any, batch: int, progress: bool, what: str
    ) -> int:
        info = self.info(version)
        ids_a, vec = self._check_rows(info, ids, vectors)
        if batch <= 0:
            raise ValueError("batch must be positive")
        with tqdm(total=len(ids_a), unit="item", desc=f"{what} {info.version}", disable=not progress) as bar:
            for s in range(0, len(ids_a), batch):
                rows = [
                    {"id": int(i), "vec": v}
                    for i, v in zip(ids_a[s : s + batch], vec[s : s + batch], strict=True)
                ]
                # upsert, not insert: a retried chunk must not duplicate primary keys
                self._rpc(
                    what, lambda rows=rows: self.client.upsert(info.collection, rows, timeout=self.timeout_s)
                )
                bar.update(len(rows))
        return len(ids_a)

    def insert(
        self, version: str | int, ids: Any, vectors: Any, batch: int = 2000, progress: bool = True
    ) -> int:
        """Write rows in chunks of `batch`: milvus-lite 2.5 slows quadratically with call size and a
        single 50k-row call never returns (indexer/README.md)."""
        return self._write(version, ids, vectors, batch, progress, "insert")

    def upsert(
        self, version: str | int | None, ids: Any, vectors: Any, batch: int = 2000, progress: bool = False
    ) -> int:
        """Incremental mode: add new items or replace changed ones (default: in the active version);
        visible to the next search without a rebuild."""
        v = version if version is not None else self._require_active()
        return self._write(v, ids, vectors, batch, progress, "upsert")

    def build(self, version: str | int) -> VersionInfo:
        """Seal the data, build the index and load it, so that the version can be flipped to."""
        info = self.info(version)
        c, name = self.client, info.collection
        self._rpc("flush", lambda: c.flush(name))
        if not self._rpc("list indexes", lambda: c.list_indexes(name)):
            ip = c.prepare_index_params()
            ip.add_index("vec", index_type=info.index_type, metric_type=info.metric, params=info.index_params)
            self._rpc("create index", lambda: c.create_index(name, ip, timeout=max(self.timeout_s, 600.0)))
        self._rpc("load", lambda: c.load_collection(name, timeout=max(self.timeout_s, 600.0)))
        stats = self._rpc("stats", lambda: c.get_collection_stats(name))
        info.rows, info.built_at = int(stats.get("row_count", 0)), time.time()
        self._save_info(info)
        return info

    def set_search_params(self, version: str | int, params: dict[str, Any]) -> VersionInfo:
        """Tune a built version's search parameters (e.g. IVF nprobe) without rebuilding it. Recorded in
        the meta collection; other processes see it when they next read the version's info."""
        info = self.info(version, refresh=True)
        info.search_params = dict(params)
        self._save_info(info)
        return info

    def _is_loaded(self, name: str) -> bool:
        state = self._rpc("load state", lambda: self.client.get_load_state(name)).get("state")
        return str(getattr(state, "name", state)).lower() == "loaded"

    def flip(self, version: str | int) -> str | None:
        """Make `version` the active one in one atomic pointer write; returns the previous version."""
        info = self.info(version, refresh=True)
        if not self._rpc("has collection", lambda: self.client.has_collection(info.collection)):
            raise IndexUnavailable(
                f"cannot flip to {info.version!r}: its collection {info.collection} is gone"
            )
        if not info.built_at or not self._is_loaded(info.collection):
            raise IndexUnavailable(f"cannot flip to {info.version!r}: not built/loaded; call build() first")
        now = time.time()
        prev = self.active_version(max_age_s=0)
        if prev == info.version:
            return prev
        info.activated_at, info.retired_at = now, 0.0
        rows: dict[str, dict[str, Any]] = {f"version:{info.version}": asdict(info)}
        rows["active"] = {"version": info.version, "previous": prev, "flipped_at": now}
        if prev is not None:
            try:
                old = self.info(prev, refresh=True)
                old.retired_at = now
                rows[f"version:{prev}"] = asdict(old)
            except IndexUnavailable:
                pass
        self._put_meta(rows)  # the one write that flips; both rows land in one call
        with self._lock:
            self._active = (time.monotonic(), info.version)
        self._infos.pop(info.version, None)
        self._infos.pop(prev or "", None)
        self._point_alias(info.collection)
        log.info("index %s: active version %s -> %s", self.prefix, prev, info.version)
        return prev

    def _point_alias(self, collection: str) -> None:
        """Best effort: keep `{prefix}_active` on the active collection where aliases exist."""
        if self._aliases_supported is False:
            return
        c = self.client
        try:
            with _quiet_pymilvus():
                if self.alias in (c.list_aliases(collection).get("aliases") or []):
                    return
                try:
                    c.alter_alias(collection, self.alias)
                except MilvusException:
                    c.create_alias(collection, self.alias)
            self._aliases_supported = True
        except (grpc.RpcError, MilvusException) as exc:
            self._aliases_supported = False
            log.info("no Milvus aliases here (%s); the meta pointer alone is used", type(exc).__name__)

    def applies_index_params(self) -> bool:
        """Whether the server builds the index type it is given and applies its parameters (nlist, nprobe).

        milvus-lite 2.5 does not: it keeps each collection in one in-memory segment, searched exactly up to
        some 70k rows and with its own interim IVF beyond (nprobe 1 and nprobe = nlist returned the same ids,
        recall@50 0.66 at 100k clustered items: benchmarks/catalogue.json). It is recognised, as for
        aliases, by answering UNIMPLEMENTED, here to GetVersion; a local `.db` file is milvus-lite too.
        """
        if self._applies_index_params is None:
            if self._channel is None:
                self._applies_index_params = False
            else:
                try:
                    with _quiet_pymilvus():
                        self.client.get_server_version(timeout=self.timeout_s)
                    self._applies_index_params = True
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._applies_index_params = False
                except MilvusException as exc:
                    if "unimplemented" not in str(exc).lower():
                        raise
                    self._applies_index_params = False
        return self._applies_index_params

    def active_version(self, max_age_s: float | None = None) -> str | None:
        """The active version, or None before the first flip. Cached for pointer_ttl_s (one round trip
        saved per search); max_age_s=0 forces a read."""
        ttl = self.pointer_ttl_s if max_age_s is None else max_age_s
        with self._lock:
            read_at, v = self._active
        if time.monotonic() - read_at <= ttl:
            return v
        got = self._get_meta(["active"]).get("active")
        v = got["version"] if got else None
        with self._lock:
            self._active = (time.monotonic(), v)
        return v

    def _require_active(self) -> str:
        v = self.active_version()
        if v is None:
            raise IndexUnavailable(
                f"no active item-index version under prefix {self.prefix!r} at {self.uri}: "
                "run `mind index` first"
            )
        return v

    def drop_old(self, grace_s: float = 600.0, keep: int = 0) -> list[str]:
        """Drop inactive versions retired (or, never activated, created) more than grace_s ago.

        The active version is never dropped; the previous one survives the grace period so searches
        that read the pointer just before a flip (and other processes' cached pointers) still finish.
        `keep` additionally spares the most recently retired N versions, for rollback.
        """
        active = self.active_version(max_age_s=0)
        now, c = time.time(), self.client
        candidates = [self.info(v, refresh=True) for v in self.versions() if v != active]
        candidates.sort(key=lambda i: i.retired_at or i.created_at, reverse=True)
        dropped: list[str] = []
        for info in candidates[max(0, keep) :]:
            if now - (info.retired_at or info.created_at) < grace_s:
                continue
            self._rpc("drop collection", lambda info=info: c.drop_collection(info.collection))
            self._delete_meta(f"version:{info.version}")
            self._infos.pop(info.version, None)
            dropped.append(info.version)
        if dropped:
            log.info("index %s: dropped old versions %s (active %s)", self.prefix, dropped, active)
        return dropped

    # ---- search ---------------------------------------------------------------------------------

    def search(
        self, vectors: Any, n: int, version: str | int | None = None, *, flat: bool | None = None
    ) -> SearchResult:
        """Top-n items for every query vector in ONE Milvus call, from exactly one version.

        version=None searches the active version. Returns ids [nq, n] int64 (-1 padding), scores
        [nq, n] float32 (-inf padding; inner products, higher is better) and the version searched.
        flat=None follows the index's setting; True reads the wire response into numpy (needs a server
        URI), False goes through MilvusClient.search (one Python object per hit). Both give the same
        result and raise the same errors.
        """
        v = normalize_version(version) if version is not None else self._require_active()
        info = self.info(v)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= MAX_TOPK:
            raise InvalidQuery(f"n must be an integer in 1..{MAX_TOPK}, got {n!r}")
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != info.dim:
            raise InvalidQuery(f"query vectors must be [nq, {info.dim}] for version {v}, got shape {q.shape}")
        if not np.isfinite(q).all():
            bad = np.flatnonzero(~np.isfinite(q).all(axis=1))[:5].tolist()
            raise InvalidQuery(
                f"query vectors contain NaN or inf (rows {bad}...); the tower output is broken"
            )
        nq, n = q.shape[0], int(n)
        if nq == 0:
            return SearchResult(
                np.full((0, n), -1, dtype=np.int64), np.full((0, n), -np.inf, dtype=np.float32), v
            )
        use_flat = self.flat if flat is None else bool(flat)
        if use_flat and self._channel is None:
            raise ValueError(f"flat search needs a server URI; {self.uri!r} is a local file (use flat=False)")
        try:
            ids, scores = self._search_flat(info, q, n) if use_flat else self._search_client(info, q, n)
        except MilvusException as exc:
            if not self._rpc("has collection", lambda: self.client.has_collection(info.collection)):
                self._infos.pop(v, None)
                raise IndexUnavailable(
                    f"index version {v!r} ({info.collection}) was dropped; "
                    f"active is {self.active_version(0)!r}"
                ) from exc
            if not self._is_loaded(info.collection):
                raise IndexUnavailable(f"index version {v!r} is not loaded; call build({v!r})") from exc
            raise
        reserved = (ids < self.min_id) & (ids >= 0)  # defensive: such rows are never written
        if reserved.any():
            ids[reserved], scores[reserved] = -1, -np.inf
        return SearchResult(ids, scores, v)

    def _search_flat(self, info: VersionInfo, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """One Search RPC on our own channel; the response's flat lists go straight into numpy."""
        assert self._channel is not None
        channel = self._channel
        req = search_request(info.collection, q, n, info.metric, info.search_params, "vec")
        data = self._rpc("search", lambda: channel.search(req, self.timeout_s))
        return read_results(data, q.shape[0], n)

    def _search_client(self, info: VersionInfo, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """MilvusClient.search (one Python object per hit), copied into padded arrays row by row."""
        params = {"metric_type": info.metric, "params": info.search_params}
        res = self._rpc(
            "search",
            lambda: self.client.search(
                info.collection,
                data=q,
                limit=n,
                anns_field="vec",
                search_params=params,
                output_fields=[],
                timeout=self.timeout_s,
            ),
        )
        nq = q.shape[0]
        ids = np.full((nq, n), -1, dtype=np.int64)
        scores = np.full((nq, n), -np.inf, dtype=np.float32)
        for r, hits in enumerate(res):
            got_ids, got_sc = _hits_arrays(hits)
            k = len(got_ids)
            ids[r, :k], scores[r, :k] = got_ids, got_sc
        return ids, scores

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self.client.close()


def _hits_arrays(hits: Iterable[Any]) -> tuple[list[int], list[float]]:
    """(ids, distances) of one query's hits: pymilvus 3 exposes lists; 2.5 only per-hit dicts."""
    ids, dist = getattr(hits, "ids", None), getattr(hits, "distances", None)
    if ids is not None and dist is not None:
        return list(ids), list(dist)
    rows = list(hits)
    return [h["id"] for h in rows], [h["distance"] for h in rows]
