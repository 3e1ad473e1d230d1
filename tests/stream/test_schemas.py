"""schemas/ and stream.schemas: valid and invalid messages, a guard against breaking schema changes, and
hypothesis-generated garbage that must only ever raise InvalidEvent."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream import schemas
from stream.schemas import (
    CATALOG_V1,
    CLICK_V1,
    DLQ_V1,
    ERROR_CODES,
    RECALL_V1,
    Click,
    InvalidEvent,
    dlq_record,
    dlq_record_for,
    dump_click,
    dump_recall,
    load_schema,
    parse_click,
    parse_dlq,
    parse_recall,
    schema_dir,
    validate,
)

DATA = Path(__file__).parent / "data"
NAMES = (CLICK_V1, RECALL_V1, DLQ_V1, CATALOG_V1)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def corpus(name: str) -> list[dict[str, Any]]:
    """Messages that were valid when written (append-only files: see schemas/README.md)."""
    return [json.loads(line) for line in (DATA / f"{name}.examples.jsonl").read_text().splitlines() if line]


def reference(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def test_schema_files_are_valid_2020_12() -> None:
    for name in NAMES:
        s = load_schema(name)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["properties"]["schema"]["const"] == name


# ---- the breaking-change guard ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_old_messages_still_validate(name: str) -> None:
    """Every committed example must validate against the current schema, with both libraries."""
    examples = corpus(name)
    assert len(examples) >= 3
    for ex in examples:
        validate(name, ex)
        reference(load_schema(name)).validate(ex)


def _subschemas(s: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    yield path, s
    for key, sub in s.get("properties", {}).items():
        yield from _subschemas(sub, (*path, "properties", key))
    if isinstance(s.get("items"), dict):
        yield from _subschemas(s["items"], (*path, "items"))


def _at(s: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for p in path:
        s = s[p]
    return s


def _breaking_mutations(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Schema edits that break old messages: a field removed/renamed, a new required field, types and
    (for the click input contract) every bound tightened by one step."""
    base = load_schema(name)
    for path, sub in _subschemas(base):
        for prop in sub.get("properties", {}):
            m = copy.deepcopy(base)
            _at(m, path)["properties"][prop] = {"not": {}}  # field no longer accepted as it was
            yield f"{'/'.join(path)}/{prop} removed", m
        for i, req in enumerate(sub.get("required", [])):
            m = copy.deepcopy(base)
            _at(m, path)["required"][i] = req + "_renamed"
            yield f"{'/'.join(path)} {req} renamed", m
        if "required" in sub:
            m = copy.deepcopy(base)
            _at(m, path)["required"].append("zz_new_required")
            yield f"{'/'.join(path)} new required field", m
        if sub.get("type") == "number":
            m = copy.deepcopy(base)
            _at(m, path)["type"] = "integer"
            yield f"{'/'.join(path)} number -> integer", m
        if name not in (CLICK_V1, CATALOG_V1):  # the input contracts: every bound counts
            continue
        for kw, step in (
            ("maxLength", -1),
            ("maxItems", -1),
            ("maximum", -1),
            ("minLength", 1),
            ("minimum", 1),
        ):
            if kw in sub:
                m = copy.deepcopy(base)
                _at(m, path)[kw] = sub[kw] + step
                yield f"{'/'.join(path)} {kw} tightened", m


@pytest.mark.parametrize("name", NAMES)
def test_corpus_catches_every_breaking_mutation(name: str) -> None:
    """The guard has teeth: each breaking edit of the schema makes some committed example fail."""
    examples = corpus(name)
    missed = []
    n = 0
    for what, mutated in _breaking_mutations(name):
        n += 1
        check = fastjsonschema.compile(mutated)
        failures = 0
        for ex in examples:
            try:
                check(ex)
            except fastjsonschema.JsonSchemaValueException:
                failures += 1
        if failures == 0:
            missed.append(what)
    assert n >= 10
    assert not missed, f"the {name} corpus does not notice: {missed}; add an example that does"


# ---- click: valid and invalid -----------------------------------------------------------------------


