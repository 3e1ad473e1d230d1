"""Cold start, measured: items held out of training and fed through the catalogue path, three ways.

`mind bench coldstart --data ../shared/data/<set>` (or `python -m harness.coldstart`):

1. hold out 10 % of the items: where the data has timestamps (MovieLens) the ones that first appear
   latest, else (Beauty) a seeded random 10 %;
2. train MIND (the project's defaults, early-stopped on the validation users) on the data WITHOUT them:
   they are dropped from every sequence and from the vocabulary;
3. feed them through the catalogue path: catalogue records (raw item id, raw side ids) -> global ids
   beyond the trained vocabulary -> the served model's view (stream.catalogue.VersionView), exactly what
   the worker, the feed and the roll build;
4. score the ComiRec test users (full sequences: their histories and targets hold the held-out items) in
   three ways:
     unknown   today: a held-out item in a history is the unknown item (index 1, no side ids) and
               is never a candidate (it is not in Milvus);
     cold      the catalogue path: held-out items enter the tower with their side ids and are
               candidates, embedded from their side ids alone (the id part is the unknown item's);
     retrained a model trained on all items (same split, same defaults): the ceiling.
   Tower inputs come from the worker's own code (Catalog / VersionView.tower_inputs), user vectors from
   the model in process (the Triton tower is checked equal to it in tests/stream/test_catalogue.py), and
   the top-N is exact per interest merged by max score (Milvus FLAT is exact), as `mind evaluate` scores.

Two figures, each three ways: recall@50 on the held-out items as targets (the users with at least one
held-out target; their other targets are left out), and overall recall@50 of the test users whose
histories hold held-out items (what the items' side ids do to those users' interests).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mind.dataset import OOV, Interactions, Vocab
from mind.experiment import machine, write_json
from mind.loaders import filter_kcore, load
from mind.metrics import per_user_metrics
from mind.model import MIND
from mind.retrieval import exact_topn, merge_interests
from mind.split import EvalCase, comirec_split
from mind.train import TrainConfig, load_checkpoint, model_config_for, save_checkpoint, train
from stream.catalogue import ColdTables, ItemSpace, VersionView
from stream.schemas import CatalogRecord
from stream.window import Catalog, load_catalog

NS = (20, 50, 100)
WAYS = ("unknown", "cold", "retrained")


@dataclass
class ColdstartConfig:
    """What one run measures; the defaults: 10 % of the items, ComiRec split seed 1230."""

    holdout: str = "auto"  # "latest" (first appearance, needs timestamps), "random", or "auto"
    fraction: float = 0.1
    seed: int = 1230  # the ComiRec split seed, and the random hold-out's seed
    budget_s: float = 600.0  # training budget per model (TrainConfig.max_seconds, the default)
    threads: int = 1
    batch: int = 512  # test users per tower call
    epochs: int = TrainConfig.epochs  # upper bound; early stopping on the validation users ends sooner
    # > 0: also a model trained for cold start (TrainConfig.unknown_rate), scored both ways; 0.1 by default,
    # the share of new items held out (chosen before looking at any result, not tuned on the test users)
    unknown_rate: float = 0.1


# ---- the data ---------------------------------------------------------------------------------------------


def holdout_items(inter: Interactions, how: str, fraction: float, seed: int) -> tuple[list[int], str]:
    """Item indices to hold out and the rule used. "latest": the items whose first interaction is latest
    (needs timestamps); "random": a seeded random sample; "auto": latest when there are timestamps."""
    items = np.arange(inter.items.reserved, inter.n_items)
    k = int(round(fraction * len(items)))
    if how == "auto":
        how = "latest" if inter.timestamps is not None else "random"
    if how == "latest":
        if inter.timestamps is None:
            raise ValueError(f"{inter.name} has no timestamps: use --holdout random")
        first = np.full(inter.n_items, np.inf)
        for seq, ts in zip(inter.sequences, inter.timestamps, strict=True):
            np.minimum.at(first, seq, np.asarray(ts, dtype=np.float64))
        order = items[np.argsort(first[items], kind="stable")]  # earliest first; ties by index
        return [int(i) for i in order[len(order) - k :]], how
    if how == "random":
        g = np.random.default_rng(seed)
        return [int(i) for i in np.sort(g.choice(items, size=k, replace=False))], how
    raise ValueError(f"holdout must be latest, random or auto, got {how!r}")


def without_items(inter: Interactions, held: Sequence[int]) -> Interactions:
    """The data set with `held` removed from every sequence and from the vocabulary (same users, same
    order, so that the ComiRec split puts every user on the same side)."""
    drop = np.zeros(inter.n_items, dtype=bool)
    drop[np.asarray(held, dtype=np.int64)] = True
    keep = np.flatnonzero(~drop[inter.items.reserved :]) + inter.items.reserved
    new = np.zeros(inter.n_items, dtype=np.int64)
    new[keep] = np.arange(len(keep)) + inter.items.reserved
    seqs, stamps = [], [] if inter.timestamps is not None else None
    for u, s in enumerate(inter.sequences):
        m = ~drop[s]
        seqs.append(new[s[m]])
        if stamps is not None:
            stamps.append(np.asarray(inter.timestamps[u])[m])  # type: ignore[index]
    return Interactions(
        name=f"{inter.name}-without-{len(held)}",
        users=list(inter.users),
        sequences=seqs,
        items=Vocab([inter.items.raw_of(int(i)) for i in keep], reserved=inter.items.reserved),
        item_side=np.concatenate([inter.item_side[: inter.items.reserved], inter.item_side[keep]]),
        n_side=inter.n_side,
        user_profile=inter.user_profile,
        n_profile=inter.n_profile,
        timestamps=stamps,
        side_vocab=inter.side_vocab,
        profile_vocab=inter.profile_vocab,
    )


def catalogue_records(inter: Interactions, held: Sequence[int]) -> list[CatalogRecord]:
    """What a catalogue would publish for the held-out items: raw id and raw side ids."""
    names = inter.side_vocab.raw if inter.side_vocab is not None else []
    out = []
    for i in held:
        sides = tuple(names[s - 1] for s in inter.item_side[i] if 0 < s <= len(names))
        out.append(CatalogRecord(inter.items.raw_of(int(i)), sides))
    return out


def train_config(cfg: ColdstartConfig, unknown_rate: float = 0.0) -> TrainConfig:
    """The project's training defaults, with this run's budget, threads and epoch bound."""
    return TrainConfig(
        max_seconds=cfg.budget_s, threads=cfg.threads, epochs=cfg.epochs, unknown_rate=unknown_rate
    )


# ---- training (or reuse of a checkpoint trained on the same data) ---------------------------------------


def trained(
    inter: Interactions,
    path: Path,
    max_len: int,
    cfg: ColdstartConfig,
    progress: bool,
    unknown_rate: float = 0.0,
) -> tuple[MIND, dict[str, Any]]:
    """The model for `inter`: the checkpoint at `path` if it was trained on this vocabulary, else a fresh
    training with the project's defaults (early-stopped on the validation users) saved there."""
    if path.is_file():
        model, meta = load_checkpoint(path)
        same = (meta.get("train_config") or {}).get("unknown_rate", 0.0) == unknown_rate
        if same and meta["vocab_hash"] == inter.items.digest() and meta.get("coldstart_seed") == cfg.seed:
            return model, {**meta.get("coldstart_train", {}), "reused": str(path)}
    split = comirec_split(inter, seed=cfg.seed)
    torch.manual_seed(TrainConfig().seed)
    model = MIND(model_config_for(inter, max_len=max_len))
    tcfg = train_config(cfg, unknown_rate)
    if progress:
        print(
            f"training on {inter.name}: {inter.n_items - 2} items, {len(split.train_users)} users", flush=True
        )
    res = train(model, inter, np.asarray(split.train_users), split.valid, tcfg, progress=progress)
    info = {
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "valid_recall@50": round(res.best_valid.get("recall@50", float("nan")), 5),
        "train_seconds": round(res.seconds, 1),
        "items": inter.n_items - 2,
    }
    save_checkpoint(path, model, inter, tcfg, extra={"coldstart_seed": cfg.seed, "coldstart_train": info})
    return model, info


