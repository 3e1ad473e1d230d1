"""Training and offline retrieval for MIND (and YouTube DNN / MIND-1, which are MIND configs).

Every (history, next item) pair of the training users is one example; the validation users pick
the best epoch (early stopping), so the test users are never looked at while training.

Under `torchrun` the same `train` runs data-parallel (DDP): see `distributed()` and docs/training.md.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from tqdm.auto import tqdm

from mind.dataset import Interactions, Vocab, pad_windows
from mind.evaluate import evaluate_ranked, evaluate_ranked_per_user
from mind.metrics import DEFAULT_NS, METRICS
from mind.model import MIND, MINDConfig
from mind.retrieval import exact_topn, merge_interests

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 100  # upper bound; training stops when the validation users stop improving
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    neg: int = 1000  # shared sampled negatives per batch (softmax="sampled")
    neg_sampler: str = "popularity"  # "popularity" (count^0.75, log-Q corrected) or "uniform"
    softmax: str = "sampled"  # "sampled" (neg shared negatives) or "full" (every item, exact)
    hard_beta: float = 0.0  # interest-aware hard negatives (REMI): weight exp(beta * score); 0 = off
    rr: float = 0.0  # weight of the routing regulariser (REMI); 0 = off
    logq_label: bool = True  # also log-Q-correct the label's logit (TensorFlow's convention)
    horizon: int = 1  # label: one of the next `horizon` items (drawn per step); 1 = next item
    patience: int = 3  # epochs without validation gain before stopping (convergence)
    select_metric: str = "recall@50"
    max_seconds: float = 0.0  # optional wall-clock budget for one model; 0 = none, stop by convergence
    seed: int = 42
    threads: int = 0  # torch threads; 0 = torch's default
    # cold start: each step treats this share of the items as unknown (side ids only, the unknown item's id
    # embedding), so that the unknown item's embedding and the side ids learn what new items need; 0 = off
    unknown_rate: float = 0.0
    # behaviour dropout: each step drops this share of a window's behaviours (never the newest) and closes
    # the gaps, so the routing learns interests that survive a missing click; 0 = off
    behaviour_dropout: float = 0.0


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_valid: dict
    samples_per_s: float
    seconds: float
    stopped_by: str = "convergence"  # "convergence", "epochs" (the upper bound) or "budget" (max_seconds)
    history: list[dict] = field(default_factory=list)
    steps: int = 0  # optimizer steps (the same on every DDP rank)
    replicas: list[str] = field(default_factory=list)  # state_checksum of the final model, per rank


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job; the default is the plain single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    active: bool = False  # a process group is initialised: wrap in DDP, shard, all-reduce

    @property
    def main(self) -> bool:
        """Only the main rank writes checkpoints, logs and progress bars."""
        return self.rank == 0


@contextmanager
def distributed() -> Iterator[Dist]:
    """Join torchrun's process group if launched by it; a plain process gets `Dist()` and no group.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (env:// init). With
    CUDA each process takes cuda:LOCAL_RANK and nccl, otherwise the CPU and gloo. On success the
    ranks meet at a barrier before the group is destroyed, so none exits while another still saves.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield Dist()
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    tdist.init_process_group(backend=backend)
    d = Dist(tdist.get_rank(), tdist.get_world_size(), local, device, active=True)
    try:
        yield d
        if backend == "nccl":
            tdist.barrier(device_ids=[local])
        else:
            tdist.barrier()
    finally:
        tdist.destroy_process_group()


