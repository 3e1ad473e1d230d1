"""The worker's HTTP endpoints on settings.metrics_port: /metrics, /healthz (liveness), /readyz (readiness).

One stdlib ThreadingHTTPServer on a daemon thread; /metrics is prometheus_client's own handler
(MetricsHandler: content negotiation, gzip), so nothing new is needed to serve it.

/healthz (liveness: "restart me if this fails"), 200 unless the consumer loop is stuck:
    once the worker has started (clients built, consumer about to subscribe), the loop must have called
    `beat()` within `liveness_s` = 3 x max(batch_timeout, 30 s) (90 s with the defaults). The clock
    starts at `started()`, so a worker that never beats fails 90 s after start. While it is still
    waiting for its servers at start-up, and while it drains after SIGTERM, it is alive: restarting it
    would not help either.

/readyz (readiness: "count me as serving"), 200 when all of these hold:
    started     the start-up reached every dependency (Redis ping, Triton config, Milvus) and built the
                Kafka clients;
    live        as /healthz;
    not paused  `mind_worker_paused` is 0: no dependency is failing right now;
    not stopping  SIGTERM/stop has not been received;
    not stalled  no assigned partition has lag without progress for longer than fetch_stall_s while
                consumption runs (`mind_worker_partition_stalled_seconds`): the broker stopped serving it
                (the embedded Tansu does at about 22k record batches in a partition, docs/load.md).
    A replica without partitions (more replicas than partitions) is ready: it is a subscribed member of
    the group, idle by design, and a rolling update must not wait on it. The body lists the partitions
    this process holds and their lag, read from the `mind_worker_consumer_lag` gauge (refreshed every
    5 s by the loop once it has a position there, dropped on revocation). The probes never call the
    consumer: a first version that called consumer.assignment() from the HTTP thread had a probe time
    out (5 s) while the worker was joining its group.

Bodies are JSON: {"status": "ok" | "fail", "checks": {...}}; a failing check answers 503.

The loop's heartbeat is this module's `beat()` (a float store, safe from any thread). The contract:
Worker.run calls it once per poll, and the retry wait (Worker._sleep_polling) once per poll too, so an
outage (paused, polling) reads as alive but not ready. run_worker (stream/worker.py) starts the server
in place of prometheus_client's start_http_server and marks the start; settings.metrics_port 0 = off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, MetricsHandler

LIVENESS_FLOOR_S = 30.0


class Health:
    """What the endpoints report: start, heartbeat, stop and the consumer, set by the worker's wiring."""

    def __init__(self, liveness_s: float = 3 * LIVENESS_FLOOR_S, clock: Callable[[], float] = time.monotonic):
        self.liveness_s = liveness_s
        self.clock = clock
        self.registry: CollectorRegistry = REGISTRY
        self._started_at: float | None = None
        self._last_beat: float | None = None
        self._beats = 0
        self._stop: threading.Event | None = None

    @staticmethod
    def liveness_for(batch_timeout_ms: int) -> float:
        """3 x max(the loop's poll timeout, 30 s): generous against GC pauses and slow batches."""
        return 3 * max(batch_timeout_ms / 1000, LIVENESS_FLOOR_S)

    def reset(self, liveness_s: float) -> None:
        """Back to "starting" (one worker per process; tests run several in turn)."""
        self.liveness_s = liveness_s
        self._started_at = self._last_beat = None
        self._beats = 0
        self._stop = None

    def beat(self) -> None:
        """The consumer loop polled: called every iteration, and while a retry waits."""
        self._last_beat = self.clock()
        self._beats += 1

    def started(self, stop: threading.Event | None = None) -> None:
        """Every dependency was reached and the clients exist; the loop starts now. `stop` set = draining."""
        self._stop = stop
        self._started_at = self.clock()

    def _since_beat(self) -> float | None:
        """Seconds since the last beat, or since the start when none came after it; None before start."""
        if self._started_at is None:
            return None
        last = self._started_at if self._last_beat is None else max(self._started_at, self._last_beat)
        return self.clock() - last

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Liveness and its checks (see the module docstring)."""
        since = self._since_beat()
        stopping = self._stop is not None and self._stop.is_set()
        ok = since is None or stopping or since <= self.liveness_s
        checks: dict[str, Any] = {
            "phase": "starting" if self._started_at is None else ("stopping" if stopping else "running"),
            "seconds_since_beat": None if since is None else round(since, 3),
            "liveness_s": self.liveness_s,
            "beats": self._beats,
        }
        return ok, checks

    def _paused(self) -> bool:
        return bool(self.registry.get_sample_value("mind_worker_paused") or 0.0)

    def _partitions(self) -> dict[str, float]:
        """ "topic[partition]" -> lag, for the partitions this process holds (the lag gauge's children)."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            if family.name == "mind_worker_consumer_lag":
                for sample in family.samples:
                    out[f"{sample.labels['topic']}[{sample.labels['partition']}]"] = sample.value
        return dict(sorted(out.items()))

    def _stalled(self) -> dict[str, str]:
        """ "topic[partition]" -> why, for partitions the broker stopped serving (the stall gauge's children
        above 0: lag, and no progress for longer than the worker's fetch_stall_s)."""
        out: dict[str, str] = {}
        for family in self.registry.collect():
            if family.name == "mind_worker_partition_stalled_seconds":
                for sample in family.samples:
                    if sample.value > 0:
                        key = f"{sample.labels['topic']}[{sample.labels['partition']}]"
                        out[key] = (
                            f"lag but no progress for {sample.value:.0f} s: the broker stopped serving it"
                        )
        return dict(sorted(out.items()))

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness and its checks (see the module docstring)."""
        live, checks = self.live()
        started = self._started_at is not None
        stopping = checks["phase"] == "stopping"
        paused = self._paused()
        stalled = self._stalled()
        checks.update(
            started=started,
            live=live,
            paused=paused,
            stopping=stopping,
            stalled=stalled,
            partitions=self._partitions(),
        )
        return started and live and not paused and not stopping and not stalled, checks


HEALTH = Health()


def beat() -> None:
    """The worker loop's heartbeat (module-level, so the loop needs only `health.beat()`)."""
    HEALTH.beat()


class _Handler(MetricsHandler):
    """prometheus_client's /metrics handler plus the two probes."""

    health: Health = HEALTH

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path in ("/healthz", "/readyz"):
            ok, checks = self.health.live() if path == "/healthz" else self.health.ready()
            body = orjson.dumps({"status": "ok" if ok else "fail", "checks": checks})
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        elif path in ("/", "/metrics"):
            super().do_GET()
        else:
            self.send_error(404, "try /metrics, /healthz or /readyz")


class HealthServer:
    """The running server; `port` is the bound one (ask for 0 to get a free port)."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd, self._thread = httpd, thread
        self.host, self.port = httpd.server_address[0], int(httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def serve(
    host: str, port: int, health: Health = HEALTH, registry: CollectorRegistry = REGISTRY
) -> HealthServer:
    """Start /metrics, /healthz and /readyz on host:port in a daemon thread."""
    health.registry = registry
    handler = type("HealthHandler", (_Handler,), {"registry": registry, "health": health})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(  # poll 0.1 s: close() (worker shutdown) waits at most that long
        target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"health:{port}", daemon=True
    )
    thread.start()
    return HealthServer(httpd, thread)
