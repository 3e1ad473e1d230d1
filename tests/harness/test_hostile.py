"""Hostile input: the corpus of harness/hostile.py against the validator (pure, no server), the same
corpus through the real worker on real servers, and hostile HTTP requests against the real candidate view.

- every case gets its documented outcome: a dead letter with its code, its original bytes, key, partition
  and offset, or a click applied exactly once to its window (unknown items as OOV) and refreshed;
- the valid clicks around them are applied exactly once and recalled; the worker never stops;
- the validator only ever raises InvalidEvent (hypothesis, mutated corpus and random bytes);
- the view answers every hostile request with a 4xx JSON error (or aiohttp's parser 400), never a 5xx,
  and keeps serving.
"""

from __future__ import annotations

import http.client
import random
import socket
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from viewkit import running_view
from workerkit import Reader, Running, committed, make_clicks, metric, publish, setup_topics

from harness.hostile import CATEGORIES, DLQ_CATEGORIES, HostileCase, counts, hostile_corpus
from mind.dataset import OOV
from stream.schemas import (
    DLQ_ORIGINAL_MAX,
    ERROR_CODES,
    Click,
    InvalidEvent,
    decode_b64,
    dlq_record,
    dump_click,
    dump_recall,
    parse_dlq,
    parse_recall,
)
from stream.settings import Settings, redis_client
from stream.state import WindowState
from stream.worker import validate_click

NOW = 1_790_000_000.0  # the pure tests' clock: the corpus and the validator agree on it
PURE = Settings(max_event_bytes=65536, max_future_skew_s=300.0)


@pytest.fixture(scope="module")
def corpus() -> list[HostileCase]:
    """The default corpus (1,000 cases, seed 0, default ids); built once per module (~5-9 s)."""
    return hostile_corpus(1000, seed=0, now=NOW)


def outcome(value: bytes | None, s: Settings = PURE, now: float = NOW) -> tuple[str, Any]:
    """What the worker's validation does with one payload: ("handled", Click) or ("dlq", code)."""
    try:
        return "handled", validate_click(value, s, now)
    except InvalidEvent as exc:
        return "dlq", exc.code


# ---- the corpus and the validator, no server --------------------------------------------------------------


def test_corpus_is_big_varied_and_reproducible(corpus: list[HostileCase]) -> None:
    assert len(corpus) >= 1000
    by_cat = Counter(c.category for c in corpus)
    assert set(by_cat) == set(CATEGORIES) and min(by_cat.values()) >= 3, by_cat
    assert {c.outcome for c in corpus if c.category in DLQ_CATEGORIES} == {"dlq"}
    assert {c.outcome for c in corpus if c.category not in DLQ_CATEGORIES} == {"handled"}
    codes = Counter(c.code for c in corpus)
    assert set(codes) == {*ERROR_CODES} - {"internal"} | {"applied", "oov"}, codes
    assert any(c.value is None for c in corpus) and any(c.key is None for c in corpus)
    assert max(len(c.value or b"") for c in corpus) > DLQ_ORIGINAL_MAX  # a DLQ copy gets cut
    notes = {c.note for c in corpus}
    for must in ("NaN", "Infinity", "nesting 1100 deep (JSON bomb)", "empty payload", "milliseconds"):
        assert must in notes
    small = hostile_corpus(150, seed=5, now=NOW)
    assert small == hostile_corpus(150, seed=5, now=NOW)  # same arguments -> same bytes
    assert small != hostile_corpus(150, seed=6, now=NOW)
    print("\nhostile corpus:", orjson.dumps(counts(corpus)).decode())


