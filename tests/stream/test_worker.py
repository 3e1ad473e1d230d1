"""The stream worker end to end, every server real: Tansu, Valkey, tritonserver (an exported MIND tower) and
milvus-lite (the same model's item vectors).

- recall messages equal an in-process computation (torch tower, exact top-N, Eq. 3 merge) from the same
  window and model version; malformed events go to the DLQ while the valid ones around them are processed;
- a dependency failure pauses, retries and commits nothing until the batch succeeds;
- two workers and a rebalance lose nothing;
- kill -9 of a worker process mid-stream, twice, then restarts: every click is in its window exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY

from mind.dataset import OOV
from mind.retrieval import retrieve
from mind.train import encode
from stream.embedded.redis import free_port
from stream.schemas import Click, decode_b64, dump_click, parse_dlq, parse_recall
from stream.settings import Settings, redis_client
from stream.state import WindowState
from stream.topics import ensure_topics
from stream.tower import TowerError
from stream.window import load_catalog
from stream.worker import Worker, build_worker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


# ---- helpers ---------------------------------------------------------------------------------------------


@dataclass
class ClickLog:
    """What was published: valid clicks in order, where each landed, and the expected windows."""

    window_len: int
    item_index: Callable[[str], int]
    clicks: list[Click] = field(default_factory=list)
    partition: dict[str, int] = field(default_factory=dict)  # user -> partition
    history: dict[str, list[int]] = field(default_factory=dict)  # user -> item indices, in order
    window_at: dict[str, list[int]] = field(default_factory=dict)  # event id -> window after it
    ends: dict[int, int] = field(default_factory=dict)  # partition -> last published offset + 1

    def add(self, c: Click) -> None:
        h = self.history.setdefault(c.user_id, [])
        h.append(self.item_index(c.item_id))
        self.window_at[c.event_id] = h[-self.window_len :]
        self.clicks.append(c)

    def last_event(self) -> dict[str, str]:
        return {c.user_id: c.event_id for c in self.clicks}


def make_clicks(
    wm: Any, uid: str, users: list[str], per_user: int, seed: int, unknown: float = 0.0
) -> list[Click]:
    """Each user's synthetic sequence (cycled), users interleaved at random, now-ish timestamps."""
    g = np.random.default_rng(seed)
    inter = wm.inter
    todo = {
        u: [inter.items.raw_of(int(i)) for i in np.resize(inter.sequences[int(u)], per_user)] for u in users
    }
    out: list[Click] = []
    now = time.time()
    while todo:
        u = list(todo)[g.integers(len(todo))]
        item = todo[u].pop(0)
        if g.random() < unknown:
            item = f"new-item-{g.integers(1000)}"  # not in the vocabulary
        out.append(Click(f"{uid}-{len(out)}", u, item, now + len(out) * 1e-3))
        if not todo[u]:
            del todo[u]
    return out


