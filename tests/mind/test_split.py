"""Evaluation splits: sizes, disjointness, determinism, and the Beauty reference of 2,237 test users."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mind.dataset import Interactions, Vocab
from mind.loaders import filter_kcore, load
from mind.split import comirec_split, mind_paper_split, shuffled_users, train_sequences
from mind.synthetic import generate

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # /work/shared/data beside the repo
BEAUTY_TXT = DATA / "beauty" / "Beauty.txt"


def tiny(users: list[str], lengths: list[int]) -> Interactions:
    items = Vocab([str(i) for i in range(max(lengths, default=0))])
    return Interactions(
        name="tiny",
        users=users,
        items=items,
        sequences=[np.arange(2, 2 + n, dtype=np.int64) for n in lengths],
        item_side=np.zeros((len(items), 1), dtype=np.int64),
        n_side=1,
        user_profile=np.zeros((len(users), 0), dtype=np.int64),
        n_profile=1,
    )


@pytest.fixture(scope="module")
def syn() -> Interactions:
    return generate(n_users=1000, seed=7)


def test_comirec_sizes_and_disjointness(syn) -> None:
    s = comirec_split(syn)
    assert (len(s.train_users), len(s.valid_users), len(s.test_users)) == (800, 100, 100)
    everyone = np.concatenate([s.train_users, s.valid_users, s.test_users])
    assert sorted(everyone.tolist()) == list(range(1000))
    assert [c.user for c in s.valid] == s.valid_users.tolist()
    assert [c.user for c in s.test] == s.test_users.tolist() and s.skipped == 0
    for c in s.valid + s.test:
        seq = syn.sequences[c.user]
        assert len(c.history) == int(len(seq) * 0.8) and len(c.targets) >= 1
        assert np.array_equal(np.concatenate([c.history, c.targets]), seq)
    train = train_sequences(syn, s)
    assert len(train) == 800 and all(t is syn.sequences[u] for t, u in zip(train, s.train_users, strict=True))


def test_comirec_is_seeded(syn) -> None:
    a, b, c = comirec_split(syn), comirec_split(syn), comirec_split(syn, seed=1)
    assert np.array_equal(a.test_users, b.test_users) and not np.array_equal(a.test_users, c.test_users)


def test_users_sorted_then_shuffled() -> None:
    numeric = tiny(["10", "9", "100", "2"], [3, 3, 3, 3])
    expect = [3, 1, 0, 2]  # 2 < 9 < 10 < 100
    random.Random(1230).shuffle(expect)
    assert shuffled_users(numeric, 1230) == expect
    text = tiny(["b", "a10", "a9", "c"], [3, 3, 3, 3])
    expect = [1, 2, 0, 3]  # "a10" < "a9" < "b" < "c"
    random.Random(5).shuffle(expect)
    assert shuffled_users(text, 5) == expect


def test_short_users_are_skipped_and_counted() -> None:
    inter = tiny([str(i) for i in range(20)], [1 if i % 2 else 2 for i in range(20)])
    s = comirec_split(inter)
    evaluated = len(s.valid_users) + len(s.test_users)
    assert len(s.valid) + len(s.test) + s.skipped == evaluated and s.skipped > 0
    for c in s.valid + s.test:  # a 2-item user gives 1 history item and 1 target
        assert len(c.history) == 1 and len(c.targets) == 1


def test_mind_paper_split(syn) -> None:
    m, c = mind_paper_split(syn), comirec_split(syn)
    assert np.array_equal(m.test_users, c.test_users) and np.array_equal(m.train_users, c.train_users)
    positions = []
    for case in m.valid + m.test:
        seq = syn.sequences[case.user]
        t = len(case.history)
        assert 1 <= t < len(seq) and len(case.targets) == 1
        assert np.array_equal(case.history, seq[:t]) and case.targets[0] == seq[t]
        positions.append(t / len(seq))
    assert 0.3 < np.mean(positions) < 0.7  # uniform over positions, not always the last
    again = mind_paper_split(syn)
    assert [len(x.history) for x in again.test] == [len(x.history) for x in m.test]
    other = mind_paper_split(syn, target_seed=99)
    assert [len(x.history) for x in other.test] != [len(x.history) for x in m.test]


@pytest.mark.skipif(not BEAUTY_TXT.exists(), reason=f"no Beauty data at {BEAUTY_TXT}")
def test_beauty_reference_split() -> None:
    inter = filter_kcore(load(BEAUTY_TXT), min_item=5, min_user=5)
    assert len(inter.users) == 22_363  # Beauty.txt is already 5-core: the ComiRec filter keeps everyone
    s = comirec_split(inter, seed=1230)
    assert (len(s.train_users), len(s.valid), len(s.test)) == (17_890, 2_236, 2_237)
    assert s.skipped == 0
    assert not set(s.test_users.tolist()) & set(s.train_users.tolist())
    assert all(len(c.history) >= 4 and len(c.targets) >= 1 for c in s.test)
