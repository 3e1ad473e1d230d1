"""workflows.serving against a real tritonserver and a real milvus-lite: checkpoint -> export -> index -> the
served tower + Milvus recall equal the in-process retrieval of the same model; the CLI; the benchmark."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from indexer.catalogue import item_vectors
from indexer.store import ItemIndex
from mind.dataset import Interactions, pad_windows
from mind.export import list_versions, parse_config, read_meta
from mind.model import MIND
from mind.retrieval import exact_topn, merge_interests
from mind.synthetic import generate
from mind.train import encode, feature_tables, load_checkpoint, model_config_for, recommend, save_checkpoint
from stream.recall import Recaller
from stream.tower import TritonTower
from workflows.serving import ServingError, export_checkpoint, index_checkpoint, model_digest

pytestmark = pytest.mark.slow

N = 20


def _checkpoint(path: Path, inter: Interactions, seed: int) -> Path:
    torch.manual_seed(seed)
    model = MIND(model_config_for(inter, d=16, K=4, max_len=12))
    save_checkpoint(path, model, inter, None)
    return path


@pytest.fixture(scope="module")
def data() -> Interactions:
    return generate(n_users=200, n_items=150, n_categories=6, seed=7)


@pytest.fixture(scope="module")
def ckpt(data: Interactions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("serving") / "a.pt", data, seed=0)


def test_catalogue_vectors_equal_the_model_in_any_chunking(ckpt: Path) -> None:
    model, meta = load_checkpoint(ckpt)
    ref = model.item_vectors(meta["item_side"]).numpy()
    for chunk in (7, 2048):
        got = item_vectors(model, meta["item_side"], chunk=chunk, progress=False)
        assert got.dtype == np.float32 and np.array_equal(got, ref)
    with pytest.raises(ValueError, match="rows"):
        item_vectors(model, meta["item_side"][:-1], progress=False)


def test_export_index_recall_equals_in_process_retrieval(
    triton, milvus_uri: str, ckpt: Path, data: Interactions
) -> None:
    name, prefix = f"serving_{uuid.uuid4().hex[:6]}", f"t{uuid.uuid4().hex[:8]}"
    model, _ = load_checkpoint(ckpt)
    v = export_checkpoint(ckpt, triton.repo, name)
    meta = read_meta(triton.repo, name, v)
    assert v == 1 and meta["model_version"] == "1" and meta["vocab_hash"] == data.items.digest()
    assert meta["model_digest"] == model_digest(model) and meta["n_items"] == data.n_items
    assert meta["has_item_side"] and meta["S"] == data.item_side.shape[1]

    repo = triton.repo
    stats = index_checkpoint(ckpt, milvus_uri, repo=repo, model_name=name, prefix=prefix, progress=False)
    assert (stats.version, stats.mode, stats.rows, stats.active) == ("v1", "full", data.n_items - 2, "v1")

    tower = TritonTower(triton.server.grpc_url, name)
    assert tower.load() == "1"
    users = np.array([0, 3, 8, 21, 55, 144])
    hists = [data.sequences[u][:k] for u, k in zip(users, (1, 2, 3, 7, 12, 40), strict=True)]
    windows = pad_windows(hists, model.cfg.max_len)
    side_t, prof_t = feature_tables(data)
    got_v, got_a, served = tower.infer(windows, side_t[windows].numpy(), prof_t[users].numpy())
    ref_v, ref_a = encode(model, data, hists, users)
    assert np.abs(got_v - ref_v.numpy()).max() <= 1e-5 and np.array_equal(got_a, ref_a.numpy())

    index = ItemIndex(milvus_uri, prefix=prefix)
    out = Recaller(index, n=N).recall(got_v, got_a, tower.meta(served).model_version)
    assert out.version == "v1"
    ids, scores = exact_topn(ref_v, ref_a, model.item_vectors(side_t), N)
    ref_ids, ref_sc, ref_int = merge_interests(ids, scores, N)
    cases = [SimpleNamespace(history=h, user=u) for h, u in zip(hists, users, strict=True)]
    assert np.array_equal(out.ids, recommend(model, data, cases, N))
    assert np.array_equal(out.ids, ref_ids) and np.array_equal(out.interest, ref_int)
    assert np.abs(out.scores - ref_sc).max() <= 1e-4
    index.close()
    tower.close()


def test_index_refuses_a_checkpoint_that_is_not_the_export(
    tmp_path: Path, ckpt: Path, data: Interactions
) -> None:
    uri = "http://127.0.0.1:9"  # never contacted: every refusal happens before Milvus is reached
    with pytest.raises(ServingError, match="no exported versions"):
        index_checkpoint(ckpt, uri, repo=tmp_path, progress=False)
    assert export_checkpoint(ckpt, tmp_path) == 1
    other = generate(n_users=120, n_items=90, n_categories=5, seed=1)
    foreign = _checkpoint(tmp_path / "other_vocab.pt", other, seed=0)
    with pytest.raises(ServingError, match="vocabulary hash"):
        index_checkpoint(foreign, uri, repo=tmp_path, progress=False)
    with pytest.raises(ServingError, match="item-vocabulary hash"):
        index_checkpoint(foreign, uri, version=1, repo=tmp_path, progress=False)
    retrained = _checkpoint(tmp_path / "same_vocab.pt", data, seed=1)  # same data, other weights
    with pytest.raises(ServingError, match="other weights"):
        index_checkpoint(retrained, uri, version="v1", repo=tmp_path, progress=False)
    with pytest.raises(ServingError, match="not in"):
        index_checkpoint(ckpt, uri, version=7, repo=tmp_path, progress=False)


def test_cli_export_versions_and_index(
    tmp_path: Path, ckpt: Path, milvus_uri: str, data: Interactions
) -> None:
    runner = CliRunner()
    repo = tmp_path / "repo"
    first = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--repo", str(repo)])
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        app,
        ["export", "--repo", str(repo), "--gpu", "--instances", "2"],
        env={"MIND_CHECKPOINT": str(ckpt)},
    )
    assert second.exit_code == 0, second.output
    assert list_versions(repo, "mind_user_tower") == [1, 2] and "model version 2" in second.output
    assert [read_meta(repo, "mind_user_tower", v)["model_version"] for v in (1, 2)] == ["1", "2"]
    cfg = parse_config(repo / "mind_user_tower" / "config.pbtxt")
    assert (cfg.instance_group[0].count, cfg.parameters["torch_threads"].string_value) == (2, "1")

    prefix = f"c{uuid.uuid4().hex[:8]}"
    env = {"MIND_MILVUS_URI": milvus_uri, "MIND_MILVUS_PREFIX": prefix, "MIND_CHECKPOINT": str(ckpt)}
    full = runner.invoke(app, ["index", "--repo", str(repo)], env=env)
    assert full.exit_code == 0, full.output
    assert "full index of v2" in full.output and "active v2" in full.output
    changed = tmp_path / "changed.txt"
    changed.write_text(f"# new today\n{data.items.raw_of(5)}\n\n{data.items.raw_of(9)}\n")
    incremental = ["index", "--repo", str(repo), "--incremental", "--items", str(changed)]
    inc = runner.invoke(app, incremental, env=env)
    assert inc.exit_code == 0, inc.output
    assert "incremental index of v2: 2 rows" in inc.output
    changed.write_text("no-such-item\n")
    bad = runner.invoke(app, incremental, env=env)
    assert bad.exit_code == 2 and "not in the checkpoint's vocabulary" in bad.output


def test_bench_serving_smoke(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    args = ["bench", "serving", "--out", str(out), "--batch-sizes", "1,4", "--calls", "5", "--warmup", "1"]
    args += [
        "--nq",
        "1,8",
        "--reps",
        "2",
        "--recall-queries",
        "8",
        "--recall-reps",
        "2",
        "--items",
        "300",
        "--n",
        "10",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["triton"]["max_abs_diff"] <= 1e-5 and got["triton"]["active_equal"]
    for b in ("1", "4"):
        assert {"p50_ms", "p99_ms", "torch_p50_ms"} <= set(got["triton"]["batch"][b])
    assert got["milvus"]["rows"] == 298 and got["milvus"]["recall_vs_exact"] >= 0.99
    for nq in ("1", "8"):
        assert {"ms_per_query", "exact_ms_per_query"} <= set(got["milvus"]["nq"][nq])
    rs = got["recall_step"]
    assert rs["queries"] == 8 and rs["top10_ids_equal"] == 1.0 and rs["exact_equals_offline_retrieve"]
    assert len(got["machine"]["loadavg_start"]) == 3 and out.with_suffix(".png").stat().st_size > 0


def test_a_checkpoint_from_before_the_time_tables_keeps_its_digest(ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint saved before the behaviour-time tables existed loads the same every time, with the
    digest its export recorded: tables a model never reads are not part of its identity."""
    model, _ = load_checkpoint(ckpt)
    payload = torch.load(ckpt, weights_only=False)
    for key in ("time_emb.weight", "recency_emb.weight"):
        del payload["state_dict"][key]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    first, second = load_checkpoint(old)[0], load_checkpoint(old)[0]
    assert model_digest(first) == model_digest(second) == model_digest(model)
