"""stream.embedded.triton: fail fast and clearly (port taken, no repository, a model that cannot load)."""

from __future__ import annotations

import socket
import time

import pytest

from stream.embedded.triton import EmbeddedTriton, TritonLaunchError, find_tritonserver, free_port


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
