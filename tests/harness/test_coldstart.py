"""harness.coldstart on a small planted data set: the hold-out rules, the data without the held-out items,
and a whole run's report (the numbers in reports/coldstart_*.json come from the same code on real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.coldstart import ColdstartConfig, catalogue_records, holdout_items, run, table, without_items
from mind.split import comirec_split
from mind.synthetic import generate


def test_holdout_rules_and_the_data_without_the_held_out_items() -> None:
    inter = generate(n_users=120, n_items=200, n_categories=8, seq_len=(6, 12), seed=1)
    inter.timestamps = None  # no clock: "auto" is the seeded random 10 %
    held, rule = holdout_items(inter, "random", 0.1, seed=5)
    assert rule == "random" and len(held) == 20 and held == holdout_items(inter, "auto", 0.1, seed=5)[0]
    inter.timestamps = [np.arange(len(s), dtype=float) + 1000.0 * u for u, s in enumerate(inter.sequences)]
    latest, rule = holdout_items(inter, "auto", 0.1, seed=5)
    first = {}
    for s, ts in zip(inter.sequences, inter.timestamps, strict=True):
        for i, t in zip(s.tolist(), ts.tolist(), strict=True):
            first[i] = min(first.get(i, t), t)
    inf = float("inf")  # an item nobody clicked counts as the latest of all
    kept_last = max(v for i, v in first.items() if i not in latest)
    assert rule == "latest" and min(first.get(i, inf) for i in latest) >= kept_last
    base = without_items(inter, latest)
    raws = {inter.items.raw_of(i) for i in latest}
    assert not raws & set(base.items.raw) and len(base.items) == len(inter.items) - 20
    assert all(base.items.raw_of(int(i)) not in raws for s in base.sequences for i in s)
    assert base.users == inter.users
    assert np.array_equal(comirec_split(base).train_users, comirec_split(inter).train_users)
    records = catalogue_records(inter, latest[:2])
    assert records[0].item_id == inter.items.raw_of(latest[0]) and records[0].side_ids[0].startswith(
        "category="
    )


def test_a_run_scores_the_three_ways(tmp_path: Path) -> None:
    inter = generate(n_users=300, n_items=300, n_categories=10, seq_len=(8, 16), seed=3)
    cfg = ColdstartConfig(holdout="random", epochs=3, budget_s=60, unknown_rate=0.2)
    rep = run(
        inter, tmp_path / "r.json", cfg, checkpoints=tmp_path / "ck", progress=False, log=lambda _: None
    )
    a, b = rep["figures"]["heldout_targets"], rep["figures"]["affected_users"]
    assert a["users"] > 0 and b["users"] > 0
    assert a["unknown"]["recall@50"] == 0.0  # never in the index: never recalled
    assert a["cold"]["recall@50"] > 0.0 and a["cold_start_trained"]["recall@50"] > 0.0
    assert rep["feed_equals_roll_max_abs_diff"] <= 1e-5  # the feed's tables = the roll's model
    assert rep["heldout"]["items"] == 30 and (tmp_path / "r.json").is_file()
    assert "cold-start embedding" in table(rep) and "retrained" in table(rep)
    again = run(inter, None, cfg, checkpoints=tmp_path / "ck", progress=False, log=lambda _: None)
    assert again["figures"] == rep["figures"]  # checkpoints reused, deterministic scoring
