"""`mind bench pipeline` smoke test: a tiny random model on the embedded stack, two small loads, the asap
run and the in-process reference; the JSON has the documented keys and a PNG lies beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from harness.bench_serving import random_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_bench_pipeline_smoke(tmp_path: Path) -> None:
    ckpt = random_checkpoint(tmp_path / "random.pt", n_items=300, n_users=64)
    out = tmp_path / "pipeline.json"
    args = ["bench", "pipeline", "--out", str(out), "--checkpoint", str(ckpt), "--loads", "20,100"]
    args += ["--seconds", "1.5", "--asap-clicks", "300", "--reference-clicks", "256"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert {"catalogue", "loads", "max_sustained_cps", "reference_cps", "stages_ms", "machine"} <= set(got)
    assert got["catalogue"]["items"] == 300
    for load in ("20", "100"):
        r = got["loads"][load]
        assert {"p50_ms", "p99_ms", "achieved_cps"} <= set(r)
        assert r["missing"] == 0 and r["lost"] == 0 and r["answered"] == r["clicks"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert got["asap"]["achieved_cps"] > 0 and got["max_sustained_cps"] > 0 and got["reference_cps"] > 0
    st = got["stages_ms"]
    assert {"parse", "window", "triton", "kv_write", "recall", "produce", "commit", "kafka_wait"} <= set(st)
    assert st["bottleneck"] in st
    assert len(got["machine"]["loadavg_start"]) == 3 and out.with_suffix(".png").stat().st_size > 0
