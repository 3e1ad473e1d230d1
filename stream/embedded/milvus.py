"""Start the milvus-lite server as its own process, so several processes (worker, indexer, tests) share it.

milvus-lite 2.5.1 (the pinned version, see indexer/README.md) ships a C++ `milvus` binary in
`milvus_lite/lib/`. pymilvus normally starts it on a Unix socket for a `.db` URI, which only that one
process can use. Run directly as `milvus DB_FILE HOST:PORT LOG_LEVEL LOCK_FILE`, it serves gRPC on TCP;
with the lock file argument it also exits by itself as soon as the lock we hold is released, i.e. when
we stop it *or when the launching process dies*, so no orphan servers are left behind (measured).
milvus-lite 3.x instead has a `milvus-lite server --data-dir D --port P` command; it is used when the
2.5 binary is absent, so the launcher works with either wheel.

The returned URI (http://127.0.0.1:PORT) is what pymilvus' MilvusClient takes; the same client code also
takes a local-file URI (`./items.db`, in-process milvus-lite) or a Milvus standalone URI.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO


class MilvusLaunchError(RuntimeError):
    """milvus-lite could not be started or did not answer; the message says why and has the log tail."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (checked by binding it, as the server will)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (tiny race until the server binds it; fine on one host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_milvus_lite() -> tuple[str, Path]:
    """Return ("2.5", path to the `milvus` binary) or ("3", path to the `milvus-lite` script).

    Found without importing milvus_lite: its 2.5 `__init__` imports pkg_resources (gone in setuptools 81).
    """
    spec = importlib.util.find_spec("milvus_lite")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "lib" / "milvus"
        if binary.exists():
            return "2.5", binary
    script = Path(sys.executable).parent / "milvus-lite"
    if spec is not None and script.exists():
        return "3", script
    found = shutil.which("milvus-lite")
    if spec is not None and found:
        return "3", Path(found)
    raise MilvusLaunchError(
        "milvus-lite is not installed (no milvus_lite/lib/milvus binary, no `milvus-lite` command): "
        "`pip install 'milvus-lite==2.5.1'` (the version pinned in pyproject.toml)"
    )


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class EmbeddedMilvus:
    """One milvus-lite server process: data and log under `run_dir`, gRPC on host:port.

    Use as a context manager (`with EmbeddedMilvus(run_dir) as uri:`) or call start()/stop().
    """

    # Data dirs served from this process: POSIX locks do not conflict within one process (and closing
    # any descriptor of the file drops them all), so the file lock only guards against other processes.
    _serving: set[Path] = set()
    _serving_lock = threading.Lock()

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        db_name: str = "milvus.db",
        start_timeout_s: float = 60.0,
        log_level: str = "ERROR",
    ) -> None:
        self.run_dir = Path(run_dir).resolve() / "milvus"
        self.host = host
        self.port = port
        self.db_name = db_name
        self.start_timeout_s = start_timeout_s
        self.log_level = log_level
        self.log_path = self.run_dir / "milvus.log"
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._log: IO[bytes] | None = None
        self._kind = ""

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _command(self, kind: str, exe: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if kind == "2.5":
            lib = str(exe.parent)
            env["LD_LIBRARY_PATH"] = lib + os.pathsep + env.get("LD_LIBRARY_PATH", "")
            lock = str(self.run_dir / f".{self.db_name}.lock")
            cmd = [
                str(exe),
                str(self.run_dir / self.db_name),
                f"{self.host}:{self.port}",
                self.log_level,
                lock,
            ]
        else:
            cmd = [str(exe), "server", "--data-dir", str(self.run_dir / self.db_name)]
            cmd += ["--host", self.host, "--port", str(self.port)]
        return cmd, env

    def start(self) -> str:
        """Start the server and wait until a MilvusClient can list collections; returns the URI."""
        if self._proc is not None:
            return self.uri
        kind, exe = find_milvus_lite()
        self._kind = kind
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        elif not port_is_free(self.port, self.host):
            raise MilvusLaunchError(
                f"port {self.port} on {self.host} is taken (another Milvus?); "
                "pass another port, or None for a free one"
            )
        db = self.run_dir / self.db_name
        with self._serving_lock:
            if db in self._serving:
                raise MilvusLaunchError(f"{db} is already served by this process")
            self._serving.add(db)
        try:
            self._start(kind, exe)
        except BaseException:
            with self._serving_lock:
                self._serving.discard(db)
            raise
        return self.uri

    def _start(self, kind: str, exe: Path) -> None:
        # The same lock milvus-lite itself takes: a second server on the same data dir fails fast here
        # instead of corrupting it; the 2.5 binary also watches it and exits when we release it.
        self._lock = open(self.run_dir / f".{self.db_name}.lock", "a")  # noqa: SIM115 (held until stop)
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            self._lock = None
            raise MilvusLaunchError(
                f"{self.run_dir / self.db_name} is already served by another process"
            ) from exc
        cmd, env = self._command(kind, exe)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (the child writes to it until stop)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd, env=env, cwd=self.run_dir, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def _wait_ready(self, t0: float) -> None:
        from pymilvus import MilvusClient

        last: Exception | None = None
        while time.monotonic() - t0 < self.start_timeout_s:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise MilvusLaunchError(
                    f"milvus-lite exited with code {self._proc.returncode} at start; log {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            try:
                client = MilvusClient(uri=self.uri, timeout=2.0)
                client.list_collections()
                client.close()
                return
            except Exception as exc:  # not up yet: any error means retry until the deadline
                last = exc
                time.sleep(0.2)
        raise MilvusLaunchError(
            f"milvus-lite did not answer on {self.uri} within {self.start_timeout_s:.0f}s ({last!r}); "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Release the lock (the 2.5 server then exits cleanly), then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            with self._serving_lock:
                self._serving.discard(self.run_dir / self.db_name)
        if self._lock is not None:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
        if proc is not None:
            first = timeout_s / 2 if self._kind == "2.5" else 0.0  # only the 2.5 binary watches the lock
            for sig, wait in ((None, first), (signal.SIGTERM, timeout_s / 2), (signal.SIGKILL, 5.0)):
                if sig is not None and proc.poll() is None:
                    proc.send_signal(sig)
                try:
                    code = proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
