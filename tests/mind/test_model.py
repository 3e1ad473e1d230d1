"""The paper's equations, checked one by one on small inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from mind.model import MIND, MINDConfig, interest_count, label_aware_attention, sampled_softmax_loss, squash


def _model(**kw) -> MIND:
    cfg = dict(n_items=50, n_side=7, n_profile=6, n_profile_fields=2, d=16, K=4, max_len=12)
    cfg.update(kw)
    torch.manual_seed(0)
    return MIND(MINDConfig(**cfg)).eval()


def _batch(B=6, L=12, S=3, P=2, lengths=(0, 1, 2, 5, 9, 12)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 50, (B, L), generator=g)
    for b, n in enumerate(lengths):
        ids[b, n:] = 0
    side = torch.randint(0, 7, (B, L, S), generator=g)
    prof = torch.randint(0, 6, (B, P), generator=g)
    return ids, side, prof


def test_interest_count_follows_log2_rule():
    lengths = torch.tensor([0, 1, 2, 3, 4, 7, 8, 15, 16, 1000])
    expected = [max(1, min(4, int(math.floor(math.log2(n))) if n > 0 else 0)) for n in lengths.tolist()]
    assert interest_count(lengths, 4).tolist() == expected
    assert interest_count(lengths, 2).max() == 2


def test_routing_weights_sum_to_one_and_padding_gets_none():
    model = _model()
    ids, side, _ = _batch()
    u, active, w = model.capsules(ids, side)
    mask = ids > 0
    sums = w.sum(-1)  # [B,L] over interests
    assert torch.allclose(sums[mask], torch.ones_like(sums[mask]), atol=1e-6)
    assert torch.all(w[~mask] == 0)
    # inactive interests receive no behaviour and produce a zero capsule
    assert torch.all(w.masked_select(~active[:, None, :].expand_as(w)) == 0)
    assert torch.all(u[~active] == 0)
    assert active.sum(-1).tolist() == interest_count(mask.sum(-1), 4).tolist()


def test_routing_is_blind_to_what_sits_in_padding():
    model = _model()
    ids, side, prof = _batch()
    side2 = side.clone()
    side2[ids == 0] = 5  # garbage side ids under padding
    V1, _ = model(ids, side, prof)
    V2, _ = model(ids, side2, prof)
    assert torch.allclose(V1, V2)


def test_squash_norm_below_one_and_keeps_direction():
    z = torch.randn(100, 16) * torch.logspace(-3, 3, 100)[:, None]
    s = squash(z)
    norms = s.norm(dim=-1)
    assert torch.all(norms < 1)
    assert torch.allclose(F.cosine_similarity(s, z, dim=-1), torch.ones(100), atol=1e-5)
    zn = z.norm(dim=-1)
    assert torch.allclose(norms, zn**2 / (1 + zn**2), rtol=1e-4)


def test_random_init_is_fixed_at_inference_and_redrawn_in_training():
    model = _model(routing_init="random")
    ids, side, prof = _batch()
    assert torch.equal(model(ids, side, prof)[0], model(ids, side, prof)[0])
    model.train()
    assert not torch.equal(model(ids, side, prof)[0], model(ids, side, prof)[0])


def test_kmeans_pp_init_seeds_interests_at_distinct_behaviours():
    model = _model(routing_init="kmeans++")
    # two tight clusters of behaviours: items 2-4 share side id 1, items 5-7 share side id 2
    with torch.no_grad():
        model.item_emb.weight[2:8] *= 0.01
        model.side_emb.weight[1:3] = torch.eye(16)[:2] * 5
    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0]])
    side = torch.tensor([1, 1, 1, 2, 2, 2] + [0] * 6)[None, :, None]
    _, active, w = model.capsules(ids, side)
    assert active.sum() == 2  # log2(6) -> 2 interests
    assign = w[0, :6].argmax(-1)
    assert len(set(assign[:3].tolist())) == 1 and len(set(assign[3:].tolist())) == 1
    assert assign[0] != assign[3]  # the two clusters went to different interests
    model.train()  # deterministic in training too: no random draw
    assert torch.equal(model.capsules(ids, side)[2], model.capsules(ids, side)[2])


def test_torchscript_matches_eager():
    model = _model()
    ids, side, prof = _batch()
    scripted = torch.jit.script(model)
    V, a = model(ids, side, prof)
    V2, a2 = scripted(ids, side, prof)
    assert torch.equal(a, a2)
    assert (V - V2).abs().max() <= 1e-6


def test_youtube_dnn_is_the_mean_behaviour():
    model = _model(pooling="mean", K=1)
    ids, side, _ = _batch()
    u, active, _ = model.capsules(ids, side)
    e = model.embed_items(ids, side)
    mask = (ids > 0).float()[:, :, None]
    mean = (e * mask).sum(1) / mask.sum(1).clamp(min=1)
    assert torch.allclose(u[:, 0], mean, atol=1e-6)
    assert active[:, 0].all()


def test_label_aware_attention_p0_is_mean_and_large_p_is_nearest():
    torch.manual_seed(0)
    V = torch.randn(5, 4, 8)
    active = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    V = V * active[:, :, None]
    e = torch.randn(5, 8)
    mean = (V * active[:, :, None]).sum(1) / active.sum(1, keepdim=True)
    assert torch.allclose(label_aware_attention(V, active, e, 0.0), mean, atol=1e-6)
    scores = torch.einsum("bkd,bd->bk", V, e).masked_fill(~active, -math.inf)
    nearest = V[torch.arange(5), scores.argmax(-1)]
    assert torch.allclose(label_aware_attention(V, active, e, math.inf), nearest)
    # pow sharpens scores of magnitude > 1 (as trained inner products are): large p -> nearest
    e10 = 10 * e
    assert torch.allclose(label_aware_attention(V, active, e10, 30.0), nearest, atol=1e-3)


def test_sampled_softmax_equals_full_softmax_when_every_item_is_sampled():
    torch.manual_seed(0)
    n_items, d, B = 30, 8, 7
    E = torch.randn(n_items, d)
    v = torch.randn(B, d)
    label = torch.randint(2, n_items, (B,))
    items = torch.arange(2, n_items)  # every real item once (PAD/OOV are not items)
    full = F.cross_entropy(v @ E[2:].T, label - 2)
    sampled = sampled_softmax_loss(v, E[label], label, E[items], items)
    assert torch.allclose(sampled, full, atol=1e-5)
    # a uniform log-Q correction shifts every logit equally and changes nothing
    log_q = torch.full((n_items,), math.log(1 / 28))
    assert torch.allclose(sampled_softmax_loss(v, E[label], label, E[items], items, log_q), full, atol=1e-5)


def test_loss_backpropagates_into_every_part():
    model = _model()
    model.train()
    ids, side, prof = _batch()
    label = torch.randint(2, 50, (6,))
    neg = torch.arange(2, 50)
    loss = model.loss(ids, side, prof, label, side[:, 0], neg, torch.zeros(48, 3, dtype=torch.long))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("K", [1, 3])
def test_empty_window_still_gives_one_active_interest(K):
    model = _model(K=K)
    ids = torch.zeros(2, 12, dtype=torch.long)
    V, active = model(ids, torch.zeros(2, 12, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert active.sum(-1).tolist() == [1, 1]
    assert torch.isfinite(V).all()


def test_an_index_beyond_the_vocabulary_is_the_unknown_item_with_its_own_side_ids():
    """Cold start: a catalogue item newer than the model (index >= n_items) is embedded from its side ids
    with the unknown item's id embedding, in eager torch and TorchScript alike."""
    model = _model()
    ids, side, prof = _batch()
    cold = torch.where(ids > 1, ids + 50 * (ids % 3 == 0), ids)  # every third real item: index >= n_items
    unknown = torch.where(cold >= 50, torch.ones_like(ids), cold)
    assert (cold >= 50).any()
    assert torch.equal(model.embed_items(cold, side), model.embed_items(unknown, side))
    V, active = model(cold, side, prof)
    assert torch.equal(V, model(unknown, side, prof)[0])
    scripted = torch.jit.script(model)
    assert torch.allclose(scripted(cold, side, prof)[0], V, atol=1e-6)
    assert torch.equal(scripted(cold, side, prof)[1], active)
