"""The catalogue feed: catalogue records -> the catalogue store -> cold items' vectors in the active index.

Records (schemas/catalog.v1.json: an item id and its raw side ids) come from the `catalog` topic
(`run_topic`, a consumer group that commits after each batch is applied) or from a JSONL file
(`feed_file`). A record that fails validation goes to the `catalog.dlq` topic as a dlq.v1 record with its
reason and original bytes (from a file: topic `file:<path>`, offset = its line number); a batch's offsets
are committed only after its good records are applied and its dead letters delivered, so nothing is lost.

Applying a batch (`CatalogueFeed.apply`), in this order:
  1 register   the records' side ids go to the store and every item outside the base vocabulary gets a
               global id (stream/catalogue.py; atomic, so feeds and rolls agree). Workers learn them from
               here, without a restart.
  2 embed      for the ACTIVE index version, each record's item that the version was not trained on (a
               cold item) gets its served id (the next index beyond the version's vocabulary) and a vector
               from its side ids alone, the id part being the unknown item's (ColdTables, published for
               that version by the roll or `mind index --redis-url`)
  3 upsert     into the active version; then the active pointer is read again, and a roll that flipped in
               between gets the records too (a roll also upserts every record registered since it began).

Records of trained items only update the catalogue (a version keeps the side ids it was trained with);
cold items without any side id the version knows are registered but not indexed (nothing to embed them
from). Whether a click's own side_ids may create an item: no. The catalogue is the only writer of items:
clicks come from many producers, and letting them define items would let any of them put items into
everyone's recall. A click on an item the catalogue does not know stays the unknown item, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from tqdm.auto import tqdm

from indexer.store import ItemIndex, normalize_version
from mind.model import MIND
from stream.catalogue import CatalogueStore, ColdTables, LiveCatalog, VersionView
from stream.schemas import CatalogRecord, InvalidEvent, dlq_record, dlq_record_for, parse_catalog_record
from stream.settings import Settings, kafka_config
from stream.window import Catalog

log = logging.getLogger(__name__)


class FeedError(RuntimeError):
    """The feed cannot apply records (no base vocabulary, no active index version, no published tables)."""


@dataclass
class FeedStats:
    """What the feed did; `print`ed by `mind catalogue`."""

    records: int = 0  # valid records applied
    new_items: int = 0  # items that got a global id
    trained: int = 0  # records of items the active version was trained on (catalogue updated only)
    indexed: int = 0  # cold items upserted into the active version
    blank: int = 0  # cold items without a side id the active version knows (registered, not indexed)
    dead_letters: int = 0  # bad records sent to the DLQ
    versions: list[str] = field(default_factory=list)  # index versions written
    seconds: float = 0.0

    def add(self, other: FeedStats) -> None:
        for k in ("records", "new_items", "trained", "indexed", "blank", "dead_letters"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.versions = sorted(set(self.versions) | set(other.versions))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- versions: what a roll or a full index publishes --------------------------------------------------- --


def publish_version(store: CatalogueStore, catalog: Catalog, model: MIND, version: str | int) -> LiveCatalog:
    """Publish a model version for the catalogue: its vocabulary (workers follow it by hash; the first one
    published becomes the base) and its cold-start tables (the feed embeds new items with them). Returns
    the catalogue with that vocabulary's view current, every item known so far mapped into it."""
    live = LiveCatalog(catalog, store).attach()
    store.publish_tables(ColdTables.from_model(model, normalize_version(version), catalog.vocab_hash))
    return live


def cold_rows(view: VersionView, raws: Iterable[str] | None = None) -> list[int]:
    """Served ids of the view's cold items that can be embedded (not blank); of `raws` only, if given."""
    ids = view.cold_of(view.cold_raws() if raws is None else raws)
    return sorted(set(ids) - view.blank)