def publish(bootstrap: str, topic: str, events: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """Produce (key, value) in order (idempotent producer); returns (partition, offset) of each."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 2})
    where: list[Any] = [None] * len(events)
    for i, (k, v) in enumerate(events):

        def done(err: Any, msg: Any, i: int = i) -> None:
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())

        p.produce(topic, key=k.encode(), value=v, on_delivery=done)
        p.poll(0)
    assert p.flush(20) == 0
    return where


class Reader:
    """Reads a whole topic from the beginning (manual assignment, no group) and keeps everything."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
        self.c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.values: list[bytes] = []

    def until(self, done: Callable[[list[bytes]], bool], timeout: float = 60.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while not done(self.values):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s with {len(self.values)} messages")
            self.values.extend(m.value() for m in self.c.consume(500, timeout=0.2) if m.error() is None)
        return self.values

    def close(self) -> None:
        self.c.close()


def covers(last: dict[str, str]) -> Callable[[list[bytes]], bool]:
    """Done when every user's last click has a recall message."""

    def done(values: list[bytes]) -> bool:
        seen = {json.loads(v)["event_id"] for v in values}
        return all(e in seen for e in last.values())

    return done


class Running:
    """A worker on a thread (the loop under test, not a mock), stopped like SIGTERM stops it."""

    def __init__(self, settings: Settings, wm: Any) -> None:
        self.stop = threading.Event()
        self.worker: Worker = build_worker(settings, load_catalog(wm.checkpoint), self.stop)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run(self.stop)
        except BaseException as exc:
            self.errors.append(exc)
            raise

    def start(self) -> Running:
        self.thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        assert not self.errors, self.errors


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def committed(settings: Settings) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.group_id})
    try:
        tps = [TopicPartition(settings.clicks_topic, p) for p in range(settings.partitions)]
        return {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()


def check_windows(settings: Settings, log: ClickLog) -> None:
    """The Redis window of every user equals the last window_len of its published clicks: no click
    lost, none applied twice (window_len >= every history here, so the whole history is compared)."""
    client = redis_client(settings)
    state = WindowState(client, settings.clicks_topic, settings.window_len)
    users = sorted(log.history)
    got = state.read_windows([(log.partition[u], u) for u in users])
    for u, w in zip(users, got, strict=True):
        assert w == log.history[u][-settings.window_len :], f"user {u}"
    client.close()


def setup_topics(settings: Settings) -> None:
    ensure_topics(AdminClient({"bootstrap.servers": settings.kafka_bootstrap}), settings)


def record(log: ClickLog, clicks: list[Click], where: list[tuple[int, int]]) -> None:
    for c, (p, off) in zip(clicks, where, strict=True):
        log.partition[c.user_id] = p
        log.ends[p] = max(log.ends.get(p, 0), off + 1)
        log.add(c)


def all_committed(settings: Settings, log: ClickLog) -> None:
    """Every published message was handled and its offset committed (after its recall was delivered).
    Ends come from the delivery reports: Tansu 0.6 answers ListOffsets(latest) wrongly."""
    got = committed(settings)
    assert {p: got[p] for p in log.ends} == log.ends


def assert_same_candidates(
    got: list[dict], want_ids: np.ndarray, want_sc: np.ndarray, n: int, index: Any
) -> None:
    """Same items, order and scores as the reference, except that items whose reference scores are tied
    (within float32 noise between TorchScript-on-Triton and eager torch) may come in either order."""
    tol = 2e-5
    assert len(got) == n
    np.testing.assert_allclose([c["score"] for c in got], want_sc[:n], atol=tol, rtol=0)
    g_ids = [index(c["item_id"]) for c in got]  # raw item id -> model index
    i = 0
    while i < n:
        j = i
        while j + 1 < len(want_sc) and want_sc[j] - want_sc[j + 1] <= tol:
            j += 1
        assert set(g_ids[i : min(j + 1, n)]) <= set(want_ids[i : j + 1].tolist()), (i, g_ids, want_ids)
        i = j + 1


# ---- tests -----------------------------------------------------------------------------------------------


BAD = [
    (b"not json at all", "not_json"),
    (b'{"event_id": "x", "user_id": "u"}', "schema"),
    (b"\xff\xfe\x00{", "not_utf8"),
    (b"[1, 2, 3]", "not_object"),
    (b'{"a": "' + b"x" * 70_000 + b'"}', "too_large"),
    (b'{"event_id": "ms", "user_id": "1", "item_id": "3", "timestamp": 1700000000000}', "schema"),
]


def test_recall_equals_in_process_computation_and_bad_events_go_to_the_dlq(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid)
    setup_topics(s)
    users = [str(u) for u in range(24)]
    clicks = make_clicks(wm, uid, users, per_user=6, seed=1, unknown=0.08)
    future = Click(f"{uid}-future", "2", wm.inter.items.raw_of(5), time.time() + 3600)
    events: list[tuple[str, bytes]] = [(c.user_id, dump_click(c)) for c in clicks]
    bad = [*BAD, (dump_click(future), "bad_timestamp")]
    for k, (raw, _) in enumerate(bad):  # spread among the valid clicks, on the users' partitions
        events.insert(10 + k * 17, (users[k], raw))
    before = {code: metric("mind_worker_dlq_total", code=code) for _, code in bad}
    unknown_before = metric("mind_worker_unknown_items_total")

    where = publish(kafka_bootstrap, s.clicks_topic, events)
    log = ClickLog(wm.max_len, wm.inter.items.get)
    pos = {v: w for (_, v), w in zip(events, where, strict=True)}
    record(log, clicks, [pos[dump_click(c)] for c in clicks])
    for p, off in where:
        log.ends[p] = max(log.ends.get(p, 0), off + 1)
    recall, dlq = (
        Reader(kafka_bootstrap, s.recall_topic, s.partitions),
        Reader(kafka_bootstrap, s.dlq_topic, 1),
    )
    worker = Running(s, wm).start()
    try:
        values = recall.until(covers(log.last_event()))
        letters = dlq.until(lambda v: len(v) >= len(bad))
    finally:
        worker.close()
        recall.close()
        dlq.close()

    # every recall message: the candidates of the window as it was right after its triggering click
    msgs = [parse_recall(v) for v in values]
    assert len(msgs) < len(clicks)  # several clicks of one user in a batch refresh that user once
    windows = [log.window_at[m["event_id"]] for m in msgs]
    assert all(m["model_version"] == wm.model_version for m in msgs)
    assert all(m["index_version"] == wm.model_version for m in msgs)
    with torch.no_grad():
        V, active = encode(
            wm.model, wm.inter, [np.array(w) for w in windows], np.array([int(m["user_id"]) for m in msgs])
        )
    n = s.recall_n
    ids, sc, _ = retrieve(
        V, active, wm.item_vectors, n + 5, seen=[set(w) for w in windows], per_interest_n=n + 20
    )
    for m, want_ids, want_sc in zip(msgs, ids, sc, strict=True):
        assert_same_candidates(m["candidates"], want_ids, want_sc, n, wm.inter.items.get)
    assert any(OOV in w for w in windows)  # unknown items were kept in windows (as OOV), not dead-lettered
    assert metric("mind_worker_unknown_items_total") - unknown_before == sum(
        c.item_id.startswith("new-item-") for c in clicks
    )

    # dead letters: reason, original bytes, partition and offset of each bad message
    got = {decode_b64(d["original"]): d for d in map(parse_dlq, letters)}
    for k, (raw, code) in enumerate(bad):
        d = got[raw[:65536]]
        assert d["error_code"] == code and d["reason"]
        assert (d["partition"], d["offset"]) == where[10 + k * 17] and d["topic"] == s.clicks_topic
    for code in {c for _, c in bad}:
        assert metric("mind_worker_dlq_total", code=code) - before[code] == sum(c == code for _, c in bad)
    check_windows(s, log)
    all_committed(s, log)
    print(
        "\nstage ms (last batch):",
        {k: round(v * 1e3, 2) for k, v in worker.worker.last_batch.timings.items()},
    )


def test_dependency_failure_pauses_retries_and_commits_only_after_success(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    """Triton fails twice, then the recall guard refuses a version once: the batch is retried with the
    partitions paused, nothing is committed meanwhile, and the worker recovers by itself."""
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, batch_max=500)
    setup_topics(s)
    clicks = make_clicks(wm, uid, [str(u) for u in range(10)], per_user=3, seed=2)
    running = Running(s, wm)
    w = running.worker
    events: list[str] = []
    infer, recall, commit, pause = w.tower.infer, w.recaller.recall, w.commit, w._pause
    fails = {"triton": 2, "version": 1}

    def flaky_infer(*a: Any, **k: Any) -> Any:
        if fails["triton"]:
            fails["triton"] -= 1
            events.append("fail")
            raise TowerError("Triton is down (injected)")
        return infer(*a, **k)

    def flaky_recall(*a: Any, **k: Any) -> Any:
        from indexer.store import VersionMismatch

        if fails["version"]:
            fails["version"] -= 1
            events.append("fail")
            raise VersionMismatch("tower v9 vs index v8 (injected)")
        events.append("ok")
        return recall(*a, **k)

    w.tower.infer = flaky_infer  # type: ignore[method-assign]
    w.recaller.recall = flaky_recall  # type: ignore[method-assign]
    w.commit = lambda *a, **k: events.append("commit") or commit(*a, **k)  # type: ignore[method-assign]
    w._pause = lambda: events.append("pause") or pause()  # type: ignore[method-assign]
    w.lag_interval_s = 0.0  # refresh the lag gauges on every loop turn
    retries = {d: metric("mind_worker_retries_total", dependency=d) for d in ("triton", "version")}

    where = publish(kafka_bootstrap, s.clicks_topic, [(c.user_id, dump_click(c)) for c in clicks])
    log = ClickLog(s.window_len, wm.inter.items.get)
    record(log, clicks, where)
    reader = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    running.start()
    try:
        reader.until(covers(log.last_event()))
        deadline = time.monotonic() + 10
        lag: dict[int, float | None] = {}
        while time.monotonic() < deadline:  # committed, and every partition's lag seen back at 0
            lag = {
                p: REGISTRY.get_sample_value(
                    "mind_worker_consumer_lag", {"topic": s.clicks_topic, "partition": str(p)}
                )
                for p in log.ends
            }
            if "commit" in events and all(v == 0 for v in lag.values()):
                break
            time.sleep(0.05)
        assert all(v == 0 for v in lag.values()), lag
    finally:
        running.close()
        reader.close()
    assert [e for e in events if e != "pause"][:4] == ["fail", "fail", "fail", "ok"], events
    assert events.index("pause") < events.index("ok")  # paused while retrying
    assert events.index("commit") > events.index("ok")  # nothing committed before the batch succeeded
    assert metric("mind_worker_retries_total", dependency="triton") - retries["triton"] == 2
    assert metric("mind_worker_retries_total", dependency="version") - retries["version"] == 1
    assert metric("mind_worker_paused") == 0
    check_windows(s, log)
    all_committed(s, log)


def test_two_workers_and_a_rebalance_lose_nothing(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    wm = worker_model
    # max.poll.interval.ms is also the JoinGroup's rebalance timeout: in about one full-suite run in five
    # Tansu left this group's rebalance pending after the first member left (no assignment for 60 s);
    # a 15 s bound lets the coordinator finish the round with the members it has, as Kafka does.
    s = wm.settings(kafka_bootstrap, redis_url, uid, window_len=64, batch_max=16, max_poll_interval_ms=15_000)
    setup_topics(s)
    users = [str(u) for u in range(40)]
    clicks = make_clicks(wm, uid, users, per_user=30, seed=3)
    parts = [clicks[:400], clicks[400:800], clicks[800:]]
    log = ClickLog(s.window_len, wm.inter.items.get)
    reader = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    a = Running(s, wm).start()
    b: Running | None = None
    try:
        record(
            log,
            parts[0],
            publish(kafka_bootstrap, s.clicks_topic, [(c.user_id, dump_click(c)) for c in parts[0]]),
        )
        reader.until(lambda v: len(v) >= 50)
        b = Running(s, wm).start()  # joins mid-stream: the group rebalances
        record(
            log,
            parts[1],
            publish(kafka_bootstrap, s.clicks_topic, [(c.user_id, dump_click(c)) for c in parts[1]]),
        )
        time.sleep(4.0)  # let b's join complete and take partitions
        a.close()  # a leaves: b takes every partition
        record(
            log,
            parts[2],
            publish(kafka_bootstrap, s.clicks_topic, [(c.user_id, dump_click(c)) for c in parts[2]]),
        )
        reader.until(covers(log.last_event()))
    finally:
        if b is not None:
            b.close()
        reader.close()
    assert a.worker.last_batch is not None and b.worker.last_batch is not None  # both did work
    check_windows(s, log)
    all_committed(s, log)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[Path, Path], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: Path, checkpoint: Path) -> subprocess.Popen[bytes]:
        logf = open(tmp_path / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [sys.executable, "-m", "stream.worker", "--config", str(config), "--checkpoint", str(checkpoint)],
            cwd=ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_kill_9_mid_stream_then_restart_applies_every_click_exactly_once(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str, tmp_path: Path, spawn: Any
) -> None:
    wm = worker_model
    port = free_port()
    s = wm.settings(kafka_bootstrap, redis_url, uid, window_len=64, batch_max=16, metrics_port=port)
    setup_topics(s)
    config = tmp_path / "worker.json"
    config.write_text(
        json.dumps({k: v for k, v in s.model_dump(mode="json").items() if k in s.model_fields_set})
    )
    clicks = make_clicks(wm, uid, [str(u) for u in range(40)], per_user=40, seed=4)
    log = ClickLog(s.window_len, wm.inter.items.get)
    reader = Reader(kafka_bootstrap, s.recall_topic, s.partitions)

    def publisher() -> None:  # a steady stream while the worker is killed and restarted
        for k in range(0, len(clicks), 100):
            chunk = clicks[k : k + 100]
            record(
                log,
                chunk,
                publish(kafka_bootstrap, s.clicks_topic, [(c.user_id, dump_click(c)) for c in chunk]),
            )
            time.sleep(0.25)

    pub = threading.Thread(target=publisher, daemon=True)
    proc = spawn(config, wm.checkpoint)
    pub.start()
    kills = 0
    try:
        for _ in range(2):
            seen = len(reader.values)
            reader.until(lambda v, seen=seen: len(v) >= seen + 60, timeout=90)
            time.sleep(float(np.random.default_rng(kills).uniform(0.0, 0.3)))
            os.kill(proc.pid, signal.SIGKILL)  # anywhere: mid-consume, mid-Triton, mid-produce, mid-commit
            proc.wait(10)
            kills += 1
            proc = spawn(config, wm.checkpoint)
        pub.join(60)
        reader.until(covers(log.last_event()), timeout=90)
        stats = _scrape(port)
        proc.send_signal(signal.SIGTERM)  # graceful: finish the batch, commit, leave the group
        assert proc.wait(30) == 0
    finally:
        reader.close()
    assert kills == 2 and len(log.clicks) == len(clicks)
    check_windows(s, log)  # every click in its window exactly once
    all_committed(s, log)
    recalled = {json.loads(v)["event_id"] for v in reader.values}
    assert set(log.last_event().values()) <= recalled
    print(
        f"\nrecall messages {len(reader.values)} for {len(clicks)} clicks; last process: "
        f"duplicates skipped {stats.get('mind_worker_duplicates_skipped_total', 0):.0f}, "
        f"clicks {stats.get('mind_worker_clicks_total', 0):.0f}"
    )
