"""The two offline evaluation protocols of DESIGN.md, as user splits plus (history, targets) cases.

Both protocols split USERS, never interactions: train users contribute their full sequences to
training; valid/test users are only ever seen as evaluation cases.

- ComiRec (primary): users sorted by raw id (numerically when every id is an integer, else
  lexicographically), shuffled with ``random.Random(seed).shuffle`` and cut 8:1:1 at
  ``int(n*0.8)`` and ``int(n*0.9)``, exactly as ComiRec's preprocessing does; a valid/test user's
  first ``int(len*hist_frac)`` items are the history and every later item is a target. On Beauty
  (seed 1230) this gives the reference 2,237 test users.
- MIND paper (secondary): the same user split (same seed and ratios by default, so the two
  protocols test the same people), then one random interacted item per user, never the first,
  is the target and the items before it are the history.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mind.dataset import Interactions


@dataclass
class EvalCase:
    """One evaluation query: the user index, what the model may see, and what it should find."""

    user: int
    history: np.ndarray  # int64 item indices, chronological
    targets: np.ndarray  # int64 item indices, chronological


@dataclass
class Split:
    """User partition and evaluation cases; ``skipped`` counts valid/test users with no usable case."""

    train_users: np.ndarray
    valid: list[EvalCase]
    test: list[EvalCase]
    valid_users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test_users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    skipped: int = 0
    protocol: str = "comirec"
    seed: int = 0


def shuffled_users(inter: Interactions, seed: int) -> list[int]:
    """User indices sorted by raw id (numeric if all ids are integers), then shuffled by ``seed``."""
    raw = inter.users
    try:
        keys: list = [int(r) for r in raw]
    except ValueError:
        keys = list(raw)
    order = sorted(range(len(raw)), key=keys.__getitem__)
    random.Random(seed).shuffle(order)
    return order


def _cut(
    inter: Interactions, seed: int, ratios: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {ratios}")
    order = shuffled_users(inter, seed)
    n, total = len(order), sum(ratios)  # need not sum to 1; (0.8, 0.1, 0.1) cuts at int(0.8n), int(0.9n)
    a, b = int(n * ratios[0] / total), int(n * (ratios[0] + ratios[1]) / total)
    arr = np.asarray(order, dtype=np.int64)
    return arr[:a], arr[a:b], arr[b:]


def _cases(
    inter: Interactions, users: np.ndarray, cut: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> tuple[list[EvalCase], int]:
    """One EvalCase per user with at least 2 items (history, targets = cut(sequence)); the rest counted."""
    out, skipped = [], 0
    for u in users.tolist():
        seq = inter.sequences[u]
        if len(seq) < 2:
            skipped += 1
            continue
        history, targets = cut(seq)
        out.append(EvalCase(u, history, targets))
    return out, skipped


def comirec_split(
    inter: Interactions,
    seed: int = 1230,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    hist_frac: float = 0.8,
) -> Split:
    """ComiRec protocol: history = first ``int(len*hist_frac)`` items (>= 1), targets = the rest (>= 1).

    Users with fewer than 2 items cannot give both and are skipped (counted in ``skipped``).
    """
    train, valid, test = _cut(inter, seed, ratios)

    def cut(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = min(max(1, int(len(seq) * hist_frac)), len(seq) - 1)
        return seq[:k], seq[k:]

    (v, sv), (t, st) = _cases(inter, valid, cut), _cases(inter, test, cut)
    skipped = sv + st
    return Split(train, v, t, valid, test, skipped=skipped, protocol="comirec", seed=seed)


def mind_paper_split(
    inter: Interactions,
    seed: int = 1230,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    target_seed: int | None = None,
) -> Split:
    """MIND-paper protocol: one random item (position >= 1) is the target, the items before it the history.

    The user split is the ComiRec one for the same ``seed``/``ratios``; target positions are drawn
    with ``random.Random(target_seed)`` (default: ``seed``), in valid-then-test user order.
    """
    train, valid, test = _cut(inter, seed, ratios)
    rng = random.Random(seed if target_seed is None else target_seed)

    def cut(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = rng.randrange(1, len(seq))
        return seq[:t], seq[t : t + 1]

    (v, sv), (t, st) = _cases(inter, valid, cut), _cases(inter, test, cut)
    skipped = sv + st
    return Split(train, v, t, valid, test, skipped=skipped, protocol="mind", seed=seed)


def train_sequences(inter: Interactions, split: Split) -> list[np.ndarray]:
    """The training set: full sequences of the train users (valid/test users never train)."""
    return [inter.sequences[u] for u in split.train_users.tolist()]
