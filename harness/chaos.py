"""`mind chaos`: fault injection against a replay of known content, and the ground truth it is checked with.

One run starts its own embedded stack (own run dir, free ports), trains, exports and indexes a
small synthetic MIND, starts worker *processes* (`python -m stream.worker`, or the fault-injecting
`python -m harness.faulty_worker`), and publishes synthetic
users' clicks at a steady rate while it injects, one after the other:

- crash: SIGKILL of a worker at a random moment, alternating with stage-targeted deaths through the
  fault-injecting worker (harness/faulty_worker.py, `--kill-at STAGE:N`): entering parse / window /
  Triton / kv_write / recall / produce, leaving window / Triton, and leaving produce (the recall messages
  are delivered, the commit has not happened: "mid-commit"). Each dead worker is replaced at once.
- outages: Triton stopped for `down_s`, the Milvus server stopped, the key-value server stopped (Valkey
  with its append-only file, so its restart keeps the windows and offsets), the broker restarted.
- rebalance: workers added and removed (2 -> 3 -> 1; the rest of the run has one worker).
- hostile input (harness/hostile.py) and a version roll (workflows/roll.py), when those modules exist.

Ground truth is what the publisher knows: every click's user, position in the user's sequence, item and,
from the delivery report, partition and offset. Checked at the end, with every worker stopped:

- each (partition, user) window in the key-value store is compared with the delivered clicks in offset
  order (window_len is larger than any user's click count here, so the whole history is compared); a
  longest common subsequence tells clicks *lost* (expected, absent) from clicks *applied twice* (extra);
- every click has a recall message *covering* it: one for the same user whose triggering click is this
  one or a later one (the worker coalesces a user's clicks in a batch; a later refresh includes the
  click). Duplicate recall messages (same triggering event) are allowed and counted;
- every recall message carries equal model and index versions (`mixed_versions`);
- every worker exit is one we caused (`worker_crashes` counts the others, with their log tails).

The broker restart follows the runbook that memory storage forces (docs/reliability.md): the embedded
Tansu loses its whole log, the committed offsets and the DLQ on restart, so the clicks it held but no
worker had applied yet are gone with it (reported as that outage's `lost`, and excluded from the
windows' ground truth), and the stored window offsets must be reset before any worker reads the new log.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from harness.hostile import hostile_corpus
from harness.load import WorkerProc, fresh_topics, spawn_worker
from harness.proxy import Proxy
from harness.soak import backpressure, soak
from indexer.store import normalize_version
from mind.experiment import machine, run_offline, write_json
from mind.synthetic import generate
from mind.train import TrainConfig
from stream.embedded.process import free_port
from stream.embedded.stack import (
    SERVICES,
    Stack,
    StackRunning,
    live_services,
    models_in,
    read_state,
)
from stream.fetch import available
from stream.schemas import Click, dump_click
from stream.settings import Settings, kafka_config, redis_client
from stream.state import WindowState
from stream.topics import ensure_topics
from stream.view import order_key
from stream.window import load_catalog
from workflows.roll import roll
from workflows.serving import export_checkpoint, index_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EVENT_MEMORY = int(Settings.model_fields["event_id_memory"].default)  # the workers run with the default
WINDOW_LEN = 512  # > USER_CAP: a window holds a user's whole history, so it is compared click by click
USER_CAP = 400  # clicks per synthetic user; then the user retires and a new one takes its place
# (stage, at exit) points of the worker's fault hook; "produce" at exit = delivered, not yet committed
HOOK_POINTS = (
    "parse",
    "window",
    "window:exit",
    "triton",
    "triton:exit",
    "kv_write",
    "recall",
    "produce",
    "produce:exit",
)


# ---- the plan -----------------------------------------------------------------------------------------


# the checks a run must pass: each counts clicks (or messages, or exits) that went wrong
FAILURE_FIELDS = (
    "lost",
    "applied_twice",
    "missing_recall",
    "mixed_versions",
    "worker_crashes",
    "stale_overwrites",
    "duplicate_events_applied",
)


@dataclass
class Plan:
    """How much of each fault one run injects (`--quick` is the CI size)."""

    kills: int = 20  # half at random moments, half through the stage hook
    workers: int = 2
    rate: float = 50.0  # valid clicks per second
    users: int = 200  # active synthetic users at a time
    warmup_s: float = 5.0
    settle_s: float = 4.0  # steady stream between phases
    triton_down_s: float = 10.0
    milvus_down_s: float = 10.0
    redis_down_s: float = 10.0
    broker_down_s: float = 3.0
    rebalance_hold_s: float = 8.0  # with three workers
    hostile: int = 1200
    hostile_per_click: int = 2
    soak_s: float = 600.0
    # harness.soak.soak arguments: 400 clicks/s for 10 minutes. A 250 ms producer linger batches 25 clicks/s
    # per partition into at most 4 record batches a second (2,400 in 10 minutes), well below where the
    # embedded Tansu stopped serving a partition under this load at the worker's 5 ms fetch wait (about
    # 5,000-6,500 with a 50 ms linger over 32 partitions; docs/load.md).
    soak: dict[str, Any] = field(
        default_factory=lambda: {"rate_cps": 400.0, "partitions": 16, "linger_ms": 250}
    )
    train_s: float = 20.0  # checked after each epoch
    epochs: int = 3
    synthetic_users: int = 400
    session_timeout_ms: int = 3000
    recover_timeout_s: float = 120.0
    stall_s: float = 20.0  # a worker without partitions this long after a revocation is restarted
    backpressure: dict[str, float] = field(default_factory=dict)  # harness.soak.backpressure arguments
    slow_s: float = 8.0  # each dependency 50-200 ms slower per chunk, through its proxy
    slow_ms: tuple[float, float] = (50.0, 200.0)
    drop_s: float = 4.0  # each dependency's connections dropped and refused
    zombie_stages: tuple[str, ...] = ("window", "kv_write", "produce")  # one SIGSTOP pause each
    duplicates: int = 1500  # delivered clicks published again (a retrying producer)
    stall_batches: int = 4000  # one-message record batches that make the embedded broker stall (1 ms wait)
    stall_max_batches: int = 48_000  # attempts double the batches up to this while the stall has not shown

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            kills=4,
            rate=40.0,
            users=80,
            warmup_s=2.0,
            settle_s=1.0,
            triton_down_s=3.0,
            milvus_down_s=3.0,
            redis_down_s=2.0,
            broker_down_s=1.0,
            rebalance_hold_s=3.0,
            hostile=300,
            hostile_per_click=5,
            soak_s=30.0,
            train_s=2.0,
            epochs=1,
            synthetic_users=120,
            session_timeout_ms=2000,
            recover_timeout_s=60.0,
            stall_s=12.0,
            backpressure={"offered_cps": 200.0, "fast_s": 3.0, "slow_s": 8.0, "recover_s": 3.0},
            slow_s=3.0,
            drop_s=2.0,
            zombie_stages=("kv_write",),
            duplicates=1000,
            stall_batches=3000,
        )


# ---- ground truth -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sent:
    """One published message and what must become of it."""

    seq: int
    t: float  # unix time it was produced
    epoch: int  # broker incarnation (bumped by each broker restart)
    user: str | None  # the window it enters (None: it must not enter any)
    pos: int  # position in a chaos user's sequence; -1 for other messages
    item: int  # model index expected in the window; -1 when none
    expect: str = "click"  # click | dlq | handled | duplicate (a re-sent click: must not enter again)
    reason: str = ""  # for dlq: the expected error code
    chaos: bool = True  # one of the replay's own clicks (the recall coverage is checked for those)
    partition: int = -1
    offset: int = -1
    failed: bool = False  # the broker refused it: never published
    broker_lost: bool = False  # held by the broker, never applied, gone with its restart
    event: str = ""  # its event id: a later click with the same id in its partition is skipped
    duplicate: bool = False  # set by Truth.windows: skipped as a duplicated event


class Truth:
    """Everything the publisher sent, with where it landed."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self._lock = threading.Lock()

    def add(self, **kw: Any) -> Sent:
        with self._lock:
            s = Sent(seq=len(self.sent), **kw)
            self.sent.append(s)
            return s

    def delivered(self) -> list[Sent]:
        return [s for s in self.sent if s.partition >= 0 and not s.failed]

    def windows(self, event_memory: int = EVENT_MEMORY) -> dict[tuple[int, str], list[Sent]]:
        """(partition, user) -> the clicks its window must hold, in log order. The rule, from the outside:
        a click enters unless its event id is among the last `event_memory` event ids applied in its
        partition (in this broker epoch: a restarted broker's new log starts the memory afresh)."""
        out: dict[tuple[int, str], list[Sent]] = {}
        recent: dict[tuple[int, int], deque[str]] = {}
        for s in sorted(self.delivered(), key=lambda s: (s.epoch, s.partition, s.offset)):
            if s.user is None or s.item < 0 or s.broker_lost:
                continue
            if s.event and event_memory:
                mem = recent.setdefault((s.epoch, s.partition), deque(maxlen=event_memory))
                if s.event in mem:
                    s.duplicate = True
                    continue
                mem.append(s.event)
            out.setdefault((s.partition, s.user), []).append(s)
        return out

    def ends(self, epoch: int) -> dict[int, int]:
        """Last delivered offset + 1 per partition in one broker epoch (what must end up committed)."""
        out: dict[int, int] = {}
        for s in self.delivered():
            if s.epoch == epoch:
                out[s.partition] = max(out.get(s.partition, 0), s.offset + 1)
        return out


