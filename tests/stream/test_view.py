"""The candidate view (`mind view`, faust over a real Tansu broker) in its own process: the latest list per
user, 404 / 400 / 414 as JSON, stale and invalid messages never served, `mind candidates`, /metrics, the
user page without any store configured, SIGTERM. The user page over a live replay, in a real browser:
test_user_page.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from viewkit import running_view

from stream.schemas import dump_recall
from stream.view import answer, check_user_id

MIND = [sys.executable, "-m", "cli"]
T = 1_700_000_000.0


def _recall(
    user: str, event: str, ts: float, produced: float, items: list[str], click: tuple[int, int] | None = None
) -> bytes:
    cands = [(item, 1.0 - r / 10, r % 2) for r, item in enumerate(items)]
    return dump_recall(user, event, ts, "m-1", "i-1", cands, produced_at=produced, click=click, check=True)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


@pytest.fixture(scope="module")
def view(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Recall messages on a fresh topic, then `mind view` on a free port, waited for until all are in."""
    uid = f"{time.time_ns():x}"[-8:]
    now = time.time()
    msgs: list[tuple[bytes | None, bytes | None]] = []
    for u in range(20):
        for k in range(3):  # three refreshes per user; the last one must win
            msgs.append(
                (
                    f"u{u}".encode(),
                    _recall(f"u{u}", f"e{u}-{k}", T + k, now + k, [f"i{u}-{k}-{r}" for r in range(5)]),
                )
            )
    msgs.append((b"u0", _recall("u0", "e0-old", T - 5, now + 9, ["old"])))  # late, older click: stale
    # out-of-order timestamps: the click at the later offset wins although its timestamp is earlier;
    # a re-sent message of an earlier offset is stale although produced last
    msgs.append((b"oo", _recall("oo", "oo-10", T + 5, now, ["a"], click=(1, 10))))
    msgs.append((b"oo", _recall("oo", "oo-11", T + 1, now + 1, ["b"], click=(1, 11))))
    msgs.append((b"oo", _recall("oo", "oo-9", T + 9, now + 2, ["c"], click=(1, 9))))
    msgs.append((b"u1", b"not json"))  # invalid: skipped, counted
    msgs.append((b"u2", None))  # tombstone: u2 forgotten
    msgs.append((b"u/1", _recall("u/1", "e-slash", T, now, ["s"])))  # legal id with a slash
    t0 = time.monotonic()
    with running_view(
        kafka_bootstrap, msgs, tmp_path_factory.mktemp("view"), uid, lambda h: h["consumed"] >= len(msgs)
    ) as v:
        print(f"\nview answered with all {len(msgs)} messages in {time.monotonic() - t0:.1f}s")
        yield {"url": v.url, "proc": v.proc, "health": v.health, "env": v.env, "now": now, "log": v.log}


def test_latest_list_per_user(view: dict[str, Any]) -> None:
    for u in (0, 1, 7, 19):
        status, body = _get(f"{view['url']}/users/u{u}/candidates")
        assert status == 200
        assert body["event_id"] == f"e{u}-2"  # newest click wins; u0's late older message did not
        assert [c["item_id"] for c in body["candidates"]] == [f"i{u}-2-{r}" for r in range(5)]
        assert (body["model_version"], body["index_version"]) == ("m-1", "i-1")
        assert body["event_timestamp"] == T + 2 and body["produced_at"] == pytest.approx(view["now"] + 2)
        assert 0 < body["freshness_s"] < 600
    status, body = _get(f"{view['url']}/users/u%2F1/candidates")
    assert status == 200 and body["user_id"] == "u/1"
    h = view["health"]
    assert (h["users"], h["stale"], h["invalid"], h["deleted"]) == (21, 2, 1, 1) and h["ready"]


def test_a_later_click_wins_over_a_later_timestamp(view: dict[str, Any]) -> None:
    status, body = _get(f"{view['url']}/users/oo/candidates")
    assert status == 200
    assert (body["event_id"], [c["item_id"] for c in body["candidates"]]) == ("oo-11", ["b"])


