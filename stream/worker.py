"""The stream worker: clicks -> behaviour windows -> user tower (Triton) -> key-value store -> Milvus ->
recall topic.

Shaped like Kafka Streams / Quix Streams: a thin confluent-kafka loop drives a small core, and every
external system sits behind one adapter (stream.state: Redis, stream.tower: Triton, stream.recall: Milvus,
stream.window: the pure rules). A micro-batch is whatever the consumer has buffered when the loop asks
(at most batch_max): at low load one click, under load the clicks that arrived while the previous batch
ran. It goes through seven stages in two halves:

  head, on the loop's thread:
  1. parse      validate each message; bad ones go to the DLQ with reason, bytes, partition, offset
  2. window     ONE Lua script call per partition appends the clicks AND stores the partition's offset
                (atomic; re-delivered clicks and duplicated event ids are skipped) and returns the windows;
                the calls of all the batch's partitions share one pipelined round trip
  3. triton     ONE batched tower call for the batch's distinct users; the served version is checked
                against the item index's active version before anything is written
  tail, on the tail thread, overlapping the next batch's head:
  4. kv_write   interest vectors + model version, fenced by the triggering click's offset (one script per
                partition, all in one round trip), on its own thread while 5 runs
  5. recall     ONE batched ANN search for every active interest, merged per user
  6. produce    dead letters, then one recall message per refreshed user (idempotent producer), flush,
                check every delivery report
  7. commit     back on the loop's thread: the consumed offsets, only after 6 succeeded; without waiting
                in steady state, synchronously (again) on a rebalance and at shutdown

Why the overlap keeps the guarantees (stream/README.md has the long form):
- per-user order: heads run one at a time in batch order, and so do tails (a tail starts only after the
  previous one finished), so a user's windows, interests and recall messages follow its clicks' order;
- exactly-once effect on the windows: only the window stage writes them, in batch order, through the
  offset-guarded script; everything after it is idempotent;
- commits in order: batch n is committed by the loop once its tail succeeded, before batch n+1's tail
  starts; a rebalance waits for the tail in flight and commits it before the partitions go.

A dependency failure pauses the assigned partitions and retries the failed half with exponential backoff
(tenacity) while polling, so the group membership stays alive; nothing is committed until it succeeds.
A rebalance during the retries abandons the batch uncommitted: the next owner re-reads it, and the
state's offset check makes re-processing safe.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import orjson
import redis
import structlog
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pymilvus.exceptions import MilvusException
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import RetryCallState, Retrying, retry_if_exception, retry_if_exception_type, wait_exponential

from indexer.store import MAX_TOPK, IndexUnavailable, InvalidQuery, ItemIndex, VersionMismatch
from mind.dataset import OOV, pad_windows
from stream import health, metrics
from stream.catalogue import CatalogueStore, LiveCatalog, VersionView
from stream.fetch import available
from stream.recall import Recaller
from stream.schemas import Click, InvalidEvent, dlq_record_for, dump_recall, parse_click
from stream.settings import Settings, kafka_config, load_settings, redis_client
from stream.state import ApplyResult, InterestRows, Share, UserClicks, Window, WindowState, fence
from stream.topics import ensure_topics
from stream.tower import TowerError, TritonTower
from stream.window import Catalog, Indexed, UserBatch, group_by_user, load_catalog

log = structlog.get_logger("stream.worker")
_T = TypeVar("_T")


def validate_click(raw: bytes | None, settings: Settings, now: float) -> Click:
    """What the worker accepts: parse_click (schema, size, UTF-8) plus its timestamp policy. Raises
    InvalidEvent, whose code becomes the DLQ record's; pure, so the hostile-input tests need no server.

    `now` is the message's own broker timestamp (fixed when it was produced), not the worker's clock, so
    reading the same message again always gives the same outcome."""
    click = parse_click(raw, settings.max_event_bytes)
    skew = settings.max_future_skew_s
    if click.timestamp > now + skew:
        raise InvalidEvent(
            "bad_timestamp",
            f"timestamp {click.timestamp} is {click.timestamp - now:.0f} s ahead of the message's broker "
            f"timestamp (at most {skew:g} s accepted)",
            "timestamp",
        )
    return click


def message_time(msg: Message) -> float:
    """The message's broker timestamp in unix seconds (CreateTime or LogAppendTime, set at produce time).
    Every Kafka message since 0.10 has one; the wall clock stands in only if a broker sends none."""
    kind, ms = msg.timestamp()
    return ms / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE and ms >= 0 else time.time()


class DependencyError(RuntimeError):
    """A server the batch needs failed (or tower and index disagree): pause, retry, commit nothing."""

    def __init__(self, dependency: str, cause: BaseException | str) -> None:
        super().__init__(f"{dependency}: {cause}")
        self.dependency, self.cause = dependency, cause


class VocabMismatch(RuntimeError):
    """The served tower was exported from another vocabulary than the worker's checkpoint."""


class TowerMismatch(ValueError):
    """A setting of the worker does not fit the served tower; the message says what to change."""


def classify(exc: BaseException) -> str | None:
    """Which dependency an exception blames; None for anything else (a bug: let it crash)."""
    if isinstance(exc, DependencyError):
        return exc.dependency
    if isinstance(exc, (VersionMismatch, VocabMismatch)):
        return "version"
    if isinstance(exc, redis.exceptions.RedisError):
        return "redis"
    if isinstance(exc, TowerError):
        return "triton"
    if isinstance(exc, (IndexUnavailable, MilvusException, InvalidQuery, grpc.RpcError)):
        return "milvus"
    if isinstance(exc, (KafkaException, BufferError)):
        return "kafka"
    return None