def test_parse_valid_clicks() -> None:
    raw = (
        b'{"event_id":"e1","user_id":"u1","item_id":"i1","timestamp":1700000000,"side_ids":["c"],"x":{"y":1}}'
    )
    c = parse_click(raw)
    assert c == Click("e1", "u1", "i1", 1700000000.0, ("c",), ())
    assert isinstance(c.timestamp, float)
    assert parse_click(bytearray(raw)) == c and parse_click(memoryview(raw)) == c
    for ex in corpus(CLICK_V1):
        c = parse_click(orjson.dumps(ex))
        assert (c.event_id, c.user_id, c.item_id) == (ex["event_id"], ex["user_id"], ex["item_id"])
        assert parse_click(dump_click(c)) == c  # round trip


def _click(**kw: Any) -> bytes:
    d: dict[str, Any] = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "timestamp": 1700000000}
    d.update(kw)
    return orjson.dumps({k: v for k, v in d.items() if v is not ...})


INVALID = [
    (None, "not_json", "empty message (null value)"),
    (b"", "not_json", "not JSON: empty payload"),
    (b"x" * 70000, "too_large", "payload of 70000 bytes exceeds 65536"),
    (b'{"event_id": "e1", "user_id":', "not_json", "not JSON: unexpected end of data"),
    (b"\xff\xfe{}", "not_utf8", "invalid UTF-8 at byte 0"),
    (b'{"event_id":"\xc3\x28"}', "not_utf8", "invalid UTF-8 at byte 13"),
    (b"[1, 2]", "not_object", "expected a JSON object, got array"),
    (b'"click"', "not_object", "expected a JSON object, got string"),
    (b"NaN", "not_json", "not JSON"),
    (_click(item_id=...), "schema", "missing field item_id"),
    (b"{}", "schema", "missing fields event_id, user_id, item_id, timestamp"),
    (_click(timestamp="1700000000"), "schema", "timestamp must be a number, got string"),
    (_click(timestamp=True), "schema", "timestamp must be a number, got boolean"),
    (_click(timestamp=-1), "schema", "timestamp must be >= 0, got -1"),
    (_click(timestamp=1700000000000), "schema", "milliseconds?"),
    (_click(user_id=42), "schema", "user_id must be a string, got number"),
    (_click(user_id=""), "schema", "user_id must be 1..128 characters long, got 0"),
    (_click(item_id="i" * 129), "schema", "item_id must be 1..128 characters long, got 129"),
    (_click(side_ids=["a"] * 17), "schema", "side_ids has 17 items, at most 16 allowed"),
    (_click(side_ids=[1]), "schema", "side_ids[0] must be a string, got number"),
    (_click(profile_ids="p1"), "schema", "profile_ids must be an array, got string"),
    (_click(schema="click.v2"), "schema", "schema must be 'click.v1', got 'click.v2'"),
    (_click(event_id=None), "schema", "event_id must be a string, got null"),
]


