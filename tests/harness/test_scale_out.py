"""Scale-out: three real worker processes (`python -m stream.worker`) in one consumer group on a
6-partition clicks topic, every server real (Tansu, Valkey, tritonserver, milvus-lite).

Every click must be applied exactly once, each user's window must hold its clicks in click order, every
offset must be committed, and each process must have done part of the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.load import LoadRun

pytestmark = pytest.mark.slow


def test_three_worker_processes_on_six_partitions_keep_order_and_lose_nothing(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str, tmp_path: Path
) -> None:
    wm = worker_model
    # window_len 64 holds every user's whole history here (~10 clicks each), so the check sees all of it
    s = wm.settings(
        kafka_bootstrap,
        redis_url,
        uid,
        partitions=6,
        window_len=64,
        batch_max=16,
        max_poll_interval_ms=15_000,
    )
    with LoadRun(s, wm.checkpoint, tmp_path, workers=3, users=40, label=f"scale-{uid}") as run:
        held = [w.assigned() for w in run.workers]
        first, end = run.publish(200.0, clicks=400)
        assert run.drain(60), "backlog not answered and committed within 60 s"
        codes = run.stop_workers()  # SIGTERM: finish the batch, commit, leave the group
        check = run.verify()
        applied = [w.last_metrics.get("mind_worker_clicks_applied_total", 0.0) for w in run.workers]

    assert sorted(p for h in held for p in (h or ())) == list(range(6))  # each partition held once
    assert all(len(h or ()) == 2 for h in held), held  # range assignment: two partitions per process
    assert codes == [0, 0, 0]
    assert all(a > 0 for a in applied), applied  # every process applied clicks
    assert end - first == 400 and check["users"] >= 40 and check["windows_hold_whole_history"]
    assert check["delivery_failures"] == 0 and check["delivered"] == check["published"]
    assert check["lost"] == 0 and check["applied_twice"] == 0
    assert check["out_of_order_users"] == 0 and check["mismatched_windows"] == 0
    assert check["uncommitted"] == 0 and check["unprocessed"] == 0 and check["missing_recall"] == 0
    assert check["applied_counter"] == check["published"]  # summed over the three processes: once each
    assert check["dlq"] == 0