def test_every_case_gets_its_documented_outcome(corpus: list[HostileCase]) -> None:
    """The expected outcome was fixed by how each case was built; the validator must agree, and each
    rejection must make a valid dlq.v1 record carrying the original bytes."""
    known = {str(i) for i in range(2, 102)}  # hostile_corpus's default vocabulary
    for i, case in enumerate(corpus):
        got, what = outcome(case.value)
        assert got == case.outcome, (case.category, case.note, case.value[:200] if case.value else None)
        if got == "handled":
            assert what == case.click
            assert case.code == ("applied" if what.item_id in known else "oov")
            continue
        assert what == case.code, (case.category, case.note, case.value[:200] if case.value else None)
        with pytest.raises(InvalidEvent) as exc:
            validate_click(case.value, PURE, NOW)
        rec = parse_dlq(dlq_record(case.value, case.key, "clicks", 3, i, exc.value))
        assert (
            rec["error_code"] == case.code and rec["reason"] and (rec["partition"], rec["offset"]) == (3, i)
        )
        body = case.value or b""
        assert decode_b64(rec["original"]) == body[:DLQ_ORIGINAL_MAX] and rec["original_size"] == len(body)
        assert decode_b64(rec["key"]) == case.key


def test_hand_written_cases_hold_for_other_seeds_and_sizes() -> None:
    """n=0 gives the hand-written cases alone (cheap): their outcomes must not depend on the seed's
    choice of users and items, nor on max_event_bytes."""
    for seed, max_bytes in ((1, 65536), (2, 8192), (3, 1000), (4, 70_000)):
        s = Settings(max_event_bytes=max_bytes, max_future_skew_s=PURE.max_future_skew_s)
        cases = hostile_corpus(0, seed=seed, now=NOW, max_event_bytes=max_bytes)
        assert len(cases) >= 90 and {c.category for c in cases} >= {"oversized", "extra_fields"}
        for c in cases:
            got, what = outcome(c.value, s)
            assert (got, what if got == "dlq" else c.code) == c.expected, (seed, c.category, c.note)
            assert got == "dlq" or what == c.click