def upsert_cold(
    index: ItemIndex,
    version: str,
    view: VersionView,
    tables: ColdTables,
    ids: Sequence[int],
    chunk: int = 2048,
) -> int:
    """Embed cold items from their side ids with the version's tables and upsert them into `version`."""
    if not ids:
        return 0
    vectors = tables.vectors(view.side_rows(ids))
    return index.upsert(version, np.asarray(ids, dtype=np.int64), vectors, batch=chunk)


# ---- the feed ---------------------------------------------------------------------------------------------


class CatalogueFeed:
    """Applies catalogue records: the store first, then the active index version (module docstring)."""

    def __init__(self, store: CatalogueStore, index: ItemIndex, *, chunk: int = 2048) -> None:
        base = store.base_catalog()
        if base is None:
            raise FeedError(
                f"catalogue {store.name!r} has no base vocabulary yet: it is published when a worker starts, "
                "by `mind roll`, or by `mind index --redis-url ...` (full mode)"
            )
        self.store, self.index, self.chunk = store, index, chunk
        self.live = LiveCatalog(base, store, refresh_s=0.0).attach()

    def _version(self) -> tuple[str, ColdTables, VersionView]:
        version = self.index.active_version(max_age_s=0)
        if version is None:
            raise FeedError("no active item-index version: run `mind index` or `mind roll` first")
        tables = self.store.load_tables(version)
        if tables is None:
            raise FeedError(
                f"no cold-start tables published for index version {version}: roll it (`mind roll`) or "
                "index it with `mind index --redis-url ...`"
            )
        view = self.live.view_for(tables.vocab_hash)
        if view is None:
            raise FeedError(f"vocabulary {tables.vocab_hash} of index version {version} is not published")
        return version, tables, view

    def apply(self, records: Sequence[CatalogRecord]) -> FeedStats:
        """Register the records, then embed and upsert their cold items into the active version."""
        t0 = time.perf_counter()
        stats = FeedStats(records=len(records))
        if not records:
            return stats
        before = len(self.live.space)
        self.store.register(records, self.live.space.base)  # 1: workers may learn them from here on
        self.live.sync(force=True)
        stats.new_items = len(self.live.space) - before
        raws = list(dict.fromkeys(r.item_id for r in records))
        for _ in range(3):  # a roll flipping in between: write the new active version too
            version, tables, view = self._version()
            ids = view.cold_of(raws)
            stats.trained = sum(1 for r in raws if view.is_trained(r))
            stats.blank = sum(1 for i in ids if i in view.blank)
            keep = cold_rows(view, raws)
            stats.indexed = upsert_cold(self.index, version, view, tables, keep, self.chunk)
            stats.versions = sorted(set(stats.versions) | {version})
            if self.index.active_version(max_age_s=0) == version:
                break
        stats.seconds = time.perf_counter() - t0
        log.info(
            "catalogue: %d records, %d new items, %d indexed into %s",
            len(records),
            stats.new_items,
            stats.indexed,
            stats.versions,
        )
        return stats


# ---- dead letters -----------------------------------------------------------------------------------------


