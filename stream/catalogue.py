"""The item catalogue beyond the trained vocabulary (cold start): global item ids, side ids, and each served
model version's view of them.

A model knows the items it was trained on (its vocabulary, indices 2..n_items-1). A catalogue record
(schemas/catalog.v1.json) names an item and its side ids; an item that a served version was not trained
on is a *cold item* of that version: it gets the next index beyond that version's vocabulary, and the
tower embeds it from its side ids alone with the unknown item's id embedding (mind.model.MIND.embed_items).

Three id spaces, and why:

  raw id       what clicks and catalogue records carry ("B00123")
  global id    what the behaviour windows in the key-value store hold. The first vocabulary published
               (the *base*) keeps its indices (so windows written before the catalogue existed stay
               valid), and every other item gets the next global id in the order the catalogue first
               saw it. Global ids never change, so a model roll never rewrites a window.
  served id    a model version's index: its trained vocabulary, then its cold items in global-id order.
               Its Milvus collection and its tower input use these. For the base version served ids
               equal global ids.

`VersionView` maps global ids to one version's served ids and side ids; a micro-batch uses exactly one
view from its tower input to its recall message, so a batch never mixes two vocabularies.

Storage, in the key-value store (Redis protocol), one catalogue per item index (its Milvus prefix); the
`{catalog.<name>}` hash tag keeps every key of it in one Redis Cluster slot:

    mind:{catalog.items}:base          string  vocab hash of the base vocabulary (set once)
    mind:{catalog.items}:extra         list    raw ids of global ids n_base, n_base + 1, ... (append-only)
    mind:{catalog.items}:ids           hash    raw id -> global id, for the extra items
    mind:{catalog.items}:side          hash    raw id -> JSON list of its raw side ids (the newest record)
    mind:{catalog.items}:log           list    raw id of every record applied, in order: what changed
    mind:{catalog.items}:vocab:<hash>  string  a published vocabulary (stream.window.Catalog, npz bytes)
    mind:{catalog.items}:tables:<v>    string  index version v's cold-start tables (ColdTables, npz bytes)

The catalogue feed (workflows/catalogue.py) registers records (one Lua script: ids are allocated
atomically), then upserts the cold items' vectors into the active Milvus version. A worker reads the
`extra` and `log` lists from where it stopped (`LiveCatalog.sync`: one round trip when nothing changed),
when a batch holds an item it does not know, when a window holds a global id it has not seen, and at most
`catalog_refresh_s` apart otherwise. A roll publishes the new version's vocabulary before Triton loads it,
so a worker that finds another vocabulary behind the served version loads it from here (`LiveCatalog.follow`).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import torch
from prometheus_client import Counter, Gauge
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from mind.dataset import OOV, PAD, Vocab, pad_windows
from mind.model import MIND
from stream.schemas import CatalogRecord
from stream.window import Catalog

CATALOG_EXTRA = Gauge(
    "mind_catalog_items", "Items the worker's catalogue knows beyond the base vocabulary (global ids)"
)
CATALOG_SYNCS = Counter(
    "mind_catalog_syncs_total", "Catalogue reads by the worker, by what brought new items", ["found"]
)
FOLLOWS = Counter(
    "mind_worker_vocabulary_switches_total",
    "Times the worker switched to another published vocabulary because the served version changed",
)

# Connection-level failures: worth a quick retry here (as in stream.state); callers retry longer.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

SidesOf = Callable[[Sequence[str]], Mapping[str, tuple[str, ...]]]


# ---- a published vocabulary as bytes ------------------------------------------------------------------


def _strs(a: np.ndarray) -> list[str]:
    return [str(x) for x in a.tolist()]


def dump_catalog(catalog: Catalog) -> bytes:
    """A Catalog as npz bytes (no pickle): what a roll publishes for the workers to load by vocab hash."""
    users = list(catalog.user_profile)
    prof = (
        np.stack([catalog.user_profile[u] for u in users]).astype(np.int64)
        if users
        else np.zeros((0, catalog.n_profile_fields), dtype=np.int64)
    )
    profile = sorted(catalog.profile.items(), key=lambda kv: kv[1])
    buf = io.BytesIO()
    np.savez(
        buf,
        items=np.asarray(catalog.items.raw, dtype=str),
        item_side=np.asarray(catalog.item_side, dtype=np.int64),
        profile=np.asarray([r for r, _ in profile], dtype=str),
        users=np.asarray(users, dtype=str),
        user_profile=prof,
        side_names=np.asarray(catalog.side_names, dtype=str),
        meta=np.asarray(
            json.dumps(
                {
                    "n_profile_fields": catalog.n_profile_fields,
                    "vocab_hash": catalog.vocab_hash,
                    "model_version": catalog.model_version,
                }
            )
        ),
    )
    return buf.getvalue()


def load_catalog_bytes(data: bytes) -> Catalog:
    """Inverse of dump_catalog."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        users, prof = _strs(z["users"]), np.asarray(z["user_profile"], dtype=np.int64)
        return Catalog(
            items=Vocab(_strs(z["items"])),
            item_side=np.asarray(z["item_side"], dtype=np.int64),
            profile={raw: i + 1 for i, raw in enumerate(_strs(z["profile"]))},
            user_profile={u: prof[r] for r, u in enumerate(users)},
            n_profile_fields=int(meta["n_profile_fields"]),
            vocab_hash=str(meta["vocab_hash"]),
            model_version=str(meta.get("model_version", "")),
            side_names=_strs(z["side_names"]),
        )


