"""stream.state against a real Valkey: windows and offsets applied atomically, replays skipped. Every test
that takes `redis_db` runs twice: on the single server and on the 3-master cluster (EVALSHA routed by the
partition's slot, pipelines split by node)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from stream.embedded.redis import free_port
from stream.state import InterestRows, Share, UserClicks, Window, WindowState, fence

TOPIC = "clicks-state"


@pytest.fixture(params=["valkey", "valkey-cluster"])
def redis_db(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A client whose store is empty when the test starts: the session's single server (conftest's
    redis_db), or the session's cluster (FLUSHDB goes to every master)."""
    server = request.getfixturevalue("redis_server" if request.param == "valkey" else "redis_cluster")
    client: Any = server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def state(redis_db: Any) -> WindowState:
    return WindowState(redis_db, TOPIC, max_len=4)


def test_batch_applied_with_its_offset_in_one_call_which_returns_the_windows(
    state: WindowState, redis_db: Any
) -> None:
    res, windows = state.apply(3, 12, [("u1", [10, 12], [5, 6]), ("u2", [11], [7])])
    assert res == (-1, 3, 0, 0, 0)
    assert [w.items for w in windows] == [[5, 6], [7]]
    assert state.read_windows([(3, "u1"), (3, "u2"), (3, "nobody")]) == [[5, 6], [7], []]
    assert state.offsets([3, 4]) == {3: 12, 4: -1}
    # one partition's keys share a Redis Cluster slot, so one script may touch them all
    keys = (state.offset_key(3), state.events_key(3), state.window_key(3, "u1"), state.interests_key(3, "u1"))
    slots = {key_slot(k.encode()) for k in keys}
    assert len(slots) == 1 and key_slot(state.offset_key(4).encode()) not in slots


def test_replayed_batch_is_skipped_and_still_returns_the_windows(state: WindowState) -> None:
    batch = [("u1", [0, 1, 2], [2, 3, 4]), ("u2", [3], [9])]
    assert state.apply(0, 3, batch)[0].applied == 4
    again, windows = state.apply(0, 3, batch)
    assert again == (3, 0, 4, 0, 0)
    assert [w.items for w in windows] == [[2, 3, 4], [9]]  # a retry still gets what it needs
    assert state.read_windows([(0, "u1"), (0, "u2")]) == [[2, 3, 4], [9]]


def test_partial_replay_applies_only_newer_clicks(state: WindowState) -> None:
    """A crash after offsets 0..5 were applied; the re-delivered batch 3..8 brings 6..8 once."""
    state.apply(1, 5, [("u", [0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7])])
    res, _ = state.apply(1, 8, [("u", [3, 4, 5, 6], [5, 6, 7, 8]), ("v", [7, 8], [11, 12])])
    assert res == (5, 3, 3, 0, 0)
    assert state.read_windows([(1, "u"), (1, "v")]) == [[5, 6, 7, 8], [11, 12]]  # max_len 4
    assert state.offsets([1]) == {1: 8}


def test_windows_are_trimmed_to_max_len(state: WindowState) -> None:
    items = list(range(2, 3000))  # more than one unpack() chunk in the script
    state.apply(2, len(items) - 1, [("u", list(range(len(items))), items)])
    assert state.read_windows([(2, "u")]) == [items[-4:]]


def test_a_bad_key_applies_nothing(state: WindowState, redis_db: Any) -> None:
    """All or nothing: the script checks every key before its first write (Lua writes are not rolled
    back on a later error), so neither the other windows nor the offset move."""
    redis_db.set(state.window_key(0, "broken"), "not a list")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        state.apply(0, 9, [("ok", [8], [2]), ("broken", [9], [3])])
    assert state.read_windows([(0, "ok")]) == [[]] and state.offsets([0]) == {0: -1}


