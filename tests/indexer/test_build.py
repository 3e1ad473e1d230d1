"""index_items: full build + flip, incremental upserts, guards (real milvus-lite)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from indexer.build import IVF_FROM_ROWS, choose_index, index_items, ivf_nlist, ivf_params
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


def test_choose_index_by_catalogue_size_and_override() -> None:
    assert choose_index(12_103) == ("FLAT", {}, {})
    assert choose_index(IVF_FROM_ROWS - 1)[0] == "FLAT"
    it, ip, sp = choose_index(IVF_FROM_ROWS)
    assert it == "IVF_FLAT" and (ip, sp) == ivf_params(IVF_FROM_ROWS)
    assert [ivf_nlist(n) for n in (1_000, 12_000, 100_000, 1_000_000)] == [128, 512, 1024, 4096]
    for n in (IVF_FROM_ROWS, 1_000_000, 10_000_000):
        (ip, sp) = ivf_params(n)
        assert 1 <= sp["nprobe"] <= ip["nlist"] and ip["nlist"] & (ip["nlist"] - 1) == 0
    # a server that does not apply IVF parameters (milvus-lite) stays exact at any size
    assert choose_index(1_000_000, applies_index_params=False) == ("FLAT", {}, {})
    # an explicit type wins, in either direction; IVF types get the size's nlist / nprobe
    assert choose_index(500, "ivf_flat") == ("IVF_FLAT", *ivf_params(500))
    assert choose_index(1_000_000, "FLAT") == ("FLAT", {}, {})
    assert choose_index(1_000_000, "HNSW")[0] == "HNSW"
    assert choose_index(50, ivf_from_rows=10)[0] == "IVF_FLAT"
    with pytest.raises(ValueError, match="index_type"):
        choose_index(10, "ANNOY")


def test_index_items_picks_the_type_and_an_explicit_one_wins(index: ItemIndex) -> None:
    assert not index.applies_index_params()  # milvus-lite 2.5: its own interim index, nprobe not applied
    m = catalogue(600, 8, 0)
    stats = index_items(m, "v1", index=index, progress=False)
    assert stats.index_type == index.info("v1").index_type == "FLAT"
    stats = index_items(m, "v2", index=index, progress=False, index_type="IVF_FLAT")
    info = index.info("v2")
    assert stats.index_type == info.index_type == "IVF_FLAT"
    assert (info.index_params, info.search_params) == ivf_params(598)
    index_items(m, "v3", index=index, progress=False, index_type="IVF_FLAT", search_params={"nprobe": 3})
    assert index.info("v3").search_params == {"nprobe": 3}
    q = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    assert index.search(q, 5).version == "v3"