def _mutants(corpus: list[HostileCase]) -> st.SearchStrategy[bytes | None]:
    """Corpus values, then bytes flipped, inserted, cut or spliced; plus random bytes and None."""
    values = [c.value for c in corpus if c.value is not None and len(c.value) < 20_000]

    @st.composite
    def mutate(draw: Any) -> bytes:
        v = bytearray(draw(st.sampled_from(values)))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(v)))
            op = draw(st.sampled_from(["flip", "insert", "cut", "splice"]))
            if op == "flip" and v:
                v[min(at, len(v) - 1)] ^= draw(st.integers(1, 255))
            elif op == "insert":
                v[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif op == "cut":
                del v[at : at + draw(st.integers(1, 16))]
            else:
                other = draw(st.sampled_from(values))
                v[at:] = other[draw(st.integers(0, len(other))) :]
        return bytes(v)

    return st.sampled_from(values) | mutate() | st.binary(max_size=300) | st.none()


@pytest.fixture(scope="module")
def mutants(corpus: list[HostileCase]) -> st.SearchStrategy[bytes | None]:
    return _mutants(corpus)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_validator_returns_a_click_or_raises_invalid_event(
    mutants: st.SearchStrategy[bytes | None], data: st.DataObject
) -> None:
    raw = data.draw(mutants)
    try:
        click = validate_click(raw, PURE, NOW)
    except InvalidEvent as exc:  # anything else fails the test
        assert exc.code in ERROR_CODES and exc.code != "internal" and exc.reason
        rec = parse_dlq(dlq_record(raw, None, "clicks", 0, 0, exc))
        assert rec["error_code"] == exc.code
        return
    assert isinstance(click, Click) and click.user_id and click.item_id and click.event_id
    assert 0 <= click.timestamp <= NOW + PURE.max_future_skew_s


# ---- the corpus through the real worker ------------------------------------------------------------------


@pytest.mark.slow
def test_hostile_corpus_through_the_real_worker(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, window_len=128, max_event_bytes=8192)
    setup_topics(s)
    users = [str(u) for u in range(24)]
    cases = hostile_corpus(
        1000,
        seed=7,
        known_items=list(wm.inter.items.raw),
        user_ids=users,
        max_event_bytes=s.max_event_bytes,
        max_future_skew_s=s.max_future_skew_s,
    )
    clicks = make_clicks(wm, uid, users, per_user=25, seed=5)
    # interleave, keeping each list's order: hostile messages between and around the valid clicks
    rng = random.Random(11)
    slots = sorted(rng.sample(range(len(clicks) + len(cases)), len(cases)))
    events: list[Click | HostileCase] = []
    ci = hi = 0
    for pos in range(len(clicks) + len(cases)):
        if hi < len(slots) and slots[hi] == pos:
            events.append(cases[hi])
            hi += 1
        else:
            events.append(clicks[ci])
            ci += 1

    def raw(e: Click | HostileCase) -> tuple[str | bytes | None, bytes | None]:
        return (e.user_id, dump_click(e)) if isinstance(e, Click) else (e.key, e.value)

    before = {code: metric("mind_worker_dlq_total", code=code) for code in ERROR_CODES}
    unknown_before = metric("mind_worker_unknown_items_total")
    duplicates_before = metric("mind_worker_duplicate_events_total")
    abandoned_before = metric("mind_worker_batches_total", outcome="abandoned")
    recall = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    dlq = Reader(kafka_bootstrap, s.dlq_topic, s.dlq_partitions)
    t0 = time.monotonic()
    where = publish(kafka_bootstrap, s.clicks_topic, [raw(e) for e in events])

    # what must happen: windows per (partition, user) in offset order, the last click per window
    index = wm.inter.items.get
    applied = [(w, e if isinstance(e, Click) else e.click) for w, e in zip(where, events, strict=True)]
    applied = [(w, c) for w, c in applied if c is not None]
    windows: dict[tuple[int, str], list[int]] = {}
    last: dict[tuple[int, str], str] = {}
    events_seen: set[tuple[int, str]] = set()  # a repeated event id in a partition is skipped (counted)
    duplicates = 0
    for (p, _), c in sorted(applied, key=lambda x: x[0]):
        last[(p, c.user_id)] = c.event_id  # a skipped duplicate still triggers its user's refresh
        if (p, c.event_id) in events_seen:
            duplicates += 1
            continue
        events_seen.add((p, c.event_id))
        windows.setdefault((p, c.user_id), []).append(index(c.item_id))
    assert max(map(len, windows.values())) <= s.window_len  # so the whole history is compared
    for e in events:  # the corpus' applied/oov agrees with the model's vocabulary
        if isinstance(e, HostileCase) and e.click is not None:
            assert (index(e.click.item_id) == OOV) == (e.code == "oov")
    letters_want = {
        w: e for w, e in zip(where, events, strict=True) if isinstance(e, HostileCase) and e.outcome == "dlq"
    }

    worker = Running(s, wm).start()
    try:
        values = recall.until(lambda v: set(last.values()) <= {orjson.loads(x)["event_id"] for x in v}, 120)
        try:
            letters = dlq.until(lambda v: len(v) >= len(letters_want), 60)
        except AssertionError:
            seen = {(d["partition"], d["offset"]) for d in map(parse_dlq, dlq.values)}
            lost = [
                (w, c.category, c.note, len(c.value or b"")) for w, c in letters_want.items() if w not in seen
            ]
            raise AssertionError(
                f"dead letters missing: {lost[:10]}; worker errors {worker.errors}"
            ) from None
        elapsed = time.monotonic() - t0
        assert worker.thread.is_alive() and not worker.errors  # never stopped
    finally:
        worker.close()
        recall.close()
        dlq.close()

    # dead letters: one per DLQ case, with its code, original bytes, key, partition and offset
    got = {(d["partition"], d["offset"]): d for d in map(parse_dlq, letters)}
    assert len(got) == len(letters) == len(letters_want) and set(got) == set(letters_want)
    for w, case in letters_want.items():
        d, body = got[w], case.value or b""
        assert d["error_code"] == case.code, (case.category, case.note, d["reason"])
        assert d["topic"] == s.clicks_topic and d["reason"]
        assert decode_b64(d["original"]) == body[:DLQ_ORIGINAL_MAX] and d["original_size"] == len(body)
        assert d["original_truncated"] == (len(body) > DLQ_ORIGINAL_MAX)
        assert decode_b64(d["key"]) == case.key
    want_codes = Counter(c.code for c in letters_want.values())
    for code in ERROR_CODES:
        assert metric("mind_worker_dlq_total", code=code) - before[code] == want_codes.get(code, 0), code

    # every valid and handled click applied exactly once, in offset order (windows hold every click)
    client = redis_client(s)
    state = WindowState(client, s.clicks_topic, s.window_len)
    keys = sorted(windows)
    assert dict(zip(keys, state.read_windows(keys), strict=True)) == windows
    client.close()
    assert metric("mind_worker_unknown_items_total") - unknown_before == sum(
        1 for _, c in applied if index(c.item_id) == OOV
    )
    assert duplicates > 0 and metric("mind_worker_duplicate_events_total") - duplicates_before == duplicates
    # recall: every window's last click triggered one; only applied clicks trigger any
    msgs = [parse_recall(v) for v in values]
    pairs = {(c.user_id, c.event_id) for _, c in applied}
    assert {(m["user_id"], m["event_id"]) for m in msgs} <= pairs
    assert {(u, e) for (_, u), e in last.items()} <= {(m["user_id"], m["event_id"]) for m in msgs}
    assert metric("mind_worker_batches_total", outcome="abandoned") == abandoned_before
    # every offset committed
    ends: dict[int, int] = {}
    for p, off in where:
        ends[p] = max(ends.get(p, 0), off + 1)
    done = committed(s)
    assert {p: done[p] for p in ends} == ends
    print(
        f"\n{len(cases)} hostile + {len(clicks)} valid messages: {len(letters_want)} dead letters "
        f"{dict(sorted(want_codes.items()))}, {len(applied)} clicks applied in {len(windows)} windows, "
        f"{len(msgs)} recall messages, {elapsed:.1f} s"
    )


# ---- the candidate view's HTTP API -----------------------------------------------------------------------

# "%FF" literally: only %25FF finds it; the last one is HTML, which the user page must escape
VIEW_USERS = ["u0", "u1", "%FF", "a b", "\u00e9t\u00e9", "x" * 128, "<i>x</i>&"]


@pytest.fixture(scope="module")
def view(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`mind view` on a free port over a fresh recall topic holding VIEW_USERS (30 candidates each)."""
    tag = f"h{time.time_ns():x}"[-9:]
    cands = [(f"i{r}", 1.0 - r / 100, r % 4) for r in range(30)]
    msgs: list[tuple[bytes | None, bytes | None]] = [
        (u.encode(), dump_recall(u, f"e{k}", 1.7e9, "m-1", "i-1", cands, check=True))
        for k, u in enumerate(VIEW_USERS)
    ]
    with running_view(
        kafka_bootstrap,
        msgs,
        tmp_path_factory.mktemp("hview"),
        tag,
        lambda h: h.get("users") == len(VIEW_USERS),
    ) as v:
        yield {"port": v.port, "proc": v.proc, "log": v.log}


def request(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, Any, str]:
    """Send raw bytes (nothing normalised, unlike urllib), read the whole answer: (status, body, type).
    The body is the parsed JSON when the answer is JSON, else the text."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)  # with Connection: close, or an error: the server closes after answering
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    ctype = next(
        (v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-type"), ""
    )
    if "chunked" in head.decode("latin-1").lower():
        body = _unchunk(body)
    return (
        status,
        (
            orjson.loads(body)
            if ctype.startswith("application/json") and body
            else body.decode("utf-8", "replace")
        ),
        ctype,
    )


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2 :]
    return out


def get(path: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: v\r\nConnection: close\r\n" + headers + b"\r\n"


# (request, status, a piece of the JSON error); every answer the app gives is JSON
HOSTILE_REQUESTS: list[tuple[str, bytes, int, str]] = [
    ("known user", get(b"/users/u1/candidates"), 200, ""),
    ("top n", get(b"/users/u1/candidates?n=5"), 200, ""),
    ("literal percent id", get(b"/users/%25FF/candidates"), 200, ""),
    ("unicode id", get(b"/users/%C3%A9t%C3%A9/candidates"), 200, ""),
    ("128-character id", get(b"/users/" + b"x" * 128 + b"/candidates"), 200, ""),
    ("unknown user", get(b"/users/nobody/candidates"), 404, "unknown user"),
    ("encoded traversal", get(b"/users/..%2F..%2Fetc%2Fpasswd/candidates"), 404, "unknown user"),
    ("dot segments", get(b"/users/../../etc/passwd/candidates"), 404, "Not Found"),
    ("unknown path", get(b"/admin/../table"), 404, "Not Found"),
    ("faust table page", get(b"/table/candidates/"), 404, "Not Found"),
    ("not UTF-8 id", get(b"/users/%FF%FE/candidates"), 400, "not valid UTF-8"),
    ("surrogate id", get(b"/users/%ED%A0%80/candidates"), 400, "not valid UTF-8"),
    ("malformed escape", get(b"/users/a%ZZ/candidates"), 400, "malformed percent-encoding"),
    ("NUL in id", get(b"/users/a%00b/candidates"), 400, "control character"),
    ("129-character id", get(b"/users/" + b"x" * 129 + b"/candidates"), 400, "longer than 128"),
    ("n zero", get(b"/users/u1/candidates?n=0"), 400, "n must be"),
    ("n huge", get(b"/users/u1/candidates?n=99999999999999999999"), 400, "n must be"),
    ("n negative", get(b"/users/u1/candidates?n=-3"), 400, "n must be"),
    ("n not a number", get(b"/users/u1/candidates?n=abc"), 400, "n must be"),
    ("n unicode digit", get(b"/users/u1/candidates?n=%C2%B2"), 400, "n must be"),
    ("n twice", get(b"/users/u1/candidates?n=1&n=2"), 400, "more than once"),
    ("unknown parameter", get(b"/users/u1/candidates?debug=1"), 400, "unknown query parameter"),
    (
        "many parameters",
        get(b"/users/u1/candidates?" + b"&".join(b"p%d=1" % i for i in range(200))),
        400,
        "query parameters",
    ),
    ("query not UTF-8", get(b"/users/u1/candidates?n=%FF"), 400, "not valid UTF-8"),
    ("healthz with a parameter", get(b"/healthz?x=1"), 400, "unknown query parameter"),
    ("URL over 2 KiB", get(b"/users/" + b"x" * 3000 + b"/candidates"), 414, "URL longer"),
    (
        "GET with a body",
        get(b"/users/u1/candidates", b"Content-Length: 100000\r\n") + b"x" * 100000,
        413,
        "no request body",
    ),
    (
        "chunked body",
        get(b"/users/u1/candidates", b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n",
        413,
        "no request body",
    ),
    (
        "POST",
        b"POST /users/u1/candidates HTTP/1.1\r\nHost: v\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n"
        + b"x" * 5000,
        405,
        "Method Not Allowed",
    ),
    (
        "DELETE",
        b"DELETE /users/u1/candidates HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n",
        405,
        "Method Not Allowed",
    ),
]
# the user page (HTML when found) and its polling endpoint take the same ids and give the same JSON errors
JSON, HTML = "application/json", "text/html"
PAGE_REQUESTS: list[tuple[str, bytes, int, str, str]] = [
    ("page of a known user", get(b"/users/u1"), 200, HTML, ""),
    ("page, top n", get(b"/users/u1?n=5"), 200, HTML, ""),
    ("page, literal percent id", get(b"/users/%25FF"), 200, HTML, ""),
    ("page, unicode id", get(b"/users/%C3%A9t%C3%A9"), 200, HTML, ""),
    ("page, 128-character id", get(b"/users/" + b"x" * 128), 200, HTML, ""),
    ("latest of a known user", get(b"/users/u1/latest"), 200, JSON, ""),
    ("page, unknown user", get(b"/users/nobody"), 404, JSON, "unknown user"),
    (
        "page, encoded traversal",
        get(b"/users/..%2F..%2Fetc%2Fpasswd"),
        404,
        JSON,
        "unknown user",
    ),
    ("page, not UTF-8 id", get(b"/users/%FF%FE"), 400, JSON, "not valid UTF-8"),
    ("page, surrogate id", get(b"/users/%ED%A0%80"), 400, JSON, "not valid UTF-8"),
    ("page, malformed escape", get(b"/users/a%ZZ"), 400, JSON, "malformed percent-encoding"),
    ("page, NUL in id", get(b"/users/a%00b"), 400, JSON, "control character"),
    ("page, 129-character id", get(b"/users/" + b"x" * 129), 400, JSON, "longer than 128"),
    ("page, n zero", get(b"/users/u1?n=0"), 400, JSON, "n must be"),
    (
        "page, unknown parameter",
        get(b"/users/u1?debug=1"),
        400,
        JSON,
        "unknown query parameter",
    ),
    ("page, URL over 2 KiB", get(b"/users/" + b"x" * 3000), 414, JSON, "URL longer"),
    (
        "page, GET with a body",
        get(b"/users/u1", b"Content-Length: 5000\r\n") + b"x" * 5000,
        413,
        JSON,
        "no request body",
    ),
    (
        "page, POST",
        b"POST /users/u1 HTTP/1.1\r\nHost: v\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        405,
        JSON,
        "Method Not Allowed",
    ),
    ("latest, unknown user", get(b"/users/nobody/latest"), 404, JSON, "unknown user"),
    ("latest, a parameter", get(b"/users/u1/latest?n=1"), 400, JSON, "unknown query parameter"),
    ("latest, NUL in id", get(b"/users/a%00b/latest"), 400, JSON, "control character"),
    ("static, unknown file", get(b"/static/..%2F..%2Fview.py"), 404, JSON, "Not Found"),
    ("static, traversal", get(b"/static/../view.py"), 404, JSON, "Not Found"),
    ("metrics with a parameter", get(b"/metrics?x=1"), 400, JSON, "unknown query parameter"),
]
# refused by aiohttp's HTTP parser before any handler: a plain-text 400 (stream/view.py says so)
PARSER_REQUESTS: list[tuple[str, bytes]] = [
    ("raw non-ASCII bytes in the path", get(b"/users/\xff\xfe/candidates")),
    ("request line over 4 KiB", get(b"/users/" + b"x" * 9000 + b"/candidates")),
    ("header over 4 KiB", get(b"/users/u1/candidates", b"X-A: " + b"a" * 5000 + b"\r\n")),
    ("65 headers", get(b"/users/u1/candidates", b"".join(b"X-%d: 1\r\n" % i for i in range(65)))),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n"),
    ("NUL in the method", b"G\x00T / HTTP/1.1\r\nHost: v\r\n\r\n"),
]


@pytest.mark.slow
def test_view_answers_hostile_requests_with_json_4xx(view: dict[str, Any]) -> None:
    port = view["port"]
    for name, raw, want, error in HOSTILE_REQUESTS:
        status, body, ctype = request(port, raw)
        assert status == want, (name, status, body)
        assert ctype.startswith("application/json"), (name, ctype)
        if want >= 400:
            assert body["status"] == want and error in body["error"], (name, body)
    status, body, _ = request(port, get(b"/users/u1/candidates?n=5"))
    assert [c["item_id"] for c in body["candidates"]] == [f"i{r}" for r in range(5)]
    assert request(port, get(b"/users/%25FF/candidates"))[1]["user_id"] == "%FF"
    for name, raw in PARSER_REQUESTS:
        status, body, ctype = request(port, raw)
        assert status == 400 and ctype.startswith("text/plain"), (name, status, body)
    status, health, _ = request(port, get(b"/healthz"))
    assert status == 200 and health["users"] == len(VIEW_USERS)
    assert view["proc"].poll() is None  # still serving
    assert health["rejected_requests"]["400"] >= sum(w == 400 for _, _, w, _ in HOSTILE_REQUESTS)


@pytest.mark.slow
def test_user_page_answers_hostile_requests_like_the_api(view: dict[str, Any]) -> None:
    """The page of a stored user renders (HTML, with its CSP; this view has no stores configured, so it
    says what is missing); every refusal is the API's JSON error."""
    port = view["port"]
    for name, raw, want, ctype_want, error in PAGE_REQUESTS:
        status, body, ctype = request(port, raw)
        assert status == want and ctype.startswith(ctype_want), (name, status, ctype, body)
        if want >= 400:
            assert body["status"] == want and error in body["error"], (name, body)
    status, page, _ = request(port, get(b"/users/%3Ci%3Ex%3C%2Fi%3E%26"))  # a stored id that is HTML
    assert status == 200 and "&lt;i&gt;x&lt;/i&gt;&amp;" in page and "<i>x</i>" not in page
    status, page, _ = request(port, get(b"/users/a%20b"))
    assert status == 200 and '<code id="user-id">a b</code>' in page and "MIND_REDIS_URL" in page
    assert page.count('class="candidate"') == 30
    status, latest, _ = request(port, get(b"/users/%C3%A9t%C3%A9/latest"))
    assert status == 200 and latest["user_id"] == "\u00e9t\u00e9" and latest["event_id"] == "e4"
    assert view["proc"].poll() is None


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    user=st.binary(max_size=160) | st.text(max_size=140).map(lambda t: t.encode("utf-8", "surrogatepass")),
    suffix=st.sampled_from([b"", b"/latest"]),
    params=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=12)), max_size=4),
)
def test_user_page_fuzzed_ids_never_5xx(
    view: dict[str, Any], user: bytes, suffix: bytes, params: list[tuple[str, str]]
) -> None:
    """Any id on the page and its polling route: HTML or JSON 200 only for a stored user, else a JSON 4xx."""
    path = b"/users/" + urllib.parse.quote_from_bytes(user, safe="").encode() + suffix
    query = urllib.parse.urlencode(params).encode()
    status, body, ctype = request(view["port"], get(path + (b"?" + query if query else b"")))
    assert status < 500, (user, suffix, params, status, body)
    if status == 200:
        assert user.decode() in VIEW_USERS
        assert ctype.startswith("text/html" if suffix == b"" else "application/json")
    else:
        assert ctype.startswith("application/json") and status in (400, 404, 414) and body["error"], body


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    user=st.binary(max_size=160) | st.text(max_size=140).map(lambda t: t.encode("utf-8", "surrogatepass")),
    params=st.lists(
        st.tuples(st.text(max_size=8), st.text(max_size=12) | st.integers().map(str)), max_size=10
    ),
)
def test_view_fuzzed_ids_and_queries_never_5xx(
    view: dict[str, Any], user: bytes, params: list[tuple[str, str]]
) -> None:
    """Any id (as percent-encoded bytes) and any query: 200 only for a stored user with a valid n,
    otherwise a JSON 4xx; never a 5xx."""
    path = b"/users/" + urllib.parse.quote_from_bytes(user, safe="").encode() + b"/candidates"
    query = urllib.parse.urlencode(params).encode()
    status, body, ctype = request(view["port"], get(path + (b"?" + query if query else b"")))
    assert ctype.startswith("application/json") and status < 500, (user, params, status, body)
    if status == 200:
        assert user.decode() in VIEW_USERS and all(k == "n" for k, _ in params)
    else:
        assert status in (400, 404, 414) and body["error"], body


@pytest.mark.slow
def test_view_keeps_serving_a_burst_and_a_stalled_client(view: dict[str, Any]) -> None:
    port = view["port"]
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    stalled.sendall(b"GET /users/u1/candidates HTTP/1.1\r\nHost: v\r\nX-Slow: ")  # never finished
    try:
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(8)]

        def hammer(k: int) -> list[int]:
            c, out = conns[k], []
            for i in range(40):
                user = VIEW_USERS[i % 2] if i % 3 else "ghost"
                c.request("GET", f"/users/{user}/candidates?n={1 + i % 50}")
                r = c.getresponse()
                r.read()
                out.append(r.status)
            return out

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = Counter(s for got in pool.map(hammer, range(8)) for s in got)
        dt = time.monotonic() - t0
        for c in conns:
            c.close()
    finally:
        stalled.close()
    assert set(statuses) <= {200, 404, 503} and statuses[200] > 0, statuses
    assert view["proc"].poll() is None
    print(f"\n320 keep-alive requests from 8 clients beside a stalled one: {dict(statuses)} in {dt:.2f} s")
