"""Topic creation as code on a real Tansu broker: created once, idempotent, recall compacted."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from stream.settings import Settings, kafka_config
from stream.topics import describe_topic_configs, ensure_topics, topic_specs


def _settings(uid: str, bootstrap: str, **kw: object) -> Settings:
    return Settings(
        kafka_bootstrap=bootstrap,
        clicks_topic=f"clicks-{uid}",
        recall_topic=f"recall-{uid}",
        dlq_topic=f"clicks-{uid}.dlq",
        catalog_topic=f"catalog-{uid}",
        catalog_dlq_topic=f"catalog-{uid}.dlq",
        **kw,  # type: ignore[arg-type]
    )


def test_topics_created_idempotent_and_compacted(kafka_bootstrap: str, uid: str) -> None:
    s = _settings(uid, kafka_bootstrap, partitions=3, dlq_retention_ms=-1, clicks_retention_ms=86_400_000)
    admin = AdminClient(kafka_config(s, "admin"))
    first = ensure_topics(admin, s)
    assert {n: st.created for n, st in first.items()} == {
        s.clicks_topic: True,
        s.recall_topic: True,
        s.dlq_topic: True,
        s.catalog_topic: True,
        s.catalog_dlq_topic: True,
    }
    assert (
        first[s.clicks_topic].partitions,
        first[s.recall_topic].partitions,
        first[s.dlq_topic].partitions,
    ) == (3, 3, 1)
    md = admin.list_topics(timeout=10).topics
    assert len(md[s.clicks_topic].partitions) == 3 and len(md[s.dlq_topic].partitions) == 1

    configs = describe_topic_configs(admin, [s.recall_topic, s.dlq_topic, s.clicks_topic, s.catalog_topic])
    assert configs[s.recall_topic]["cleanup.policy"] == "compact"
    assert configs[s.catalog_topic]["cleanup.policy"] == "compact"
    assert configs[s.dlq_topic]["retention.ms"] == "-1"
    assert configs[s.clicks_topic]["retention.ms"] == "86400000"

    again = ensure_topics(admin, s)  # a second worker starting: nothing to do, nothing wrong
    assert not any(st.created or st.mismatches for st in again.values())


def test_existing_topic_with_other_layout_is_reported_not_altered(
    kafka_bootstrap: str, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = _settings(uid, kafka_bootstrap, partitions=4)
    admin = AdminClient(kafka_config(s, "admin"))
    pre = [
        NewTopic(s.clicks_topic, 2, 1),
        NewTopic(s.recall_topic, 4, 1, config={"cleanup.policy": "delete"}),
    ]
    for fut in admin.create_topics(pre).values():
        fut.result(10)
    with caplog.at_level(logging.WARNING, logger="stream.topics"):
        states = ensure_topics(admin, s)
    assert not states[s.clicks_topic].created and states[s.dlq_topic].created
    assert states[s.clicks_topic].mismatches == ["2 partitions, settings ask for 4"]
    assert states[s.recall_topic].mismatches == ["cleanup.policy=delete, settings ask for compact"]
    assert "not altered" in caplog.text
    assert len(admin.list_topics(timeout=10).topics[s.clicks_topic].partitions) == 2


def test_specs_follow_settings() -> None:
    s = Settings(clicks_topic="c", recall_topic="r", dlq_topic="d", partitions=8, replication=3)
    specs = {t.name: t for t in topic_specs(s)}
    assert specs["c"].partitions == 8 and specs["r"].partitions == 8 and specs["r"].replication == 3
    assert specs["r"].config == {"cleanup.policy": "compact"} and specs["c"].config == {}
    assert specs["d"].config["retention.ms"] == str(30 * 24 * 3600 * 1000)
    own = {t.name: t for t in topic_specs(s.model_copy(update={"recall_partitions": 2}))}
    assert (own["c"].partitions, own["r"].partitions) == (8, 2)


def test_recall_can_have_its_own_partition_count(kafka_bootstrap: str, uid: str) -> None:
    s = _settings(uid, kafka_bootstrap, partitions=6, recall_partitions=2)
    admin = AdminClient(kafka_config(s, "admin"))
    states = ensure_topics(admin, s)
    assert (states[s.clicks_topic].partitions, states[s.recall_topic].partitions) == (6, 2)
    md = admin.list_topics(timeout=10).topics
    assert len(md[s.clicks_topic].partitions) == 6 and len(md[s.recall_topic].partitions) == 2
    assert not any(st.mismatches for st in ensure_topics(admin, s).values())
