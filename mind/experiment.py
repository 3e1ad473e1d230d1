"""The offline comparison: MostPopular, item-CF, YouTube DNN, MIND-1 and MIND in one harness.

Every learned model is trained on the training users, stopped by convergence on the validation
users and scored once on the test users, under the ComiRec protocol (primary) and the MIND paper's
one-random-target protocol (secondary). Nothing looks at the test users before that final scoring:
the settings of each model come from rules over the training users (`rule_settings`) or from a small
search on the validation users (`tune`), and the lever ablation (`ablate`) scores validation users.

With several seeds each learned model is trained once per seed; the report gives mean +- standard
error over the seeds, and the paired difference of MIND against MIND-1 and YouTube DNN on the test
users (per-user metric averaged over the seeds) with a 95 % t-interval.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import torch

from mind.baselines import ItemCF, MostPopular
from mind.dataset import Interactions
from mind.evaluate import (
    evaluate_ranked,
    evaluate_ranked_per_user,
    mean_se,
    paired_difference,
    plot_metric_vs_n,
)
from mind.model import MIND, MINDConfig
from mind.split import Split, comirec_split, mind_paper_split, train_sequences
from mind.train import (
    TrainConfig,
    TrainResult,
    case_times,
    encode,
    model_config_for,
    recommend,
    save_checkpoint,
    train,
    window_rule,
    window_within_bounds,
)

log = logging.getLogger(__name__)

NS = (10, 20, 50, 100)
LEARNED = {
    "youtube_dnn": {"K": 1, "pooling": "mean"},
    "mind_1": {"K": 1},
    "mind": {},
}
# the paired comparisons every report carries: MIND-K against each other model
PAIRS = (("mind", "mind_1"), ("mind", "youtube_dnn"), ("mind", "itemcf"), ("mind", "mostpop"))
PAIRED_METRICS = ("recall@20", "hr@20", "recall@50", "hr@50")
NDCG_NOTE = (
    "ndcg@N is the standard NDCG (DCG of the hits by their rank in the list over the IDCG of "
    "min(|targets|, N) hits); ndcg_comirec@N is ComiRec's evaluate_full NDCG (hits discounted by "
    "their position in the target list, normalised by the hit count), reported only to compare "
    "with ComiRec's tables. Recall and HR are the headline metrics."
)


def write_json(out: Path, obj: dict) -> Path:
    """A report or benchmark result as indented JSON (numpy values allowed), creating its folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return out


def cpu_model() -> str:
    """The CPU's model name where the OS says it (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What trained a report's models. torch's CPU kernels differ by instruction set (`cpu_capability`),
    and the same seed trains different models on different kernels: single-seed figures from two hosts
    compare only within a run's spread, not digit for digit."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": torch.get_num_threads() if torch.get_num_threads() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ---- what each model trains with ---------------------------------------------------------------
@dataclass
class Settings:
    """One learned model's settings on one data set, and where each came from."""

    model: dict = field(default_factory=dict)  # MINDConfig overrides
    train: dict = field(default_factory=dict)  # TrainConfig overrides
    why: dict = field(default_factory=dict)  # setting -> "rule: ..." | "tune: ..." | "user"

    def merged(self, model: dict | None = None, train: dict | None = None) -> Settings:
        return Settings({**self.model, **(model or {})}, {**self.train, **(train or {})}, dict(self.why))


def rule_settings(inter: Interactions, split: Split, name: str) -> Settings:
    """The defaults, chosen per data set in code from the TRAINING users only.

    Window L: the 90th percentile of the training users' sequence lengths, within [10, 50]
    (model_config_for). Everything else is one default per model (DEFAULTS) that the lever ablation
    measured on every bundled data set (docs/quality.md).
    """
    s = Settings(dict(DEFAULTS[name]["model"]), dict(DEFAULTS[name]["train"]), {})
    cfg = model_config_for(inter, split.train_users, **{**s.model, **LEARNED[name]})
    s.why["max_len"] = f"rule: 90th percentile of training-user lengths in [10, 50] -> {cfg.max_len}"
    for k in s.model:
        s.why.setdefault(k, "default")
    for k in s.train:
        s.why.setdefault(k, "default")
    return s