# ---- scoring --------------------------------------------------------------------------------------------


def _rank(
    model: MIND,
    windows: list[np.ndarray],
    users: list[str],
    build: Any,
    item_vectors: torch.Tensor,
    exclude: torch.Tensor | None,
    n: int,
    batch: int,
    desc: str,
) -> np.ndarray:
    """Top-n served ids per window: tower inputs from `build` (a Catalog or VersionView, the worker's
    code), the model in process, exact per-interest top-n merged by max score."""
    out = np.full((len(windows), n), -1, dtype=np.int64)
    model.eval()
    for s in tqdm(range(0, len(windows), batch), desc=desc, unit="batch", leave=False, disable=None):
        w, u = windows[s : s + batch], users[s : s + batch]
        prof = [build.profile_row(x, ()) for x in u]
        items, side, p = build.tower_inputs(w, prof, model.cfg.max_len)
        with torch.inference_mode():
            V, active = model(torch.as_tensor(items), torch.as_tensor(side), torch.as_tensor(p))
        ids, scores = exact_topn(V, active, item_vectors, n, exclude=exclude)
        merged, _, _ = merge_interests(ids, scores, n)
        out[s : s + len(w)] = np.asarray(merged)
    return out


def _to_full(ranked: np.ndarray, raw_of: Any, full: Vocab) -> np.ndarray:
    """Served ids -> the full data set's item indices (through raw ids), -1 kept."""
    cache: dict[int, int] = {}

    def one(i: int) -> int:
        if i < 0:
            return -1
        if i not in cache:
            raw = raw_of(i)
            cache[i] = -1 if raw is None else full.get(raw, -1)
        return cache[i]

    return np.vectorize(one, otypes=[np.int64])(ranked) if ranked.size else ranked


