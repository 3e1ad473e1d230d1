"""Write a model version's item vectors to Milvus: a new collection, built, then flipped to.

This module computes nothing: it takes the [n_items, d] matrix the model produces (`item_vectors()`,
row index = item index) and only writes it. Rows 0 (padding) and 1 (OOV) are skipped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from indexer.store import DEFAULT_INDEX_PARAMS, ItemIndex, VersionMismatch, normalize_version

log = logging.getLogger(__name__)

# The index-type rule, from `python -m harness.bench_catalogue` (benchmarks/catalogue.json; indexer/README.md,
# "Index type by catalogue size"): 64-d clustered item vectors, IP, top-50, nq 1/16/256.
# FLAT (exact) below; IVF_FLAT from here: IVF was 2.8-5.6x faster than FLAT at 100k, no faster at 12k.
IVF_FROM_ROWS = 100_000
# nprobe = nlist x this: recall@50 >= 0.95 in the IVF model at 100k (0.963) and 1M (0.977); 12k needed 1/4.
IVF_NPROBE_SHARE = 1 / 8
IVF_MIN_NPROBE = 16


def ivf_nlist(n_rows: int) -> int:
    """IVF lists for n_rows: 4 sqrt(n) (Milvus' rule of thumb), as a power of two in 16..65536."""
    return int(min(65_536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n_rows, 1)))))))


def ivf_params(n_rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index params, search params) of IVF_FLAT for a catalogue of n_rows."""
    nlist = ivf_nlist(n_rows)
    return {"nlist": nlist}, {"nprobe": min(nlist, max(IVF_MIN_NPROBE, round(nlist * IVF_NPROBE_SHARE)))}


def choose_index(
    n_rows: int,
    index_type: str | None = None,
    *,
    applies_index_params: bool = True,
    ivf_from_rows: int = IVF_FROM_ROWS,
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(index type, index params, search params) for a catalogue of n_rows items.

    The rule: FLAT below ivf_from_rows, where an exact scan costs little and gives recall 1; IVF_FLAT from
    there, with ivf_params(n_rows). A server that does not apply IVF parameters (milvus-lite 2.5:
    ItemIndex.applies_index_params) gets FLAT at every size, because its own IVF cannot be tuned to the
    recall target. `index_type` overrides the rule (IVF types then get ivf_params, others their defaults).
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if index_type is not None:
        it = index_type.upper()
        if it not in DEFAULT_INDEX_PARAMS:
            raise ValueError(f"index_type must be one of {sorted(DEFAULT_INDEX_PARAMS)}, got {index_type!r}")
    elif n_rows >= ivf_from_rows and applies_index_params:
        it = "IVF_FLAT"
    else:
        it = "FLAT"
    if it.startswith("IVF_"):
        return (it, *ivf_params(n_rows))
    bp, sp = DEFAULT_INDEX_PARAMS[it]
    return it, dict(bp), dict(sp)


@dataclass
class IndexStats:
    """What one `index_items` call did (printed by `mind index`, logged by the batch job)."""

    version: str
    mode: str  # "full" or "incremental"
    rows: int
    dim: int
    seconds: float
    write_seconds: float
    build_seconds: float
    previous: str | None
    active: str | None
    dropped: list[str]
    index_type: str | None = None  # of the version written (chosen by catalogue size unless given)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_matrix(item_vectors: Any) -> np.ndarray:
    """Accept numpy or a torch tensor (detached, on CPU) without importing torch here."""
    if hasattr(item_vectors, "detach"):
        item_vectors = item_vectors.detach().cpu().numpy()
    m = np.ascontiguousarray(np.asarray(item_vectors, dtype=np.float32))
    if m.ndim != 2 or m.shape[0] < 3 or m.shape[1] < 1:
        raise ValueError(f"item_vectors must be [n_items >= 3, d] (rows 0/1 = PAD/OOV), got {m.shape}")
    return m


def index_items(
    item_vectors: Any,
    version: str | int,
    uri: str | None = None,
    chunk: int = 2000,
    incremental: bool = False,
    changed_ids: Iterable[int] | None = None,
    *,
    index: ItemIndex | None = None,
    token: str | None = None,
    prefix: str = "items",
    metric: str = "IP",
    index_type: str | None = None,
    index_params: dict[str, Any] | None = None,
    search_params: dict[str, Any] | None = None,
    flip: bool = True,
    drop_grace_s: float | None = None,
    progress: bool = True,
) -> IndexStats:
    """Full mode: write rows 2..n-1 to a NEW collection for `version`, build it, then flip the pointer.
    Incremental mode: upsert only `changed_ids` (new or changed items) into the active version, which
    must be `version` (vectors of one model must never land in another model's index).

    drop_grace_s: after a full flip, drop versions retired longer ago than this (None = keep all).
    index_type: None picks it by catalogue size (choose_index); a type given wins. index_params /
    search_params override the chosen ones (e.g. nlist, nprobe).
    """
    if (uri is None) == (index is None):
        raise ValueError("pass exactly one of uri or index")
    idx = index if index is not None else ItemIndex(str(uri), token=token, prefix=prefix)
    m = _as_matrix(item_vectors)
    v = normalize_version(version)
    t0 = time.perf_counter()
    if incremental:
        if changed_ids is None:
            raise ValueError("incremental mode needs changed_ids (the new or changed item indices)")
        active = idx.active_version(max_age_s=0)
        if active != v:
            raise VersionMismatch(
                f"incremental upsert for model version {v!r} but the active index version is {active!r}; "
                f"run a full index of {v!r} instead (it builds a new collection and flips)"
            )
        ids = np.unique(np.fromiter((int(i) for i in changed_ids), dtype=np.int64))
        if len(ids) and (ids.min() < idx.min_id or ids.max() >= m.shape[0]):
            raise ValueError(f"changed_ids must lie in {idx.min_id}..{m.shape[0] - 1} (0/1 are PAD/OOV)")
        rows = idx.upsert(v, ids, m[ids], batch=chunk, progress=progress)
        t1 = time.perf_counter()
        return IndexStats(
            v,
            "incremental",
            rows,
            m.shape[1],
            t1 - t0,
            t1 - t0,
            0.0,
            active,
            active,
            [],
            idx.info(v).index_type,
        )

    previous = idx.active_version(max_age_s=0)
    ids = np.arange(idx.min_id, m.shape[0], dtype=np.int64)
    applies = idx.applies_index_params()
    it, ip, sp = choose_index(len(ids), index_type, applies_index_params=applies)
    if index_type is None and not applies and len(ids) >= IVF_FROM_ROWS:
        log.warning(
            "%d items: FLAT (exact scan of every row per query), because this Milvus (milvus-lite) does not "
            "apply IVF parameters; at this size serve from Milvus standalone (indexer/README.md)",
            len(ids),
        )
    idx.create_version(
        v,
        dim=m.shape[1],
        metric=metric,
        index_type=it,
        index_params=index_params if index_params is not None else ip,
        search_params=search_params if search_params is not None else sp,
        replace=True,
    )
    rows = idx.insert(v, ids, m[idx.min_id :], batch=chunk, progress=progress)
    t1 = time.perf_counter()
    idx.build(v)
    t2 = time.perf_counter()
    active = previous
    dropped: list[str] = []
    if flip:
        idx.flip(v)
        active = v
        if drop_grace_s is not None:
            dropped = idx.drop_old(grace_s=drop_grace_s)
    return IndexStats(
        v, "full", rows, m.shape[1], time.perf_counter() - t0, t1 - t0, t2 - t1, previous, active, dropped, it
    )
