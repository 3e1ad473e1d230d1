"""Top-N retrieval metrics under the ComiRec protocol (Cen et al., KDD 2020).

For one user with ranked list L (item ids, -1 = padding) and target set T:
- recall@N = |L[:N] ∩ T| / |T|;
- hr@N     = 1 if L[:N] ∩ T is non-empty, else 0;
- ndcg@N   = DCG / IDCG, DCG = Σ_{r < N, L[r] ∈ T} 1 / log2(r + 2),
             IDCG = Σ_{i < min(|T|, N)} 1 / log2(i + 2)          (the standard NDCG; the headline one).
Targets count as a set (a repeated target counts once) and a repeated item in L counts
at its first position only.

- ndcg_comirec@N is ComiRec's own `evaluate_full` NDCG, reported beside it under its own name:
  each target t_j (j = position in the chronological TARGET list, repeats kept) that is in L[:N]
  adds 1 / log2(j + 2), and the sum is divided by Σ_{i < hits} 1 / log2(i + 2). It ignores where
  in L the hit was ranked and is 1.0 whenever the first targets are found, so it is far above the
  standard NDCG; ComiRec's maintainers recommend reporting Recall and HR only. ComiRec's script
  also divides recall by the target count with repeats; our recall counts targets as a set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_NS: tuple[int, ...] = (10, 20, 50, 100)
METRICS: tuple[str, ...] = ("recall", "hr", "ndcg", "ndcg_comirec")


def hit_matrix(ranked: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """Bool [B, Nmax]: ranked[b, r] is a target of user b (first occurrence only, -1 never)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be [B, N], got shape {ranked.shape}")
    b, nmax = ranked.shape
    if len(targets) != b:
        raise ValueError(f"{b} ranked lists but {len(targets)} target arrays")
    if b == 0 or nmax == 0:
        return np.zeros((b, nmax), dtype=bool)
    tgt = [np.unique(np.asarray(t, dtype=np.int64)) for t in targets]
    width = int(max(ranked.max(initial=0), max((int(t.max()) for t in tgt if t.size), default=0))) + 1
    rows = np.arange(b, dtype=np.int64)[:, None]
    keys = ranked + rows * width
    target_keys = np.concatenate([t[t >= 0] + i * width for i, t in enumerate(tgt)] + [np.empty(0, np.int64)])
    hits = np.isin(keys, target_keys) & (ranked >= 0)
    # A repeated item in one list may only count once: keep hits at first occurrences.
    order = np.argsort(ranked, axis=1, kind="stable")
    s = np.take_along_axis(ranked, order, axis=1)
    dup_sorted = np.zeros_like(s, dtype=bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return hits & ~dup


def per_user_metrics(
    ranked: np.ndarray, targets: Sequence[np.ndarray], ns: Sequence[int] = DEFAULT_NS
) -> dict[str, np.ndarray]:
    """Per-user recall/hr/ndcg arrays [B] for each N (keys "recall@N", ...).

    Kept per user so that two runs (e.g. streaming replay vs offline) can be diffed user by user.
    A list shorter than N is scored as is (its missing tail simply holds no hits).
    """
    hits = hit_matrix(ranked, targets)
    b, nmax = hits.shape
    n_targets = np.array([np.unique(np.asarray(t)).size for t in targets], dtype=np.float64)
    max_n = max(ns, default=0)
    discounts = 1.0 / np.log2(np.arange(max(nmax, max_n), dtype=np.float64) + 2.0)
    ideal_cum = np.concatenate([[0.0], np.cumsum(discounts)])  # ideal_cum[m] = Σ_{i<m} 1/log2(i+2)
    out: dict[str, np.ndarray] = {}
    for n in ns:
        h = hits[:, :n]
        n_hit = h.sum(axis=1).astype(np.float64)
        dcg = (h * discounts[: h.shape[1]]).sum(axis=1)
        idcg = ideal_cum[np.minimum(n_targets, n).astype(np.int64)]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"recall@{n}"] = np.where(n_targets > 0, n_hit / n_targets, 0.0)
            out[f"ndcg@{n}"] = np.where(idcg > 0, dcg / idcg, 0.0)
        out[f"hr@{n}"] = (n_hit > 0).astype(np.float64)
        out[f"ndcg_comirec@{n}"] = comirec_ndcg(ranked, targets, n)
    return {k: out[k] for k in _ordered_keys(ns)}


def comirec_ndcg(ranked: np.ndarray, targets: Sequence[np.ndarray], n: int) -> np.ndarray:
    """ComiRec's NDCG per user (see the module docstring): discount by position in the target list."""
    out = np.zeros(len(targets), dtype=np.float64)
    ranked = np.asarray(ranked, dtype=np.int64)
    for b, t in enumerate(targets):
        top = set(ranked[b, :n][ranked[b, :n] >= 0].tolist())
        found = [j for j, item in enumerate(np.asarray(t).tolist()) if item in top]
        if found:
            dcg = sum(1.0 / np.log2(j + 2.0) for j in found)
            idcg = sum(1.0 / np.log2(i + 2.0) for i in range(len(found)))
            out[b] = dcg / idcg
    return out


def recall_hr_ndcg(
    ranked: np.ndarray, targets: Sequence[np.ndarray], ns: Sequence[int] = DEFAULT_NS
) -> dict[str, float]:
    """Metrics averaged over users (keys "recall@N", "hr@N", "ndcg@N"); 0.0 when B = 0."""
    per_user = per_user_metrics(ranked, targets, ns)
    return {k: float(v.mean()) if v.size else 0.0 for k, v in per_user.items()}


def _ordered_keys(ns: Sequence[int]) -> list[str]:
    return [f"{m}@{n}" for m in METRICS for n in ns]