def _mean_se(x: np.ndarray) -> dict[str, float]:
    n = len(x)
    return {
        "mean": float(x.mean()) if n else 0.0,
        "se": float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
    }


def score(
    ranked: dict[str, np.ndarray], cases: list[EvalCase], held: set[int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two figures (and the whole test set for context), three ways, with paired differences."""
    held_targets = [np.asarray([t for t in c.targets if int(t) in held], dtype=np.int64) for c in cases]
    a = [k for k, t in enumerate(held_targets) if len(t)]  # users with a held-out target
    b = [k for k, c in enumerate(cases) if any(int(i) in held for i in c.history)]  # ... in their history
    figures: dict[str, Any] = {
        "heldout_targets": {"users": len(a), "targets": int(sum(len(held_targets[k]) for k in a))},
        "affected_users": {"users": len(b)},
        "all_test_users": {"users": len(cases)},
    }
    per: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for way, r in ranked.items():
        per[way] = {
            "heldout_targets": per_user_metrics(r[a], [held_targets[k] for k in a], NS),
            "affected_users": per_user_metrics(r[b], [cases[k].targets for k in b], NS),
            "all_test_users": per_user_metrics(r, [c.targets for c in cases], NS),
        }
        for fig, m in per[way].items():
            figures[fig][way] = {k: float(v.mean()) if v.size else 0.0 for k, v in m.items()}
    paired: dict[str, Any] = {}
    for fig in ("heldout_targets", "affected_users"):
        x = {w: per[w][fig]["recall@50"] for w in per}
        paired[fig] = {
            "cold - unknown": _mean_se(x["cold"] - x["unknown"]),
            "retrained - cold": _mean_se(x["retrained"] - x["cold"]),
        }
        if "cold_start_trained" in x:
            paired[fig]["cold_start_trained - unknown"] = _mean_se(x["cold_start_trained"] - x["unknown"])
            paired[fig]["cold_start_trained - unknown_cold_start_trained"] = _mean_se(
                x["cold_start_trained"] - x["unknown_cold_start_trained"]
            )
    return figures, paired


# ---- the run --------------------------------------------------------------------------------------------


def run(
    data: str | Path | Interactions,
    out: str | Path | None = None,
    cfg: ColdstartConfig | None = None,
    checkpoints: str | Path = "runs/coldstart",
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Hold out, train both models (or reuse their checkpoints), score three ways; returns (and writes) the
    report."""
    cfg = cfg or ColdstartConfig()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # what `mind evaluate --data` trains on (an Interactions in hand is taken as it is)
    full = data if isinstance(data, Interactions) else filter_kcore(load(data))
    held, rule = holdout_items(full, cfg.holdout, cfg.fraction, cfg.seed)
    base = without_items(full, held)
    split = comirec_split(full, seed=cfg.seed)
    if not np.array_equal(comirec_split(base, seed=cfg.seed).train_users, split.train_users):
        raise RuntimeError("holding items out moved users between train and test: the split must be the same")
    max_len = model_config_for(full).max_len  # one window length for both models
    ck = Path(checkpoints) / full.name
    log(f"{full.name}: {full.n_items - 2} items, {len(held)} held out ({rule}); training without them")
    t0 = time.perf_counter()
    model_b, info_b = trained(base, ck / "without_heldout.pt", max_len, cfg, progress)
    log(f"trained without the held-out items in {time.perf_counter() - t0:.0f} s; now the ceiling, with them")
    t1 = time.perf_counter()
    model_f, info_f = trained(full, ck / "retrained.pt", max_len, cfg, progress)
    infos = {"without_heldout": info_b, "retrained": info_f}
    seconds = {
        "train_without_heldout": round(t1 - t0, 1),
        "train_retrained": round(time.perf_counter() - t1, 1),
    }
    model_u = None
    if cfg.unknown_rate > 0:
        t3 = time.perf_counter()
        log(f"and without them, trained for cold start (unknown_rate {cfg.unknown_rate:g})")
        path_u = ck / f"without_heldout_unknown{cfg.unknown_rate:g}.pt"
        model_u, infos["cold_start_trained"] = trained(base, path_u, max_len, cfg, progress, cfg.unknown_rate)
        seconds["train_cold_start_trained"] = round(time.perf_counter() - t3, 1)

    # the catalogue path: records -> global ids beyond the trained vocabulary -> the served model's view
    t2 = time.perf_counter()
    base_cat: Catalog = load_catalog(ck / "without_heldout.pt")
    full_cat: Catalog = load_catalog(ck / "retrained.pt")
    records = catalogue_records(full, held)
    sides = {r.item_id: r.side_ids for r in records}
    space = ItemSpace(base_cat.items, [r.item_id for r in records])
    view = VersionView(base_cat, space, lambda raws: {r: sides[r] for r in raws if r in sides})
    cold_ids = view.cold_of(sides)
    vec_cold = torch.as_tensor(model_b.item_vectors(torch.as_tensor(view.side_table())))  # the roll's path
    feed = ColdTables.from_model(model_b, "eval", base_cat.vocab_hash).vectors(view.side_rows(cold_ids))
    feed_diff = float(np.abs(feed - vec_cold[cold_ids].numpy()).max()) if cold_ids else 0.0
    blank = torch.zeros(view.n_served, dtype=torch.bool)
    blank[sorted(view.blank)] = True

    cases = split.test
    users = [full.users[c.user] for c in cases]
    raw_hist = [[full.items.raw_of(int(i)) for i in c.history] for c in cases]
    w_unknown = [np.asarray([base_cat.items.get(r, OOV) for r in h], dtype=np.int64) for h in raw_hist]
    w_global = [np.asarray([space.index(r) for r in h], dtype=np.int64) for h in raw_hist]
    w_full = [np.asarray(c.history, dtype=np.int64) for c in cases]
    n = max(NS)

    def plain(model: MIND, cat: Catalog, windows: list[np.ndarray], desc: str) -> np.ndarray:
        """Served by its own vocabulary only: held-out items are unknown (or, retrained, trained)."""
        vec = torch.as_tensor(model.item_vectors(torch.as_tensor(cat.item_side)))
        got = _rank(model, windows, users, cat, vec, None, n, cfg.batch, desc)
        return _to_full(got, lambda i: cat.raw_item(i) if i >= 2 else None, full.items)

    def cold(model: MIND, desc: str) -> np.ndarray:
        """The catalogue path: held-out items in histories and among the candidates from their side ids."""
        vec = torch.as_tensor(model.item_vectors(torch.as_tensor(view.side_table())))
        got = _rank(model, w_global, users, view, vec, blank, n, cfg.batch, desc)
        return _to_full(got, view.raw_item, full.items)

    ranked = {"unknown": plain(model_b, base_cat, w_unknown, "unknown"), "cold": cold(model_b, "cold")}
    if model_u is not None:  # the same two ways with the model trained for cold start
        ranked["unknown_cold_start_trained"] = plain(model_u, base_cat, w_unknown, "unknown, trained for it")
        ranked["cold_start_trained"] = cold(model_u, "cold, trained for it")
    ranked["retrained"] = plain(model_f, full_cat, w_full, "retrained")
    figures, paired = score(ranked, cases, set(held))
    t_eval = time.perf_counter() - t2
    report: dict[str, Any] = {
        "dataset": full.name,
        "protocol": "comirec",
        "items": full.n_items - 2,
        "heldout": {
            "rule": rule,
            "fraction": cfg.fraction,
            "items": len(held),
            "with_known_side_ids": len(cold_ids) - len(view.blank),
            "interactions": int(sum(np.isin(s, held).sum() for s in full.sequences)),
        },
        "users": {"train": len(split.train_users), "valid": len(split.valid), "test": len(cases)},
        "figures": figures,
        "paired_recall@50": paired,
        "feed_equals_roll_max_abs_diff": feed_diff,
        "train": infos,
        "seconds": {**seconds, "score": round(t_eval, 1), "total": round(time.perf_counter() - t_start, 1)},
        "config": {**asdict(cfg), "train": asdict(train_config(cfg))},
        "machine": machine(),
    }
    if out is not None:
        write_json(Path(out), report)
    return report


def table(report: dict[str, Any]) -> str:
    """A README-ready markdown table of one report: both figures, three ways."""
    f = report["figures"]
    h = report["heldout"]
    names = {
        "unknown": "unknown item (today)",
        "cold": "cold-start embedding",
        "unknown_cold_start_trained": "unknown item, model trained for cold start",
        "cold_start_trained": "cold-start embedding, model trained for cold start",
        "retrained": "retrained with them (ceiling)",
    }
    a, b = f["heldout_targets"], f["affected_users"]
    lines = [
        f"**{report['dataset']}**: {h['items']} of {report['items']} items held out ({h['rule']}), "
        f"{h['interactions']} interactions; {a['users']} test users with a held-out target, "
        f"{b['users']} with a held-out item in their history",
        "",
        "| items held out of training are | recall@50, held-out targets | recall@50, affected users "
        "| recall@50, all test users |",
        "|---|---:|---:|---:|",
    ]
    for way in [w for w in names if w in a]:
        lines.append(
            f"| {names[way]} | {a[way]['recall@50']:.4f} | {b[way]['recall@50']:.4f} "
            f"| {f['all_test_users'][way]['recall@50']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.coldstart", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--holdout", default="auto", choices=("auto", "latest", "random"))
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--budget", type=float, default=600.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoints", default="runs/coldstart")
    ap.add_argument("--unknown-rate", type=float, default=0.1)
    a = ap.parse_args(argv)
    cfg = ColdstartConfig(
        holdout=a.holdout,
        fraction=a.fraction,
        budget_s=a.budget,
        threads=a.threads,
        unknown_rate=a.unknown_rate,
    )
    rep = run(a.data, a.out, cfg, a.checkpoints)
    print(table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
