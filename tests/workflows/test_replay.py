"""The online/offline consistency check end to end: a small replay through Kafka -> worker -> recall.

The worker's streamed candidates for each user's last history click must score like the offline
evaluation of the same checkpoint (within 1 % relative at N = 50), and be the same lists for most users.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)


def test_replay_agrees_with_offline(
    worker_model: Any, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    from mind.split import comirec_split
    from workflows.replay import _windows, replay

    wm = worker_model
    cases = comirec_split(wm.inter, seed=1, ratios=(0.0, 0.0, 1.0)).test  # every user is a test user
    settings = wm.settings(kafka_bootstrap, redis_url, uid, recall_n=50)
    t0 = time.monotonic()
    rep = replay(
        wm.checkpoint,
        wm.inter,
        settings,
        cases,
        speed="asap",
        ns=(10, 20, 50),
        model_version=wm.model_version,
        timeout_s=60,
    )
    d = rep.as_dict()
    print(f"\nreplay of {rep.users} users, {rep.published} clicks in {time.monotonic() - t0:.1f}s: {d}")
    assert rep.users == len(cases) >= 30
    assert rep.missing == 0 and rep.dlq == 0 and rep.lost == 0
    assert rep.applied == rep.published
    agree = rep.agreement()
    assert agree["ok"], (agree, d["differing_sample"])
    for key in ("recall@50", "hr@50"):
        assert abs(rep.replay[key] - rep.offline[key]) <= 0.01 * rep.offline[key]
    assert rep.equal_lists >= 0.9 * rep.users, d["differing_sample"]
    assert d["latency_ms"]["samples"] == rep.published and d["throughput_cps"] > 0
    # nothing lost, nothing applied twice: every window is the tail of the user's history
    wins = _windows(settings, [wm.inter.users[c.user] for c in cases])
    for c in cases:
        assert wins[wm.inter.users[c.user]] == [int(x) for x in c.history[-wm.max_len :]]


def test_demo_and_replay_help() -> None:
    for cmd in ("demo", "replay"):
        out = subprocess.run(
            [sys.executable, "-m", "cli", cmd, "--help"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "--data" in out.stdout
