"""stream.health: /metrics, /healthz and /readyz served by a real HTTP server on a free port.

The probe logic runs against a real server with a hand-driven clock (liveness bounds of 90 s cannot be
waited for); the last tests run the whole worker (`run_worker`) on the real stack and read its probes.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from confluent_kafka import Producer
from waiting import until
from workerkit import make_clicks, metric, setup_topics

from stream import health, metrics
from stream.embedded.redis import free_port
from stream.health import Health, HealthServer, serve
from stream.schemas import dump_click
from stream.worker import run_worker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def get(port: int, path: str) -> tuple[int, dict[str, Any] | str, str]:
    """(status, parsed JSON body or text, content type) of GET path; HTTP errors are answers too."""
    try:
        resp = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
    except urllib.error.HTTPError as exc:
        resp = exc
    body = resp.read().decode()
    ctype = resp.headers.get("Content-Type", "")
    return resp.status, json.loads(body) if ctype == "application/json" else body, ctype


@pytest.fixture
def probe() -> Iterator[tuple[Health, Clock, HealthServer]]:
    clock = Clock()
    h = Health(liveness_s=90.0, clock=clock)
    with serve("127.0.0.1", 0, health=h) as server:
        yield h, clock, server
    metrics.PAUSED.set(0)


def test_metrics_are_served_in_prometheus_format(probe: Any) -> None:
    _, _, server = probe
    assert server.port > 0
    metrics.CLICKS.inc(0)
    status, text, ctype = get(server.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "# TYPE mind_worker_clicks_total counter" in text and "\nmind_worker_paused " in text
    assert get(server.port, "/nope")[0] == 404


def test_liveness_follows_the_loops_heartbeat(probe: Any) -> None:
    h, clock, server = probe
    stop = threading.Event()
    status, body, _ = get(server.port, "/healthz")
    assert status == 200 and body["checks"]["phase"] == "starting"  # waiting for servers: not restarted
    h.started(stop)
    clock.t += 89.0
    assert get(server.port, "/healthz")[0] == 200  # within 90 s of the start, no beat yet
    clock.t += 2.0
    status, body, _ = get(server.port, "/healthz")
    assert status == 503 and body["status"] == "fail" and body["checks"]["seconds_since_beat"] == 91.0
    h.beat()
    status, body, _ = get(server.port, "/healthz")
    assert status == 200 and body["checks"]["beats"] == 1 and body["checks"]["seconds_since_beat"] == 0.0
    clock.t += 200.0
    assert get(server.port, "/healthz")[0] == 503
    stop.set()  # draining after SIGTERM: alive, whatever the heartbeat says
    status, body, _ = get(server.port, "/healthz")
    assert status == 200 and body["checks"]["phase"] == "stopping"


def test_readiness_needs_start_a_live_loop_no_pause_and_no_stop(probe: Any) -> None:
    h, clock, server = probe
    stop = threading.Event()
    status, body, _ = get(server.port, "/readyz")
    assert status == 503 and body["checks"]["started"] is False
    h.started(stop)
    status, body, _ = get(server.port, "/readyz")
    assert status == 200 and body["status"] == "ok"
    metrics.PAUSED.set(1)  # what Worker._pause sets while a dependency is down
    status, body, _ = get(server.port, "/readyz")
    assert status == 503 and body["checks"]["paused"] is True
    assert get(server.port, "/healthz")[0] == 200  # paused is not dead
    metrics.PAUSED.set(0)
    assert get(server.port, "/readyz")[0] == 200
    clock.t += 91.0
    assert get(server.port, "/readyz")[0] == 503  # not live -> not ready
    h.beat()
    assert get(server.port, "/readyz")[0] == 200
    stop.set()
    status, body, _ = get(server.port, "/readyz")
    assert status == 503 and body["checks"]["stopping"] is True


def test_readiness_lists_the_partitions_held_and_their_lag(probe: Any, uid: str) -> None:
    h, _, server = probe
    h.started(threading.Event())
    topic = f"clicks-{uid}"
    metrics.CONSUMER_LAG.labels(topic, "1").set(7)  # what Worker._update_lag keeps for held partitions
    metrics.CONSUMER_LAG.labels(topic, "0").set(0)
    try:
        status, body, _ = get(server.port, "/readyz")
        assert status == 200 and body["checks"]["partitions"] == {f"{topic}[0]": 0.0, f"{topic}[1]": 7.0}
    finally:
        metrics.CONSUMER_LAG.remove(topic, "0")
        metrics.CONSUMER_LAG.remove(topic, "1")
    body = get(server.port, "/readyz")[1]
    assert not any(k.startswith(topic) for k in body["checks"]["partitions"])  # revoked: gone


def test_liveness_bound_is_three_poll_intervals_with_a_30_s_floor() -> None:
    assert Health.liveness_for(20) == 90.0
    assert Health.liveness_for(60_000) == 180.0


@contextmanager
def worker_thread(s: Any, worker_model: Any) -> Iterator[None]:
    """`run_worker`, the whole entry point with its probe server, on a thread; stopped on exit, which
    fails if it did not stop within 60 s or raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_worker(s, stop, checkpoint=worker_model.checkpoint)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive() and not errors, errors


