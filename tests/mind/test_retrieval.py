import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mind.retrieval as retrieval
from mind.retrieval import exact_topn, merge_interests, retrieve


def _brute_topn(interests, active, items, n, banned=()):
    """Reference: per (user, interest) full sort of all allowed items in numpy."""
    b, k, _ = interests.shape
    ids = np.full((b, k, n), -1)
    scores = np.full((b, k, n), -np.inf, dtype=np.float32)
    allowed = [i for i in range(items.shape[0]) if i >= 2 and i not in banned]
    for u in range(b):
        for j in range(k):
            if not active[u, j]:
                continue
            s = items[allowed] @ interests[u, j]
            order = np.argsort(-s, kind="stable")[:n]
            ids[u, j, : order.size] = np.asarray(allowed)[order]
            scores[u, j, : order.size] = s[order]
    return ids, scores


@pytest.mark.parametrize("chunked", [False, True])
def test_exact_topn_matches_brute_force(monkeypatch, chunked):
    if chunked:
        monkeypatch.setattr(retrieval, "_MAX_BLOCK", 50)  # forces chunks of one user
    g = torch.Generator().manual_seed(0)
    b, k, d, m, n = 5, 3, 8, 40, 6
    interests = torch.randn(b, k, d, generator=g)
    items = torch.randn(m, d, generator=g)
    active = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    ids, scores = exact_topn(interests, active, items, n)
    assert ids.dtype == torch.int64 and scores.dtype == torch.float32 and ids.shape == (b, k, n)
    ref_ids, ref_scores = _brute_topn(interests.numpy(), active.numpy(), items.numpy(), n)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)
    # inactive interests contribute nothing
    assert (ids[~active] == -1).all() and torch.isneginf(scores[~active]).all()


def test_pad_oov_never_returned_even_if_best():
    d = 4
    items = torch.zeros(6, d)
    items[0] = 100.0  # PAD and OOV would be the best matches
    items[1] = 100.0
    items[2:] = torch.rand(4, d)
    interests = torch.ones(1, 2, d)
    active = torch.ones(1, 2, dtype=torch.bool)
    ids, scores = exact_topn(interests, active, items, n=10)  # n > catalogue
    got = ids[ids >= 0]
    assert set(got.tolist()) == {2, 3, 4, 5}
    assert (ids[..., 4:] == -1).all() and torch.isneginf(scores[..., 4:]).all()


def test_exclude_shared_and_per_user():
    g = torch.Generator().manual_seed(1)
    interests, items = torch.randn(2, 2, 5, generator=g), torch.randn(30, 5, generator=g)
    active = torch.ones(2, 2, dtype=torch.bool)
    ids, _ = exact_topn(interests, active, items, 28, exclude=torch.tensor([3, 7, 29]))
    assert not np.isin(ids.numpy(), [0, 1, 3, 7, 29]).any()
    assert (ids[..., :25] >= 0).all() and (ids[..., 25:] == -1).all()
    shared = torch.zeros(30, dtype=torch.bool)
    shared[[4, 6]] = True
    ids, _ = exact_topn(interests, active, items, 28, exclude=shared)
    assert not np.isin(ids.numpy(), [0, 1, 4, 6]).any() and (ids[..., :26] >= 0).all()
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, 5] = True
    ids, _ = exact_topn(interests, active, items, 28, exclude=mask)
    assert 5 not in ids[0].flatten().tolist() and 5 in ids[1].flatten().tolist()


def test_merge_dedup_keeps_max_and_interest():
    ids = np.array([[[10, 11, 12], [11, 13, -1]]])
    scores = np.array([[[0.9, 0.5, 0.1], [0.8, 0.7, 5.0]]], dtype=np.float32)  # -1's score is ignored
    out_ids, out_sc, out_int = merge_interests(ids, scores, n=5)
    assert out_ids.tolist() == [[10, 11, 13, 12, -1]]
    np.testing.assert_allclose(out_sc[0, :4], [0.9, 0.8, 0.7, 0.1])
    assert np.isneginf(out_sc[0, 4])
    assert out_int.tolist() == [[0, 1, 1, 0, -1]]


