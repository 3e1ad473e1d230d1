"""The retrieval step shared by offline evaluation and online serving.

Serving (Eq. 3 of the MIND paper): each of a user's interest vectors retrieves its own
top-n items by inner product, and a candidate's score is its maximum over interests.
`exact_topn` is the exact per-interest search (the physical reference for the ANN index);
`merge_interests` is the merge that the stream worker applies to whatever the per-interest
search returned (exact or ANN). Offline evaluation calls the very same two functions, so
offline and streaming numbers can be compared user by user.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mind.dataset import OOV, PAD

# Upper bound on the [chunk, K, M] score block that exact_topn materialises at once
# (float32 elements; 2**25 is 128 MiB), so that a large batch never blows memory.
_MAX_BLOCK = 1 << 25

ArrayLike = np.ndarray | torch.Tensor


def exact_topn(
    interests: torch.Tensor,
    active: torch.Tensor,
    item_vectors: torch.Tensor,
    n: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-interest inner-product top-n over the whole catalogue.

    interests [B, K, d], active bool [B, K], item_vectors [M, d] (row = item index).
    exclude: optional items never to return — a 1-D int tensor of ids or a bool mask [M]
    shared by the batch, or a bool mask [B, M] (True = excluded) per user.
    Returns ids [B, K, n] int64 and scores [B, K, n] float32, best first. PAD and OOV rows,
    excluded items and inactive interests never appear: their slots hold id -1 / score -inf
    (also when the catalogue has fewer than n eligible items).
    """
    if interests.dim() != 3:
        raise ValueError(f"interests must be [B, K, d], got {tuple(interests.shape)}")
    b, k, d = interests.shape
    m = item_vectors.shape[0]
    if item_vectors.dim() != 2 or item_vectors.shape[1] != d:
        raise ValueError(f"item_vectors must be [M, {d}], got {tuple(item_vectors.shape)}")
    if active.shape != (b, k):
        raise ValueError(f"active must be [{b}, {k}], got {tuple(active.shape)}")
    ids_out = torch.full((b, k, n), -1, dtype=torch.int64)
    scores_out = torch.full((b, k, n), float("-inf"), dtype=torch.float32)
    if b == 0 or n <= 0 or m == 0:
        return ids_out, scores_out

    items = item_vectors.detach().to(torch.float32)
    interests = interests.detach().to(torch.float32)
    active = active.detach().to(torch.bool).cpu()
    # Items that nobody may get: PAD, OOV and a shared exclude list.
    banned = torch.zeros(m, dtype=torch.bool)
    banned[[i for i in (PAD, OOV) if i < m]] = True
    row_mask: torch.Tensor | None = None
    if exclude is not None:
        if exclude.dtype == torch.bool and exclude.dim() == 1:
            if exclude.shape[0] != m:
                raise ValueError(f"exclude mask must be [{m}], got {tuple(exclude.shape)}")
            banned |= exclude.cpu()
        elif exclude.dtype == torch.bool and exclude.dim() == 2:
            if exclude.shape != (b, m):
                raise ValueError(f"exclude mask must be [{b}, {m}], got {tuple(exclude.shape)}")
            row_mask = exclude.cpu()
        else:
            ex = exclude.detach().reshape(-1).to(torch.int64).cpu()
            banned[ex[(ex >= 0) & (ex < m)]] = True
    banned = banned.to(items.device)

    take = min(n, m)
    chunk = max(1, _MAX_BLOCK // max(1, k * m))
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        s = torch.einsum("bkd,md->bkm", interests[start:stop].to(items.device), items)
        s.masked_fill_(banned, float("-inf"))
        if row_mask is not None:
            s.masked_fill_(row_mask[start:stop, None, :].to(s.device), float("-inf"))
        top_s, top_i = torch.topk(s, take, dim=-1)
        top_s, top_i = top_s.cpu(), top_i.cpu()
        invalid = torch.isneginf(top_s) | ~active[start:stop, :, None]
        top_i = top_i.masked_fill(invalid, -1)
        top_s = top_s.masked_fill(invalid, float("-inf"))
        ids_out[start:stop, :, :take] = top_i
        scores_out[start:stop, :, :take] = top_s
    return ids_out, scores_out


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def merge_interests(
    ids: ArrayLike,
    scores: ArrayLike,
    n: int,
    seen: Sequence[Iterable[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-interest results into one list per user (Eq. 3: score = max over interests).

    ids, scores [B, K, n'] (numpy or torch; n' may differ from n). Ids < 0 (missing results,
    inactive interests) are ignored. An item found by several interests keeps its best score
    and that interest's index (the lowest index on an exact tie). Items in seen[b] are
    dropped for user b. Ordering: score descending, then item id ascending, so the output is
    deterministic. Returns numpy ids [B, n] int64, scores [B, n] float32 and interest [B, n]
    int64, padded with -1 / -inf / -1 when fewer than n candidates remain.
    """
    ids_np = _as_numpy(ids).astype(np.int64, copy=False)
    sc_np = _as_numpy(scores).astype(np.float32, copy=False)
    if ids_np.shape != sc_np.shape or ids_np.ndim != 3:
        raise ValueError(f"ids and scores must both be [B, K, n], got {ids_np.shape} and {sc_np.shape}")
    b, k, per = ids_np.shape
    out_ids = np.full((b, n), -1, dtype=np.int64)
    out_sc = np.full((b, n), -np.inf, dtype=np.float32)
    out_int = np.full((b, n), -1, dtype=np.int64)
    if b == 0 or n <= 0 or k * per == 0:
        return out_ids, out_sc, out_int

    flat_ids = ids_np.reshape(b, k * per)
    flat_sc = sc_np.reshape(b, k * per)
    flat_int = np.repeat(np.arange(k, dtype=np.int64), per)
    if flat_ids.size and (flat_ids.max() >= 1 << 31):
        raise ValueError("item ids must be < 2**31")
    valid = (flat_ids >= 0) & ~np.isneginf(flat_sc) & ~np.isnan(flat_sc)
    flat_ids = np.where(valid, flat_ids, -1)  # an invalid slot must not shadow a valid duplicate
    desc = _desc_bits(np.where(valid, flat_sc, 0.0))

    # One unstable sort per row by the packed key (id asc, score desc): the first entry of
    # each id run is the item's best. Packed uint64 keys sort several times faster than a
    # multi-key (stable) lexsort, which matters on the stream worker's hot path.
    id_key = (flat_ids + 1).astype(np.uint64) << np.uint64(32)
    key = id_key | desc
    order = np.argsort(key, axis=-1)
    s_key = np.take_along_axis(key, order, axis=-1)
    s_ids = np.take_along_axis(flat_ids, order, axis=-1)
    s_sc = np.take_along_axis(flat_sc, order, axis=-1)
    s_valid = np.take_along_axis(valid, order, axis=-1)
    s_desc = np.take_along_axis(desc, order, axis=-1)
    s_int = flat_int[order]
    # Exact ties (same item, same score from several interests) land in arbitrary order:
    # give each group of equal keys its lowest interest index so the result is well defined.
    new_group = np.ones(s_key.shape, dtype=bool)
    new_group[:, 1:] = s_key[:, 1:] != s_key[:, :-1]
    starts = np.flatnonzero(new_group)
    group_min = np.minimum.reduceat(s_int.ravel(), starts)
    s_int.ravel()[starts] = group_min
    keep = np.ones(s_ids.shape, dtype=bool)
    keep[:, 1:] = s_ids[:, 1:] != s_ids[:, :-1]
    keep &= s_valid

    if seen is not None:
        if len(seen) != b:
            raise ValueError(f"seen must have one entry per user ({b}), got {len(seen)}")
        keep &= ~_seen_mask(s_ids, seen)

    # Rank the survivors by (score desc, id asc), again as one packed key; dropped entries
    # get the largest key and sort last.
    rank_key = np.where(keep, (s_desc << np.uint64(32)) | s_ids.astype(np.uint64), np.uint64(2**64 - 1))
    rank = np.argsort(rank_key, axis=-1)[:, :n]
    take = rank.shape[1]
    r_keep = np.take_along_axis(keep, rank, axis=-1)
    out_ids[:, :take] = np.where(r_keep, np.take_along_axis(s_ids, rank, axis=-1), -1)
    out_sc[:, :take] = np.where(r_keep, np.take_along_axis(s_sc, rank, axis=-1), -np.inf)
    out_int[:, :take] = np.where(r_keep, np.take_along_axis(s_int, rank, axis=-1), -1)
    return out_ids, out_sc, out_int


def _desc_bits(scores: np.ndarray) -> np.ndarray:
    """Map float32 scores to uint64 (< 2**32) that sort ascending as the scores sort descending."""
    u = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    asc = np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
    return (~asc).astype(np.uint64)


def _seen_mask(ids: np.ndarray, seen: Sequence[Iterable[int]]) -> np.ndarray:
    """Bool [B, C]: ids[b, c] is in seen[b].

    Rows of `ids` must be sorted ascending (as merge_interests leaves them), so the packed
    (row, item) keys are globally sorted and one searchsorted answers all users at once.
    """
    b = ids.shape[0]
    width = int(max(ids.max(initial=0), 0)) + 1
    parts = []
    for row, items in enumerate(seen):
        arr = items if isinstance(items, np.ndarray) else np.fromiter(items, dtype=np.int64)
        arr = arr.astype(np.int64, copy=False)
        parts.append(arr[(arr >= 0) & (arr < width)] + row * width)
    seen_keys = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    if seen_keys.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    keys = ids + np.arange(b, dtype=np.int64)[:, None] * width
    pos = np.searchsorted(seen_keys, keys.ravel())
    hit = seen_keys[np.minimum(pos, seen_keys.size - 1)] == keys.ravel()
    return hit.reshape(ids.shape) & (ids >= 0)


def retrieve(
    interests: torch.Tensor,
    active: torch.Tensor,
    item_vectors: torch.Tensor,
    n: int,
    seen: Sequence[Iterable[int]] | None = None,
    per_interest_n: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact retrieval end to end: per-interest top-n, then the serving merge.

    per_interest_n (default n) is how many items each interest asks the index for, exactly
    as the stream worker asks Milvus, so that offline numbers reproduce serving's.
    """
    ids, scores = exact_topn(interests, active, item_vectors, per_interest_n or n)
    return merge_interests(ids, scores, n, seen=seen)
