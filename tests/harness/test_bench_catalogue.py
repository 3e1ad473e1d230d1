"""The catalogue-size benchmark: its synthetic items are clustered (not isotropic), the exact reference is
exact, and a tiny run on a real milvus-lite writes the documented JSON keys and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.bench_catalogue import (
    CatalogueConfig,
    describe,
    exact_top,
    parse_sizes,
    run,
    synthetic_catalogue,
    synthetic_queries,
    table,
)


def test_parse_sizes() -> None:
    assert parse_sizes("12k,100k,1M") == (12_000, 100_000, 1_000_000)
    assert parse_sizes("12103, 1.5m") == (12_103, 1_500_000)
    for bad in ("", "12x", "50"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_synthetic_items_are_clustered_skewed_and_deterministic() -> None:
    cat = synthetic_catalogue(20_000, 64, seed=0)
    assert cat.vectors.shape == (20_000, 64) and cat.vectors.dtype == np.float32
    np.testing.assert_array_equal(cat.vectors, synthetic_catalogue(20_000, 64, seed=0).vectors)
    s = describe(cat)
    assert s["clusters"] == 71
    assert s["mean_cosine_random_pairs"] > 0.05  # isotropic Gaussian vectors: about 0
    assert s["variance_share_top10_pcs"] > 0.3  # isotropic in 64-d: about 10/64
    assert s["largest_cluster_share"] > 5 / s["clusters"]  # popularity-skewed cluster sizes
    lo, mid, hi = s["norm_p5_p50_p95"]
    assert hi / lo > 1.5  # norms vary
    q = synthetic_queries(cat, 32, seed=1)
    assert q.shape == (32, 64) and np.isfinite(q).all()


def test_exact_top_is_exact_across_blocks() -> None:
    g = np.random.default_rng(0)
    x = g.standard_normal((3000, 16)).astype(np.float32)
    q = g.standard_normal((37, 16)).astype(np.float32)
    ids, sc = exact_top(q, x, 10, block=3000 * 4)  # 4 queries per block: several blocks
    s = q @ x.T
    want = np.argsort(-s, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(sc, np.take_along_axis(s, want, 1), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_run_writes_json_and_png(tmp_path: Path) -> None:
    cfg = CatalogueConfig(
        nqs=(1, 16), budget_s=0.2, calls_nq1=20, paths_calls_nq1=10, tune_queries=32, test_queries=32
    )
    out = tmp_path / "catalogue.json"
    run(out, (2_000,), log=lambda m: None, cfg=cfg, progress=False)
    res = run(out, (3_000,), log=lambda m: None, cfg=cfg, progress=False, merge=True)  # a second hold
    got = json.loads(out.read_text())
    assert [r["sizes"] for r in got["runs"]] == [[2_000], [3_000]]
    assert got["search_paths"]["size"] == "2000"  # measured once, at the smallest size, and kept
    assert {"recipe", "config", "sizes", "search_paths", "ann_wins", "machine", "seconds"} <= set(got)
    assert out.with_suffix(".png").stat().st_size > 0
    for size in ("2000", "3000"):
        r = got["sizes"][size]
        assert r["data"]["items"] == int(size)
        for it in ("FLAT", "IVF_FLAT"):
            ix = r["indexes"][it]
            assert ix["recall@50"] >= 0.95  # below the server's interim-index size: exact
            for nq in ("1", "16"):
                t = ix["nq"][nq]
                assert t["milvus"]["calls"] >= cfg.min_calls and t["exact"]["p50_ms"] > 0
                assert t["milvus"]["p99_9_ms"] is None  # too few calls to claim that tail
        assert r["indexes"]["IVF_FLAT"]["tuning"]["tried"]
    assert all(t["ids_equal"] for t in got["search_paths"]["nq"].values())
    assert set(got["ann_wins"]) == {"1", "16"}
    assert "| 2,000 | FLAT | 1 |" in table(res)
