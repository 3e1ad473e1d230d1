"""Start the real `tritonserver` binary shipped in the nvidia-pytriton wheel (the embedded default).

What the wheel layout needs (found by reading pytriton's own launcher): the Python backend looks for
`triton_python_backend_stub` next to `libtriton_python.so`, but the wheel keeps one stub per Python version
under `pytriton/tritonserver/python_backend_stubs/<X.Y>/`. So each run gets its own backend directory
(`<run_dir>/backends/python/`) holding symlinks to the backend library, its utils module and the stub for
this interpreter. Symlinks, not copies: the stub's $ORIGIN-relative RPATH must still point into the wheel
(see prepare_backend_dir). The stub imports numpy/torch from the `python` it finds on PATH, so the server
starts with this interpreter's bin directory first on PATH (DESIGN.md: else "No module named numpy").

Each server also gets its own shared-memory prefix so that several servers (parallel test sessions, other
engineers) on one host do not collide in /dev/shm.

Production runs the official container instead (see model_repo/README.md); only the address changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stream.embedded.process import ServerProcess, free_port, port_is_free

__all__ = [
    "EmbeddedTriton",
    "TritonDist",
    "TritonLaunchError",
    "check_numpy",
    "find_tritonserver",
    "free_port",
    "port_is_free",
    "prepare_backend_dir",
]


class TritonLaunchError(RuntimeError):
    """tritonserver could not be started, or a model did not become ready; the message has the log tail."""


@dataclass(frozen=True)
class TritonDist:
    """Where the wheel keeps the server binary, the Python backend, the stub and the cache libraries."""

    binary: Path
    python_backend: Path
    stub: Path
    caches: Path


def find_tritonserver() -> TritonDist:
    """Locate the tritonserver binary and the Python backend inside the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise TritonLaunchError("nvidia-pytriton is not installed: `pip install nvidia-pytriton`") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    dist = TritonDist(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / ver / "triton_python_backend_stub",
        caches=root / "caches",
    )
    for what, path in (("tritonserver binary", dist.binary), (f"Python {ver} backend stub", dist.stub)):
        if not path.exists():
            raise TritonLaunchError(f"{what} not found at {path}; reinstall nvidia-pytriton for this Python")
    return dist


def check_numpy() -> None:
    """Refuse numpy 2: the 2.51 stub then answers with empty output tensors, a silent failure (DESIGN.md)."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonLaunchError(
            f"numpy {numpy.__version__} is installed for {sys.executable}; the Python-backend stub of "
            "tritonserver 2.51 returns empty outputs under numpy 2: install 'numpy<2' in this environment"
        )


def prepare_backend_dir(dist: TritonDist, run_dir: Path) -> Path:
    """Symlink the Python backend and this interpreter's stub into `run_dir/backends/python`.

    Symlinks, not copies: the stub's RPATH is `$ORIGIN/../../../../nvidia_pytriton.libs`, and the kernel
    resolves $ORIGIN through the link to the wheel, so its CUDA/Python libraries are found with no
    LD_LIBRARY_PATH (a copied stub fails with "libcudart-....so: cannot open shared object file").
    """
    dst = run_dir / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    links = {
        name: dist.python_backend / name for name in ("libtriton_python.so", "triton_python_backend_utils.py")
    }
    links["triton_python_backend_stub"] = dist.stub
    for name, src in links.items():
        link = dst / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    return dst.parent


class EmbeddedTriton(ServerProcess["EmbeddedTriton"]):
    """One tritonserver process in explicit model-control mode, bound to 127.0.0.1 by default.

    Use as a context manager, or call start()/stop(). `grpc_url` is what stream.tower.TritonTower takes.
    """

    _error = TritonLaunchError
    _name = "tritonserver"
    _tail_lines = 40
    _stop_at_exit = True  # never leave an orphan server behind a crashed caller

    def __init__(
        self,
        model_repository: Path,
        run_dir: Path,
        *,
        models: Sequence[str] = (),
        host: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        ready_timeout_s: float = 120.0,
        exit_timeout_s: int = 10,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model_repository = Path(model_repository).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.models = list(models)
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = list(extra_args)
        self.log_path = self.run_dir / "tritonserver.log"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The tritonserver process while it runs, else None."""
        return self._proc

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self, backend_dir: Path, caches: Path) -> list[str]:
        """The full tritonserver command line (exposed so that it can be logged or reused)."""
        dist = find_tritonserver()
        cmd = [
            str(dist.binary),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={caches}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name=mind_{os.getpid()}_{uuid.uuid4().hex[:8]}_",
        ]
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd + self.extra_args

    def start(self) -> EmbeddedTriton:
        """Start the server and block until it (and every model in `models`) is ready, or raise."""
        if self._proc is not None:
            return self
        dist = find_tritonserver()
        check_numpy()
        if not self.model_repository.is_dir():
            raise TritonLaunchError(
                f"model repository {self.model_repository} does not exist; run `mind export`"
            )
        for name, port in (
            ("grpc", self.grpc_port),
            ("http", self.http_port),
            ("metrics", self.metrics_port),
        ):
            if not port_is_free(port, self.host):
                raise TritonLaunchError(
                    f"{name} port {self.host}:{port} is already in use (another tritonserver?); "
                    "stop it or choose other ports"
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        backend_dir = prepare_backend_dir(dist, self.run_dir)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self._launch(self.command(backend_dir, dist.caches), self._wait_ready, env=env, truncate_log=True)
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def ready(self, model: str | None = None) -> bool:
        """Server (or one model) readiness over HTTP; False when it cannot be reached."""
        return self._get(f"/v2/models/{model}/ready" if model else "/v2/health/ready") == 200

    def _readiness(self) -> object:
        """True when the server and every model in `models` are ready, else what is not."""
        if not self.ready():
            return "server not ready"
        return next((f"model {m} not ready" for m in self.models if not self.ready(m)), True)

    def _wait_ready(self) -> None:
        self._wait_healthy(self._readiness, self.ready_timeout_s, "tritonserver not ready")

    def log_tail(self, n: int = 40) -> str:
        return super().log_tail(n)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL the process group after a timeout."""
        return self._stop_process(timeout_s if timeout_s is not None else self.exit_timeout_s + 5)