@dataclass
class Batch:
    """One micro-batch: what to apply, refresh, dead-letter and finally commit, and what each stage made."""

    size: int
    commit: dict[tuple[str, int], int]  # next offset to commit per (topic, partition)
    first: dict[tuple[str, int], int]  # first offset per (topic, partition): where to rewind to
    last: dict[int, int]  # last offset per partition of the clicks topic (the Lua guard's value)
    clicks: list[Indexed]
    groups: dict[tuple[int, str], UserBatch]
    dlq: list[list[Any]]  # [key, record, delivered] per dead letter
    generation: int = 0  # the worker's revocation count when the batch started
    # the window script's result per partition: a retry of the batch does not send those again
    window_results: dict[int, tuple[ApplyResult, list[Window]]] = field(default_factory=dict)
    applied: int = 0
    skipped: int = 0  # re-delivered clicks (offset at or below the stored one)
    duplicates: int = 0  # clicks whose event id was applied already
    windows: list[Window] = field(default_factory=list)  # per group, after the window stage
    interests: np.ndarray | None = None  # [B,K,d] after the triton stage
    active: np.ndarray | None = None  # [B,K]
    model_version: str = ""
    recalls: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    view: VersionView | None = None  # the served vocabulary's view: tower input to recall message, one only
    resolved: bool = False  # clicks on items unknown at parse time were looked up in the catalogue

    @property
    def group_list(self) -> list[UserBatch]:
        return list(self.groups.values())


