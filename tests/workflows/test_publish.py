"""`mind publish` against a real Tansu broker: logs and data sets arrive complete, keyed by user, in order
per user; bad lines are caught before anything is sent (or sent raw on purpose); pacing is honoured."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from mind.loaders import load
from mind.synthetic import generate, to_jsonl
from stream.schemas import parse_click
from workflows.publish import PublishError, Schedule, dataset_clicks, publish

ML100K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ml-100k"


def _consume(bootstrap: str, topic: str, n: int, partitions: int = 2, timeout: float = 15) -> list[Any]:
    """Every message of the topic (manual assignment: no group join), in per-partition order."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "publish-test", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [m for m in c.consume(1000, timeout=0.2) if m.error() is None]
    c.close()
    return out


def _by_user(msgs: list[Any]) -> dict[bytes, list[str]]:
    users: dict[bytes, list[str]] = {}
    for m in msgs:
        users.setdefault(m.key(), []).append(orjson.loads(m.value())["event_id"])
    return users


@pytest.fixture(scope="module")
def click_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log") / "clicks.jsonl"
    to_jsonl(generate(n_users=60, n_items=80, n_categories=4, seq_len=(5, 12), seed=3), path)
    return path


def test_jsonl_log_arrives_complete_keyed_and_in_order(click_log: Path, topic_settings: Any) -> None:
    lines = click_log.read_bytes().splitlines()
    stats = publish(click_log, topic_settings, progress=False)
    assert (stats.sent, stats.delivered, stats.failed) == (len(lines), len(lines), 0)
    msgs = _consume(topic_settings.kafka_bootstrap, topic_settings.clicks_topic, len(lines))
    assert len(msgs) == len(lines)
    assert sorted(m.value() for m in msgs) == sorted(lines)  # byte for byte
    expected: dict[bytes, list[str]] = {}
    for line in lines:
        c = parse_click(line)
        expected.setdefault(c.user_id.encode(), []).append(c.event_id)
    assert _by_user(msgs) == expected  # key = user id, file order per user


def test_dataset_is_converted_in_chronological_order(topic_settings: Any) -> None:
    if not ML100K.is_dir():
        pytest.skip("shared ml-100k data not found")
    stats = publish(ML100K, topic_settings, limit=3000, progress=False)
    assert (stats.sent, stats.delivered) == (3000, 3000)
    msgs = _consume(topic_settings.kafka_bootstrap, topic_settings.clicks_topic, 3000)
    assert len(msgs) == 3000
    clicks = [parse_click(m.value()) for m in msgs]
    assert all(m.key() == c.user_id.encode() for m, c in zip(msgs, clicks, strict=True))
    per_user: dict[str, list[float]] = {}
    for c in clicks:
        per_user.setdefault(c.user_id, []).append(c.timestamp)
        assert any(s.startswith("class=") for s in c.side_ids)  # genres -> side ids
        assert [p.split("=")[0] for p in c.profile_ids] == ["age", "gender", "occupation", "zip_code"]
    assert all(ts == sorted(ts) for ts in per_user.values())
    # users interleaved by time: the first 3000 events are the 3000 earliest clicks of the data set
    inter = load(ML100K)
    assert max(c.timestamp for c in clicks) == np.sort(np.concatenate(inter.timestamps))[2999]


def test_dataset_without_timestamps_round_robin_and_deterministic_ids() -> None:
    inter = generate(n_users=3, n_items=30, n_categories=3, seq_len=(2, 3), seed=0)
    inter.timestamps = None
    first = list(dataset_clicks(inter))
    assert [c.event_id for c in first] == [c.event_id for c in dataset_clicks(inter)]
    assert [c.event_id for c in first[:3]] == [f"{inter.name}-{u}-0" for u in range(3)]
    assert [c.timestamp for c in first] == sorted(c.timestamp for c in first)


def test_bad_line_refused_before_sending_skip_or_raw(tmp_path: Path, topic_settings: Any) -> None:
    good = b'{"event_id":"e1","user_id":"u1","item_id":"i1","timestamp":1700000000}'
    log = tmp_path / "bad.jsonl"
    log.write_bytes(good + b"\n" + b'{"event_id":"e2","user_id":"u1"}\n' + b"\xff\xfe not json\n")
    with pytest.raises(PublishError, match=r"bad\.jsonl:2: missing field"):
        publish(log, topic_settings, progress=False)
    assert publish(log, topic_settings, progress=False, skip_bad=True).skipped == 2
    raw = publish(log, topic_settings, progress=False, raw=True)
    assert raw.delivered == 3
    msgs = _consume(topic_settings.kafka_bootstrap, topic_settings.clicks_topic, 4)
    sent = [good, good, b'{"event_id":"e2","user_id":"u1"}', b"\xff\xfe not json"]
    assert sorted(m.value() for m in msgs) == sorted(sent)
    assert {m.key() for m in msgs} == {b"u1", None}  # raw: key from user_id when there is one


def test_rate_is_roughly_honoured(click_log: Path, topic_settings: Any) -> None:
    stats = publish(click_log, topic_settings, rate=1000, limit=300, progress=False)
    assert stats.delivered == 300
    # pacing never runs ahead of the schedule (299 gaps of 1 ms); how much slower a loaded machine is
    # says nothing about the pacing, so there is no lower bound on the rate (the schedule is unit-tested)
    assert stats.seconds >= 0.299 and stats.rate <= 1100, stats.as_dict()
    rate_schedule = Schedule(rate=1000, speedup=None)
    assert [rate_schedule.due(n, None) for n in (0, 1, 300)] == [0.0, 0.001, 0.3]


def test_speedup_follows_the_original_gaps() -> None:
    s = Schedule(rate=None, speedup=10)
    assert [s.due(n, 100.0 + 2 * n) for n in range(3)] == [0.0, 0.2, 0.4]
    both = Schedule(rate=2, speedup=10)  # the slower schedule wins
    assert both.due(4, 100.0) == 2.0


def test_cli_publish_json(click_log: Path, topic_settings: Any, cli_env: dict[str, str]) -> None:
    env = {
        **cli_env,
        "MIND_KAFKA_BOOTSTRAP": topic_settings.kafka_bootstrap,
        "MIND_CLICKS_TOPIC": topic_settings.clicks_topic,
        "MIND_RECALL_TOPIC": topic_settings.recall_topic,
        "MIND_DLQ_TOPIC": topic_settings.dlq_topic,
        "MIND_PARTITIONS": "2",
    }
    cmd = [sys.executable, "-m", "cli", "publish", str(click_log), "--limit", "50", "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout)["delivered"] == 50
    missing = subprocess.run([*cmd[:4], "nope.jsonl"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_dataset_with_ids_the_schema_refuses_sends_nothing(tmp_path: Path, topic_settings: Any) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"u1 i1 1700000000\n{'x' * 200} i2 1700000001\n")
    with pytest.raises(PublishError, match="user id 'xxx.*200 characters"):
        publish(pairs, topic_settings, fmt="pairs", progress=False)
    with pytest.raises(PublishError, match="--raw"):
        publish(pairs, topic_settings, fmt="pairs", raw=True, progress=False)
