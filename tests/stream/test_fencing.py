"""Fenced state, against real servers: a zombie's late writes, a duplicated event, a version mismatch, the
validation of timestamps and the start-up checks.

Each test drives real Worker objects (the same code the loop runs, one batch at a time through
`process_batch`) on messages consumed from the real broker, and looks at what the key-value store and the
recall topic then hold.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from workerkit import Reader, make_clicks, metric, setup_topics

from indexer.build import index_items
from stream.schemas import Click, dump_click, parse_recall
from stream.settings import Settings, redis_client
from stream.state import WindowState
from stream.view import order_key
from stream.window import load_catalog
from stream.worker import DependencyError, TowerMismatch, Worker, build_worker

pytestmark = pytest.mark.slow


def consume_all(settings: Settings, n: int, timeout_s: float = 30.0) -> list[Message]:
    """The first n messages of the clicks topic, as the worker's consumer would hand them over."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.group_id}-read"})
    c.assign([TopicPartition(settings.clicks_topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in c.consume(n - len(out), 0.2) if m.error() is None]
    finally:
        c.close()
    assert len(out) == n, f"{len(out)} of {n} messages"
    return sorted(out, key=lambda m: (m.partition(), m.offset()))


def produce(settings: Settings, events: list[tuple[str, bytes, int | None]]) -> None:
    """(key, value, broker timestamp in ms or None = now) per message, delivered before returning."""
    p = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0})
    for key, value, ts in events:
        p.produce(settings.clicks_topic, value, key.encode(), **({"timestamp": ts} if ts is not None else {}))
    assert p.flush(30) == 0


def worker_for(settings: Settings, wm: Any) -> Worker:
    return build_worker(settings, load_catalog(wm.checkpoint), threading.Event())


def test_a_zombies_late_batch_never_overwrites_fresher_state(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    """Worker B (the partition's new owner) refreshed user 7 up to its 10th click; worker A (a zombie that
    stalled mid-batch) then finishes its older batch of the first 5. The windows, the interest vectors and
    the view's choice between the two recall messages must all stay B's."""
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, partitions=1)
    setup_topics(s)
    clicks = make_clicks(wm, uid, ["7"], per_user=10, seed=5)
    produce(s, [(c.user_id, dump_click(c), None) for c in clicks])
    msgs = consume_all(s, 10)
    recall = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    owner, zombie = worker_for(s, wm), worker_for(s, wm)
    try:
        owner.process_batch(msgs)
        fresh = owner.last_batch
        assert fresh is not None and fresh.interests is not None
        zombie.process_batch(msgs[:5])  # the zombie wakes up and completes its old batch
        values = recall.until(lambda v: len(v) >= 2)
    finally:
        recall.close()
    state = WindowState(redis_client(s), s.clicks_topic, s.window_len)
    want = [wm.inter.items.get(c.item_id) for c in clicks][-s.window_len :]
    assert state.read_windows([(0, "7")]) == [want]  # the offset guard skipped the zombie's clicks
    stored = state.read_interests(0, "7")
    assert stored is not None
    vec, _version, _ts, fence = stored
    assert fence == msgs[-1].offset()  # the fresher refresh's click, not the zombie's
    k = int(fresh.active[0].sum())  # type: ignore[index]
    np.testing.assert_array_equal(vec, fresh.interests[0, :k])
    # the view keeps the newest by the fence, whichever message arrives last (a compacted topic keeps the
    # last written, which here is the zombie's)
    new, old = sorted((parse_recall(v) for v in values), key=lambda m: m["click_offset"], reverse=True)
    assert (new["click_offset"], old["click_offset"]) == (msgs[-1].offset(), msgs[4].offset())
    assert max([old, new], key=order_key) is new and max([new, old], key=order_key) is new


def test_interests_are_written_only_after_the_version_check(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    """During a roll the tower may serve a version the index does not: the batch fails with a version
    error and the key-value store gets none of its interest vectors."""
    wm = worker_model
    other = f"{wm.milvus_prefix}x"  # an index whose active version is another model's
    index_items(wm.item_vectors, "v-other", uri=wm.milvus_uri, prefix=other, progress=False)
    s = wm.settings(kafka_bootstrap, redis_url, uid, milvus_prefix=other)
    setup_topics(s)
    clicks = make_clicks(wm, uid, ["3", "4"], per_user=3, seed=6)
    produce(s, [(c.user_id, dump_click(c), None) for c in clicks])
    msgs = consume_all(s, len(clicks))
    worker = worker_for(s, wm)
    with pytest.raises(DependencyError) as err:
        worker.process_batch(msgs)
    assert err.value.dependency == "version"
    client = redis_client(s)
    assert list(client.scan_iter(match=f"mind:{{{s.clicks_topic}.*}}:int:*")) == []
    client.close()


def test_a_retried_publish_applies_each_event_once(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    """A producer that retried without idempotence sends every click twice, at new offsets: each event id
    enters its window once, and the repeats are counted."""
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, partitions=2)
    setup_topics(s)
    users = [str(u) for u in range(6)]
    clicks = make_clicks(wm, uid, users, per_user=4, seed=7)
    events = [(c.user_id, dump_click(c), None) for c in clicks]
    produce(s, events + events[: len(events) // 2])  # half of them again, later
    msgs = consume_all(s, len(events) + len(events) // 2)
    before = metric("mind_worker_duplicate_events_total")
    worker = worker_for(s, wm)
    worker.process_batch(msgs[: len(msgs) // 2])  # the repeats straddle two batches
    worker.process_batch(msgs[len(msgs) // 2 :])
    assert metric("mind_worker_duplicate_events_total") - before == len(events) // 2
    parts = {m.key().decode(): m.partition() for m in msgs}
    state = WindowState(redis_client(s), s.clicks_topic, s.window_len)
    for u in users:
        want = [wm.inter.items.get(c.item_id) for c in clicks if c.user_id == u]
        assert state.read_windows([(parts[u], u)]) == [want], u


def test_a_timestamp_is_judged_against_the_broker_timestamp_not_the_clock(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    """A click stamped 10 minutes after the message's own broker timestamp is from the future, whenever it
    is read (the wall clock would have accepted it: its stamp is an hour ago); one stamped 3 minutes ahead
    of its broker timestamp is accepted. Reading the batch again gives the same outcome."""
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, partitions=1, max_future_skew_s=300.0)
    setup_topics(s)
    now = time.time()
    item = wm.inter.items.raw_of(5)
    events = [  # (key, value, the message's broker timestamp in ms)
        ("1", dump_click(Click(f"{uid}-late", "1", item, now - 3000.0)), int((now - 3600) * 1e3)),
        ("2", dump_click(Click(f"{uid}-ok", "2", item, now + 180.0)), int(now * 1e3)),
    ]
    produce(s, events)
    msgs = consume_all(s, 2)
    worker = worker_for(s, wm)
    for _ in range(2):
        batch = worker.prepare(msgs)
        assert [c.click.user_id for c in batch.clicks] == ["2"]
        assert len(batch.dlq) == 1 and b"bad_timestamp" in batch.dlq[0][1]


def test_start_up_refuses_a_window_shorter_than_the_towers(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, window_len=wm.max_len - 1)
    with pytest.raises(TowerMismatch, match="MIND_WINDOW_LEN"):
        worker_for(s, wm)
