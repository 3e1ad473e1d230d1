"""Write a model version's item vectors to Milvus: a new collection, built, then flipped to.

This module computes nothing: it takes the [n_items, d] matrix the model produces (`item_vectors()`,
row index = item index) and only writes it. Rows 0 (padding) and 1 (OOV) are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from indexer.store import ItemIndex, VersionMismatch, normalize_version


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
    index_type: str = "FLAT",
    flip: bool = True,
    drop_grace_s: float | None = None,
    progress: bool = True,
) -> IndexStats:
    """Full mode: write rows 2..n-1 to a NEW collection for `version`, build it, then flip the pointer.
    Incremental mode: upsert only `changed_ids` (new or changed items) into the active version, which
    must be `version` (vectors of one model must never land in another model's index).

    drop_grace_s: after a full flip, drop versions retired longer ago than this (None = keep all).
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
        return IndexStats(v, "incremental", rows, m.shape[1], t1 - t0, t1 - t0, 0.0, active, active, [])

    previous = idx.active_version(max_age_s=0)
    idx.create_version(v, dim=m.shape[1], metric=metric, index_type=index_type, replace=True)
    ids = np.arange(idx.min_id, m.shape[0], dtype=np.int64)
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
        v, "full", rows, m.shape[1], time.perf_counter() - t0, t1 - t0, t2 - t1, previous, active, dropped
    )
