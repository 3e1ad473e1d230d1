"""Load: a short soak and a short backpressure run of a real worker process, every server real.

The full-length figures (a 10-minute soak at half the measured capacity, a longer slow phase) are in
docs/load.md; these runs check the same properties at CI size: memory and lag stay bounded, nothing is lost
or applied twice, and a slow key-value store (Valkey really pausing writes) slows the worker down instead
of making it buffer, with the backlog drained once the store is fast again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.soak import backpressure, soak

pytestmark = pytest.mark.slow


def test_short_soak_keeps_memory_and_lag_bounded_and_loses_nothing(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str, tmp_path: Path
) -> None:
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, window_len=64, batch_max=256, batch_timeout_ms=20)
    png = tmp_path / "soak.png"
    res = soak(
        s,
        wm.checkpoint,
        rate_cps=100.0,
        capacity_cps=200.0,
        duration_s=20.0,
        warmup_s=5.0,
        sample_s=1.0,
        run_dir=tmp_path,
        png=png,
    )
    check = res["check"]
    assert res["clicks"] == pytest.approx(2000, rel=0.05) and res["achieved_cps"] == pytest.approx(
        100, rel=0.05
    )
    assert check["published"] == check["delivered"] and check["mismatched_windows"] == 0
    assert check["lost"] == 0 and check["applied_twice"] == 0 and check["out_of_order_users"] == 0
    assert check["uncommitted"] == 0 and check["unprocessed"] == 0 and check["missing_recall"] == 0
    assert check["dlq"] == 0 and res["stalled_at_s"] is None
    assert check["applied_counter"] == check["published"]
    assert res["drained"] and res["worker_exit_codes"] == [0]
    # bounded, not "flat": 20 s is too short for the allocator's high-water mark to settle
    assert res["rss_mb_end"] - res["rss_mb_start"] < 50, res["samples"]
    assert res["rss_mb_max"] < res["rss_mb_initial"] + 100
    assert res["lag_max"] < 5 * res["rate_cps"], res["samples"]  # never more than 5 s of clicks behind
    assert res["errors_per_min_second_half"] <= res["errors_per_min_first_half"] + 1.0, res["errors"]
    assert len(res["samples"]) >= 15 and all(p["rss_mb"] > 0 for p in res["samples"])
    assert png.stat().st_size > 10_000
    keys = ("rss_mb_start", "rss_mb_end", "lag_max", "lag_end", "e2e_p50_ms", "e2e_p99_ms")
    print("\nsoak:", {k: res[k] for k in keys})


def test_slow_key_value_store_slows_the_worker_and_the_backlog_stays_in_the_broker(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str, tmp_path: Path
) -> None:
    wm = worker_model
    s = wm.settings(kafka_bootstrap, redis_url, uid, window_len=64, batch_timeout_ms=20)
    offered, slow_s = 150.0, 8.0
    res = backpressure(
        s,
        wm.checkpoint,
        offered_cps=offered,
        fast_s=4.0,
        slow_s=slow_s,
        recover_s=2.0,
        pause_ms=900,
        period_ms=1000,
        batch_max=8,  # a few micro-batches pass in each 100 ms gap: keep them small
        sample_s=0.5,
        users=40,  # their windows are filled (untimed) before the phases start
        run_dir=tmp_path,
    )
    fast, slow = res["phases"]["fast"], res["phases"]["slow"]
    # Rates against what was really published, and the slow phase against the fast one: on a loaded
    # machine neither the publisher nor the worker reaches its nominal rate, but the store's slowness
    # must still show on top of whatever the machine allows.
    assert slow["consumed_cps"] < 0.6 * fast["consumed_cps"], res["phases"]  # slowed down by the store
    assert slow["consumed_cps"] < 0.6 * slow["offered_cps"], res["phases"]
    fast_growth = (fast["lag_end"] - fast["lag_start"]) / fast["seconds"]
    assert res["lag_growth_slow"] > 0.3 * slow["offered_cps"] * slow_s  # the backlog grew, in the broker
    assert res["lag_growth_slow"] / slow["seconds"] > fast_growth, res["phases"]  # faster than before
    assert res["slowdown"]["pauses"] >= slow_s - 2
    assert res["rss_mb_growth_slow"] < 50, res["samples"]  # ... and not in the worker's memory
    assert res["bounds"]["consumer"]["queued.max.messages.kbytes"] == s.consumer_queued_max_kbytes
    assert res["drained"] and res["recovery_s"] is not None and res["worker_exit_codes"] == [0]
    check = res["check"]
    assert check["lost"] == 0 and check["applied_twice"] == 0 and check["out_of_order_users"] == 0
    assert check["uncommitted"] == 0 and check["unprocessed"] == 0 and check["missing_recall"] == 0
    assert check["applied_counter"] == check["published"]
    print(
        "\nbackpressure:",
        {k: (v["consumed_cps"], v["lag_end"], v["rss_mb_max"]) for k, v in res["phases"].items()},
        {k: res[k] for k in ("lag_growth_slow", "rss_mb_growth_slow", "recovery_s")},
    )