def test_a_batch_applies_all_its_partitions_at_once_and_a_retry_sends_only_the_failed(
    state: WindowState, redis_db: Any
) -> None:
    """apply_batch pipelines one script call per partition: the partitions that succeeded keep their
    results (and their writes) when another fails, so the worker's retry sends only the failed one."""
    redis_db.set(state.window_key(1, "broken"), "not a list")
    shares = [
        Share(0, 5, [("a", [4, 5], [2, 3])]),
        Share(1, 7, [("broken", [7], [9])]),
        Share(2, 3, [("b", [3], [4]), ("c", [2], [6])]),
    ]
    into: dict[int, tuple[Any, list[Window]]] = {}
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        state.apply_batch(shares, into)
    assert sorted(into) == [0, 2]
    assert into[0][0].applied == 2 and [w.items for w in into[0][1]] == [[2, 3]]
    assert into[2][0].applied == 2 and [w.items for w in into[2][1]] == [[4], [6]]
    assert state.offsets([0, 1, 2]) == {0: 5, 1: -1, 2: 3}
    redis_db.delete(state.window_key(1, "broken"))
    state.apply_batch([s for s in shares if s.partition not in into], into)
    assert sorted(into) == [0, 1, 2] and into[1][0].applied == 1
    assert state.read_windows([(0, "a"), (1, "broken"), (2, "b")]) == [[2, 3], [9], [4]]
    # the same batch again applies nothing and returns the same windows, as one call per partition does
    again: dict[int, tuple[Any, list[Window]]] = {}
    state.apply_batch(shares, again)
    assert {p: r.applied for p, (r, _) in again.items()} == {0: 0, 1: 0, 2: 0}
    assert {p: w for p, (_, w) in again.items()} == {p: w for p, (_, w) in into.items()}


def test_scripts_the_server_forgot_are_loaded_again(state: WindowState, redis_db: Any) -> None:
    """A restarted or flushed server holds no scripts: the pipelined EVALSHA calls get NOSCRIPT, and the
    scripts are loaded and the calls sent again."""
    redis_db.script_flush()
    into: dict[int, tuple[Any, list[Window]]] = {}
    state.apply_batch([Share(0, 1, [("u", [1], [5])]), Share(3, 2, [("v", [2], [6])])], into)
    assert {p: r.applied for p, (r, _) in into.items()} == {0: 1, 3: 1}
    redis_db.script_flush()
    vec = np.ones((1, 2, 3), np.float32)
    active = np.array([[True, False]])
    rows = [InterestRows(0, ["u"], [1], vec, active), InterestRows(3, ["v"], [2], vec, active)]
    assert state.write_interests_batch(rows, "1", ts=1.0) == 2
    assert state.write_interests_batch(rows, "1", ts=2.0) == 0  # the fences hold: nothing twice
    got = state.read_interests(3, "v")
    assert got is not None and got[0].shape == (1, 3) and got[3] == 2


def test_reset_offset_starts_a_new_generation_whose_fences_order_after_the_old(state: WindowState) -> None:
    old, _ = state.apply(0, 40, [("u", [40], [2])])
    state.reset_offset(0, -1)  # the broker lost its log: offsets restart at 0
    new, _ = state.apply(0, 0, [("u", [0], [3])])
    assert new.applied == 1 and state.read_windows([(0, "u")]) == [[2, 3]]
    assert (old.generation, new.generation) == (0, 1)
    assert fence(new.generation, 0) > fence(old.generation, 40)  # a new log's click is newer


def test_click_times_are_kept_and_old_entries_read_as_unknown(state: WindowState, redis_db: Any) -> None:
    redis_db.rpush(state.window_key(0, "u"), "5", "6")  # written before times were kept: bare items
    _, (w,) = state.apply(
        0, 3, [UserClicks("u", [2, 3], [7, 8], ["e2", "e3"], [1_700_000_000, 1_700_000_009])]
    )
    assert w == Window([5, 6, 7, 8], [0, 0, 1_700_000_000, 1_700_000_009])
    assert state.read_windows_with_times([(0, "u")]) == [w]


def test_a_duplicated_event_id_is_applied_once(redis_db: Any) -> None:
    state = WindowState(redis_db, TOPIC, max_len=10, event_memory=3)
    res, (w,) = state.apply(0, 2, [UserClicks("u", [0, 1, 2], [5, 6, 5], ["a", "b", "a"])])
    assert res == (-1, 2, 0, 1, 0) and w.items == [5, 6]  # the second "a" (a retried publish) is skipped
    res, (w,) = state.apply(0, 4, [UserClicks("u", [3, 4], [6, 7], ["b", "c"])])
    assert res.duplicates == 1 and w.items == [5, 6, 7]
    # the memory is bounded: only the last 3 applied ids are kept, so "a" is forgotten
    assert redis_db.zcard(state.events_key(0)) == 3
    state.apply(0, 6, [UserClicks("u", [5, 6], [8, 9], ["d", "e"])])
    res, (w,) = state.apply(0, 7, [UserClicks("u", [7], [5], ["a"])])
    assert res.applied == 1 and w.items[-1] == 5