# ---- cold-start tables: what a model version needs to embed an item from its side ids ----------------


@dataclass
class ColdTables:
    """One index version's cold-start embedding: the unknown item's id vector and the side-id table.

    e_i = (oov + sum_s side_emb[s]) / (1 + #side ids), exactly mind.model.MIND.embed_items for an index
    >= n_items; the feed embeds new items with it without loading the model.
    """

    version: str  # the index version these belong to ("v3")
    vocab_hash: str  # the vocabulary of that version (its served ids)
    oov: np.ndarray  # [d] float32
    side_emb: np.ndarray  # [n_side, d] float32, row 0 = "none" = 0

    @classmethod
    def from_model(cls, model: MIND, version: str, vocab_hash: str) -> ColdTables:
        with torch.no_grad():
            return cls(
                version,
                vocab_hash,
                model.item_emb.weight[OOV].detach().cpu().float().numpy().copy(),
                model.side_emb.weight.detach().cpu().float().numpy().copy(),
            )

    def vectors(self, side_rows: np.ndarray) -> np.ndarray:
        """Cold-start item vectors [n, d] for side-id rows [n, S] (the same torch ops as embed_items)."""
        rows = torch.as_tensor(np.asarray(side_rows, dtype=np.int64))
        side = torch.as_tensor(self.side_emb)[rows]  # [n,S,d]
        n = 1.0 + (rows > 0).sum(-1, keepdim=True).to(torch.float32)  # [n,1]
        e = torch.as_tensor(self.oov)[None, :].expand(rows.shape[0], -1)  # [n,d]
        return ((e + side.sum(-2)) / n).numpy()

    def dump(self) -> bytes:
        buf = io.BytesIO()
        meta = json.dumps({"version": self.version, "vocab_hash": self.vocab_hash})
        np.savez(buf, oov=self.oov, side_emb=self.side_emb, meta=np.asarray(meta))
        return buf.getvalue()

    @classmethod
    def load(cls, data: bytes) -> ColdTables:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(meta["version"], meta["vocab_hash"], np.asarray(z["oov"]), np.asarray(z["side_emb"]))


# ---- global ids ---------------------------------------------------------------------------------------


class ItemSpace:
    """Global item ids: the base vocabulary's indices, then the extra items in catalogue order."""

    def __init__(self, base: Vocab, extras: Iterable[str] = ()) -> None:
        self.base = base
        self.n_base = len(base)
        self.extras: list[str] = []
        self._extra: dict[str, int] = {}
        self.extend(extras)

    def extend(self, raws: Iterable[str]) -> None:
        for r in raws:
            if r not in self._extra:
                self._extra[r] = self.n_base + len(self.extras)
                self.extras.append(r)

    def index(self, raw: str, default: int = OOV) -> int:
        g = self.base.get(raw, -1)
        return g if g >= 0 else self._extra.get(raw, default)

    def raw_of(self, g: int) -> str:
        return self.base.raw_of(g) if g < self.n_base else self.extras[g - self.n_base]

    def __contains__(self, raw: str) -> bool:
        return self.index(raw, -1) >= 0

    def __len__(self) -> int:
        return self.n_base + len(self.extras)


