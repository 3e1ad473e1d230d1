"""Recaller: one batched search for all users' interests, Eq. 3 merge, seen filter, version guard."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from indexer.build import index_items
from indexer.store import InvalidQuery, ItemIndex, VersionMismatch
from mind.retrieval import exact_topn, merge_interests
from stream.recall import Recaller

B, K, D, M, N = 24, 4, 32, 3002, 30


@pytest.fixture(scope="module")
def served(milvus_uri: str) -> tuple[ItemIndex, np.ndarray]:
    items = np.random.default_rng(0).standard_normal((M, D)).astype(np.float32)
    index = ItemIndex(milvus_uri, prefix=f"r{uuid.uuid4().hex[:10]}")
    index_items(items, "v7", index=index, progress=False)
    return index, items


def users(seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    interests = g.standard_normal((B, K, D)).astype(np.float32)
    k_user = g.integers(1, K + 1, size=B)
    active = np.arange(K)[None, :] < k_user[:, None]
    return interests * active[:, :, None], active


def exact(items: np.ndarray, interests: np.ndarray, active: np.ndarray, n: int, seen=None):
    ids, sc = exact_topn(
        torch.from_numpy(interests), torch.from_numpy(active), torch.from_numpy(items), n + 50
    )
    return merge_interests(ids, sc, n, seen=seen)


def test_recall_equals_exact_merge_in_one_search(
    served: tuple[ItemIndex, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    index, items = served
    calls: list[int] = []
    real = index.search
    monkeypatch.setattr(
        index, "search", lambda q, n, version=None: calls.append(len(q)) or real(q, n, version)
    )
    interests, active = users(1)
    out = Recaller(index, N).recall(interests, active, tower_version=7)
    assert calls == [int(active.sum())]  # every active interest of every user in ONE call
    assert out.version == "v7" and out.ids.shape == (B, N)
    want_ids, want_sc, want_int = exact(items, interests, active, N)
    overlap = np.mean([len(set(a) & set(b)) / N for a, b in zip(out.ids, want_ids, strict=True)])
    assert overlap >= 0.99
    np.testing.assert_allclose(out.scores, want_sc, rtol=1e-4, atol=1e-4)
    assert (out.interest == want_int).mean() >= 0.99
    assert (out.ids >= 2).all()
    # the interest reported is the one that scores the item highest (Eq. 3), and it is active
    b = np.arange(B)[:, None]
    per_interest = np.einsum("bkd,bnd->bnk", interests, items[out.ids])
    per_interest[~np.broadcast_to(active[:, None, :], per_interest.shape)] = -np.inf
    assert (per_interest.argmax(-1) == out.interest).mean() >= 0.99
    assert active[b, out.interest].all()
    lists = out.as_lists()
    assert len(lists) == B and lists[0][0] == (
        int(out.ids[0, 0]),
        float(out.scores[0, 0]),
        int(out.interest[0, 0]),
    )
    assert all(len({i for i, _, _ in row}) == len(row) for row in lists)  # de-duplicated


def test_seen_items_dropped_and_top_n_stays_exact(served: tuple[ItemIndex, np.ndarray]) -> None:
    index, items = served
    interests, active = users(2)
    first = Recaller(index, N).recall(interests, active, "v7")
    seen = [set(row[: N // 2].tolist()) | {2, 3} for row in first.ids]
    out = Recaller(index, N).recall(torch.from_numpy(interests), torch.from_numpy(active), "v7", seen=seen)
    for row, s in zip(out.ids, seen, strict=True):
        assert not set(row.tolist()) & s
    want_ids, _, _ = exact(items, interests, active, N, seen=seen)
    assert np.mean([len(set(a) & set(b)) / N for a, b in zip(out.ids, want_ids, strict=True)]) >= 0.99
    assert (out.ids >= 0).all()  # over-fetch per interest kept N candidates per user


def test_version_mismatch_raises_and_counts(served: tuple[ItemIndex, np.ndarray]) -> None:
    index, _ = served
    interests, active = users(3)
    before = REGISTRY.get_sample_value("mind_recall_version_mismatch_total") or 0.0
    with pytest.raises(VersionMismatch, match="'v6'.*'v7'"):
        Recaller(index, N).recall(interests, active, tower_version="v6")
    assert REGISTRY.get_sample_value("mind_recall_version_mismatch_total") == before + 1


def test_malformed_recall_requests(served: tuple[ItemIndex, np.ndarray]) -> None:
    index, _ = served
    r = Recaller(index, N)
    interests, active = users(4)
    with pytest.raises(InvalidQuery, match=r"\[B, K, d\]"):
        r.recall(interests[0], active[0], "v7")
    with pytest.raises(InvalidQuery, match=r"active must be"):
        r.recall(interests, active[:, :2], "v7")
    with pytest.raises(InvalidQuery, match=r"\[nq, 32\]"):
        r.recall(interests[:, :, :16], active, "v7")
    bad = interests.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidQuery, match="NaN"):
        r.recall(bad, active, "v7")
    with pytest.raises(InvalidQuery, match="one entry per user"):
        r.recall(interests, active, "v7", seen=[set()])
    with pytest.raises(ValueError, match="1.."):
        Recaller(index, 0)
    empty = r.recall(np.zeros((0, K, D), np.float32), np.zeros((0, K), bool), "v7")
    assert empty.ids.shape == (0, N)


def test_guard_follows_a_flip_made_elsewhere(milvus_uri: str) -> None:
    """Another process flips while this one holds a cached pointer: no spurious mismatch."""
    items = np.random.default_rng(5).standard_normal((50, D)).astype(np.float32)
    prefix = f"g{uuid.uuid4().hex[:10]}"
    mine = ItemIndex(milvus_uri, prefix=prefix, pointer_ttl_s=3600)
    other = ItemIndex(milvus_uri, prefix=prefix)
    index_items(items, "v1", index=other, progress=False)
    interests, active = users(6)
    assert Recaller(mine, 5).recall(interests, active, "v1").version == "v1"  # caches v1 for an hour
    index_items(items * 2, "v2", index=other, progress=False)
    assert Recaller(mine, 5).recall(interests, active, "v2").version == "v2"
