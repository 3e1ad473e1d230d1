"""MIND: Multi-Interest Network with Dynamic Routing (Li et al., CIKM 2019), in one file.

Read it top to bottom; it follows the paper:

  1. Embedding & pooling     e_i = mean(item embedding, side-id embeddings)      (Sec. 4.2)
                             p_u = concat(profile-id embeddings)
     Behaviour time (the paper's future work, Sec. 6), optional:
                             e_i += T[bucket(t_newest - t_i)]     log2 buckets of the gap to the newest
  2. Multi-interest extractor, B2I dynamic routing (Algorithm 1, Sec. 4.3)
       b_ij ~ N(0, sigma^2)                           routing logits, behaviour i -> interest j
       repeat r times:
         w_ij = softmax_j(b_ij)                       over the K'_u active interests
         z_j  = sum_i w_ij S e_i                      one bilinear S shared by all pairs
         u_j  = squash(z_j)
         b_ij = b_ij + u_j^T S e_i
       K'_u = max(1, min(K, log2 |I_u|))             dynamic interest number (Eq. 9)
  3. ReLU layers over [u_j ; p_u]  ->  V_u = (v_u^1 .. v_u^K')                  (Sec. 4.3)
     (profile=False leaves p_u out: the interests then come from the behaviours alone)
     optionally also over u_g = squash(sum_i S e_i), the whole window as one capsule (global context)
  4. Label-aware attention (training only)                                      (Eq. 6)
       v_u = V_u softmax(pow(V_u^T e_label, p))     p = 0: mean, p -> inf: hard attention
  5. Sampled softmax over the item vocabulary, trained with Adam                (Eq. 7-8)
     (or the full softmax; optionally with interest-aware hard negatives and a routing regulariser, REMI)
  6. Serving: each v_u^k retrieves its own top-N; score(i) = max_k e_i^T v_u^k  (Eq. 3)

K = 1 with routing is "MIND-1"; pooling="mean" with K = 1 is YouTube DNN (the paper's baseline).

Index conventions (mind/dataset.py): item 0 = padding, 1 = unknown; side/profile id 0 = none.
Shapes: B batch, L window length, S side ids per item, P profile fields, K interests, d dimension.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MINDConfig:
    n_items: int  # item vocabulary size, including PAD (0) and OOV (1)
    n_side: int = 1  # side-id vocabulary size, including "none" (0)
    n_profile: int = 1  # profile-id vocabulary size, including "none" (0)
    n_profile_fields: int = 0  # P: profile ids per user
    d: int = 64  # embedding and interest dimension
    K: int = 4  # maximum number of interests
    dynamic_k: bool = True  # K'_u = max(1, min(K, log2 |I_u|)); False keeps all K
    iters: int = 3  # routing iterations r
    sigma: float = 1.0  # std of the routing-logit init b_ij ~ N(0, sigma^2)
    p: float = math.inf  # label-aware attention power; inf = hard attention
    max_len: int = 20  # behaviour window length L
    profile_dim: int = 16  # embedding size per profile field
    hidden: int = 256  # width of the ReLU layer over [capsule; profile]
    pooling: str = "routing"  # "routing" (MIND) or "mean" (YouTube DNN)
    stop_grad_routing: bool = True  # no gradient through the logit updates of early iterations
    init_seed: int = 0  # seeds the stored routing init used at inference
    routing_init: str = "kmeans++"  # "kmeans++" / "cover" (seeded, the paper's future work) or "random"
    time_buckets: int = 0  # behaviour-time embedding rows (log2 gap buckets + "unknown"); 0 = no time input
    recency: int = 0  # recency-rank embedding rows (newest = rank 0, capped; + padding); 0 = off
    time_into: str = "interest"  # "interest": each interest's mean time vector feeds its ReLU layers;
    # "behaviour": the time vector is added to e_i before routing (it then moves the clustering too)
    routing_center: bool = False  # agreement u_j^T (S e_i - mean_i S e_i): route on what sets them apart
    bilinear: str = "shared"  # "shared": one S (the paper); "per_interest": S_j (ComiRec-DR)
    train_max: bool = False  # training logits = max over the interests (the serving score) for every item;
    # False: label-aware attention picks one user vector per example (the paper)
    global_context: bool = False  # each interest's ReLU layers also read the window's one-capsule summary
    # u_g = squash(sum_i S e_i) (routing with K = 1), so an interest adds to what the whole window says
    dropout: float = 0.0  # dropout on the capsules before the ReLU layers (training only)
    temperature: float = 0.0  # > 0: unit-length item and interest vectors (cosine), logits / temperature;
    # every interest then competes on the same scale in the max-merge (Eq. 3); 0 = raw inner products
    profile: bool = True  # the ReLU layers read the user's profile p_u beside each capsule (Sec. 4.2); False:
    # the interests come from the behaviours alone (the profile ids are still accepted, and ignored)
    merge_decay: float = 1.0  # served interest j is scaled by merge_decay^j: the max-merge (Eq. 3) leans to
    # the interest seeded on the newest click over later seeds (often outliers); 1 = the paper's plain max

    def to_dict(self) -> dict:
        return asdict(self)


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule non-linearity: keeps direction, maps the norm into [0, 1) (Eq. 5)."""
    sq = (z * z).sum(-1, keepdim=True)
    return sq / (1.0 + sq) * z / torch.sqrt(sq + eps)


