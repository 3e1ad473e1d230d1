"""`mind publish`: send a click log or a data set to the `clicks` topic, paced, with a progress bar.

Sources:
- a JSONL click log (`*.jsonl`, or fmt="jsonl"): every line is validated with parse_click *before*
  anything is sent (a bad line aborts with file:line and the reason, unless skip_bad), then sent
  byte for byte in file order. `raw=True` skips validation and sends every line unmodified (empty lines
  included), to exercise the worker's dead-letter path.
- any data set mind.loaders reads (RecBole, sequences, pairs): converted to click.v1 events, per user in
  chronological order, users interleaved by timestamp (round-robin by position when the data set has
  no timestamps; the events are then stamped one second apart from 2023-11-14). Event ids are
  `<name>-<user index>-<position>`, so a replay of the same file yields the same ids. Side ids are the
  item's raw side ids; profile ids are the user's raw profile ids up to the first missing field (the
  schema does not admit empty strings).

Keys are user ids, so one user's clicks stay in order on one partition. The producer is idempotent
(acks=all); every message's delivery is confirmed (flush) and failures are counted, not hidden.
Pacing is sleep-to-schedule: message n is due at max(n / rate, (ts_n - ts_0) / speedup) after the start,
so neither a slow consumer of the progress bar nor a GC pause makes the rate drift.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from mind.loaders import DataError, load
from mind.synthetic import START_TS
from stream.schemas import Click, InvalidEvent, dump_click, parse_click
from stream.settings import Settings, kafka_config
from stream.topics import ensure_topics

log = logging.getLogger(__name__)

MAX_IDS = 16  # click.v1 admits at most 16 side / profile ids


class PublishError(RuntimeError):
    """The source cannot be published (bad line, unreadable data set, id the schema refuses): raised
    before anything is sent."""


@dataclass
class PublishStats:
    topic: str
    sent: int = 0  # handed to the producer
    delivered: int = 0  # acknowledged by the broker
    failed: int = 0  # delivery errors, plus messages still undelivered after the final flush
    skipped: int = 0  # invalid lines skipped (skip_bad)
    seconds: float = 0.0
    first_error: str | None = None
    interrupted: bool = False  # Ctrl-C: the rest of the source was not sent

    @property
    def rate(self) -> float:
        """Achieved clicks per second (sent / wall time)."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": round(self.rate, 1)}


# ---- sources --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    timestamp: float | None  # for speedup pacing


def is_click_log(path: Path, fmt: str = "auto") -> bool:
    if fmt != "auto":
        return fmt in ("jsonl", "clicks")
    return path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson")


def _lines(path: Path, limit: int | None) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for no, line in enumerate(f, 1):
            if limit is not None and no > limit:
                return
            yield no, line.rstrip(b"\r\n")


def validate_log(path: Path, limit: int | None = None, skip_bad: bool = False) -> tuple[int, int]:
    """(valid lines, skipped lines) of a click log; the first bad line raises unless skip_bad."""
    good = bad = 0
    for no, line in _lines(path, limit):
        if not line.strip():
            continue
        try:
            parse_click(line)
            good += 1
        except InvalidEvent as exc:
            if not skip_bad:
                raise PublishError(f"{path}:{no}: {exc.reason} (fix it, or pass --skip-bad)") from None
            bad += 1
    return good, bad


def log_messages(path: Path, limit: int | None = None, raw: bool = False) -> Iterator[Message]:
    """The lines of a click log as messages (invalid ones dropped unless raw, already counted)."""
    for _, line in _lines(path, limit):
        if raw:
            key = None
            try:
                obj = orjson.loads(line)
                if isinstance(obj, dict) and isinstance(obj.get("user_id"), str):
                    key = obj["user_id"].encode()
            except orjson.JSONDecodeError:
                pass
            yield Message(key, line, None)
            continue
        if not line.strip():
            continue
        try:
            click = parse_click(line)
        except InvalidEvent:
            continue
        yield Message(click.user_id.encode(), line, click.timestamp)


def dataset_clicks(inter: Any) -> Iterator[Click]:
    """Click events of an mind.dataset.Interactions, users interleaved by time (see module doc)."""

    name = inter.name[:40] or "data"
    side_vocab, prof_vocab = inter.side_vocab, inter.profile_vocab

    def raw_side(s: int) -> str:
        return side_vocab.raw_of(s) if side_vocab is not None else f"side:{s}"

    profiles: list[tuple[str, ...]] = []
    for row in inter.user_profile:
        ids: list[str] = []
        for p in row.tolist()[:MAX_IDS]:
            if not p:
                break
            ids.append(prof_vocab.raw_of(p) if prof_vocab is not None else f"profile:{p}")
        profiles.append(tuple(ids))
    sides: dict[int, tuple[str, ...]] = {}
    timestamps = inter.timestamps
    heap: list[tuple[float, int, int, int]] = []  # (time, position, user, position): one per user
    for u, seq in enumerate(inter.sequences):
        if len(seq):
            heap.append((float(timestamps[u][0]) if timestamps is not None else 0.0, 0, u, 0))
    heapq.heapify(heap)
    n = 0
    while heap:
        t, _, u, pos = heapq.heappop(heap)
        seq = inter.sequences[u]
        item = int(seq[pos])
        side = sides.get(item)
        if side is None:
            side = sides[item] = tuple(raw_side(int(s)) for s in inter.item_side[item] if s)[:MAX_IDS]
        ts = t if timestamps is not None else START_TS + n
        yield Click(f"{name}-{u}-{pos}", inter.users[u], inter.items.raw_of(item), ts, side, profiles[u])
        n += 1
        if pos + 1 < len(seq):
            nxt = float(timestamps[u][pos + 1]) if timestamps is not None else float(pos + 1)
            heapq.heappush(heap, (nxt, pos + 1, u, pos + 1))


