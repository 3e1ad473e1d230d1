"""The worker's pure rules: per-user grouping, raw id -> index, tower inputs. (The window rule itself lives
in the Lua script and is tested against a real server in test_state.py.)"""

from __future__ import annotations

import numpy as np

from mind.dataset import OOV, Vocab
from stream.schemas import Click
from stream.window import Catalog, Indexed, group_by_user


def _ix(p: int, off: int, user: str, item: int) -> Indexed:
    return Indexed(p, off, Click(f"e{p}-{off}", user, str(item), 1.0 + off), item)


def test_group_by_user_keeps_offset_order_and_last_click() -> None:
    clicks = [_ix(1, 12, "b", 9), _ix(0, 5, "a", 3), _ix(1, 10, "b", 7), _ix(0, 7, "a", 4), _ix(0, 6, "c", 2)]
    g = group_by_user(clicks)
    assert list(g) == [(0, "a"), (0, "c"), (1, "b")]
    a, b = g[(0, "a")], g[(1, "b")]
    assert (a.offsets, a.items, a.last.event_id) == ([5, 7], [3, 4], "e0-7")  # type: ignore[union-attr]
    assert (b.offsets, b.items, b.last.event_id) == ([10, 12], [7, 9], "e1-12")  # type: ignore[union-attr]
    assert g[(0, "c")].clicks == 1 and group_by_user([]) == {}


def _catalog() -> Catalog:
    items = Vocab(["i-a", "i-b", "i-c"])  # indices 2, 3, 4
    side = np.array([[0, 0], [0, 0], [1, 0], [2, 3], [1, 1]], dtype=np.int64)
    return Catalog(
        items=items,
        item_side=side,
        profile={"age=1": 1, "gender=F": 2},
        user_profile={"known": np.array([1, 2])},
        n_profile_fields=2,
        vocab_hash="h",
    )


def test_unknown_items_map_to_oov_and_raw_ids_round_trip() -> None:
    cat = _catalog()
    assert [cat.item_index(r) for r in ("i-a", "i-c", "never-seen")] == [2, 4, OOV]
    assert cat.raw_item(3) == "i-b"


def test_profile_row_prefers_the_click_then_the_training_row() -> None:
    cat = _catalog()
    assert cat.profile_row("x", ["gender=F"]).tolist() == [2, 0]
    assert cat.profile_row("x", ["", "gender=F", "extra"]).tolist() == [0, 2]  # "" = missing column
    assert cat.profile_row("x", ["unknown=1"]).tolist() == [0, 0]
    assert cat.profile_row("known", []).tolist() == [1, 2]
    assert cat.profile_row("stranger", []).tolist() == [0, 0]


def test_tower_inputs_pad_right_and_look_up_side_ids() -> None:
    cat = _catalog()
    items, side, prof = cat.tower_inputs([[2, 3, 4, 3], [OOV]], [np.array([1, 0]), np.array([0, 2])], 3)
    assert items.tolist() == [[3, 4, 3], [OOV, 0, 0]]  # last 3, right-padded (mind.dataset.pad_windows)
    assert side[0].tolist() == [[2, 3], [1, 1], [2, 3]] and side[1].tolist() == [[0, 0]] * 3
    assert prof.tolist() == [[1, 0], [0, 2]]
    empty = cat.tower_inputs([], [], 3)
    assert [x.shape for x in empty] == [(0, 3), (0, 3, 2), (0, 2)]
