"""The paper's equations, checked one by one on small inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from mind.model import (
    MIND,
    MINDConfig,
    interest_count,
    label_aware_attention,
    routing_regulariser,
    sampled_softmax_loss,
    squash,
    time_bucket,
)


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
    g = torch.Generator().manual_seed(0)  # float64: in float32, 1 - 1/(1+|z|^2) rounds to 1 at |z| ~ 1e3
    z = torch.randn(100, 16, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 100)[:, None]
    s = squash(z)
    norms = s.norm(dim=-1)
    assert torch.all(norms < 1)
    assert torch.allclose(F.cosine_similarity(s, z, dim=-1), torch.ones(100, dtype=z.dtype), atol=1e-5)
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


@pytest.mark.parametrize("kw", [{}, {"global_context": True}], ids=["paper", "global-context"])
def test_torchscript_matches_eager(kw):
    model = _model(**kw)
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
    # every item drawn once: each expected count is 1, log_q = 0 and nothing changes
    zero = torch.zeros(n_items)
    assert torch.allclose(sampled_softmax_loss(v, E[label], label, E[items], items, zero), full, atol=1e-5)
    # TensorFlow's convention corrects the label too: a uniform log_q then shifts every logit equally
    log_q = torch.full((n_items,), math.log(1 / 28))
    tf = sampled_softmax_loss(v, E[label], label, E[items], items, log_q, correct_label=True)
    assert torch.allclose(tf, full, atol=1e-5)


def test_log_q_correction_tends_to_the_full_softmax_under_a_skewed_sampler():
    """Zipf-skewed draws, averaged over 60 draws per size: the corrected loss comes within 0.02 nats of
    the full softmax loss at 2,000 negatives and closer as the draws grow; the uncorrected loss drifts
    away (it grows like log N) and is more than 1 nat off at 2,000."""
    g = torch.Generator().manual_seed(0)
    n_items, d, B, draws = 500, 16, 32, 60
    E = torch.randn(n_items, d, generator=g) * 0.5
    v = torch.randn(B, d, generator=g) * 0.5
    label = torch.randint(2, n_items, (B,), generator=g)
    full = F.cross_entropy(v @ E[2:].T, label - 2).item()
    q = 1.0 / torch.arange(1, n_items + 1, dtype=torch.float64)
    q[:2] = 0.0
    q = q / q.sum()
    corrected, plain = {}, {}
    for n_neg in (20, 200, 2000):
        log_q = torch.log(q.clamp(min=1e-30) * n_neg).float()  # log expected count, as train() passes
        c = p = 0.0
        for _ in range(draws):
            neg = torch.multinomial(q, n_neg, replacement=True, generator=g)
            c += sampled_softmax_loss(v, E[label], label, E[neg], neg, log_q).item() / draws
            p += sampled_softmax_loss(v, E[label], label, E[neg], neg).item() / draws
        corrected[n_neg], plain[n_neg] = abs(c - full), p - full
    assert corrected[2000] < 0.02 and corrected[2000] < corrected[200] < corrected[20]
    assert plain[2000] > 1.0 and plain[2000] > plain[200] > plain[20]


def test_loss_backpropagates_into_every_part():
    model = _model(time_buckets=16, recency=8)
    model.train()
    ids, side, prof = _batch()
    times = (1_700_000_000 + torch.arange(12) * 1000)[None, :].expand(6, 12) * (ids > 0)
    label = torch.randint(2, 50, (6,))
    neg = torch.arange(2, 50)
    loss = model.loss(
        ids, side, prof, label, side[:, 0], neg, torch.zeros(48, 3, dtype=torch.long), times=times, rr=1.0
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_time_bucket_is_the_log2_gap_to_the_newest_behaviour():
    t = torch.tensor([[100, 160, 163, 0], [0, 50, 0, 0], [0, 0, 0, 0]])
    # gaps to 163: 63, 3, 0 -> 1 + floor(log2(1 + gap)) = 7, 3, 1; unknown and padding -> 0
    assert time_bucket(t, 32).tolist() == [[7, 3, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert time_bucket(torch.tensor([[1, 10**9]]), 8).tolist() == [[7, 1]]  # capped at n_buckets - 1


def test_time_gaps_are_relative_and_ignored_by_a_model_without_time():
    ids, side, prof = _batch()
    times = (1_600_000_000 + torch.arange(12) ** 3 * 60)[None, :].expand(6, 12) * (ids > 0)
    timed = _model(time_buckets=32)
    with torch.no_grad():
        timed.time_emb.weight.normal_()  # trained-looking time vectors: time changes the output
    V, _ = timed(ids, side, prof, times)
    # a constant shift of every timestamp (another clock, a later replay) changes nothing
    assert torch.allclose(V, timed(ids, side, prof, (times + 86_400 * 365) * (ids > 0))[0])
    assert not torch.allclose(V, timed(ids, side, prof)[0])  # times matter to this model
    plain = _model()
    assert torch.equal(plain(ids, side, prof)[0], plain(ids, side, prof, times)[0])


def test_hard_negative_weights_match_the_formula():
    torch.manual_seed(0)
    B, N, d = 4, 9, 5
    v, e_label, e_neg = torch.randn(B, d), torch.randn(B, d), torch.randn(N, d)
    label, neg = torch.tensor([2, 3, 4, 5]), torch.arange(10, 10 + N)
    plain = sampled_softmax_loss(v, e_label, label, e_neg, neg)
    assert torch.allclose(sampled_softmax_loss(v, e_label, label, e_neg, neg, beta=0.0), plain)
    beta = 0.7
    pos, s = (v * e_label).sum(-1), v @ e_neg.T
    w = torch.exp(beta * s) / torch.exp(beta * s).mean(-1, keepdim=True)  # mean weight 1
    expected = (torch.log(torch.exp(pos) + (w * torch.exp(s)).sum(-1)) - pos).mean()
    assert torch.allclose(sampled_softmax_loss(v, e_label, label, e_neg, neg, beta=beta), expected, atol=1e-5)
    assert sampled_softmax_loss(v, e_label, label, e_neg, neg, beta=beta) > plain  # hard ones weigh more


def test_routing_regulariser_is_zero_for_even_routing_and_grows_with_collapse():
    mask = torch.tensor([[True, True, True, True]])
    active = torch.tensor([[True, True]])
    even = torch.full((1, 4, 2), 0.5)
    assert routing_regulariser(even, mask, active) == 0
    # interest 0 reads only behaviour 0: n * its weights over behaviours = (4, 0, 0, 0), variance 3
    one = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    # interest 1 reads behaviours 1-3 evenly: (0, 4/3, 4/3, 4/3), variance 1/3
    expected = 3.0**2 + (1 / 3) ** 2
    assert routing_regulariser(one, mask, active).item() == pytest.approx(expected)
    padded = torch.cat([one, torch.full((1, 2, 2), 0.3)], 1)  # padding rows change nothing
    got = routing_regulariser(padded, torch.tensor([[True] * 4 + [False] * 2]), active).item()
    assert got == pytest.approx(expected)


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


def test_global_context_is_the_one_capsule_routing_of_the_whole_window():
    """u_g, what each interest reads beside its own capsule, is MIND-1's capsule: routing with K = 1."""
    model = _model(global_context=True)
    one = _model(K=1)
    one.load_state_dict(
        {
            k: v
            for k, v in model.state_dict().items()
            if k in one.state_dict() and "mlp" not in k and k != "b_init"
        },
        strict=False,
    )
    ids, side, _ = _batch()
    u1, _, _ = one.capsules(ids, side)  # [B,1,d]
    seen = []
    handle = model.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model(ids, side, torch.zeros(ids.shape[0], 2, dtype=torch.long))
    handle.remove()
    u_g = seen[0][:, :, model.d : 2 * model.d]  # [B,K,d]: after u_j
    real = (ids > 0).any(1)
    assert torch.allclose(u_g[real], u1[real].expand(-1, model.K, -1), atol=1e-5)


