"""ItemIndex against a real milvus-lite server (session fixture `milvus_uri` in tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from waiting import until

from indexer.store import IndexUnavailable, InvalidQuery, ItemIndex, normalize_version
from stream.embedded.milvus import free_port

D, ROWS, N = 64, 12_000, 50


def exact_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    top = np.argsort(-s, axis=1)[:, :n]
    return ids[top], np.take_along_axis(s, top, 1)


@pytest.fixture
def index(milvus_uri: str) -> ItemIndex:
    """A fresh namespace (collection prefix) on the shared server."""
    return ItemIndex(milvus_uri, prefix=f"t{uuid.uuid4().hex[:10]}", pointer_ttl_s=0.0)


def make_version(index: ItemIndex, version: str, x: np.ndarray, ids: np.ndarray, flip: bool = True) -> None:
    index.create_version(version, dim=x.shape[1])
    index.insert(version, ids, x, progress=False)
    index.build(version)
    if flip:
        index.flip(version)


def test_search_equals_exact_top_n(index: ItemIndex) -> None:
    g = np.random.default_rng(0)
    x = g.standard_normal((ROWS, D)).astype(np.float32)
    ids = np.arange(2, ROWS + 2)
    make_version(index, "v1", x, ids)
    q = g.standard_normal((64, D)).astype(np.float32)
    got = index.search(q, N)
    want_ids, want_sc = exact_top(x, ids, q, N)
    assert got.version == "v1"
    assert got.ids.shape == (64, N) and got.ids.dtype == np.int64 and got.scores.dtype == np.float32
    recall = np.mean([len(set(a) & set(b)) / N for a, b in zip(got.ids, want_ids, strict=True)])
    assert recall >= 0.99
    np.testing.assert_allclose(got.scores, want_sc, rtol=1e-4, atol=1e-4)
    assert (got.ids >= 2).all()


def test_padding_when_fewer_rows_than_n_and_empty_batch(index: ItemIndex) -> None:
    x = np.eye(D, dtype=np.float32)[:5]
    make_version(index, 3, x, np.arange(2, 7))
    res = index.search(np.ones((2, D), np.float32), 8)
    assert res.version == "v3"
    assert (res.ids[:, :5] >= 2).all() and (res.ids[:, 5:] == -1).all()
    assert np.isneginf(res.scores[:, 5:]).all()
    empty = index.search(np.zeros((0, D), np.float32), 8)
    assert empty.ids.shape == (0, 8)


def test_reserved_ids_are_refused(index: ItemIndex) -> None:
    index.create_version("v1", dim=4)
    for bad in ([0, 5], [1, 5]):
        with pytest.raises(InvalidQuery, match="padding"):
            index.insert("v1", bad, np.ones((2, 4), np.float32), progress=False)


def test_incremental_upsert_is_visible(index: ItemIndex) -> None:
    g = np.random.default_rng(1)
    x = g.standard_normal((2000, 8)).astype(np.float32)
    make_version(index, "v1", x, np.arange(2, 2002))
    target = np.zeros((1, 8), np.float32)
    target[0, 0] = 1.0
    assert index.search(target, 1).ids[0, 0] != 99_999
    # a new item, then a changed existing one
    index.upsert(None, [99_999], target * 100)
    assert index.search(target, 1).ids[0, 0] == 99_999
    index.upsert("v1", [7], target * 200)
    res = index.search(target, 2)
    assert res.ids[0].tolist() == [7, 99_999]
    assert res.scores[0, 0] == pytest.approx(200.0)
    assert index.info("v1").rows == 2000  # rows recorded at build time


def test_flip_under_concurrent_searches_never_mixes_versions(milvus_uri: str, index: ItemIndex) -> None:
    """Version k owns ids [k*100_000, k*100_000 + 3000): a result reveals which collection answered."""
    g = np.random.default_rng(2)

    def vectors(k: int) -> tuple[np.ndarray, np.ndarray]:
        return g.standard_normal((3000, 16)).astype(np.float32), np.arange(3000) + k * 100_000

    make_version(index, "v1", *vectors(1))
    reader = ItemIndex(milvus_uri, prefix=index.prefix, pointer_ttl_s=0.0)  # reads the pointer every call
    q = g.standard_normal((8, 16)).astype(np.float32)
    errors: list[BaseException] = []
    seen: dict[str, int] = {}
    stop = threading.Event()

    def search_forever() -> None:
        while not stop.is_set():
            try:
                res = reader.search(q, 20)
                k = int(res.version[1:])
                assert ((res.ids // 100_000) == k).all(), f"mixed versions in one result: {res}"
                seen[res.version] = seen.get(res.version, 0) + 1
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)
                return

    t = threading.Thread(target=search_forever, daemon=True)
    t.start()
    try:
        for k in (2, 3, 4):  # each version is searched a few times before the next one flips in
            until(lambda k=k: seen.get(f"v{k - 1}", 0) >= 3 or errors, what=f"searches of v{k - 1}")
            if k < 4:
                make_version(index, f"v{k}", *vectors(k))  # create, insert, build, flip while searches run
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors[0]
    assert set(seen) == {"v1", "v2", "v3"}, seen
    assert index.active_version() == "v3"
    assert index.flip("v1") == "v3"  # rollback is a flip too
    assert reader.search(q, 5).version == "v1"


def test_drop_old_keeps_the_active_and_the_grace_period(index: ItemIndex) -> None:
    x = np.eye(4, dtype=np.float32)
    for k in (1, 2, 3):
        make_version(index, f"v{k}", x, np.arange(2, 6))
    assert index.versions() == ["v1", "v2", "v3"]
    assert index.drop_old(grace_s=3600) == []  # all retired just now: within the grace period
    assert index.drop_old(grace_s=0, keep=1) == ["v1"]  # v2 kept for rollback
    assert index.drop_old(grace_s=0) == ["v2"]
    assert index.versions() == ["v3"] and index.active_version() == "v3"
    with pytest.raises(IndexUnavailable, match="does not exist"):
        index.search(x, 2, version="v1")
    assert index.search(x, 2).version == "v3"


def test_malformed_requests_get_clear_errors(index: ItemIndex) -> None:
    with pytest.raises(IndexUnavailable, match="mind index"):
        index.search(np.ones((1, 4), np.float32), 5)  # nothing indexed yet
    make_version(index, "v1", np.eye(4, dtype=np.float32), np.arange(2, 6))
    q = np.ones((2, 4), np.float32)
    with pytest.raises(InvalidQuery, match=r"\[nq, 4\]"):
        index.search(np.ones((2, 5), np.float32), 5)
    with pytest.raises(InvalidQuery, match=r"\[nq, 4\]"):
        index.search(np.ones(4, np.float32), 5)
    nan = q.copy()
    nan[1, 2] = np.nan
    with pytest.raises(InvalidQuery, match="NaN"):
        index.search(nan, 5)
    for n in (0, -1, 10**6, 2.5, True):
        with pytest.raises(InvalidQuery, match="n must be"):
            index.search(q, n)  # type: ignore[arg-type]
    with pytest.raises(IndexUnavailable, match="does not exist"):
        index.search(q, 5, version="v9")
    with pytest.raises(InvalidQuery, match="unique"):
        index.upsert("v1", [5, 5], np.ones((2, 4), np.float32))
    with pytest.raises(InvalidQuery, match="NaN"):
        index.upsert("v1", [5], np.full((1, 4), np.inf, np.float32))
    with pytest.raises(ValueError, match="metric"):
        index.create_version("v2", dim=4, metric="L2")
    with pytest.raises(ValueError, match="already exists"):
        index.create_version("v1", dim=4)
    with pytest.raises(ValueError, match="active"):
        index.create_version("v1", dim=4, replace=True)
    index.create_version("v2", dim=4)
    with pytest.raises(IndexUnavailable, match="build"):
        index.flip("v2")


def test_versions_normalize() -> None:
    assert normalize_version(3) == normalize_version("3") == normalize_version("v3") == "v3"
    assert normalize_version("mind-1.2") == "mind-1.2"
    for bad in ("", "a b", "meta", "x/y"):
        with pytest.raises(ValueError):
            normalize_version(bad)


def test_unreachable_server_fails_fast_with_a_clear_error() -> None:
    t0 = time.monotonic()
    with pytest.raises(IndexUnavailable, match="did not answer"):
        ItemIndex(f"http://127.0.0.1:{free_port()}", retries=2, timeout_s=1.0)
    assert time.monotonic() - t0 < 20


def test_second_process_shares_the_server(milvus_uri: str, index: ItemIndex) -> None:
    make_version(index, "v1", np.eye(4, dtype=np.float32), np.arange(2, 6))
    code = (
        "import numpy as np; from indexer.store import ItemIndex; "
        f"r = ItemIndex({milvus_uri!r}, prefix={index.prefix!r}).search(np.eye(4, dtype=np.float32), 1); "
        "print(r.version, r.ids[:, 0].tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[0] == "v1 [2, 3, 4, 5]"
