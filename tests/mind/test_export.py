"""mind.export: repository layout and config schema, then export -> load -> infer equals in-process torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from towerkit import N_ITEMS, D, K, L, S, ToyTower, export, random_batch, torch_out

from mind.export import ExportError, list_versions, parse_config, read_meta
from stream.tower import TritonTower


def test_layout_config_and_meta(tmp_path):
    item_side = np.random.default_rng(0).integers(0, 7, size=(N_ITEMS, S))
    v1 = export(ToyTower(0), tmp_path, "m", "m-1", item_side=item_side, n_items=None)
    v2 = export(ToyTower(1), tmp_path, "m", "m-2", instance_kind="KIND_GPU", instance_count=2)
    assert (v1, v2) == (1, 2) and list_versions(tmp_path, "m") == [1, 2]
    d = tmp_path / "m"
    assert sorted(p.name for p in d.iterdir()) == ["1", "2", "config.pbtxt"]  # no staging leftovers
    assert {p.name for p in (d / "1").iterdir()} == {"model.pt", "model.py", "meta.json", "item_side.npy"}
    cfg = parse_config(d / "config.pbtxt")  # Triton's own schema: unknown fields would raise
    assert cfg.backend == "python" and cfg.max_batch_size == 256
    assert [(t.name, list(t.dims), t.optional) for t in cfg.input] == [
        ("ITEM_IDS", [L], False),
        ("SIDE_IDS", [L, S], False),
        ("PROFILE_IDS", [2], False),
        ("TIMES", [L], True),  # behaviour times: optional, a request without them is all "unknown"
    ]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [
        ("INTERESTS", [K, D]),
        ("ACTIVE", [K]),
        ("META", [2]),
        ("COUPLING", [L, K]),
    ]
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert text_format.MessageToString(cfg.instance_group[0]).split() == ["count:", "2", "kind:", "KIND_GPU"]
    m1 = read_meta(tmp_path, "m", 1)
    assert (m1["model_version"], m1["vocab_hash"], m1["n_items"], m1["K"], m1["d"]) == (
        "m-1",
        "vh-m-1",
        N_ITEMS,
        K,
        D,
    )
    assert m1["created"] and np.array_equal(np.load(d / "1" / "item_side.npy"), item_side)
    assert (m1["times_input"], m1["uses_time"]) == (False, False)  # the toy tower has no `times`
    loaded = torch.jit.load(str(d / "2" / "model.pt"))
    batch = random_batch(6, seed=3)
    got = loaded(*(torch.from_numpy(x) for x in batch))
    ref = torch_out(ToyTower(1), batch)
    assert np.abs(got[0].detach().numpy() - ref[0]).max() <= 1e-6 and np.array_equal(got[1].numpy(), ref[1])


def test_export_refuses_shape_change_and_bad_metadata(tmp_path):
    export(ToyTower(0), tmp_path, "m", "m-1")
    with pytest.raises(ExportError, match="new model_name"):
        export(ToyTower(0, K=2), tmp_path, "m", "m-2", K=2)
    with pytest.raises(ExportError, match=r"expected \[B,3"):
        export(ToyTower(0), tmp_path, "other", "o-1", K=3)
    with pytest.raises(ExportError, match="side_vocab"):
        export(ToyTower(0), tmp_path, "other", "o-1", side_vocab=[7])
    assert list_versions(tmp_path, "m") == [1] and list_versions(tmp_path, "other") == []


def test_a_config_from_before_coupling_is_rewritten_with_it(tmp_path):
    """COUPLING is an optional output added later: a repository exported before it takes the next version
    and its config gains the output; other output changes are still refused."""
    export(ToyTower(0), tmp_path, "m", "m-1")
    path = tmp_path / "m" / "config.pbtxt"
    old = parse_config(path)
    del old.output[-1]  # as written before COUPLING existed
    path.write_text(text_format.MessageToString(old))
    assert export(ToyTower(1), tmp_path, "m", "m-2") == 2
    assert [t.name for t in parse_config(path).output] == ["INTERESTS", "ACTIVE", "META", "COUPLING"]
    old = parse_config(path)
    del old.output[2]  # META missing: not an older export, another layout
    path.write_text(text_format.MessageToString(old))
    with pytest.raises(ExportError, match="new model_name"):
        export(ToyTower(2), tmp_path, "m", "m-3")


EDGES = {
    "one behaviour": [1, 1, 1],
    "empty window": [0, 0],
    "maximum length": [L, L],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy", "mind"])
def test_triton_equals_torch(triton, name):
    """export -> load -> infer == in-process torch on random batches, edge cases and unknown ids."""
    tower = triton.towers[name]
    client = TritonTower(triton.server.grpc_url, name)
    batches = [random_batch(B, seed=B) for B in (1, 7, 64)]
    batches += [random_batch(len(lens), seed=i, lengths=lens) for i, lens in enumerate(EDGES.values())]
    unknown = random_batch(5, seed=9)
    unknown[0][unknown[0] > 0] = 1  # every behaviour unknown
    unknown[0][3, :4] = [1, 5, 1, 1]
    batches.append(unknown)
    worst = 0.0
    for batch in batches:
        interests, active, served = client.infer(*batch)
        ref_i, ref_a = torch_out(tower, batch)
        assert served == "1" and interests.dtype == np.float32 and active.dtype == np.bool_
        assert interests.shape == ref_i.shape and np.array_equal(active, ref_a)
        worst = max(worst, float(np.abs(interests - ref_i).max()))
    assert worst <= 1e-5
    empty = client.infer(*random_batch(2, lengths=[0, 0]))[1]
    assert empty.sum(1).tolist() == [1, 1]  # an empty window still gets one interest
    assert client.meta("1").model_version == f"{name}-1"


def _mind(time_buckets: int, recency: int = 0, merge_decay: float = 1.0) -> torch.nn.Module:
    from mind.model import MIND, MINDConfig

    torch.manual_seed(0)
    cfg = MINDConfig(
        n_items=N_ITEMS,
        n_side=7,
        n_profile=5,
        n_profile_fields=2,
        d=D,
        K=K,
        max_len=L,
        time_buckets=time_buckets,
        recency=recency,
        merge_decay=merge_decay,
    )
    model = MIND(cfg).eval()
    with torch.no_grad():
        model.time_emb.weight.normal_()  # as if trained: time changes the interests
        model.recency_emb.weight[1:].normal_()  # and so does each behaviour's rank from the newest
    return model


def _timed_batch(B: int, seed: int) -> tuple[np.ndarray, ...]:
    items, side, prof = random_batch(B, seed=seed)
    g = np.random.default_rng(seed)
    times = (1_650_000_000 + np.cumsum(g.integers(0, 10**6, size=items.shape), axis=1)) * (items > 0)
    return items, side, prof, times.astype(np.int64)


def test_meta_says_whether_the_tower_reads_time(tmp_path):
    export(_mind(0), tmp_path, "plain", "p-1")
    export(_mind(32), tmp_path, "timed", "t-1")
    assert (read_meta(tmp_path, "plain", 1)["times_input"], read_meta(tmp_path, "plain", 1)["uses_time"]) == (
        True,
        False,
    )
    assert read_meta(tmp_path, "timed", 1)["uses_time"] is True


@pytest.mark.slow
def test_triton_passes_times_to_a_time_aware_tower(triton):
    """TIMES reaches the tower: Triton equals torch with the times; without TIMES, torch on zero times.
    The tower also reads recency ranks, which it derives from the padded window alone, and leans its
    merge to the first interest: the served tower carries both."""
    import tritonclient.grpc as grpcclient

    tower = _mind(32, recency=16, merge_decay=0.9)
    export(tower, triton.repo, "mind_time", "mt-1", n_side=S, side_vocab=7, profile_vocab=5)
    client = TritonTower(triton.server.grpc_url, "mind_time")
    client.load()

    def infer(batch: tuple[np.ndarray, ...]) -> np.ndarray:
        inputs = []
        for name, arr in zip(("ITEM_IDS", "SIDE_IDS", "PROFILE_IDS", "TIMES"), batch, strict=False):
            inp = grpcclient.InferInput(name, list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        res = client.client.infer("mind_time", inputs)
        return res.as_numpy("INTERESTS")

    for B, seed in ((1, 0), (9, 1), (64, 2)):
        batch = _timed_batch(B, seed)
        with torch.inference_mode():
            ref = tower(*(torch.from_numpy(x) for x in batch))[0].numpy()
            ref0 = tower(*(torch.from_numpy(x) for x in batch[:3]))[0].numpy()
        assert np.abs(infer(batch) - ref).max() <= 1e-5
        assert np.abs(infer(batch[:3]) - ref0).max() <= 1e-5  # no TIMES = unknown times
        assert np.abs(ref - ref0).max() > 1e-3  # and the times did matter
    client.close()
