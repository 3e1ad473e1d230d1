"""Evaluation harness: rank eval cases with any retriever, score them, plot the comparison.

Everything here takes "cases" by duck typing (anything with .user, .history, .targets,
such as mind.split.EvalCase), so baselines, the offline model and the streaming replay are
all scored by one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from mind.metrics import DEFAULT_NS, per_user_metrics, recall_hr_ndcg


class CaseLike(Protocol):
    """What evaluation needs of one test user (mind.split.EvalCase satisfies it)."""

    user: int
    history: np.ndarray  # int64 item indices, chronological
    targets: np.ndarray  # int64 item indices clicked after the history


Recommend = Callable[[Sequence[CaseLike], int], np.ndarray]


def evaluate_ranked(
    ranked: np.ndarray, cases: Sequence[CaseLike], ns: Sequence[int] = DEFAULT_NS
) -> dict[str, float]:
    """Metrics of ranked lists [len(cases), Nmax] (row i belongs to cases[i])."""
    return recall_hr_ndcg(ranked, [c.targets for c in cases], ns)


def evaluate_ranked_per_user(
    ranked: np.ndarray, cases: Sequence[CaseLike], ns: Sequence[int] = DEFAULT_NS
) -> dict[str, np.ndarray]:
    """Per-case metric arrays, to diff two runs (e.g. streaming vs offline) user by user."""
    return per_user_metrics(ranked, [c.targets for c in cases], ns)


def rank_cases(
    recommend: Recommend, cases: Sequence[CaseLike], n: int, batch_size: int = 512, desc: str = "rank"
) -> np.ndarray:
    """Call recommend(batch, n) over batches of cases; returns [len(cases), n] (-1 padded)."""
    out = np.full((len(cases), n), -1, dtype=np.int64)
    starts = range(0, len(cases), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=None, leave=False):
        batch = cases[start : start + batch_size]
        ranked = np.asarray(recommend(batch, n), dtype=np.int64)
        if ranked.ndim != 2 or ranked.shape[0] != len(batch):
            raise ValueError(f"recommend returned shape {ranked.shape} for a batch of {len(batch)}")
        width = min(n, ranked.shape[1])
        out[start : start + len(batch), :width] = ranked[:, :width]
    return out


def evaluate_retriever(
    recommend: Recommend,
    cases: Sequence[CaseLike],
    ns: Sequence[int] = DEFAULT_NS,
    batch_size: int = 512,
) -> dict[str, float]:
    """Rank all cases with recommend (top max(ns)) and return the averaged metrics."""
    ranked = rank_cases(recommend, cases, max(ns), batch_size=batch_size)
    return evaluate_ranked(ranked, cases, ns)


def plot_metric_vs_n(
    results: Mapping[str, Mapping[str, float]],
    path: str | Path,
    metric: str = "recall",
    errors: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Write a PNG of metric@N against N, one line per model (keys of `results`).

    errors: per model, the standard error of each metric (over seeds), drawn as error bars."""
    # An explicit Agg Figure (no pyplot): no global backend switch, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_ns: set[int] = set()
    for name, metrics in results.items():
        points = sorted(
            (int(key.split("@", 1)[1]), float(value))
            for key, value in metrics.items()
            if key.split("@", 1)[0] == metric and "@" in key
        )
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        all_ns.update(xs)
        err = (errors or {}).get(name)
        if err:
            yerr = [float(err.get(f"{metric}@{x}", 0.0)) for x in xs]
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    if all_ns:
        ax.set_xticks(sorted(all_ns))
        ax.set_xticklabels([str(n) for n in sorted(all_ns)])
        ax.minorticks_off()
    ax.set_xlabel("N (list length)")
    ax.set_ylabel(f"{metric}@N")
    ax.set_title(f"{metric}@N by model")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean of a - b over the same users, its standard error and a t-interval at `level`.

    a, b: one value per test user (e.g. recall@50, averaged over seeds) in the same user order.
    The users are the unit of replication, so the interval says how sure the difference is for this
    population of users (the seeds' noise is inside each user's value).
    """
    from scipy import stats

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = diff.size
    mean = float(diff.mean()) if n else float("nan")
    se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * se) if n > 1 else float("nan")
    base = float(np.mean(b)) if n else float("nan")
    return {
        "diff": mean,
        "se": se,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "level": level,
        "relative": mean / base if base else float("nan"),
        "users": n,
    }
