"""stream.catalogue against a real Valkey (and a real tritonserver for the tower contract): global ids, each
version's view, the store's atomic registration, the worker's catalogue following the store, and the
cold-start embedding that the feed, the roll and the tower compute alike."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from towerkit import N_ITEMS, N_SIDE, L, random_batch, torch_out

from mind.dataset import OOV, Vocab
from mind.model import MIND, MINDConfig
from stream.catalogue import (
    CatalogueStore,
    ColdTables,
    ItemSpace,
    LiveCatalog,
    VersionView,
    dump_catalog,
    load_catalog_bytes,
)
from stream.schemas import CatalogRecord, InvalidEvent, dump_catalog_record, parse_catalog_record
from stream.tower import TritonTower
from stream.window import Catalog


def catalog(raws: list[str], sides: dict[str, list[str]] | None = None, S: int = 2, tag: str = "") -> Catalog:
    """A checkpoint's tables: items `raws`, side names cat=0..cat=4, each item's side ids from `sides`."""
    names = [f"cat={c}" for c in range(5)]
    index = {n: i + 1 for i, n in enumerate(names)}
    items = Vocab(list(raws))
    side = np.zeros((len(items), S), dtype=np.int64)
    for r, ss in (sides or {}).items():
        ids = [index[s] for s in ss][:S]
        side[items.get(r), : len(ids)] = ids
    return Catalog(
        items=items,
        item_side=side,
        profile={"age=1": 1},
        user_profile={"u1": np.array([1])},
        n_profile_fields=1,
        vocab_hash=items.digest() + tag,
        side_names=names,
    )


def no_sides(raws: Any) -> dict[str, tuple[str, ...]]:
    return {}


# ---- ids and views (no server) ----------------------------------------------------------------------------


def test_base_view_is_the_identity_and_cold_items_follow_the_vocabulary() -> None:
    base = catalog(["a", "b", "c"], {"a": ["cat=1"]})
    space = ItemSpace(base.items, ["x", "y"])
    sides = {"x": ("cat=2", "nope", "cat=3", "cat=4"), "y": ("unknown",)}
    view = VersionView(base, space, lambda raws: {r: sides[r] for r in raws if r in sides})
    assert view.served(np.arange(len(space))).tolist() == list(range(7))  # PAD, OOV, a, b, c, x, y
    assert (view.n_items, view.n_served) == (5, 7)
    # unknown side ids dropped, at most S kept; no known side id: blank (not indexed)
    assert view.side_rows([5]).tolist() == [[3, 4]] and view.blank == {6}
    assert view.raw_item(5) == "x" and view.raw_item(1) is None and view.raw_item(99) is None
    # a window of global ids: cold items keep their id beyond the vocabulary and bring their side ids
    items, side, prof = view.tower_inputs([[2, 5], [6]], [np.array([1]), np.array([0])], 4)
    assert items.tolist() == [[2, 5, 0, 0], [6, 0, 0, 0]]
    assert side[0].tolist() == [[2, 0], [3, 4], [0, 0], [0, 0]] and prof.tolist() == [[1], [0]]
    # an id this view has not mapped yet (another process read further): the unknown item, not garbage
    assert view.served([2, 9, 0]).tolist() == [2, OOV, 0]


def test_another_vocabulary_maps_the_same_global_ids_through_its_own_indices() -> None:
    base = catalog(["a", "b", "c"])
    space = ItemSpace(base.items, ["x", "y"])
    # a model retrained with x, without c, in another order: c becomes one of ITS cold items
    new = catalog(["x", "b", "a"], {"x": ["cat=4"], "a": ["cat=0"]})
    view = VersionView(new, space, lambda raws: {"c": ("cat=1",), "y": ("cat=2",)})
    assert view.served([2, 3, 4, 5, 6]).tolist() == [4, 3, 5, 2, 6]  # a, b, c (cold), x, y (cold)
    assert view.raw_item(5) == "c" and view.raw_item(6) == "y" and view.raw_item(2) == "x"
    assert view.side_rows([2, 5, 6]).tolist() == [[5, 0], [2, 0], [3, 0]]  # x keeps its trained side ids
    assert view.is_trained("x") and not view.is_trained("c")
    # the catalogue grows: the new global id extends the view, earlier served ids never move
    space.extend(["z"])
    assert view.extend(space, lambda raws: {"z": ("cat=3",)}) == [7]
    assert view.served([4, 7]).tolist() == [5, 7]
    # side ids of a cold item change; a trained item's do not
    assert view.update_sides({"c": ("cat=0",), "x": ("cat=1",)}) == [5]
    assert view.side_rows([5, 2]).tolist() == [[1, 0], [5, 0]]


def test_catalog_round_trips_through_bytes() -> None:
    c = catalog(["a", "b"], {"b": ["cat=2", "cat=3"]})
    got = load_catalog_bytes(dump_catalog(c))
    assert got.items.raw == c.items.raw and np.array_equal(got.item_side, c.item_side)
    assert got.vocab_hash == c.vocab_hash and got.side_names == c.side_names and got.profile == c.profile
    assert got.user_profile["u1"].tolist() == [1] and got.n_profile_fields == 1


def test_cold_embedding_is_the_model_s_for_an_index_beyond_its_vocabulary() -> None:
    torch.manual_seed(0)
    model = MIND(MINDConfig(n_items=20, n_side=6, d=8, K=2, max_len=5)).eval()
    rows = np.array([[1, 4], [5, 0], [0, 0]])
    tables = ColdTables.from_model(model, "v1", "h")
    ids = torch.tensor([20, 21, 57])  # >= n_items: catalogue items newer than the model
    want = model.embed_items(ids, torch.as_tensor(rows)).detach().numpy()
    np.testing.assert_allclose(tables.vectors(rows), want, atol=1e-6, rtol=0)
    unknown = model.embed_items(torch.full((3,), OOV), torch.as_tensor(rows)).detach().numpy()
    np.testing.assert_array_equal(want, unknown)  # the id part is exactly the unknown item's
    side = np.zeros((23, 2), dtype=np.int64)
    side[20:] = rows
    np.testing.assert_allclose(model.item_vectors(torch.as_tensor(side))[20:].numpy(), want, atol=1e-6)
    assert ColdTables.load(tables.dump()).vectors(rows).tolist() == tables.vectors(rows).tolist()


def test_catalog_records_parse_and_bad_ones_say_why() -> None:
    r = parse_catalog_record(b'{"item_id": "n1", "side_ids": ["cat=1"], "updated_at": 5, "extra": 1}')
    assert r == CatalogRecord("n1", ("cat=1",), 5.0)
    assert parse_catalog_record(dump_catalog_record(r)) == r
    for raw, code, why in (
        (b'{"item_id": "n1"}', "schema", "missing field side_ids"),
        (b'{"item_id": 7, "side_ids": []}', "schema", "item_id must be a string"),
        (b'{"item_id": "n", "side_ids": "cat=1"}', "schema", "side_ids must be an array"),
        (b"nope", "not_json", "not JSON"),
    ):
        with pytest.raises(InvalidEvent) as err:
            parse_catalog_record(raw)
        assert err.value.code == code and why in err.value.reason


# ---- the store (real Valkey) ----------------------------------------------------------------------------


def test_store_allocates_global_ids_once_even_under_concurrent_feeds(redis_db: Any) -> None:
    store = CatalogueStore(redis_db, "t")
    base = catalog(["a", "b"])
    assert store.publish_catalog(base) is True
    other = catalog(["b", "a"])
    assert store.publish_catalog(other) is False  # published, but the base stays the first one
    assert store.base_hash() == base.vocab_hash and store.load_catalog(other.vocab_hash).items.raw == [
        "b",
        "a",
    ]
    records = [CatalogRecord(f"n{i}", (f"cat={i % 5}",)) for i in range(300)]
    results: list[list[int]] = []

    def feed(part: list[CatalogRecord]) -> None:
        results.append(CatalogueStore(redis_db, "t", chunk=7).register(part, base.items))

    parts = [records[k::2] + records[:50] for k in range(2)]  # the first 50 items come from both feeds
    threads = [threading.Thread(target=feed, args=(part,)) for part in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    extras, log = store.read_since(0, 0)
    assert sorted(extras) == sorted(r.item_id for r in records) and len(extras) == 300  # each item once
    space = ItemSpace(base.items, extras)
    # both feeds got the one id the store allocated for every item, whichever registered it first
    assert sorted(g for got in results for g in got) == sorted(
        space.index(r.item_id) for p in parts for r in p
    )
    assert len(log) == 400  # every record applied is in the change log
    assert store.register([CatalogRecord("a", ("cat=1",))], base.items) == [2]  # a base item keeps its id
    assert store.sides(["a", "n3", "zz"]) == {"a": ("cat=1",), "n3": ("cat=3",)}


def test_live_catalog_learns_new_items_and_side_changes_without_a_restart(redis_db: Any) -> None:
    base = catalog(["a", "b"], {"a": ["cat=1"]})
    worker = LiveCatalog(base, CatalogueStore(redis_db, "w"), refresh_s=3600).attach()
    feed = CatalogueStore(redis_db, "w")
    assert worker.item_index("n1") == OOV
    feed.register([CatalogRecord("n1", ("cat=2",)), CatalogRecord("n2", ())], base.items)
    assert worker.sync() == 0  # not due: refresh_s has not passed
    assert worker.sync(force=True) == 2
    g1, g2 = worker.item_index("n1"), worker.item_index("n2")
    assert (g1, g2) == (4, 5) and worker.raw_item(5) == "n2"
    view = worker.view()
    assert view.side_rows([4]).tolist() == [[3, 0]] and view.blank == {5}
    feed.register([CatalogRecord("n2", ("cat=4", "cat=0")), CatalogRecord("a", ("cat=3",))], base.items)
    worker.sync(force=True)
    assert view.side_rows([5, 2]).tolist() == [[5, 1], [2, 0]] and view.blank == set()  # a keeps its own


def test_a_worker_started_with_another_checkpoint_maps_through_the_base(redis_db: Any) -> None:
    base = catalog(["a", "b", "c"], {"c": ["cat=1"]})
    LiveCatalog(base, CatalogueStore(redis_db, "m")).attach()  # the first worker: its vocabulary is the base
    newer = catalog(["c", "d", "a"], {"d": ["cat=2"]})
    w2 = LiveCatalog(newer, CatalogueStore(redis_db, "m")).attach()
    assert w2.item_index("d") == 5  # an item the base lacks got the next global id
    assert w2.view().served([2, 3, 4, 5]).tolist() == [4, 5, 2, 3]  # a, b (cold for it), c, d
    assert w2.view().side_rows([5]).tolist() == [[0, 0]] and 5 in w2.view().blank  # b has no record
    # the first worker follows the newer vocabulary once it is served: published by attach (or a roll)
    w1 = LiveCatalog(base, CatalogueStore(redis_db, "m")).attach()
    followed = w1.follow(newer.vocab_hash)
    assert followed is not None and followed.served([5]).tolist() == [3] and w1.vocab_hash == newer.vocab_hash
    assert w1.follow("not-published") is None


# ---- the tower contract on Triton --------------------------------------------------------------------------


@pytest.mark.slow
def test_triton_takes_ids_beyond_the_vocabulary_exactly_as_torch(triton: Any) -> None:
    """The served MIND embeds an index >= n_items as the unknown item plus its side ids, like torch."""
    tower = TritonTower(triton.server.grpc_url, "mind")
    items, side, prof = random_batch(6, seed=4, lengths=[1, 3, 5, L, L, 7])
    cold = items.copy()
    cold[items > 0] += N_ITEMS * (np.arange(items[items > 0].size) % 3)  # every third real id stays trained
    got_i, got_a, _ = tower.infer(cold, side, prof)
    ref_i, ref_a = torch_out(triton.towers["mind"], (cold, side, prof))
    assert np.abs(got_i - ref_i).max() <= 1e-5 and np.array_equal(got_a, ref_a)
    as_unknown = np.where(cold >= N_ITEMS, OOV, cold)  # what the worker sends: the same interests
    again, _, _ = tower.infer(as_unknown, side, prof)
    assert np.abs(again - got_i).max() <= 1e-5
    assert side.max() < N_SIDE
    tower.close()
