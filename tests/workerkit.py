"""Helpers of the end-to-end worker tests (tests/stream/test_worker.py, test_hostile.py): publish clicks,
read a topic whole, run the real worker on a thread, and check windows and commits against what was sent.

Moved here unchanged from test_worker.py so that other tests reuse the same helpers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY
from waiting import until  # noqa: F401 - the kit's tests import it from here

from stream.schemas import Click
from stream.settings import Settings, redis_client
from stream.state import WindowState
from stream.topics import ensure_topics
from stream.window import load_catalog
from stream.worker import Worker, build_worker

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


def publish(
    bootstrap: str, topic: str, events: Sequence[tuple[str | bytes | None, bytes | None]]
) -> list[tuple[int, int]]:
    """Produce (key, value) in order (idempotent producer); returns (partition, offset) of each.
    A str key is sent as UTF-8; bytes and None (hostile input) as they are."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 2})
    where: list[Any] = [None] * len(events)
    for i, (k, v) in enumerate(events):

        def done(err: Any, msg: Any, i: int = i) -> None:
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())

        p.produce(topic, key=k.encode() if isinstance(k, str) else k, value=v, on_delivery=done)
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
