"""Item embeddings for the whole catalogue, computed in chunks by the model version being indexed.

Why chunks: `MIND.item_vectors` embeds the whole catalogue in one call, which holds [M, S, d] side
embeddings at once (a 1M-item catalogue with 8 side ids at d=64 is 2 GiB of float32). Chunks bound that
and give the progress bar something to count. Each row depends only on its own ids, so the result equals
`MIND.item_vectors` exactly (tested).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from mind.model import MIND


def item_vectors(
    model: MIND, item_side: np.ndarray | torch.Tensor, chunk: int = 2048, progress: bool = True
) -> np.ndarray:
    """e_i for every item index 0..M-1 (rows 0/1 = PAD/OOV included, as the indexer expects).

    item_side [M, S] side ids per item (the table the model was trained with) -> float32 [M, d]. Rows from
    n_items on are catalogue items newer than the model (cold start): the model embeds them from their side
    ids alone, with the unknown item's id embedding (mind.model.MIND.embed_items).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    side = torch.as_tensor(np.asarray(item_side), dtype=torch.int64)
    if side.dim() != 2:
        raise ValueError(f"item_side must be [n_items, S], got shape {tuple(side.shape)}")
    m = side.shape[0]
    if m < model.cfg.n_items:
        raise ValueError(f"item_side has {m} rows but the model's vocabulary has {model.cfg.n_items} items")
    out = np.empty((m, model.cfg.d), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=m, unit="item", desc="item vectors", disable=not progress) as bar,
        ):
            for start in range(0, m, chunk):
                stop = min(m, start + chunk)
                ids = torch.arange(start, stop, dtype=torch.int64)
                out[start:stop] = model.embed_items(ids, side[start:stop]).float().numpy()
                bar.update(stop - start)
    finally:
        model.train(was_training)
    return out