class _LossStep(nn.Module):
    """DDP syncs gradients only for what runs through its forward(); MIND's training entry is .loss()."""

    def __init__(self, model: MIND):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor | None, **kwargs: object) -> torch.Tensor:
        return self.model.loss(*args, **kwargs)


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of one epoch's example order, as DistributedSampler cuts it.

    The order is wrapped around to a multiple of `world` so that every rank runs the same number
    of steps (one rank with an extra step would wait forever in DDP's all-reduce).
    """
    if world == 1:
        return order
    per = -(-len(order) // world)
    return np.resize(order, per * world)[rank::world]


def state_checksum(model: nn.Module) -> str:
    """sha256 of every weight and buffer: equal on all DDP replicas and in the saved checkpoint."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _all_reduce(values: list[float], d: Dist, op: str = "sum") -> list[float]:
    """Sum (or "max") a few numbers over the ranks; identity in a single process."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    return t.tolist()


def feature_tables(inter: Interactions) -> tuple[torch.Tensor, torch.Tensor]:
    """Side ids per item [n_items, S>=1] and profile ids per user [n_users, P>=1] as tensors.

    A data set without side or profile ids gets one all-"none" column, so the tower always has
    the same three inputs (Triton needs non-empty shapes).
    """
    side = inter.item_side if inter.item_side.ndim == 2 and inter.item_side.shape[1] else None
    prof = inter.user_profile if inter.user_profile.ndim == 2 and inter.user_profile.shape[1] else None
    side_t = torch.as_tensor(side if side is not None else np.zeros((inter.n_items, 1)), dtype=torch.int64)
    prof_t = torch.as_tensor(prof if prof is not None else np.zeros((len(inter.users), 1)), dtype=torch.int64)
    return side_t, prof_t


def window_within_bounds(length: float) -> int:
    """A window length within [10, 50]: shorter windows leave routing too few behaviours to cluster,
    longer ones cost every call and reach past what the next click depends on."""
    return int(min(50, max(10, length)))


def window_rule(lengths: np.ndarray) -> int:
    """The default window: the 90th percentile of the given sequence lengths, within bounds (20 for none)."""
    return window_within_bounds(np.percentile(lengths, 90)) if len(lengths) else 20


def model_config_for(inter: Interactions, users: np.ndarray | None = None, **overrides) -> MINDConfig:
    """A MINDConfig that fits the data set: vocabulary sizes from the data, window from its lengths.

    `users` (the training users) are the only sequences the window rule looks at, so that nothing
    about the validation or test users leaks into the model; None = every user (a model trained on all).
    """
    side_t, prof_t = feature_tables(inter)
    rows = range(len(inter.sequences)) if users is None else np.asarray(users).tolist()
    lengths = np.array([len(inter.sequences[u]) for u in rows])
    max_len = window_rule(lengths)
    cfg = dict(
        n_items=inter.n_items,
        n_side=max(inter.n_side, int(side_t.max()) + 1),
        n_profile=max(inter.n_profile, int(prof_t.max()) + 1),
        n_profile_fields=prof_t.shape[1],
        max_len=max_len,
    )
    cfg.update(overrides)
    if inter.timestamps is None:  # time is learnt only from real timestamps (else it would read noise)
        cfg["time_buckets"] = 0
    return MINDConfig(**cfg)


def case_times(inter: Interactions, cases: list) -> list[np.ndarray] | None:
    """Unix seconds of each case's history (its user's first len(history) behaviours); None = no times.

    Every protocol's history is a prefix of the user's sequence (mind.split), and so is the stream's
    window of a replayed user, so this gives the tower the times the stream worker would send.
    """
    if inter.timestamps is None:
        return None
    return [np.asarray(inter.timestamps[c.user][: len(c.history)]) for c in cases]


def training_examples(
    sequences: list[np.ndarray],
    users: np.ndarray,
    max_len: int,
    timestamps: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, ...]:
    """Every next-item prediction of the training users: windows [N,L], targets [N], user rows [N]
    (and, with timestamps, the windows' Unix seconds [N,L])."""
    hists, targets, rows, times = [], [], [], []
    for u in users:
        s = sequences[u]
        for t in range(1, len(s)):
            hists.append(s[max(0, t - max_len) : t])
            targets.append(s[t])
            rows.append(u)
            if timestamps is not None:
                times.append(timestamps[u][max(0, t - max_len) : t])
    out = (pad_windows(hists, max_len), np.asarray(targets, dtype=np.int64), np.asarray(rows, dtype=np.int64))
    return out + ((pad_windows(times, max_len),) if timestamps is not None else ())


def future_items(sequences: list[np.ndarray], users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every example of `training_examples` (same order): where its next item sits in one flat array
    of the users' sequences, and how many items follow the window (the next one included).

    -> flat [sum of lengths], start [N] (flat index of the next item), room [N] (>= 1)
    """
    flat, start, room, at = [], [], [], 0
    for u in users:
        s = sequences[u]
        flat.append(np.asarray(s, dtype=np.int64))
        n = len(s)
        start.extend(range(at + 1, at + n))
        room.extend(range(n - 1, 0, -1))
        at += n
    cat = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
    return cat, np.asarray(start, dtype=np.int64), np.asarray(room, dtype=np.int64)


def negative_distribution(
    sequences: list[np.ndarray], users: np.ndarray, n_items: int, kind: str
) -> torch.Tensor:
    """Sampling probability per item (PAD and OOV never sampled)."""
    if kind == "uniform":
        counts = np.ones(n_items)
    elif kind == "popularity":
        counts = np.bincount(np.concatenate([sequences[u] for u in users]), minlength=n_items).astype(float)
        counts = (counts + 1.0) ** 0.75
    else:
        raise ValueError(f"unknown neg_sampler {kind!r}: use 'popularity' or 'uniform'")
    counts[:2] = 0.0
    return torch.as_tensor(counts / counts.sum(), dtype=torch.float32)


@torch.no_grad()
def encode(
    model: MIND,
    inter: Interactions,
    histories: list[np.ndarray],
    users: np.ndarray,
    batch: int = 1024,
    times: list[np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The user tower in process: interest vectors [B,K,d] and active mask [B,K] for histories.

    times: Unix seconds of each history's behaviours (None = unknown, all zeros), the TIMES input.
    Runs on the model's device (a DDP rank validates on its GPU); the results stay there.
    """
    dev = next(model.parameters()).device
    side_t, prof_t = (t.to(dev) for t in feature_tables(inter))
    model.eval()
    Vs, actives = [], []
    L = model.cfg.max_len
    for i in range(0, len(histories), batch):
        ids = torch.as_tensor(pad_windows(histories[i : i + batch], L)).to(dev)
        ts = torch.as_tensor(
            pad_windows(times[i : i + batch], L) if times is not None else np.zeros(ids.shape)
        )
        V, active = model(
            ids, side_t[ids], prof_t[torch.as_tensor(users[i : i + batch]).to(dev)], ts.to(dev, torch.int64)
        )
        Vs.append(V)
        actives.append(active)
    return torch.cat(Vs), torch.cat(actives)


@torch.no_grad()
def recommend(model: MIND, inter: Interactions, cases: list, n: int) -> np.ndarray:
    """Offline retrieval exactly as served: per-interest exact top-n, merged by max score (Eq. 3)."""
    side_t, _ = feature_tables(inter)
    items = model.item_vectors(side_t.to(next(model.parameters()).device))  # [M,d]
    V, active = encode(
        model,
        inter,
        [c.history for c in cases],
        np.array([c.user for c in cases]),
        times=case_times(inter, cases),
    )
    ids, scores = exact_topn(V, active, items, n)  # [B,K,n]
    merged, _, _ = merge_interests(ids, scores, n)
    return np.asarray(merged)


def _validate(model: MIND, inter: Interactions, cases: list, d: Dist) -> dict:
    """Validation metrics; under DDP each rank ranks its share of the users and the means are pooled."""
    if not d.active:
        return evaluate_ranked(recommend(model, inter, cases, 100), cases)
    mine = cases[d.rank :: d.world]
    keys = [f"{m}@{n}" for m in METRICS for n in DEFAULT_NS]
    per = evaluate_ranked_per_user(recommend(model, inter, mine, 100), mine) if mine else {}
    *sums, count = _all_reduce([float(per[k].sum()) if mine else 0.0 for k in keys] + [len(mine)], d)
    return {k: s / count if count else 0.0 for k, s in zip(keys, sums, strict=True)}


def drop_behaviours(
    ids: torch.Tensor, times: torch.Tensor | None, q: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop each behaviour with probability q, keep the newest, and close the gaps (windows stay
    right-padded). ids [B,L], times [B,L] or None -> the same shapes."""
    real = ids > 0  # [B,L]
    keep = real & (torch.rand(ids.shape, device=ids.device) >= q)  # [B,L]
    rows, newest = torch.arange(len(ids), device=ids.device), (real.sum(-1) - 1).clamp(min=0)  # [B], [B]
    keep[rows, newest] = real[rows, newest]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept first, in their order
    out = torch.gather(ids * keep, 1, order)  # [B,L]
    return out, (torch.gather(times * keep, 1, order) if times is not None else None)


def train(
    model: MIND,
    inter: Interactions,
    train_users: np.ndarray,
    valid_cases: list,
    cfg: TrainConfig,
    ckpt: Path | None = None,
    progress: bool = True,
    dist: Dist | None = None,
) -> TrainResult:
    """Adam on the sampled softmax; keeps the weights of the best validation epoch.

    With an active `dist` (torchrun) the model is DDP-wrapped on `dist.device`: every rank takes
    its shard of the same shuffled examples, `cfg.batch_size` per rank per step (the global batch
    is world x batch_size), draws its own negatives (seed + rank), and gradients are averaged, so
    the replicas stay identical. Loss and validation metrics are pooled over the ranks; only rank
    0 writes `ckpt` and shows progress. Without it (the default) nothing changes: same results
    for the same seed as before DDP existed.
    """
    d = dist or Dist()
    progress = progress and d.main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + d.rank)  # per-rank negatives; rank 0 draws as a single process does
    rng = np.random.default_rng(cfg.seed)  # the same shuffle on every rank; each takes its shard
    dev = torch.device(d.device)
    model.to(dev)
    side_t, prof_t = (t.to(dev) for t in feature_tables(inter))
    stamps = inter.timestamps if model.use_time else None
    H, T, U, *Ts = training_examples(inter.sequences, np.asarray(train_users), model.cfg.max_len, stamps)
    H_t, T_t, U_t = (torch.as_tensor(a).to(dev) for a in (H, T, U))
    Ts_t = torch.as_tensor(Ts[0]).to(dev) if Ts else None
    if cfg.horizon > 1:  # the label is drawn among the next `horizon` items, anew at every step
        flat, first, room = (
            torch.as_tensor(a).to(dev) for a in future_items(inter.sequences, np.asarray(train_users))
        )
        room = room.clamp(max=cfg.horizon)
    if cfg.softmax not in ("sampled", "full"):
        raise ValueError(f"unknown softmax {cfg.softmax!r}: use 'sampled' or 'full'")
    full = cfg.softmax == "full"
    q = negative_distribution(inter.sequences, np.asarray(train_users), inter.n_items, cfg.neg_sampler)
    q = q.to(dev)
    log_q = torch.log(q.clamp(min=1e-12) * cfg.neg) if cfg.neg_sampler != "uniform" and not full else None
    n_items = model.cfg.n_items
    if cfg.unknown_rate > 0 and log_q is not None:
        log_q = torch.cat([log_q, log_q])  # an item made unknown (index + n_items) keeps its correction
    all_items = torch.arange(2, inter.n_items, device=dev)  # the full softmax's "negatives": every item
    extra = {"beta": cfg.hard_beta, "rr": cfg.rr, "correct_label": cfg.logq_label}
    step: nn.Module | None = None
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's weights here, so the replicas start identical whatever the seed.
        # YouTube DNN (mean pooling) never touches S: only then must DDP look for unused parameters.
        # No buffer sync per step: the only buffer, b_init, is drawn from cfg.init_seed and never
        # changes. torch 2.13 renamed the flag (and deprecated the old one); older ones lack it.
        fixed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        step = DDP(
            _LossStep(model),
            device_ids=[d.local_rank] if dev.type == "cuda" else None,
            # mean pooling leaves S unused, and a model without behaviour time its time/recency tables
            find_unused_parameters=model.mean_pooling or bool(model.unread_tables()),
            **({"forward_sync_buffers": False} if fixed else {"broadcast_buffers": False}),
        )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    best, best_epoch, best_state, history = -math.inf, -1, None, []
    stopped_by = "epochs"
    start, seen, bad, steps = time.perf_counter(), 0, 0, 0
    train_seconds = 0.0
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        (step if step is not None else model).train()
        order = torch.as_tensor(shard(rng.permutation(len(T)), d.rank, d.world)).to(dev)
        t0 = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device: no sync per step
        bar = tqdm(
            range(0, len(order), cfg.batch_size),
            desc=f"epoch {epoch}",
            disable=None if progress else True,
            leave=False,
        )
        for i in bar:
            idx = order[i : i + cfg.batch_size]
            ids, label, rows = H_t[idx], T_t[idx], U_t[idx]
            times = Ts_t[idx] if Ts_t is not None else None
            if cfg.behaviour_dropout > 0:
                ids, times = drop_behaviours(ids, times, cfg.behaviour_dropout)
            if cfg.horizon > 1:
                off = (torch.rand(len(idx), device=dev) * room[idx]).long()  # [b] in [0, room)
                label = flat[first[idx] + off]
            neg = all_items if full else torch.multinomial(q, cfg.neg, replacement=True)
            sides = (side_t[ids], side_t[label], side_t[neg])
            if cfg.unknown_rate > 0:  # these items, wherever they occur in the step, as cold-start items
                unknown = torch.rand(n_items, device=dev) < cfg.unknown_rate
                unknown[:2] = False
                ids, label, neg = (torch.where(unknown[x], x + n_items, x) for x in (ids, label, neg))
            args = (ids, sides[0], prof_t[rows], label, sides[1], neg, sides[2], log_q)
            kw = {**extra, "times": times}
            loss = step(*args, **kw) if step is not None else model.loss(*args, **kw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(idx)
            seen += len(idx)
            steps += 1
        train_seconds += time.perf_counter() - t0
        loss_sum, n_examples = _all_reduce([float(total), float(len(order))], d)
        epoch_loss = loss_sum / max(n_examples, 1.0)
        metrics = _validate(model, inter, valid_cases, d)
        score = metrics[cfg.select_metric]
        history.append(
            {"epoch": epoch, "loss": epoch_loss, **{k: metrics[k] for k in ("recall@50", "hr@50")}}
        )
        if d.main:
            log.info("epoch %d loss %.4f valid %s %.4f", epoch, epoch_loss, cfg.select_metric, score)
        if progress:
            tqdm.write(f"epoch {epoch}: loss {epoch_loss:.4f}  valid {cfg.select_metric} {score:.4f}")
        if score > best:  # every rank sees the same pooled score, so all take the same branch
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_valid = metrics
            if ckpt is not None and d.main:
                save_checkpoint(ckpt, model, inter, cfg, extra={"epoch": epoch, "valid": metrics})
        else:
            bad += 1
        # the wall clock differs per rank: stop when any rank is over budget, all at the same epoch
        over = cfg.max_seconds > 0 and time.perf_counter() - start > cfg.max_seconds
        (late,) = _all_reduce([float(over)], d, "max")
        if bad >= cfg.patience or late:
            stopped_by = "convergence" if bad >= cfg.patience else "budget"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu")  # callers save, export and evaluate on the CPU; a no-op for a CPU run
    replicas = [state_checksum(model)]
    if d.active:
        replicas = [""] * d.world
        tdist.all_gather_object(replicas, state_checksum(model))
        if len(set(replicas)) != 1:
            raise RuntimeError(f"DDP replicas diverged (parameter checksum per rank: {replicas})")
    seen_all, train_seconds_max = (
        _all_reduce([float(seen)], d)[0],
        _all_reduce([train_seconds], d, "max")[0],
    )
    return TrainResult(
        epochs_run=epoch,
        best_epoch=best_epoch,
        best_valid=best_valid if best_state is not None else {},
        samples_per_s=seen_all / max(train_seconds_max, 1e-9),
        seconds=time.perf_counter() - start,
        history=history,
        steps=steps,
        replicas=replicas,
        stopped_by=stopped_by,
    )


def save_checkpoint(
    path: Path, model: MIND, inter: Interactions, cfg: TrainConfig | None, extra: dict | None = None
):
    """Weights, config, id mappings and feature tables: everything export and serving need."""
    side_t, prof_t = feature_tables(inter)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "model_config": model.cfg.to_dict(),
        "train_config": asdict(cfg) if cfg is not None else None,
        "state_dict": model.state_dict(),
        "dataset": inter.name,
        "items": inter.items.raw,
        "vocab_hash": inter.items.digest(),
        "side_vocab": inter.side_vocab.raw if inter.side_vocab else None,
        "profile_vocab": inter.profile_vocab.raw if inter.profile_vocab else None,
        "item_side": side_t,
        "users": inter.users,
        "user_profile": prof_t,
        **(extra or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(path: Path) -> tuple[MIND, dict]:
    """The model (in eval mode) and the checkpoint's metadata."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    model = MIND(MINDConfig(**payload["model_config"]))
    state = payload["state_dict"]
    # a checkpoint saved before the behaviour-time tables existed: they are never read when off, so zeros
    # stand in (deterministic: every load of the checkpoint is the same model)
    for name in model.unread_tables():
        if f"{name}.weight" not in state:
            state[f"{name}.weight"] = torch.zeros_like(getattr(model, name).weight)
    model.load_state_dict(state)
    model.eval()
    payload["item_vocab"] = Vocab(list(payload["items"]))
    return model, payload
