"""Pure functions of the worker's core: behaviour windows, per-user grouping, raw id -> model index.

Nothing here does I/O (except `load_catalog`, which reads the checkpoint once at start), so the rules the
worker applies can be tested, and reasoned about, without any server.

Unknown items (an item id that neither the model's vocabulary nor the catalogue, stream/catalogue.py,
knows): the click is kept and the item enters the window as the out-of-vocabulary index (mind.dataset.OOV
= 1), and `mind_worker_unknown_items_total` counts it. An item the catalogue knows enters under its global
id instead, with its catalogue side ids. Why not the DLQ: a new item is normal catalogue growth between
two trainings, not a broken message, and a dead-letter queue that fills with healthy events stops being a
signal. Keeping the click
keeps the window honest (its length sets K'_u = log2 |I_u|, its order sets which behaviours are most
recent), the user still gets a fresh recall for every click, and OOV itself is never recalled (the index
never holds rows 0/1). The counter says when a retrain is due. See stream/README.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mind.dataset import OOV, PAD, Vocab, pad_windows
from mind.train import load_checkpoint
from stream.schemas import Click


class Indexed(NamedTuple):
    """One valid click of a batch, with where it came from and its item already mapped to an index."""

    partition: int
    offset: int
    click: Click
    item: int  # model item index (OOV when unknown)


@dataclass
class UserBatch:
    """Everything one (partition, user) pair brings to a batch, in offset order."""

    partition: int
    user_id: str
    offsets: list[int] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    times: list[int] = field(default_factory=list)  # click timestamps, whole unix seconds
    last: Click | None = None  # the triggering event of this user's refresh: the last click in the batch

    @property
    def clicks(self) -> int:
        return len(self.items)

    @property
    def trigger(self) -> Click:
        """The click the refresh answers (a group always has one)."""
        if self.last is None:
            raise ValueError(f"user {self.user_id} has no click in this batch")
        return self.last

    @property
    def fence(self) -> int:
        """The triggering click's offset: what the user's refreshed state and recall message are fenced by."""
        return self.offsets[-1]


def group_by_user(clicks: Iterable[Indexed]) -> dict[tuple[int, str], UserBatch]:
    """Group a batch's valid clicks per (partition, user), keeping offset order within each group.

    The key includes the partition because windows live in partition-scoped keys (the state's offset
    and windows must share one hash slot). With `clicks` keyed by user id, as the contract says, a user
    has exactly one partition. Groups come out by partition, then by each user's first offset.
    """
    groups: dict[tuple[int, str], UserBatch] = {}
    for c in sorted(clicks, key=lambda c: (c.partition, c.offset)):
        key = (c.partition, c.click.user_id)
        g = groups.get(key)
        if g is None:
            g = groups[key] = UserBatch(c.partition, c.click.user_id)
        g.offsets.append(c.offset)
        g.items.append(c.item)
        g.event_ids.append(c.click.event_id)
        g.times.append(int(c.click.timestamp))
        g.last = c.click
    return groups


# ---- the model's vocabulary -------------------------------------------------------------------------


@dataclass
class Catalog:
    """The checkpoint's id tables, which the served tower was exported with (same vocab_hash).

    items: raw item id <-> index (PAD = 0, OOV = 1); item_side [n_items, S]: side ids per item index, so
    windows store only item indices; profile: raw profile id ("field=value") -> index (0 = none);
    user_profile: known users' stored profile rows [P].
    """

    items: Vocab
    item_side: np.ndarray
    profile: dict[str, int]
    user_profile: dict[str, np.ndarray]
    n_profile_fields: int
    vocab_hash: str
    model_version: str = ""
    side_names: list[str] = field(default_factory=list)  # raw side id of side index s: side_names[s - 1]

    def item_index(self, raw_id: str) -> int:
        """Raw item id -> model index; unknown ids -> OOV (see the module docstring)."""
        return self.items.get(raw_id, OOV)

    def raw_item(self, index: int) -> str:
        return self.items.raw_of(index)

    def profile_row(self, user_id: str, profile_ids: Sequence[str]) -> np.ndarray:
        """Profile ids [P] of a refresh: the triggering click's own ids when it carries any (in field
        order; "" or unknown -> 0 = none), else the user's row from the training data, else all none."""
        p = self.n_profile_fields
        if profile_ids:
            row = [self.profile.get(r, 0) if r else 0 for r in list(profile_ids)[:p]]
            return np.asarray(row + [0] * (p - len(row)), dtype=np.int64)
        known = self.user_profile.get(user_id)
        return known.copy() if known is not None else np.zeros(p, dtype=np.int64)

    def tower_inputs(
        self, windows: Sequence[Sequence[int]], profiles: Sequence[np.ndarray], max_len: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows -> the tower's [B,L] items (mind.dataset.pad_windows), [B,L,S] side ids, [B,P] profiles."""
        items = pad_windows([np.asarray(w, dtype=np.int64) for w in windows], max_len)
        side = self.item_side[items]  # row PAD is all zeros
        prof = (
            np.stack(profiles).astype(np.int64)
            if len(profiles)
            else np.zeros((0, self.n_profile_fields), dtype=np.int64)
        )
        return items, side, prof


def load_catalog(path: str | Path) -> Catalog:
    """Read the id tables from a training checkpoint (mind.train.save_checkpoint)."""

    _, ck = load_checkpoint(Path(path))
    item_side = np.asarray(ck["item_side"], dtype=np.int64)
    if item_side.shape[0] != len(ck["item_vocab"]) or (item_side[PAD] != 0).any():
        raise ValueError(f"checkpoint {path}: item_side must be [n_items, S] with an all-zero PAD row")
    prof = np.asarray(ck.get("user_profile"), dtype=np.int64)
    users = list(ck.get("users") or [])
    profile_vocab = list(ck.get("profile_vocab") or [])
    return Catalog(
        items=ck["item_vocab"],
        item_side=item_side,
        profile={raw: i + 1 for i, raw in enumerate(profile_vocab)},  # reserved=1: index 0 = none
        user_profile={u: prof[r] for r, u in enumerate(users)} if prof.ndim == 2 else {},
        n_profile_fields=int(prof.shape[1]) if prof.ndim == 2 else 1,
        vocab_hash=str(ck.get("vocab_hash", "")),
        model_version=str(ck.get("model_version", "")),
        side_names=[str(r) for r in ck.get("side_vocab") or []],
    )
