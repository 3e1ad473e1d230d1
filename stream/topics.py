"""The topics as code: `clicks`, compacted `recall`, long-retention `clicks.dlq`, compacted `catalog` and its
`catalog.dlq`, created idempotently.

`recall` is compacted because it is keyed by user id: the topic then keeps at least the latest candidate
list per user, which is what the candidate view materialises. Existing topics are never altered (adding
partitions would move users to other partitions mid-stream); a mismatch with the settings is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from stream.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """What the settings ask for: clicks (N partitions), recall (recall_partitions, else N; compacted), the
    DLQ and the catalogue."""
    clicks_cfg = (
        {} if settings.clicks_retention_ms is None else {"retention.ms": str(settings.clicks_retention_ms)}
    )
    return [
        TopicSpec(settings.clicks_topic, settings.partitions, settings.replication, clicks_cfg),
        TopicSpec(
            settings.recall_topic,
            settings.recall_partition_count,
            settings.replication,
            {"cleanup.policy": "compact"},
        ),
        TopicSpec(
            settings.dlq_topic,
            settings.dlq_partitions,
            settings.replication,
            {"retention.ms": str(settings.dlq_retention_ms)},
        ),
        # the catalogue: the latest record per item is what counts, so compacted like recall
        TopicSpec(
            settings.catalog_topic,
            settings.catalog_partitions,
            settings.replication,
            {"cleanup.policy": "compact"},
        ),
        TopicSpec(
            settings.catalog_dlq_topic,
            settings.dlq_partitions,
            settings.replication,
            {"retention.ms": str(settings.dlq_retention_ms)},
        ),
    ]


@dataclass
class TopicState:
    name: str
    created: bool  # False: it already existed
    partitions: int
    mismatches: list[str] = field(default_factory=list)  # differences from the spec (existing topics only)


def describe_topic_configs(
    admin: AdminClient, names: list[str], timeout_s: float = 10.0
) -> dict[str, dict[str, str]]:
    """Topic configs as the broker reports them (Tansu reports only those set at creation)."""
    res = [ConfigResource(ResourceType.TOPIC, n) for n in names]
    futures = admin.describe_configs(res, request_timeout=timeout_s)
    return {r.name: {k: v.value for k, v in f.result().items()} for r, f in futures.items()}


def ensure_topics(admin: AdminClient, settings: Settings, timeout_s: float = 30.0) -> dict[str, TopicState]:
    """Create the missing topics; "already exists" (also from a concurrent creator) is fine.

    Returns each topic's state; mismatches of existing topics (partitions, configs) are logged, not fixed.
    """
    specs = topic_specs(settings)
    existing = admin.list_topics(timeout=timeout_s).topics
    missing = [s for s in specs if s.name not in existing]
    created: set[str] = set()
    if missing:
        new = [NewTopic(s.name, s.partitions, s.replication, config=dict(s.config)) for s in missing]
        for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
            try:
                fut.result()
                created.add(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        existing = admin.list_topics(timeout=timeout_s).topics
    states: dict[str, TopicState] = {}
    check = [s for s in specs if s.name not in created and s.config]
    configs = describe_topic_configs(admin, [s.name for s in check], timeout_s) if check else {}
    for s in specs:
        meta = existing.get(s.name)
        n = len(meta.partitions) if meta is not None else 0
        state = TopicState(s.name, s.name in created, n)
        if not state.created:
            if n != s.partitions:
                state.mismatches.append(f"{n} partitions, settings ask for {s.partitions}")
            have = configs.get(s.name, {})
            for key, want in s.config.items():
                if have.get(key) not in (None, want):  # None: the broker did not report it
                    state.mismatches.append(f"{key}={have.get(key)}, settings ask for {want}")
            for m in state.mismatches:
                log.warning("topic %s exists with %s (not altered)", s.name, m)
        states[s.name] = state
    return states
