"""Toy user tower, batches and export helpers shared by the Triton tests (a module, not conftest, so that
no other conftest.py can shadow it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mind.export import export_user_tower
from mind.model import MIND, MINDConfig

# Shapes of the towers served in tests: L, S, P, K, d and vocabulary sizes.
L, S, P, K, D = 12, 2, 2, 4, 16
N_ITEMS, N_SIDE, N_PROFILE = 50, 7, 5


class ToyTower(nn.Module):
    """Smallest module with the user-tower contract: masked mean + one linear per interest, K' = log2 rule."""

    def __init__(self, seed: int = 0, n_items: int = N_ITEMS, K: int = K, d: int = D) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.K = K
        self.item = nn.Embedding(n_items, d, padding_idx=0)
        self.side = nn.Embedding(N_SIDE, d, padding_idx=0)
        self.prof = nn.Embedding(N_PROFILE, d, padding_idx=0)
        self.heads = nn.Linear(d, K * d)

    def forward(
        self, item_ids: torch.Tensor, side_ids: torch.Tensor, profile_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (item_ids > 0).to(torch.float32)  # [B,L]
        e = self.item(item_ids) + self.side(side_ids).sum(2)  # [B,L,d]
        n = mask.sum(1)  # [B]
        pooled = (e * mask[:, :, None]).sum(1) / n.clamp(min=1.0)[:, None] + self.prof(profile_ids).sum(1)
        v = self.heads(pooled).view(-1, self.K, pooled.shape[1])  # [B,K,d]
        k_user = torch.floor(torch.log2(n.clamp(min=1.0))).to(torch.int64).clamp(min=1, max=self.K)
        active = torch.arange(self.K)[None, :] < k_user[:, None]  # [B,K]
        return v * active[:, :, None], active


def random_batch(
    B: int, seed: int = 0, lengths: list[int] | None = None, n_items: int = N_ITEMS, max_len: int = L
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded windows of variable true length (0..max_len) with valid side/profile ids."""
    g = np.random.default_rng(seed)
    lens = lengths if lengths is not None else list(g.integers(0, max_len + 1, size=B))
    items = np.zeros((len(lens), max_len), dtype=np.int64)
    for r, n in enumerate(lens):
        items[r, :n] = g.integers(1, n_items, size=n)
    side = g.integers(0, N_SIDE, size=(len(lens), max_len, S)) * (items[..., None] > 0)
    prof = g.integers(0, N_PROFILE, size=(len(lens), P))
    return items, side.astype(np.int64), prof.astype(np.int64)


def torch_out(tower: nn.Module, batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        i, a = tower.eval()(*(torch.from_numpy(x) for x in batch))
    return i.numpy(), a.numpy()


def export(tower: nn.Module, repo: Path, name: str, model_version: str, **kw: object) -> int:
    args: dict = dict(
        model_name=name,
        max_len=L,
        n_side=S,
        n_profile=P,
        K=K,
        d=D,
        model_version=model_version,
        vocab_hash=f"vh-{model_version}",
        n_items=N_ITEMS,
        side_vocab=N_SIDE,
        profile_vocab=N_PROFILE,
    )
    args.update(kw)
    return export_user_tower(tower, repo, **args)


def real_mind() -> nn.Module:
    """The project's MIND with the test shapes."""
    torch.manual_seed(0)
    cfg = MINDConfig(
        n_items=N_ITEMS, n_side=N_SIDE, n_profile=N_PROFILE, n_profile_fields=P, d=D, K=K, max_len=L
    )
    return MIND(cfg).eval()