@pytest.mark.parametrize(("raw", "code", "reason"), INVALID, ids=[f"{c}:{r[:30]}" for _, c, r in INVALID])
def test_invalid_click_reasons(raw: bytes | None, code: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_click(raw)
    assert info.value.code == code and code in ERROR_CODES
    assert reason in info.value.reason, info.value.reason


def test_field_and_max_bytes() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_click(_click(side_ids=["ok", 3]))
    assert info.value.field == "side_ids[1]"
    raw = _click()
    with pytest.raises(InvalidEvent, match="exceeds 10"):
        parse_click(raw, max_bytes=10)
    assert parse_click(raw, max_bytes=len(raw)).user_id == "u1"


# ---- recall and DLQ ---------------------------------------------------------------------------------


def test_recall_round_trip_with_numpy_values() -> None:
    cands = [(np.int64(7), np.float32(0.5), np.int64(1)), {"item_id": "i3", "score": 0.25, "interest": 0}]
    raw = dump_recall(
        "u1", "e9", 1700000000, "mind-3", np.int64(3), cands, produced_at=1700000001, check=True
    )
    msg = parse_recall(raw)
    assert msg["schema"] == "recall.v1" and msg["index_version"] == "3"
    assert msg["candidates"] == [
        {"item_id": "7", "score": 0.5, "interest": 1},
        {"item_id": "i3", "score": 0.25, "interest": 0},
    ]
    assert dump_recall("u", "e", 1.0, "m", "v", [])  # produced_at defaults to now
    with pytest.raises(InvalidEvent, match=r"candidates\[0\].interest must be >= 0"):
        dump_recall("u", "e", 1.0, "m", "v", [("i", 1.0, -1)], check=True)
    for bad in ({"candidates": "x"}, {"model_version": ""}, {"schema": "recall.v0"}):
        ex = {**corpus(RECALL_V1)[0], **bad}
        with pytest.raises(InvalidEvent):
            parse_recall(orjson.dumps(ex))


def test_dlq_records() -> None:
    raw = b'{"user_id":"u1"' + b"\xff" * 3
    err = InvalidEvent("not_utf8", "invalid UTF-8 at byte 15")
    rec = parse_dlq(dlq_record(raw, b"u1", "clicks", 2, 41, err, timestamp_ms=1700000000000))
    assert rec["error_code"] == "not_utf8" and rec["reason"] == "invalid UTF-8 at byte 15"
    assert (rec["topic"], rec["partition"], rec["offset"]) == ("clicks", 2, 41)
    assert schemas.decode_b64(rec["original"]) == raw and base64.b64decode(rec["key"]) == b"u1"
    assert rec["original_truncated"] is False and rec["original_size"] == len(raw)

    big = b"y" * 100_000
    rec = parse_dlq(dlq_record(big, None, "clicks", 0, 0, InvalidEvent("too_large", "big")))
    assert rec["key"] is None and rec["original_truncated"] is True and rec["original_size"] == 100_000
    assert schemas.decode_b64(rec["original"]) == big[: schemas.DLQ_ORIGINAL_MAX]

    rec = parse_dlq(dlq_record(None, "k", "clicks", 0, 3, KeyError("x")))
    assert rec["error_code"] == "internal" and rec["reason"] == "KeyError: 'x'" and rec["original"] == ""

    class Msg:  # the parts of confluent_kafka.Message that dlq_record_for reads
        def value(self) -> bytes:
            return b"[]"

        def key(self) -> bytes:
            return b"u9"

        def topic(self) -> str:
            return "clicks"

        def partition(self) -> int:
            return 1

        def offset(self) -> int:
            return 8

        def timestamp(self) -> tuple[int, int]:
            return (1, 1700000000123)

    try:
        parse_click(Msg().value())
    except InvalidEvent as e:
        rec = parse_dlq(dlq_record_for(Msg(), e))
    assert rec["error_code"] == "not_object" and rec["timestamp_ms"] == 1700000000123 and rec["offset"] == 8


# ---- hostile input: only InvalidEvent, and agreement with the reference validator -------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
click_values = st.one_of(
    json_values,
    st.text(min_size=0, max_size=140),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=130), max_size=20),
)
click_like = st.fixed_dictionaries(
    {},
    optional={
        k: click_values
        for k in ("event_id", "user_id", "item_id", "timestamp", "side_ids", "profile_ids", "schema", "extra")
    },
)


def _only_invalid_event(raw: Any) -> Click | None:
    try:
        return parse_click(raw)
    except InvalidEvent as e:
        assert e.code in ERROR_CODES and e.reason
        return None


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_invalid_event(raw: bytes) -> None:
    _only_invalid_event(raw)


@FAST
@given(st.sampled_from(corpus(CLICK_V1)), st.data())
def test_mangled_valid_clicks_raise_only_invalid_event(example: dict[str, Any], data: st.DataObject) -> None:
    raw = bytearray(orjson.dumps(example))
    cut = data.draw(st.integers(0, len(raw)))
    _only_invalid_event(bytes(raw[:cut]))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    _only_invalid_event(bytes(raw))


@FAST
@given(click_like | json_values)
def test_generated_json_agrees_with_reference_validator(obj: Any) -> None:
    """parse_click accepts exactly what jsonschema (the reference) accepts; nothing else escapes."""
    raw = json.dumps(obj).encode()
    click = _only_invalid_event(raw)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        assert click is None
        return
    ok = isinstance(parsed, dict) and reference(load_schema(CLICK_V1)).is_valid(parsed)
    assert (click is not None) == ok, (obj, click)


def test_the_worker_emits_every_dlq_code_the_schema_lists_but_the_reserved_one() -> None:
    enum = set(json.loads((schema_dir() / "dlq.v1.json").read_text())["properties"]["error_code"]["enum"])
    assert enum - set(ERROR_CODES) == {"unknown_item"}  # reserved in v1, never emitted
    assert set(ERROR_CODES) <= enum