class _DeadLetters:
    """Produce dlq.v1 records and make sure every one was delivered before offsets move on."""

    def __init__(self, producer: Producer, topic: str, timeout_s: float = 30.0) -> None:
        self.producer, self.topic, self.timeout_s = producer, topic, timeout_s
        self.errors: list[Any] = []
        self.sent = 0

    def send(self, key: bytes | None, record: bytes) -> None:
        def done(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self.errors.append(err)

        self.producer.produce(self.topic, key=key, value=record, on_delivery=done)
        self.sent += 1
        self.producer.poll(0)

    def flush(self) -> None:
        left = self.producer.flush(self.timeout_s)
        if left or self.errors:
            raise FeedError(f"{left} dead letters undelivered, {len(self.errors)} failed: {self.errors[:3]}")


# ---- sources ----------------------------------------------------------------------------------------------


def feed_file(
    feed: CatalogueFeed,
    path: str | Path,
    producer: Producer,
    dlq_topic: str,
    *,
    batch: int = 1000,
    progress: bool = True,
) -> FeedStats:
    """Apply a JSONL file of catalogue records (blank lines skip); bad lines go to the DLQ topic."""
    path = Path(path)
    stats = FeedStats()
    dlq = _DeadLetters(producer, dlq_topic)
    good: list[CatalogRecord] = []
    t0 = time.perf_counter()
    with (
        path.open("rb") as f,
        tqdm(desc=f"catalogue {path.name}", unit="record", disable=not progress) as bar,
    ):
        for line_no, line in enumerate(f, 1):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                good.append(parse_catalog_record(raw))
            except Exception as exc:  # InvalidEvent, or anything a hostile line provokes: never stop
                dlq.send(None, dlq_record(raw, None, f"file:{path}", 0, line_no, exc))
                log.info("catalogue dead letter: %s line %d: %s", path, line_no, exc)
            bar.update(1)
            if len(good) >= batch:
                stats.add(feed.apply(good))
                good = []
        stats.add(feed.apply(good))
    dlq.flush()
    stats.dead_letters = dlq.sent
    stats.seconds = time.perf_counter() - t0
    return stats


def catalogue_consumer(settings: Settings, bootstrap: str | None = None) -> Consumer:
    """A consumer of the catalogue topic in the feed's own group (`<group_id>-catalog`)."""
    conf = kafka_config(
        settings, "consumer", bootstrap=bootstrap, **{"group.id": f"{settings.group_id}-catalog"}
    )
    return Consumer(conf)


def run_topic(
    feed: CatalogueFeed,
    consumer: Consumer,
    producer: Producer,
    settings: Settings,
    stop: threading.Event | None = None,
    *,
    idle_exit_s: float | None = None,
    batch: int = 1000,
    retry_max_s: float = 5.0,
    on_batch: Callable[[FeedStats], None] | None = None,
) -> FeedStats:
    """Consume the catalogue topic until `stop` is set (or, with idle_exit_s, until nothing came for that
    long). Each batch: validate, apply the good records, deliver the dead letters, then commit. A failure
    of the store or the index retries the same batch with backoff, committing nothing meanwhile."""
    stop = stop or threading.Event()
    stats = FeedStats()
    dlq = _DeadLetters(producer, settings.catalog_dlq_topic)
    consumer.subscribe([settings.catalog_topic])
    idle_since = time.monotonic()
    try:
        while not stop.is_set():
            msgs = [m for m in consumer.consume(batch, timeout=0.2) if m.error() is None]
            if not msgs:
                if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    break
                continue
            idle_since = time.monotonic()
            good: list[CatalogRecord] = []
            sent = dlq.sent
            for m in msgs:
                try:
                    good.append(parse_catalog_record(m.value()))
                except Exception as exc:  # InvalidEvent or anything else: the record's fault, never stop
                    dlq.send(m.key(), dlq_record_for(m, exc))
                    code = exc.code if isinstance(exc, InvalidEvent) else "internal"
                    log.info("catalogue dead letter %s:%d@%d: %s", m.topic(), m.partition(), m.offset(), code)
            wait = 0.1
            while True:
                try:
                    done = feed.apply(good)
                    dlq.flush()
                    break
                except Exception as exc:  # noqa: BLE001 - a server failure: retry the batch, commit nothing
                    if stop.is_set():
                        raise
                    log.warning("catalogue batch failed, retrying in %.1f s: %s", wait, exc)
                    stop.wait(wait)
                    wait = min(retry_max_s, wait * 2)
            done.dead_letters = dlq.sent - sent
            stats.add(done)
            offsets: dict[tuple[str, int], int] = {}
            for m in msgs:
                offsets[(m.topic(), m.partition())] = max(
                    offsets.get((m.topic(), m.partition()), 0), m.offset() + 1
                )
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
            if on_batch is not None:
                on_batch(done)
    finally:
        consumer.close()
        producer.flush(10)
    return stats
