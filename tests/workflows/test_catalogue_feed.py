"""Cold start end to end, every server real (Tansu, Valkey, tritonserver, milvus-lite): catalogue records
through the real feed (topic and file, bad ones to the DLQ) -> the catalogue and the active Milvus version ->
clicks on the new items through the real worker: their side ids reach the tower, they shape the interests and
come back in recall; then a roll to a model retrained with another item vocabulary, which the worker follows
without a restart and without a batch that mixes vocabularies."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import Producer
from typer.testing import CliRunner
from workerkit import Reader, Running, covers, metric, publish, setup_topics, until

from indexer.store import ItemIndex
from mind.dataset import OOV, Interactions, Vocab
from mind.model import MIND
from mind.synthetic import generate
from mind.train import model_config_for, save_checkpoint
from stream.catalogue import CatalogueStore, LiveCatalog
from stream.schemas import (
    CatalogRecord,
    Click,
    decode_b64,
    dump_catalog_record,
    dump_click,
    parse_dlq,
    parse_recall,
)
from stream.settings import Settings, redis_client
from stream.state import WindowState
from stream.window import load_catalog
from workflows.catalogue import CatalogueFeed, catalogue_consumer, feed_file, run_topic
from workflows.roll import roll, versions_agree

pytestmark = pytest.mark.slow

NEW = {"new-1": ("category=3",), "new-2": ("category=5", "no-such-side"), "new-3": ("unknown-side",)}


@dataclass
class Ckpt:
    """What Running needs of a model: its checkpoint."""

    checkpoint: Path


def base_data() -> Interactions:
    return generate(n_users=40, n_items=300, n_categories=10, seq_len=(5, 12), seed=3)


def checkpoint(inter: Interactions, path: Path, seed: int) -> tuple[Path, MIND]:
    cfg = model_config_for(inter, d=16, K=4, max_len=8)
    torch.manual_seed(seed)
    model = MIND(cfg).eval()
    save_checkpoint(path, model, inter, None)
    return path, model


def retrained(inter: Interactions, drop: str) -> Interactions:
    """The data a retrain would see: the new items known (first, so every index moves), `drop` gone."""
    side_index = {n: i + 1 for i, n in enumerate(inter.side_vocab.raw)}
    raws = list(NEW) + [r for r in reversed(inter.items.raw) if r != drop]
    items = Vocab(raws)
    side = np.zeros((len(items), inter.item_side.shape[1]), dtype=np.int64)
    for r in raws:
        row = (
            [side_index[s] for s in NEW[r] if s in side_index]
            if r in NEW
            else inter.item_side[inter.items.get(r)]
        )
        side[items.get(r), : len(row)] = np.asarray(row)[: side.shape[1]]
    seqs = [
        np.asarray([items.get(inter.items.raw_of(int(i))) for i in s if inter.items.raw_of(int(i)) != drop])
        for s in inter.sequences
    ]
    return Interactions(
        name="retrained",
        users=inter.users,
        sequences=seqs,
        items=items,
        item_side=side,
        n_side=inter.n_side,
        user_profile=inter.user_profile,
        n_profile=inter.n_profile,
        side_vocab=inter.side_vocab,
        profile_vocab=inter.profile_vocab,
    )


def stack_settings(triton: Any, milvus_uri: str, kafka_bootstrap: str, redis_url: str, uid: str) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        triton_url=triton.server.grpc_url,
        triton_model=f"cold_{tag}",
        milvus_uri=milvus_uri,
        milvus_prefix=f"c{tag}",
        clicks_topic=f"clicks-{uid}",
        recall_topic=f"recall-{uid}",
        dlq_topic=f"dlq-{uid}",
        catalog_topic=f"catalog-{uid}",
        catalog_dlq_topic=f"catalog-{uid}.dlq",
        group_id=f"workers-{uid}",
        partitions=2,
        session_timeout_ms=6000,
        window_len=8,
        batch_max=64,
        batch_timeout_ms=50,
        recall_n=400,  # more than the catalogue: every indexed item must come back in every list
        metrics_port=0,
        producer_linger_ms=1,
        catalog_refresh_s=3600.0,  # only an unknown item (or a window id not seen yet) makes the worker read
    )


class Spy:
    """Records the tower inputs of every call the worker makes (and passes them through)."""

    def __init__(self, worker: Any) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._infer = worker.tower.infer
        worker.tower.infer = self

    def __call__(self, items: np.ndarray, side: np.ndarray, prof: np.ndarray, **kw: Any) -> Any:
        self.calls.append((items.copy(), side.copy(), prof.copy()))
        return self._infer(items, side, prof, **kw)


def click_all(s: Settings, uid: str, tag: str, plan: dict[str, list[str]]) -> dict[str, str]:
    """Each user's clicks in order; returns user -> last event id."""
    now, events, last = time.time(), [], {}
    for u, items in plan.items():
        for k, item in enumerate(items):
            eid = f"{uid}-{tag}-{u}-{k}"
            events.append((u, dump_click(Click(eid, u, item, now + len(events) * 1e-3))))
            last[u] = eid
    publish(s.kafka_bootstrap, s.clicks_topic, events)
    return last