# Per learned model. MIND-K scores by cosine / 0.1: its max-merge (Eq. 3) ranks items across interests, and
# raw inner products let the interest with the largest norm take the merge; cosine lifted MIND-K's
# validation recall@50 on all three bundled data sets. MIND-K also drops capsules (q = 0.3) in training:
# with K interests it fits the training users faster than a one-vector model and overfits small data sets;
# beside cosine, dropout lifted its validation recall@50 on all three. A one-vector model has no merge (a
# user vector's norm does not change its ranking), and cosine and dropout were mixed or worse for it, so it
# keeps the paper's inner products and no dropout. MIND-K also drops 40 % of a training window's behaviours
# (never the newest): the routing learns interests that survive a missing click, and over 2-5 seeds per set
# it lifted MIND-K's validation recall@50 on all three (Beauty +1.0 %, MovieLens-100K +3.9 %, LastFM +0.8 %);
# it did nothing for the one-vector models. Last, MIND-K's served max-merge leans to interest 0, the one
# seeded on the newest click (interest j's scores x 0.9^j): later seeds are each the behaviour farthest from
# the seeds so far and often outliers. Trained with it, validation recall@50 rose on all three over 2-4 seeds
# (Beauty +3.6 %, LastFM +7.5 %, MovieLens-100K +0.5 %); 0.8 was below 0.9 on LastFM. A one-vector model
# has one interest, so the lean cannot touch it. Where the data has user profiles, MIND-K's interests read the
# behaviours alone: the same p_u beside every capsule pulls a user's interests together, and leaving it out
# lifted MIND-K's validation recall@50 on MovieLens-100K, the bundled set with profiles, by 4.6 % over four
# seeds, while it cost YouTube DNN 1.1 % (four seeds) and MIND-1 2.6 % (two), so they keep it.
DEFAULTS: dict[str, dict[str, dict]] = {
    "youtube_dnn": {"model": {}, "train": {}},
    "mind_1": {"model": {}, "train": {}},
    "mind": {
        "model": {"temperature": 0.1, "dropout": 0.3, "merge_decay": 0.9, "profile": False},
        "train": {"behaviour_dropout": 0.4},
    },
}


def given(**options: object) -> dict:
    """The options a user actually gave (None = not given): what wins over rules and search."""
    return {k: v for k, v in options.items() if v is not None}


def build(inter: Interactions, split: Split, name: str, settings: Settings) -> tuple[MINDConfig, TrainConfig]:
    """The model and training configs of `name` under `settings` (the model's fixed shape wins)."""
    cfg = model_config_for(inter, split.train_users, **{**settings.model, **LEARNED[name]})
    return cfg, TrainConfig(**settings.train)


def fit(
    inter: Interactions,
    split: Split,
    name: str,
    settings: Settings,
    seed: int,
    ckpt: Path | None = None,
    progress: bool = True,
) -> tuple[MIND, TrainResult]:
    """Train one learned model with one seed; returns it at its best validation epoch."""
    cfg, tcfg = build(inter, split, name, settings)
    tcfg.seed = seed
    torch.manual_seed(seed)
    model = MIND(cfg)
    if progress:
        print(
            f"training {name} seed {seed} (K={cfg.K}, d={cfg.d}, L={cfg.max_len}, pooling={cfg.pooling}, "
            f"softmax={tcfg.softmax}, lr={tcfg.lr})",
            flush=True,
        )
    res = train(model, inter, np.asarray(split.train_users), split.valid, tcfg, ckpt=ckpt, progress=progress)
    if ckpt is not None:
        save_checkpoint(ckpt, model, inter, tcfg, extra={"epoch": res.best_epoch, "valid": res.best_valid})
    return model, res


def active_interests(model: MIND, inter: Interactions, cases: list) -> np.ndarray:
    """K'_u per case: the number of interests the tower actually used."""
    _, active = encode(
        model,
        inter,
        [c.history for c in cases],
        np.array([c.user for c in cases]),
        times=case_times(inter, cases),
    )
    return active.sum(-1).cpu().numpy()