@pytest.mark.slow
def test_run_worker_serves_the_probes(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    """The real worker: ready once it has reached its servers and joined; the server goes with the worker."""
    port = free_port()
    s = worker_model.settings(kafka_bootstrap, redis_url, uid, metrics_port=port)
    with worker_thread(s, worker_model):
        deadline = time.monotonic() + 60
        body: Any = None
        while time.monotonic() < deadline:
            try:
                status, body, _ = get(port, "/readyz")
            except urllib.error.URLError:  # not listening yet
                status = 0
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, body
        assert body["checks"]["started"] and not body["checks"]["paused"]
        assert get(port, "/healthz")[0] == 200
        assert "mind_worker_batches_total" in get(port, "/metrics")[1]
    with pytest.raises(urllib.error.URLError):  # the server stopped with the worker
        get(port, "/healthz")
    assert health.HEALTH.ready()[0] is False


@pytest.mark.slow
def test_a_partition_the_broker_stops_serving_fails_readiness(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    """The embedded Tansu stops answering a partition's fetches once listing its record batches takes
    longer than the fetch wait (about 22k batches at 10 ms; a few thousand at 1 ms). The clicks wait in the
    log with lag and no progress: /readyz must say so, and a metric count it.

    How many batches that takes depends on the machine, so a worker that reads its whole partition is
    stopped and the next attempt fills a fresh topic with twice as many. A broker that stops at the first
    fetch (nothing read, no position yet) must count as well as one that stops mid-log."""
    for attempt, per_user in enumerate((200, 400, 800, 1600)):
        port = free_port()
        s = worker_model.settings(
            kafka_bootstrap,
            redis_url,
            f"{uid}a{attempt}",
            metrics_port=port,
            partitions=1,
            fetch_wait_max_ms=1,
            fetch_stall_s=2.0,
        )
        setup_topics(s)
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
        clicks = make_clicks(worker_model, f"{uid}a{attempt}", [str(u) for u in range(20)], per_user, seed=9)
        for c in clicks:
            producer.produce(s.clicks_topic, dump_click(c), c.user_id.encode())
            producer.flush(10)  # one record batch per click
        stalls = metric("mind_worker_partition_stalls_total")
        done = metric("mind_worker_clicks_total") + len(clicks)
        with worker_thread(s, worker_model):

            def stalled_or_read(port: int = port, done: float = done) -> dict[str, Any] | None:
                if metric("mind_worker_clicks_total") >= done:
                    return {"read": True}
                try:
                    status, body, _ = get(port, "/readyz")
                except urllib.error.URLError:  # not listening yet
                    return None
                return body if status == 503 and body["checks"]["stalled"] else None

            body = until(stalled_or_read, what="/readyz to report the stalled partition", timeout=120)
            stalled = not body.get("read")  # read: this machine lists these batches within the wait
            if stalled:
                (reason,) = body["checks"]["stalled"].values()
                assert "no progress" in reason and body["status"] == "fail"
                assert metric("mind_worker_partition_stalls_total") > stalls
                assert get(port, "/healthz")[0] == 200  # alive: restarting the worker would not help
        if stalled:
            break
    else:
        pytest.fail("the broker served every partition in full, up to 32,000 one-message record batches")