def test_merge_decay_scales_served_interest_j_by_decay_to_the_j_and_leaves_training_alone():
    ids, side, prof = _batch()
    plain, decayed = _model(temperature=0.1), _model(temperature=0.1, merge_decay=0.8)
    with torch.no_grad():
        V, active = plain(ids, side, prof)
        Vd, active_d = decayed(ids, side, prof)
    assert torch.equal(active, active_d)
    assert torch.allclose(Vd, V * torch.tensor([1.0, 0.8, 0.64, 0.512])[None, :, None])
    assert "slot_weight" not in decayed.state_dict()  # a setting, not a weight: checkpoints stay the same
    plain.load_state_dict(decayed.state_dict())
    decayed.train(), plain.train()
    torch.manual_seed(3)
    Vt = decayed.interests(ids, side, prof)[0]
    torch.manual_seed(3)
    assert torch.equal(Vt, plain.interests(ids, side, prof)[0])  # training reads every interest as is


def test_without_the_profile_the_interests_come_from_the_behaviours_alone():
    ids, side, prof = _batch()
    with_profile, without = _model(), _model(profile=False)
    assert with_profile.mlp[0].in_features == 16 + 2 * 16 and without.mlp[0].in_features == 16
    other = (prof + 1) % 6  # every user's profile ids changed
    V, _ = without(ids, side, prof)
    assert torch.equal(V, without(ids, side, other)[0])  # ignored, though still accepted (the served inputs)
    assert not torch.equal(with_profile(ids, side, prof)[0], with_profile(ids, side, other)[0])
    assert without.unread_tables()[-1] == "profile_emb" and "profile_emb" not in with_profile.unread_tables()
    no_profiles = _model(n_profile_fields=0, profile=False)  # nothing to leave out: the table stays as it was
    assert "profile_emb" not in no_profiles.unread_tables()
