"""ItemIndex against a real milvus-lite server (session fixture `milvus_uri` in tests/conftest.py)."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from pymilvus.exceptions import MilvusException
from pymilvus.grpc_gen import milvus_pb2
from waiting import until

from indexer.store import IndexUnavailable, InvalidQuery, ItemIndex, normalize_version
from indexer.wire import parse_uri
from stream.embedded.milvus import EmbeddedMilvus, free_port

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


# ---- flat search (indexer/wire.py) against the pymilvus path --------------------------------------------


def assert_same(a: Any, b: Any) -> None:
    """Two SearchResults agree: same ids in the same order, scores equal within float tolerance."""
    assert a.version == b.version
    assert a.ids.shape == b.ids.shape and a.ids.dtype == b.ids.dtype and a.scores.dtype == b.scores.dtype
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index_type", ["FLAT", "IVF_FLAT"])
def test_flat_search_equals_the_pymilvus_path(index: ItemIndex, index_type: str) -> None:
    g = np.random.default_rng(3)
    x = g.standard_normal((ROWS, D)).astype(np.float32)
    ids = np.arange(2, ROWS + 2)
    index.create_version(
        "v1", dim=D, index_type=index_type, index_params={"nlist": 64}, search_params={"nprobe": 4}
    )
    index.insert("v1", ids, x, progress=False)
    index.build("v1")
    index.flip("v1")
    assert index.flat  # a server URI: the flat path is the default
    for nq in (1, 16, 256):
        q = g.standard_normal((nq, D)).astype(np.float32)
        assert_same(index.search(q, N, flat=True), index.search(q, N, flat=False))
    if index_type == "FLAT":
        want_ids, want_sc = exact_top(x, ids, q, N)
        got = index.search(q, N)
        assert np.mean(got.ids == want_ids) > 0.99
        np.testing.assert_allclose(got.scores, want_sc, rtol=1e-4, atol=1e-4)


def test_flat_search_pads_when_fewer_rows_than_n(index: ItemIndex) -> None:
    make_version(index, "v1", np.eye(D, dtype=np.float32)[:5], np.arange(2, 7))
    q = np.random.default_rng(4).standard_normal((3, D)).astype(np.float32)
    flat, client = index.search(q, 8, flat=True), index.search(q, 8, flat=False)
    assert_same(flat, client)
    assert (flat.ids[:, :5] >= 2).all() and (flat.ids[:, 5:] == -1).all()
    assert np.isneginf(flat.scores[:, 5:]).all() and np.isfinite(flat.scores[:, :5]).all()


def test_flat_search_errors_match_the_pymilvus_path(milvus_uri: str, index: ItemIndex) -> None:
    """Real server errors raise the same exception on both paths: a status the index does not translate
    (metric mismatch) and a collection dropped behind the index's back. (milvus-lite 2.5.1 still searches
    a released collection, so "not loaded" cannot be produced here.)"""
    x = np.random.default_rng(5).standard_normal((3000, 8)).astype(np.float32)
    make_version(index, "v1", x, np.arange(2, 3002))
    # v2 records COSINE but its index was built with IP behind the index's back (build() keeps an
    # existing index): the server answers every search with an error status (metric type mismatch).
    index.create_version("v2", dim=8, metric="COSINE")
    index.insert("v2", np.arange(2, 3002), x, progress=False)
    ip = index.client.prepare_index_params()
    ip.add_index("vec", index_type="FLAT", metric_type="IP")
    index.client.create_index(index.collection("v2"), ip)
    index.build("v2")
    q = x[:4]
    codes = []
    for flat in (True, False):
        with pytest.raises(MilvusException) as got:
            index.search(q, 5, version="v2", flat=flat)
        assert not isinstance(got.value, IndexUnavailable)
        codes.append(got.value.code)
    assert codes[0] == codes[1] != 0
    index.client.drop_collection(index.collection("v1"))
    for flat in (True, False):
        index.info("v1")  # cached again, so the search reaches the server
        with pytest.raises(IndexUnavailable, match="was dropped"):
            index.search(q, 5, version="v1", flat=flat)


class RecordingProxy:
    """A real gRPC hop in front of milvus-lite that forwards every call unchanged and records its method,
    metadata and request bytes: it shows what each search path puts on the wire, without a mock."""

    def __init__(self, upstream: str) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        self._up = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers([self._Handler(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    class _Handler(grpc.GenericRpcHandler):
        def __init__(self, proxy: RecordingProxy) -> None:
            self.proxy = proxy

        def service(self, details: Any) -> Any:
            method = details.method
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.proxy._forward(method, req, ctx))

    def _forward(self, method: str, request: bytes, ctx: Any) -> bytes:
        md = {k: v for k, v in ctx.invocation_metadata() if not k.startswith(("grpc-", "user-agent"))}
        self.calls.append((method, md, request))
        try:
            return self._up.unary_unary(method)(request, metadata=list(md.items()), timeout=30)
        except grpc.RpcError as exc:
            ctx.abort(exc.code(), exc.details())
            raise

    def searches(self) -> list[tuple[dict[str, str], Any]]:
        return [
            (md, milvus_pb2.SearchRequest.FromString(req))
            for m, md, req in self.calls
            if m.endswith("/Search")
        ]

    def close(self) -> None:
        self._server.stop(0)
        self._up.close()


@pytest.fixture
def proxy(milvus_uri: str) -> Iterator[RecordingProxy]:
    p = RecordingProxy(milvus_uri.removeprefix("http://"))
    yield p
    p.close()


def test_flat_request_carries_the_token_and_equals_what_pymilvus_sends(proxy: RecordingProxy) -> None:
    index = ItemIndex(
        f"http://127.0.0.1:{proxy.port}", token="alice:s3cret", prefix=f"t{uuid.uuid4().hex[:10]}"
    )
    index.create_version(
        "v1", dim=8, index_type="IVF_FLAT", index_params={"nlist": 16}, search_params={"nprobe": 4}
    )
    index.insert("v1", np.arange(2, 502), np.random.default_rng(6).standard_normal((500, 8)), progress=False)
    index.build("v1")
    q = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32)
    proxy.calls.clear()
    assert_same(index.search(q, 7, version="v1", flat=True), index.search(q, 7, version="v1", flat=False))
    (flat_md, flat_req), (client_md, client_req) = proxy.searches()
    token = base64.b64encode(b"alice:s3cret").decode()
    assert flat_md["authorization"] == client_md["authorization"] == token
    # The same request but for consistency: pymilvus defers to the collection's level with a
    # per-process timestamp cache; the flat path asks for Strong explicitly (wire.search_request).
    assert (flat_req.consistency_level, flat_req.use_default_consistency, flat_req.guarantee_timestamp) == (
        0,
        False,
        0,
    )
    for r in (flat_req, client_req):
        r.ClearField("consistency_level")
        r.ClearField("use_default_consistency")
        r.ClearField("guarantee_timestamp")
    assert dict((p.key, p.value) for p in flat_req.search_params) == {
        "topk": "7",
        "round_decimal": "-1",
        "ignore_growing": "False",
        "metric_type": "IP",
        "anns_field": "vec",
        "params": '{"nprobe":4,"metric_type":"IP"}',
    }
    assert flat_req == client_req
    index.close()


def test_unreachable_server_during_flat_search_is_index_unavailable(tmp_path: Path) -> None:
    """The server goes away after the index was built: retried, then IndexUnavailable on both paths."""
    server = EmbeddedMilvus(tmp_path)
    uri = server.start()
    try:
        index = ItemIndex(uri, prefix="gone", retries=2, timeout_s=1.0)
        make_version(index, "v1", np.eye(4, dtype=np.float32), np.arange(2, 6))
    finally:
        server.stop()
    for flat in (True, False):
        t0 = time.monotonic()
        with pytest.raises(IndexUnavailable, match="did not answer"):
            index.search(np.eye(4, dtype=np.float32), 2, flat=flat)
        assert time.monotonic() - t0 < 30


def test_uri_parsing_follows_pymilvus() -> None:
    assert parse_uri("./items.db") is None  # local file: MilvusClient's private server, no address
    ep = parse_uri("http://127.0.0.1:19531")
    assert ep is not None and (ep.address, ep.secure, ep.token, ep.db_name) == (
        "127.0.0.1:19531",
        False,
        "",
        "",
    )
    ep = parse_uri("https://bob:pw@milvus.example/shop", token=None)
    assert ep is not None and (ep.address, ep.secure, ep.token, ep.db_name) == (
        "milvus.example:443",
        True,
        "bob:pw",
        "shop",
    )
    ep = parse_uri("tcp://milvus", token="t0k")
    assert ep is not None and (ep.address, ep.token) == ("milvus:19530", "t0k")