def check_dataset(inter: Any) -> None:
    """Refuse, before sending, a data set whose ids click.v1 cannot carry (empty, over 128 characters)."""
    vocabs = {"user": inter.users, "item": inter.items.raw}
    for kind, vocab in (("side", inter.side_vocab), ("profile", inter.profile_vocab)):
        if vocab is not None:
            vocabs[kind] = vocab.raw
    for kind, ids in vocabs.items():
        for raw in ids:
            if isinstance(raw, str) and not 1 <= len(raw) <= 128:
                raise PublishError(
                    f"{kind} id {raw[:40]!r}... has {len(raw)} characters; click.v1 admits 1..128"
                )


def dataset_messages(inter: Any, limit: int | None = None) -> Iterator[Message]:
    """click.v1 messages of a data set; each is also validated (a safety net behind check_dataset)."""
    for n, click in enumerate(dataset_clicks(inter)):
        if limit is not None and n >= limit:
            return
        value = dump_click(click)
        try:
            parse_click(value)  # ids over 128 characters, NaN timestamps...: refuse before sending
        except InvalidEvent as exc:
            raise PublishError(f"event {click.event_id} (user {click.user_id!r}): {exc.reason}") from None
        yield Message(click.user_id.encode(), value, click.timestamp)


# ---- pacing ---------------------------------------------------------------------------------------------


class Schedule:
    """When message n is due (seconds after start): the later of the rate and the speedup schedules."""

    def __init__(self, rate: float | None, speedup: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 clicks/s (None = as fast as possible)")
        if speedup is not None and speedup <= 0:
            raise ValueError("speedup must be > 0 (None = ignore the original pacing)")
        self.rate, self.speedup = rate, speedup
        self.t_first: float | None = None

    def due(self, n: int, timestamp: float | None) -> float:
        d = n / self.rate if self.rate else 0.0
        if self.speedup and timestamp is not None:
            if self.t_first is None:
                self.t_first = timestamp
            d = max(d, (timestamp - self.t_first) / self.speedup)
        return d


# ---- publish --------------------------------------------------------------------------------------------


def publish(
    source: str | os.PathLike[str],
    settings: Settings,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    progress: bool = True,
    *,
    raw: bool = False,
    fmt: str = "auto",
    skip_bad: bool = False,
    topic: str | None = None,
    ensure: bool = True,
    flush_timeout_s: float = 60.0,
) -> PublishStats:
    """Send `source` to settings.clicks_topic (or `topic`); returns counts, achieved rate and errors.

    rate: clicks/s (None = as fast as possible); speedup: replay the original gaps between timestamps
    this many times faster (both: the slower wins); limit: the first N events only.
    ensure: create the topics first when missing (needs admin rights on a production cluster).
    """
    from confluent_kafka import KafkaException, Producer
    from tqdm import tqdm

    path = Path(source)
    if not path.exists():
        raise PublishError(f"{path} does not exist")
    schedule = Schedule(rate, speedup)
    target = topic or settings.clicks_topic
    stats = PublishStats(topic=target)

    total: int | None
    if is_click_log(path, fmt):
        if raw:
            total = None
            messages = log_messages(path, limit, raw=True)
        else:
            total, stats.skipped = validate_log(path, limit, skip_bad)
            messages = log_messages(path, limit)
    else:
        if raw:
            raise PublishError("--raw sends the lines of a JSONL click log; this source is a data set")

        try:
            inter = load(path, fmt=fmt, skip_bad=skip_bad)
        except (DataError, ValueError, OSError) as exc:
            raise PublishError(str(exc)) from exc
        check_dataset(inter)
        n = inter.n_interactions
        total = min(n, limit) if limit is not None else n
        messages = dataset_messages(inter, limit)

    if ensure:
        from confluent_kafka.admin import AdminClient

        try:
            ensure_topics(AdminClient(kafka_config(settings, "admin")), settings)
        except KafkaException as exc:
            log.warning("could not check/create topics (%s); publishing anyway", exc)

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            stats.delivered += 1
        else:
            stats.failed += 1
            if stats.first_error is None:
                stats.first_error = str(err)

    producer = Producer(kafka_config(settings, "producer"))
    bar = tqdm(total=total, unit="click", disable=not progress, smoothing=0.1, mininterval=0.5)
    t0 = time.monotonic()
    pending_bar = 0
    try:  # Ctrl-C: stop sending, still confirm what was sent, report it (stats.interrupted)
        for msg in messages:
            if schedule.rate or schedule.speedup:
                wait = t0 + schedule.due(stats.sent, msg.timestamp) - time.monotonic()
                if wait > 0.001:
                    producer.poll(0)
                    time.sleep(wait)
            while True:
                try:
                    producer.produce(target, msg.value, msg.key, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
            stats.sent += 1
            pending_bar += 1
            if pending_bar >= 256:
                producer.poll(0)
                bar.update(pending_bar)
                pending_bar = 0
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        bar.update(pending_bar)
        bar.close()
        left = producer.flush(flush_timeout_s)
        if left:
            stats.failed += left
            stats.first_error = stats.first_error or f"{left} messages undelivered after {flush_timeout_s}s"
        stats.seconds = time.monotonic() - t0
    return stats
