"""Non-neural baselines every report carries: MostPopular and item-based CF.

Both are fitted on the TRAIN users' sequences only (item indices; 0 = PAD, 1 = OOV are
never recommended) and expose `.recommend(cases, n) -> [len(cases), n]` item ids (-1 pad),
the signature that mind.evaluate.evaluate_retriever expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from mind.dataset import OOV, PAD

if TYPE_CHECKING:
    from mind.evaluate import CaseLike

FIRST_ITEM = max(PAD, OOV) + 1  # first real item index


def topn_dense(scores: np.ndarray, n: int) -> np.ndarray:
    """Row-wise top-n indices of a dense [B, M] score matrix, ties broken by lower index.

    Deterministic (unlike argpartition / torch.topk on ties, which matter here because many
    items share a score of 0) and linear apart from sorting the n winners. Rows with fewer
    than n finite scores are padded with -1 (-inf marks an item that must not appear).
    """
    b, m = scores.shape
    out = np.full((b, n), -1, dtype=np.int64)
    take = min(n, m)
    if b == 0 or take == 0:
        return out
    neg = -scores
    # kth-best score per row; entries strictly better are all in, ties fill the rest by index.
    kth = -np.partition(neg, take - 1, axis=1)[:, take - 1 : take]
    better = scores > kth
    tie = scores == kth
    room = take - better.sum(axis=1, keepdims=True)
    chosen = better | (tie & (np.cumsum(tie, axis=1) <= room))
    cols = np.nonzero(chosen)[1].reshape(b, take)  # ascending index within each row
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=-1)
    cols = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    out[:, :take] = np.where(np.isneginf(vals), -1, cols)
    return out


def _history_sets(cases: Sequence[CaseLike]) -> list[np.ndarray]:
    return [np.unique(np.asarray(c.history, dtype=np.int64)) for c in cases]


class MostPopular:
    """Items ranked by interaction count over the training sequences, ties by lower index.

    The same list for everyone; filter_seen=False matches the DESIGN reference protocol
    (Beauty: Recall@50 0.0489, HR@50 0.0943). filter_seen=True drops each user's history.
    """

    def __init__(self, train_sequences: Sequence[np.ndarray], n_items: int, filter_seen: bool = False):
        flat = np.concatenate(
            [np.asarray(s, dtype=np.int64) for s in train_sequences] + [np.empty(0, np.int64)]
        )
        flat = flat[(flat >= FIRST_ITEM) & (flat < n_items)]
        self.counts = np.bincount(flat, minlength=n_items).astype(np.int64)
        items = np.arange(FIRST_ITEM, n_items, dtype=np.int64)
        # Only items seen in training are ranked: a never-clicked item has no popularity.
        items = items[self.counts[items] > 0]
        self.ranking = items[np.lexsort((items, -self.counts[items]))]
        self.n_items = n_items
        self.filter_seen = filter_seen

    def recommend(self, cases: Sequence[CaseLike], n: int) -> np.ndarray:
        out = np.full((len(cases), n), -1, dtype=np.int64)
        if not self.filter_seen:
            head = self.ranking[:n]
            out[:, : head.size] = head
            return out
        for row, hist in enumerate(_history_sets(cases)):
            cand = self.ranking[: n + hist.size]
            cand = cand[~np.isin(cand, hist)][:n]
            out[row, : cand.size] = cand
        return out


class ItemCF:
    """Item-based collaborative filtering (the MIND paper's online baseline).

    X is the binary train-user x item matrix; sim = XᵀX / sqrt(deg_i deg_j) (cosine over
    co-occurrence, deg_i = users who clicked i) with a zero diagonal. A candidate's score
    is Σ_{h in history} sim(h, c), each distinct history item counted once. Candidates with
    score 0 are not recommended (the list is then -1 padded) unless fill_popular=True, which
    tops it up with the most popular items. max_neighbors (default: all) keeps only each
    item's top-k most similar items, trading a little accuracy for a sparser matrix on large
    catalogues; Beauty does not need it.
    """

    def __init__(
        self,
        train_sequences: Sequence[np.ndarray],
        n_items: int,
        max_neighbors: int | None = None,
        filter_seen: bool = False,
        fill_popular: bool = False,
    ):
        self.n_items = n_items
        self.filter_seen = filter_seen
        rows, cols = [], []
        for u, seq in enumerate(train_sequences):
            items = np.unique(np.asarray(seq, dtype=np.int64))
            items = items[(items >= FIRST_ITEM) & (items < n_items)]
            rows.append(np.full(items.size, u, dtype=np.int64))
            cols.append(items)
        n_users = len(train_sequences)
        r = np.concatenate(rows + [np.empty(0, np.int64)])
        c = np.concatenate(cols + [np.empty(0, np.int64)])
        x = sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(n_users, n_items))
        co = (x.T @ x).tocsr()  # item x item co-occurrence counts
        deg = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
        inv = np.zeros_like(deg)
        inv[deg > 0] = 1.0 / np.sqrt(deg[deg > 0])
        sim = sp.diags(inv.astype(np.float32)) @ co @ sp.diags(inv.astype(np.float32))
        sim = sim.tocsr()
        sim.setdiag(0.0)
        sim.eliminate_zeros()
        if max_neighbors is not None:
            sim = _keep_top_per_row(sim, max_neighbors)
        self.sim = sim.astype(np.float32)
        self.popular = MostPopular(train_sequences, n_items) if fill_popular else None

    def scores(self, cases: Sequence[CaseLike]) -> np.ndarray:
        """Dense [len(cases), n_items] CF scores (PAD/OOV at -inf)."""
        hist = _history_sets(cases)
        rows = np.concatenate(
            [np.full(h.size, i, dtype=np.int64) for i, h in enumerate(hist)] + [np.empty(0, np.int64)]
        )
        cols = np.concatenate(hist + [np.empty(0, np.int64)])
        ok = (cols >= FIRST_ITEM) & (cols < self.n_items)
        h = sp.csr_matrix(
            (np.ones(int(ok.sum()), dtype=np.float32), (rows[ok], cols[ok])), shape=(len(cases), self.n_items)
        )
        dense = np.asarray((h @ self.sim).todense(), dtype=np.float32)
        dense[:, :FIRST_ITEM] = -np.inf
        if self.filter_seen:
            dense[rows[ok], cols[ok]] = -np.inf
        return dense

    def recommend(self, cases: Sequence[CaseLike], n: int) -> np.ndarray:
        dense = self.scores(cases)
        if self.popular is None:
            dense[dense <= 0] = -np.inf  # no co-occurrence evidence: leave the slot empty
            return topn_dense(dense, n)
        # Pad with popularity: a tiny bonus below any real CF score orders the zero-score items.
        pop = self.popular.counts.astype(np.float64)
        bonus = (pop / (pop.max() + 1.0) * 1e-6).astype(np.float32)
        dense = np.where(np.isneginf(dense), dense, dense + bonus)
        return topn_dense(dense, n)


def _keep_top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of each CSR row (ties by lower column index)."""
    m = m.tocsr()
    m.sort_indices()
    indptr, indices, data = m.indptr, m.indices, m.data
    keep = np.zeros(data.size, dtype=bool)
    for row in range(m.shape[0]):
        lo, hi = indptr[row], indptr[row + 1]
        if hi - lo <= k:
            keep[lo:hi] = True
        else:
            part = np.lexsort((indices[lo:hi], -data[lo:hi]))[:k]
            keep[lo + part] = True
    row_ids = np.repeat(np.arange(m.shape[0]), np.diff(indptr))
    return sp.csr_matrix((data[keep], (row_ids[keep], indices[keep])), shape=m.shape)
