"""A reproducible corpus of hostile click messages and what the worker must do with each.

    from harness.hostile import hostile_corpus, counts
    corpus = hostile_corpus(1000, seed=0, known_items=[...], user_ids=[...])
    for case in corpus:   # case.key, case.value: the raw Kafka bytes (either may be None)
        ...               # case.outcome "dlq" -> clicks.dlq with error_code case.code
                          # case.outcome "handled" -> applied to the user's window: case.code "applied"
                          # (known item) or "oov" (unknown item, as index 1); case.click is what is applied
    counts(corpus)        # {"cases": 1000, "dlq": ..., "handled": ..., "by_category": ..., "by_code": ...}

The outcome of every case is fixed by how it was built (a missing field, bytes cut mid-document, an
invalid UTF-8 sequence spliced in...), never by running the validator, so the tests that compare the
worker with it are not circular. `CATEGORIES` holds the documented rule of each category; it is the
reliability table of the README.

Generation: 97 hand-written cases (the named edge cases: NaN, a JSON bomb, a byte-order mark,
duplicate JSON keys, boundaries of every bound...) plus hypothesis strategies for the rest. Hypothesis
runs as its public API intends, a @given function (here one per category) whose examples are collected,
with `@seed(seed)`, no example database and only the generate phase: the same seed and hypothesis version
give the same corpus, byte for byte, in any process (`strategy.example()` is not reproducible, and the
internal ConjectureData API is not public). Hypothesis is a dev dependency, imported only when a corpus
is built. The timestamps are relative to `now` (default: the time of the call), so a corpus stays valid
for minutes: "in the future" means at least an hour beyond the worker's allowed skew.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

from stream.schemas import MAX_EVENT_BYTES, Click, click_of

Outcome = Literal["dlq", "handled"]
FIELDS = ("schema", "event_id", "user_id", "item_id", "timestamp", "side_ids", "profile_ids")
REQUIRED = ("event_id", "user_id", "item_id", "timestamp")
MAX_ID = 128  # click.v1 bound on every id
MAX_TS = 1e11  # click.v1 bound on timestamp (rejects milliseconds)

# category -> the documented rule (what the worker does with such a message); README's reliability table.
CATEGORIES: dict[str, str] = {
    # -- dead-lettered (clicks.dlq: error_code, reason, original bytes base64, partition, offset) --
    "not_json": "dlq not_json: not JSON (text, NaN/Infinity, a BOM, trailing data, lone surrogate escapes, "
    "a number beyond float range, nesting deeper than 1024)",
    "empty": "dlq not_json: an empty payload or a null value (tombstone)",
    "truncated": "dlq not_json (or not_utf8 when the cut splits a character): a document cut short",
    "invalid_utf8": "dlq not_utf8: any invalid UTF-8 byte sequence, wherever it is",
    "not_object": "dlq not_object: valid JSON that is not an object (array, string, number, null...)",
    "oversized": "dlq too_large: payload over max_event_bytes (checked before parsing; the DLQ keeps the "
    "first 64 KiB)",
    "wrong_type": "dlq schema: a field of the wrong JSON type (ids must be strings: numbers, even "
    "negative or huge, are refused)",
    "missing_field": "dlq schema: a required field absent",
    "out_of_bounds": "dlq schema: empty or > 128-character ids, negative or > 1e11 (milliseconds) "
    "timestamps, > 16 side/profile ids",
    "future_timestamp": "dlq bad_timestamp: stamped more than max_future_skew_s ahead of the worker's clock",
    # -- handled: applied to the user's window at the message's offset, the user refreshed (recall) --
    "valid_variant": "applied: any valid click (unicode ids, optional fields) is applied once",
    "unknown_item": "applied as OOV: an item outside the model's vocabulary enters the window as index 1, "
    "counted by mind_worker_unknown_items_total, never recalled",
    "new_user": "applied: an unseen user id (any 1..128 characters, control characters included) starts "
    "a window",
    "past_timestamp": "applied: old timestamps (down to 0) are accepted; the window is in arrival order",
    "out_of_order": "applied in arrival (offset) order: the window order ignores timestamps",
    "near_future": "applied: ahead of the clock but within max_future_skew_s",
    "extra_fields": "applied: unknown fields are ignored (forward compatibility), deep or big ones too, "
    "within max_event_bytes; a duplicated JSON key keeps its last value",
    "duplicate_event_id": "applied once: a later message with an event id already applied in its partition "
    "(within the last event_id_memory clicks) is skipped and counted by mind_worker_duplicate_events_total; "
    "its user is still refreshed",
    "null_key": "applied: the worker reads user_id from the payload; a null key lands on a random "
    "partition, whose window for that user it joins",
    "mismatched_key": "applied: a key other than the user id (even non-UTF-8) only picks the partition",
}
DLQ_CATEGORIES = frozenset(k for k, v in CATEGORIES.items() if v.startswith("dlq"))


@dataclass(frozen=True)
class HostileCase:
    """One message: raw key and value (either may be None), and what the worker must do with it.

    outcome "dlq": a dead letter with error_code `code`; outcome "handled": applied to the window,
    `code` "applied" (known item) or "oov" (unknown item), and `click` is the click applied.
    """

    category: str
    key: bytes | None
    value: bytes | None
    outcome: Outcome
    code: str
    click: Click | None = None
    note: str = ""

    @property
    def expected(self) -> tuple[str, str]:
        return self.outcome, self.code


def counts(corpus: Sequence[HostileCase]) -> dict[str, Any]:
    """Totals for reports (`mind chaos`'s bad_inputs, the README table): per outcome, code and category."""
    by_cat: dict[str, Counter[str]] = {}
    for c in corpus:
        by_cat.setdefault(c.category, Counter())[f"{c.outcome}:{c.code}"] += 1
    return {
        "cases": len(corpus),
        "dlq": sum(c.outcome == "dlq" for c in corpus),
        "handled": sum(c.outcome == "handled" for c in corpus),
        "by_code": dict(sorted(Counter(f"{c.outcome}:{c.code}" for c in corpus).items())),
        "by_category": {k: dict(sorted(v.items())) for k, v in sorted(by_cat.items())},
    }


# ---- assembly: a proto (what hypothesis drew) -> bytes and the expected outcome -------------------------


@dataclass
class _Proto:
    """A drawn message before serialisation: the object, its key, and a byte-level transform."""

    category: str
    obj: Any  # a click-like dict (or any JSON value for not_object)
    key: str | bytes | None  # str: encoded as UTF-8
    handled: bool
    code: str = ""  # dlq code when known at draw time
    transform: tuple[
        Any, ...
    ] = ()  # ("truncate", frac) | ("insert", frac, seq) | ("pad", extra) | ("raw", b)
    ascii: bool = False  # json.dumps ensure_ascii
    compact: bool = True
    fresh_user: bool = False  # handled case of a user of its own: its id gets a unique suffix
    same_event: bool = False  # duplicate_event_id: keeps the event id of the proto before it


def _dumps(obj: Any, ascii_only: bool = False, compact: bool = True) -> bytes:
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(obj, ensure_ascii=ascii_only, separators=seps, allow_nan=False).encode()


def _boundaries(raw: bytes) -> list[int]:
    """Byte positions that start a UTF-8 character (and the end): where a splice keeps the rest intact."""
    return [i for i in range(len(raw)) if raw[i] & 0xC0 != 0x80] + [len(raw)]


def _sized(case: HostileCase, max_bytes: int) -> HostileCase:
    """The worker checks the size before anything else: a case over max_event_bytes is `too_large`,
    whatever else it is (only happens with a small max_event_bytes)."""
    if case.value is None or len(case.value) <= max_bytes or case.code == "too_large":
        return case
    note = f"{case.note or case.category}, over max_event_bytes"
    return HostileCase("oversized", case.key, case.value, "dlq", "too_large", None, note)


def _assemble(p: _Proto, known: frozenset[str], max_bytes: int) -> HostileCase:
    return _sized(_build(p, known, max_bytes), max_bytes)


def _build(p: _Proto, known: frozenset[str], max_bytes: int) -> HostileCase:
    key = p.key.encode() if isinstance(p.key, str) else p.key
    if p.handled:
        raw = _dumps(p.obj, p.ascii, p.compact)
        click = click_of(p.obj)
        code = "applied" if click.item_id in known else "oov"
        return HostileCase(p.category, key, raw, "handled", code, click)
    kind = p.transform[0] if p.transform else None
    raw = _dumps(p.obj, p.ascii, p.compact) if kind != "raw" else p.transform[1]
    code = p.code
    if kind == "truncate":
        cut = min(int(p.transform[1] * len(raw)), len(raw) - 1)
        raw = raw[:cut]
        try:
            raw.decode("utf-8")
            code = "not_json"
        except UnicodeDecodeError:
            code = "not_utf8"
    elif kind == "insert":
        spots = _boundaries(raw)
        at = spots[min(int(p.transform[1] * len(spots)), len(spots) - 1)]
        raw = raw[:at] + p.transform[2] + raw[at:]
        code = "not_utf8"
    elif kind == "pad":
        base = len(_dumps({**p.obj, "pad": ""}, p.ascii, p.compact))
        p.obj["pad"] = "x" * max(0, max_bytes - base + p.transform[1])
        raw = _dumps(p.obj, p.ascii, p.compact)
        code = "too_large"
    return HostileCase(p.category, key, raw, "dlq", code)


# ---- hypothesis strategies ---------------------------------------------------------------------------


def _strategies(
    users: Sequence[str], items: Sequence[str], known: frozenset[str], now: float, skew: float
) -> dict[str, Any]:
    """Category -> a strategy of lists of protos (a list: duplicate_event_id yields two messages)."""

    chars = st.characters(codec="utf-8")  # every code point UTF-8 can carry (no lone surrogates)
    text_id = st.text(chars, min_size=1, max_size=48)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(10**20), 10**20)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(chars, max_size=16)
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(chars, max_size=8), inner, max_size=4)
        ),
        max_leaves=10,
    )
    extra_key = st.text(chars, min_size=1, max_size=16).filter(lambda k: k not in FIELDS and k != "pad")
    user = st.sampled_from(list(users))
    known_item = st.sampled_from(list(items))
    unknown_item = text_id.filter(lambda s: s not in known)
    recent = st.floats(now - 3600.0, now, allow_nan=False)

    @st.composite
    def click(
        draw: Any,
        *,
        item: Any = known_item,
        ts: Any = recent,
        who: Any = user,
        optional: bool = True,
        extras: int = 0,
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {"event_id": draw(text_id), "user_id": draw(who), "item_id": draw(item)}
        obj["timestamp"] = draw(ts)
        if optional and draw(st.booleans()):
            obj["schema"] = "click.v1"
        if optional and draw(st.booleans()):
            obj["side_ids"] = draw(st.lists(st.text(chars, min_size=1, max_size=24), max_size=16))
        if optional and draw(st.booleans()):
            obj["profile_ids"] = draw(st.lists(st.text(chars, max_size=24), max_size=16))
        for _ in range(draw(st.integers(0, extras))):
            obj[draw(extra_key)] = draw(values)
        keys = list(obj)
        order = draw(st.permutations(keys))  # field order never matters
        return {k: obj[k] for k in order}

    def proto(category: str, obj: Any, key: Any, handled: bool, **kw: Any) -> Any:
        return st.builds(
            lambda a, c, _o=obj, _k=key: [_Proto(category, _o, _k, handled, ascii=a, compact=c, **kw)],
            st.booleans(),
            st.booleans(),
        )

    def handled(category: str, cl: Any, fresh: bool = False, key: Any = None) -> Any:
        @st.composite
        def go(draw: Any) -> list[_Proto]:
            obj = draw(cl)
            k = obj["user_id"] if key is None else draw(key)
            return draw(proto(category, obj, k, True, fresh_user=fresh))

        return go()

    def dlq(category: str, build: Callable[[Any], tuple[Any, str, tuple[Any, ...]]]) -> Any:
        @st.composite
        def go(draw: Any) -> list[_Proto]:
            obj, code, transform = build(draw)
            key = draw(st.one_of(user, st.none(), st.binary(max_size=12)))
            return draw(proto(category, obj, key, False, code=code, transform=transform))

        return go()

    def wrong_type(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        obj = draw(click(extras=1))
        field = draw(st.sampled_from(FIELDS))
        if field in ("event_id", "user_id", "item_id"):
            bad = draw(values.filter(lambda v: not isinstance(v, str)))
        elif field == "timestamp":
            bad = draw(values.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float))))
        elif field == "schema":
            bad = draw(values.filter(lambda v: v != "click.v1"))
        else:  # side_ids / profile_ids: not an array, or an array holding a non-string
            bad = draw(
                values.filter(lambda v: not isinstance(v, list))
                | st.lists(values, min_size=1, max_size=4).filter(
                    lambda v: any(not isinstance(x, str) for x in v)
                )
            )
        obj[field] = bad
        return obj, "schema", ()

    def missing(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        obj = draw(click(extras=1))
        for f in draw(st.sets(st.sampled_from(REQUIRED), min_size=1)):
            del obj[f]
        return obj, "schema", ()

    def out_of_bounds(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        obj = draw(click())
        what = draw(
            st.sampled_from(["id_empty", "id_long", "ts_neg", "ts_big", "ts_ms", "many", "side_item"])
        )
        if what == "id_empty":
            obj[draw(st.sampled_from(REQUIRED[:3]))] = ""
        elif what == "id_long":
            obj[draw(st.sampled_from(REQUIRED[:3]))] = draw(st.text(chars, min_size=MAX_ID + 1, max_size=300))
        elif what == "ts_neg":
            obj["timestamp"] = draw(st.floats(-1e12, -1e-6) | st.integers(-(10**15), -1))
        elif what == "ts_big":
            obj["timestamp"] = draw(st.floats(MAX_TS * 1.000001, 1e300) | st.integers(10**11 + 1, 10**18))
        elif what == "ts_ms":
            obj["timestamp"] = int(draw(recent) * 1000)  # milliseconds: the commonest producer bug
        elif what == "many":
            f = draw(st.sampled_from(["side_ids", "profile_ids"]))
            obj[f] = draw(st.lists(st.text(chars, min_size=1, max_size=8), min_size=17, max_size=40))
        else:
            obj["side_ids"] = ["ok", draw(st.just("") | st.text(chars, min_size=MAX_ID + 1, max_size=200))]
        return obj, "schema", ()

    def future(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        lo = now + skew + 3600.0
        return draw(click(ts=st.floats(lo, MAX_TS) | st.floats(lo, lo + 86400 * 30))), "bad_timestamp", ()

    def truncated(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        return draw(click(extras=2)), "", ("truncate", draw(st.floats(0.0, 1.0, exclude_max=True)))

    invalid_sequences = st.sampled_from(
        [
            b"\xff",  # never valid
            b"\xfe\xff",  # a UTF-16 byte-order mark
            b"\x80",  # lone continuation byte
            b"\xc3",  # lead byte without its continuation
            b"\xe2\x82",  # 3-byte sequence cut short
            b"\xc0\xaf",  # overlong '/'
            b"\xe0\x80\xaf",  # overlong, 3 bytes
            b"\xed\xa0\x80",  # UTF-16 surrogate encoded as UTF-8 (CESU-8)
            b"\xf4\x90\x80\x80",  # beyond U+10FFFF
            b"\xe9",  # latin-1 'e acute'
        ]
    )

    def invalid_utf8(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        obj = draw(click(extras=1))
        return obj, "", ("insert", draw(st.floats(0.0, 1.0, exclude_max=True)), draw(invalid_sequences))

    def not_json(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        # a first character that starts no JSON value makes the rest irrelevant
        first = draw(st.sampled_from(list("xXaZ<#'@;/*=(") + ["NaN", "Infinity", "undefined", "\u00e9"]))
        rest = draw(st.text(chars, max_size=200))
        obj = draw(click())
        raw = (first + rest).encode() if draw(st.booleans()) else (first + " " + json.dumps(obj)).encode()
        return None, "not_json", ("raw", raw)

    def not_object(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        top = draw(
            scalars | st.lists(values, max_size=6) | st.lists(click(optional=False), min_size=1, max_size=2)
        )
        return top, "not_object", ()

    def oversized(draw: Any) -> tuple[Any, str, tuple[Any, ...]]:
        return draw(click()), "", ("pad", draw(st.integers(1, 4096)))

    fresh_id = st.text(chars, min_size=1, max_size=90)

    @st.composite
    def duplicate(draw: Any) -> list[_Proto]:
        first = draw(click())
        if draw(st.booleans()):  # an exact re-send: same bytes
            second = dict(first)
        else:  # an id collision: same event id, another click of the same user
            second = {**draw(click(who=st.just(first["user_id"]))), "event_id": first["event_id"]}
        return [
            _Proto("duplicate_event_id", first, first["user_id"], True),
            _Proto("duplicate_event_id", second, second["user_id"], True, same_event=True),
        ]

    return {
        "valid_variant": handled("valid_variant", click()),
        "unknown_item": handled("unknown_item", click(item=unknown_item)),
        "new_user": handled("new_user", click(who=fresh_id), fresh=True),
        "past_timestamp": handled("past_timestamp", click(ts=st.floats(0.0, now - 365 * 86400.0))),
        "out_of_order": handled("out_of_order", click(ts=st.floats(now - 7200.0, now - 3601.0))),
        "near_future": handled("near_future", click(ts=st.floats(now, now + skew / 4))),
        "extra_fields": handled("extra_fields", click(extras=6)),
        "duplicate_event_id": duplicate(),
        "null_key": handled("null_key", click(who=fresh_id), fresh=True, key=st.none()),
        "mismatched_key": handled(
            "mismatched_key", click(who=fresh_id), fresh=True, key=st.binary(min_size=1, max_size=16)
        ),
        "wrong_type": dlq("wrong_type", wrong_type),
        "missing_field": dlq("missing_field", missing),
        "out_of_bounds": dlq("out_of_bounds", out_of_bounds),
        "future_timestamp": dlq("future_timestamp", future),
        "truncated": dlq("truncated", truncated),
        "invalid_utf8": dlq("invalid_utf8", invalid_utf8),
        "not_json": dlq("not_json", not_json),
        "not_object": dlq("not_object", not_object),
        "oversized": dlq("oversized", oversized),
    }


# Share of the generated cases per category (duplicate_event_id examples give two messages each).
WEIGHTS = {
    "valid_variant": 6,
    "unknown_item": 5,
    "new_user": 4,
    "past_timestamp": 4,
    "out_of_order": 4,
    "near_future": 3,
    "extra_fields": 5,
    "duplicate_event_id": 2,
    "null_key": 3,
    "mismatched_key": 3,
    "wrong_type": 12,
    "missing_field": 8,
    "out_of_bounds": 8,
    "future_timestamp": 5,
    "truncated": 7,
    "invalid_utf8": 7,
    "not_json": 5,
    "not_object": 4,
    "oversized": 3,
}


def _draw(strategy: Any, k: int, seed: int) -> list[Any]:
    """k examples of `strategy`, reproducibly: a @given function run with @seed, no database, generate
    phase only. Topped up from seed + 1, ... if hypothesis ever stops short (a small search space)."""

    out: list[Any] = []
    for attempt in range(20):
        if len(out) >= k:
            break

        @hseed(seed * 1000 + attempt)
        @settings(
            max_examples=k - len(out),
            database=None,
            deadline=None,
            derandomize=False,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        @given(strategy)
        def collect(x: Any) -> None:
            out.append(x)

        collect()
    return out[:k]


# ---- hand-written cases ------------------------------------------------------------------------------


def _handwritten(
    rng: random.Random,
    users: Sequence[str],
    items: Sequence[str],
    known: frozenset[str],
    now: float,
    skew: float,
    max_bytes: int,
    seed: int,
) -> list[HostileCase]:
    out: list[HostileCase] = []
    n = [0]

    def base(**kw: Any) -> dict[str, Any]:
        n[0] += 1
        d: dict[str, Any] = {
            "event_id": f"hw{seed}-{n[0]}",
            "user_id": rng.choice(users),
            "item_id": rng.choice(items),
            "timestamp": round(now - rng.uniform(1, 60), 3),
        }
        d.update(kw)
        return d

    def dead(category: str, raw: bytes | None, code: str, note: str, key: Any = "user") -> None:
        k = rng.choice(users).encode() if key == "user" else key
        out.append(_sized(HostileCase(category, k, raw, "dlq", code, note=note), max_bytes))

    def ok(
        category: str, obj: dict[str, Any], note: str, raw: bytes | None = None, key: Any = "user"
    ) -> None:
        k = obj["user_id"].encode() if key == "user" else key
        value = _dumps(obj) if raw is None else raw
        click = click_of(obj)
        code = "applied" if click.item_id in known else "oov"
        out.append(_sized(HostileCase(category, k, value, "handled", code, click, note), max_bytes))

    def fresh(tag: str) -> str:
        return f"hw{seed}-{tag}"

    valid = _dumps(base())
    # empty and null
    dead("empty", b"", "not_json", "empty payload")
    dead("empty", None, "not_json", "null value (tombstone)")
    dead("empty", None, "not_json", "null value and null key", key=None)
    dead("not_json", b" \n\t", "not_json", "whitespace only")
    # not JSON
    for raw, note in (
        (b"not json at all", "plain text"),
        (b"{'event_id': 'x'}", "single quotes"),
        (b'{"event_id": "x",}', "trailing comma"),
        (b'{"a": 1} // comment', "comment"),
        (valid + b" x", "trailing garbage"),
        (valid + valid, "two documents"),
        (b"\xef\xbb\xbf" + valid, "UTF-8 byte-order mark"),
        (_dumps({**base(), "timestamp": 0}).replace(b'"timestamp":0', b'"timestamp":NaN'), "NaN"),
        (_dumps({**base(), "timestamp": 0}).replace(b'"timestamp":0', b'"timestamp":Infinity'), "Infinity"),
        (_dumps({**base(), "timestamp": 0}).replace(b'"timestamp":0', b'"timestamp":-Infinity'), "-Infinity"),
        (_dumps({**base(), "timestamp": 0}).replace(b'"timestamp":0', b'"timestamp":1e400'), "1e400"),
        (
            _dumps({**base(), "timestamp": 0}).replace(b'"timestamp":0', b'"timestamp":' + b"9" * 400),
            "400 digits",
        ),
        (
            _dumps(base(user_id="X")).replace(b'"user_id":"X"', b'"user_id":"\\ud800"'),
            "lone surrogate escape",
        ),
        (b"[" * 1100 + b"]" * 1100, "nesting 1100 deep (JSON bomb)"),
        (
            _dumps(base())[:-1] + b',"deep":' + b'{"a":' * 1100 + b"1" + b"}" * 1100 + b"}",
            "an extra field nested 1100 deep",
        ),
        ('{"a": 1}'.encode("utf-16-le"), "UTF-16 without BOM (NUL bytes are valid UTF-8)"),
    ):
        dead("not_json", raw, "not_json", note)
    # truncated
    dead("truncated", valid[:1], "not_json", "first byte only")
    dead("truncated", valid[: len(valid) // 2], "not_json", "half")
    dead("truncated", valid[:-1], "not_json", "last byte missing")
    emoji = _dumps(base(user_id="\U0001f600" * 3))
    cut = emoji.index(b"\xf0\x9f\x98\x80") + 2
    dead("truncated", emoji[:cut], "not_utf8", "cut inside a 4-byte character")
    # invalid UTF-8
    dead("invalid_utf8", b"\xff\xfe\x00{", "not_utf8", "garbage bytes")
    dead("invalid_utf8", '{"a": "é"}'.encode("utf-16"), "not_utf8", "UTF-16 with BOM")
    dead(
        "invalid_utf8", _dumps(base(user_id="caf\u00e9")).replace(b"\xc3\xa9", b"\xe9"), "not_utf8", "latin-1"
    )
    dead("invalid_utf8", _dumps(base(user_id="X")).replace(b'"X"', b'"\xed\xa0\x80"'), "not_utf8", "CESU-8")
    dead("invalid_utf8", _dumps(base(item_id="X")).replace(b'"X"', b'"\xc0\xaf"'), "not_utf8", "overlong")
    # not an object
    for raw in (b"null", b"[]", b"42", b'"a string"', b"true", b"[" + valid + b"]"):
        dead("not_object", raw, "not_object", raw[:20].decode())
    # oversized
    obj = base()
    pad = max_bytes - len(_dumps({**obj, "pad": ""}))
    dead("oversized", _dumps({**obj, "pad": "x" * (pad + 1)}), "too_large", "max_event_bytes + 1")
    dead(
        "oversized",
        _dumps({**base(), "pad": "x" * (max(max_bytes, 65536) * 9)}),
        "too_large",
        "10x (DLQ copy cut)",
    )
    dead("oversized", b"[" * (max_bytes + 1), "too_large", "oversized JSON bomb: size checked first")
    # missing fields, wrong types, bounds
    for f in REQUIRED:
        obj = base()
        del obj[f]
        dead("missing_field", _dumps(obj), "schema", f"no {f}")
    dead("missing_field", b"{}", "schema", "empty object")
    for field, bad, note in (
        ("user_id", 42, "numeric user id"),
        ("user_id", -1, "negative numeric user id"),
        ("item_id", 2**64, "huge numeric item id"),
        ("item_id", -(2**63), "most negative int64 item id"),
        ("event_id", 1.5, "float event id"),
        ("user_id", None, "null user id"),
        ("item_id", [], "array item id"),
        ("item_id", {"id": "3"}, "object item id"),
        ("timestamp", "1700000000", "timestamp as a string"),
        ("timestamp", None, "null timestamp"),
        ("timestamp", True, "boolean timestamp"),
        ("schema", "click.v2", "another schema version"),
        ("side_ids", "a", "side_ids not an array"),
        ("side_ids", [1, 2], "side_ids of numbers"),
        ("profile_ids", {"age": "3"}, "profile_ids as an object"),
    ):
        dead("wrong_type", _dumps(base(**{field: bad})), "schema", note)
    for field, bad, note in (
        ("user_id", "", "empty user id"),
        ("item_id", "", "empty item id"),
        ("event_id", "", "empty event id"),
        ("user_id", "u" * 129, "129-character user id"),
        ("item_id", "\U0001f600" * 129, "129 emoji item id"),
        ("timestamp", -1, "negative timestamp"),
        ("timestamp", round(now * 1000), "milliseconds"),
        ("timestamp", MAX_TS + 1, "just over 1e11"),
        ("side_ids", [str(i) for i in range(17)], "17 side ids"),
        ("profile_ids", ["p"] * 17, "17 profile ids"),
        ("side_ids", [""], "empty side id"),
    ):
        dead("out_of_bounds", _dumps(base(**{field: bad})), "schema", note)
    # timestamps
    dead("future_timestamp", _dumps(base(timestamp=now + 86400)), "bad_timestamp", "one day ahead")
    dead("future_timestamp", _dumps(base(timestamp=now + skew + 3600)), "bad_timestamp", "skew + 1 h ahead")
    dead("future_timestamp", _dumps(base(timestamp=MAX_TS)), "bad_timestamp", "exactly 1e11 (schema allows)")
    ok("past_timestamp", base(timestamp=0), "timestamp 0")
    ok("past_timestamp", base(timestamp=1e-300), "timestamp 1e-300")
    ok("past_timestamp", base(timestamp=978307200.123456789), "year 2001, sub-microsecond digits")
    ok("out_of_order", base(timestamp=now - 86400), "a day older than its neighbours")
    ok("near_future", base(timestamp=now + skew / 4), "within the skew")
    # ids: handled oddities
    ok("new_user", base(user_id=fresh("128") + "\U0001f600" * (MAX_ID - len(fresh("128")))), "128 characters")
    ok("new_user", base(user_id=fresh("-1") + "/../../etc/passwd"), "path-like user id")
    ok("new_user", base(user_id=fresh("ctl") + "\u0000\u001f\u007f"), "control characters in the id")
    ok("new_user", base(user_id=fresh("rtl") + "\u202e\u200b"), "bidi override and zero-width space")
    ok("unknown_item", base(item_id="-1"), "item '-1'")
    ok("unknown_item", base(item_id="99999999999999999999"), "huge numeric string item")
    ok("unknown_item", base(item_id=" "), "blank item id")
    # extra fields, duplicates, formatting
    obj = base()
    ok(
        "extra_fields",
        obj,
        "duplicated JSON key: the last value wins",
        _dumps(obj)[:-1] + b',"user_id":' + json.dumps(obj["user_id"]).encode() + b"}",
    )
    dup = base(item_id="X")
    target = rng.choice(items)
    ok(
        "extra_fields",
        {**dup, "item_id": target},
        "item_id given twice, an unknown then a known one: the last wins",
        _dumps(dup)[:-1] + b',"item_id":' + json.dumps(target).encode() + b"}",
    )
    obj = base()
    depth = max(1, min(500, (max_bytes - len(_dumps(obj)) - 16) // 2))  # within max_event_bytes
    ok(
        "extra_fields",
        {**obj, "deep": []},
        "extra field nested 500 deep",
        _dumps(obj)[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}",
    )
    obj = base()
    room = max(0, (max_bytes - len(_dumps(obj)) - 64) // 2)
    ok(
        "extra_fields",
        {**obj, "bomb": [0] * room},
        "wide array filling max_event_bytes",
        _dumps({**obj, "bomb": [0] * room}),
    )
    ok("extra_fields", base(side_id=["typo"], session_id="s1"), "misspelt and future fields")
    obj = base()
    ok(
        "extra_fields",
        obj,
        "whitespace around the document",
        b"  \n" + json.dumps(obj, indent=2).encode() + b"\n ",
    )
    obj = base(user_id=rng.choice(users))
    ok("extra_fields", obj, "every character escaped", json.dumps(obj, ensure_ascii=True).encode())
    obj = base()
    exact = _dumps({**obj, "pad": ""})
    exact_obj = {**obj, "pad": "x" * (max_bytes - len(exact))}
    ok("extra_fields", exact_obj, "exactly max_event_bytes", _dumps(exact_obj))
    again = base()
    ok("duplicate_event_id", again, "sent twice, byte for byte (1)")
    ok("duplicate_event_id", again, "sent twice, byte for byte (2)")
    ok("null_key", base(user_id=fresh("nullkey")), "valid click, null key", key=None)
    ok("mismatched_key", base(user_id=fresh("badkey")), "non-UTF-8 key", key=b"\xff\xfe\xfd")
    ok(
        "valid_variant",
        base(schema="click.v1", side_ids=["c1"], profile_ids=["", "g=1"]),
        "every optional field",
    )
    return out


# ---- the corpus --------------------------------------------------------------------------------------


def hostile_corpus(
    n: int = 1000,
    seed: int = 0,
    *,
    known_items: Sequence[str] | None = None,
    user_ids: Sequence[str] | None = None,
    max_event_bytes: int = MAX_EVENT_BYTES,
    max_future_skew_s: float = 300.0,
    now: float | None = None,
) -> list[HostileCase]:
    """max(n, 97) hostile click messages in a seeded shuffled order, each with its expected outcome.

    known_items: raw item ids of the serving model's vocabulary (others are OOV; default "2".."101", so
    pass the real ones for "applied" vs "oov" to mean anything); user_ids: existing users whose windows the
    handled cases join (keyed by user id, so on those users' partitions; default "0".."23"). Cases of
    categories new_user, null_key and mismatched_key get user ids of their own (unique in the corpus).
    max_event_bytes / max_future_skew_s: the worker's settings of the same names; now: the clock the
    timestamps are relative to. Same arguments and hypothesis version -> the same corpus.
    """
    known_items = [str(i) for i in range(2, 102)] if known_items is None else known_items
    user_ids = [str(u) for u in range(24)] if user_ids is None else user_ids
    if not known_items or not user_ids:
        raise ValueError("hostile_corpus needs at least one known item and one user id")
    t0 = time.time() if now is None else now
    known = frozenset(known_items)
    items, users = sorted(known), sorted(set(user_ids))
    rng = random.Random(seed)
    cases = _handwritten(rng, users, items, known, t0, max_future_skew_s, max_event_bytes, seed)
    todo = max(0, n - len(cases))
    strategies = _strategies(users, items, known, t0, max_future_skew_s)
    total_w = sum(WEIGHTS.values())
    quota = {c: todo * w // total_w for c, w in WEIGHTS.items()}
    quota["wrong_type"] += todo - sum(quota.values())
    protos: list[list[_Proto]] = []
    for i, (category, k) in enumerate(quota.items()):
        per = 2 if category == "duplicate_event_id" else 1
        protos += _draw(strategies[category], (k + per - 1) // per, seed * 100 + i)
    generated: list[HostileCase] = []
    event = ""
    for j, group in enumerate(protos):
        for p in group:
            if p.handled:
                if p.same_event:
                    p.obj["event_id"] = event
                else:  # unique event ids (a suffix), so a recall message names exactly one click
                    p.obj["event_id"] = event = f"{p.obj['event_id'][:100]}#{seed}.{j}"
                if p.fresh_user:  # a user of its own: the window holds this click alone
                    p.obj["user_id"] = f"{p.obj['user_id'][:100]}#{seed}.{j}"
                    if isinstance(p.key, str):
                        p.key = p.obj["user_id"]
            generated.append(_assemble(p, known, max_event_bytes))
    generated = generated[: max(todo, 0)]
    rng.shuffle(generated)
    out = generated  # hand-written cases spread at random positions among the generated ones
    for c in cases:
        out.insert(rng.randrange(len(out) + 1), c)
    return out