def interests_in_process(model: MIND, view: Any, windows: list[list[int]], profiles: list[np.ndarray]) -> Any:
    items, side, prof = view.tower_inputs(windows, profiles, model.cfg.max_len)
    with torch.no_grad():
        V, active = model(torch.as_tensor(items), torch.as_tensor(side), torch.as_tensor(prof))
    return V.numpy(), active.numpy()


def test_catalogue_items_are_recallable_and_shape_interests_before_any_retraining(
    triton: Any, milvus_uri: str, kafka_bootstrap: str, redis_url: str, uid: str, tmp_path: Path
) -> None:
    s = stack_settings(triton, milvus_uri, kafka_bootstrap, redis_url, uid)
    inter = base_data()
    ck, model = checkpoint(inter, tmp_path / "v1.pt", seed=0)
    assert (
        roll(s, ck, repo=triton.repo, progress=False).index_version == "v1"
    )  # publishes v1 to the catalogue
    setup_topics(s)
    client = redis_client(s)
    index = ItemIndex(milvus_uri, prefix=s.milvus_prefix)
    worker = Running(s, Ckpt(ck))
    spy = Spy(worker.worker)
    worker.start()

    # records on the catalogue topic, bad ones among them; a trained item's record only updates the catalogue
    good = [CatalogRecord(r, sides) for r, sides in NEW.items()] + [CatalogRecord("7", ("category=1",))]
    bad = [
        (b"{not json", "not_json"),
        (b'{"item_id": "x"}', "schema"),
        (b'{"item_id": 5, "side_ids": []}', "schema"),
    ]
    events = [(r.item_id, dump_catalog_record(r)) for r in good]
    events[1:1] = [(None, raw) for raw, _ in bad]
    where = publish(kafka_bootstrap, s.catalog_topic, events)
    stop, applied = threading.Event(), []
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    feed = CatalogueFeed(CatalogueStore(client, s.milvus_prefix), index)
    thread = threading.Thread(
        target=lambda: applied.append(run_topic(feed, catalogue_consumer(s), producer, s, stop)), daemon=True
    )
    thread.start()
    n1 = len(inter.items)  # the served vocabulary's size: new items get the next indices
    collection = index.collection("v1")
    until(
        lambda: len(index.client.query(collection, filter=f"id >= {n1}", output_fields=["id"])) == 2,
        what="new-1 and new-2 in the active Milvus version (new-3 has no known side id: not indexed)",
    )
    letters = Reader(kafka_bootstrap, s.catalog_dlq_topic, 1)
    try:
        dead = [parse_dlq(v) for v in letters.until(lambda v: len(v) >= len(bad))]
    finally:
        letters.close()
    by_raw = {decode_b64(d["original"]): d for d in dead}
    for (raw, code), (p, off) in zip(bad, where[1 : 1 + len(bad)], strict=True):
        d = by_raw[raw]
        assert (
            d["error_code"] == code
            and d["reason"]
            and (d["topic"], d["partition"], d["offset"])
            == (
                s.catalog_topic,
                p,
                off,
            )
        )

    # clicks on the new items, through the worker: its catalogue learns them without a restart
    plan = {"0": ["3", "new-1", "12"], "1": ["new-2", "new-1"], "2": ["new-3", "4"], "3": ["5", "brand-new"]}
    reader = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    try:
        last = click_all(s, uid, "a", plan)
        values = reader.until(covers(last))
    finally:
        stop.set()
        thread.join(30)
        worker.close()
        reader.close()
    assert applied and applied[0].records == len(good) and applied[0].dead_letters == len(bad)
    assert applied[0].trained == 1 and applied[0].versions == ["v1"]

    live = LiveCatalog(load_catalog(ck), CatalogueStore(client, s.milvus_prefix)).attach()
    g = {r: live.item_index(r) for r in NEW}
    assert g == {"new-1": n1, "new-2": n1 + 1, "new-3": n1 + 2}  # the next indices beyond the vocabulary
    state = WindowState(client, s.clicks_topic, s.window_len)
    parts = {u: json.loads(v)["click_partition"] for v in values for u in [json.loads(v)["user_id"]]}
    windows = state.read_windows([(parts[u], u) for u in plan])
    assert windows[0] == [inter.items.get("3"), g["new-1"], inter.items.get("12")]  # not the unknown item
    assert windows[1] == [g["new-2"], g["new-1"]] and windows[3][-1] == OOV  # no catalogue record: unknown

    # the tower saw each new item as the unknown id plus ITS side ids (the catalogue's, in the model's terms)
    view = live.view()
    side_of = {r: view.side_row(sides).tolist() for r, sides in NEW.items()}
    seen = {}
    for items, side, _ in spy.calls:
        for row_items, row_side in zip(items, side, strict=True):
            for i, sd in zip(row_items.tolist(), row_side.tolist(), strict=True):
                seen.setdefault(i, []).append(sd)
    assert side_of["new-1"] in seen[OOV] and side_of["new-2"] in seen[OOV] and side_of["new-1"][0] > 0
    assert not any(i >= n1 for items, _, _ in spy.calls for i in items.ravel().tolist())

    # the interests in the key-value store are the model's on those inputs: the side ids shaped them
    vec, mv, _, _ = state.read_interests(parts["1"], "1")
    profiles = [view.profile_row("1", [])]
    V, active = interests_in_process(model, view, [windows[1]], profiles)
    np.testing.assert_allclose(vec, V[0][active[0]], atol=1e-5)
    blind = [OOV, OOV]  # today: the unknown item twice, no side ids
    V0, a0 = interests_in_process(model, load_catalog(ck), [blind], profiles)
    assert np.abs(V0[0][a0[0]] - vec).max() > 1e-3

    # the new item is recallable: in user 0's list, with the score max_k e_i . v_k of its side-id embedding
    msgs = [parse_recall(v) for v in values]
    final = {m["user_id"]: m for m in msgs if m["event_id"] in set(last.values())}
    cands = {c["item_id"]: c["score"] for c in final["0"]["candidates"]}
    assert "new-2" in cands and "new-3" not in cands and "new-1" not in cands  # new-1 was seen: dropped
    vec0, _, _, _ = state.read_interests(parts["0"], "0")
    e = model.embed_items(torch.tensor([g["new-2"]]), torch.as_tensor(view.side_rows([g["new-2"]])))
    assert abs(cands["new-2"] - float((vec0 @ e.detach().numpy().T).max())) <= 2e-5
    assert all(versions_agree(m["model_version"], m["index_version"]) for m in msgs)
    index.close()
    client.close()


