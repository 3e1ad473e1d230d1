"""Which behaviour feeds which interest: the coupling coefficients of B2I routing (the paper's Fig. 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mind.dataset import Interactions, pad_windows
from mind.model import MIND
from mind.train import feature_tables


@torch.no_grad()
def coupling(
    model: MIND, inter: Interactions, histories: list[np.ndarray], times: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """Per history, the final routing weights w [L_u, K'_u] (rows: its last L behaviours).

    times: the histories' Unix seconds (mind.train.case_times), for a model that reads behaviour time.
    """
    side_t, _ = feature_tables(inter)
    model.eval()
    ids = torch.as_tensor(pad_windows(histories, model.cfg.max_len))
    ts = torch.as_tensor(pad_windows(times, model.cfg.max_len)) if times is not None else None
    _, active, w = model.capsules(ids, side_t[ids], ts)  # [B,K], [B,L,K]
    out = []
    for b, h in enumerate(histories):
        n = min(len(h), model.cfg.max_len)
        out.append(w[b, :n, : int(active[b].sum())].numpy())
    return out


def interest_purity(
    model: MIND, inter: Interactions, users: list[int] | np.ndarray, labels: np.ndarray
) -> float:
    """How well interests separate known item groups (e.g. planted categories).

    Each behaviour goes to its strongest interest; an interest's purity is the share of its most
    common label; the result is the behaviour-weighted mean over all users' interests. Items with
    label < 0 (noise, unknown) are left out.
    """
    histories = [inter.sequences[u][-model.cfg.max_len :] for u in users]
    times = (
        [inter.timestamps[u][-model.cfg.max_len :] for u in users] if inter.timestamps is not None else None
    )
    agree = total = 0
    for h, w in zip(histories, coupling(model, inter, histories, times), strict=True):
        assign = w.argmax(-1)  # [L_u]
        lab = labels[h]
        keep = lab >= 0
        for j in np.unique(assign[keep]):
            counts = np.bincount(lab[keep & (assign == j)])
            agree += int(counts.max())
            total += int(counts.sum())
    return agree / max(total, 1)


def plot_coupling(w: np.ndarray, path: Path, item_labels: list[str] | None = None, title: str = "") -> Path:
    """Heatmap of w: behaviours as columns, interests as rows, like Fig. 5 of the paper."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L, K = w.shape
    fig = Figure(figsize=(max(6.0, 0.45 * L + 2), 1.0 + 0.6 * K))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    im = ax.imshow(w.T, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(K), [f"interest {k + 1}" for k in range(K)])
    ax.set_xticks(range(L), item_labels or [str(i) for i in range(L)], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("behaviour (oldest -> newest)")
    ax.set_title(title or "coupling coefficients w_ij")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_couplings(ws: list[np.ndarray], labels: list[list[str]], titles: list[str], path: Path) -> Path:
    """Several users' heatmaps stacked in one PNG (the report's long-history users)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max(6.0, 0.3 * max((w.shape[0] for w in ws), default=1) + 2)
    heights = [1.0 + 0.45 * w.shape[1] for w in ws]
    fig = Figure(figsize=(width, sum(heights) + 1.2 * len(ws)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ws), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, w, lab, title in zip(axes, ws, labels, titles, strict=True):
        L, K = w.shape
        im = ax.imshow(w.T, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(range(K), [f"interest {k + 1}" for k in range(K)])
        ax.set_xticks(range(L), lab if L <= 30 else [""] * L, rotation=70, ha="right", fontsize=6)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1].set_xlabel("behaviour (oldest -> newest)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
