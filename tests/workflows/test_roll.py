"""`workflows.roll` / `mind roll` with every server real (tritonserver, milvus-lite; Tansu and Valkey for the
worker): a roll while clicks flow produces no recall message that mixes versions, the worker converges to
the new version without a restart, and no click is lost; a failed step leaves the previous version serving.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner
from workerkit import (
    ClickLog,
    Reader,
    Running,
    all_committed,
    check_windows,
    covers,
    make_clicks,
    metric,
    publish,
    record,
    setup_topics,
)

from indexer.store import IndexUnavailable, ItemIndex
from mind.export import list_versions
from stream.schemas import dump_click, parse_recall
from stream.settings import Settings
from stream.tower import TritonTower
from stream.window import load_catalog
from workflows.roll import RollError, roll, versions_agree

pytestmark = pytest.mark.slow


@dataclass
class Models:
    """Two trainings (random inits) of one data set: same vocabulary, other weights."""

    inter: Any
    checkpoint: Path  # v1; the worker's checkpoint (ids and side-id tables)
    checkpoint_v2: Path
    max_len: int


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from mind.model import MIND
    from mind.synthetic import generate
    from mind.train import model_config_for, save_checkpoint

    inter = generate(n_users=40, n_items=500, n_categories=10, seq_len=(5, 12), seed=3)
    cfg = model_config_for(inter, d=16, K=4, max_len=8)
    out = tmp_path_factory.mktemp("roll")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(out / f"mind-{seed}.pt")
        save_checkpoint(paths[-1], MIND(cfg).eval(), inter, None)
    return Models(inter, paths[0], paths[1], cfg.max_len)


def serving_settings(triton: Any, milvus_uri: str, **kw: Any) -> Settings:
    """Settings naming a model and an index prefix of this test's own on the session servers."""
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = dict(
        triton_url=triton.server.grpc_url,
        triton_model=f"roll_{tag}",
        milvus_uri=milvus_uri,
        milvus_prefix=f"r{tag}",
        metrics_port=0,
    )
    base.update(kw)
    return Settings(**base)


def test_roll_while_clicks_flow_never_mixes_versions_and_loses_nothing(
    triton: Any, milvus_uri: str, models: Models, kafka_bootstrap: str, redis_url: str, uid: str
) -> None:
    s = serving_settings(
        triton,
        milvus_uri,
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        clicks_topic=f"clicks-{uid}",
        recall_topic=f"recall-{uid}",
        dlq_topic=f"dlq-{uid}",
        group_id=f"workers-{uid}",
        partitions=4,
        window_len=models.max_len,
        batch_max=32,
        batch_timeout_ms=20,
        recall_n=20,
        producer_linger_ms=1,
    )
    # the first roll starts from nothing served and nothing indexed
    r1 = roll(s, models.checkpoint, repo=triton.repo, progress=False)
    assert (r1.old_version, r1.new_version, r1.model_version, r1.index_version) == (None, "1", "1", "v1")
    setup_topics(s)
    users = [str(u) for u in range(40)]
    # a last click of every user after the roll, so every user's final recall must come from v2
    tail = make_clicks(models, f"{uid}-t", users, per_user=1, seed=6)
    log = ClickLog(s.window_len, models.inter.items.get)
    reader = Reader(kafka_bootstrap, s.recall_topic, s.partitions)
    rolling, rolled = threading.Event(), threading.Event()
    chunks = {"before": 0, "during": 0, "after": 0}

    def send(part: list[Any]) -> None:
        events = [(c.user_id, dump_click(c)) for c in part]
        record(log, part, publish(kafka_bootstrap, s.clicks_topic, events))

    def publisher() -> None:
        """A steady stream of 15 clicks per 0.1 s before and during the roll, and 5 chunks after it."""
        for k in itertools.count():  # 10 more clicks per user each round, for as long as the roll takes
            clicks = make_clicks(models, f"{uid}-{k}", users, per_user=10, seed=k)
            for i in range(0, len(clicks), 15):
                if chunks["after"] == 5:
                    return
                send(clicks[i : i + 15])
                chunks["after" if rolled.is_set() else "during" if rolling.is_set() else "before"] += 1
                time.sleep(0.1)

    mismatches0 = metric("mind_recall_version_mismatch_total")
    worker = Running(s, models).start()
    feeder = threading.Thread(target=publisher, daemon=True)
    try:
        feeder.start()
        reader.until(lambda v: len(v) >= 40)  # the worker serves v1 before the roll starts
        rolling.set()
        r2 = roll(s, models.checkpoint_v2, repo=triton.repo, progress=False)
        rolled.set()
        feeder.join(120)
        assert not feeder.is_alive()
        send(tail)
        reader.until(covers(log.last_event()))
    finally:
        worker.close()
        reader.close()

    assert chunks["during"] > 0 and chunks["after"] == 5, chunks  # clicks flowed through the roll
    assert (r2.old_version, r2.new_version, r2.index_version, r2.previous_index) == ("1", "2", "v2", "v1")
    assert set(r2.timings) == {"check", "export", "embed", "index", "load", "flip", "cleanup", "total"}
    recs = [parse_recall(v) for v in reader.values]
    mixed = [r for r in recs if not versions_agree(r["model_version"], r["index_version"])]
    assert mixed == []
    by_version = {v: [r for r in recs if r["model_version"] == v] for v in ("1", "2")}
    assert len(by_version["1"]) + len(by_version["2"]) == len(recs)
    assert by_version["1"] and by_version["2"], "the roll did not happen while clicks flowed"
    # one switch, never back: the single worker produced every v1 message before its first v2 message
    assert max(r["produced_at"] for r in by_version["1"]) <= min(r["produced_at"] for r in by_version["2"])
    final = {r["user_id"]: r for r in recs if r["event_id"] in set(log.last_event().values())}
    assert {r["model_version"] for r in final.values()} == {"2"} and len(final) == len(users)
    check_windows(s, log)  # every click in its window exactly once
    all_committed(s, log)
    with TritonTower(s.triton_url, s.triton_model) as tower:
        assert tower.versions() == ["2"]
    assert ItemIndex(milvus_uri, prefix=s.milvus_prefix).active_version() == "v2"
    refused = metric("mind_recall_version_mismatch_total") - mismatches0
    print(
        f"\nroll while clicks flow: {len(recs)} recall messages ({len(by_version['1'])} v1, "
        f"{len(by_version['2'])} v2), 0 mixed, {refused:.0f} batches refused by the guard; "
        f"steps {r2.timings}"
    )