def test_interests_round_trip_and_an_older_fence_never_overwrites(state: WindowState) -> None:
    vec = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    active = np.array([[True, True, False], [True, False, False]])
    assert state.write_interests(1, ["a", "b"], [10, 11], vec, active, "7", ts=123.5) == 2
    a, b = state.read_interests(1, "a"), state.read_interests(1, "b")
    assert a is not None and b is not None
    np.testing.assert_array_equal(a[0], vec[0, :2])
    assert a[1:] == ("7", 123.5, 10) and b[0].shape == (1, 4)
    assert state.read_interests(1, "c") is None
    # a zombie's late write (an older click offset) is refused; a newer one wins
    assert state.write_interests(1, ["a"], [9], vec[1:] * 0, active[1:], "6", ts=200.0) == 0
    assert state.read_interests(1, "a")[1:] == ("7", 123.5, 10)  # type: ignore[index]
    assert state.write_interests(1, ["a"], [12], vec[1:], active[1:], "7", ts=201.0) == 1
    assert state.read_interests(1, "a")[3] == 12  # type: ignore[index]


def test_connection_errors_are_retried_then_raised() -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    s = WindowState(dead, TOPIC, 4, attempts=3, wait_max_s=0.01)
    before = REGISTRY.get_sample_value("mind_worker_retries_total", {"dependency": "redis"}) or 0.0
    with pytest.raises(redis.ConnectionError):
        s.apply(0, 1, [("u", [1], [2])])
    assert REGISTRY.get_sample_value("mind_worker_retries_total", {"dependency": "redis"}) == before + 2


# ---- the window rule, as properties of the real script -------------------------------------------------
#
# The rule, stated without the script's mechanics: a user's window is the last max_len items of the
# user's clicks in offset order, each click counted once, however the clicks were cut into batches and
# however often a batch was delivered again. The oracle below computes exactly that from the whole history;
# the script only ever sees batches.

Click3 = tuple[int, str, int]  # (offset, user, item)


def oracle(history: list[Click3], max_len: int) -> dict[str, list[int]]:
    """Each user's last max_len items of the distinct clicks, in offset order."""
    out: dict[str, list[int]] = {}
    for _off, user, item in sorted(set(history)):
        out.setdefault(user, []).append(item)
    return {u: items[-max_len:] for u, items in out.items()}


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Click3], list[list[Click3]], int]:
    """A partition's history (offsets 0..n-1, a few users), cut into batches at random points, with some
    batches delivered again later (a crash before the commit, a rebalance, a zombie's late write)."""
    n = draw(st.integers(1, 40))
    users = draw(st.lists(st.sampled_from("abcd"), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(2, 60), min_size=n, max_size=n))
    history = [(off, users[off], items[off]) for off in range(n)]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=8)) | {0, n})
    batches = [history[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if a < b]
    order: list[list[Click3]] = []
    for k, b in enumerate(batches):
        order.append(b)
        if k and draw(st.booleans()):  # re-deliver an earlier stretch, possibly overlapping this batch
            start = draw(st.integers(0, k))
            order.append([c for bb in batches[start : k + 1] for c in bb])
    return history, order, draw(st.integers(1, 12))


def _apply(state: WindowState, batch: list[Click3]) -> None:
    by_user: dict[str, tuple[list[int], list[int]]] = {}
    for off, user, item in batch:
        offs, its = by_user.setdefault(user, ([], []))
        offs.append(off)
        its.append(item)
    state.apply(0, max(off for off, _, _ in batch), [(u, o, i) for u, (o, i) in by_user.items()])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries())
def test_windows_are_the_last_max_len_distinct_clicks_whatever_the_batching(
    redis_db: Any, case: tuple[list[Click3], list[list[Click3]], int]
) -> None:
    history, order, max_len = case
    redis_db.flushdb()
    state = WindowState(redis_db, TOPIC, max_len=max_len)
    for batch in order:
        _apply(state, batch)
    want = oracle(history, max_len)
    users = sorted(want)
    assert dict(zip(users, state.read_windows([(0, u) for u in users]), strict=True)) == want
    assert state.offsets([0]) == {0: len(history) - 1}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries())
def test_a_stale_batch_delivered_last_changes_nothing(
    redis_db: Any, case: tuple[list[Click3], list[list[Click3]], int]
) -> None:
    """A zombie's batch, however old, arriving after everything else leaves every window as it was."""
    history, order, max_len = case
    redis_db.flushdb()
    state = WindowState(redis_db, TOPIC, max_len=max_len)
    for batch in order:
        _apply(state, batch)
    users = sorted(oracle(history, max_len))
    before = state.read_windows([(0, u) for u in users])
    _apply(state, order[0])
    assert state.read_windows([(0, u) for u in users]) == before
