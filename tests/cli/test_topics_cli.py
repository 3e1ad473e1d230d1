"""`mind topics`: the topics job of deploy/ creates clicks, compacted recall, the DLQ and the catalogue topics
from the settings, reports what exists on a second run, and exits 1 when an existing topic differs from the
settings."""

from __future__ import annotations

import json
from pathlib import Path

from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from cli.app import app
from stream.topics import describe_topic_configs


def test_topics_command_creates_reports_and_flags_mismatches(
    kafka_bootstrap: str, uid: str, tmp_path: Path
) -> None:
    env = {
        "MIND_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "MIND_CLICKS_TOPIC": f"clicks-{uid}",
        "MIND_RECALL_TOPIC": f"recall-{uid}",
        "MIND_DLQ_TOPIC": f"dlq-{uid}",
        "MIND_CATALOG_TOPIC": f"catalog-{uid}",
        "MIND_CATALOG_DLQ_TOPIC": f"catalog-{uid}.dlq",
        "MIND_PARTITIONS": "3",
        "MIND_RUN_DIR": str(tmp_path / "run"),
    }
    runner = CliRunner()
    res = runner.invoke(app, ["topics", "--json"], env=env)
    assert res.exit_code == 0, res.output
    rows = {r["topic"]: r for r in json.loads(res.output)}
    assert {n: (r["created"], r["partitions"]) for n, r in rows.items()} == {
        f"clicks-{uid}": (True, 3),
        f"recall-{uid}": (True, 3),
        f"dlq-{uid}": (True, 1),
        f"catalog-{uid}": (True, 1),
        f"catalog-{uid}.dlq": (True, 1),
    }
    assert rows[f"recall-{uid}"]["config"] == {"cleanup.policy": "compact"}
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert describe_topic_configs(admin, [f"recall-{uid}"])[f"recall-{uid}"]["cleanup.policy"] == "compact"

    res = runner.invoke(app, ["topics"], env=env)  # again: nothing to do, plain-text report
    assert res.exit_code == 0, res.output
    assert f"clicks-{uid}" in res.output and "exists" in res.output and "created" not in res.output

    res = runner.invoke(app, ["topics", "--partitions", "5"], env=env)  # the flag beats MIND_PARTITIONS
    assert res.exit_code == 1
    assert "3 partitions, settings ask for 5" in res.output and "not altered" in res.output