def test_unknown_and_hostile_ids(view: dict[str, Any]) -> None:
    url = view["url"]
    assert _get(f"{url}/users/nobody/candidates") == (
        404,
        {"error": "unknown user", "status": 404, "user_id": "nobody"},
    )
    assert _get(f"{url}/users/u2/candidates")[0] == 404  # deleted by its tombstone
    for bad, why in (("x" * 129, "longer than 128"), ("a%00b", "control character"), ("a%0Ab", "control")):
        status, body = _get(f"{url}/users/{bad}/candidates")
        assert status == 400 and why in body["error"]
    assert _get(f"{url}/users/{'x' * 3000}/candidates")[0] == 414
    assert _get(f"{url}/table/")[0] == 404  # faust's table dump page is off
    req = urllib.request.Request(f"{url}/users/u1/candidates", data=b"x" * 10_000, method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code in (405, 413)


def test_mind_candidates(view: dict[str, Any]) -> None:
    env, url = view["env"], view["url"]
    out = subprocess.run(
        [*MIND, "candidates", "u3", "--url", url, "--top", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "model m-1" in out.stdout and "i3-2-0" in out.stdout and "i3-2-3" not in out.stdout
    assert "2 more" in out.stdout
    js = subprocess.run(
        [*MIND, "candidates", "u3", "--url", url, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert orjson.loads(js.stdout)["event_id"] == "e3-2"
    missing = subprocess.run(
        [*MIND, "candidates", "ghost", "--url", url], env=env, capture_output=True, text=True, timeout=30
    )
    assert missing.returncode == 4 and "unknown user" in missing.stderr


def _text(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_metrics(view: dict[str, Any]) -> None:
    """/metrics on the view's own bind: the table, the messages and the requests the tests made."""
    url = view["url"]
    assert _get(f"{url}/users/u5/candidates")[0] == 200
    assert _get(f"{url}/users/ghost/candidates")[0] == 404
    status, ctype, text = _text(f"{url}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("mind_view_users", ())] == 21
    assert samples[("mind_view_messages_consumed_total", ())] == 67
    assert samples[("mind_view_messages_rejected_total", (("reason", "invalid"),))] == 1
    assert samples[("mind_view_messages_rejected_total", (("reason", "stale"),))] == 2
    assert samples[("mind_view_users_deleted_total", ())] == 1
    ok = (("route", "/users/{user_id}/candidates"), ("status", "200"))
    assert samples[("mind_view_request_seconds_count", ok)] >= 1
    assert samples[("mind_view_request_seconds_count", (ok[0], ("status", "404")))] >= 1
    assert samples[("mind_view_freshness_seconds_count", ())] >= 1
    assert all(dict(k[1]).get("route") != "/users/ghost/candidates" for k in samples)  # patterns only
    assert _text(f"{url}/metrics?x=1")[0] == 400


def test_user_page_without_stores(view: dict[str, Any]) -> None:
    """No store address and no checkpoint: the page shows the message's list and says what is missing."""
    url = view["url"]
    status, ctype, page = _text(f"{url}/users/u7")
    assert status == 200 and ctype.startswith("text/html")
    assert page.count('class="candidate"') == 5 and "i7-2-0" in page and ">m-1<" in page
    for missing in ("MIND_CHECKPOINT", "click_partition"):
        assert missing in page
    assert 'id="heatmap"' not in page and 'class="interest-panel' not in page
    status, _, page = _text(f"{url}/users/u%2F1")
    assert status == 200 and '<code id="user-id">u/1</code>' in page
    assert _get(f"{url}/users/nobody")[0] == 404
    assert _get(f"{url}/users/u7/latest") == (
        200,
        {
            "user_id": "u7",
            "click_partition": None,
            "click_offset": None,
            "event_id": "e7-2",
            "produced_at": pytest.approx(view["now"] + 2),
            "version": _get(f"{url}/users/u7/latest")[1]["version"],
        },
    )
    status, body = _get(f"{url}/users/oo/latest")
    assert status == 200 and (body["click_partition"], body["click_offset"]) == (1, 11)


def test_sigterm_stops_gracefully(view: dict[str, Any]) -> None:
    proc = view["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_helpers() -> None:
    assert check_user_id("ok id é") is None and check_user_id("") == "empty user id"
    assert "U+007F" in (check_user_id("a\x7f") or "")
    body = answer(
        {
            "user_id": "u",
            "candidates": [],
            "model_version": "m",
            "index_version": "i",
            "event_id": "e",
            "event_timestamp": 1.0,
            "produced_at": 10.0,
        },
        now=12.5,
    )
    assert body["freshness_s"] == 2.5
