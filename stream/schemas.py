"""Message schemas: load `schemas/*.json` once, validate clicks on the hot path, serialise with orjson.

The JSON Schema files at the repository root are the contract (see schemas/README.md). They are compiled
once with fastjsonschema (measured ~2 µs per click against ~60-90 µs for jsonschema; figures in the README);
jsonschema stays the reference implementation in the tests (meta-schema check and agreement on hostile
input). Every rejection raises InvalidEvent with a machine code (the DLQ `error_code`) and a human reason.
"""

from __future__ import annotations

import base64
import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import fastjsonschema
import orjson

CLICK_V1 = "click.v1"
RECALL_V1 = "recall.v1"
DLQ_V1 = "dlq.v1"
CATALOG_V1 = "catalog.v1"
MAX_EVENT_BYTES = 65536
# The DLQ copies at most this much of the original: an oversized payload, base64-inflated by 4/3, must
# still fit in one Kafka message (1 MB by default), or the DLQ produce itself would fail.
DLQ_ORIGINAL_MAX = 65536

ERROR_CODES = (
    "too_large",  # payload over max_bytes
    "not_utf8",  # bytes are not UTF-8
    "not_json",  # UTF-8 but not JSON (or an empty / null message)
    "not_object",  # JSON, but not an object
    "schema",  # object that breaks the schema (missing field, wrong type, bounds)
    "bad_timestamp",  # valid, but the timestamp is outside what the worker accepts (worker policy)
    "internal",  # anything else the worker could not handle for this message
)


