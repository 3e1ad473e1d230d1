"""Synthetic logs: the planted truth is consistent, seeded, fast, and survives the JSONL round trip."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mind.dataset import OOV, PAD
from mind.loaders import filter_kcore, load, load_jsonl
from mind.synthetic import generate, to_jsonl


@pytest.fixture(scope="module")
def syn():
    return generate()


def test_default_is_fast() -> None:
    t = time.perf_counter()
    generate()
    assert time.perf_counter() - t < 1.0


def test_shapes_and_conventions(syn) -> None:
    assert len(syn.users) == 2000 and syn.n_items == 1000 + 2 and len(syn.sequences) == 2000
    assert syn.item_side.shape == (1002, 1) and syn.n_side == 21
    assert syn.user_profile.shape == (2000, 2) and syn.n_profile == 1 + 6 + 2
    assert np.all(syn.user_profile > 0) and int(syn.user_profile.max()) < syn.n_profile
    lengths = np.array([len(s) for s in syn.sequences])
    assert lengths.min() >= 20 and lengths.max() <= 50
    assert all(int(s.min()) >= 2 and int(s.max()) < syn.n_items for s in syn.sequences)
    assert all(np.all(np.diff(t) > 0) for t in syn.timestamps)
    truth = syn.planted
    ic = truth["item_category"]
    assert ic.shape == (1002,) and ic[PAD] == -1 and ic[OOV] == -1 and set(ic[2:]) == set(range(20))
    assert np.array_equal(syn.item_side[2:, 0], ic[2:] + 1) and syn.item_side[:2].tolist() == [[0], [0]]
    assert syn.side_vocab.raw_of(int(syn.item_side[2, 0])) == f"category={ic[2]}"
    for cats, w in zip(truth["user_categories"], truth["user_weights"], strict=True):
        assert 2 <= len(cats) <= 4 and len(set(cats)) == len(cats) and len(w) == len(cats)
        assert abs(w.sum() - 1) < 1e-9


def test_clicks_follow_planted_interests(syn) -> None:
    ic = syn.planted["item_category"]
    inside, total = 0, 0
    for seq, cats, noise in zip(
        syn.sequences, syn.planted["user_categories"], syn.planted["noise_mask"], strict=True
    ):
        hit = np.isin(ic[seq], cats)
        assert hit[~noise].all()  # every non-noise click is in one of the user's categories
        inside += int(hit.sum())
        total += len(seq)
    rate = inside / total
    # noise clicks land in the user's categories by chance ~ 3/20 of the time
    assert 1 - 0.05 - 0.01 < rate < 1 - 0.05 * (1 - 4 / 20) + 0.01
    noise_rate = np.concatenate(syn.planted["noise_mask"]).mean()
    assert abs(noise_rate - 0.05) < 0.01


def test_noise_free_and_sessions() -> None:
    inter = generate(n_users=300, noise=0.0, seed=3)
    ic = inter.planted["item_category"]
    same = []
    for seq, cats in zip(inter.sequences, inter.planted["user_categories"], strict=True):
        c = ic[seq]
        assert np.isin(c, cats).all()
        same.append(np.mean(c[1:] == c[:-1]))
    assert np.mean(same) > 0.6  # sticky sessions: consecutive clicks mostly share a category


def test_popularity_is_skewed(syn) -> None:
    counts = np.bincount(np.concatenate(syn.sequences), minlength=syn.n_items)[2:]
    cat = syn.planted["item_category"][2:]
    members = np.flatnonzero(cat == 0)
    c = np.sort(counts[members])[::-1]
    assert c[0] > 5 * np.median(c)


def test_profile_correlates_with_main_interest(syn) -> None:
    pv = syn.profile_vocab
    ages = np.array([int(pv.raw_of(int(p)).split("=")[1]) for p in syn.user_profile[:, 0]])
    main = np.array(
        [
            c[int(np.argmax(w))]
            for c, w in zip(syn.planted["user_categories"], syn.planted["user_weights"], strict=True)
        ]
    )
    assert np.mean(ages == main % 6) > 0.7


def test_determinism() -> None:
    a, b, c = generate(n_users=200, seed=5), generate(n_users=200, seed=5), generate(n_users=200, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.timestamps, b.timestamps, strict=True))
    assert np.array_equal(a.user_profile, b.user_profile) and np.array_equal(a.item_side, b.item_side)
    assert a.planted["user_categories"] == b.planted["user_categories"]
    assert not all(np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences, strict=False))


def test_without_side_or_profile() -> None:
    inter = generate(n_users=50, with_side=False, with_profile=False)
    assert inter.item_side.shape == (inter.n_items, 1) and not inter.item_side.any() and inter.n_side == 1
    assert inter.user_profile.shape == (50, 0) and inter.n_profile == 1


def test_to_jsonl_round_trip(tmp_path: Path) -> None:
    inter = generate(n_users=100, seed=1)
    p = tmp_path / "clicks.jsonl"
    n = to_jsonl(inter, p)
    assert n == inter.n_interactions
    events = [json.loads(line) for line in p.read_text().splitlines()]
    assert len({e["event_id"] for e in events}) == n
    ts = [e["timestamp"] for e in events]
    assert ts == sorted(ts)
    assert {"event_id", "user_id", "item_id", "timestamp", "side_ids", "profile_ids"} == set(events[0])
    back = load(p)  # auto-detected as jsonl
    for u, raw in enumerate(inter.users):
        v = back.users.index(raw)
        assert [back.items.raw_of(int(i)) for i in back.sequences[v]] == [
            inter.items.raw_of(int(i)) for i in inter.sequences[u]
        ]
        assert np.allclose(back.timestamps[v], inter.timestamps[u])
        assert [back.profile_vocab.raw_of(int(x)) for x in back.user_profile[v]] == [
            inter.profile_vocab.raw_of(int(x)) for x in inter.user_profile[u]
        ]
    item, cat = back.items.get("7"), inter.planted["item_category"][inter.items.get("7")]
    assert back.side_vocab.raw_of(int(back.item_side[item, 0])) == f"category={cat}"


def test_to_jsonl_start_ts_and_untimed(tmp_path: Path) -> None:
    inter = generate(n_users=20, seed=2)
    to_jsonl(inter, tmp_path / "a.jsonl", start_ts=1000.0)
    ts = [json.loads(x)["timestamp"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert ts[0] == 1000.0 and ts == sorted(ts)
    inter.timestamps = None
    to_jsonl(inter, tmp_path / "b.jsonl", start_ts=5.0, event_prefix="demo")
    back = load_jsonl(tmp_path / "b.jsonl")
    events = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert events[0]["event_id"] == "demo-0" and events[0]["timestamp"] == 5.0
    assert np.all(np.diff([e["timestamp"] for e in events]) == 1.0)
    for u, raw in enumerate(inter.users):
        v = back.users.index(raw)
        assert [back.items.raw_of(int(i)) for i in back.sequences[v]] == [
            inter.items.raw_of(int(i)) for i in inter.sequences[u]
        ]


def test_kcore_keeps_truth_aligned() -> None:
    inter = generate(n_users=100, n_items=2000, seed=4)
    out = filter_kcore(inter, 5, 5)
    assert out.n_items < inter.n_items
    ic_old, ic_new = inter.planted["item_category"], out.planted["item_category"]
    assert ic_new.shape == (out.n_items,) and ic_new[0] == ic_new[1] == -1
    for i in range(2, out.n_items):
        assert ic_new[i] == ic_old[inter.items.get(out.items.raw_of(i))]
    assert len(out.planted["user_categories"]) == len(out.users)
    for u in range(len(out.users)):
        assert len(out.planted["noise_mask"][u]) == len(out.sequences[u])