def lcs_matched(want: list[int], have: list[int]) -> set[int]:
    """Indices of `want` matched by a longest common subsequence with `have`: the others were lost;
    len(have) - len(matched) items were applied twice (or from nowhere)."""
    n, m = len(want), len(have)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, nxt = table[i], table[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = nxt[j + 1] + 1 if want[i] == have[j] else max(nxt[j], row[j + 1])
    i = j = 0
    out: set[int] = set()
    while i < n and j < m:
        if want[i] == have[j]:
            out.add(i)
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


@dataclass
class WindowCheck:
    lost: list[Sent] = field(default_factory=list)
    applied_twice: int = 0
    extra: dict[tuple[int, str], int] = field(default_factory=dict)  # window -> items beyond the truth
    windows: int = 0
    differing: list[dict[str, Any]] = field(default_factory=list)  # a sample, for the report


def check_windows(client: Any, topic: str, truth: Truth, *, prefix: str = "mind") -> WindowCheck:
    """Compare every stored window with the delivered clicks (and look for windows nobody expects)."""

    state = WindowState(client, topic, WINDOW_LEN, prefix=prefix)
    want = truth.windows()
    keys = sorted(want)
    res = WindowCheck(windows=len(keys))
    for k in range(0, len(keys), 500):
        chunk = keys[k : k + 500]
        for key, have in zip(chunk, state.read_windows(chunk), strict=True):
            exp = want[key]
            items = [s.item for s in exp]
            if items == have:
                continue
            matched = lcs_matched(items, have)
            lost = [s for i, s in enumerate(exp) if i not in matched]
            res.lost.extend(lost)
            res.applied_twice += len(have) - len(matched)
            if len(have) > len(matched):
                res.extra[key] = len(have) - len(matched)
            if len(res.differing) < 20:
                res.differing.append(
                    {
                        "partition": key[0],
                        "user": key[1],
                        "want": len(items),
                        "have": len(have),
                        "lost": len(lost),
                    }
                )
    seen = {state.window_key(p, u) for p, u in keys}
    for raw in client.scan_iter(match=f"{prefix}:{{{topic}.*}}:win:*", count=1000):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        if name not in seen:  # a window no delivered click should have made
            n = int(client.llen(name))
            res.applied_twice += n
            if len(res.differing) < 20:
                res.differing.append({"key": name, "want": 0, "have": n, "lost": 0})
    return res


def cover_times(truth: Truth, records: Iterable[tuple[float, str, int, str, str]]) -> dict[int, float]:
    """seq -> unix time of the first recall message consumed that covers the click: one for the same
    user whose triggering message is this click or one published after it (a user's messages share a
    key, so publish order is offset order; the worker coalesces a user's clicks in a batch, and a later
    refresh includes the click). records: (receive time, user, trigger seq, model v, index v).
    Clicks without one are absent."""
    by_user: dict[str, list[tuple[int, float]]] = {}
    for recv, user, seq, _, _ in records:
        by_user.setdefault(user, []).append((seq, recv))
    suffix: dict[str, tuple[list[int], list[float]]] = {}
    for user, recs in by_user.items():
        recs.sort()
        seqs = [q for q, _ in recs]
        best, mins = float("inf"), [0.0] * len(recs)
        for i in range(len(recs) - 1, -1, -1):
            best = min(best, recs[i][1])
            mins[i] = best
        suffix[user] = (seqs, mins)
    out: dict[int, float] = {}
    for s in truth.delivered():
        if s.user is None or s.item < 0 or s.broker_lost or s.user not in suffix:
            continue
        seqs, mins = suffix[s.user]
        i = bisect.bisect_left(seqs, s.seq)
        if i < len(seqs):
            out[s.seq] = mins[i]
    return out


# ---- the reader -----------------------------------------------------------------------------------------


class RecallReader:
    """Reads `recall` and the DLQ from the beginning on its own thread (manual assignment, 5 ms fetch
    waits), keeping (receive time, user, trigger position, model version, index version) per message."""

    def __init__(self, settings: Any, resolve: Callable[[str, float], Sent | None]) -> None:
        self.settings, self.resolve = settings, resolve
        # (receive time, user, triggering message's seq, model version, index version)
        self.records: list[tuple[float, str, int, str, str]] = []
        self.events: dict[str, int] = {}  # triggering event id -> recall messages seen
        self.dlq: list[dict[str, Any]] = []
        self.covered: dict[str, int] = {}  # user -> highest seq of a message that triggered a recall
        self.order: dict[str, list[tuple[int, float, float]]] = {}  # user -> order keys, in arrival order
        self.other = 0  # recall messages whose triggering event the publisher did not send
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._reset = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-reader", daemon=True)

    def _consumer(self) -> Any:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        s = self.settings
        c = Consumer(
            kafka_config(
                s,
                "consumer",
                **{
                    "group.id": f"chaos-reader-{uuid.uuid4().hex[:8]}",
                    "fetch.wait.max.ms": 5,
                    "log_level": 2,
                },
            )
        )
        c.assign(
            [TopicPartition(s.recall_topic, p, OFFSET_BEGINNING) for p in range(s.recall_partition_count)]
            + [TopicPartition(s.dlq_topic, p, OFFSET_BEGINNING) for p in range(s.dlq_partitions)]
        )
        return c

    def _run(self) -> None:
        c = self._consumer()
        try:
            while not self._stop.is_set():
                if self._reset.is_set():  # the broker restarted: its topics are new, read them anew
                    c.close()
                    c = self._consumer()
                    self._reset.clear()
                for m in available(c, 500, 0.05):
                    if m.error():
                        continue
                    now = time.time()
                    if m.topic() == self.settings.dlq_topic:
                        self.dlq.append(orjson.loads(m.value()))
                        continue
                    r = orjson.loads(m.value())
                    eid = str(r.get("event_id", ""))
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        self.order.setdefault(str(r["user_id"]), []).append(order_key(r))
                    self.events[eid] = self.events.get(eid, 0) + 1
                    sent = self.resolve(eid, now)
                    if sent is None or sent.user != r.get("user_id"):
                        self.other += 1
                        continue
                    self.records.append(
                        (now, sent.user, sent.seq, str(r["model_version"]), str(r["index_version"]))
                    )
                    if sent.seq > self.covered.get(sent.user, -1):
                        self.covered[sent.user] = sent.seq
        except Exception as exc:  # noqa: BLE001 - reported in chaos.json; the run goes on without it
            self.errors.append(repr(exc))
        finally:
            c.close()

    def start(self) -> RecallReader:
        self._thread.start()
        return self

    def reset(self) -> None:
        self._reset.set()
        deadline = time.monotonic() + 30
        while self._reset.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def since(self, t: float) -> int:
        """Recall messages received after unix time t."""
        return sum(1 for r in reversed(self.records) if r[0] > t) if self.records else 0

    def first_after(self, t: float) -> float | None:
        for r in self.records:  # receive times are increasing
            if r[0] > t:
                return r[0]
        return None


# ---- the publisher --------------------------------------------------------------------------------------


@dataclass
class Hostile:
    """One hostile message as the publisher sends it, and what must become of it (harness/hostile.py)."""

    key: bytes | None
    value: bytes | None
    expect: str  # dlq | handled
    reason: str = ""  # dlq: the error code; handled: applied | oov
    user: str | None = None  # handled: the window it joins
    item: int = -1  # handled: the model index it appends
    event_id: str = ""  # handled: the event id its recall message will carry
    category: str = ""


class Publisher:
    """Synthetic users' clicks at a steady rate (own thread, idempotent producer), hostile messages
    interleaved on request; every message recorded in `truth` with its delivery report."""

    def __init__(
        self,
        settings: Any,
        truth: Truth,
        *,
        rate: float,
        users: int,
        sequences: list[np.ndarray],
        raw_of: Callable[[int], str],
        tag: str,
        seed: int,
    ) -> None:
        self.settings, self.truth, self.rate, self.tag = settings, truth, rate, tag
        self.sequences, self.raw_of = sequences, raw_of
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self._next_user = 0
        self.pool: list[list[Any]] = [self._new_user() for _ in range(users)]  # [id, sequence, clicks]
        self.retired: dict[str, int] = {}  # users past USER_CAP -> their clicks
        self.by_event: dict[str, list[Sent]] = {}  # event id -> the messages that carried it
        self.user_seqs: dict[str, list[int]] = {}  # replay user -> seqs of its clicks
        self.hostile: deque[Hostile] = deque()
        self.hostile_per_click = 1
        self.recent: deque[tuple[bytes, bytes, Sent]] = deque(maxlen=5000)  # (key, value, sent) of clicks
        self._resend: deque[tuple[bytes, bytes, Sent]] = deque()
        self.errors: list[str] = []
        self._producer: Any = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-publisher", daemon=True)

    def _new_user(self) -> list[Any]:
        k = self._next_user
        self._next_user += 1
        seq = self.sequences[int(self.rng.integers(len(self.sequences)))]
        return [f"c{k}", seq, 0]

    def _make_producer(self) -> Any:
        from confluent_kafka import Producer

        return Producer(kafka_config(self.settings, "producer", **{"linger.ms": 2, "log_level": 2}))

    def _report(self, sent: Sent) -> Callable[[Any, Any], None]:
        def done(err: Any, msg: Any) -> None:
            if err is None:
                sent.partition, sent.offset = msg.partition(), msg.offset()
            else:
                sent.failed = True
                self.errors.append(str(err))

        return done

    def _produce(self, key: bytes | None, value: bytes | None, sent: Sent) -> None:
        while True:
            try:
                self._producer.produce(
                    self.settings.clicks_topic, key=key, value=value, on_delivery=self._report(sent)
                )
                return
            except BufferError:
                self._producer.poll(0.05)

    def _click(self) -> None:

        i = int(self.rng.integers(len(self.pool)))
        user = self.pool[i]
        uid, seq, pos = user
        item = int(seq[pos % len(seq)])
        now = time.time()
        eid = f"{self.tag}-{uid}-{pos}"
        value = dump_click(Click(eid, uid, self.raw_of(item), now))
        sent = self.truth.add(t=now, epoch=self.epoch, user=uid, pos=pos, item=item, event=eid)
        self.by_event[eid] = [sent]  # known before it is sent: the reader may see its recall at once
        self.user_seqs.setdefault(uid, []).append(sent.seq)
        self._produce(uid.encode(), value, sent)
        self.recent.append((uid.encode(), value, sent))
        user[2] = pos + 1
        if pos + 1 >= USER_CAP:
            self.retired[uid] = pos + 1
            self.pool[i] = self._new_user()

    def resend(self, n: int) -> int:
        """Publish the last n delivered clicks again, byte for byte, as a producer that retried without
        idempotence would: same key, same event id, new offsets. Returns how many were queued."""
        picked = [r for r in list(self.recent) if r[2].partition >= 0][-n:]
        self._resend.extend(picked)
        return len(picked)

    def _again(self, key: bytes, value: bytes, first: Sent) -> None:
        sent = self.truth.add(
            t=time.time(),
            epoch=self.epoch,
            user=first.user,
            pos=-1,
            item=first.item,
            expect="duplicate",
            chaos=False,
            event=first.event,
        )
        self._produce(key, value, sent)

    def _bad(self, h: Hostile) -> None:
        sent = self.truth.add(
            t=time.time(),
            epoch=self.epoch,
            user=h.user,
            pos=-1,
            item=h.item,
            expect=h.expect,
            reason=h.reason,
            chaos=False,
            event=h.event_id,
        )
        if h.event_id:
            self.by_event.setdefault(h.event_id, []).append(sent)
        self._produce(h.key, h.value, sent)

    def _run(self) -> None:
        self._producer = self._make_producer()
        period = 1.0 / self.rate
        due = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._paused.is_set():
                    self._idle.set()
                    time.sleep(0.005)
                    due = time.monotonic()
                    continue
                now = time.monotonic()
                if now < due:
                    self._producer.poll(min(due - now, 0.01))
                    continue
                due = max(due + period, now - 1.0)  # steady; never a burst of more than a second
                self._click()
                for _ in range(self.hostile_per_click):
                    if not self.hostile:
                        break
                    self._bad(self.hostile.popleft())
                for _ in range(min(len(self._resend), 20)):  # re-sent clicks, interleaved with new ones
                    self._again(*self._resend.popleft())
                self._producer.poll(0)
        except Exception as exc:  # noqa: BLE001 - reported; the checks then show what was not sent
            self.errors.append(repr(exc))
        finally:
            self._idle.set()
            with contextlib.suppress(Exception):
                self._producer.flush(10)

    def resolve(self, event_id: str, received: float) -> Sent | None:
        """The message whose click triggered a recall message. An event id sent twice (the hostile
        corpus's duplicates) resolves to the latest one published before the recall arrived."""
        sents = self.by_event.get(event_id)
        if not sents:
            return None
        before = [x for x in sents if x.t <= received]
        return before[-1] if before else sents[0]

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def pause(self, flush_s: float = 15.0) -> int:
        """Stop sending; wait for the delivery reports; returns how many stayed undelivered."""
        self._paused.set()
        if self._thread.is_alive():
            self._idle.clear()
            self._idle.wait(10)
        return int(self._producer.flush(flush_s)) if self._producer is not None else 0

    def new_epoch(self) -> None:
        """After a broker restart: a new producer (the old one's idempotence state belongs to the old
        broker); whatever the old one still held is marked failed."""
        assert self._paused.is_set()
        for s in self.truth.sent:
            if s.epoch == self.epoch and s.partition < 0:
                s.failed = True
        self.epoch += 1
        self._producer = self._make_producer()

    def resume(self) -> None:
        self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# ---- the workers ----------------------------------------------------------------------------------------


@dataclass
class Proc:
    wid: int
    popen: subprocess.Popen[bytes]
    log: Path
    hook: str | None
    started: float
    fate: str = "running"  # running | killed | hook | stopped | crashed | stalled
    read_at: int = 0  # how far group_state has read its log
    group: tuple[str | None, float] = (None, 0.0)  # last group event and its unix time


class Workers:
    """Worker processes (`python -m stream.worker`), each in its own session with its own log. Every exit
    is classified: killed (by us), hook (its fault hook fired), stopped (SIGTERM, exit 0), crashed."""

    def __init__(self, config: Path, checkpoint: Path, log_dir: Path) -> None:
        self.config, self.checkpoint, self.log_dir = config, checkpoint, log_dir
        self.procs: list[Proc] = []
        self.crashes: list[dict[str, Any]] = []
        self.hook_deaths: dict[str, int] = {}

    def spawn(self, hook: str | None = None, stop_at: str | None = None) -> Proc:
        """A worker process; `hook` kills it at a stage point, `stop_at` freezes it there (a zombie)."""
        wid = len(self.procs)
        log = self.log_dir / f"worker-{wid}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIND_")}  # the config file rules
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        if hook:
            entry = ["-m", "harness.faulty_worker", "--kill-at", hook]
        elif stop_at:
            entry = ["-m", "harness.faulty_worker", "--stop-at", stop_at]
        else:
            entry = ["-m", "stream.worker"]
        with open(log, "wb") as f:
            popen = subprocess.Popen(
                [sys.executable, *entry, "--config", str(self.config)]
                + ["--checkpoint", str(self.checkpoint)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        p = Proc(wid, popen, log, hook, time.time())
        p.group = (None, p.started)
        self.procs.append(p)
        return p

    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.fate == "running"]

    def ready(self, p: Proc) -> bool:
        """Joined the group: it logged an assignment."""
        return self.group_state(p)[0] is not None

    def group_state(self, p: Proc) -> tuple[str | None, float]:
        """The worker's last group event ("partitions assigned" / "partitions revoked") and its unix time;
        (None, start time) before any. Reads only what the log gained since the last call."""
        try:
            with open(p.log, "rb") as f:
                f.seek(p.read_at)
                chunk = f.read()
        except OSError:
            return p.group
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        p.read_at += end
        for line in chunk[:end].splitlines():
            if b'"partitions assigned"' in line or b'"partitions revoked"' in line:
                with contextlib.suppress(ValueError, KeyError):
                    d = orjson.loads(line)
                    ts = datetime.fromisoformat(str(d["timestamp"]).replace("Z", "+00:00")).timestamp()
                    p.group = (str(d["event"]), ts)
        return p.group

    def restart_stalled(self, p: Proc) -> None:
        """SIGTERM (it leaves the group), SIGKILL after 15 s; not a crash, not a kill: a group stall."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.popen.pid, signal.SIGTERM)
        try:
            p.popen.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.popen.pid, signal.SIGKILL)
            p.popen.wait(10)
        p.fate = "stalled"

    def check(self) -> list[Proc]:
        """Classify workers that exited by themselves; returns them."""
        out = []
        for p in self.alive():
            rc = p.popen.poll()
            if rc is None:
                continue
            if rc == -signal.SIGKILL and p.hook:
                p.fate = "hook"
                stage, _, rest = p.hook.partition(":")
                point = stage + (":exit" if rest.endswith(":exit") else "")
                self.hook_deaths[point] = self.hook_deaths.get(point, 0) + 1
            else:
                p.fate = "crashed"
                self.crashes.append({"worker": p.wid, "exit": rc, "log": str(p.log), "tail": _tail(p.log)})
            out.append(p)
        return out

    def kill(self, p: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.popen.pid, signal.SIGKILL)
        p.popen.wait(10)
        if p.fate == "running":
            p.fate = "killed"

    def term(self, *procs: Proc, timeout_s: float = 45.0) -> None:
        """SIGTERM (graceful: finish the batch, commit, leave the group) to all at once, then wait for
        each; a non-zero exit is a crash."""
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.popen.pid, signal.SIGTERM)
        for p in procs:
            self._reap(p, timeout_s)

    def _reap(self, p: Proc, timeout_s: float) -> int | None:
        try:
            rc = p.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(p)
            self.crashes.append({"worker": p.wid, "exit": "did not stop on SIGTERM", "tail": _tail(p.log)})
            p.fate = "crashed"
            return None
        if rc == 0:
            p.fate = "stopped"
        else:
            p.fate = "crashed"
            self.crashes.append({"worker": p.wid, "exit": rc, "log": str(p.log), "tail": _tail(p.log)})
        return rc

    def stop_all(self) -> None:
        """Whatever is left (finally blocks): SIGKILL of each worker's process group."""
        for p in self.procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(10)
                if p.fate == "running":
                    p.fate = "killed"


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---- the run --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class Chaos:
    """One chaos run on a started stack: the phases, then the checks (`report`)."""

    def __init__(
        self,
        stack: Any,
        settings: Any,
        checkpoint: Path,
        inter: Any,
        plan: Plan,
        run_dir: Path,
        *,
        seed: int = 0,
        echo: Callable[[str], None] = print,
        progress: bool = True,
        roll_checkpoint: Path | None = None,
    ) -> None:

        self.stack, self.settings, self.checkpoint, self.plan = stack, settings, checkpoint, plan
        self.run_dir, self.echo, self.progress = run_dir, echo, progress
        self.roll_checkpoint = roll_checkpoint
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.tag = f"chaos{uuid.uuid4().hex[:6]}"
        self.catalog = load_catalog(checkpoint)
        self.truth = Truth()
        self.phases: list[Phase] = []
        self.notes: list[str] = []
        self.kills: dict[str, int] = {"random": 0}
        self.pending_hooks: deque[str] = deque()
        self.target = plan.workers
        self.outages: dict[str, dict[str, Any]] = {}
        self.stalls: list[dict[str, Any]] = []
        self.samples: list[tuple[float, int, int]] = []  # (s since start, messages sent, clicks behind)
        self.t0 = time.time()
        self._watch_at = 0.0
        self.final_committed: dict[int, int] = {}
        self.extra: dict[str, Any] = {}
        self.zombies: list[dict[str, Any]] = []
        # the workers reach Triton, Milvus and the key-value store through proxies, which can slow them
        # down or drop their connections; everything else (checks, the roll) talks to the servers
        self.proxies = {
            name: Proxy(*_host_port(url), seed=seed).start()
            for name, url in (
                ("triton", settings.triton_url),
                ("milvus", settings.milvus_uri),
                ("redis", settings.redis_url),
            )
        }
        via = settings.model_copy(
            update={
                "triton_url": self.proxies["triton"].address,
                "milvus_uri": f"http://{self.proxies['milvus'].address}",
                "redis_url": f"redis://{self.proxies['redis'].address}/0",
            }
        )
        config = run_dir / "worker.json"
        config.write_bytes(orjson.dumps(worker_config(via, plan, checkpoint), option=orjson.OPT_INDENT_2))
        log_dir = run_dir / "workers"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = Workers(config, checkpoint, log_dir)
        seqs = [np.asarray(s, dtype=np.int64) for s in inter.sequences if len(s)]
        self.publisher = Publisher(
            settings,
            self.truth,
            rate=plan.rate,
            users=plan.users,
            sequences=seqs,
            raw_of=inter.items.raw_of,
            tag=self.tag,
            seed=seed,
        )
        self.reader = RecallReader(settings, self.publisher.resolve)

    # -- helpers --

    def _tick(self) -> None:
        """Classify exits, restart workers a group rebalance left without partitions, and keep `target`
        workers running (replacements take the next queued hook)."""
        self.workers.check()
        now = time.monotonic()
        if now - self._watch_at >= 1.0:
            self._watch_at = now
            self._watchdog()
            self._sample()
        while len(self.workers.alive()) < self.target:
            self.workers.spawn(self.pending_hooks.popleft() if self.pending_hooks else None)

    def _sample(self) -> None:
        """Backlog: the replay's clicks published and not yet covered by a recall message (those of each
        user published after the last message that triggered one)."""
        covered = self.reader.covered
        behind = sum(
            len(q) - bisect.bisect_right(q, covered.get(u, -1))
            for u, q in list(self.publisher.user_seqs.items())
        )
        self.samples.append((round(time.time() - self.t0, 1), len(self.truth.sent), behind))

    def _watchdog(self) -> None:
        """Tansu 0.6's group coordinator sometimes never finishes a rebalance (seen when two members leave
        at once; tests/stream/test_worker.py saw it after one left): the remaining members wait for an
        assignment forever. Apache Kafka ends the round after the rebalance timeout. Here a worker left
        revoked (or never assigned) for `stall_s` is restarted, and each such stall is reported."""
        t = time.time()
        for p in self.workers.alive():
            event, since = self.workers.group_state(p)
            if event == "partitions assigned" or t - since < self.plan.stall_s:
                continue
            if event is None and t - p.started < 3 * self.plan.stall_s:  # still starting
                continue
            self.stalls.append(
                {"worker": p.wid, "state": event or "never assigned", "for_s": round(t - since, 1)}
            )
            self.echo(f"  ! worker {p.wid} without partitions for {t - since:.0f} s: restarted (group stall)")
            self.workers.restart_stalled(p)

    def _wait(self, cond: Callable[[], bool], timeout_s: float, what: str) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self._tick()
            if cond():
                return True
            if time.monotonic() > deadline:
                self.notes.append(f"timed out after {timeout_s:g} s waiting for {what}")
                self.echo(f"  ! timed out waiting for {what}")
                return False
            time.sleep(0.05)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._tick()
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def _assigned_since(self, t: float) -> Callable[[], bool]:
        """Done when every live worker's last group event is an assignment received after t."""

        def done() -> bool:
            states = [self.workers.group_state(p) for p in self.workers.alive()]
            return bool(states) and all(e == "partitions assigned" and ts >= t for e, ts in states)

        return done

    def _all_ready(self) -> bool:
        alive = self.workers.alive()
        return len(alive) >= self.target and all(self.workers.ready(p) for p in alive)

    def _covered_until(self, t: float) -> Callable[[], bool]:
        """Done when every click published before t (and not lost with the broker) has a recall."""
        want: dict[str, int] = {}
        for x in list(self.truth.sent):
            if x.t <= t and x.user is not None and x.item >= 0 and not (x.failed or x.broker_lost):
                want[x.user] = max(want.get(x.user, -1), x.seq)
        return lambda: all(self.reader.covered.get(u, -1) >= q for u, q in want.items())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        ph = Phase(name, time.time())
        self.phases.append(ph)
        t0 = time.monotonic()
        try:
            yield ph
        finally:
            ph.end = time.time()
            self.echo(f"  {name} done in {time.monotonic() - t0:.1f} s")

    # -- phases --

    def warmup(self) -> None:
        with self.phase("warmup"):
            self.reader.start()
            self._tick()
            self.publisher.start()
            self._wait(self._all_ready, 120, "the first workers to join")
            self._wait(lambda: len(self.reader.records) > 0, 120, "the first recall message")
            self._sleep(self.plan.warmup_s)

    def crash(self) -> None:
        """Kills at random moments, alternating with deaths at a hook point; each worker replaced."""
        from tqdm import tqdm

        n = self.plan.kills
        points = [HOOK_POINTS[i % len(HOOK_POINTS)] for i in range(n // 2)]
        self.rng.shuffle(points)
        kinds = ["random", "hook"] * len(points) + ["random"] * (n - 2 * len(points))
        bar = tqdm(total=n, desc="  kill -9", disable=not self.progress, leave=False)
        with self.phase("crash") as ph:
            for k, kind in enumerate(kinds):
                if kind == "random":
                    self._wait(self._all_ready, 60, "workers to join before a kill")
                    victims = [p for p in self.workers.alive() if not p.hook] or self.workers.alive()
                    victim = victims[int(self.rng.integers(len(victims)))]
                    self._sleep(float(self.rng.uniform(0.1, 1.5)))  # a random moment of its work
                    if k + 1 < len(kinds) and kinds[k + 1] == "hook":  # the replacement dies at a point
                        stage, _, at_exit = points.pop().partition(":")
                        nth = int(self.rng.integers(1, 6))
                        self.pending_hooks.append(f"{stage}:{nth}" + (":exit" if at_exit else ""))
                    if victim.fate == "running":
                        self.workers.kill(victim)
                        self.kills["random"] += 1
                    self._tick()
                else:
                    hooked = [p for p in self.workers.alive() if p.hook]
                    if hooked and not self._wait(
                        lambda p=hooked[0]: p.fate != "running", 60, f"hook {hooked[0].hook} to fire"
                    ):
                        self.workers.kill(hooked[0])
                        self.kills["random"] += 1
                bar.update(1)
            bar.close()
            self._wait(self._all_ready, 60, "workers to join after the kills")
            for hook, c in self.workers.hook_deaths.items():
                self.kills[f"hook {hook}"] = c
            ph.info = {"kills": dict(self.kills)}

    def _outage_result(self, name: str, t_down: float, t_back: float, ph: Phase) -> dict[str, Any]:
        first = None
        if self._wait(lambda: self.reader.first_after(t_back) is not None, self.plan.recover_timeout_s, name):
            first = self.reader.first_after(t_back)
        self._wait(self._covered_until(t_back), self.plan.recover_timeout_s, f"{name}: backlog")
        self.echo(
            f"  {name}: back after {t_back - t_down:.1f} s; first recall "
            + (f"{first - t_back:.2f} s later" if first is not None else "never")
        )
        return {
            "down_s": round(t_back - t_down, 2),
            "recovery_s": round(first - t_back, 2) if first is not None else None,
            "_t": (t_down, t_back),
            "phase": ph.name,
        }

    def outage(self, name: str, down_s: float) -> None:
        """Stop one server for down_s, start it again (same address, same data directory)."""
        with self.phase(f"outage {name}") as ph:
            self._wait(self._all_ready, 60, "workers before the outage")
            crashes = len(self.workers.crashes)
            t0 = time.time()
            self.stack.launchers[name].stop()
            t_down = time.time()
            self._sleep(down_s)
            alive_during = len(self.workers.alive())
            start_service(self.stack, name)
            t_back = time.time()
            res = self._outage_result(name, t0, t_back, ph)
            res.update(stop_s=round(t_down - t0, 2), workers_alive_during=alive_during)
            res["worker_crashes"] = len(self.workers.crashes) - crashes
            self.outages[name] = res
            self._sleep(self.plan.settle_s)

    def slow_dependency(self, name: str) -> None:
        """The dependency's proxy first holds every chunk 50-200 ms (slow_s), then drops every connection
        and refuses new ones (drop_s); each is an entry under `outages` with latency, recovery and loss."""
        px = self.proxies[name]
        lo, hi = self.plan.slow_ms
        with self.phase(f"outage slow {name}") as ph:
            self._wait(self._all_ready, 60, f"workers before {name} slows down")
            crashes = len(self.workers.crashes)
            t0 = time.time()
            px.slow(lo, hi)
            self._sleep(self.plan.slow_s)
            px.heal()
            res = self._outage_result(f"slow {name}", t0, time.time(), ph)
            res.update(fault=f"{lo:g}-{hi:g} ms per chunk, each direction", worker_crashes=0)
            res["worker_crashes"] = len(self.workers.crashes) - crashes
            self.outages[f"slow {name}"] = res
            self._sleep(self.plan.settle_s)
        with self.phase(f"outage dropped {name}") as ph:
            self._wait(self._all_ready, 60, f"workers before {name}'s connections drop")
            crashes = len(self.workers.crashes)
            t0 = time.time()
            px.drop(self.plan.drop_s)
            self._sleep(self.plan.drop_s)
            px.heal()
            res = self._outage_result(f"dropped {name}", t0, time.time(), ph)
            res.update(fault="connections closed and refused", refused=px.refused)
            res["worker_crashes"] = len(self.workers.crashes) - crashes
            self.outages[f"dropped {name}"] = res
            self._sleep(self.plan.settle_s)

    def zombie(self) -> None:
        """A worker frozen mid-batch (SIGSTOP at a stage) for longer than the session timeout: the group
        moves its partitions to the others, which process newer clicks; then it wakes up (SIGCONT) and
        finishes its stale batch. Its late writes must not overwrite anything: checked in `report`."""
        session_s = self.plan.session_timeout_ms / 1000
        with self.phase("zombie") as ph:
            for stage in self.plan.zombie_stages:
                self._wait(self._all_ready, 60, "workers before a zombie")
                self.target += 1  # the zombie is one more member
                p = self.workers.spawn(stop_at=f"{stage}:{int(self.rng.integers(1, 4))}")
                frozen = self._wait(lambda p=p: _stopped(p.popen.pid), 90, f"a zombie to freeze at {stage}")
                t_stop = time.time()
                entry: dict[str, Any] = {"stage": stage, "froze": frozen}
                if frozen:
                    # the others hold every partition again, then answer clicks newer than the freeze
                    others = [w for w in self.workers.alive() if w is not p]
                    took_over = self._wait(
                        lambda o=others, t=t_stop: all(
                            self.workers.group_state(w)[0] == "partitions assigned"
                            and self.workers.group_state(w)[1] > t
                            for w in o
                        ),
                        max(30.0, 10 * session_s),
                        "the group to move the zombie's partitions",
                    )
                    self._wait(
                        lambda t=t_stop + session_s: self.reader.since(t) > 0,
                        60,
                        "recall messages of the new owners",
                    )
                    self._sleep(max(0.0, session_s + 1.0 - (time.time() - t_stop)))
                    paused = time.time() - t_stop
                    os.kill(p.popen.pid, signal.SIGCONT)
                    entry.update(paused_s=round(paused, 2), partitions_moved=took_over)
                    self._sleep(self.plan.settle_s)  # it finishes its stale batch, is refused, rejoins
                self.workers.term(p)
                self.target -= 1
                self.zombies.append(entry)
                self._wait(self._all_ready, 60, "workers after a zombie")
            ph.info = {"pauses": self.zombies}

    def duplicate_events(self) -> None:
        """A producer that retried without idempotence: already-delivered clicks published again, byte for
        byte, at new offsets. Each event must stay in its window once (checked in `report`)."""
        with self.phase("duplicate events") as ph:
            self._wait(self._all_ready, 60, "workers before the duplicates")
            n = self.publisher.resend(self.plan.duplicates)
            self._wait(lambda: not self.publisher._resend, 120, "the duplicates to be published")
            self._sleep(self.plan.settle_s)
            ph.info = {"resent": n}
            self.extra["duplicates"] = n

    def broker_stall(self) -> None:
        """The embedded Tansu stops serving a partition whose record batches take longer to list than the
        fetch wait (about 22k at 10 ms). A worker of its own, on a topic of its own with a 1 ms fetch wait,
        is driven into it: its /readyz must fail with the reason, and the stall be counted.

        How many batches it takes depends on the machine (a faster one lists more within the wait): when
        the worker reads the whole partition, the next attempt starts over on a new topic with twice as
        many, up to stall_max_batches."""
        with self.phase("broker stall") as ph:
            attempts: list[dict[str, Any]] = []
            n = self.plan.stall_batches
            res: dict[str, Any] = {}
            while True:
                res = self._stall_attempt(len(attempts), n)
                attempts.append({k: res[k] for k in ("batches", "fill_s", "detected", "caught_up")})
                if res["detected"] or n * 2 > self.plan.stall_max_batches:
                    break
                n *= 2
            res["attempts"] = attempts
            self.outages["broker stall"] = res
            ph.info = res

    def _stall_attempt(self, attempt: int, batches: int) -> dict[str, Any]:
        """Fill a fresh one-partition topic with `batches` one-message record batches, start a worker on it,
        and wait until its /readyz reports the stall or it has read every click."""
        tag = f"{self.tag}-stall{attempt}"
        ws = fresh_topics(
            self.settings,
            tag,
            partitions=1,
            fetch_wait_max_ms=1,
            fetch_stall_s=3.0,
            metrics_port=free_port(),
            window_len=WINDOW_LEN,
            log_json=True,
        )
        ensure_topics(AdminClient(kafka_config(ws, "admin")), ws)
        producer = Producer(kafka_config(ws, "producer", **{"linger.ms": 0}))
        users = [u for u, *_ in self.publisher.pool[:20]]
        item = self.catalog.raw_item(2)
        t0 = time.time()
        for k in range(batches):
            c = Click(f"{tag}-{k}", users[k % len(users)], item, time.time())
            producer.produce(ws.clicks_topic, dump_click(c), c.user_id.encode())
            producer.flush(10)  # one record batch per click
        t_filled = time.time()
        proc: WorkerProc = spawn_worker(self.checkpoint)(ws, self.run_dir / "workers" / f"{tag}-worker.log")
        ready: dict[str, Any] = {}
        caught_up = False

        def stalled_or_done() -> bool:
            nonlocal ready, caught_up
            caught_up = proc.scrape().get("mind_worker_clicks_total", 0.0) >= batches
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ws.metrics_port}/readyz", timeout=2):
                    return caught_up
            except urllib.error.HTTPError as exc:
                ready = orjson.loads(exc.read())
                return bool(ready.get("checks", {}).get("stalled")) or caught_up
            except OSError:
                return False

        self._wait(stalled_or_done, 120, "the stall worker to stall or read its partition")
        seen = bool(ready.get("checks", {}).get("stalled"))
        t_seen = time.time()
        metrics_now = proc.scrape()
        proc.stop()
        return {
            "batches": batches,
            "fetch_wait_max_ms": 1,
            "fill_s": round(t_filled - t0, 2),
            "detected": seen,
            "caught_up": caught_up and not seen,
            "detected_after_s": round(t_seen - t_filled, 2) if seen else None,
            "readyz": ready.get("checks", {}).get("stalled"),
            "stalls_counted": metrics_now.get("mind_worker_partition_stalls_total"),
            "clicks_waiting_in_the_log": batches - int(metrics_now.get("mind_worker_clicks_total", 0.0)),
            "lost": 0,  # nothing is lost: the clicks stay in the log, the worker waits and says so
        }

    def broker_restart(self) -> None:
        """The broker killed mid-stream and started again, with the runbook memory storage forces:
        workers stopped (kill -9), state offsets read (clicks above them never applied: lost with the
        log) and reset to -1 for the new log, workers started again."""

        s = self.settings
        with self.phase("outage kafka") as ph:
            self._wait(self._all_ready, 60, "workers before the broker restart")
            crashes = len(self.workers.crashes)
            undelivered = self.publisher.pause()  # a clean epoch boundary for the ground truth
            recall_before = len(self.reader.records)
            dlq_before = len(self.reader.dlq)
            t_down = time.time()
            self.stack.launchers["kafka"].kill()
            self._sleep(self.plan.broker_down_s)
            alive_during = len(self.workers.alive())
            self.target = 0
            for p in self.workers.alive():
                self.workers.kill(p)
            client = redis_client(s)
            try:
                state = WindowState(client, s.clicks_topic, WINDOW_LEN)
                stored = state.offsets(list(range(s.partitions)))
                lost = 0
                for x in self.truth.sent:
                    if (
                        x.epoch == self.publisher.epoch
                        and x.partition >= 0
                        and x.offset > stored[x.partition]
                    ):
                        x.broker_lost = True
                        lost += 1
                start_service(self.stack, "kafka")
                t_back = time.time()
                for p in range(s.partitions):  # the runbook: the new log starts at offset 0
                    state.reset_offset(p, -1)
            finally:
                client.close()
            self.publisher.new_epoch()
            self.extra["broker_stored"] = (self.publisher.epoch, stored)
            self.reader.reset()
            self.target = self.plan.workers
            self._tick()
            self.publisher.resume()
            res = self._outage_result("kafka", t_down, t_back, ph)
            res.update(
                lost=lost,
                lost_what="clicks the broker had acknowledged but no worker had applied (memory storage)",
                undelivered_at_pause=undelivered,
                recall_messages_in_old_log=recall_before,
                dlq_records_in_old_log=dlq_before,
                workers_alive_during=alive_during,
                worker_crashes=len(self.workers.crashes) - crashes,
                runbook="workers kill -9, broker start, topics created, window offsets reset to -1, workers",
            )
            self.outages["kafka"] = res
            self._sleep(self.plan.settle_s)

    def rebalance(self) -> None:
        """2 -> 3 -> 1 workers while the stream runs: one joins, then two leave gracefully (SIGTERM); the
        last one takes every partition. The run goes on with that one worker."""
        with self.phase("rebalance") as ph:
            self._wait(self._all_ready, 60, "workers before the rebalance")
            sizes = [len(self.workers.alive())]
            t0 = time.time()
            self.target += 1
            self._tick()
            self._wait(self._all_ready, 60, "the added worker to join")
            t_join = time.time()
            sizes.append(len(self.workers.alive()))
            self._sleep(self.plan.rebalance_hold_s)
            leavers = self.workers.alive()[:-1]
            self.target = 1
            t1 = time.time()
            for p in leavers:  # one at a time: two LeaveGroups at once can stall Tansu's coordinator
                t_term = time.time()
                self.workers.term(p)
                self._wait(self._assigned_since(t_term), 30, "the group to settle after a leave")
            t_left = time.time()
            sizes.append(len(self.workers.alive()))
            self._wait(
                self._covered_until(t_left), self.plan.recover_timeout_s, "the last worker to catch up"
            )
            t_caught = time.time()
            self._sleep(self.plan.settle_s)
            ph.info = {
                "workers": sizes,
                "join_s": round(t_join - t0, 2),
                "leave_s": round(t_left - t1, 2),
                "takeover_s": round(t_caught - t_left, 2),
            }

    def roll(self) -> None:
        """A model roll (workflows/roll.py: export -> index -> Triton load -> flip) while the stream runs."""

        if self.roll_checkpoint is None or self.stack.model_repository is None:
            self.extra["roll"] = {"todo": "no second checkpoint or model repository to roll to"}
            return
        with self.phase("roll") as ph:
            before = sorted({r[3] for r in self.reader.records[-200:]})
            done: list[Any] = []

            def run() -> None:
                try:
                    done.append(
                        roll(
                            self.settings,
                            self.roll_checkpoint,
                            repo=self.stack.model_repository,
                            progress=False,
                        )
                    )
                except BaseException as exc:  # noqa: BLE001 - reported: the roll itself failed
                    done.append(exc)

            t0 = time.time()
            thread = threading.Thread(target=run, name="chaos-roll", daemon=True)
            thread.start()
            self._wait(lambda: bool(done), 600, "the roll")  # workers kept and checked meanwhile
            t_done = time.time()
            result = done[0] if done else TimeoutError("roll still running after 600 s")
            if isinstance(result, BaseException):
                self.extra["roll"] = {"error": repr(result)[:500], "from": before}
                self.echo(f"  roll failed: {result!r}")
                return
            new = str(result.model_version)
            n_before = len(self.reader.records)
            got = self._wait(
                lambda: any(r[3] == new for r in self.reader.records[n_before - 50 :]),
                self.plan.recover_timeout_s,
                "recall messages of the new version",
            )
            first_new = next((r[0] for r in self.reader.records if r[3] == new), None)
            self._sleep(self.plan.settle_s)
            ph.info = {
                "from": before,
                "to": new,
                "index_version": result.index_version,
                "roll_s": round(t_done - t0, 2),
                "steps_s": result.timings,
                "new_version_seen": got,
                "first_new_recall_after_roll_s": round(first_new - t_done, 2) if first_new else None,
            }
            self.extra["roll"] = ph.info

    def hostile(self) -> None:
        """The hostile corpus (harness/hostile.py) interleaved with the valid clicks."""
        users = sorted({u[0] for u in self.publisher.pool})
        cases = hostile_cases(self.plan.hostile, self.seed, self.catalog, users, self.settings)
        if isinstance(cases, str):
            self.extra["hostile"] = {"todo": cases}
            self.echo(f"  hostile input: TODO ({cases})")
            return
        with self.phase("hostile") as ph:
            self.publisher.hostile_per_click = self.plan.hostile_per_click
            self.publisher.hostile.extend(cases)
            self._wait(lambda: not self.publisher.hostile, 600, "the hostile corpus to be sent")
            self._sleep(self.plan.settle_s)
            ph.info = {"cases": len(cases)}

    def tail(self) -> None:
        """Stop publishing; wait until every click is covered and every offset committed; stop workers."""
        with self.phase("drain") as ph:
            undelivered = self.publisher.pause()
            self.publisher.stop()
            end = time.time()
            covered = self._wait(self._covered_until(end), self.plan.recover_timeout_s, "the final recalls")
            ends = self.truth.ends(self.publisher.epoch)
            committed_ok = self._wait(
                lambda: committed(self.settings, ends) == ends, self.plan.recover_timeout_s, "final commits"
            )
            self.final_committed = committed(self.settings, ends)
            want_dlq = sum(1 for x in self.truth.delivered() if x.expect == "dlq" and not x.broker_lost)
            self._wait(lambda: len(self.reader.dlq) >= want_dlq, 30, "the dead letters")
            self._sleep(1.0)  # late duplicates
            self.target = 0
            self.workers.term(*self.workers.alive())
            self.reader.stop()
            ph.info = {"covered": covered, "committed": committed_ok, "undelivered": undelivered}

    # -- the checks --

    def report(self) -> dict[str, Any]:

        s = self.settings
        client = redis_client(s)
        try:
            win = check_windows(client, s.clicks_topic, self.truth)
            stale = self._stale(WindowState(client, s.clicks_topic, WINDOW_LEN))
        finally:
            client.close()
        delivered = self.truth.delivered()
        chaos = [x for x in delivered if x.chaos and not x.broker_lost]
        clicks = [x for x in delivered if x.user is not None and x.item >= 0 and not x.broker_lost]
        covers = cover_times(self.truth, self.reader.records)
        missing = [x for x in clicks if x.seq not in covers]
        dup = sum(n - 1 for n in self.reader.events.values() if n > 1)
        mixed = sum(1 for r in self.reader.records if not _same_version(r[3], r[4]))

        def in_phase(t: float) -> str:
            for ph in self.phases:
                if ph.start <= t < (ph.end or float("inf")):
                    return ph.name
            return "between phases"

        # a click missing from its window is LOST when its offset was committed (or its log is gone);
        # one at or above the final committed offset was never processed (a stuck run, not a loss)
        epoch = self.publisher.epoch
        unprocessed = [
            x for x in win.lost if x.epoch == epoch and x.offset >= self.final_committed.get(x.partition, 0)
        ]
        pending = {x.seq for x in unprocessed}
        lost = [x for x in win.lost if x.seq not in pending]
        lost_by: dict[str, int] = {}
        for x in lost:
            lost_by[in_phase(x.t)] = lost_by.get(in_phase(x.t), 0) + 1
        part_of = {x.user: x.partition for x in chaos}
        for name, o in self.outages.items():
            o["lost"] = o.get("lost", 0) + lost_by.get(f"outage {name}", 0)
            if "_t" not in o:  # the broker stall: a worker of its own, nothing to time here
                continue
            t_down, t_back = o.pop("_t")
            # recovery: every partition answers again (each worker's clients reconnected), not only one
            first: dict[int, float] = {}
            for recv, user, *_ in self.reader.records:
                p = part_of.get(user, -1)
                if recv > t_back and p >= 0 and p not in first:
                    first[p] = recv
            o["recovery_s"] = round(max(first.values()) - t_back, 2) if first else None
            o["first_recall_s"] = round(min(first.values()) - t_back, 2) if first else None
            backlog = [covers[x.seq] for x in chaos if t_down <= x.t <= t_back and x.seq in covers]
            o["catch_up_s"] = round(max(backlog) - t_back, 2) if backlog else None
            o["backlog_clicks"] = len(backlog)  # published while it was down: answered during catch-up
            during = np.asarray(
                [covers[x.seq] - x.t for x in chaos if t_down <= x.t <= t_back and x.seq in covers]
            )
            o["p50_ms"] = round(float(np.percentile(during, 50)) * 1e3, 1) if len(during) else None
            o["p99_ms"] = round(float(np.percentile(during, 99)) * 1e3, 1) if len(during) else None
        if "broker_stored" in self.extra and "kafka" in self.outages:
            # what the runbook's offset reset saved: clicks of the new log at offsets the state had
            # already passed in the old one, which the window script would have skipped as re-deliveries
            epoch, stored = self.extra["broker_stored"]
            self.outages["kafka"]["skipped_without_offset_reset"] = sum(
                1 for x in delivered if x.epoch == epoch and x.item >= 0 and x.offset <= stored[x.partition]
            )
        latency = np.asarray([covers[x.seq] - x.t for x in chaos if x.seq in covers]) * 1e3
        dup_users = {(x.partition, x.user) for x in delivered if x.expect == "duplicate"}
        dup_applied = sum(n for key, n in win.extra.items() if key in dup_users)
        bad = self._bad_inputs()
        out: dict[str, Any] = {
            "kills": sum(self.kills.values()),
            "kills_by": dict(self.kills),
            "lost": len(lost),
            "unprocessed": len(unprocessed),
            "applied_twice": win.applied_twice,
            "missing_recall": len(missing),
            "duplicate_recalls": dup,
            "mixed_versions": mixed,
            "stale_overwrites": stale["stale_overwrites"],
            "stale": stale,
            "zombies": self.zombies,
            "duplicate_events_sent": sum(1 for x in delivered if x.expect == "duplicate"),
            "duplicate_events_applied": dup_applied,
            "bad_inputs": bad.get("sent", 0),
            "worker_crashes": len(self.workers.crashes),
            "outages": self.outages,
            "rebalance": next((p.info for p in self.phases if p.name == "rebalance"), {}),
            "roll": self.extra.get("roll", {}),
            "hostile": bad,
            "clicks": {
                "published": len([x for x in delivered if x.chaos]),
                "failed_to_publish": sum(1 for x in self.truth.sent if x.failed),
                "lost_with_the_broker": sum(1 for x in self.truth.sent if x.broker_lost),
                "windows_checked": win.windows,
                "lost_by_phase": lost_by,
            },
            "recall_messages": len(self.reader.records) + self.reader.other,
            "versions_seen": sorted({r[3] for r in self.reader.records}),
            "latency_ms": {
                "p50": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
                "p99": round(float(np.percentile(latency, 99)), 1) if len(latency) else None,
                "max": round(float(latency.max()), 1) if len(latency) else None,
            },
            "worker_processes": len(self.workers.procs),
            "group_stalls": self.stalls,
            "backlog": {
                "max": max((b for *_, b in self.samples), default=0),
                "series": self.samples[:: max(1, len(self.samples) // 300)],  # (s, sent, clicks behind)
            },
            "crashes": self.workers.crashes,
            "missing_sample": [asdict(x) for x in missing[:10]],
            "windows_differing": win.differing,
            "phases": {
                p.name: {"seconds": round(p.end - p.start, 1), **p.info} for p in self.phases if p.end
            },
            "notes": self.notes + self.publisher.errors[:5] + self.reader.errors,
        }
        return out

    def _stale(self, state: WindowState) -> dict[str, Any]:
        """Writes a zombie could have left behind, per user that got recall messages: interest vectors
        whose stored fence is older than the newest recall message's (the fenced write was overtaken), and
        the view's choice (its `order_key` rule replayed over the messages in arrival order) being older
        than the newest. `last_written_older` counts users whose LAST message on the topic is not the
        newest: what a reader of the compacted topic that keeps the last write would hold; the fence is
        there for it."""
        part_of = {x.user: x.partition for x in self.truth.delivered() if x.chaos and x.user}
        interests = view = last = late = 0
        sample: list[dict[str, Any]] = []
        users = [u for u in self.reader.order if u in part_of]
        for u in users:
            keys = self.reader.order[u]
            newest = max(keys)
            kept = keys[0]
            for k in keys[1:]:
                if not kept > k:  # the view replaces unless the new message is older
                    kept = k
            view += int(kept[0] < newest[0])
            top = keys[0][0]
            for k in keys[1:]:
                late += int(k[0] < top)
                top = max(top, k[0])
            last += int(keys[-1][0] < newest[0])
            got = state.read_interests(part_of[u], u)
            if got is None or got[3] < newest[0]:
                interests += 1
                if len(sample) < 10:
                    sample.append(
                        {"user": u, "stored_fence": None if got is None else got[3], "newest": newest[0]}
                    )
        return {
            "stale_overwrites": interests + view,
            "interests": interests,
            "view": view,
            "last_written_older": last,
            "late_messages": late,  # arrived after a newer one for the same user (a zombie's, a retry's)
            "users_checked": len(users),
            "sample": sample,
        }

    def _bad_inputs(self) -> dict[str, Any]:
        """Each hostile message against its expected outcome: a dead letter with the expected code at its
        partition and offset, or none (handled: applied to its window, checked with the windows)."""
        sent = [x for x in self.truth.sent if not x.chaos and x.expect != "duplicate"]
        if not sent:
            todo = self.extra.get("hostile", {}).get("todo")
            return {"sent": 0, **({"todo": todo} if todo else {})}
        letters = {(d.get("partition"), d.get("offset")): d for d in self.reader.dlq}
        checked = [x for x in sent if not (x.failed or x.broker_lost)]
        wrong: list[dict[str, Any]] = []
        dlq_ok = handled_ok = 0
        for x in checked:
            d = letters.get((x.partition, x.offset))
            got = None if d is None else d.get("error_code")
            if x.expect == "dlq" and got == x.reason:
                dlq_ok += 1
            elif x.expect == "handled" and d is None:
                handled_ok += 1
            elif len(wrong) < 20:
                wrong.append(
                    {"expect": x.expect, "code": x.reason, "got": got, "reason": d and d.get("reason")}
                )
        by_code: dict[str, int] = {}
        for x in checked:
            by_code[f"{x.expect} {x.reason}"] = by_code.get(f"{x.expect} {x.reason}", 0) + 1
        return {
            "sent": len(sent),
            "failed_to_publish": sum(1 for x in sent if x.failed),
            "expected_dlq": sum(1 for x in checked if x.expect == "dlq"),
            "dlq_arrived": dlq_ok,
            "expected_handled": sum(1 for x in checked if x.expect == "handled"),
            "handled": handled_ok,
            "mismatched": len(checked) - dlq_ok - handled_ok,
            "mismatch_sample": wrong,
            "by_outcome": by_code,
            "dlq_records": len(self.reader.dlq),
        }

    def close(self) -> None:
        """Stop the threads and every worker (finally blocks; the stack is stopped by its owner)."""
        with contextlib.suppress(Exception):
            self.publisher.pause(2)
        self.publisher.stop()
        self.reader.stop()
        self.target = 0
        self.workers.stop_all()
        for px in self.proxies.values():
            px.close()


def hostile_cases(n: int, seed: int, catalog: Any, users: list[str], settings: Any) -> list[Hostile] | str:
    """harness.hostile's corpus (its handled clicks join `users`' windows) as Hostile records."""

    known = [catalog.raw_item(i) for i in range(2, len(catalog.items))]
    corpus = hostile_corpus(
        n,
        seed,
        known_items=known,
        user_ids=users,
        max_event_bytes=settings.max_event_bytes,
        max_future_skew_s=settings.max_future_skew_s,
    )
    out = []
    for c in corpus:
        h = Hostile(_bytes(c.key), _bytes(c.value), c.outcome, c.code, category=c.category)
        if c.outcome == "handled" and c.click is not None:
            h.user, h.item = c.click.user_id, catalog.item_index(c.click.item_id)
            h.event_id = c.click.event_id
        out.append(h)
    return out


def _same_version(model_version: str, index_version: str) -> bool:
    """Tower "2" and index "v2" name one model version (indexer.store.normalize_version)."""

    try:
        return normalize_version(model_version) == normalize_version(index_version)
    except ValueError:
        return False


def _bytes(v: Any) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return str(v).encode()


def committed(settings: Any, ends: dict[int, int]) -> dict[int, int]:
    """The worker group's committed offsets of the partitions in `ends`."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(kafka_config(settings, "consumer", **{"log_level": 2}))
    try:
        tps = [TopicPartition(settings.clicks_topic, p) for p in sorted(ends)]
        return {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
    except Exception:  # noqa: BLE001 - not answered yet: the caller waits and asks again
        return {}
    finally:
        c.close()


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _host_port(url: str | None) -> tuple[str, int]:
    """host and port of "host:port", "http://host:port" or "redis://host:port/0"."""
    if not url:
        raise ValueError("a server address is needed for its proxy")
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


def worker_config(settings: Any, plan: Plan, checkpoint: Path) -> dict[str, Any]:
    """The workers' settings file: the stack's addresses, large windows, short session timeouts."""
    keys = (
        "kafka_bootstrap",
        "redis_url",
        "triton_url",
        "milvus_uri",
        "milvus_prefix",
        "triton_model",
        "clicks_topic",
        "recall_topic",
        "dlq_topic",
        "partitions",
        "dlq_partitions",
        "group_id",
    )
    cfg = {k: getattr(settings, k) for k in keys}
    cfg.update(
        checkpoint=str(checkpoint),
        window_len=WINDOW_LEN,
        recall_n=20,
        session_timeout_ms=plan.session_timeout_ms,
        max_poll_interval_ms=15_000,
        metrics_port=0,
        log_level="INFO",
    )
    return cfg


def start_service(stack: Any, name: str) -> None:
    """Start a stopped stack service again on its recorded ports (and the same data directory), through
    the stack's own launcher code, and record the new process in the state file."""

    rec = stack._records[name]
    models = models_in(stack.model_repository) if name == "triton" and stack.model_repository else []
    stack._start_one(name, dict(rec["ports"]), models)
    stack._save("ready")


# ---- the command --------------------------------------------------------------------------------------


def summary_table(d: dict[str, Any]) -> str:
    """The short table printed at the end."""
    rows = [
        f"{'kills (random / hook)':<28}{d['kills']} ({d['kills_by'].get('random', 0)} / "
        f"{d['kills'] - d['kills_by'].get('random', 0)})",
        f"{'lost / applied twice':<28}{d['lost']} / {d['applied_twice']}",
        f"{'missing recall / duplicates':<28}{d['missing_recall']} / {d['duplicate_recalls']}",
        f"{'mixed versions':<28}{d['mixed_versions']}",
        f"{'stale overwrites (zombies)':<28}{d['stale_overwrites']} ({len(d['zombies'])} pauses)",
        f"{'duplicates sent / applied':<28}{d['duplicate_events_sent']} / {d['duplicate_events_applied']}",
        f"{'bad inputs (dlq ok)':<28}{d['bad_inputs']} ({d['hostile'].get('dlq_arrived', '-')})",
        f"{'worker crashes':<28}{d['worker_crashes']}",
        f"{'clicks published':<28}{d['clicks']['published']}",
    ]
    rows.append(f"{'outage':<18}{'down s':>8}{'p99 ms':>9}{'recovery s':>12}{'catch-up s':>12}{'lost':>6}")
    for name, o in d["outages"].items():
        if "down_s" not in o:  # the broker stall: detected or not
            rows.append(f"{name:<18} detected after {o.get('detected_after_s')} s: {o.get('readyz')}")
            continue
        rec = "-" if o.get("recovery_s") is None else f"{o['recovery_s']:.2f}"
        cu = "-" if o.get("catch_up_s") is None else f"{o['catch_up_s']:.2f}"
        p99 = "-" if o.get("p99_ms") is None else f"{o['p99_ms']:.0f}"
        rows.append(f"{name:<18}{o['down_s']:>8.2f}{p99:>9}{rec:>12}{cu:>12}{o.get('lost', 0):>6}")
    soak = d.get("soak", {})
    if soak.get("rss_mb_start") is not None:
        rows.append(f"{'soak RSS MB start / end':<28}{soak['rss_mb_start']} / {soak['rss_mb_end']}")
    return "\n".join(rows)


def _soak(
    settings: Any, checkpoint: Path, plan: Plan, run_dir: Path, echo: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """harness/soak.py's soak and backpressure runs on this stack (their own topics and worker)."""
    if plan.soak_s <= 0:
        skipped = {"rss_mb_start": None, "rss_mb_end": None, "skipped": "--soak-s 0"}
        return skipped, {"skipped": "--soak-s 0"}

    out: list[dict[str, Any]] = []
    bp = dict(plan.backpressure)
    runs: list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]] = [
        (soak, {"duration_s": plan.soak_s, "run_dir": run_dir / "soak", **plan.soak}),
        (backpressure, {"run_dir": run_dir / "backpressure", **bp}),
    ]
    for fn, kw in runs:
        try:
            res = fn(settings, checkpoint, log=lambda m: echo(f"  {m}"), **kw)
            res.pop("samples", None)  # the per-sample series stay in the helpers' own reports
            out.append(res)
        except Exception as exc:  # noqa: BLE001 - the helper's own failure is reported, not fatal here
            out.append({"error": repr(exc)[:500]})
    if "rss_mb_start" not in out[0]:
        out[0] = {"rss_mb_start": None, "rss_mb_end": None, **out[0]}
    return out[0], out[1]


def _train(inter: Any, out_dir: Path, plan: Plan, seed: int) -> tuple[Path, dict[str, Any]]:
    """The demo's training path (mind.experiment.run_offline), small: d=16, L=20, 200 negatives."""

    rep = run_offline(
        inter,
        models=("mind",),
        model_overrides={"d": 16, "max_len": 20},
        train_cfg=TrainConfig(epochs=plan.epochs, max_seconds=plan.train_s, neg=200, seed=seed),
        checkpoint_dir=out_dir,
        progress=False,
    )
    return out_dir / "mind.pt", {**rep["models"].get("mind", {}), "train": rep["train"].get("mind", {})}


def run_chaos(
    out: Path,
    run_dir: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    soak_s: float | None = None,
    kills: int | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, serve and index a small model on a fresh embedded stack, run every fault, check, write
    `out`; everything started here is stopped on return, on error and on Ctrl-C."""
    import shutil

    plan = Plan.quick() if quick else Plan()
    if soak_s is not None:
        plan.soak_s = soak_s
    if kills is not None:
        plan.kills = kills
    t0 = time.monotonic()
    stack_dir = run_dir / "stack"
    state = read_state(stack_dir) if stack_dir.exists() else None
    if state is not None and live_services(state):
        raise StackRunning(f"a stack runs on {stack_dir}: `mind down --run-dir {stack_dir}` first", state)
    shutil.rmtree(run_dir, ignore_errors=True)  # the broker's log is in memory: nothing here is reusable
    run_dir.mkdir(parents=True)
    echo(f"1/5 training a small synthetic MIND ({plan.synthetic_users} users; {plan.train_s:g} s budget)")
    inter = generate(n_users=plan.synthetic_users, n_items=600, seed=seed)
    checkpoint, offline = _train(inter, run_dir / "checkpoints", plan, seed)
    roll_ckpt, _ = _train(inter, run_dir / "checkpoints_roll", plan, seed + 1)  # same vocabulary
    t_train = time.monotonic() - t0
    echo("2/5 exporting, starting the embedded stack (free ports), indexing")
    repo = run_dir / "model_repo"
    export_checkpoint(checkpoint, repo)
    ports = {f"embedded_{n}_port": 0 for n in ("kafka", "redis", "milvus", "triton_grpc", "triton_http")}
    ports["embedded_triton_metrics_port"] = 0
    base = Settings(  # explicit None addresses: every server is ours, whatever MIND_* says
        run_dir=stack_dir,
        metrics_port=0,
        **ports,
        kafka_bootstrap=None,
        redis_url=None,
        triton_url=None,
        milvus_uri=None,
        group_id="chaos-workers",
    )
    stack = Stack(stack_dir, base, model_repository=repo, services=SERVICES, triton=True)
    chaos: Chaos | None = None
    try:
        stack.start()
        s = base.model_copy(update=dict(stack.addresses))
        assert s.milvus_uri is not None
        index_checkpoint(checkpoint, s.milvus_uri, repo=repo, prefix=s.milvus_prefix, progress=False)
        t_up = time.monotonic() - t0 - t_train
        echo(
            f"3/5 faults: {plan.kills} kills, 4 outages, slow and dropped dependencies, a rebalance, "
            f"{len(plan.zombie_stages)} zombies, {plan.duplicates} duplicates, hostile input, a roll, a stall"
        )
        chaos = Chaos(
            stack,
            s,
            checkpoint,
            inter,
            plan,
            run_dir,
            seed=seed,
            echo=echo,
            progress=progress,
            roll_checkpoint=roll_ckpt,
        )
        chaos.warmup()
        chaos.crash()
        chaos.outage("triton", plan.triton_down_s)
        chaos.outage("milvus", plan.milvus_down_s)
        chaos.outage("redis", plan.redis_down_s)
        chaos.broker_restart()
        for name in ("triton", "milvus", "redis"):
            chaos.slow_dependency(name)
        chaos.rebalance()
        chaos.zombie()
        chaos.duplicate_events()
        chaos.hostile()
        chaos.roll()
        chaos.broker_stall()
        chaos.tail()
        echo("4/5 checking windows, recall coverage and versions against the ground truth")
        d = chaos.report()
        t_chaos = time.monotonic() - t0 - t_train - t_up
        echo(f"5/5 soak ({plan.soak_s:g} s) and backpressure")
        d["soak"], d["backpressure"] = _soak(s, checkpoint, plan, run_dir, echo)
    finally:
        if chaos is not None:
            chaos.close()
        stack.stop()
    d.update(
        quick=quick,
        seed=seed,
        plan=asdict(plan),
        model={"offline": offline, "checkpoint": str(checkpoint), "roll_to": str(roll_ckpt)},
        machine=machine(),
        seconds={
            "train": round(t_train, 1),
            "stack_up_and_index": round(t_up, 1),
            "chaos": round(t_chaos, 1),
            "total": round(time.monotonic() - t0, 1),
        },
    )
    write_json(out, d)
    echo(summary_table(d))
    return d
