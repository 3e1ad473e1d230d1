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
import sys
import threading
from pathlib import Path
from typing import IO

from stream.embedded.process import ServerProcess, free_port, port_is_free

__all__ = ["EmbeddedMilvus", "MilvusLaunchError", "find_milvus_lite", "free_port", "port_is_free"]


class MilvusLaunchError(RuntimeError):
    """milvus-lite could not be started or did not answer; the message says why and has the log tail."""


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


class EmbeddedMilvus(ServerProcess[str]):
    """One milvus-lite server process: data and log under `run_dir`, gRPC on host:port.

    Use as a context manager (`with EmbeddedMilvus(run_dir) as uri:`) or call start()/stop().
    """

    _error = MilvusLaunchError
    _name = "milvus-lite"

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
        super().__init__()
        self.run_dir = Path(run_dir).resolve() / "milvus"
        self.host = host
        self.port = port
        self.db_name = db_name
        self.start_timeout_s = start_timeout_s
        self.log_level = log_level
        self.log_path = self.run_dir / "milvus.log"
        self._lock: IO[str] | None = None
        self._kind = ""

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        self.port = self._port(self.port, self.host, "Milvus")
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
        self._launch(cmd, self._wait_ready, env=env)

    def _wait_ready(self) -> None:
        from pymilvus import MilvusClient

        def answers() -> bool:
            client = MilvusClient(uri=self.uri, timeout=2.0)
            client.list_collections()
            client.close()
            return True

        # not up yet: any error means retry until the deadline
        self._wait_healthy(
            answers, self.start_timeout_s, f"milvus-lite did not answer on {self.uri}", interval_s=0.2
        )

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Release the lock (the 2.5 server then exits cleanly), then SIGTERM, then SIGKILL."""
        if self._proc is not None:
            with self._serving_lock:
                self._serving.discard(self.run_dir / self.db_name)
        if self._lock is not None:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
        first = timeout_s / 2 if self._kind == "2.5" else 0.0  # only the 2.5 binary watches the lock
        return self._stop_process(timeout_s / 2, grace_s=first, kill_wait_s=5.0)