class _Deliveries:
    """Delivery reports of one produce round."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors: list[KafkaError] = []

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self.ok += 1
        else:
            self.errors.append(err)


class Worker:
    """The core loop. `process_batch` is one batch without retries or commit (tests drive it);
    `run` is the consumer-group loop with the overlapped tail, pause/retry, commits, lag and graceful
    shutdown."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | LiveCatalog,
        state: WindowState,
        tower: TritonTower,
        recaller: Recaller,
        producer: Producer,
        consumer: Consumer | None = None,
        *,
        drop_seen: bool = True,
        retry_max_s: float = 5.0,
        flush_timeout_s: float = 30.0,
        lag_interval_s: float = 5.0,
        producer_factory: Callable[[], Producer] | None = None,
    ) -> None:
        self.settings, self.catalog, self.state = settings, catalog, state
        # raw ids -> global ids and the served vocabulary's view (stream/catalogue.py); a plain Catalog is
        # the checkpoint alone: no catalogue items, the served vocabulary must be the checkpoint's
        self.live = catalog if isinstance(catalog, LiveCatalog) else LiveCatalog(catalog)
        self.tower, self.recaller, self.producer, self.consumer = tower, recaller, producer, consumer
        self.drop_seen, self.retry_max_s = drop_seen, retry_max_s
        self.flush_timeout_s, self.lag_interval_s = flush_timeout_s, lag_interval_s
        self.producer_factory = producer_factory
        self.max_len = check_tower_fit(settings, self.live.catalog, tower)
        # served Triton version -> (model_version, vocab_hash)
        self._checked_versions: dict[str, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._revocations = 0  # bumped by every revocation; a batch compares it with its start value
        self._assignments = 0  # bumped by every assignment (empty ones too): a round ended
        self._paused = False
        self._paused_tps: list[TopicPartition] = []
        self._stray: list[Message] = []
        self._lag_at = 0.0
        self._progress: dict[tuple[str, int], tuple[int, float]] = {}  # (position, since) per partition
        self._committed_at_assign: dict[tuple[str, int], int] = {}  # where a new owner starts reading
        self._unconfirmed: dict[tuple[str, int], int] = {}  # committed without waiting, not yet confirmed
        self._stalled: set[tuple[str, int]] = set()
        self._tails = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-tail")
        self._kv = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-kv")
        self._tail: tuple[Batch, Future[None]] | None = None  # the batch whose tail runs now
        self._in_callback = False
        self.last_batch: Batch | None = None
        self.owned: frozenset[int] = frozenset()  # partitions held now; empty between revoke and assign

    # ---- stages ------------------------------------------------------------------------------------

    @contextmanager
    def _stage(self, batch: Batch, name: str) -> Iterator[None]:
        """Time one stage of a batch (per-stage latency metric); the seam where the chaos harness's worker
        injects its faults."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            batch.timings[name] = batch.timings.get(name, 0.0) + dt
            metrics.STAGE_LATENCY.labels(name).observe(dt)

    def prepare(self, messages: Sequence[Message]) -> Batch:
        """Parse and validate; dead letters are kept to be produced with the batch's output."""
        batch = Batch(len(messages), {}, {}, {}, [], {}, [], generation=self._revocations)
        with self._stage(batch, "parse"):
            for m in messages:
                tp, off = (m.topic(), m.partition()), m.offset()
                batch.commit[tp] = max(batch.commit.get(tp, 0), off + 1)
                batch.first[tp] = min(batch.first.get(tp, off), off)
                batch.last[tp[1]] = max(batch.last.get(tp[1], -1), off)
                try:
                    click = validate_click(m.value(), self.settings, message_time(m))
                except Exception as exc:  # InvalidEvent, or anything hostile input provokes: never stop
                    batch.dlq.append([m.key(), dlq_record_for(m, exc), False])
                    code = exc.code if isinstance(exc, InvalidEvent) else "internal"
                    metrics.DLQ.labels(code).inc()
                    log.info("dead letter", code=code, partition=tp[1], offset=off, reason=str(exc)[:200])
                    continue
                # a global id (stream/catalogue.py); an item unknown here is looked up again in the head
                batch.clicks.append(Indexed(tp[1], off, click, self.live.item_index(click.item_id)))
            batch.groups = group_by_user(batch.clicks)
        return batch

    def _served_view(self, served: str, view: VersionView) -> tuple[str, VersionView]:
        """The served version's model_version and the view of its vocabulary: `view` when the served tower
        was exported from it, else the vocabulary published for the served version (a roll to a model
        retrained with other items: the worker follows it), else VocabMismatch."""
        got = self._checked_versions.get(served)
        if got is None:
            meta = self.tower.meta(served)
            got = self._checked_versions[served] = (meta.model_version, meta.vocab_hash)
        mv, vocab = got
        if not view.vocab_hash or vocab == view.vocab_hash:
            return mv, view
        follow = self.live.follow(vocab)
        if follow is None:
            raise VocabMismatch(
                f"Triton version {served} ({mv}) has vocab_hash {vocab}, the worker's catalogue "
                f"{view.vocab_hash}, and no vocabulary {vocab} is published in the catalogue: item indices "
                "would mean other items. Roll models out with `mind roll` (it publishes the vocabulary), or "
                "deploy the worker with the checkpoint the tower was exported from."
            )
        log.info("served vocabulary changed: following it", served=served, vocab_hash=vocab)
        return mv, follow

    def _resolve_items(self, batch: Batch) -> None:
        """Clicks on items unknown at parse time: read what the catalogue gained and map them again (the
        record may have arrived just before the click). Otherwise the catalogue is read every
        catalog_refresh_s. Items still unknown enter the window as the unknown item and are counted."""
        if batch.resolved:
            return
        unknown = [k for k, c in enumerate(batch.clicks) if c.item == OOV]
        self.live.sync(force=bool(unknown))
        if unknown:
            for k in unknown:
                c = batch.clicks[k]
                batch.clicks[k] = c._replace(item=self.live.item_index(c.click.item_id))
            batch.groups = group_by_user(batch.clicks)
        metrics.UNKNOWN_ITEMS.inc(sum(1 for k in unknown if batch.clicks[k].item == OOV))
        batch.resolved = True

    def _tower(self, batch: Batch, view: VersionView) -> tuple[np.ndarray, np.ndarray, str]:
        """One tower call for the batch's windows as `view` maps them. A cold item goes to the tower as the
        unknown item (ITEM_IDS = OOV) with its own side ids: exactly the embedding the model gives an index
        >= n_items (mind.model.MIND.embed_items), and a tower exported before cold start answers it too."""
        groups = batch.group_list
        profiles = [view.profile_row(g.user_id, g.trigger.profile_ids) for g in groups]
        items, side, prof = view.tower_inputs([w.items for w in batch.windows], profiles, self.max_len)
        items = np.where(items >= view.n_items, OOV, items)
        times = pad_windows([w.times for w in batch.windows], self.max_len)  # aligned with the items
        return self.tower.infer(items, side, prof, times=times)

    def _produce(self, topic: str, key: Any, value: bytes, on_delivery: Callable[..., None]) -> None:
        deadline = time.monotonic() + self.flush_timeout_s
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: let deliveries drain it (backpressure)
                if time.monotonic() > deadline:
                    raise DependencyError("kafka", "producer queue stayed full") from None
                self.producer.poll(0.05)

    @staticmethod
    def _blamed(fn: Callable[[Batch], None], batch: Batch) -> None:
        """Run one half of a batch; an exception a dependency caused becomes a DependencyError."""
        try:
            fn(batch)
        except Exception as exc:
            dep = classify(exc)
            if dep is None:
                raise
            raise DependencyError(dep, exc) from exc

    @staticmethod
    def fence_of(batch: Batch, g: UserBatch) -> int:
        """The fence of a user's refresh: its partition's log generation and its triggering click's offset."""
        applied = batch.window_results.get(g.partition)
        return fence(applied[0].generation if applied else 0, g.fence)

    def head(self, batch: Batch) -> None:
        """Window and Triton stages. Idempotent: a retry applies nothing twice and recomputes the rest."""
        self._blamed(self._head, batch)

    def tail(self, batch: Batch) -> None:
        """kv_write, recall and produce. Idempotent: fenced writes, recall messages may repeat."""
        self._blamed(self._tail_stages, batch)

    def refresh(self, batch: Batch) -> None:
        """Head then tail, on this thread (tests and tools; the loop overlaps them across batches)."""
        self.head(batch)
        self.tail(batch)

    @staticmethod
    def _by_partition(groups: Sequence[UserBatch]) -> dict[int, list[int]]:
        """The groups' indices per partition: one script call each."""
        by_part: dict[int, list[int]] = {}
        for k, g in enumerate(groups):
            by_part.setdefault(g.partition, []).append(k)
        return by_part

    def _head(self, batch: Batch) -> None:
        self._resolve_items(batch)
        groups = batch.group_list
        if not groups:
            return
        with self._stage(batch, "window"):
            by_part = self._by_partition(groups)
            shares = [
                Share(
                    part,
                    batch.last[part],
                    [
                        UserClicks(
                            groups[k].user_id,
                            groups[k].offsets,
                            groups[k].items,
                            groups[k].event_ids,
                            groups[k].times,
                        )
                        for k in ks
                    ],
                )
                for part, ks in by_part.items()
                if part not in batch.window_results  # a retry sends only the partitions still missing
            ]
            self.state.apply_batch(shares, batch.window_results)
            windows: list[Window | None] = [None] * len(groups)
            for part, ks in by_part.items():
                for k, w in zip(ks, batch.window_results[part][1], strict=True):
                    windows[k] = w
            results = [res for res, _ in batch.window_results.values()]
            batch.applied = sum(r.applied for r in results)
            batch.duplicates = sum(r.duplicates for r in results)
            batch.windows = [w for w in windows if w is not None]
            newest = max((max(w.items, default=0) for w in batch.windows), default=0)
            if newest >= len(self.live.space):  # another worker read the catalogue further than this one
                self.live.sync(force=True)
        with self._stage(batch, "triton"):
            view = self.live.view()
            batch.interests, batch.active, served = self._tower(batch, view)
            batch.model_version, served_view = self._served_view(served, view)
            if served_view is not view:  # another vocabulary serves now: redo the batch in it, never mix
                batch.interests, batch.active, served = self._tower(batch, served_view)
                batch.model_version, again = self._served_view(served, served_view)
                if again is not served_view:
                    raise VocabMismatch(f"the served vocabulary changed twice in one batch (now {served})")
            batch.view = served_view
            # before any interest vector is written: tower and index must serve the same model version
            self.recaller.check_version(batch.model_version)

    def _write_interests(self, batch: Batch) -> None:
        """The kv_write stage: one fenced script call per partition."""
        assert batch.interests is not None and batch.active is not None
        groups = batch.group_list
        with self._stage(batch, "kv_write"):
            by_part = self._by_partition(groups)
            self.state.write_interests_batch(
                [
                    InterestRows(
                        part,
                        [groups[k].user_id for k in ks],
                        [self.fence_of(batch, groups[k]) for k in ks],
                        batch.interests[ks],
                        batch.active[ks],
                    )
                    for part, ks in by_part.items()
                ],
                batch.model_version,
            )

    def _tail_stages(self, batch: Batch) -> None:
        s = self.settings
        reports = _Deliveries()
        groups = batch.group_list
        values: list[bytes] = []
        if groups:
            assert batch.interests is not None and batch.active is not None
            # the interest vectors are written while Milvus searches (they are independent); the recall
            # messages go out only once both are done, so a recall message implies its vectors are stored
            written = self._kv.submit(self._write_interests, batch)
            with self._stage(batch, "recall"):
                view = batch.view
                assert view is not None
                seen = [view.served(w.items).tolist() for w in batch.windows] if self.drop_seen else None
                res = self.recaller.recall(batch.interests, batch.active, batch.model_version, seen=seen)
                lists = res.as_lists()
                if any(view.raw_item(i) is None for cands in lists for i, _, _ in cands):
                    self.live.sync(force=True)  # the feed indexed an item after this worker last read
                values = [
                    dump_recall(
                        g.user_id,
                        g.trigger.event_id,
                        g.trigger.timestamp,
                        batch.model_version,
                        res.version,
                        [(r, sc, k) for i, sc, k in cands if (r := view.raw_item(i)) is not None],
                        click=(g.partition, g.fence),
                        fence=self.fence_of(batch, g),
                    )
                    for g, cands in zip(groups, lists, strict=True)
                ]
            written.result()
        with self._stage(batch, "produce"):
            for letter in batch.dlq:
                if not letter[2]:

                    def mark(err: KafkaError | None, msg: Message, letter: list[Any] = letter) -> None:
                        letter[2] = err is None
                        reports(err, msg)

                    self._produce(s.dlq_topic, letter[0], letter[1], mark)
            for g, value in zip(groups, values, strict=True):
                self._produce(s.recall_topic, g.user_id.encode(), value, reports)
            left = self.producer.flush(self.flush_timeout_s)
            if left or reports.errors:
                fatal = [e for e in reports.errors if e.fatal()]
                if fatal and self.producer_factory is not None:
                    # a fatal error (e.g. idempotence sequence broken) ends that producer instance
                    log.error("producer fatal error: replacing the producer", error=str(fatal[0]))
                    self.producer = self.producer_factory()
                raise DependencyError(
                    "kafka",
                    f"{left} messages undelivered after {self.flush_timeout_s:g} s, "
                    f"{len(reports.errors)} failed ({reports.errors[:3]}){' FATAL' if fatal else ''}",
                )
        now = time.time()
        for c in batch.clicks:
            metrics.E2E_LATENCY.observe(max(0.0, now - c.click.timestamp))
        batch.recalls = len(values)
        batch.skipped = len(batch.clicks) - batch.applied - batch.duplicates
        metrics.CLICKS.inc(len(batch.clicks))
        metrics.APPLIED.inc(batch.applied)
        metrics.DUPLICATES.inc(batch.skipped)
        metrics.DUPLICATE_EVENTS.inc(batch.duplicates)
        metrics.RECALLS.inc(len(values))
        metrics.BATCH_SIZE.observe(batch.size)
        metrics.BATCH_USERS.observe(len(groups))

    def process_batch(self, messages: Sequence[Message]) -> dict[tuple[str, int], int]:
        """Parse, apply, refresh and produce one batch (no retry, no commit); returns the offsets to
        commit: last offset + 1 per (topic, partition). Raises DependencyError when a server fails."""
        batch = self.prepare(messages)
        self.refresh(batch)
        self.last_batch = batch
        return batch.commit

    # ---- the consumer loop --------------------------------------------------------------------------

    def commit(
        self, offsets: dict[tuple[str, int], int], batch: Batch | None = None, *, wait: bool = True
    ) -> bool:
        """Commit explicit offsets. A refusal (rebalance) is logged, not fatal: the next owner re-reads
        those messages and the offset check skips what was applied. `wait=False` sends the commit and goes
        on (its outcome reaches `report_commit`); the offsets are kept until a synchronous commit of the
        same partitions (the rebalance's or shutdown's tail, or `confirm_commits`) supersedes them."""
        assert self.consumer is not None
        tps = [TopicPartition(t, p, off) for (t, p), off in sorted(offsets.items())]
        t0 = time.perf_counter()
        error: KafkaError | None = None
        try:
            if wait:
                res = self.consumer.commit(offsets=tps, asynchronous=False) or []
            else:
                self.consumer.commit(offsets=tps, asynchronous=True)
                res = []
        except KafkaException as exc:
            error, res = exc.args[0], tps
            log.warning(
                "commit failed", error=str(exc), offsets={f"{t}:{p}": o for (t, p), o in offsets.items()}
            )
        if wait:  # commits go out in order: this one supersedes the earlier, asynchronous ones
            for tp in offsets:
                self._unconfirmed.pop(tp, None)
        elif error is None:
            self._unconfirmed.update(offsets)
        dt = time.perf_counter() - t0
        metrics.STAGE_LATENCY.labels("commit").observe(dt)
        if batch is not None:
            batch.timings["commit"] = dt
        return report_commit(error, res)

    def confirm_commits(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit again, synchronously, what was committed asynchronously (of `partitions`, or all), so that
        partitions leave with their offsets on the broker and not merely in flight."""
        keep = None if partitions is None else {(tp.topic, tp.partition) for tp in partitions}
        offsets = {tp: off for tp, off in self._unconfirmed.items() if keep is None or tp in keep}
        if offsets:
            self.commit(offsets)  # synchronous: it drops what it confirms from _unconfirmed

    def _revoked(self, batch: Batch) -> bool:
        """True when a rebalance took partitions away since the batch started."""
        return self._revocations != batch.generation

    def _pause(self) -> None:
        if not self._paused and self.consumer is not None:
            self._paused_tps = self.consumer.assignment()
            self.consumer.pause(self._paused_tps)
            self._paused = True
            metrics.PAUSED.set(1)
            log.warning("consumption paused: a dependency is down")

    def _resume(self) -> None:
        """Resume what was paused, not just what is assigned now. librdkafka keeps a partition's pause flag
        across revocation: after a rebalance during an outage the assignment may be empty or different,
        and a partition that came back still paused would never be fetched again (found by `mind chaos`)."""
        if self._paused and self.consumer is not None:
            self.consumer.resume(self._paused_tps + self.consumer.assignment())
            self._paused_tps = []
            self._paused = False
            metrics.PAUSED.set(0)
            log.info("consumption resumed")

    def _sleep_polling(self, batch: Batch, seconds: float) -> None:
        """tenacity's sleep: wait with the partitions paused, polling so rebalances are served."""
        self._pause()
        end = time.monotonic() + seconds
        while not (self._revoked(batch) or self._stop.is_set()):
            health.beat()  # alive while a dependency is down; /readyz reports the pause
            left = end - time.monotonic()
            if left <= 0:
                break
            m = self.consumer.poll(min(0.2, left)) if self.consumer is not None else None
            if m is not None and m.error() is None:
                self._stray.append(m)  # fetched before the pause took effect: process it next

    def _before_retry(self, rs: RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        dep = exc.dependency if isinstance(exc, DependencyError) else "unknown"
        metrics.RETRIES.labels(dep).inc()
        wait = rs.next_action.sleep if rs.next_action else 0.0
        fn = log.error if dep == "version" else log.warning  # mixed versions: loud, never silent
        fn(
            "dependency failed; retrying the batch",
            dependency=dep,
            attempt=rs.attempt_number,
            wait_s=round(wait, 2),
            error=str(exc)[:500],
        )

    def _retry(self, half: Callable[[Batch], None], batch: Batch, failure: DependencyError) -> bool:
        """Retry one half of a batch that failed with `failure` until it succeeds (True), or the
        partitions are revoked or the worker stops (False: the batch is abandoned uncommitted). The first
        retry is immediate; the next ones back off exponentially, polling with the partitions paused."""
        metrics.RETRIES.labels(failure.dependency).inc()
        fn = log.error if failure.dependency == "version" else log.warning  # mixed versions: loud
        fn("dependency failed; retrying the batch", dependency=failure.dependency, error=str(failure)[:500])
        retrying = Retrying(
            retry=retry_if_exception_type(DependencyError),
            wait=wait_exponential(multiplier=0.1, min=0.1, max=self.retry_max_s),
            stop=lambda _rs: self._revoked(batch) or self._stop.is_set(),
            sleep=lambda seconds: self._sleep_polling(batch, seconds),
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            if self._revoked(batch) or self._stop.is_set():
                raise failure
            retrying(half, batch)
        except DependencyError as exc:
            metrics.BATCHES.labels("abandoned").inc()
            why = "partitions revoked" if self._revoked(batch) else "shutting down"
            log.warning("batch abandoned uncommitted", reason=why, size=batch.size, error=str(exc)[:300])
            self._rewind(batch)
            return False
        finally:
            self._resume()
        return True

    def _finish_tail(self, block: bool = True) -> None:
        """Collect the tail in flight: commit its batch when it succeeded, retry it (on the loop's thread)
        when a dependency failed. `block=False` only collects a tail that is already done. Inside a
        rebalance callback a failed tail is abandoned, not retried: its partitions are going away."""
        if self._tail is None:
            return
        batch, fut = self._tail
        if not block and not fut.done():
            return
        self._tail = None
        try:
            fut.result()
        except DependencyError as exc:
            if self._in_callback:
                metrics.BATCHES.labels("abandoned").inc()
                log.warning("batch abandoned uncommitted", reason="partitions revoked", error=str(exc)[:300])
                return
            if not self._retry(self.tail, batch, exc):
                return
        self._done(batch)

    def _done(self, batch: Batch) -> None:
        """A batch whose tail succeeded: commit it, unless a rebalance came since it started."""
        if self._revoked(batch):  # the new owner re-reads it; the offset check makes that safe
            metrics.BATCHES.labels("uncommitted").inc()
            return
        # in steady state the commit goes out without waiting (the next batch's tail is waiting for it);
        # inside a rebalance callback, and once stopping, it waits
        self.commit(batch.commit, batch, wait=self._in_callback or self._stop.is_set())
        metrics.BATCHES.labels("ok").inc()
        self.last_batch = batch
        log.debug(
            "batch",
            size=batch.size,
            users=len(batch.groups),
            applied=batch.applied,
            skipped=batch.skipped,
            duplicates=batch.duplicates,
            dlq=len(batch.dlq),
            ms={k: round(v * 1000, 2) for k, v in batch.timings.items()},
        )

    def _handle(self, messages: Sequence[Message]) -> None:
        """One batch through the loop: head here (overlapping the previous batch's tail), then its tail
        handed to the tail thread once the previous one is committed."""
        batch = self.prepare(messages)
        try:
            self.head(batch)
        except DependencyError as exc:
            self._finish_tail()  # the batch before this one first: commits stay in order
            if not self._retry(self.head, batch, exc):
                return
        self._finish_tail()
        if self._revoked(batch):  # a rebalance while the previous tail was retried: the new owner has it
            metrics.BATCHES.labels("abandoned").inc()
            self._rewind(batch)
            return
        self._tail = (batch, self._tails.submit(self.tail, batch))

    def _rewind(self, batch: Batch) -> None:
        """Seek partitions still owned back to the first message not handled: the batch's start, or the
        first message polled during the retries (from partitions assigned meanwhile). With eager
        rebalancing every partition was revoked and a new assignment starts at the committed offsets."""
        assert self.consumer is not None
        first = dict(batch.first)
        for m in self._stray:
            tp = (m.topic(), m.partition())
            first[tp] = min(first.get(tp, m.offset()), m.offset())
        self._stray.clear()
        try:
            owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
            for (t, p), off in first.items():
                if (t, p) in owned:
                    self.consumer.seek(TopicPartition(t, p, off))
        except KafkaException as exc:
            log.warning("rewind failed", error=str(exc))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignments += 1
        self.owned = self.owned | {tp.partition for tp in partitions}
        if not self._paused:  # a partition keeps its pause flag across revocation: start it fetching
            with suppress(KafkaException):
                consumer.resume(partitions)
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in partitions))
        try:
            self._check_state(consumer, partitions)
        except Exception as exc:  # noqa: BLE001 - a callback must not raise; the check is advisory
            log.warning("state offset check skipped", error=str(exc)[:300])

    def _check_state(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Log where the state and the group stand on each new partition. State ahead of the committed
        offset is normal after a crash (those clicks will be re-delivered and skipped); state BEHIND it
        means the key-value store lost data (clicks in between are missing from the windows).

        Not done here: detecting a broker that lost its log (embedded Tansu restarted with memory
        storage) by watermarks, because Tansu 0.6 answers ListOffsets(latest) wrongly (1 for a partition
        holding 37 records; fetch responses carry the right high watermark). See stream/README.md.
        """
        stored = self.state.offsets([tp.partition for tp in partitions])
        for tp in consumer.committed(partitions, timeout=10):
            have, next_offset = stored[tp.partition], tp.offset
            self._committed_at_assign[(tp.topic, tp.partition)] = next_offset
            if next_offset >= 0 and have < next_offset - 1:
                log.error(
                    "state behind the committed offset: the key-value store lost data",
                    partition=tp.partition,
                    state_offset=have,
                    committed=next_offset,
                )
            else:
                log.info("partition state", partition=tp.partition, state_offset=have, committed=next_offset)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # the tail in flight finishes and is committed while the partitions are still ours
        self._in_callback = True
        try:
            self._finish_tail()
        except Exception as exc:  # noqa: BLE001 - a callback must not raise
            log.warning("tail not finished before the rebalance", error=str(exc)[:300])
        finally:
            self._in_callback = False
        self.confirm_commits(partitions)
        self._revocations += 1
        self.owned = self.owned - {tp.partition for tp in partitions}
        log.info("partitions revoked", partitions=sorted(tp.partition for tp in partitions))
        for tp in partitions:
            self._progress.pop((tp.topic, tp.partition), None)
            self._committed_at_assign.pop((tp.topic, tp.partition), None)
            self._stalled.discard((tp.topic, tp.partition))
            for gauge in (metrics.CONSUMER_LAG, metrics.STALLED):
                with suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))

    def _settle_round(self, limit_s: float = 10.0) -> None:
        """Leave the group between rebalance rounds, not during one. Tansu 0.6 never finished a round that a
        member left while still joining: the others waited without partitions for good (one full test run in
        five). Kafka needs no wait; here it is bounded and free when no round is open. A message polled
        meanwhile is left uncommitted, so the next owner reads it again."""
        assert self.consumer is not None
        end = time.monotonic() + limit_s
        while self._assignments <= self._revocations and time.monotonic() < end:
            try:
                self.consumer.poll(0.1)  # serves the rebalance callbacks
            except (KafkaException, RuntimeError) as exc:
                log.warning("leaving mid-round", error=str(exc)[:300])
                return

    def _standing(self, tp: TopicPartition) -> tuple[int, int | None]:
        """(position, lag) of an assigned partition; lag None while no fetch has been answered. Until its
        first click arrives, the consumer stands where it started: the committed offset, or the log start
        (auto.offset.reset is earliest). A broker that stops serving a partition from the first fetch on
        leaves it there, so that case must count as much as a stall mid-log."""
        assert self.consumer is not None
        low, high = self.consumer.get_watermark_offsets(tp, cached=True)
        position = tp.offset
        if position < 0:
            position = self._committed_at_assign.get((tp.topic, tp.partition), -1)
        if position < 0 and low >= 0:
            position = low
        elif position < 0 and high >= 0 and not self._paused:
            # the log start from the broker, which answers fetches; never asked while paused or before a
            # fetch is answered (an outage), so the loop does not block on it; unknown (-1) if it fails
            with suppress(KafkaException):
                position = self.consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)[0]
        return position, (max(0, high - position) if high >= 0 else None)

    def _update_lag(self) -> None:
        """Every lag_interval_s: each assigned partition's lag (high watermark - position), and whether it
        is stalled: lag (or no fetch answered at all), and the position has not moved for fetch_stall_s
        while consumption runs. A broker that stops serving a partition (the embedded Tansu does past
        about 22k record batches) looks like that: the fetches come back empty, or never, and the clicks
        wait in the log."""
        now = time.monotonic()
        if self.consumer is None or now - self._lag_at < self.lag_interval_s:
            return
        self._lag_at = now
        limit = self.settings.fetch_stall_s
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                position, lag = self._standing(tp)
                if position < 0:
                    continue
                if lag is not None:
                    metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
                key = (tp.topic, tp.partition)
                pos, since = self._progress.setdefault(key, (position, now))
                if pos != position or lag == 0 or self._paused:
                    self._progress[key] = (position, now)
                    stalled = 0.0
                else:
                    stalled = now - since
                gauge = metrics.STALLED.labels(tp.topic, str(tp.partition))
                if stalled >= limit:
                    if key not in self._stalled:
                        self._stalled.add(key)
                        metrics.STALLS.inc()
                        log.error(
                            "partition stalled: lag but no progress while consuming; the broker is not "
                            "serving it",
                            partition=tp.partition,
                            lag=lag,
                            position=position,
                            seconds=round(stalled, 1),
                        )
                    gauge.set(stalled)
                else:
                    self._stalled.discard(key)
                    gauge.set(0)
        except KafkaException as exc:
            log.debug("lag update failed", error=str(exc))

    def _next_messages(self) -> list[Message]:
        """What the consumer has now, without waiting for a batch to fill: block (up to batch_timeout_ms)
        only for the first message when nothing is buffered, then take whatever else is buffered, up to
        batch_max. At low load a batch is one click; under load, what arrived during the last batch.
        While a tail is in flight the wait is short, so its commit follows soon after it finishes."""
        assert self.consumer is not None
        s = self.settings
        msgs, self._stray = self._stray, []
        wait = 0.0 if msgs else (0.005 if self._tail is not None else s.batch_timeout_ms / 1000)
        msgs.extend(
            available(self.consumer, s.batch_max - len(msgs), wait) if len(msgs) < s.batch_max else []
        )
        return msgs

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume until `stop` is set; then finish the batch in hand, commit, leave the group, flush."""
        if self.consumer is None:
            raise ValueError("run() needs a consumer")
        self._stop = stop or threading.Event()
        s = self.settings
        self.consumer.subscribe(
            [s.clicks_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        log.info(
            "worker started",
            topic=s.clicks_topic,
            group=s.group_id,
            max_len=self.max_len,
            batch_max=s.batch_max,
            batch_timeout_ms=s.batch_timeout_ms,
        )
        try:
            while not self._stop.is_set():
                health.beat()
                msgs = self._next_messages()
                self._update_lag()
                self._finish_tail(block=False)
                good = []
                for m in msgs:
                    err = m.error()
                    if err is None:
                        good.append(m)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error", error=str(err))
                if good:
                    self._handle(good)
        finally:
            try:
                self._finish_tail()
                self.confirm_commits()
            finally:
                self._tails.shutdown(wait=True)
                self._kv.shutdown(wait=True)
                self._settle_round()
                log.info("worker stopping: leaving the group")
                try:
                    self.consumer.close()
                finally:
                    left = self.producer.flush(10)
                    if left == 0:  # close() flushes without a time limit: only once nothing is pending
                        self.producer.close()
                    log.info("worker stopped", undelivered=left)


def report_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> bool:
    """Count and log a refused commit; True when it went through. Also the consumer's `on_commit` callback,
    so asynchronous commits report here from its poll. A refused one only moves the committed offset less
    far: the next owner re-reads those clicks and the offset check skips them."""
    failed = [tp for tp in partitions if tp.error is not None]
    if err is None and not failed:
        return True
    metrics.COMMIT_FAILURES.inc()
    log.warning(
        "commit refused",
        error=str(err) if err is not None else None,
        partitions=[(tp.partition, str(tp.error)) for tp in failed],
    )
    return False


def check_tower_fit(settings: Settings, catalog: Catalog, tower: TritonTower) -> int:
    """Start-up: every setting the served tower constrains, checked against its config; returns its max_len.
    Each mismatch fails fast with what to change (a silent one would feed the tower other inputs than it
    was trained on)."""
    dims = {t["name"]: [int(x) for x in t["dims"]] for t in tower.config()["input"]}
    max_len = dims["ITEM_IDS"][0]
    s, p = dims["SIDE_IDS"][1], dims["PROFILE_IDS"][0]
    if catalog.item_side.shape[1] != s or catalog.n_profile_fields != p:
        raise TowerMismatch(
            f"checkpoint tables (S={catalog.item_side.shape[1]}, P={catalog.n_profile_fields}) do not "
            f"fit the served tower (S={s}, P={p}): the worker's checkpoint is not the exported model's; "
            "deploy the worker with the checkpoint the tower was exported from (MIND_CHECKPOINT)"
        )
    if settings.window_len < max_len:
        raise TowerMismatch(
            f"window_len {settings.window_len} is shorter than the served tower's window ({max_len} "
            f"behaviours): the tower would see shorter histories than it was trained on; set "
            f"MIND_WINDOW_LEN (window_len) to at least {max_len}"
        )
    if settings.recall_n + settings.window_len > MAX_TOPK:
        raise TowerMismatch(
            f"recall_n {settings.recall_n} + window_len {settings.window_len} exceeds Milvus' top-k limit "
            f"{MAX_TOPK} (each interest retrieves recall_n plus the window's seen items): lower MIND_RECALL_N"
        )
    return max_len


# ---- wiring ---------------------------------------------------------------------------------------------


def configure_logging(settings: Settings) -> None:
    """JSON lines (structlog) on stderr, once per process."""
    if structlog.is_configured():
        return
    import logging

    render: Any = (
        structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o, default=str).decode())
        if settings.log_json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, settings.log_level)),
        # sys.stderr looked up at each write, not bound once: a process that swaps its stderr (pytest's
        # capture, a daemon redirecting logs) must not leave the worker writing to a closed file.
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def addresses(settings: Settings) -> dict[str, str]:
    """Each server's address: the configured one, else the embedded default on loopback (`mind up`)."""
    h = settings.embedded_host
    return {
        "kafka": settings.kafka_bootstrap or f"{h}:{settings.embedded_kafka_port}",
        "redis": settings.redis_url or f"redis://{h}:{settings.embedded_redis_port}/0",
        "triton": settings.triton_url or f"{h}:{settings.embedded_triton_grpc_port}",
        "milvus": settings.milvus_uri or f"http://{h}:{settings.embedded_milvus_port}",
    }


def _until_ready(what: str, fn: Callable[[], _T], stop: threading.Event) -> _T:
    """Start-up: keep trying to reach a server (it may start after the worker) until it answers."""

    def note(rs: RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        log.warning(
            "waiting for a dependency", dependency=what, attempt=rs.attempt_number, error=str(exc)[:300]
        )

    def transient(e: BaseException) -> bool:
        # a refused password is a configuration error: retrying it forever would hide it
        auth = isinstance(e, redis.exceptions.AuthenticationError)
        return not auth and (classify(e) is not None or isinstance(e, ConnectionError))

    try:
        return Retrying(
            retry=retry_if_exception(transient),
            wait=wait_exponential(multiplier=0.5, max=10.0),
            stop=lambda _rs: stop.is_set(),
            sleep=stop.wait,
            before_sleep=note,
            reraise=True,
        )(fn)
    except redis.exceptions.AuthenticationError as exc:
        raise ValueError(
            f"{what}: authentication failed ({exc}); check MIND_REDIS_PASSWORD / MIND_REDIS_USERNAME "
            "(or the password in MIND_REDIS_URL)"
        ) from None


def build_worker(
    settings: Settings,
    catalog: Catalog,
    stop: threading.Event,
    *,
    drop_seen: bool = True,
    worker_type: type[Worker] = Worker,
) -> Worker:
    """Connect every adapter (waiting for servers that are still starting) and create the clients."""
    addr = addresses(settings)
    # redis-py's own retry (3 tries, backoff up to 10 s) is switched off: state.py (a few quick tries)
    # and the worker's pause-and-retry own the policy, and count what they do. A cluster client reads the
    # slot map when it is made, so making it waits for the cluster as the ping waits for a single server.
    client = _until_ready(
        "redis",
        lambda: redis_client(
            settings,
            addr["redis"],
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        ),
        stop,
    )
    _until_ready("redis", client.ping, stop)
    state = WindowState(
        client, settings.clicks_topic, settings.window_len, event_memory=settings.event_id_memory
    )
    live = LiveCatalog(catalog)
    if settings.catalog_enabled:  # new items and published vocabularies (stream/catalogue.py)
        store = CatalogueStore(client, settings.milvus_prefix)
        live = _until_ready("redis", LiveCatalog(catalog, store, settings.catalog_refresh_s).attach, stop)
    tower = TritonTower(addr["triton"], settings.triton_model, settings.triton_timeout_s)
    _until_ready("triton", tower.config, stop)
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    index = _until_ready(
        "milvus", lambda: ItemIndex(addr["milvus"], token=token, prefix=settings.milvus_prefix), stop
    )
    try:
        ensure_topics(AdminClient(kafka_config(settings, "admin", bootstrap=addr["kafka"])), settings)
    except Exception as exc:  # noqa: BLE001 - may be forbidden on a production cluster; topics may exist
        log.warning("could not ensure topics", error=str(exc)[:300])
    producer_conf = kafka_config(settings, "producer", bootstrap=addr["kafka"])
    consumer = Consumer(
        {**kafka_config(settings, "consumer", bootstrap=addr["kafka"]), "on_commit": report_commit}
    )
    return worker_type(
        settings,
        live,
        state,
        tower,
        Recaller(index, settings.recall_n),
        Producer(producer_conf),
        consumer,
        drop_seen=drop_seen,
        producer_factory=lambda: Producer(producer_conf),
    )


def resolve_checkpoint(settings: Settings, checkpoint: str | os.PathLike[str] | None) -> Path:
    path = checkpoint or settings.checkpoint  # settings.checkpoint also reads $MIND_CHECKPOINT
    if not path:
        raise ValueError(
            "the worker needs the model checkpoint (item vocabulary and side-id tables): pass --checkpoint "
            "or set MIND_CHECKPOINT"
        )
    return Path(path)


def run_worker(
    settings: Settings,
    stop: threading.Event | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    drop_seen: bool | None = None,
    worker_type: type[Worker] = Worker,
) -> None:
    """Run one worker until `stop` is set or SIGTERM/SIGINT arrives (handlers only in the main thread)."""
    configure_logging(settings)
    stop = stop or threading.Event()
    restore: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            restore[sig] = signal.signal(
                sig, lambda signum, _f: (log.info("signal", signum=signum), stop.set())
            )
    server = None
    try:
        catalog = load_catalog(resolve_checkpoint(settings, checkpoint))
        health.HEALTH.reset(health.Health.liveness_for(settings.batch_timeout_ms))
        if settings.metrics_port:  # /metrics, /healthz, /readyz (stream/health.py)
            server = health.serve(settings.metrics_host, settings.metrics_port)
        try:
            keep = settings.drop_seen if drop_seen is None else drop_seen
            worker = build_worker(settings, catalog, stop, drop_seen=keep, worker_type=worker_type)
        except Exception:
            if stop.is_set():  # asked to stop while still waiting for a server
                log.info("stopped before start")
                return
            raise
        health.HEALTH.started(stop)
        worker.run(stop)
    finally:
        if server is not None:
            server.close()
        for sig, handler in restore.items():
            signal.signal(sig, handler)


def argument_parser(prog: str = "python -m stream.worker") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="The MIND stream worker: clicks -> windows -> Triton -> Redis -> Milvus -> recall.",
    )
    ap.add_argument("--config", help="settings file (TOML, YAML, JSON or .env); else $MIND_CONFIG")
    ap.add_argument("--checkpoint", help="model checkpoint (else $MIND_CHECKPOINT)")
    ap.add_argument("--keep-seen", action="store_true", help="do not drop the window's items from recall")
    return ap


def run_from_args(args: argparse.Namespace, worker_type: type[Worker] = Worker) -> int:
    """The process entry point's body: settings and checkpoint from the parsed flags, then run."""
    try:  # configuration mistakes: one clear line, no traceback
        settings = load_settings(args.config)
        checkpoint = resolve_checkpoint(settings, args.checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_worker(
        settings,
        checkpoint=checkpoint,
        drop_seen=False if args.keep_seen else None,
        worker_type=worker_type,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(argument_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
