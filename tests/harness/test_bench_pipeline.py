"""`mind bench pipeline` smoke test: a tiny random model on the embedded stack, the worker as its own process,
two small loads, the asap run and the in-process reference; the JSON has the documented keys, nothing was lost
or applied twice, and the PNGs lie beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from harness.bench_serving import random_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_pipeline_smoke(tmp_path: Path) -> None:
    ckpt = random_checkpoint(tmp_path / "random.pt", n_items=300, n_users=64)
    out = tmp_path / "pipeline.json"
    args = ["bench", "pipeline", "--out", str(out), "--checkpoint", str(ckpt), "--loads", "20,100"]
    args += ["--seconds", "1.5", "--asap-clicks", "300", "--users", "40"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert {"catalogue", "loads", "asap", "max_sustained_cps", "reference_cps", "machine"} <= set(got)
    assert {"ratio_pipeline_to_reference", "reference"} <= set(got) and got["reference"]["batch"] >= 1
    assert got["catalogue"]["items"] == 300
    assert got["lost"] == 0 and got["applied_twice"] == 0
    for load in ("20", "100"):
        r = got["loads"][load]
        assert {"p50_ms", "p99_ms", "p999_ms", "achieved_cps", "cpu_seconds"} <= set(r)
        assert r["missing"] == 0 and r["lost"] == 0 and r["applied_twice"] == 0 and r["clicks"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
        assert r["cpu_seconds"]["worker"] > 0 and r["cpu_seconds"]["load generator + reader"] > 0
        st = r["stages_ms"]
        assert st["batches"] > 0 and st["bottleneck"] in st
        assert all(st[s]["p50"] <= st[s]["p99"] for s in ("window", "triton", "recall", "produce"))
        assert out.with_name(f"pipeline_{load}.png").stat().st_size > 0
    assert got["asap"]["achieved_cps"] > 0 and got["max_sustained_cps"] > 0 and got["reference_cps"] > 0
    hop = got["broker_hop_ms"]  # the broker alone, for the hops a click makes twice
    assert hop["messages"] == 300 and 0 < hop["p50"] <= hop["p99"] <= hop["p999"]
    assert len(got["machine"]["loadavg_start"]) == 3 and out.with_suffix(".png").stat().st_size > 0
