"""Training on planted data: the model must find the planted interests and beat popularity."""

import numpy as np
import pytest
import torch

from mind.baselines import MostPopular
from mind.evaluate import evaluate_ranked
from mind.explain import coupling, interest_purity, plot_coupling
from mind.model import MIND
from mind.split import comirec_split, train_sequences
from mind.synthetic import generate
from mind.train import (
    TrainConfig,
    drop_behaviours,
    feature_tables,
    load_checkpoint,
    model_config_for,
    recommend,
    save_checkpoint,
    train,
)


@pytest.fixture(scope="module")
def planted():
    inter = generate(n_users=600, n_items=400, n_categories=20, seed=0)
    return inter, comirec_split(inter)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    inter, split = planted
    torch.manual_seed(0)
    model = MIND(model_config_for(inter, K=4, d=32, max_len=30, routing_init="kmeans++"))
    ckpt = tmp_path_factory.mktemp("ckpt") / "mind.pt"
    cfg = TrainConfig(epochs=5, neg=200, threads=1, patience=5)
    result = train(model, inter, np.asarray(split.train_users), split.valid, cfg, ckpt=ckpt, progress=False)
    return model, result, ckpt


def test_interests_recover_planted_categories(planted, trained):
    inter, split = planted
    model, _, _ = trained
    purity = interest_purity(model, inter, split.test_users, inter.planted["item_category"])
    assert purity >= 0.9


def test_training_beats_most_popular(planted, trained):
    inter, split = planted
    model, result, _ = trained
    mind = evaluate_ranked(recommend(model, inter, split.test, 50), split.test, (20, 50))
    pop = evaluate_ranked(
        MostPopular(train_sequences(inter, split), inter.n_items).recommend(split.test, 50),
        split.test,
        (20, 50),
    )
    assert mind["recall@50"] > pop["recall@50"] + 0.2
    assert mind["hr@20"] > pop["hr@20"]
    assert result.best_epoch >= 1 and result.samples_per_s > 0


def test_checkpoint_round_trip_gives_identical_recommendations(planted, trained):
    inter, split = planted
    model, _, ckpt = trained
    save_checkpoint(ckpt, model, inter, None)
    loaded, meta = load_checkpoint(ckpt)
    assert meta["vocab_hash"] == inter.items.digest()
    assert meta["item_vocab"].get(inter.items.raw_of(5)) == 5
    assert np.array_equal(
        recommend(model, inter, split.test[:50], 50), recommend(loaded, inter, split.test[:50], 50)
    )


def test_coupling_heatmap_is_written(planted, trained, tmp_path):
    inter, split = planted
    model, _, _ = trained
    hist = inter.sequences[split.test_users[0]][-30:]
    (w,) = coupling(model, inter, [hist])
    assert w.shape[0] == len(hist) and 1 <= w.shape[1] <= 4
    assert np.allclose(w.sum(-1), 1.0, atol=1e-5)
    out = plot_coupling(w, tmp_path / "c.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_training_for_cold_start_teaches_the_unknown_item(planted):
    """unknown_rate: each step some items are cold-start items (side ids + the unknown item's id
    embedding), so that embedding learns; without it the unknown item is never trained."""
    inter, split = planted
    users = np.asarray(split.train_users)[:100]
    moved = {}
    for rate in (0.0, 0.2):
        torch.manual_seed(0)
        model = MIND(model_config_for(inter, K=2, d=16, max_len=10))
        before = model.item_emb.weight[1].detach().clone()
        cfg = TrainConfig(epochs=1, neg=100, threads=1, unknown_rate=rate)
        train(model, inter, users, split.valid[:20], cfg, progress=False)
        moved[rate] = float((model.item_emb.weight[1].detach() - before).abs().max())
    assert moved[0.0] == 0.0 and moved[0.2] > 1e-4


def test_a_checkpoint_from_before_the_time_tables_loads_and_serves_the_same(planted, tmp_path):
    """Checkpoints saved before the behaviour-time tables existed still load: the tables are off there."""
    inter, _ = planted
    model = MIND(model_config_for(inter, K=2, d=16, max_len=10))
    path = tmp_path / "old.pt"
    save_checkpoint(path, model, inter, None)
    payload = torch.load(path, weights_only=False)
    for key in ("time_emb.weight", "recency_emb.weight"):
        del payload["state_dict"][key]
    torch.save(payload, path)
    loaded, _ = load_checkpoint(path)
    side_t, prof_t = feature_tables(inter)
    items = torch.tensor([[2, 3, 4, 0, 0, 0, 0, 0, 0, 0]])
    args = (items, side_t[items], prof_t[:1])
    with torch.no_grad():
        assert torch.equal(model.eval()(*args)[0], loaded.eval()(*args)[0])


def test_behaviour_dropout_keeps_the_newest_click_and_the_order():
    """Each window loses about q of its behaviours, never its newest; what stays keeps its order and
    its timestamps, right-padded as the tower expects."""
    torch.manual_seed(0)
    lengths = torch.randint(1, 21, (500,))
    ids = torch.zeros(500, 20, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        ids[r, :n] = torch.randperm(1000)[:n] + 2
    times = ids * 10
    out, out_times = drop_behaviours(ids, times, 0.4)
    assert torch.equal(out_times, out * 10)
    kept = out > 0
    assert torch.equal(kept, kept.cummin(dim=1).values)  # right-padded: no gap before a kept click
    for r, n in enumerate(lengths.tolist()):
        row = out[r][kept[r]].tolist()
        src = ids[r, :n].tolist()
        assert row[-1] == src[-1]  # the newest survives
        assert row == [x for x in src if x in set(row)]  # a subsequence, in order
    dropped = 1 - kept.sum() / (ids > 0).sum()
    assert 0.3 < float(dropped) < 0.4  # q of the older clicks; the newest is never dropped
