"""The worker's state on a real Redis Cluster (3 valkey-server masters on loopback, assembled by
`valkey-cli --cluster create`): keys, auth, failures that must look like a down server, the harness's
scans, and a resharding of a slot range while a worker processes a steady stream.

The end-to-end and kill -9 worker tests run on the cluster too (test_worker.py, `store_url`), and so
does every state test (test_state.py).
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.crc import key_slot
from workerkit import (
    ClickLog,
    Reader,
    Running,
    all_committed,
    check_windows,
    covers,
    make_clicks,
    metric,
    publish,
    record,
    setup_topics,
    until,
)

from harness.chaos import Truth, lcs_matched
from harness.chaos import check_windows as chaos_check_windows
from stream.embedded.redis import EmbeddedRedis
from stream.embedded.redis_cluster import EmbeddedRedisCluster
from stream.schemas import dump_click
from stream.settings import Settings, redis_client
from stream.state import UserClicks, WindowState
from stream.worker import build_worker, classify

pytestmark = pytest.mark.slow


def _partitions_on_every_master(cluster: EmbeddedRedisCluster, state: WindowState) -> dict[int, int]:
    """partition -> master index, for the first partitions that put keys on each of the masters."""
    owners = cluster.owners()
    out: dict[int, int] = {}
    for p in range(1000):
        node = owners[key_slot(state.offset_key(p).encode())]
        if node not in out.values():
            out[p] = node
        if len(out) == len(cluster.nodes):
            return out
    raise AssertionError("no partitions on every master")


def test_the_state_on_three_masters_one_slot_per_partition(redis_cluster: EmbeddedRedisCluster) -> None:
    topic = f"clicks-{uuid.uuid4().hex[:8]}"
    s = Settings(redis_url=redis_cluster.url)
    assert s.redis_cluster and s.redis_url == redis_cluster.url
    client = redis_client(s)
    state = WindowState(client, topic, max_len=4, event_memory=10)
    parts = _partitions_on_every_master(redis_cluster, state)
    for p in parts:
        res, (w,) = state.apply(p, 2, [UserClicks("u", [0, 1, 2], [5, 6, 7], ["a", "b", "c"])])
        assert res.applied == 3 and w.items == [5, 6, 7]
        assert state.apply(p, 2, [UserClicks("u", [0, 1, 2], [5, 6, 7], ["a", "b", "c"])])[0].applied == 0
        assert state.write_interests(p, ["u"], [2], *_vectors(), "v1", ts=1.0) == 1
    # one pipelined read across the three masters
    assert state.read_windows([(p, "u") for p in parts]) == [[5, 6, 7]] * len(parts)
    assert state.offsets(list(parts)) == dict.fromkeys(parts, 2)
    # every key of a partition lives on the master that serves its slot
    for p, node in parts.items():
        keys = [
            state.offset_key(p),
            state.events_key(p),
            state.window_key(p, "u"),
            state.interests_key(p, "u"),
        ]
        assert len({key_slot(k.encode()) for k in keys}) == 1
        direct = redis_cluster.node_client(node)
        assert direct.exists(*keys) == 4
        direct.close()
    p = next(iter(parts))
    state.reset_offset(p, -1)
    assert state.offsets([p]) == {p: -1} and client.exists(state.events_key(p)) == 0
    got = state.read_interests(p, "u")
    assert got is not None and got[1:] == ("v1", 1.0, 2)
    client.close()


def _vectors() -> tuple[Any, Any]:
    import numpy as np

    return np.ones((1, 2, 3), dtype=np.float32), np.array([[True, False]])


def test_the_chaos_check_scans_every_master(redis_cluster: EmbeddedRedisCluster) -> None:
    """harness.chaos.check_windows looks for windows nobody expects with SCAN: on a cluster that must
    cover every master, not the one node a plain SCAN would reach."""
    topic = f"clicks-{uuid.uuid4().hex[:8]}"
    client = redis_client(Settings(redis_url=redis_cluster.url))
    state = WindowState(client, topic, max_len=8)
    parts = list(_partitions_on_every_master(redis_cluster, state))
    truth = Truth()
    expected = parts[0]
    truth.add(t=0.0, epoch=0, user="u", pos=0, item=5, partition=expected, offset=0)
    state.apply(expected, 0, [("u", [0], [5])])
    for p in parts[1:]:  # strays: one window on each of the other masters
        state.apply(p, 0, [("stray", [0], [9])])
    res = chaos_check_windows(client, topic, truth, prefix="mind")
    assert not res.lost and res.windows == 1
    assert res.applied_twice == len(parts) - 1
    assert {d["key"] for d in res.differing} == {state.window_key(p, "stray") for p in parts[1:]}
    client.close()


def test_cluster_auth_and_failures_a_worker_must_tell_apart(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """Password and ACL user reach every node; a refused password fails the worker's start at once; an
    unreachable cluster is a redis ConnectionError (the worker waits and retries, as for one server);
    MIND_REDIS_CLUSTER on a server that is not in cluster mode fails at once."""
    secret = f"pw {uuid.uuid4().hex}"  # a space: the node config file quotes it
    cluster = EmbeddedRedisCluster(tmp_path, password=secret, username="mind", persist=False)
    url = cluster.start()
    try:
        for s in (
            Settings(redis_url=url, redis_username="mind", redis_password=secret),
            Settings(redis_url=url.replace("//", f"//mind:{secret.replace(' ', '%20')}@")),
        ):
            assert s.redis_url == url and s.redis_username == "mind" and secret not in repr(s)
            client = redis_client(s)
            assert client.acl_whoami() == "mind"
            state = WindowState(client, f"clicks-{uuid.uuid4().hex[:6]}", 8)
            assert state.apply(0, 5, [("u", [5], [7])])[0].applied == 1
            client.close()
        for wrong in (f"wrong-{secret}", None):
            s = Settings(
                redis_url=url, redis_username="mind", redis_password=wrong, kafka_bootstrap="127.0.0.1:1"
            )
            t0 = time.monotonic()
            with pytest.raises(ValueError, match="authentication failed") as err:
                build_worker(s, cast(Any, None), threading.Event())  # redis is the first server it reaches
            assert time.monotonic() - t0 < 5 and secret not in str(err.value)
    finally:
        cluster.stop()
    down = Settings(redis_url=url, redis_username="mind", redis_password=secret)
    with pytest.raises(redis.ConnectionError) as unreachable:
        redis_client(down, socket_connect_timeout=0.5)
    assert classify(unreachable.value) == "redis"  # the worker's pause-and-retry, not a crash
    single = Settings(redis_url=redis_server.url, redis_cluster=True, kafka_bootstrap="127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="not a Redis Cluster node"):
        build_worker(single, cast(Any, None), threading.Event())
    assert time.monotonic() - t0 < 5


def test_a_cluster_url_names_one_seed_node_and_database_0() -> None:
    s = Settings(redis_url="rediss+cluster://h:7000")
    assert s.redis_cluster
    with pytest.raises(ValueError, match="only database 0"):
        Settings(redis_url="redis+cluster://h:7000/2")
    with pytest.raises(ValueError, match="redis_cluster needs redis_url"):
        Settings(redis_cluster=True)
    assert not Settings(redis_url="redis://h:6379/0").redis_cluster
    assert Settings(redis_url="redis://h:6379/0", redis_cluster=True).redis_cluster


# ---- resharding under load ------------------------------------------------------------------------------


def _close_pair(
    cluster: EmbeddedRedisCluster, uid: str, partitions: int, span: int, users: list[str]
) -> tuple[str, range, int]:
    """A clicks topic two of whose partitions hash to slots at most `span` apart on one master (the slots
    between them on that master too), both receiving clicks of `users` (librdkafka's default partitioner:
    CRC-32 of the key): (topic, the slot range from one to the other, its master).

    Why search: moving a slot costs a few ms (each SETSLOT NODE rewrites and syncs nodes.conf), so a
    range between two arbitrary partitions (up to 5,000 slots) would take longer than the stream it
    should overlap. Why 12 partitions: CRC16 is linear, so the tags `{t.0}` .. `{t.9}` of any topic differ
    by fixed XOR patterns that keep their slots thousands apart; two-digit partitions break that."""
    owners = cluster.owners()
    busy = {zlib.crc32(u.encode()) % partitions for u in users}
    for k in range(10_000):
        topic = f"clicks-{uid}-{k}"
        slots = sorted(key_slot(f"mind:{{{topic}.{p}}}:offset".encode()) for p in busy)
        for a, b in zip(slots, slots[1:], strict=False):
            if b - a <= span and len(set(owners[a : b + 1])) == 1:
                return topic, range(a, b + 1), owners[a]
    raise AssertionError("no topic with two partitions close together")


def _redirections(cluster: EmbeddedRedisCluster) -> Counter[str]:
    """Error replies of every node by code (INFO errorstats: ASK, TRYAGAIN, MOVED, ...), and under
    "EVALSHA refused" the script calls a node turned away before running them (commandstats'
    rejected_calls: redirected or TRYAGAIN). Only the worker calls scripts; the test's reads are GETs."""
    out: Counter[str] = Counter()
    for i in range(len(cluster.nodes)):
        node = cluster.node_client(i)
        for name, stat in node.info("errorstats").items():
            out[name.removeprefix("errorstat_")] += int(stat["count"])
        out["EVALSHA refused"] += int(
            node.info("commandstats").get("cmdstat_evalsha", {}).get("rejected_calls", 0)
        )
        node.close()
    return out


