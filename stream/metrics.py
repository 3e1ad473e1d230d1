"""Prometheus metrics of the stream worker, defined once per process (prometheus_client's registry is global).

Served on settings.metrics_port by stream.worker.run_worker. The recall version guard's own counter,
`mind_recall_version_mismatch_total`, lives in stream/recall.py next to the check.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Stage latencies are milliseconds-scale; the end-to-end one spans a replay's backlog too.
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

STAGES = ("parse", "window", "triton", "kv_write", "recall", "produce", "commit")
DEPENDENCIES = ("redis", "triton", "milvus", "kafka", "version")

CONSUMER_LAG = Gauge(
    "mind_worker_consumer_lag",
    "Messages behind the partition's high watermark (high watermark - consumer position)",
    ["topic", "partition"],
)
E2E_LATENCY = Histogram(
    "mind_worker_e2e_latency_seconds",
    "Click timestamp -> its user's recall message delivered to the broker",
    buckets=_E2E_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "mind_worker_stage_seconds", "Time per batch in each stage", ["stage"], buckets=_STAGE_BUCKETS
)
BATCH_SIZE = Histogram("mind_worker_batch_size", "Messages per micro-batch", buckets=_BATCH_BUCKETS)
BATCH_USERS = Histogram("mind_worker_batch_users", "Users refreshed per micro-batch", buckets=_BATCH_BUCKETS)
DLQ = Counter("mind_worker_dlq_total", "Messages sent to the dead-letter topic, by error code", ["code"])
RETRIES = Counter(
    "mind_worker_retries_total", "Retries after a dependency failure, by dependency", ["dependency"]
)
CLICKS = Counter("mind_worker_clicks_total", "Valid clicks processed (applied or skipped as re-delivered)")
APPLIED = Counter("mind_worker_clicks_applied_total", "Clicks appended to a behaviour window")
DUPLICATES = Counter(
    "mind_worker_duplicates_skipped_total",
    "Re-delivered clicks the state's offset check skipped (already in the window)",
)
DUPLICATE_EVENTS = Counter(
    "mind_worker_duplicate_events_total",
    "Clicks skipped because their event id was applied already (a retried or replayed publish)",
)
UNKNOWN_ITEMS = Counter(
    "mind_worker_unknown_items_total", "Clicks whose item is not in the model's vocabulary (kept as OOV)"
)
RECALLS = Counter("mind_worker_recalls_total", "Recall messages delivered to the broker")
BATCHES = Counter("mind_worker_batches_total", "Micro-batches by outcome", ["outcome"])
COMMIT_FAILURES = Counter(
    "mind_worker_commit_failures_total", "Offset commits the broker refused (e.g. during a rebalance)"
)
STALLED = Gauge(
    "mind_worker_partition_stalled_seconds",
    "How long a partition with lag has not advanced while consumption runs (0 = moving or caught up); "
    "non-zero once past fetch_stall_s: the broker stopped serving it (/readyz fails)",
    ["topic", "partition"],
)
STALLS = Counter(
    "mind_worker_partition_stalls_total", "Times a partition was found stalled: lag, and no progress"
)
PAUSED = Gauge("mind_worker_paused", "1 while consumption is paused because a dependency is down")
