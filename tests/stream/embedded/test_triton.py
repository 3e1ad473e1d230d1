"""stream.embedded.triton: fail fast and clearly (port taken, no repository, a model that cannot load), and
the test session's server survives a crash."""

from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import pytest
from towerkit import random_batch

from stream.embedded.triton import EmbeddedTriton, TritonLaunchError, find_tritonserver, free_port
from stream.tower import TritonTower


def test_wheel_layout_is_found():
    dist = find_tritonserver()
    assert (
        dist.binary.is_file()
        and dist.stub.is_file()
        and (dist.python_backend / "libtriton_python.so").is_file()
    )


def test_port_taken_fails_before_starting(tmp_path):
    (tmp_path / "repo").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        server = EmbeddedTriton(tmp_path / "repo", tmp_path / "run", grpc_port=taken, http_port=free_port())
        with pytest.raises(TritonLaunchError, match=f"grpc port 127.0.0.1:{taken} is already in use"):
            server.start()
    assert server.proc is None


def test_missing_repository(tmp_path):
    with pytest.raises(TritonLaunchError, match="run `mind export`"):
        EmbeddedTriton(tmp_path / "nope", tmp_path / "run").start()


@pytest.mark.slow
def test_model_that_cannot_load_reports_the_log_tail(tmp_path):
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input { name: "X" data_type: TYPE_FP32 dims: 1 }\n'
        'output { name: "Y" data_type: TYPE_FP32 dims: 1 }\n'
    )
    (model / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('boom-42')\n"
    )
    server = EmbeddedTriton(
        tmp_path / "repo",
        tmp_path / "run",
        models=["broken"],
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        ready_timeout_s=120,
    )
    t0 = time.monotonic()
    with pytest.raises(TritonLaunchError, match="(?s)exited with code .*boom-42"):
        server.start()
    assert time.monotonic() - t0 < 60 and server.proc is None


@pytest.mark.slow
def test_a_crashed_session_server_comes_back_on_its_ports_with_its_models(triton):
    """The session's keeper (tests/conftest.py) restarts a tritonserver that died, with what it had loaded,
    so one upstream Python-backend abort fails one test at most, not every later one."""
    batch = random_batch(3)
    with TritonTower(triton.server.grpc_url, "toy") as tower:
        before = tower.infer(*batch)[0]
    loaded = set(triton.keeper.loaded)
    assert {"toy", "flip", "mind"} <= loaded
    triton.keeper.restarted.clear()
    os.killpg(triton.server.pid, signal.SIGKILL)  # as the backend's abort does: no clean shutdown
    assert triton.keeper.restarted.wait(240), triton.server.log_tail()
    assert all(triton.server.ready(m) for m in loaded), loaded
    with TritonTower(triton.server.grpc_url, "toy") as tower:
        after = tower.infer(*batch)[0]
    assert np.array_equal(before, after)
    assert (triton.server.log_path.parent / f"crash-{triton.keeper.crashes}.log").is_file()
