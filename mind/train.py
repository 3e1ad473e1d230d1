"""Training and offline retrieval for MIND (and YouTube DNN / MIND-1, which are MIND configs).

Every (history, next item) pair of the training users is one example; the validation users pick
the best epoch (early stopping), so the test users are never looked at while training.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mind.dataset import Interactions, Vocab, pad_windows
from mind.model import MIND, MINDConfig
from mind.retrieval import exact_topn, merge_interests

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30  # upper bound; early stopping on the validation users usually ends sooner
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    neg: int = 1000  # shared sampled negatives per batch
    neg_sampler: str = "popularity"  # "popularity" (count^0.75, log-Q corrected) or "uniform"
    patience: int = 3  # epochs without validation gain before stopping
    select_metric: str = "recall@50"
    max_seconds: float = 600.0  # wall-clock budget for one model
    seed: int = 42
    threads: int = 0  # torch threads; 0 = torch's default


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_valid: dict
    samples_per_s: float
    seconds: float
    history: list[dict] = field(default_factory=list)


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


def model_config_for(inter: Interactions, **overrides) -> MINDConfig:
    """A MINDConfig that fits the data set: vocabulary sizes from the data, window from its lengths."""
    side_t, prof_t = feature_tables(inter)
    lengths = np.array([len(s) for s in inter.sequences])
    max_len = int(min(50, max(10, np.percentile(lengths, 90)))) if len(lengths) else 20
    cfg = dict(
        n_items=inter.n_items,
        n_side=max(inter.n_side, int(side_t.max()) + 1),
        n_profile=max(inter.n_profile, int(prof_t.max()) + 1),
        n_profile_fields=prof_t.shape[1],
        max_len=max_len,
    )
    cfg.update(overrides)
    return MINDConfig(**cfg)


def training_examples(
    sequences: list[np.ndarray], users: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every next-item prediction of the training users: windows [N,L], targets [N], user rows [N]."""
    hists, targets, rows = [], [], []
    for u in users:
        s = sequences[u]
        for t in range(1, len(s)):
            hists.append(s[max(0, t - max_len) : t])
            targets.append(s[t])
            rows.append(u)
    return pad_windows(hists, max_len), np.asarray(targets, dtype=np.int64), np.asarray(rows, dtype=np.int64)


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
    model: MIND, inter: Interactions, histories: list[np.ndarray], users: np.ndarray, batch: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The user tower in process: interest vectors [B,K,d] and active mask [B,K] for histories."""
    side_t, prof_t = feature_tables(inter)
    model.eval()
    Vs, actives = [], []
    for i in range(0, len(histories), batch):
        ids = torch.as_tensor(pad_windows(histories[i : i + batch], model.cfg.max_len))
        V, active = model(ids, side_t[ids], prof_t[torch.as_tensor(users[i : i + batch])])
        Vs.append(V)
        actives.append(active)
    return torch.cat(Vs), torch.cat(actives)


@torch.no_grad()
def recommend(model: MIND, inter: Interactions, cases: list, n: int) -> np.ndarray:
    """Offline retrieval exactly as served: per-interest exact top-n, merged by max score (Eq. 3)."""
    side_t, _ = feature_tables(inter)
    items = model.item_vectors(side_t)  # [M,d]
    V, active = encode(model, inter, [c.history for c in cases], np.array([c.user for c in cases]))
    ids, scores = exact_topn(V, active, items, n)  # [B,K,n]
    merged, _, _ = merge_interests(ids, scores, n)
    return np.asarray(merged)


def train(
    model: MIND,
    inter: Interactions,
    train_users: np.ndarray,
    valid_cases: list,
    cfg: TrainConfig,
    ckpt: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Adam on the sampled softmax; keeps the weights of the best validation epoch."""
    from mind.evaluate import evaluate_ranked

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    side_t, prof_t = feature_tables(inter)
    H, T, U = training_examples(inter.sequences, np.asarray(train_users), model.cfg.max_len)
    H_t, T_t, U_t = torch.as_tensor(H), torch.as_tensor(T), torch.as_tensor(U)
    q = negative_distribution(inter.sequences, np.asarray(train_users), inter.n_items, cfg.neg_sampler)
    log_q = torch.log(q.clamp(min=1e-12) * cfg.neg) if cfg.neg_sampler != "uniform" else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    best, best_epoch, best_state, history = -math.inf, -1, None, []
    start, seen, bad = time.perf_counter(), 0, 0
    train_seconds = 0.0
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.as_tensor(rng.permutation(len(T)))
        t0, total = time.perf_counter(), 0.0
        bar = tqdm(
            range(0, len(order), cfg.batch_size),
            desc=f"epoch {epoch}",
            disable=None if progress else True,
            leave=False,
        )
        for i in bar:
            idx = order[i : i + cfg.batch_size]
            ids, label, rows = H_t[idx], T_t[idx], U_t[idx]
            neg = torch.multinomial(q, cfg.neg, replacement=True)
            loss = model.loss(ids, side_t[ids], prof_t[rows], label, side_t[label], neg, side_t[neg], log_q)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        train_seconds += time.perf_counter() - t0
        metrics = evaluate_ranked(recommend(model, inter, valid_cases, 100), valid_cases)
        score = metrics[cfg.select_metric]
        history.append(
            {"epoch": epoch, "loss": total / len(T), **{k: metrics[k] for k in ("recall@50", "hr@50")}}
        )
        log.info("epoch %d loss %.4f valid %s %.4f", epoch, total / len(T), cfg.select_metric, score)
        if progress:
            tqdm.write(f"epoch {epoch}: loss {total / len(T):.4f}  valid {cfg.select_metric} {score:.4f}")
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_valid = metrics
            if ckpt is not None:
                save_checkpoint(ckpt, model, inter, cfg, extra={"epoch": epoch, "valid": metrics})
        else:
            bad += 1
        if bad >= cfg.patience or time.perf_counter() - start > cfg.max_seconds:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(
        epochs_run=epoch,
        best_epoch=best_epoch,
        best_valid=best_valid if best_state is not None else {},
        samples_per_s=seen / max(train_seconds, 1e-9),
        seconds=time.perf_counter() - start,
        history=history,
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
    model.load_state_dict(payload["state_dict"])
    model.eval()
    payload["item_vocab"] = Vocab(list(payload["items"]))
    return model, payload
