"""The candidate view: a faust-streaming app that materialises `recall` into a table and serves it over HTTP.

    GET /users/{id}/candidates[?n=N] -> {user_id, candidates (the best N, 1..10000; all without n),
                                   model_version, index_version, event_id, event_timestamp, produced_at,
                                   freshness_s}
                                  404 unknown user; 400 bad id (empty, > 128 chars, control chars,
                                  malformed percent-encoding, not UTF-8), bad n, unknown or repeated query
                                  parameter, query not UTF-8; 413 any request body; 414 URL > 2 KiB;
                                  503 too many requests in flight or table restoring
    GET /healthz               -> {status, ready, users, consumed, invalid, stale, deleted, rejected_requests}

Every error the app answers is JSON ({"error", "status"}). Requests that aiohttp's HTTP parser refuses
before any handler runs (raw non-ASCII bytes in the request line, a request line over 4 KiB, a header
over 4 KiB, more than 64 headers, a malformed request line) get its plain-text 400. Idle keep-alive
connections are closed after 15 s. Hostile requests are tested in tests/stream/test_hostile.py.

Latest wins: a message replaces the stored one only when its (click_offset, event_timestamp, produced_at)
is not older, so a re-delivered or late duplicate never rolls a user back, and a click with an earlier
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
sequential, about 5k requests/s).

Faust over Tansu (aiokafka), found by running it:
- the group join waits about half of the session timeout, and faust's default is 60 s: the app uses
  settings.session_timeout_ms (6 s -> the first answer ~5 s after start);
- faust creates its internal topics itself (`<id>-__assignor-__leader`, the changelog); Tansu accepts
  those CreateTopics requests, no auto-creation needed;
- a table's changelog must have as many partitions as its source topic, so topic_partitions is read
  from the broker's metadata for `recall` (created with settings.partitions when missing);
- web_bind defaults to 0.0.0.0 in faust and its built-in /table and /router pages dump table contents:
  the app binds 127.0.0.1 and turns those pages off.

Scale-out: every view process is a full replica only when it has its own app id (--app-id); processes
sharing an id split the partitions between them, and each then answers only for its own users.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
import unicodedata
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

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
    """Which of two recall messages is newer: the later click by offset (a user's clicks share one
    partition, and timestamps may arrive out of order), then by timestamp for messages without an offset,
    then the later production (a re-delivered batch recomputes from the same or a newer window)."""
    return int(msg.get("click_offset", -1)), float(msg["event_timestamp"]), float(msg["produced_at"])


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
        return settings.partitions
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

    def reject(status: int, error: str, **extra: Any) -> aioweb.Response:
        stats.rejected_requests[str(status)] = stats.rejected_requests.get(str(status), 0) + 1
        return aioweb.Response(
            body=orjson.dumps({"error": error, "status": status, **extra}),
            status=status,
            content_type="application/json",
        )

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
            "middlewares": [limits],
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

    @app.page("/users/{user_id}/candidates")
    async def candidates(web: Any, request: Any, user_id: str) -> Any:
        parts = request.rel_url.raw_parts  # ('/', 'users', <raw id>, 'candidates')
        why = None
        if len(parts) == 4:
            user_id, why = decode_segment(parts[2])
        why = why or check_user_id(user_id)
        if why:
            return reject(400, why)
        query, why = parse_query(request.rel_url.raw_query_string, frozenset({"n"}))
        n, why = (None, why) if why else parse_n(query.get("n"))
        if why:
            return reject(400, why)
        msg = table.get(user_id)
        if msg is None:
            if not ready():
                resp = reject(503, "the view is still restoring its table", user_id=user_id)
                resp.headers["Retry-After"] = "1"
                return resp
            return reject(404, "unknown user", user_id=user_id)
        return aioweb.Response(body=orjson.dumps(answer(msg, n=n)), content_type="application/json")

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        _, why = parse_query(request.rel_url.raw_query_string, frozenset())
        if why:
            return reject(400, why)
        body = {"status": "ok", "ready": ready(), "users": len(table), **asdict(stats)}
        return aioweb.Response(body=orjson.dumps(body), content_type="application/json")

    app.mind_stats = stats  # for tests and embedding programs
    app.mind_table = table
    return app


def run_view(settings: Settings, *, log_level: str = "info", **kw: Any) -> None:
    """Run the view in the foreground until SIGTERM/SIGINT (faust's worker: graceful stop, then exit)."""
    import faust

    app = create_app(settings, **kw)
    worker = faust.Worker(app, loglevel=log_level, quiet=True)
    worker.execute_from_commandline()  # exits the process (SystemExit) when the worker stops
