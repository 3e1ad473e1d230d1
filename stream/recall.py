"""The recall step the stream worker calls: many users' interest vectors -> one ANN search -> top-N each.

All active interest vectors of the micro-batch go to Milvus in ONE batched search (per-call overhead,
not the scan, dominates at these sizes: indexer/README.md). Each user's per-interest lists are then
merged by max score (Eq. 3 of the MIND paper) by mind.retrieval.merge_interests, which also
de-duplicates and drops seen items.

The user tower and the item index must come from the same model version: interest vectors of one
model searched against another model's item vectors return plausible-looking garbage, so a mismatch
is refused loudly (VersionMismatch) and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter

from indexer.store import MAX_TOPK, InvalidQuery, ItemIndex, VersionMismatch, normalize_version
from mind.retrieval import merge_interests

VERSION_MISMATCH = Counter(
    "mind_recall_version_mismatch_total",
    "Recall requests refused because the user-tower version differs from the active item-index version",
)


@dataclass
class RecallResult:
    """Per user: ids [B, n] int64 (-1 pad), scores [B, n] float32 (-inf pad), the interest index each
    candidate came from [B, n] int64 (-1 pad), and the model version that served them all."""

    ids: np.ndarray
    scores: np.ndarray
    interest: np.ndarray
    version: str

    def as_lists(self) -> list[list[tuple[int, float, int]]]:
        """[(item, score, interest), ...] per user, padding removed (what the recall topic carries)."""
        out: list[list[tuple[int, float, int]]] = []
        for ids, sc, it in zip(self.ids, self.scores, self.interest, strict=True):
            keep = ids >= 0
            out.append(list(zip(ids[keep].tolist(), sc[keep].tolist(), it[keep].tolist(), strict=True)))
        return out


def _np(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on GPU / with grad
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class Recaller:
    """Batched per-interest recall against an ItemIndex.

    per_interest_n: how many items each interest retrieves. Default n, plus the largest seen-set of the
    batch when seen items are dropped: then an item of the true top-n can rank at most n + |seen| within
    its own interest, so the merged top-n is exact, not merely approximate.
    """

    def __init__(self, index: ItemIndex, n: int, per_interest_n: int | None = None) -> None:
        if not 0 < n <= MAX_TOPK or (per_interest_n is not None and not 0 < per_interest_n <= MAX_TOPK):
            raise ValueError(f"n and per_interest_n must lie in 1..{MAX_TOPK}")
        self.index, self.n, self.per_interest_n = index, n, per_interest_n

    def check_version(self, tower_version: str | int) -> str:
        """The tower's version if it equals the index's active version; else VersionMismatch (counted)."""
        tower = normalize_version(tower_version)
        active = self.index.active_version()
        if tower != active:  # the cached pointer may predate a flip: re-read once before refusing
            active = self.index.active_version(max_age_s=0)
        if tower != active:
            VERSION_MISMATCH.inc()
            raise VersionMismatch(
                f"user tower is model version {tower!r} but the item index serves {active!r}: their vectors "
                f"live in different spaces. Index {tower!r} (`mind index`, which flips when built) or "
                f"deploy the tower of {active!r}."
            )
        return tower

    def recall(
        self,
        interests: Any,
        active: Any,
        tower_version: str | int,
        seen: Sequence[Iterable[int]] | None = None,
    ) -> RecallResult:
        """interests [B, K, d], active [B, K] bool (dynamic K'), seen: item ids per user, or None."""
        version = self.check_version(tower_version)
        vec = _np(interests, np.float32)
        if vec.ndim != 3:
            raise InvalidQuery(f"interests must be [B, K, d], got shape {vec.shape}")
        b, k, _ = vec.shape
        act = np.ones((b, k), dtype=bool) if active is None else _np(active, bool)
        if act.shape != (b, k):
            raise InvalidQuery(f"active must be [B, K] = {(b, k)}, got {act.shape}")
        if seen is not None and len(seen) != b:
            raise InvalidQuery(f"seen must have one entry per user ({b}), got {len(seen)}")
        seen_sets = [set(s) for s in seen] if seen is not None else None
        per = self.per_interest_n or self.n
        if self.per_interest_n is None and seen_sets:
            per = min(MAX_TOPK, per + max(len(s) for s in seen_sets))

        # One search for every active interest of every user; the version is pinned to the tower's,
        # so a flip between the check and the search cannot mix versions.
        res = self.index.search(vec[act], per, version=version)
        ids = np.full((b, k, per), -1, dtype=np.int64)
        scores = np.full((b, k, per), -np.inf, dtype=np.float32)
        ids[act], scores[act] = res.ids, res.scores
        out_ids, out_sc, out_int = merge_interests(ids, scores, self.n, seen=seen_sets)
        return RecallResult(out_ids, out_sc, out_int, res.version)