def interests_reached(model: MIND, inter: Interactions, cases: list) -> dict[str, int]:
    """How many users got K' = 1, 2, ... active interests: the K that actually ran."""
    counts = np.bincount(active_interests(model, inter, cases), minlength=model.cfg.K + 1)
    return {str(k): int(counts[k]) for k in range(1, model.cfg.K + 1) if counts[k]}


def by_interests(k_test: np.ndarray, per_user: dict[str, dict[str, np.ndarray]], metric: str) -> dict:
    """Every model's `metric` on the test users grouped by MIND's K'_u: where multi-interest wins."""
    out = {}
    for k in np.unique(k_test).tolist():
        sel = k_test == k
        out[str(k)] = {
            "users": int(sel.sum()),
            **{m: float(v[metric][sel].mean()) for m, v in per_user.items()},
        }
    return out


# ---- the search on the validation users ------------------------------------------------------------
def search_space(inter: Interactions, split: Split, name: str) -> list[tuple[str, list[dict]]]:
    """Coordinate search: (setting, candidates) in the order they are tried, each candidate a patch.

    Window candidates are percentiles of the TRAINING users' lengths, and the rule's window halved and
    quartered: where every percentile passes the cap of 50 (long histories), the search still weighs a
    shorter, more recent window, which lifted every learned model on MovieLens-100K. K >= 2 for MIND-K.
    Last, the levers that won somewhere in the ablation: hard negatives, cosine scoring and capsule
    dropout for every learned model (or, where one is the model's default, inner products or no dropout),
    the routing regulariser, the covering routing init, behaviour dropout, recency ranks and the merge's
    lean to the newest interest (or the plain max, where the lean is the default) for MIND-K, and where the
    data has user profiles, the profile switched the other way from the model's default; or none of them.
    """
    lengths = np.array([len(inter.sequences[u]) for u in split.train_users.tolist()])
    rule = window_rule(lengths)
    lengths_at = [*np.percentile(lengths, (75, 90, 97)), rule / 2, rule / 4]
    windows = sorted({window_within_bounds(w) for w in lengths_at})
    space: list[tuple[str, list[dict]]] = [
        ("negatives", [{"train": {"softmax": "sampled", "neg": 1000}}, {"train": {"softmax": "full"}}]),
        ("lr", [{"train": {"lr": 1e-3}}, {"train": {"lr": 3e-3}}]),
        ("max_len", [{"model": {"max_len": w}} for w in windows]),
    ]
    if name == "mind":
        space.append(("K", [{"model": {"K": k}} for k in (2, 4, 8)]))
    # the levers that helped on some data set in the ablation (docs/quality.md), one at a time, or none
    levers: list[dict] = [
        {},
        {"train": {"hard_beta": 1.0}},
        {"model": {"temperature": 0.0 if DEFAULTS[name]["model"].get("temperature") else 0.1}},
        {"model": {"dropout": 0.0 if DEFAULTS[name]["model"].get("dropout") else 0.3}},
    ]
    if name == "mind":
        dropping = DEFAULTS[name]["train"].get("behaviour_dropout")
        levers += [
            {"train": {"rr": 100.0}},
            {"model": {"routing_init": "cover"}},
            {"train": {"behaviour_dropout": 0.0 if dropping else 0.4}},
            {"model": {"recency": 16}},
            {"model": {"merge_decay": 1.0 if DEFAULTS[name]["model"].get("merge_decay") else 0.9}},
        ]
    if inter.user_profile.shape[1] > 0:  # the profile, where the data has one: on or off, whichever is not
        levers.append({"model": {"profile": not DEFAULTS[name]["model"].get("profile", True)}})
    space.append(("lever", levers))
    return space


