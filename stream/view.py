"""The candidate view: a faust-streaming app that materialises `recall` into a table and serves it over HTTP.

    GET /users/{id}/candidates[?n=N] -> {user_id, candidates (the best N, 1..10000; all without n),
                                   model_version, index_version, event_id, event_timestamp, produced_at,
                                   freshness_s}
                                  404 unknown user; 400 bad id (empty, > 128 chars, control chars,
                                  malformed percent-encoding, not UTF-8), bad n, unknown or repeated query
                                  parameter, query not UTF-8; 413 any request body; 414 URL > 2 KiB;
                                  503 too many requests in flight or table restoring
    GET /users/{id}            -> the user page (HTML, rendered here): recent behaviours with side ids, each
                                  active interest with its own top items and the behaviours it gathered
                                  (coupling heatmap), the merged list with each candidate's interest, the
                                  model version, freshness; same ids, n and errors (JSON) as the API
    GET /users/{id}/latest     -> {user_id, click_partition, click_offset, event_id, produced_at, version}:
                                  which recall message the view holds now; the page polls it every 2 s
                                  and reloads when `version` changes
    GET /static/user.css, /static/user.js   the page's stylesheet and script (stream/static/)
    GET /metrics               -> Prometheus exposition (below)
    GET /healthz               -> {status, ready, users, consumed, invalid, stale, deleted, rejected_requests}

The user page needs more than the recall message: it reads the key-value store (window, interests),
Milvus (each interest's top items) and Triton (the tower's optional COUPLING output) when it is asked
for, read-only, and the checkpoint (--checkpoint / MIND_CHECKPOINT) for raw item and side ids. The
worker publishes nothing extra: stream/inspect.py says why, and what the page shows when a store or the
checkpoint is missing (the rest, with a note).

Metrics (own registry, served on /metrics of this same loopback bind):
    mind_view_request_seconds{route,status}    histogram: request latency; its _count is the request rate
    mind_view_freshness_seconds                histogram: now - produced_at of every answered list (API, page)
    mind_view_users                            gauge: users in the table
    mind_view_ready                            gauge: 1 once the table is restored from its changelog
    mind_view_messages_consumed_total          recall messages read (tombstones included)
    mind_view_messages_rejected_total{reason}  not stored: invalid (not recall.v1), stale (older than stored)
    mind_view_users_deleted_total              users forgotten by a tombstone
    mind_view_page_source_errors_total{source} user-page reads that failed: redis, triton, milvus, checkpoint
    process_*                                  the view process (CPU, memory, open files)

Every error the app answers is JSON ({"error", "status"}). Requests that aiohttp's HTTP parser refuses
before any handler runs (raw non-ASCII bytes in the request line, a request line over 4 KiB, a header
over 4 KiB, more than 64 headers, a malformed request line) get its plain-text 400. Idle keep-alive
connections are closed after 15 s. Hostile requests are tested in tests/harness/test_hostile.py.

Latest wins: a message replaces the stored one only when its (fence, event_timestamp, produced_at) is not
older (`order_key`), so a re-delivered or late duplicate never rolls a user back, and a click with an earlier
timestamp that arrived later still refreshes the list. A tombstone (null value) deletes.
Invalid recall messages are counted and skipped (the view never crashes on its input).

Store: memory:// by default. The table lives in this process and is rebuilt at start from its changelog
topic (`<app_id>-candidates-changelog`, compacted, created by faust; measured: 500 users back, 0 recall
messages re-read), then the agent resumes `recall` from its committed offsets; a new app id reads `recall`
from the beginning (it is compacted, so that is one message per user plus what compaction has not yet
removed). The embedded broker keeps everything in memory: after *its* restart the view starts empty.
`rocksdb://` keeps the table on disk (needs the faust-streaming[rocksdb] extra, not installed).

Figures (this project's shared 2-core machine, Tansu, recall messages of 50 candidates): about 1.4k
messages/s materialised per process (1.6k without schema validation, which is kept: the view serves
what it validated); first answer about 5 s after start; GET p50 0.17 ms, p99 0.4 ms (keep-alive,
sequential, about 5k requests/s). The user page's clients (pymilvus, tritonclient, matplotlib) add
about 1 s and 140 MB to the start; torch, to read the checkpoint, about 1.4 s and 190 MB more when the
first page is opened. A page takes a few ms per store and 0.3-0.5 s for the heatmap PNG (this 2-core machine).

Faust over Tansu (aiokafka), found by running it:
- the group join waits about half of the session timeout, and faust's default is 60 s: the app uses
  settings.session_timeout_ms (6 s -> the first answer ~5 s after start);
- faust creates its internal topics itself (`<id>-__assignor-__leader`, the changelog); Tansu accepts
  those CreateTopics requests, no auto-creation needed;
- a table's changelog must have as many partitions as its source topic, so topic_partitions is read
  from the broker's metadata for `recall` (created with settings.recall_partitions when missing);
- web_bind defaults to 0.0.0.0 in faust and its built-in /table and /router pages dump table contents:
  the app binds 127.0.0.1 and turns those pages off.

Scale-out: every view process is a full replica only when it has its own app id (--app-id); processes
sharing an id split the partitions between them, and each then answers only for its own users.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stream.inspect import Inspector
from stream.page import CSP, heatmap_png, latest, render_user_page, static_files
from stream.schemas import InvalidEvent, parse_recall
from stream.settings import Settings, kafka_config
from stream.topics import ensure_topics

log = logging.getLogger(__name__)

DEFAULT_PORT = 6066
MAX_ID_CHARS = 128  # as click.v1 / recall.v1 user_id
MAX_URL_BYTES = 2048
MAX_IN_FLIGHT = 256
MAX_N = 10_000  # recall.v1 candidates maxItems
MAX_PARAMS = 8
# aiohttp's HTTP parser and connection limits (its defaults: 8190-byte lines and headers, 128 headers,
# idle keep-alive for an hour)
HANDLER_LIMITS = {"max_line_size": 4096, "max_field_size": 4096, "max_headers": 64, "keepalive_timeout": 15.0}
TABLE = "candidates"
MAX_PAGES = 4  # user pages gathered at once (each reads three stores on a thread); more: 503
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# lists of idle users stay in the compacted topic for days: the tail buckets keep them apart
_FRESHNESS_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    21600.0,
    86400.0,
)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def check_user_id(user_id: str) -> str | None:
    """Why an id from the URL is refused (None = fine): empty, too long, control characters."""
    if not user_id:
        return "empty user id"
    if len(user_id) > MAX_ID_CHARS:
        return f"user id longer than {MAX_ID_CHARS} characters"
    for c in user_id:
        if unicodedata.category(c) in ("Cc", "Cs"):
            return f"user id contains a control character (U+{ord(c):04X})"
    return None


def decode_segment(raw: str) -> tuple[str, str | None]:
    """A raw (percent-encoded) path segment -> (text, None), or ("", why) when it is malformed or not
    UTF-8. aiohttp keeps undecodable escapes as literal text ("%FF"), which would alias a real id."""
    if _BAD_PERCENT.search(raw):
        return "", "malformed percent-encoding in the user id"
    try:
        return urllib.parse.unquote_to_bytes(raw).decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return "", f"user id is not valid UTF-8 (byte {exc.start})"


def parse_query(raw: str, allowed: frozenset[str]) -> tuple[dict[str, str], str | None]:
    """The query string -> ({name: value}, None), or ({}, why): at most MAX_PARAMS, only `allowed`
    names, each once, UTF-8."""
    try:
        pairs = urllib.parse.parse_qsl(
            raw, keep_blank_values=True, errors="strict", max_num_fields=MAX_PARAMS
        )
    except UnicodeDecodeError:
        return {}, "query string is not valid UTF-8"
    except ValueError:
        return {}, f"more than {MAX_PARAMS} query parameters"
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            return {}, f"unknown query parameter {name[:40]!r} (allowed: {names})"
        if name in out:
            return {}, f"query parameter {name!r} given more than once"
        out[name] = value
    return out, None


def parse_n(value: str | None) -> tuple[int | None, str | None]:
    """?n= -> (how many candidates, None), (None, None) when absent, or (None, why)."""
    if value is None:
        return None, None
    if not (value.isascii() and value.isdigit() and len(value) <= 6) or not 1 <= int(value) <= MAX_N:
        return None, f"n must be an integer from 1 to {MAX_N}, got {value[:20]!r}"
    return int(value), None


def order_key(msg: dict[str, Any]) -> tuple[int, float, float]:
    """Which of two recall messages is newer: the higher fence (the partition's log generation and the
    click's offset; a message without one counts its click offset), since a user's clicks share one
    partition and timestamps may arrive out of order, and a zombie worker's late message carries an older
    fence; then by timestamp for messages with neither; then the later production (a re-delivered batch
    recomputes from the same or a newer window)."""
    click = int(msg.get("click_offset", -1))
    return int(msg.get("fence", click)), float(msg["event_timestamp"]), float(msg["produced_at"])


def answer(msg: dict[str, Any], now: float | None = None, n: int | None = None) -> dict[str, Any]:
    """The HTTP body for one stored recall message (its best `n` candidates; all when None)."""
    now = time.time() if now is None else now
    return {
        "user_id": msg["user_id"],
        "candidates": msg["candidates"] if n is None else msg["candidates"][:n],
        "model_version": msg["model_version"],
        "index_version": msg["index_version"],
        "event_id": msg["event_id"],
        "event_timestamp": msg["event_timestamp"],
        "produced_at": msg["produced_at"],
        "freshness_s": round(now - float(msg["produced_at"]), 3),
    }


@dataclass
class ViewStats:
    consumed: int = 0
    invalid: int = 0
    stale: int = 0  # older than the stored message: skipped
    deleted: int = 0
    rejected_requests: dict[str, int] = field(default_factory=dict)


class _TableCollector:
    """The table's size and the message counters, read from ViewStats at scrape time, so that /metrics
    and /healthz never disagree."""

    def __init__(self, stats: ViewStats, users: Callable[[], int], ready: Callable[[], bool]) -> None:
        self.stats, self.users, self.ready = stats, users, ready

    def describe(self) -> Iterator[Metric]:
        return self._families(0, False)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.users(), self.ready())

    def _families(self, users: int, ready: bool) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily(
            "mind_view_users", "Users in the table (the latest recall list of each)", users
        )
        yield GaugeMetricFamily(
            "mind_view_ready", "1 once the table is restored from its changelog", int(ready)
        )
        yield CounterMetricFamily(
            "mind_view_messages_consumed", "Recall messages read (tombstones included)", s.consumed
        )
        rejected = CounterMetricFamily(
            "mind_view_messages_rejected",
            "Recall messages not stored: invalid (not recall.v1) or stale (older than the stored one)",
            labels=["reason"],
        )
        rejected.add_metric(["invalid"], s.invalid)
        rejected.add_metric(["stale"], s.stale)
        yield rejected
        yield CounterMetricFamily("mind_view_users_deleted", "Users forgotten by a tombstone", s.deleted)


class ViewMetrics:
    """The view's Prometheus metrics, in a registry of its own: a process may build several apps (the
    tests do), and each app's /metrics reports its own numbers only."""

    def __init__(self, stats: ViewStats, users: Callable[[], int], ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_TableCollector(stats, users, ready))
        self.requests = Histogram(
            "mind_view_request_seconds",
            "HTTP request latency by route (matched pattern, or 'unmatched') and status",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.freshness = Histogram(
            "mind_view_freshness_seconds",
            "now - produced_at of each answered list (candidates API and user page)",
            buckets=_FRESHNESS_BUCKETS,
            registry=self.registry,
        )
        self.page_errors = Counter(
            "mind_view_page_source_errors",
            "User-page reads that failed, by source (redis, triton, milvus, checkpoint)",
            ["source"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_of(request: Any) -> str:
    """The route label: the matched pattern (bounded), never the raw path (unbounded, attacker-chosen)."""
    route = getattr(request.match_info, "route", None)
    resource = getattr(route, "resource", None)
    return str(resource.canonical) if resource is not None else "unmatched"


def raw_user_id(request: Any, matched: str) -> tuple[str, str | None]:
    """The user id of /users/{id}[/...] from the raw path (aiohttp keeps undecodable escapes as literal
    text), checked: (id, None) or ("", why)."""
    parts = request.rel_url.raw_parts  # ('/', 'users', <raw id>, ...)
    user_id, why = matched, None
    if len(parts) >= 3 and parts[1] == "users":
        user_id, why = decode_segment(parts[2])
    why = why or check_user_id(user_id)
    return ("", why) if why else (user_id, None)


def faust_credentials(settings: Settings) -> Any:
    """Kafka security settings as faust (aiokafka) credentials; None for PLAINTEXT."""
    import faust

    proto = settings.kafka_security_protocol
    if proto in (None, "PLAINTEXT"):
        return None
    ctx = None
    if proto in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=settings.kafka_ssl_ca_location)
        if settings.kafka_ssl_certificate_location:
            pw = settings.kafka_ssl_key_password
            ctx.load_cert_chain(
                settings.kafka_ssl_certificate_location,
                settings.kafka_ssl_key_location,
                pw.get_secret_value() if pw else None,
            )
    if proto == "SSL":
        return faust.SSLCredentials(ctx)
    mech = settings.kafka_sasl_mechanism or "PLAIN"
    if mech == "GSSAPI":
        return faust.GSSAPICredentials(ssl_context=ctx)
    if mech == "OAUTHBEARER":
        raise ValueError("the view does not support SASL OAUTHBEARER (faust needs a token provider)")
    pw = settings.kafka_sasl_password
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=pw.get_secret_value() if pw else None,
        mechanism=mech,
        ssl_context=ctx,
    )


def recall_partitions(settings: Settings, ensure: bool = True, timeout_s: float = 15.0) -> int:
    """Partitions of the recall topic on the broker (created from the settings first when missing)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_config(settings, "admin"))
    if ensure:
        try:
            ensure_topics(admin, settings, timeout_s)
        except KafkaException as exc:  # e.g. no admin rights on a production cluster: use what exists
            log.warning("could not check/create topics (%s)", exc)
    meta = admin.list_topics(settings.recall_topic, timeout=timeout_s).topics.get(settings.recall_topic)
    if meta is None or meta.error is not None or not meta.partitions:
        return settings.recall_partition_count
    return len(meta.partitions)


def create_app(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    app_id: str = "mind-view",
    store: str = "memory://",
    data_dir: str | Path | None = None,
    partitions: int | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    max_url_bytes: int = MAX_URL_BYTES,
) -> Any:
    """Build the faust app (not started). `partitions` None = read from the broker."""
    import faust
    from aiohttp import web as aioweb

    if not settings.kafka_bootstrap:
        raise ValueError("no Kafka bootstrap address: set MIND_KAFKA_BOOTSTRAP, or start the stack (mind up)")
    n = partitions or recall_partitions(settings)
    stats = ViewStats()
    in_flight = 0
    # the table and ready() are defined below; the metrics read them only when scraped
    metrics = ViewMetrics(stats, lambda: len(table), lambda: ready())
    inspector = Inspector(settings)
    page_slots = asyncio.Semaphore(MAX_PAGES)
    files = static_files()

    def reject(status: int, error: str, **extra: Any) -> aioweb.Response:
        stats.rejected_requests[str(status)] = stats.rejected_requests.get(str(status), 0) + 1
        return aioweb.Response(
            body=orjson.dumps({"error": error, "status": status, **extra}),
            status=status,
            content_type="application/json",
        )

    @aioweb.middleware
    async def observed(request: aioweb.Request, handler: Any) -> aioweb.StreamResponse:
        """Every answer counted and timed by route and status (parser 400s never get here)."""
        t0 = time.perf_counter()
        status = 500
        try:
            resp: aioweb.StreamResponse = await handler(request)
            status = resp.status
            return resp
        except aioweb.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.requests.labels(route_of(request), str(status)).observe(time.perf_counter() - t0)

    @aioweb.middleware
    async def limits(request: aioweb.Request, handler: Any) -> aioweb.StreamResponse:
        """Bounded URL, no request body, bounded concurrency (refuse rather than queue), JSON errors."""
        nonlocal in_flight
        if len(request.raw_path) > max_url_bytes:
            return reject(414, f"URL longer than {max_url_bytes} bytes")
        if request.body_exists and request.match_info.http_exception is None:  # 404 / 405 come first
            size = request.content_length
            got = "a chunked body" if size is None else f"{size} bytes"
            return reject(413, f"this API takes no request body (got {got})")
        if in_flight >= max_in_flight:
            resp = reject(503, "too many concurrent requests")
            resp.headers["Retry-After"] = "1"
            return resp
        in_flight += 1
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except aioweb.HTTPException as exc:
            if exc.status < 400:
                raise
            return reject(exc.status, exc.reason)
        finally:
            in_flight -= 1

    datadir = Path(data_dir) if data_dir else settings.run_dir / "view"
    datadir.mkdir(parents=True, exist_ok=True)
    session_s = settings.session_timeout_ms / 1000
    app = faust.App(
        app_id,
        broker=";".join(f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")),
        broker_credentials=faust_credentials(settings),
        broker_session_timeout=session_s,
        broker_heartbeat_interval=(settings.heartbeat_interval_ms or settings.session_timeout_ms // 3) / 1000,
        broker_client_id=f"{settings.kafka_client_id}-view",
        store=store,
        datadir=str(datadir),
        topic_partitions=n,
        topic_replication_factor=settings.replication,
        consumer_auto_offset_reset="earliest",
        web_bind=host,
        web_host=host,
        web_port=port,
        web_application_options={
            "client_max_size": 1024,
            "middlewares": [observed, limits],
            "handler_args": HANDLER_LIMITS,
        },
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_router_enabled=False,
        web_tables_enabled=False,
        web_metrics_enabled=False,
        autodiscover=False,
    )
    recall = app.topic(
        settings.recall_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=n,
    )
    # str keys, dict values, faust's json codec: what goes to the changelog comes back identical on
    # recovery (raw bytes keys would come back as bytes only on one of the two paths).
    table = app.Table(TABLE, default=None, partitions=n, key_type=str, help="latest recall per user")

    @app.agent(recall, name="mind-view-recall")
    async def materialise(stream: Any) -> None:
        async for event in stream.events():
            stats.consumed += 1
            if event.value is None:  # tombstone on the compacted topic: forget the user
                if event.key:
                    user = bytes(event.key).decode("utf-8", "replace")
                    if table.get(user) is not None:
                        del table[user]
                        stats.deleted += 1
                continue
            try:
                msg = parse_recall(event.value)
            except InvalidEvent as exc:
                stats.invalid += 1
                log.warning(
                    "skipped invalid recall message at %s[%d]@%d: %s",
                    event.message.topic,
                    event.message.partition,
                    event.message.offset,
                    exc,
                )
                continue
            user = msg["user_id"]
            old = table.get(user)
            if old is not None and order_key(old) > order_key(msg):
                stats.stale += 1
                continue
            table[user] = msg

    def ready() -> bool:
        """The table is restored from its changelog (before that, a missing user proves nothing)."""
        recovery = getattr(app.tables, "recovery", None)
        return bool(recovery is not None and recovery.completed.is_set())

    def lookup(
        request: Any, user_id: str, params: frozenset[str]
    ) -> tuple[dict[str, Any] | None, Any, int | None]:
        """The stored message of /users/{id}/... and ?n: (msg, None, n), or (None, a JSON error, None)."""
        user_id, why = raw_user_id(request, user_id)
        if why:
            return None, reject(400, why), None
        query, why = parse_query(request.rel_url.raw_query_string, params)
        n, why = (None, why) if why else parse_n(query.get("n"))
        if why:
            return None, reject(400, why), None
        msg = table.get(user_id)
        if msg is None:
            if not ready():
                resp = reject(503, "the view is still restoring its table", user_id=user_id)
                resp.headers["Retry-After"] = "1"
                return None, resp, None
            return None, reject(404, "unknown user", user_id=user_id), None
        return msg, None, n

    @app.page("/users/{user_id}/candidates")
    async def candidates(web: Any, request: Any, user_id: str) -> Any:
        msg, error, n = lookup(request, user_id, frozenset({"n"}))
        if msg is None:
            return error
        body = answer(msg, n=n)
        metrics.freshness.observe(max(0.0, body["freshness_s"]))
        return aioweb.Response(body=orjson.dumps(body), content_type="application/json")

    @app.page("/users/{user_id}/latest")
    async def latest_message(web: Any, request: Any, user_id: str) -> Any:
        msg, error, _ = lookup(request, user_id, frozenset())
        if msg is None:
            return error
        resp = aioweb.Response(body=orjson.dumps(latest(msg)), content_type="application/json")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def build_page(msg: dict[str, Any], n: int | None) -> str:
        """Gather from the stores and render (blocking: on a thread)."""
        look = inspector.look(msg)
        for source in set(look.errors):
            metrics.page_errors.labels(source).inc()
        png = None
        if look.coupling is not None and look.coupling.size:
            labels = [b.item_id for b in look.behaviours[len(look.behaviours) - len(look.coupling) :]]
            try:
                png = heatmap_png(look.coupling, labels)
            except Exception as exc:  # noqa: BLE001 - the page still shows everything else
                look.notes.append(f"the heatmap could not be drawn: {type(exc).__name__}: {exc}")
        return render_user_page(look, png, n=n)

    @app.page("/users/{user_id}")
    async def user_page(web: Any, request: Any, user_id: str) -> Any:
        msg, error, n = lookup(request, user_id, frozenset({"n"}))
        if msg is None:
            return error
        if page_slots.locked():
            resp = reject(503, f"more than {MAX_PAGES} user pages at once")
            resp.headers["Retry-After"] = "1"
            return resp
        async with page_slots:
            text = await asyncio.get_running_loop().run_in_executor(None, build_page, dict(msg), n)
        metrics.freshness.observe(max(0.0, time.time() - float(msg["produced_at"])))
        return aioweb.Response(text=text, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)

    @app.page("/static/{name}")
    async def static(web: Any, request: Any, name: str) -> Any:
        _, why = parse_query(request.rel_url.raw_query_string, frozenset())
        if why:
            return reject(400, why)
        got = files.get(name)
        if got is None:
            return reject(404, "Not Found")
        body, ctype = got
        return aioweb.Response(
            body=body, content_type=ctype, charset="utf-8", headers={"Cache-Control": "no-cache"}
        )

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        _, why = parse_query(request.rel_url.raw_query_string, frozenset())
        if why:
            return reject(400, why)
        return aioweb.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        _, why = parse_query(request.rel_url.raw_query_string, frozenset())
        if why:
            return reject(400, why)
        body = {"status": "ok", "ready": ready(), "users": len(table), **asdict(stats)}
        return aioweb.Response(body=orjson.dumps(body), content_type="application/json")

    app.mind_stats = stats  # for tests and embedding programs
    app.mind_table = table
    app.mind_metrics = metrics
    app.mind_inspector = inspector
    return app


def run_view(settings: Settings, *, log_level: str = "info", **kw: Any) -> None:
    """Run the view in the foreground until SIGTERM/SIGINT (faust's worker: graceful stop, then exit)."""
    import faust

    app = create_app(settings, **kw)
    worker = faust.Worker(app, loglevel=log_level, quiet=True)
    worker.execute_from_commandline()  # exits the process (SystemExit) when the worker stops