class _Grow:
    """An append-only int64 array with spare capacity (rows may be [n] or [n, S])."""

    def __init__(self, init: np.ndarray) -> None:
        self.a = np.array(init, dtype=np.int64, copy=True)
        self.n = len(init)

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self.a):
            bigger = np.zeros((max(need, 2 * len(self.a), 16), *self.a.shape[1:]), dtype=np.int64)
            bigger[: self.n] = self.a[: self.n]
            self.a = bigger
        self.a[self.n : need] = rows
        self.n = need

    def view(self) -> np.ndarray:
        return self.a[: self.n]


class VersionView:
    """One model version's view of the catalogue: global id -> served id, side ids per served id, raw ids.

    Served ids are the version's trained vocabulary (its checkpoint's Catalog), then its cold items (global
    items it was not trained on) in global-id order, so they are the same in every process that builds the
    view: the worker, the feed and the roll. A trained item keeps the side ids it was trained with; a cold
    item takes the catalogue's, mapped through this version's side vocabulary (unknown side ids dropped,
    at most S kept). A cold item with no known side id is `blank`: it still has a served id (a click on it
    enters the tower as the unknown item), but nothing to embed it from, so it is not indexed.
    """

    def __init__(self, catalog: Catalog, space: ItemSpace, sides_of: SidesOf) -> None:
        self.catalog = catalog
        self.vocab_hash = catalog.vocab_hash
        self.n_items = len(catalog.items)
        self.S = int(catalog.item_side.shape[1])
        self._side_index = {name: i + 1 for i, name in enumerate(catalog.side_names)}
        self._lock = threading.Lock()
        self._to = _Grow(np.zeros(0, dtype=np.int64))  # global id -> served id
        self._side = _Grow(catalog.item_side)  # served id -> side ids [S]
        self._cold_raw: list[str] = []  # served id n_items + j -> raw id
        self._cold: dict[str, int] = {}  # raw id -> served id, cold items only
        self.blank: set[int] = set()  # cold served ids without a known side id
        self.extend(space, sides_of)

    # ---- building ---------------------------------------------------------------------------------

    def side_row(self, raw_sides: Sequence[str]) -> np.ndarray:
        """Raw side ids -> this version's side indices [S] (unknown dropped, first S kept, 0-padded)."""
        ids = [i for i in (self._side_index.get(s, 0) for s in raw_sides) if i][: self.S]
        row = np.zeros(self.S, dtype=np.int64)
        row[: len(ids)] = ids
        return row

    def extend(self, space: ItemSpace, sides_of: SidesOf) -> list[int]:
        """Map the global ids added to `space` since the last call; returns the new cold served ids."""
        with self._lock:
            start, stop = self._to.n, len(space)
            if stop <= start:
                return []
            vocab = self.catalog.items
            to = np.empty(stop - start, dtype=np.int64)
            new_cold: list[str] = []
            for k, g in enumerate(range(start, stop)):
                if g < vocab.reserved:
                    to[k] = g  # PAD, OOV
                    continue
                raw = space.raw_of(g)
                i = vocab.get(raw, -1)
                if i < 0:
                    i = self._cold.get(raw, -1)
                if i < 0:
                    i = self.n_items + len(self._cold_raw)
                    self._cold[raw] = i
                    self._cold_raw.append(raw)
                    new_cold.append(raw)
                to[k] = i
            self._to.append(to)
        sides = sides_of(new_cold) if new_cold else {}
        rows = np.stack([self.side_row(sides.get(r, ())) for r in new_cold]) if new_cold else None
        with self._lock:
            if rows is not None:
                first = self._side.n
                self._side.append(rows)
                self.blank.update(first + j for j in range(len(new_cold)) if not rows[j].any())
            return [self._cold[r] for r in new_cold]

    def update_sides(self, sides: Mapping[str, Sequence[str]]) -> list[int]:
        """New side ids of cold items (trained items keep theirs); returns the cold served ids changed."""
        changed = []
        with self._lock:
            for raw, names in sides.items():
                i = self._cold.get(raw)
                if i is None:
                    continue
                row = self.side_row(names)
                if not np.array_equal(self._side.a[i], row):
                    self._side.a[i] = row
                    changed.append(i)
                (self.blank.add if not row.any() else self.blank.discard)(i)
        return changed

    # ---- reading ----------------------------------------------------------------------------------

    @property
    def n_global(self) -> int:
        return self._to.n

    @property
    def n_served(self) -> int:
        return self.n_items + len(self._cold_raw)

    def cold_raws(self) -> list[str]:
        with self._lock:
            return list(self._cold_raw)

    def cold_of(self, raws: Iterable[str]) -> list[int]:
        """Served ids of those raw ids that are cold items of this version."""
        with self._lock:
            return [i for i in (self._cold.get(r) for r in raws) if i is not None]

    def is_trained(self, raw: str) -> bool:
        return self.catalog.items.get(raw, -1) >= 0

    def served(self, global_ids: Any) -> np.ndarray:
        """Global ids -> served ids (any shape); ids this view has not mapped yet become OOV."""
        g = np.asarray(global_ids, dtype=np.int64)
        with self._lock:
            to = self._to.view()
            out = np.where((g >= 0) & (g < len(to)), to[np.clip(g, 0, max(len(to) - 1, 0))], OOV)
        return np.where(g == PAD, PAD, out).astype(np.int64)

    def side_table(self) -> np.ndarray:
        """Side ids of every served id [n_served, S]: what the roll embeds the whole catalogue from."""
        with self._lock:
            return self._side.view().copy()

    def side_rows(self, served_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        with self._lock:
            return self._side.view()[np.asarray(served_ids, dtype=np.int64)].copy()

    def raw_item(self, served_id: int) -> str | None:
        """Raw id of a served id; None for one this view does not know (yet)."""
        if 0 <= served_id < self.n_items:
            return self.catalog.raw_item(served_id) if served_id >= self.catalog.items.reserved else None
        with self._lock:
            j = served_id - self.n_items
            return self._cold_raw[j] if 0 <= j < len(self._cold_raw) else None

    def profile_row(self, user_id: str, profile_ids: Sequence[str]) -> np.ndarray:
        return self.catalog.profile_row(user_id, profile_ids)

    def tower_inputs(
        self, windows: Sequence[Sequence[int]], profiles: Sequence[np.ndarray], max_len: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows of global ids -> the tower's [B,L] served ids, [B,L,S] side ids, [B,P] profiles.

        Cold items carry their catalogue side ids into the tower, so they shape the interests like any item.
        """
        items = self.served(pad_windows([np.asarray(w, dtype=np.int64) for w in windows], max_len))
        with self._lock:
            side = self._side.view()[items]  # row PAD is all zeros
        prof = (
            np.stack(profiles).astype(np.int64)
            if len(profiles)
            else np.zeros((0, self.catalog.n_profile_fields), dtype=np.int64)
        )
        return items, side, prof


# ---- the key-value store --------------------------------------------------------------------------------

# KEYS: ids, extra, side, log. ARGV[1] = n_base, then per record: raw id, "1" if it is in the base
# vocabulary (no extra id needed) else "0", its side ids as JSON. Returns the global id of each record's
# item (-1 for base items: the caller knows their ids).
REGISTER_LUA = """
local n_base = tonumber(ARGV[1])
local out = {}
for p = 2, #ARGV, 3 do
  local raw, in_base, sides = ARGV[p], ARGV[p + 1], ARGV[p + 2]
  local g = -1
  if in_base == '0' then
    local have = redis.call('HGET', KEYS[1], raw)
    if have then
      g = tonumber(have)
    else
      local n = redis.call('RPUSH', KEYS[2], raw)
      g = n_base + n - 1
      redis.call('HSET', KEYS[1], raw, g)
    end
  end
  redis.call('HSET', KEYS[3], raw, sides)
  redis.call('RPUSH', KEYS[4], raw)
  out[#out + 1] = g
end
return out
"""


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, (bytes, bytearray)) else str(x)


class CatalogueStore:
    """Redis adapter of one catalogue (see the module docstring for the keys). Thread-safe as redis-py is."""

    def __init__(
        self, client: Any, name: str = "items", *, prefix: str = "mind", attempts: int = 3, chunk: int = 1000
    ) -> None:
        self.client, self.name, self.chunk = client, name, chunk
        base = f"{prefix}:{{catalog.{name}}}"
        self.k_base, self.k_extra, self.k_ids = f"{base}:base", f"{base}:extra", f"{base}:ids"
        self.k_side, self.k_log = f"{base}:side", f"{base}:log"
        self.k_vocab, self.k_tables = f"{base}:vocab:", f"{base}:tables:"
        self._register = client.register_script(REGISTER_LUA)
        self._retrying = Retrying(
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception_type(TRANSIENT),
            reraise=True,
        )
        self._catalogs: dict[str, Catalog] = {}

    def _call(self, fn: Callable[[], Any]) -> Any:
        return self._retrying(fn)

    # ---- vocabularies ------------------------------------------------------------------------------

    def publish_catalog(self, catalog: Catalog) -> bool:
        """Publish a vocabulary (idempotent; keyed by its hash); the first one ever published becomes the
        base. Returns True when it is the base."""
        blob = dump_catalog(catalog)
        h = catalog.vocab_hash
        if not h:
            raise ValueError("a catalogue vocabulary needs its vocab hash")

        def run() -> Any:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.k_vocab + h, blob, nx=True)
            pipe.set(self.k_base, h, nx=True)
            pipe.get(self.k_base)
            return pipe.execute()

        *_, base = self._call(run)
        self._catalogs.setdefault(h, catalog)
        return _text(base) == h

    def base_hash(self) -> str | None:
        got = self._call(lambda: self.client.get(self.k_base))
        return None if got is None else _text(got)

    def load_catalog(self, vocab_hash: str) -> Catalog | None:
        """A published vocabulary, or None (cached: a vocabulary never changes under its hash)."""
        if vocab_hash not in self._catalogs:
            got = self._call(lambda: self.client.get(self.k_vocab + vocab_hash))
            if got is None:
                return None
            self._catalogs[vocab_hash] = load_catalog_bytes(got)
        return self._catalogs[vocab_hash]

    def base_catalog(self) -> Catalog | None:
        h = self.base_hash()
        return None if h is None else self.load_catalog(h)

    def publish_tables(self, tables: ColdTables) -> None:
        self._call(lambda: self.client.set(self.k_tables + tables.version, tables.dump()))

    def load_tables(self, version: str) -> ColdTables | None:
        got = self._call(lambda: self.client.get(self.k_tables + version))
        return None if got is None else ColdTables.load(got)

    # ---- records -----------------------------------------------------------------------------------

    def register(self, records: Sequence[CatalogRecord], base: Vocab) -> list[int]:
        """Store the records' side ids and give every item outside `base` a global id (atomically, so
        concurrent feeds agree). Returns each record's global id."""
        out: list[int] = []
        n_base = len(base)
        for s in range(0, len(records), self.chunk):
            part = records[s : s + self.chunk]
            args: list[Any] = [n_base]
            for r in part:
                args.extend((r.item_id, "1" if base.get(r.item_id, -1) >= 0 else "0", json.dumps(r.side_ids)))
            keys = [self.k_ids, self.k_extra, self.k_side, self.k_log]
            got = self._call(lambda keys=keys, args=args: self._register(keys=keys, args=args))
            out.extend(int(g) if int(g) >= 0 else base.get(r.item_id) for g, r in zip(got, part, strict=True))
        return out

    def read_since(self, extra_from: int, log_from: int) -> tuple[list[str], list[str]]:
        """Extra items from position extra_from and log entries from log_from, in one round trip."""

        def run() -> Any:
            pipe = self.client.pipeline(transaction=False)
            pipe.lrange(self.k_extra, extra_from, -1)
            pipe.lrange(self.k_log, log_from, -1)
            return pipe.execute()

        extra, log = self._call(run)
        return [_text(x) for x in extra], [_text(x) for x in log]

    def sides(self, raws: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The stored side ids of these items (those with a record)."""
        out: dict[str, tuple[str, ...]] = {}
        for s in range(0, len(raws), self.chunk):
            part = list(raws[s : s + self.chunk])
            got = self._call(lambda part=part: self.client.hmget(self.k_side, part))
            out.update({r: tuple(json.loads(v)) for r, v in zip(part, got, strict=True) if v is not None})
        return out

    def log_length(self) -> int:
        return int(self._call(lambda: self.client.llen(self.k_log)))


def trained_record(catalog: Catalog, raw_id: str) -> CatalogRecord:
    """A catalogue record of a trained item from its checkpoint's side ids (raw names)."""
    names = catalog.side_names
    row = catalog.item_side[catalog.items.get(raw_id)]
    return CatalogRecord(raw_id, tuple(names[s - 1] for s in row if 0 < s <= len(names)))


# ---- the worker's catalogue -----------------------------------------------------------------------------


class LiveCatalog:
    """Raw ids -> global ids, and one VersionView per served vocabulary, kept up to date from the store.

    Without a store it is the checkpoint's Catalog alone (global ids = its indices, no cold items): the
    worker then behaves as before the catalogue existed. Thread-safe: the loop thread syncs and builds tower
    inputs, the tail thread maps recalled ids back to raw ids.
    """

    def __init__(self, catalog: Catalog, store: CatalogueStore | None = None, refresh_s: float = 1.0) -> None:
        self.catalog = catalog  # the checkpoint the worker was started with
        self.store, self.refresh_s = store, refresh_s
        self.space = ItemSpace(catalog.items)
        self._lock = threading.RLock()
        self._log_pos = 0
        self._synced_at = -math.inf
        self._views: dict[str, VersionView] = {}
        self._current = self._view(catalog)

    # what check_tower_fit and the start-up checks read: the checkpoint's tables
    @property
    def item_side(self) -> np.ndarray:
        return self.catalog.item_side

    @property
    def n_profile_fields(self) -> int:
        return self.catalog.n_profile_fields

    @property
    def vocab_hash(self) -> str:
        return self._current.vocab_hash

    def _sides_of(self, raws: Sequence[str]) -> Mapping[str, tuple[str, ...]]:
        return self.store.sides(raws) if self.store is not None and raws else {}

    def _view(self, catalog: Catalog) -> VersionView:
        view = self._views.get(catalog.vocab_hash)
        if view is None:
            view = self._views[catalog.vocab_hash] = VersionView(catalog, self.space, self._sides_of)
        return view

    def attach(self) -> LiveCatalog:
        """Join the store: publish the checkpoint's vocabulary (the first one becomes the base), give its
        items outside the base a global id, and read every extra item. Idempotent."""
        if self.store is None:
            return self
        self.store.publish_catalog(self.catalog)
        base = self.store.base_catalog()
        if base is None:
            raise RuntimeError(f"catalogue {self.store.name!r}: no base vocabulary after publishing one")
        with self._lock:
            self.space = ItemSpace(base.items)
            missing = [r for r in self.catalog.items.raw if r not in self.space]
            if missing:  # a checkpoint trained on items the base lacks: they get global ids like new items
                self.store.register([trained_record(self.catalog, r) for r in missing], base.items)
            self._log_pos = 0
            self._views = {}
            self.sync(force=True)
            self._current = self._view(self.catalog)
        return self

    def item_index(self, raw_id: str) -> int:
        """Raw id -> global id; OOV for an item neither the base nor the catalogue (as far as read) knows."""
        return self.space.index(raw_id)

    def raw_item(self, global_id: int) -> str:
        return self.space.raw_of(global_id)

    def view(self) -> VersionView:
        """The view of the vocabulary served last (the one the next batch is built with)."""
        return self._current

    def due(self) -> bool:
        return self.store is not None and time.monotonic() - self._synced_at >= self.refresh_s

    def sync(self, force: bool = False) -> int:
        """Read what the catalogue gained since the last read (new items, changed side ids) into every view.
        Returns the number of new global ids. Without `force` only when refresh_s has passed."""
        if self.store is None or not (force or self.due()):
            return 0
        with self._lock:
            extras, log = self.store.read_since(len(self.space.extras), self._log_pos)
            self._synced_at = time.monotonic()
            before = len(self.space)
            self.space.extend(extras)
            self._log_pos += len(log)
            new = len(self.space) - before
            for view in self._views.values():
                view.extend(self.space, self._sides_of)
                if log:
                    cold = set(view.cold_raws()) & set(log)
                    if cold:
                        view.update_sides(self._sides_of(sorted(cold)))
            CATALOG_EXTRA.set(len(self.space.extras))
            CATALOG_SYNCS.labels("yes" if new else "no").inc()
            return new

    def follow(self, vocab_hash: str) -> VersionView | None:
        """The view of a published vocabulary, which becomes the current one; None if nobody published it."""
        with self._lock:
            if vocab_hash == self._current.vocab_hash:
                return self._current
            cached = self._views.get(vocab_hash)
            catalog = cached.catalog if cached is not None else None
            if catalog is None and self.store is not None:
                catalog = self.store.load_catalog(vocab_hash)
            if catalog is None:
                return None
            self._current = self._view(catalog)
            FOLLOWS.inc()
            return self._current

    def view_for(self, vocab_hash: str) -> VersionView | None:
        """A published vocabulary's view without making it current (the feed and the roll use this)."""
        with self._lock:
            if vocab_hash in self._views:
                return self._views[vocab_hash]
            catalog = self.store.load_catalog(vocab_hash) if self.store is not None else None
            return None if catalog is None else self._view(catalog)

    def view_of(self, catalog: Catalog) -> VersionView:
        """The view of a vocabulary in hand (a checkpoint being rolled out)."""
        with self._lock:
            return self._view(catalog)