def valid_score(
    inter: Interactions, split: Split, name: str, settings: Settings, seed: int, progress: bool
) -> dict:
    """Train once and return the best validation metrics, the epoch and the K' reached (validation)."""
    t0 = time.perf_counter()
    model, res = fit(inter, split, name, settings, seed, progress=progress)
    return {
        "valid": {k: round(v, 5) for k, v in res.best_valid.items() if "comirec" not in k},
        "best_epoch": res.best_epoch,
        "epochs_run": res.epochs_run,
        "k_reached_valid": interests_reached(model, inter, split.valid),
        "max_len": model.cfg.max_len,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def tune(
    inter: Interactions,
    split: Split,
    name: str,
    start: Settings,
    seed: int,
    progress: bool = True,
    metric: str = "recall@50",
) -> tuple[Settings, list[dict]]:
    """Coordinate search on the validation users: for each setting in turn keep the best candidate."""
    best = start
    trials: list[dict] = []
    cache: dict[str, dict] = {}
    for setting, candidates in search_space(inter, split, name):
        scored = []
        for cand in candidates:
            s = best.merged(cand.get("model"), cand.get("train"))
            key = orjson.dumps({"m": s.model, "t": s.train}, option=orjson.OPT_SORT_KEYS).decode()
            if key not in cache:
                cache[key] = valid_score(inter, split, name, s, seed, progress)
                trials.append({"setting": setting, "candidate": cand, **cache[key]})
            scored.append((cache[key]["valid"][metric], s, cand))
        score, chosen, cand = max(scored, key=lambda x: x[0])
        best = chosen
        best.why[setting] = f"tune: {cand} (valid {metric} {score:.4f})"
        if progress:
            print(f"tune {name}: {setting} -> {cand} (valid {metric} {score:.4f})", flush=True)
    return best, trials


def tuned_file(root: Path, inter: Interactions) -> Path:
    """Where `--tune` keeps its choice for this data set. The name carries a digest of what the data set
    holds, so an edited file is not run with the settings another one was tuned on."""
    what = f"{inter.name}|{inter.n_items}|{inter.n_interactions}|{len(inter.sequences)}"
    return Path(root) / f"{inter.name}-{hashlib.sha256(what.encode()).hexdigest()[:12]}.json"


def save_tuned(path: Path, chosen: dict[str, Settings]) -> Path:
    """Record each model's chosen settings (merged into what the file already holds for other models)."""
    held = orjson.loads(path.read_bytes()) if path.exists() else {}
    for name, s in chosen.items():  # how many threads ran the search is the machine's, not the choice
        held[name] = {**asdict(s), "train": {k: v for k, v in s.train.items() if k != "threads"}}
    return write_json(path, held)


def load_tuned(path: Path) -> dict[str, Settings]:
    """The settings `--tune` chose for a data set, each source marked as read from `path`."""
    path = Path(path)
    return {
        name: Settings(s["model"], s["train"], {k: f"{v} [{path.name}]" for k, v in s["why"].items()})
        for name, s in orjson.loads(path.read_bytes()).items()
    }


def model_settings(
    inter: Interactions, split: Split, name: str, tuned_dir: Path | None = None
) -> tuple[Settings, Path | None]:
    """A model's settings before the user's flags, and the file they were read from: the choice `--tune`
    recorded for this data set in `tuned_dir` when there is one, else the rules (and None)."""
    path = tuned_file(tuned_dir, inter) if tuned_dir is not None else None
    chosen = load_tuned(path) if path is not None and path.exists() else {}
    if name in chosen:
        return chosen[name], path
    return rule_settings(inter, split, name), None


# ---- the lever ablation on the validation users ----------------------------------------------------
@dataclass
class Lever:
    """One ablation line: flip one setting of MIND-K's defaults to an alternative."""

    key: str  # short name for --levers
    lever: str  # what the README's table calls it
    variant: Callable[[Settings, MINDConfig, TrainConfig], tuple[str, dict]]  # -> (label, patch)
    applies: Callable[[Interactions, MINDConfig], bool] = lambda inter, cfg: True


def _flip(key: str, on: object, off: object, what: str, part: str = "train") -> Callable:
    """A lever that switches `key` between `on` and `off`, whichever the default is not."""

    def variant(s: Settings, cfg: MINDConfig, tcfg: TrainConfig) -> tuple[str, dict]:
        now = getattr(tcfg if part == "train" else cfg, key)
        new = off if now == on else on
        return f"{what} {key} = {new} (default {now})", {part: {key: new}}

    return variant


LEVERS: list[Lever] = [
    Lever(
        "window",
        "window L",
        lambda s, c, t: (f"L = 50 (default {c.max_len})", {"model": {"max_len": 50}}),
        lambda i, c: c.max_len < 50,
    ),
    Lever("dynamic_k", "K' reached", _flip("dynamic_k", True, False, "log2 rule:", "model")),
    Lever("K2", "K", lambda s, c, t: (f"K = 2 (default {c.K})", {"model": {"K": 2}}), lambda i, c: c.K != 2),
    Lever("K8", "K", lambda s, c, t: (f"K = 8 (default {c.K})", {"model": {"K": 8}}), lambda i, c: c.K != 8),
    Lever("init", "routing init", _flip("routing_init", "kmeans++", "random", "init:", "model")),
    Lever(
        "p",
        "attention p",
        lambda s, c, t: (f"p = 1 (default {c.p})", {"model": {"p": 1.0}}),
        lambda i, c: c.p != 1,
    ),
    Lever("softmax", "sampled vs full softmax", _flip("softmax", "sampled", "full", "softmax:")),
    Lever("ihn", "hard negatives (REMI IHN)", _flip("hard_beta", 0.0, 1.0, "beta:")),
    Lever("rr", "routing regulariser (REMI RR)", _flip("rr", 0.0, 0.01, "lambda:")),
    Lever(
        "time",
        "time gaps",
        _flip("time_buckets", 0, 32, "buckets:", "model"),
        lambda i, c: i.timestamps is not None,
    ),
    Lever("recency", "recency ranks", _flip("recency", 0, 16, "ranks:", "model")),
    Lever("cover", "routing init", _flip("routing_init", "kmeans++", "cover", "init:", "model")),
    Lever("iters", "routing iterations", lambda s, c, t: _iters(c)),
    Lever("center", "centred routing agreement", _flip("routing_center", False, True, "centre:", "model")),
    Lever(
        "bilinear",
        "shared vs per-interest S",
        _flip("bilinear", "shared", "per_interest", "bilinear:", "model"),
    ),
    Lever("cosine", "unit vectors + temperature", _flip("temperature", 0.0, 0.1, "temperature:", "model")),
    Lever("train_max", "training on the max over interests", _flip("train_max", False, True, "", "model")),
    Lever("horizon", "label horizon", lambda s, c, t: _horizon(t)),
    Lever("dropout", "capsule dropout", _flip("dropout", 0.0, 0.3, "dropout:", "model")),
    Lever("behaviour_dropout", "behaviour dropout", _flip("behaviour_dropout", 0.0, 0.4, "q:")),
    Lever("merge_decay", "merge leaning to interest 0", _flip("merge_decay", 1.0, 0.9, "decay:", "model")),
    Lever("global", "global context u_g", _flip("global_context", False, True, "global context:", "model")),
    Lever(
        "profile",
        "user profile p_u",
        _flip("profile", True, False, "profile:", "model"),
        lambda i, c: c.n_profile_fields > 0,
    ),
]


def _iters(c: MINDConfig) -> tuple[str, dict]:
    new = 3 if c.iters != 3 else 1
    return f"r = {new} (default {c.iters})", {"model": {"iters": new}}


def _horizon(t: TrainConfig) -> tuple[str, dict]:
    new = 1 if t.horizon != 1 else 1000
    return f"horizon = {new} (default {t.horizon})", {"train": {"horizon": new}}


def ablate(
    inter: Interactions,
    split: Split,
    base: Settings,
    seed: int,
    progress: bool = True,
    keys: tuple[str, ...] | None = None,
    base_score: dict | None = None,
) -> dict:
    """Train MIND-K with its defaults and with each lever flipped; validation metrics and deltas.

    keys: which levers (Lever.key; default all). base_score: the defaults' validation score when the
    caller already trained them with the same seed (run_offline does), else it is trained here.
    """
    out = {"base": base_score or valid_score(inter, split, "mind", base, seed, progress), "levers": []}
    b = out["base"]["valid"]
    cfg, tcfg = build(inter, split, "mind", base)
    for lv in LEVERS:
        if keys is not None and lv.key not in keys:
            continue
        label, patch = lv.variant(base, cfg, tcfg)
        row: dict = {"key": lv.key, "lever": lv.lever, "variant": label, "patch": patch}
        if not lv.applies(inter, cfg):
            out["levers"].append({**row, "applies": False})
            continue
        r = valid_score(
            inter, split, "mind", base.merged(patch.get("model"), patch.get("train")), seed, progress
        )
        r["delta"] = {k: round(r["valid"][k] - b[k], 5) for k in ("recall@50", "hr@50", "recall@20")}
        out["levers"].append({**row, "applies": True, **r})
        if progress:
            print(
                f"ablation {lv.lever} / {label}: delta recall@50 {r['delta']['recall@50']:+.4f}", flush=True
            )
    return out


# ---- the comparison on the test users ------------------------------------------------------------
def run_offline(
    inter: Interactions,
    out: Path | None = None,
    models: tuple[str, ...] = ("mostpop", "itemcf", "youtube_dnn", "mind_1", "mind"),
    model_overrides: dict | None = None,
    train_cfg: TrainConfig | None = None,
    checkpoint_dir: Path | None = None,
    seed: int = 1230,
    progress: bool = True,
    seeds: int = 1,
    train_overrides: dict | None = None,
    do_tune: bool = False,
    do_ablate: bool = False,
    levers: tuple[str, ...] | None = None,
    tuned_dir: Path | None = None,
) -> dict:
    """Train and evaluate every requested model; returns (and writes) the report dict.

    model_overrides / train_overrides: settings the user gave (they win over rules and search).
    train_cfg: a full TrainConfig (older callers); its fields that differ from TrainConfig() count as
    given by the user. seeds: learned models are trained with seeds train_seed, train_seed + 1, ...
    tuned_dir: where `--tune` records its choice per data set (`tuned_file`); without do_tune a model
    trains with the recorded choice when there is one, else with the rules.
    """
    t_start = time.perf_counter()
    given_train = dict(train_overrides or {})
    if train_cfg is not None:
        dflt = asdict(TrainConfig())
        given_train = {**{k: v for k, v in asdict(train_cfg).items() if v != dflt[k]}, **given_train}
    base_seed = int(given_train.pop("seed", TrainConfig().seed))
    split = comirec_split(inter, seed=seed)
    paper = mind_paper_split(inter, seed=seed)
    train_seqs = train_sequences(inter, split)
    report: dict = {
        "protocol": "comirec",
        "dataset": inter.name,
        "users": {"train": len(split.train_users), "valid": len(split.valid), "test": len(split.test)},
        "items": inter.n_items - 2,
        "interactions": inter.n_interactions,
        "has_timestamps": inter.timestamps is not None,
        "ndcg": NDCG_NOTE,
        "seeds": [base_seed + s for s in range(seeds)],
        "models": {},
        "stderr": {},
        "per_seed": {},
        "paired": {},
        "interests": {},
        "secondary": {"protocol": "mind_paper", "models": {}},
        "train": {},
        "settings": {},
        "config": {
            "train": {},
            "models": {},
            "split_seed": seed,
            "given": {"model": model_overrides or {}, "train": given_train},
        },
        "machine": {**machine(), "threads": int(given_train.get("threads") or torch.get_num_threads())},
    }
    per_user: dict[str, dict[str, np.ndarray]] = {}
    learned_models: dict[str, MIND] = {}
    for name in models:
        t0 = time.perf_counter()
        if name in ("mostpop", "itemcf"):
            base = (
                MostPopular(train_seqs, inter.n_items)
                if name == "mostpop"
                else ItemCF(train_seqs, inter.n_items)
            )
            runs = [(base.recommend, None)]
        elif name in LEARNED:
            settings, read = model_settings(inter, split, name, None if do_tune else tuned_dir)
            settings = settings.merged(model_overrides, given_train)
            if read is not None:
                report["tuned_file"] = str(read)
            for k in list(model_overrides or {}) + list(given_train):
                settings.why[k] = "user"
            if do_tune:
                settings, trials = tune(inter, split, name, settings, base_seed, progress)
                report.setdefault("tune", {})[name] = {"trials": trials, "chosen": asdict(settings)}
                if tuned_dir is not None:
                    report["tuned_file"] = str(save_tuned(tuned_file(tuned_dir, inter), {name: settings}))
            report["settings"][name] = asdict(settings)
            runs = []
            for s in range(seeds):
                ckpt = Path(checkpoint_dir) / f"{name}.pt" if checkpoint_dir and s == 0 else None
                model, res = fit(inter, split, name, settings, base_seed + s, ckpt, progress)
                runs.append((lambda cases, n, model=model: recommend(model, inter, cases, n), (model, res)))
            model0, _ = runs[0][1]
            learned_models[name] = model0
            report["config"]["models"][name] = model0.cfg.to_dict()
            report["config"]["train"][name] = asdict(build(inter, split, name, settings)[1])
            report["interests"][name] = {
                "K": model0.cfg.K,
                "max_len": model0.cfg.max_len,
                "k_reached_test": interests_reached(model0, inter, split.test),
            }
            report["train"][name] = _train_entry([r[1][1] for r in runs])
            if name == "mind" and do_ablate:  # the defaults' own validation score is the ablation's base
                res0 = runs[0][1][1]
                base_score = {
                    "valid": {k: round(v, 5) for k, v in res0.best_valid.items() if "comirec" not in k},
                    "best_epoch": res0.best_epoch,
                    "epochs_run": res0.epochs_run,
                    "k_reached_valid": interests_reached(model0, inter, split.valid),
                    "max_len": model0.cfg.max_len,
                    "seconds": round(res0.seconds, 1),
                }
        else:
            raise ValueError(f"unknown model {name!r}: choose from mostpop, itemcf, {', '.join(LEARNED)}")
        t_eval = time.perf_counter()
        seed_metrics, seed_users, seed_paper = [], [], []
        for rec, _ in runs:
            pu = evaluate_ranked_per_user(rec(split.test, max(NS)), split.test, NS)
            seed_users.append(pu)
            seed_metrics.append({k: float(v.mean()) for k, v in pu.items()})
            seed_paper.append(evaluate_ranked(rec(paper.test, max(NS)), paper.test, NS))
        keys = list(seed_metrics[0])
        per_user[name] = {k: np.mean([su[k] for su in seed_users], axis=0) for k in keys}
        report["models"][name] = {k: mean_se([m[k] for m in seed_metrics])[0] for k in keys}
        report["secondary"]["models"][name] = {
            k: mean_se([m[k] for m in seed_paper])[0] for k in seed_paper[0] if k.startswith("hr@")
        }
        if len(runs) > 1:
            report["stderr"][name] = {k: mean_se([m[k] for m in seed_metrics])[1] for k in keys}
            report["per_seed"][name] = [
                {k: m[k] for k in ("recall@20", "hr@20", "recall@50", "hr@50")} for m in seed_metrics
            ]
        entry = report["train"].setdefault(name, {})
        entry["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        m = report["models"][name]
        log.info("%s: recall@50 %.4f hr@50 %.4f", name, m["recall@50"], m["hr@50"])
    for a, b in PAIRS:
        if a in per_user and b in per_user:
            report["paired"][f"{a}_vs_{b}"] = {
                k: paired_difference(per_user[a][k], per_user[b][k]) for k in PAIRED_METRICS
            }
    if "mind" in learned_models:
        k_test = active_interests(learned_models["mind"], inter, split.test)
        report["by_k_reached"] = {m: by_interests(k_test, per_user, m) for m in ("recall@50", "hr@50")}
    if do_ablate and "mind" in report["settings"]:
        base = Settings(**report["settings"]["mind"])
        report["ablation"] = ablate(inter, split, base, base_seed, progress, levers, base_score)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    if out is not None:
        write_report(report, Path(out))
        if "mind" in learned_models:
            plot_long_history_coupling(learned_models["mind"], inter, split, Path(out))
    return report


def _train_entry(results: list[TrainResult]) -> dict:
    r = results[0]
    entry = {
        "epochs_run": r.epochs_run,
        "best_epoch": r.best_epoch,
        "stopped_by": r.stopped_by,
        "valid_recall@50": round(r.best_valid.get("recall@50", float("nan")), 5),
        "samples_per_s": round(r.samples_per_s, 1),
        "train_seconds": round(r.seconds, 1),
    }
    if len(results) > 1:
        entry["per_seed"] = [
            {
                "best_epoch": x.best_epoch,
                "epochs_run": x.epochs_run,
                "stopped_by": x.stopped_by,
                "train_seconds": round(x.seconds, 1),
            }
            for x in results
        ]
    return entry


def plot_long_history_coupling(
    model: MIND, inter: Interactions, split: Split, out: Path, users: int = 3
) -> Path:
    """The coupling heatmaps of the test users with the longest histories, beside the report."""
    from mind.explain import coupling, plot_couplings

    cases = sorted(split.test, key=lambda c: -len(c.history))[:users]
    ws = coupling(model, inter, [c.history for c in cases], case_times(inter, cases))
    hists = [c.history[-model.cfg.max_len :] for c in cases]
    titles = [
        f"user {inter.users[c.user]}: {len(c.history)} behaviours, the last {len(h)} in the window"
        for c, h in zip(cases, hists, strict=True)
    ]
    labels = [[inter.items.raw_of(int(i)) for i in h] for h in hists]
    return plot_couplings(ws, labels, titles, out.with_name(out.stem + "_coupling.png"))


def write_report(report: dict, out: Path) -> None:
    """JSON report plus a recall-vs-N plot beside it (same stem, .png), with seed error bars."""
    write_json(out, report)
    plot_metric_vs_n(report["models"], out.with_suffix(".png"), metric="recall", errors=report.get("stderr"))


def table(report: dict, ns: tuple[int, ...] = (20, 50)) -> str:
    """A plain-text result table (the one `mind evaluate` prints); +- is the seeds' standard error."""
    cols = [f"{m}@{n}" for n in ns for m in ("recall", "hr", "ndcg")]
    se = report.get("stderr", {})
    lines = [f"{'model':<12}" + "".join(f"{c:>17}" for c in cols)]
    for name, m in report["models"].items():
        cells = []
        for c in cols:
            v = m.get(c, float("nan"))
            cells.append(f"{v:.4f} ± {se[name][c]:.4f}" if name in se else f"{v:.4f}")
        lines.append(f"{name:<12}" + "".join(f"{x:>17}" for x in cells))
    for pair, res in report.get("paired", {}).items():
        if pair.endswith(("mind_1", "youtube_dnn")):
            r = res["recall@50"]
            h = res["hr@50"]
            lines.append(
                f"{pair}: recall@50 {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
                f"({r['relative']:+.1%}), hr@50 {h['diff']:+.4f} [{h['ci_low']:+.4f}, {h['ci_high']:+.4f}]"
            )
    for name, i in report.get("interests", {}).items():
        if name == "mind":
            lines.append(
                f"mind: K = {i['K']}, L = {i['max_len']}, K' reached on test users {i['k_reached_test']}"
            )
    return "\n".join(lines)


def markdown_table(report: dict, ns: tuple[int, ...] = (20, 50)) -> str:
    """The README's table for one report: recall/HR/NDCG at each N, best value in bold, +- seeds' s.e."""
    cols = [f"{m}@{n}" for n in ns for m in ("recall", "hr", "ndcg")]
    best = {c: max(m[c] for m in report["models"].values()) for c in cols}
    se = report.get("stderr", {})
    head = "| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols)
    rows = []
    for name, m in report["models"].items():
        cells = []
        for c in cols:
            v = f"{m[c]:.4f}" + (f" ± {se[name][c]:.4f}" if name in se else "")
            cells.append(f"**{v}**" if m[c] == best[c] else v)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)
