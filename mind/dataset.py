"""The in-memory interaction data set every loader produces and every model consumes.

Index conventions (shared by the model, the export and the stream worker):
- item index 0 is padding, 1 is the out-of-vocabulary item, real items start at 2;
- side-id and profile-id index 0 means "none"; real ids start at 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

PAD = 0
OOV = 1


@dataclass
class Vocab:
    """Raw id (string) <-> contiguous index; the first `reserved` indices are PAD/OOV."""

    raw: list[str] = field(default_factory=list)  # raw[idx - reserved] is the raw id of idx
    reserved: int = 2

    def __post_init__(self) -> None:
        self._index = {r: i + self.reserved for i, r in enumerate(self.raw)}

    def add(self, raw_id: str) -> int:
        idx = self._index.get(raw_id)
        if idx is None:
            idx = len(self.raw) + self.reserved
            self.raw.append(raw_id)
            self._index[raw_id] = idx
        return idx

    def get(self, raw_id: str, default: int = OOV) -> int:
        return self._index.get(raw_id, default)

    def raw_of(self, idx: int) -> str:
        return self.raw[idx - self.reserved]

    def __len__(self) -> int:  # number of indices including reserved ones
        return len(self.raw) + self.reserved

    def digest(self) -> str:
        """Stable hash of the vocabulary: a served index and tower must agree on it."""
        h = hashlib.sha256()
        for r in self.raw:
            h.update(r.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]


@dataclass
class Interactions:
    """One user per row, each with a chronological item sequence (item indices)."""

    name: str
    users: list[str]  # raw user ids; position = user index
    sequences: list[np.ndarray]  # int64 item indices per user, chronological
    items: Vocab  # item raw id <-> index (PAD=0, OOV=1)
    item_side: np.ndarray  # [len(items), S] int64 side ids per item, 0 = none
    n_side: int  # side-id vocabulary size (including 0)
    user_profile: np.ndarray  # [len(users), P] int64 profile ids per user, 0 = none (P may be 0)
    n_profile: int  # profile-id vocabulary size (including 0)
    timestamps: list[np.ndarray] | None = None  # float seconds per interaction, if the source has them
    planted: dict | None = None  # synthetic data only: the ground truth (item_category, user_categories)
    side_vocab: Vocab | None = None  # raw side id <-> side index (reserved=1: index 0 = none)
    profile_vocab: Vocab | None = None  # raw profile id ("field=value") <-> profile index (reserved=1)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def pad_windows(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """The last `max_len` items of each history, right-padded with PAD: the tower's input [B, L].

    Offline evaluation and the stream worker both build windows here, so they cannot drift.
    """
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for r, h in enumerate(histories):
        tail = np.asarray(h, dtype=np.int64)[-max_len:] if max_len > 0 else h[:0]
        out[r, : len(tail)] = tail
    return out