def test_resharding_a_slot_range_mid_stream_loses_nothing(
    worker_model: Any, kafka_bootstrap: str, redis_cluster: EmbeddedRedisCluster, uid: str
) -> None:
    """The slots of two partitions (and those between them) move from their master to another while a
    worker processes a steady stream. After each MIGRATE step the test waits until the worker has applied
    a batch to a partition of the migrating slot, or retried one: so batches meet the slot while its keys
    are split between the nodes (TRYAGAIN for the scripts) or all moved before the slot is handed over
    (ASK). Afterwards every window holds each click once, in order, and every offset is committed."""
    wm = worker_model
    users = [str(u) for u in range(40)]
    topic, slots, source = _close_pair(redis_cluster, uid, 12, 400, users)
    target = (source + 1) % len(redis_cluster.nodes)
    s = wm.settings(
        kafka_bootstrap,
        redis_cluster.url,
        uid,
        clicks_topic=topic,
        partitions=12,
        window_len=160,  # >= any user's clicks: a window then shows every click, none trimmed away
        batch_max=16,
    )
    setup_topics(s)
    state = WindowState(redis_client(s), s.clicks_topic, s.window_len)
    slot_of = {p: key_slot(state.offset_key(p).encode()) for p in range(s.partitions)}
    moving = [p for p in range(s.partitions) if slot_of[p] in slots]
    assert len(moving) >= 2
    # a key of another stream in a slot between the two: the move carries it, and no worker of this
    # stream ever touches it (other tests' topics leave such keys in the shared cluster too)
    foreign = next(
        k
        for k in (f"mind:{{other-{uid}.{j}}}:offset" for j in range(100_000))
        if key_slot(k.encode()) in slots and key_slot(k.encode()) not in slot_of.values()
    )
    state.client.set(foreign, 1)
    clicks = make_clicks(wm, uid, users, per_user=150, seed=7)  # more than the stream will need
    log = ClickLog(s.window_len, wm.inter.items.get)
    reader = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    started, moved = threading.Event(), threading.Event()
    published = {"during": 0, "left": 0}

    def publisher() -> None:
        """A steady stream (about 80 clicks/s) until the move is over, then two more chunks."""
        after = 0
        for k in range(0, len(clicks), 20):
            chunk = clicks[k : k + 20]
            record(
                log,
                chunk,
                publish(kafka_bootstrap, s.clicks_topic, [(c.user_id, dump_click(c)) for c in chunk]),
            )
            if started.is_set() and not moved.is_set():
                published["during"] += len(chunk)
            after += moved.is_set()
            if after >= 2:
                break
            time.sleep(0.25)
        published["left"] = len(clicks) - len(log.clicks)

    def retries() -> float:
        return metric("mind_worker_retries_total", dependency="redis")

    steps = {"n": 0}

    def between(slot: int, _keys: int) -> None:
        """After a MIGRATE step: wait until the worker applied a batch to this slot's partitions (their
        stored offset moved: the read follows ASK where the key moved already) or retried one. A slot
        between the two holds no key of this stream (the keys there belong to other tests' topics, whose
        workers are gone): nothing would move, so nothing is waited for."""
        steps["n"] += 1
        parts = [p for p in moving if slot_of[p] == slot]
        if not parts:
            return
        mark, tried = state.offsets(parts), retries()
        until(
            lambda: retries() > tried or state.offsets(parts) != mark,
            what=f"the worker to apply or retry a batch of partitions {parts} while slot {slot} migrates",
            timeout=90,
        )

    worker = Running(s, wm).start()
    pub = threading.Thread(target=publisher, daemon=True)
    pub.start()
    retries_before, clicks_before = retries(), metric("mind_worker_clicks_total")
    try:
        # every moving partition has keys before the move: its offset, events, windows and interests
        until(
            lambda: (
                all(v >= 0 for v in state.offsets(moving).values())
                and metric("mind_worker_clicks_total") - clicks_before >= 100
            ),
            what=lambda: f"clicks in the partitions that move (stored offsets {state.offsets(moving)})",
            timeout=90,
        )
        errors_before = _redirections(redis_cluster)
        started.set()
        report = redis_cluster.move_slots(slots, target, keys_per_step=2, between=between)
        moved.set()
        redirected = _redirections(redis_cluster) - errors_before
        pub.join(120)
        assert not pub.is_alive() and published["left"] > 0, "the move outlasted the clicks"
        reader.until(covers(log.last_event()), timeout=120)
    finally:
        moved.set()
        worker.close()
        reader.close()
    owners = redis_cluster.owners()
    assert {owners[x] for x in slots} == {target}
    # what the windows hold, counted: clicks missing from them, clicks in them more than once
    names = sorted(log.history)
    stored = state.read_windows([(log.partition[u], u) for u in names])
    lost = twice = 0
    for u, have in zip(names, stored, strict=True):
        matched = lcs_matched(log.history[u], have)
        lost += len(log.history[u]) - len(matched)
        twice += len(have) - len(matched)
    check_windows(s, log)  # and exactly: each user's clicks once, in click order
    all_committed(s, log)
    assert (lost, twice) == (0, 0)
    assert state.client.get(foreign) == b"1"
    assert report.slots == len(slots) and report.keys >= len(moving) * 2 and steps["n"] >= 2
    assert published["during"] > 0 and set(moving) <= set(log.partition.values())
    assert redirected["EVALSHA refused"] > 0, redirected  # the worker's scripts met the migration
    print(
        f"\nresharding: {report.slots} slots ({slots.start}-{slots.stop - 1}, partitions {moving}) from "
        f"master {source} to {target}: {report.keys} keys in {steps['n']} MIGRATE steps, "
        f"{report.seconds:.1f} s; clicks published during the move {published['during']} of "
        f"{len(log.clicks)}; worker script calls refused {redirected['EVALSHA refused']}; replies "
        f"TRYAGAIN {redirected['TRYAGAIN']}, ASK {redirected['ASK']}, MOVED {redirected['MOVED']}; batch "
        f"retries {retries() - retries_before:.0f}; lost {lost}, applied twice {twice}"
    )
    state.client.close()


def test_the_launcher_restarts_the_same_cluster(tmp_path: Path) -> None:
    """nodes.conf keeps the layout: a stop and start of the launcher brings the cluster back on the same
    ports with its data, without a second create."""
    cluster = EmbeddedRedisCluster(tmp_path, persist=True)
    cluster.start()
    try:
        for i in range(len(cluster.nodes)):  # loopback only, the cluster bus too (it binds the same address)
            node = cluster.node_client(i)
            assert node.config_get("bind") == {"bind": "127.0.0.1"}
            assert node.config_get("cluster-port")["cluster-port"] not in map(str, cluster.ports)
            node.close()
        ports = cluster.ports
        client = cluster.client()
        client.set("{a}k", "1")
        client.set("{b}k", "2")
        client.close()
        cluster.stop()
        cluster.create_log.unlink()
        cluster.start()
        assert cluster.ports == ports and not cluster.create_log.exists()
        client = cluster.client()
        assert client.get("{a}k") == b"1" and client.get("{b}k") == b"2"
        client.close()
    finally:
        cluster.stop()
    assert all(n.pid is None for n in cluster.nodes)