def test_a_failed_step_leaves_the_previous_version_serving(
    triton: Any,
    milvus_uri: str,
    redis_url: str,
    models: Models,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    s = serving_settings(triton, milvus_uri, redis_url=redis_url)
    repo, name = triton.repo, s.triton_model
    roll(s, models.checkpoint, repo=repo, progress=False)
    tower = TritonTower(s.triton_url, name)
    index = ItemIndex(milvus_uri, prefix=s.milvus_prefix)

    def serving_v1() -> None:
        assert tower.versions() == ["1"] and list_versions(repo, name) == [1]
        assert index.active_version(max_age_s=0) == "v1"

    # the index build fails: no flip, Triton untouched, the exported version retired
    def broken_build(self: ItemIndex, version: Any) -> Any:
        raise IndexUnavailable("injected: build failed")

    with monkeypatch.context() as m:
        m.setattr(ItemIndex, "build", broken_build)
        with pytest.raises(RollError, match="injected: build failed") as err:
            roll(s, models.checkpoint_v2, repo=repo, progress=False)
    assert err.value.step == "index" and not err.value.undo_failed
    serving_v1()
    assert [p.name.split("-")[1] for p in (repo / name).glob(".failed-*")] == ["2"]

    # the flip fails after Triton switched to v2: Triton is pinned back to v1
    real_flip = ItemIndex.flip

    def broken_flip(self: ItemIndex, version: Any) -> Any:
        if str(version) == "v2":
            raise IndexUnavailable("injected: flip failed")
        return real_flip(self, version)

    with monkeypatch.context() as m:
        m.setattr(ItemIndex, "flip", broken_flip)
        with pytest.raises(RollError, match="injected: flip failed") as err:
            roll(s, models.checkpoint_v2, repo=repo, progress=False)
    assert err.value.step == "flip" and "Triton pinned back to version 1" in str(err.value)
    serving_v1()
    catalog = load_catalog(models.checkpoint)
    one = catalog.tower_inputs([[2, 3, 4]], [catalog.profile_row("0", [])], models.max_len)
    assert tower.infer(*one)[2] == "1"

    # without the catalogue, another item vocabulary is refused before anything changes (with it, the
    # workers follow the new vocabulary: tests/workflows/test_catalogue.py)
    from mind.model import MIND
    from mind.synthetic import generate
    from mind.train import model_config_for, save_checkpoint

    other = generate(n_users=30, n_items=300, n_categories=5, seq_len=(5, 10), seed=9)
    save_checkpoint(tmp_path / "other.pt", MIND(model_config_for(other, d=16, K=4, max_len=8)), other, None)
    with pytest.raises(RollError, match="item vocabulary") as err:
        roll(
            s.model_copy(update={"catalog_enabled": False}), tmp_path / "other.pt", repo=repo, progress=False
        )
    assert err.value.step == "check"
    serving_v1()

    # `mind roll` then succeeds: version 2 (the number of the failed attempts) serves, exit 0
    from cli.app import app

    env = {
        "MIND_TRITON_URL": s.triton_url,
        "MIND_MILVUS_URI": milvus_uri,
        "MIND_TRITON_MODEL": name,
        "MIND_MILVUS_PREFIX": s.milvus_prefix,
        "MIND_REDIS_URL": redis_url,
        "MIND_RUN_DIR": str(tmp_path / "no-stack"),
    }
    argv = ["roll", "--checkpoint", str(models.checkpoint_v2), "--repo", str(repo), "--no-progress", "--json"]
    res = CliRunner().invoke(app, argv, env=env)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert (out["old_version"], out["new_version"], out["index_version"]) == ("1", "2", "v2")
    assert tower.versions() == ["2"] and index.active_version(max_age_s=0) == "v2"
    assert tower.infer(*one)[2] == "2"
    missing = CliRunner().invoke(app, ["roll", "--checkpoint", str(tmp_path / "nope.pt")], env=env)
    assert missing.exit_code == 2 and "does not exist" in missing.output
    tower.close()
    index.close()
