"""The offline comparison: MostPopular, item-CF, YouTube DNN, MIND-1 and MIND in one harness.

Every model is trained on the training users, stopped early on the validation users and
scored once on the test users, under the ComiRec protocol (primary) and the MIND paper's
one-random-target protocol (secondary).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import orjson
import torch

from mind.baselines import ItemCF, MostPopular
from mind.dataset import Interactions
from mind.evaluate import evaluate_ranked, plot_metric_vs_n
from mind.model import MIND
from mind.split import Split, comirec_split, mind_paper_split, train_sequences
from mind.train import TrainConfig, model_config_for, recommend, save_checkpoint, train

log = logging.getLogger(__name__)

NS = (10, 20, 50, 100)
LEARNED = {
    "youtube_dnn": {"K": 1, "pooling": "mean"},
    "mind_1": {"K": 1},
    "mind": {},
}


def write_json(out: Path, obj: dict) -> Path:
    """A report or benchmark result as indented JSON (numpy values allowed), creating its folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return out


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads() if torch.get_num_threads() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_offline(
    inter: Interactions,
    out: Path | None = None,
    models: tuple[str, ...] = ("mostpop", "itemcf", "youtube_dnn", "mind_1", "mind"),
    model_overrides: dict | None = None,
    train_cfg: TrainConfig | None = None,
    checkpoint_dir: Path | None = None,
    seed: int = 1230,
    progress: bool = True,
) -> dict:
    """Train and evaluate every requested model; returns (and writes) the report dict."""
    t_start = time.perf_counter()
    train_cfg = train_cfg or TrainConfig()
    split = comirec_split(inter, seed=seed)
    paper = mind_paper_split(inter, seed=seed)
    train_seqs = train_sequences(inter, split)
    report: dict = {
        "protocol": "comirec",
        "dataset": inter.name,
        "users": {"train": len(split.train_users), "valid": len(split.valid), "test": len(split.test)},
        "items": inter.n_items - 2,
        "interactions": inter.n_interactions,
        "models": {},
        "secondary": {"protocol": "mind_paper", "models": {}},
        "train": {},
        "config": {"train": asdict(train_cfg), "models": {}, "split_seed": seed},
        "machine": machine(),
    }
    for name in models:
        if name == "mostpop":
            rec = MostPopular(train_seqs, inter.n_items).recommend
        elif name == "itemcf":
            rec = ItemCF(train_seqs, inter.n_items).recommend
        elif name in LEARNED:
            model = _train_model(
                name, inter, split, train_cfg, model_overrides, checkpoint_dir, report, progress
            )

            def rec(cases, n, model=model):
                return recommend(model, inter, cases, n)
        else:
            raise ValueError(f"unknown model {name!r}: choose from mostpop, itemcf, {', '.join(LEARNED)}")
        t0 = time.perf_counter()  # evaluation time only; training time is in report["train"]
        report["models"][name] = evaluate_ranked(rec(split.test, max(NS)), split.test, NS)
        report["secondary"]["models"][name] = {
            k: v
            for k, v in evaluate_ranked(rec(paper.test, max(NS)), paper.test, NS).items()
            if k.startswith("hr@")
        }
        report["train"].setdefault(name, {})["eval_seconds"] = round(time.perf_counter() - t0, 2)
        m = report["models"][name]
        log.info("%s: recall@50 %.4f hr@50 %.4f", name, m["recall@50"], m["hr@50"])
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    if out is not None:
        write_report(report, Path(out))
    return report


def _train_model(
    name: str,
    inter: Interactions,
    split: Split,
    train_cfg: TrainConfig,
    overrides: dict | None,
    checkpoint_dir: Path | None,
    report: dict,
    progress: bool,
) -> MIND:
    cfg = model_config_for(inter, **{**(overrides or {}), **LEARNED[name]})
    report["config"]["models"][name] = cfg.to_dict()
    torch.manual_seed(train_cfg.seed)
    model = MIND(cfg)
    ckpt = Path(checkpoint_dir) / f"{name}.pt" if checkpoint_dir else None
    if progress:
        print(f"training {name} (K={cfg.K}, d={cfg.d}, pooling={cfg.pooling}, L={cfg.max_len})", flush=True)
    res = train(
        model, inter, np.asarray(split.train_users), split.valid, train_cfg, ckpt=ckpt, progress=progress
    )
    if ckpt is not None:
        save_checkpoint(
            ckpt, model, inter, train_cfg, extra={"epoch": res.best_epoch, "valid": res.best_valid}
        )
    report["train"][name] = {
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "valid_recall@50": round(res.best_valid.get("recall@50", float("nan")), 5),
        "samples_per_s": round(res.samples_per_s, 1),
        "train_seconds": round(res.seconds, 1),
    }
    return model


def write_report(report: dict, out: Path) -> None:
    """JSON report plus a metric-vs-N plot beside it (same stem, .png)."""
    write_json(out, report)
    plot_metric_vs_n(report["models"], out.with_suffix(".png"), metric="recall")


def table(report: dict, ns: tuple[int, ...] = (20, 50)) -> str:
    """A plain-text result table (the one `mind evaluate` prints)."""
    cols = [f"{m}@{n}" for n in ns for m in ("recall", "hr", "ndcg")]
    lines = [f"{'model':<12}" + "".join(f"{c:>11}" for c in cols)]
    for name, m in report["models"].items():
        lines.append(f"{name:<12}" + "".join(f"{m.get(c, float('nan')):>11.4f}" for c in cols))
    return "\n".join(lines)


def markdown_table(report: dict, ns: tuple[int, ...] = (20, 50)) -> str:
    """The README's table for one report: recall/HR/NDCG at each N, best learned value in bold."""
    cols = [f"{m}@{n}" for n in ns for m in ("recall", "hr", "ndcg")]
    best = {c: max(m[c] for m in report["models"].values()) for c in cols}
    head = "| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols)
    rows = []
    for name, m in report["models"].items():
        cells = [f"**{m[c]:.4f}**" if m[c] == best[c] else f"{m[c]:.4f}" for c in cols]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)
