"""index_items: full build + flip, incremental upserts, guards (real milvus-lite)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from indexer.build import index_items
from indexer.store import ItemIndex, VersionMismatch


@pytest.fixture
def index(milvus_uri: str) -> ItemIndex:
    return ItemIndex(milvus_uri, prefix=f"b{uuid.uuid4().hex[:10]}", pointer_ttl_s=0.0)


def catalogue(n: int, d: int, seed: int) -> np.ndarray:
    """Item matrix whose PAD (0) and OOV (1) rows would win every query if they were indexed."""
    m = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    m[0] = m[1] = 1e3
    return m


def test_full_index_flips_and_never_returns_pad_or_oov(index: ItemIndex) -> None:
    m = catalogue(12_002, 64, 0)
    stats = index_items(m, "v1", index=index, progress=False)
    assert (stats.version, stats.mode, stats.rows, stats.dim, stats.active) == (
        "v1",
        "full",
        12_000,
        64,
        "v1",
    )
    q = np.abs(np.random.default_rng(1).standard_normal((32, 64))).astype(np.float32)  # PAD/OOV-aligned
    res = index.search(q, 50)
    assert (res.ids >= 2).all()
    s = q @ m[2:].T
    want = np.argsort(-s, axis=1)[:, :50] + 2
    recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(res.ids, want, strict=True)])
    assert recall >= 0.99


def test_new_version_then_drop_old(index: ItemIndex) -> None:
    index_items(catalogue(500, 8, 0), 1, index=index, progress=False)
    stats = index_items(
        torch.from_numpy(catalogue(500, 8, 1)), 2, index=index, progress=False, drop_grace_s=0
    )
    assert (stats.previous, stats.active, stats.dropped) == ("v1", "v2", ["v1"])
    assert index.versions() == ["v2"]
    with pytest.raises(ValueError, match="active"):
        index_items(catalogue(500, 8, 1), 2, index=index, progress=False)  # never overwrite what serves


def test_unflipped_build_leaves_the_active_version(index: ItemIndex) -> None:
    index_items(catalogue(100, 8, 0), "v1", index=index, progress=False)
    stats = index_items(catalogue(100, 8, 1), "v2", index=index, progress=False, flip=False)
    assert stats.active == "v1" and index.active_version() == "v1"
    assert index.search(np.ones((1, 8), np.float32), 3, version="v2").version == "v2"


def test_incremental_upserts_only_changed_ids(index: ItemIndex) -> None:
    m = catalogue(1000, 8, 0)
    index_items(m, "v1", index=index, progress=False)
    m2 = np.concatenate([m, np.zeros((5, 8), np.float32)])
    m2[1002, 3] = 100.0  # a new item
    m2[10] = 0.0
    m2[10, 4] = 50.0  # a changed item
    stats = index_items(m2, "v1", index=index, incremental=True, changed_ids=[1002, 10], progress=False)
    assert (stats.mode, stats.rows) == ("incremental", 2)
    e = np.eye(8, dtype=np.float32)
    res = index.search(e[[3, 4]], 1)
    assert res.ids[:, 0].tolist() == [1002, 10]
    assert index.info("v1").rows == 998  # still the full build; incremental adds no rebuild
    with pytest.raises(VersionMismatch, match="active index version is 'v1'"):
        index_items(m2, "v2", index=index, incremental=True, changed_ids=[10], progress=False)
    with pytest.raises(ValueError, match="PAD/OOV"):
        index_items(m2, "v1", index=index, incremental=True, changed_ids=[0, 10], progress=False)
    with pytest.raises(ValueError, match="changed_ids"):
        index_items(m2, "v1", index=index, incremental=True, progress=False)


def test_bad_inputs(index: ItemIndex) -> None:
    with pytest.raises(ValueError, match="n_items"):
        index_items(np.ones((2, 8), np.float32), "v1", index=index, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        index_items(np.ones((5, 8), np.float32), "v1", progress=False)