class InvalidEvent(ValueError):
    """A message that cannot be used: `code` is one of ERROR_CODES, `reason` says why in plain words."""

    def __init__(self, code: str, reason: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.field = code, reason, field


class Click(NamedTuple):
    """A validated click (NamedTuple: cheapest immutable record to build ~10k times per second)."""

    event_id: str
    user_id: str
    item_id: str
    timestamp: float
    side_ids: tuple[str, ...] = ()
    profile_ids: tuple[str, ...] = ()


class CatalogRecord(NamedTuple):
    """A validated catalogue record: an item and its raw side ids (`field=value`), the newest wins."""

    item_id: str
    side_ids: tuple[str, ...] = ()
    updated_at: float | None = None


class Candidate(NamedTuple):
    item_id: str
    score: float
    interest: int


# ---- schema files -----------------------------------------------------------------------------------


def schema_dir() -> Path:
    """`$MIND_SCHEMA_DIR`, else `schemas/` at the repository root (this file's grandparent).

    The repo-root location works from a checkout and from an editable install (`make install`).
    """
    env = os.environ.get("MIND_SCHEMA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "schemas"


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema `name` (e.g. "click.v1"), read from schema_dir() once per process."""
    path = schema_dir() / f"{name}.json"
    try:
        schema: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"schema {name} not found at {path}: set MIND_SCHEMA_DIR to the repository's schemas/ folder "
            "or install the project in editable mode (make install)"
        ) from None
    return schema


@functools.cache
def validator(name: str) -> Callable[[Any], Any]:
    """The compiled fastjsonschema validator for `name`, built once per process."""
    return fastjsonschema.compile(load_schema(name))  # type: ignore[no-any-return]


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _explain(e: fastjsonschema.JsonSchemaValueException) -> InvalidEvent:
    """Turn a validator error into a precise human reason ('missing field item_id', ...)."""
    name = e.name or "data"
    field = name[5:] if name.startswith("data.") else ("" if name == "data" else name[4:])
    rule, value, d = e.rule, e.value, e.definition if isinstance(e.definition, dict) else {}
    what = field or "message"
    if rule == "required":
        have = value if isinstance(value, dict) else {}
        missing = [k for k in e.rule_definition if k not in have]
        prefix = f"{field}." if field else ""
        names = ", ".join(prefix + k for k in missing)
        return InvalidEvent(
            "schema", f"missing field{'s' if len(missing) > 1 else ''} {names}", prefix + missing[0]
        )
    if rule == "type":
        want = e.rule_definition
        want = " or ".join(want) if isinstance(want, list) else want
        article = "an" if str(want)[0] in "aeiou" else "a"
        return InvalidEvent("schema", f"{what} must be {article} {want}, got {_jtype(value)}", field)
    if rule in ("minLength", "maxLength"):
        lo, hi = d.get("minLength", 0), d.get("maxLength")
        span = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        n = len(value) if isinstance(value, str) else "?"
        return InvalidEvent("schema", f"{what} must be {span} characters long, got {n}", field)
    if rule in ("maxItems", "minItems"):
        n = len(value) if isinstance(value, list) else "?"
        bound = "at most" if rule == "maxItems" else "at least"
        return InvalidEvent("schema", f"{what} has {n} items, {bound} {e.rule_definition} allowed", field)
    if rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[rule]
        hint = ""
        if field == "timestamp" and rule == "maximum":
            hint = " (unix seconds expected; milliseconds?)"
        return InvalidEvent(
            "schema", f"{what} must be {op} {e.rule_definition}, got {_short(value)}{hint}", field
        )
    if rule == "const":
        return InvalidEvent("schema", f"{what} must be {e.rule_definition!r}, got {_short(value)}", field)
    if rule == "enum":
        return InvalidEvent(
            "schema", f"{what} must be one of {e.rule_definition}, got {_short(value)}", field
        )
    msg = e.message[5:] if e.message.startswith("data.") else e.message
    return InvalidEvent("schema", msg, field or None)


def validate(name: str, obj: Any) -> None:
    """Check `obj` against schema `name`; raise InvalidEvent (code "schema") with a precise reason."""
    try:
        validator(name)(obj)
    except fastjsonschema.JsonSchemaValueException as e:
        raise _explain(e) from None


def _loads(raw: bytes | bytearray | memoryview | None, max_bytes: int) -> Any:
    """orjson.loads with size, UTF-8 and JSON diagnostics mapped to InvalidEvent codes."""
    if raw is None:
        raise InvalidEvent("not_json", "empty message (null value)")
    n = len(raw)
    if n > max_bytes:
        raise InvalidEvent("too_large", f"payload of {n} bytes exceeds {max_bytes}")
    if n == 0:
        raise InvalidEvent("not_json", "not JSON: empty payload")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        # Diagnose only on failure, so valid messages pay no second pass over their bytes.
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as u:
            raise InvalidEvent("not_utf8", f"invalid UTF-8 at byte {u.start}") from None
        raise InvalidEvent("not_json", f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _parse_object(raw: bytes | bytearray | memoryview | None, name: str, max_bytes: int) -> dict[str, Any]:
    obj = _loads(raw, max_bytes)
    if type(obj) is not dict:
        raise InvalidEvent("not_object", f"expected a JSON object, got {_jtype(obj)}")
    try:
        validator(name)(obj)
    except fastjsonschema.JsonSchemaValueException as e:
        raise _explain(e) from None
    except Exception as e:  # a validator crash on hostile input is still that input's fault: never escape
        raise InvalidEvent("schema", f"unvalidatable message ({type(e).__name__}: {e})") from None
    return obj


# ---- click (hot path) -------------------------------------------------------------------------------


def parse_click(raw: bytes | bytearray | memoryview | None, max_bytes: int = MAX_EVENT_BYTES) -> Click:
    """Bytes from `clicks` -> Click, or InvalidEvent. Unknown extra fields are accepted and dropped."""
    return click_of(_parse_object(raw, CLICK_V1, max_bytes))


def click_of(obj: dict[str, Any]) -> Click:
    """A click.v1 object that passed validation -> Click."""
    return Click(
        obj["event_id"],
        obj["user_id"],
        obj["item_id"],
        float(obj["timestamp"]),
        tuple(obj.get("side_ids", ())),
        tuple(obj.get("profile_ids", ())),
    )


def dump_click(click: Click) -> bytes:
    """Click -> click.v1 bytes (what `mind publish` and the tests send); empty id lists are omitted."""
    d: dict[str, Any] = {
        "schema": CLICK_V1,
        "event_id": click.event_id,
        "user_id": click.user_id,
        "item_id": click.item_id,
        "timestamp": click.timestamp,
    }
    if click.side_ids:
        d["side_ids"] = list(click.side_ids)
    if click.profile_ids:
        d["profile_ids"] = list(click.profile_ids)
    return orjson.dumps(d)


# ---- catalogue ----------------------------------------------------------------------------------------


def parse_catalog_record(
    raw: bytes | bytearray | memoryview | None, max_bytes: int = MAX_EVENT_BYTES
) -> CatalogRecord:
    """Bytes from `catalog` (or one JSONL line) -> CatalogRecord, or InvalidEvent (the DLQ's reason)."""
    obj = _parse_object(raw, CATALOG_V1, max_bytes)
    at = obj.get("updated_at")
    return CatalogRecord(obj["item_id"], tuple(obj["side_ids"]), None if at is None else float(at))


def dump_catalog_record(record: CatalogRecord) -> bytes:
    """CatalogRecord -> catalog.v1 bytes (what tests and tools publish)."""
    d: dict[str, Any] = {"schema": CATALOG_V1, "item_id": record.item_id, "side_ids": list(record.side_ids)}
    if record.updated_at is not None:
        d["updated_at"] = record.updated_at
    return orjson.dumps(d)


# ---- recall -----------------------------------------------------------------------------------------


def dump_recall(
    user_id: str,
    event_id: str,
    event_timestamp: float,
    model_version: str,
    index_version: str,
    candidates: Iterable[Candidate | tuple[Any, Any, Any] | Mapping[str, Any]],
    produced_at: float | None = None,
    *,
    click: tuple[int, int] | None = None,
    fence: int | None = None,
    check: bool = False,
) -> bytes:
    """One recall.v1 message. Candidates are (item_id, score, interest) tuples or mappings, best first.
    `click` is the triggering click's (partition, offset); `fence` (stream.state.fence) orders a user's
    messages: the view, and any reader of the compacted topic, keeps the one with the highest.

    Values are cast to str/float/int so numpy scalars serialise. `check=True` validates (tests, debug).
    """
    cands = []
    for c in candidates:
        if isinstance(c, Mapping):
            item, score, k = c["item_id"], c["score"], c["interest"]
        else:
            item, score, k = c
        cands.append({"item_id": str(item), "score": float(score), "interest": int(k)})
    d = {
        "schema": RECALL_V1,
        "user_id": user_id,
        "event_id": event_id,
        "event_timestamp": float(event_timestamp),
        "produced_at": time.time() if produced_at is None else float(produced_at),
        "model_version": str(model_version),
        "index_version": str(index_version),
        "candidates": cands,
    }
    if click is not None:
        d["click_partition"], d["click_offset"] = int(click[0]), int(click[1])
    if fence is not None:
        d["fence"] = int(fence)
    if check:
        validate(RECALL_V1, d)
    return orjson.dumps(d)


def parse_recall(raw: bytes | bytearray | memoryview | None, max_bytes: int = 4 << 20) -> dict[str, Any]:
    """Bytes from `recall` -> the validated message as a dict (for the candidate view and tests)."""
    return _parse_object(raw, RECALL_V1, max_bytes)


# ---- dead letters -----------------------------------------------------------------------------------


def _b64(b: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(b).decode("ascii")


def dlq_record(
    raw: bytes | bytearray | memoryview | None,
    key: bytes | bytearray | memoryview | str | None,
    topic: str,
    partition: int,
    offset: int,
    err: BaseException,
    *,
    timestamp_ms: int | None = None,
    failed_at: float | None = None,
    original_max: int = DLQ_ORIGINAL_MAX,
) -> bytes:
    """A dlq.v1 record for one rejected message: why (code, reason, field), where from, original bytes.

    `err` is usually an InvalidEvent; any other exception is recorded as code "internal".
    """
    if isinstance(err, InvalidEvent):
        code, reason, field = err.code, err.reason, err.field
    else:
        code, reason, field = "internal", f"{type(err).__name__}: {err}", None
    body = b"" if raw is None else bytes(raw)
    if isinstance(key, str):
        key = key.encode()
    d: dict[str, Any] = {
        "schema": DLQ_V1,
        "error_code": code,
        "reason": reason[:2000],
        "field": field,
        "topic": topic,
        "partition": int(partition),
        "offset": int(offset),
        "original": _b64(body[:original_max]),
        "original_size": len(body),
        "original_truncated": len(body) > original_max,
        "key": None if key is None else _b64(key),
        "timestamp_ms": timestamp_ms,
        "failed_at": time.time() if failed_at is None else float(failed_at),
    }
    return orjson.dumps(d)


def dlq_record_for(msg: Any, err: BaseException, **kw: Any) -> bytes:
    """dlq_record() from a confluent_kafka.Message (value, key, topic, partition, offset, timestamp)."""
    ts_type, ts = msg.timestamp()
    return dlq_record(
        msg.value(),
        msg.key(),
        msg.topic(),
        msg.partition(),
        msg.offset(),
        err,
        timestamp_ms=ts if ts_type else None,
        **kw,
    )


def parse_dlq(raw: bytes | bytearray | memoryview | None, max_bytes: int = 4 << 20) -> dict[str, Any]:
    """Bytes from `clicks.dlq` -> validated dict; `original`/`key` stay base64 (see decode_b64)."""
    return _parse_object(raw, DLQ_V1, max_bytes)


def decode_b64(s: str | None) -> bytes | None:
    """Inverse of the DLQ's base64 fields."""
    return None if s is None else base64.b64decode(s)