def interest_count(lengths: torch.Tensor, K: int) -> torch.Tensor:
    """K'_u = max(1, min(K, floor(log2 |I_u|))) (Eq. 9); an empty window still gets one interest."""
    log2 = torch.floor(torch.log2(lengths.clamp(min=1).to(torch.float32))).to(torch.int64)
    return log2.clamp(min=1, max=K)


def time_bucket(times: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Behaviour time as a log2 bucket of its gap to the NEWEST behaviour of the window (no wall clock).

    Relative gaps make offline and streaming give identical inputs. times [B,L] int64 Unix seconds,
    0 = unknown or padding -> bucket 0 (a zero embedding); else 1 + floor(log2(1 + gap)), capped.
    """
    newest = times.max(-1, keepdim=True).values  # [B,1]
    gap = (newest - times).clamp(min=0).to(torch.float64)  # [B,L] seconds (float64: exact to 2^53)
    bucket = 1 + torch.floor(torch.log2(1.0 + gap)).to(torch.int64).clamp(max=n_buckets - 2)  # [B,L]
    return torch.where((times > 0) & (newest > 0), bucket, torch.zeros_like(bucket))


def label_aware_attention(
    V: torch.Tensor, active: torch.Tensor, e_label: torch.Tensor, p: float
) -> torch.Tensor:
    """v_u = V_u softmax(pow(V_u^T e_label, p)) (Eq. 6), over the active interests only.

    pow keeps the sign (sign(x)|x|^p) so that any real p is defined and the order of the scores is
    kept: p = 0 gives the mean of the interests, p -> inf the interest nearest the label.
    V [B,K,d], active [B,K] bool, e_label [B,d] -> [B,d]
    """
    scores = torch.einsum("bkd,bd->bk", V, e_label)  # [B,K]
    if math.isinf(p):
        best = scores.masked_fill(~active, float("-inf")).argmax(-1)  # [B]
        return V[torch.arange(V.shape[0], device=V.device), best]  # [B,d]
    s64 = scores.double()  # float64 and a finite cap: |x|^p overflows float32 long before p is "large"
    logits = s64.sign() * s64.abs().pow(p) if p > 0 else torch.zeros_like(s64)  # [B,K]
    logits = torch.nan_to_num(logits, posinf=1e300, neginf=-1e300)
    attn = logits.masked_fill(~active, float("-inf")).softmax(-1).to(V.dtype)  # [B,K]
    return torch.einsum("bk,bkd->bd", attn, V)  # [B,d]


def sampled_softmax_loss(
    v_u: torch.Tensor,
    e_label: torch.Tensor,
    label: torch.Tensor,
    e_neg: torch.Tensor,
    neg: torch.Tensor,
    log_q: torch.Tensor | None = None,
    beta: float = 0.0,
    correct_label: bool = False,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the label and shared sampled negatives (Eq. 7-8, Jean et al. 2015).

    A negative equal to the label is removed ("accidental hit"). log_q [n_items] is the log of each
    item's expected count among the N draws (log N q_j). Subtracting it from each negative's logit
    makes sum_j exp(s_j - log_q_j) an unbiased estimate of the full softmax's sum over the catalogue,
    so the loss tends to the full softmax loss as N grows, however skewed the sampler. Passing every
    item as `neg` (and no log_q) IS the full softmax. correct_label=True also subtracts it from the
    label's logit, as TensorFlow's sampled_softmax_loss does: that trains s - log q, a popularity-
    discounted score, and its loss does not tend to the full softmax loss.

    beta > 0: interest-aware hard negatives (REMI's IHN): each negative's term is reweighted by
    w_j = exp(beta s_j) / mean_k exp(beta s_k), the mean taken over the catalogue as the (corrected)
    sample estimates it, so hard negatives (close to the user's interest) weigh more; w is a
    constant of the step (detached), and beta = 0 gives back the plain loss.
    v_u [B,K,d] with active [B,K]: every item's logit is max_k over the active interests, the score the
    serving merge ranks by (Eq. 3), so training sees what retrieval will rank.
    v_u [B,d], e_label [B,d], label [B], e_neg [N,d], neg [N] -> scalar
    """
    if v_u.dim() == 3:
        off = (~active)[:, :, None] * -1e4  # [B,K,1] inactive interests never win the max
        pos = (torch.einsum("bkd,bd->bk", v_u, e_label)[:, :, None] + off).amax(1)  # [B,1]
        scores = (torch.einsum("bkd,nd->bkn", v_u, e_neg) + off).amax(1)  # [B,N]
    else:
        pos = (v_u * e_label).sum(-1, keepdim=True)  # [B,1]
        scores = v_u @ e_neg.T  # [B,N]  s_j
    hit = neg[None, :] == label[:, None]  # [B,N] accidental hits
    correction = -log_q[neg][None, :].expand_as(scores) if log_q is not None else torch.zeros_like(scores)
    if log_q is not None and correct_label:
        pos = pos - log_q[label][:, None]
    negs = (scores + correction).masked_fill(hit, float("-inf"))  # [B,N]
    if beta > 0:
        s = scores.detach().masked_fill(hit, float("-inf"))
        c = correction.masked_fill(hit, float("-inf"))
        log_mean = torch.logsumexp(beta * s + c, -1, keepdim=True) - torch.logsumexp(c, -1, keepdim=True)
        negs = negs + (beta * s - log_mean)  # [B,N]  + log w_j
    logits = torch.cat([pos, negs], dim=1)  # [B,1+N]
    return F.cross_entropy(logits, torch.zeros_like(label))


def routing_regulariser(w: torch.Tensor, mask: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """REMI's routing regulariser: penalises interests that collapse onto one behaviour.

    Each interest's routing weights, normalised over the behaviours (what it reads from each, times
    the number of behaviours n, so that reading all alike is 1 for any n), have a variance across
    behaviours: 0 for an even read, about n for a capsule fed by one behaviour. The penalty is the
    squared norm of those variances per user, averaged over the batch.
    w [B,L,K] coupling, mask [B,L], active [B,K] -> scalar
    """
    m = mask[:, :, None].to(w.dtype)  # [B,L,1]
    n = m.sum(1, keepdim=True).clamp(min=1.0)  # [B,1,1]
    a = n * w * m / (w * m).sum(1, keepdim=True).clamp(min=1e-9)  # [B,L,K] each interest over behaviours
    var = (((a - (a * m).sum(1, keepdim=True) / n) * m) ** 2).sum(1) / n[:, 0]  # [B,K]
    return ((var * active) ** 2).sum(-1).mean()


class MIND(nn.Module):
    def __init__(self, cfg: MINDConfig):
        super().__init__()
        self.cfg = cfg
        d, K, L = cfg.d, cfg.K, cfg.max_len
        self.K, self.L, self.d, self.iters = K, L, d, cfg.iters
        self.dynamic_k = cfg.dynamic_k
        self.mean_pooling = cfg.pooling == "mean"
        self.stop_grad_routing = cfg.stop_grad_routing
        self.sigma = cfg.sigma
        self.temperature = float(cfg.temperature)  # a plain float: TorchScript cannot read cfg
        self.kmeans_init = cfg.routing_init in ("kmeans++", "cover")
        self.cover_init = cfg.routing_init == "cover"
        # 1. embeddings: item ids, side ids (category, brand, ...), profile ids (age, gender, ...)
        self.item_emb = nn.Embedding(cfg.n_items, d, padding_idx=0)
        self.side_emb = nn.Embedding(max(cfg.n_side, 1), d, padding_idx=0)
        self.profile_emb = nn.Embedding(max(cfg.n_profile, 1), cfg.profile_dim, padding_idx=0)
        # behaviour time: one vector per log2 gap bucket (row 0 = unknown time, adds nothing)
        self.use_time = cfg.time_buckets > 1
        self.time_buckets = max(cfg.time_buckets, 2)
        self.time_emb = nn.Embedding(self.time_buckets, d, padding_idx=0)
        # behaviour order when no clock is known: the rank of each behaviour counted from the newest
        self.use_recency = cfg.recency > 1
        self.recency = max(cfg.recency, 2)
        self.recency_emb = nn.Embedding(self.recency, d, padding_idx=0)
        # 2. the bilinear map S shared by every behaviour/interest pair
        self.routing_center = cfg.routing_center
        self.per_interest = cfg.bilinear == "per_interest"
        if cfg.bilinear not in ("shared", "per_interest"):
            raise ValueError(f"unknown bilinear {cfg.bilinear!r}: use 'shared' or 'per_interest'")
        self.S = nn.Parameter(torch.empty(K, d, d) if self.per_interest else torch.empty(d, d))
        self.drop = nn.Dropout(cfg.dropout)
        # fixed routing init for inference: serving must be deterministic per model version
        g = torch.Generator().manual_seed(cfg.init_seed)
        self.register_buffer("b_init", torch.randn(L, K, generator=g) * cfg.sigma)  # [L,K]
        # [K] merge_decay^j: not a weight, so not saved (older checkpoints load unchanged)
        self.merge_decay = float(cfg.merge_decay)  # a plain float: TorchScript cannot read cfg
        slot_weight = cfg.merge_decay ** torch.arange(K, dtype=torch.float32)  # [K]
        self.register_buffer("slot_weight", slot_weight, persistent=False)
        # 3. ReLU layers over [capsule; profile] (+ the interest's time vector)
        self.time_per_interest = cfg.time_into == "interest" and (self.use_time or self.use_recency)
        self.global_context = cfg.global_context and not self.mean_pooling
        self.use_profile = cfg.profile and cfg.n_profile_fields > 0
        # the MLP reads [u_j (; u_g) (; p_u) (; time_j)]
        profile_width = cfg.n_profile_fields * cfg.profile_dim if self.use_profile else 0
        width = d * (1 + self.global_context + self.time_per_interest) + profile_width
        self.mlp = nn.Sequential(
            nn.Linear(width, cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, d),
        )
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        nn.init.normal_(self.side_emb.weight, std=d**-0.5)
        nn.init.normal_(self.profile_emb.weight, std=cfg.profile_dim**-0.5)
        nn.init.normal_(self.S, std=d**-0.5)
        nn.init.normal_(self.time_emb.weight, std=0.1 * d**-0.5)  # starts small: time only nudges e_i
        nn.init.normal_(self.recency_emb.weight, std=0.1 * d**-0.5)
        with torch.no_grad():
            self.time_emb.weight[0].zero_()
            self.recency_emb.weight[0].zero_()
            self.item_emb.weight[0].zero_()
            self.side_emb.weight[0].zero_()
            self.profile_emb.weight[0].zero_()

    def unread_tables(self) -> list[str]:
        """Embedding tables this model never reads (behaviour time or recency when off, a profile it leaves
        out): not part of what a trained model is, and absent from checkpoints saved before they existed."""
        unread = [
            name for name, on in (("time_emb", self.use_time), ("recency_emb", self.use_recency)) if not on
        ]
        return unread + ["profile_emb"] * (self.cfg.n_profile_fields > 0 and not self.use_profile)

    # ---- 1. embedding & pooling -------------------------------------------------------------
    def embed_items(self, item_ids: torch.Tensor, side_ids: torch.Tensor) -> torch.Tensor:
        """e_i = mean of the item embedding and its side-id embeddings. [...] , [...,S] -> [...,d]"""
        # Cold start: an index >= n_items is a catalogue item newer than this model. Its id part is the
        # unknown item's (OOV = 1) embedding and its side ids (from side_ids) carry what is known of it.
        item_ids = torch.where(item_ids < self.item_emb.num_embeddings, item_ids, torch.ones_like(item_ids))
        e = self.item_emb(item_ids)  # [...,d]
        side = self.side_emb(side_ids)  # [...,S,d]   (row 0 is zero: "none" adds nothing)
        n = 1.0 + (side_ids > 0).sum(-1, keepdim=True).to(e.dtype)  # [...,1]
        e = (e + side.sum(-2)) / n  # [...,d]
        return F.normalize(e, dim=-1) if self.temperature > 0 else e  # [...,d]

    def behaviour_time(self, item_ids: torch.Tensor, times: torch.Tensor | None) -> torch.Tensor:
        """t_i: the embedding of each behaviour's time gap to the newest one and/or of its recency rank.

        item_ids [B,L], times [B,L] or None -> [B,L,d] (zero for padding and unknown times)
        """
        mask = item_ids > 0  # [B,L]
        t = torch.zeros(item_ids.shape[0], item_ids.shape[1], self.d, device=item_ids.device)
        if self.use_recency:
            rank = mask.sum(-1, keepdim=True) - 1 - torch.arange(item_ids.shape[1], device=item_ids.device)
            idx = (1 + rank.clamp(min=0, max=self.recency - 2)) * mask  # [B,L] 1 = newest, 0 = padding
            t = t + self.recency_emb(idx) * mask[..., None]  # [B,L,d]
        if self.use_time and times is not None:
            bucket = time_bucket(times * mask, self.time_buckets)  # [B,L], 0 = unknown
            t = t + self.time_emb(bucket) * (bucket > 0)[..., None]  # [B,L,d]
        return t

    def embed_behaviours(
        self, item_ids: torch.Tensor, side_ids: torch.Tensor, times: torch.Tensor | None
    ) -> torch.Tensor:
        """e_i of the behaviours (+ t_i when time goes into the behaviours). -> [B,L,d]"""
        e = self.embed_items(item_ids, side_ids)  # [B,L,d]
        if (self.use_time or self.use_recency) and not self.time_per_interest:
            e = e + self.behaviour_time(item_ids, times)  # [B,L,d]
        return e

    # ---- 2. B2I dynamic routing ------------------------------------------------------------
    def routing(
        self, e: torch.Tensor, mask: torch.Tensor, k_active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1. e [B,L,d], mask [B,L] (True = real behaviour), k_active [B,K]
        -> capsules u [B,K,d] and the final coupling coefficients w [B,L,K] (the paper's Fig. 5)"""
        B, L, _ = e.shape
        if self.per_interest:  # S_j e_i for every interest j: [B,L,K,d]
            Se = torch.einsum("kcd,bld->blkc", self.S, e)
        else:
            Se = (e @ self.S.T)[:, :, None, :].expand(B, L, self.K, e.shape[-1])  # [B,L,K,d] S e_i
        Se_fixed = Se.detach() if self.stop_grad_routing else Se
        if self.kmeans_init:
            b = self.kmeans_pp_logits(self.agreement_input(Se_fixed, mask), mask)  # [B,L,K] deterministic
        elif self.training:
            b = torch.randn(B, L, self.K, device=e.device) * self.sigma  # [B,L,K] b_ij ~ N(0, sigma^2)
        else:
            b = self.b_init[:L].unsqueeze(0).expand(B, L, self.K)  # [B,L,K] stored draw
        b = b.masked_fill(~k_active[:, None, :], -1e9)  # inactive interests take no weight
        u = torch.zeros(B, self.K, e.shape[-1], device=e.device, dtype=e.dtype)
        for it in range(self.iters):
            Se_it = Se if it == self.iters - 1 else Se_fixed  # the last iteration carries the gradient
            w = b.softmax(-1) * mask[:, :, None]  # [B,L,K] softmax over interests; padding gets 0
            z = torch.einsum("blk,blkd->bkd", w, Se_it)  # [B,K,d] z_j = sum_i w_ij S e_i
            u = squash(z)  # [B,K,d]
            b = b + torch.einsum("bkd,blkd->blk", u, self.agreement_input(Se_it, mask))  # b_ij += u_j^T S e_i
        w = b.softmax(-1) * mask[:, :, None]  # [B,L,K] the coupling the final capsules settle on
        return u * k_active[:, :, None], w  # [B,K,d], [B,L,K]

    def agreement_input(self, Se: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the agreement u_j^T (.) reads: S e_i, or with routing_center its deviation from the
        user's mean behaviour, so that a direction shared by all behaviours (popularity) does not pull
        every behaviour to the same interest. Se [B,L,K,d], mask [B,L] -> [B,L,K,d]"""
        if not self.routing_center:
            return Se
        m = mask[:, :, None, None].to(Se.dtype)  # [B,L,1,1]
        mean = (Se * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)  # [B,1,K,d]
        return (Se - mean) * m

    def kmeans_pp_logits(self, Se: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The paper's future work: a K-means++-like routing init instead of random logits.

        Interest j starts at a seed behaviour: the newest behaviour first, then each next seed is
        the behaviour farthest (in cosine) from the seeds so far ("kmeans++"), or the one that brings
        the most behaviours closer to a seed ("cover": greedy k-medoids, so a lone outlier is not a
        seed). b_ij = u_j^T S e_i with u_j = squash(S e_seed_j), i.e. one routing update from capsules
        placed at the seeds. Se [B,L,d], mask [B,L] -> b [B,L,K]
        """
        B = Se.shape[0]
        rows = torch.arange(B, device=Se.device)
        Sn = F.normalize(Se[:, :, 0], dim=-1)  # [B,L,d]  (seeds are picked in interest 0's projection)
        cos = Sn @ Sn.transpose(1, 2)  # [B,L,L]
        seed = (mask.sum(-1) - 1).clamp(min=0)  # [B] newest behaviour
        seeds = [seed]
        far = (1.0 - cos[rows, seed]).masked_fill(~mask, -1.0)  # [B,L] distance to the nearest seed
        for _ in range(1, self.K):
            if self.cover_init:  # gain of seeding at c: sum_i max(0, far_i - (1 - cos_ic))
                gain = (far[:, :, None] - (1.0 - cos)).clamp(min=0).sum(1)  # [B,L] per candidate c
                seed = gain.masked_fill(~mask, -1.0).argmax(-1)  # [B]
            else:
                seed = far.argmax(-1)  # [B]
            seeds.append(seed)
            far = torch.minimum(far, (1.0 - cos[rows, seed]).masked_fill(~mask, -1.0))
        ks = torch.arange(self.K, device=Se.device)
        u0 = squash(Se[rows[:, None], torch.stack(seeds, 1), ks[None, :]])  # [B,K,d] seed j in S_j
        return torch.einsum("bkd,blkd->blk", u0, Se)  # [B,L,K]

    # ---- the user tower (what Triton serves) ---------------------------------------------------
    def capsules(
        self, item_ids: torch.Tensor, side_ids: torch.Tensor, times: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Behaviours -> interest capsules u [B,K,d], active [B,K], coupling w [B,L,K]."""
        mask = item_ids > 0  # [B,L]
        e = self.embed_behaviours(item_ids, side_ids, times)  # [B,L,d]
        lengths = mask.sum(-1)  # [B]
        ks = torch.arange(self.K, device=item_ids.device)  # [K]
        if self.mean_pooling:  # YouTube DNN: one interest, the mean behaviour
            k_active = (ks[None, :] < 1).expand(item_ids.shape[0], self.K)  # [B,K]
            w = (
                mask[:, :, None].to(e.dtype) * k_active[:, None, :] / lengths.clamp(min=1)[:, None, None]
            )  # [B,L,K]
            u = torch.einsum("blk,bld->bkd", w, e)  # [B,K,d] mean behaviour in slot 0
            return u, k_active, w
        k_user = interest_count(lengths, self.K) if self.dynamic_k else torch.full_like(lengths, self.K)
        k_active = ks[None, :] < k_user[:, None]  # [B,K]
        u, w = self.routing(e, mask, k_active)  # [B,K,d], [B,L,K]
        return u, k_active, w

    def forward(
        self,
        item_ids: torch.Tensor,
        side_ids: torch.Tensor,
        profile_ids: torch.Tensor,
        times: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """item_ids [B,L] (0-padded), side_ids [B,L,S], profile_ids [B,P], times [B,L] (Unix s, 0 = unknown;
        ignored by a model trained without time) -> V_u [B,K,d], active [B,K]"""
        V, k_active, _ = self.interests(item_ids, side_ids, profile_ids, times)
        return V, k_active

    def interests(
        self,
        item_ids: torch.Tensor,
        side_ids: torch.Tensor,
        profile_ids: torch.Tensor,
        times: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward() plus the coupling w [B,L,K] that the routing regulariser reads."""
        u, k_active, w = self.capsules(item_ids, side_ids, times)  # [B,K,d], [B,K], [B,L,K]
        x = [self.drop(u)]
        if self.global_context:  # u_g = squash(sum_i S e_i): the whole window as one capsule
            mask = (item_ids > 0)[:, :, None].to(u.dtype)  # [B,L,1]
            e = self.embed_behaviours(item_ids, side_ids, times)  # [B,L,d]
            S0 = self.S[0] if self.per_interest else self.S  # [d,d]
            u_g = squash(((e * mask) @ S0.T).sum(1))  # [B,d]
            x.append(u_g[:, None, :].expand(-1, self.K, -1))  # [B,K,d]
        if self.use_profile:
            p_u = self.profile_emb(profile_ids).flatten(1)  # [B,P*profile_dim]
            x.append(p_u[:, None, :].expand(-1, self.K, -1))  # [B,K,P*profile_dim]
        if self.time_per_interest:  # when interest j's behaviours happened: sum_i w_ij t_i / sum_i w_ij
            t = self.behaviour_time(item_ids, times)  # [B,L,d]
            x.append(torch.einsum("blk,bld->bkd", w, t) / w.sum(1)[:, :, None].clamp(min=1e-9))  # [B,K,d]
        V = self.mlp(torch.cat(x, dim=-1))  # [B,K,d]  3. ReLU layers over [u_j (; u_g) (; p_u) (; time_j)]
        if self.temperature > 0:  # unit interests: the max-merge compares cosines
            V = F.normalize(V, dim=-1)
        if not self.training and self.merge_decay != 1.0:  # served: interest j's scores x merge_decay^j
            V = V * self.slot_weight[None, :, None]  # [B,K,d]
        V = V * k_active[:, :, None]  # inactive interests are zero
        return V, k_active, w

    # ---- training ---------------------------------------------------------------------------
    def loss(
        self,
        item_ids: torch.Tensor,
        side_ids: torch.Tensor,
        profile_ids: torch.Tensor,
        label: torch.Tensor,
        label_side: torch.Tensor,
        neg: torch.Tensor,
        neg_side: torch.Tensor,
        log_q: torch.Tensor | None = None,
        p: float | None = None,
        times: torch.Tensor | None = None,
        beta: float = 0.0,
        rr: float = 0.0,
        correct_label: bool = False,
    ) -> torch.Tensor:
        """Label-aware attention + sampled softmax (+ rr x routing regulariser).

        label [B], label_side [B,S], neg [N], neg_side [N,S]; every item as neg = full softmax."""
        V, active, w = self.interests(item_ids, side_ids, profile_ids, times)  # [B,K,d], [B,K], [B,L,K]
        e_label = self.embed_items(label, label_side)  # [B,d]
        if self.cfg.train_max and not self.mean_pooling:
            v_u = V  # [B,K,d]: each item scored by its best interest
        else:
            v_u = label_aware_attention(V, active, e_label, self.cfg.p if p is None else p)  # [B,d]
        if self.cfg.temperature > 0:
            v_u = v_u / self.cfg.temperature  # cosine logits / temperature
        e_neg = self.embed_items(neg, neg_side)  # [N,d]
        loss = sampled_softmax_loss(v_u, e_label, label, e_neg, neg, log_q, beta, correct_label, active)
        if rr > 0 and not self.mean_pooling:
            loss = loss + rr * routing_regulariser(w, item_ids > 0, active)
        return loss

    @torch.no_grad()
    def item_vectors(self, item_side: torch.Tensor) -> torch.Tensor:
        """e_i for the whole catalogue, what the indexer writes to Milvus. item_side [M,S] -> [M,d]"""
        ids = torch.arange(item_side.shape[0], device=item_side.device)
        return self.embed_items(ids, item_side)