def test_a_model_retrained_with_the_new_items_rolls_out_and_the_worker_follows_its_vocabulary(
    triton: Any, milvus_uri: str, kafka_bootstrap: str, redis_url: str, uid: str, tmp_path: Path
) -> None:
    s = stack_settings(triton, milvus_uri, kafka_bootstrap, redis_url, uid)
    inter = base_data()
    ck1, _ = checkpoint(inter, tmp_path / "v1.pt", seed=0)
    roll(s, ck1, repo=triton.repo, progress=False)
    setup_topics(s)
    client = redis_client(s)
    index = ItemIndex(milvus_uri, prefix=s.milvus_prefix)
    # the catalogue from a file this time: one bad line goes to the DLQ, the rest are applied
    lines = [dump_catalog_record(CatalogRecord(r, sides)) for r, sides in NEW.items()]
    lines.insert(1, b'{"item_id": "half"')
    lines.append(dump_catalog_record(CatalogRecord("7", ("category=2",))))
    path = tmp_path / "catalogue.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    stats = feed_file(
        CatalogueFeed(CatalogueStore(client, s.milvus_prefix), index),
        path,
        producer,
        s.catalog_dlq_topic,
        progress=False,
    )
    assert (stats.records, stats.dead_letters, stats.indexed, stats.blank) == (4, 1, 2, 1)
    letters = Reader(kafka_bootstrap, s.catalog_dlq_topic, 1)
    try:
        (d,) = map(parse_dlq, letters.until(lambda v: len(v) >= 1))
    finally:
        letters.close()
    assert d["topic"] == f"file:{path}" and d["offset"] == 2 and d["error_code"] == "not_json"

    follows = metric("mind_worker_vocabulary_switches_total")
    worker = Running(s, Ckpt(ck1)).start()
    reader = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    plan = {"0": ["3", "new-1", "7"], "1": ["new-2", "9"]}
    try:
        reader.until(covers(click_all(s, uid, "a", plan)))
        # retrained with the new items: another vocabulary (every index moved), item 7 no longer in it
        ck2, model2 = checkpoint(retrained(inter, drop="7"), tmp_path / "v2.pt", seed=1)
        r2 = roll(s, ck2, repo=triton.repo, progress=False)
        assert r2.vocabulary_changed and (r2.new_version, r2.index_version) == ("2", "v2")
        assert r2.cold_items == 1  # item 7: a catalogue item the new model does not know, from its side ids
        last = click_all(s, uid, "b", {"0": ["new-2"], "1": ["3"]})
        values = reader.until(covers(last))
    finally:
        worker.close()
        reader.close()
    msgs = [parse_recall(v) for v in values]
    assert all(versions_agree(m["model_version"], m["index_version"]) for m in msgs)  # the guard held
    final = {m["user_id"]: m for m in msgs if m["event_id"] in set(last.values())}
    assert {m["model_version"] for m in final.values()} == {"2"}
    assert metric("mind_worker_vocabulary_switches_total") - follows == 1

    # the windows kept their global ids; the worker mapped them through the new vocabulary
    live = LiveCatalog(load_catalog(ck2), CatalogueStore(client, s.milvus_prefix)).attach()
    view2 = live.view()
    state = WindowState(client, s.clicks_topic, s.window_len)
    part = final["0"]["click_partition"]
    window = state.read_windows([(part, "0")])[0]
    assert [live.raw_item(i) for i in window] == ["3", "new-1", "7", "new-2"]
    served = view2.served(window).tolist()
    assert served[1:] == [view2.catalog.items.get("new-1"), view2.n_items, view2.catalog.items.get("new-2")]
    vec, _, _, _ = state.read_interests(part, "0")
    V, active = interests_in_process(model2, view2, [window], [view2.profile_row("0", [])])
    np.testing.assert_allclose(vec, V[0][active[0]], atol=1e-5)
    # item 7 (cold for the new model) was re-embedded with it; the new items are trained items now
    cands = {c["item_id"]: c["score"] for c in final["1"]["candidates"]}
    assert "7" in cands and "new-1" in cands
    got = index.client.query(index.collection("v2"), filter=f"id == {view2.n_items}", output_fields=["vec"])
    e7 = model2.embed_items(torch.tensor([view2.n_items]), torch.as_tensor(view2.side_rows([view2.n_items])))
    np.testing.assert_allclose(np.asarray(got[0]["vec"]), e7.detach().numpy()[0], atol=1e-5)

    # `mind catalogue --file` against the same servers: the next item lands in the version now active
    from cli.app import app

    more = tmp_path / "more.jsonl"
    more.write_bytes(dump_catalog_record(CatalogRecord("new-4", ("category=8",))) + b"\n")
    env = {
        "MIND_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "MIND_REDIS_URL": redis_url,
        "MIND_MILVUS_URI": milvus_uri,
        "MIND_MILVUS_PREFIX": s.milvus_prefix,
        "MIND_CATALOG_DLQ_TOPIC": s.catalog_dlq_topic,
        "MIND_RUN_DIR": str(tmp_path / "no-stack"),
    }
    res = CliRunner().invoke(app, ["catalogue", "--file", str(more), "--no-progress"], env=env)
    assert res.exit_code == 0, res.output
    assert "1 records (1 new items), 1 indexed into v2" in res.output
    live.sync(force=True)
    (new4,) = view2.cold_of(["new-4"])
    assert index.client.query(index.collection("v2"), filter=f"id == {new4}", output_fields=["id"])
    index.close()
    client.close()