def test_merge_seen_dropped_and_torch_input_and_short_n():
    ids = torch.tensor([[[5, 6, 7], [8, 5, 9]], [[5, 6, 7], [-1, -1, -1]]])
    scores = torch.tensor([[[3.0, 2.0, 1.0], [2.5, 4.0, 0.5]], [[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]]])
    out_ids, out_sc, out_int = merge_interests(ids, scores, n=2, seen=[{5, 100}, set()])
    assert isinstance(out_ids, np.ndarray)
    assert out_ids.tolist() == [[8, 6], [7, 6]]
    assert out_int.tolist() == [[1, 0], [0, 0]]
    np.testing.assert_allclose(out_sc, [[2.5, 2.0], [3.0, 2.0]])


def test_merge_exact_tie_prefers_lowest_interest_and_lowest_id():
    ids = np.array([[[4, 3], [4, 2]]])
    scores = np.ones((1, 2, 2), dtype=np.float32)
    out_ids, _, out_int = merge_interests(ids, scores, n=3)
    assert out_ids.tolist() == [[2, 3, 4]]
    assert out_int.tolist() == [[1, 0, 0]]


def test_merge_empty_inputs():
    out_ids, out_sc, out_int = merge_interests(np.full((2, 3, 4), -1), np.zeros((2, 3, 4)), n=3)
    assert (out_ids == -1).all() and np.isneginf(out_sc).all() and (out_int == -1).all()
    out_ids, _, _ = merge_interests(np.zeros((0, 2, 3), dtype=np.int64), np.zeros((0, 2, 3)), n=3)
    assert out_ids.shape == (0, 3)


def _naive_merge(ids, scores, n, seen):
    out = []
    for u in range(ids.shape[0]):
        best: dict[int, tuple[float, int]] = {}
        for j in range(ids.shape[1]):
            for i, s in zip(ids[u, j], scores[u, j], strict=True):
                i, s = int(i), float(s)
                if i < 0 or s == -np.inf or (seen is not None and i in seen[u]):
                    continue
                if i not in best or s > best[i][0] or (s == best[i][0] and j < best[i][1]):
                    best[i] = (s, j)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:n]
        out.append([(i, s, j) for i, (s, j) in ranked])
    return out


@settings(max_examples=150, deadline=None)
@given(
    b=st.integers(1, 4),
    k=st.integers(1, 4),
    per=st.integers(1, 6),
    n=st.integers(1, 12),
    data=st.data(),
)
def test_merge_matches_naive(b, k, per, n, data):
    ids = np.array(
        data.draw(st.lists(st.integers(-1, 12), min_size=b * k * per, max_size=b * k * per)), dtype=np.int64
    ).reshape(b, k, per)
    # few distinct score values so that exact ties are common; -inf marks missing results
    score_values = st.sampled_from([-np.inf, -1.5, 0.0, 0.25, 1.0, 2.0])
    scores = np.array(
        data.draw(st.lists(score_values, min_size=b * k * per, max_size=b * k * per)), dtype=np.float32
    ).reshape(b, k, per)
    use_seen = data.draw(st.booleans())
    seen = [set(data.draw(st.lists(st.integers(0, 12), max_size=5))) for _ in range(b)] if use_seen else None
    out_ids, out_sc, out_int = merge_interests(ids, scores, n, seen=seen)
    expected = _naive_merge(ids, scores, n, seen)
    for u in range(b):
        got = [
            (int(i), float(s), int(j))
            for i, s, j in zip(out_ids[u], out_sc[u], out_int[u], strict=True)
            if i >= 0
        ]
        assert got == expected[u]
        pad = out_ids[u] < 0
        assert pad.sum() == n - len(expected[u])
        assert np.isneginf(out_sc[u][pad]).all() and (out_int[u][pad] == -1).all()


def test_retrieve_end_to_end_and_per_interest_n():
    g = torch.Generator().manual_seed(3)
    interests, items = torch.randn(3, 4, 6, generator=g), torch.randn(50, 6, generator=g)
    active = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ids, scores, interest = retrieve(
        interests, active, items, n=10, seen=[{2}, set(), set()], per_interest_n=20
    )
    full = items[2:] @ interests.transpose(1, 2)  # [3, 48, 4]
    best = full.masked_fill(~active[:, None, :], float("-inf")).max(dim=-1)
    for u in range(3):
        s = best.values[u].clone()
        if u == 0:
            s[0] = float("-inf")  # item 2 is seen
        top = torch.topk(s, 10)
        assert ids[u].tolist() == (top.indices + 2).tolist()
        np.testing.assert_allclose(scores[u], top.values.numpy(), rtol=1e-5)
        assert interest[u].tolist() == best.indices[u, top.indices].tolist()
