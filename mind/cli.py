"""`mind`: the command line. Every option also reads an environment variable (MIND_<NAME>)."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="MIND Stream: multi-interest retrieval.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; each writes a JSON results file.")
app.add_typer(bench_app, name="bench")


@app.callback()
def _defaults_from_file(
    ctx: typer.Context,
    defaults: Annotated[
        Path | None,
        typer.Option(
            "--defaults",
            envvar="MIND_DEFAULTS",
            exists=True,
            dir_okay=False,
            help="TOML file of option defaults, one table per command ([train], [evaluate], [bench.train]).",
        ),
    ] = None,
) -> None:
    """Option defaults from a file; flags and MIND_* variables still win (click's default_map)."""
    if defaults is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        with defaults.open("rb") as f:
            tables = {k: v for k, v in tomllib.load(f).items() if isinstance(v, dict)}
        ctx.default_map = _by_param_name(ctx.command, tables)


def _by_param_name(group, tables: dict) -> dict:
    """Keys may be spelt like the flags (`dim`, `max-len`); click's default_map wants parameter names."""
    out = {}
    for name, table in tables.items():
        cmd = group.commands.get(name) if hasattr(group, "commands") else None
        if cmd is None:
            raise typer.BadParameter(f"no command {name!r}", param_hint="--defaults")
        if hasattr(cmd, "commands"):  # a group such as `bench`
            out[name] = _by_param_name(cmd, table)
            continue
        names = {o.lstrip("-").replace("-", "_"): p.name for p in cmd.params for o in p.opts}
        names.update({p.name: p.name for p in cmd.params})
        unknown = sorted(set(k.replace("-", "_") for k in table) - set(names))
        if unknown:
            raise typer.BadParameter(f"[{name}] has no option {', '.join(unknown)}", param_hint="--defaults")
        out[name] = {names[k.replace("-", "_")]: v for k, v in table.items()}
    return out


Data = Annotated[
    Path | None,
    typer.Option(
        "--data",
        envvar="MIND_DATA",
        help="Data set (file or directory); default: synthetic planted interests.",
    ),
]
Fmt = Annotated[
    str, typer.Option("--format", envvar="MIND_FORMAT", help="auto|recbole|sequences|pairs|jsonl")
]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip malformed lines (counted and reported).")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(data: Path | None, fmt: str, skip_bad: bool, kcore: bool = True):
    """The data set for training/evaluation: a loaded file (5-core filtered) or synthetic data."""
    from mind.loaders import DataError, filter_kcore, load
    from mind.synthetic import generate

    if data is None:
        return generate()
    try:
        inter = load(data, fmt=fmt, skip_bad=skip_bad)
    except (DataError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    return filter_kcore(inter) if kcore else inter


def _model_overrides(
    K: int | None,
    d: int | None,
    p: float | None,
    sigma: float | None,
    iters: int | None,
    max_len: int | None,
    routing_init: str | None = None,
) -> dict:
    given = {
        "K": K,
        "d": d,
        "p": p,
        "sigma": sigma,
        "iters": iters,
        "max_len": max_len,
        "routing_init": routing_init,
    }
    return {k: v for k, v in given.items() if v is not None}


K_ = Annotated[int | None, typer.Option("--K", "-k", envvar="MIND_K", help="Maximum interests K.")]
D_ = Annotated[int | None, typer.Option("--dim", "-d", envvar="MIND_DIM", help="Embedding dimension d.")]
P_ = Annotated[float | None, typer.Option("--p", envvar="MIND_P", help="Attention power p (inf = hard).")]
SIGMA_ = Annotated[float | None, typer.Option("--sigma", envvar="MIND_SIGMA", help="Routing-logit init std.")]
ITERS_ = Annotated[int | None, typer.Option("--iters", envvar="MIND_ITERS", help="Routing iterations r.")]
LEN_ = Annotated[int | None, typer.Option("--max-len", envvar="MIND_MAX_LEN", help="Behaviour window L.")]
INIT_ = Annotated[
    str | None, typer.Option("--routing-init", envvar="MIND_ROUTING_INIT", help="kmeans++ (default) | random")
]
NEG_ = Annotated[int, typer.Option("--neg", envvar="MIND_NEG", help="Sampled negatives per batch.")]
EPOCHS_ = Annotated[int, typer.Option("--epochs", envvar="MIND_EPOCHS", help="Maximum epochs.")]
LR_ = Annotated[float, typer.Option("--lr", envvar="MIND_LR", help="Adam learning rate.")]
BATCH_ = Annotated[int, typer.Option("--batch-size", envvar="MIND_BATCH_SIZE")]
SEED_ = Annotated[int, typer.Option("--seed", envvar="MIND_SEED")]
BUDGET_ = Annotated[
    float, typer.Option("--budget", envvar="MIND_BUDGET", help="Seconds of training per model.")
]
THREADS_ = Annotated[
    int, typer.Option("--threads", envvar="MIND_THREADS", help="Torch threads (0 = default).")
]


SOFTMAX_ = Annotated[
    str | None, typer.Option("--softmax", envvar="MIND_SOFTMAX", help="sampled | full (every item).")
]
HARD_BETA_ = Annotated[
    float | None,
    typer.Option(
        "--hard-beta", envvar="MIND_HARD_BETA", help="Hard negatives: weight exp(beta*score); 0 = off."
    ),
]
RR_ = Annotated[
    float | None, typer.Option("--rr", envvar="MIND_RR", help="Routing regulariser weight; 0 = off.")
]
TIME_ = Annotated[
    int | None,
    typer.Option(
        "--time-gaps", envvar="MIND_TIME_GAPS", help="Time-gap buckets (data with timestamps); 0 = off."
    ),
]
RECENCY_ = Annotated[
    int | None, typer.Option("--recency", envvar="MIND_RECENCY", help="Recency-rank embeddings; 0 = off.")
]
ALL_K_ = Annotated[
    bool | None,
    typer.Option(
        "--dynamic-k/--all-interests", envvar="MIND_DYNAMIC_K", help="K' = log2 |I_u| (default) or always K."
    ),
]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint path.")] = Path("runs/mind.pt"),
    data: Data = None,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    model: Annotated[str, typer.Option(help="mind | mind_1 | youtube_dnn")] = "mind",
    K: K_ = None,
    d: D_ = None,
    p: P_ = None,
    sigma: SIGMA_ = None,
    iters: ITERS_ = None,
    max_len: LEN_ = None,
    routing_init: INIT_ = None,
    neg: Annotated[int | None, typer.Option("--neg", envvar="MIND_NEG", help="Sampled negatives.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", envvar="MIND_EPOCHS", help="Epoch cap.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", envvar="MIND_LR", help="Adam learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", envvar="MIND_BATCH_SIZE")] = None,
    seed: SEED_ = 42,
    budget: Annotated[
        float | None,
        typer.Option("--budget", envvar="MIND_BUDGET", help="Seconds per model (default: none)."),
    ] = None,
    threads: THREADS_ = 0,
    softmax: SOFTMAX_ = None,
    hard_beta: HARD_BETA_ = None,
    rr: RR_ = None,
    time_gaps: TIME_ = None,
    recency: RECENCY_ = None,
    all_interests: ALL_K_ = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train one model on the training users (stopped when the validation users converge) and save it.

    Settings not given come from the data set's rules (mind.experiment.rule_settings), as in `evaluate`.
    Under `torchrun --nproc_per_node=N -m mind.cli train ...` the same flags train data-parallel
    (DDP, --batch-size per process); rank 0 alone saves and prints (docs/training.md).
    """
    import numpy as np
    import torch

    from mind.experiment import LEARNED, build, given, rule_settings
    from mind.model import MIND
    from mind.split import comirec_split
    from mind.train import distributed, save_checkpoint
    from mind.train import train as fit

    with distributed() as ddp:
        _setup_logging(verbose and ddp.main)
        if model not in LEARNED:
            raise typer.BadParameter(f"choose one of {', '.join(LEARNED)}", param_hint="--model")
        inter = _load(data, fmt, skip_bad)
        split = comirec_split(inter)
        mo = {**_model_overrides(K, d, p, sigma, iters, max_len, routing_init)}
        mo.update(given(time_buckets=time_gaps, recency=recency, dynamic_k=all_interests))
        to = given(
            epochs=epochs,
            lr=lr,
            neg=neg,
            batch_size=batch_size,
            max_seconds=budget,
            softmax=softmax,
            hard_beta=hard_beta,
            rr=rr,
        )
        settings = rule_settings(inter, split, model).merged(mo, {**to, "seed": seed, "threads": threads})
        cfg, tcfg = build(inter, split, model, settings)
        torch.manual_seed(seed)
        net = MIND(cfg)
        res = fit(net, inter, np.asarray(split.train_users), split.valid, tcfg, ckpt=out, dist=ddp)
        if not ddp.main:
            return
        save_checkpoint(out, net, inter, tcfg, extra={"epoch": res.best_epoch, "valid": res.best_valid})
        typer.echo(
            f"saved {out}  best epoch {res.best_epoch}/{res.epochs_run}  valid recall@50 "
            f"{res.best_valid.get('recall@50', math.nan):.4f}  {res.samples_per_s:.0f} samples/s"
        )
        if ddp.active:
            procs = f"{ddp.world} process{'es' if ddp.world > 1 else ''} on {ddp.device.split(':')[0]}"
            typer.echo(
                f"ddp: {procs}, {res.steps} steps, parameter checksum per rank: {' '.join(res.replicas)}"
            )


@app.command()
def evaluate(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Report JSON (a PNG is written beside it).")
    ] = Path("report.json"),
    data: Data = None,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    models: Annotated[
        str, typer.Option(help="Comma-separated models.")
    ] = "mostpop,itemcf,youtube_dnn,mind_1,mind",
    K: K_ = None,
    d: D_ = None,
    p: P_ = None,
    sigma: SIGMA_ = None,
    iters: ITERS_ = None,
    max_len: LEN_ = None,
    routing_init: INIT_ = None,
    neg: Annotated[int | None, typer.Option("--neg", envvar="MIND_NEG", help="Sampled negatives.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", envvar="MIND_EPOCHS", help="Epoch cap.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", envvar="MIND_LR", help="Adam learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", envvar="MIND_BATCH_SIZE")] = None,
    seed: SEED_ = 42,
    budget: Annotated[
        float | None,
        typer.Option("--budget", envvar="MIND_BUDGET", help="Seconds per model (default: none)."),
    ] = None,
    threads: THREADS_ = 0,
    softmax: SOFTMAX_ = None,
    hard_beta: HARD_BETA_ = None,
    rr: RR_ = None,
    time_gaps: TIME_ = None,
    recency: RECENCY_ = None,
    all_interests: ALL_K_ = None,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds", min=1, envvar="MIND_SEEDS", help="Train each learned model with N seeds: mean ± s.e."
        ),
    ] = 1,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune", help="Choose window, K, lr and negatives per model by a search on the validation users."
        ),
    ] = False,
    ablate: Annotated[
        bool, typer.Option("--ablate", help="Also run the lever ablation of MIND-K on the validation users.")
    ] = False,
    levers: Annotated[
        str | None,
        typer.Option(
            "--levers", help="Only these ablation levers, comma-separated (mind.experiment.LEVERS keys)."
        ),
    ] = None,
    checkpoints: Annotated[
        Path | None, typer.Option(help="Directory to keep each model's checkpoint.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train every model, evaluate on the test users (ComiRec + MIND-paper protocols), write the report.

    Settings not given come from the data set's rules (or from --tune); the report records each one's source.
    """
    from mind.experiment import given, run_offline, table

    _setup_logging(verbose)
    inter = _load(data, fmt, skip_bad)
    mo = {**_model_overrides(K, d, p, sigma, iters, max_len, routing_init)}
    mo.update(given(time_buckets=time_gaps, recency=recency, dynamic_k=all_interests))
    to = given(
        epochs=epochs,
        lr=lr,
        neg=neg,
        batch_size=batch_size,
        max_seconds=budget,
        softmax=softmax,
        hard_beta=hard_beta,
        rr=rr,
    )
    report = run_offline(
        inter,
        out=out,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        model_overrides=mo,
        train_overrides={**to, "seed": seed, "threads": threads},
        checkpoint_dir=checkpoints,
        seeds=seeds,
        do_tune=tune,
        do_ablate=ablate,
        levers=tuple(x.strip() for x in levers.split(",")) if levers else None,
    )
    typer.echo(f"\n{report['dataset']}: {report['users']['test']} test users, ComiRec protocol\n")
    typer.echo(table(report))
    typer.echo(f"\nwrote {out} and {out.with_suffix('.png')} in {report['seconds']:.0f} s")


@app.command()
def explain(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="Trained model.")] = Path(
        "runs/mind.pt"
    ),
    user: Annotated[str | None, typer.Option(help="Raw user id; default: the longest history.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("coupling.png"),
    data: Data = None,
    fmt: Fmt = "auto",
) -> None:
    """Draw one user's coupling-coefficient heatmap (behaviours x interests, the paper's Fig. 5)."""
    from mind.explain import coupling, plot_coupling
    from mind.train import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    inter = _load(data, fmt, False)
    if inter.items.digest() != meta["vocab_hash"]:
        typer.secho(
            "error: the data's item vocabulary differs from the checkpoint's; pass the same --data",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    if user is None:
        u = max(range(len(inter.users)), key=lambda i: len(inter.sequences[i]))
    elif user in inter.users:
        u = inter.users.index(user)
    else:
        typer.secho(f"error: unknown user {user!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    hist = inter.sequences[u][-model.cfg.max_len :]
    (w,) = coupling(model, inter, [hist])
    labels = [inter.items.raw_of(int(i)) for i in hist]
    if inter.planted is not None:
        cats = inter.planted["item_category"]
        labels = [f"{lab} (c{cats[i]})" for lab, i in zip(labels, hist, strict=True)]
    plot_coupling(w, out, labels, title=f"user {inter.users[u]}: coupling coefficients")
    typer.echo(f"wrote {out} ({w.shape[0]} behaviours x {w.shape[1]} interests)")


Speed = Annotated[
    str,
    typer.Option("--speed", envvar="MIND_REPLAY_SPEED", help="asap, or N = N times the original pacing."),
]
Users = Annotated[int | None, typer.Option("--users", min=1, help="Replay only the first N test users.")]


def _speed(value: str) -> str | float:
    if value == "asap":
        return value
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter("asap or a number", param_hint="--speed") from None


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="demo.json (PNGs beside it).")] = Path(
        "runs/demo/demo.json"
    ),
    data: Data = None,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    budget: BUDGET_ = 60.0,
    epochs: EPOCHS_ = 30,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Checkpoints, model repo, stack.")] = Path(
        "runs/demo"
    ),
    users: Users = None,
    synthetic_users: Annotated[
        int, typer.Option("--synthetic-users", min=50, help="Size of the synthetic data set.")
    ] = 2000,
    speed: Speed = "asap",
    rate: Annotated[float, typer.Option("--rate", min=0.0, help="Clicks/s cap (0 = none).")] = 300.0,
) -> None:
    """The whole system end to end: train, export, embedded stack, index, worker + view, replay, stop."""
    from stream.demo import run_demo
    from stream.embedded.stack import StackError, terminate_as_interrupt
    from stream.settings import load_settings

    _setup_logging(False)
    if data is None:
        from mind.synthetic import generate

        inter = generate(n_users=synthetic_users)
    else:
        inter = _load(data, fmt, skip_bad)
    try:
        with terminate_as_interrupt():
            run_demo(
                inter,
                out,
                run_dir,
                load_settings(None, metrics_port=0, log_level="WARNING"),
                budget_s=budget,
                epochs=epochs,
                users=users,
                speed=_speed(speed),
                rate=rate or None,
                echo=typer.echo,
            )
    except KeyboardInterrupt:
        typer.echo("interrupted: everything started was stopped", err=True)
        raise typer.Exit(130) from None
    except StackError as exc:
        _fail(exc)
    typer.echo(f"\nwrote {out} and its PNGs")


@app.command()
def replay(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The trained model.")],
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("replay.json"),
    data: Data = None,
    fmt: Fmt = "auto",
    skip_bad: SkipBad = False,
    speed: Speed = "asap",
    rate: Annotated[float, typer.Option("--rate", min=0.0, help="Clicks/s cap (0 = none).")] = 0.0,
    users: Users = None,
    run_dir: Annotated[
        Path, typer.Option("--run-dir", help="Model repo and stack, when started here.")
    ] = Path("runs/replay"),
) -> None:
    """Replay the test users' histories through Kafka -> worker -> recall; streaming vs offline metrics.

    The data set must be the checkpoint's (synthetic default: `mind train` without --data). Starts the
    embedded stack unless every address is configured (then the model must be served and indexed)."""
    import json

    from mind.split import comirec_split
    from stream.demo import serving, summary_table, write_replay
    from stream.embedded.stack import StackError, terminate_as_interrupt
    from stream.replay import replay as run_replay
    from stream.settings import load_settings

    _setup_logging(False)
    inter = _load(data, fmt, skip_bad)
    cases = comirec_split(inter, seed=1230).test[: users or None]
    settings = load_settings(None, log_level="WARNING")
    try:
        with terminate_as_interrupt(), serving(checkpoint, run_dir, settings) as (s, version):
            rep = run_replay(
                checkpoint, inter, s, cases, _speed(speed), rate=rate or None, model_version=version
            )
    except KeyboardInterrupt:
        typer.echo("interrupted: everything started was stopped", err=True)
        raise typer.Exit(130) from None
    except (StackError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    d = rep.as_dict()
    write_replay(d, out, rep.latencies_ms)
    typer.echo(summary_table(d))
    typer.echo(json.dumps(d["agreement"]))
    typer.echo(f"wrote {out}")


@bench_app.command("train")
def bench_train(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/train.json"),
    data: Data = None,
    fmt: Fmt = "auto",
) -> None:
    """Training throughput (samples/s) per thread count and model, and evaluation time."""
    from mind.bench_train import run

    run(_load(data, fmt, False), out)


CKPT_ = Annotated[
    Path, typer.Option("--checkpoint", "-c", envvar="MIND_CHECKPOINT", help="Trained model (mind train).")
]
REPO_ = Annotated[Path, typer.Option("--repo", envvar="MIND_MODEL_REPO", help="Triton model repository.")]
MODEL_NAME_ = Annotated[
    str, typer.Option("--model-name", envvar="MIND_TRITON_MODEL", help="Model name in the repository.")
]


def _fail(exc: BaseException) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from exc


@app.command("export")
def export_cmd(
    checkpoint: CKPT_ = Path("runs/mind.pt"),
    repo: REPO_ = Path("model_repo"),
    model_name: MODEL_NAME_ = "mind_user_tower",
    gpu: Annotated[
        bool, typer.Option("--gpu", envvar="MIND_GPU", help="KIND_GPU instances instead of KIND_CPU.")
    ] = False,
    instances: Annotated[
        int, typer.Option("--instances", min=1, envvar="MIND_INSTANCES", help="Model instances.")
    ] = 1,
    threads: Annotated[
        int,
        typer.Option(
            "--threads", min=0, envvar="MIND_TOWER_THREADS", help="Torch threads per instance (0 = per core)."
        ),
    ] = 1,
) -> None:
    """Write the checkpoint's user tower as the next numbered Triton version (its model version)."""
    from mind.export import ExportError
    from mind.serving import export_checkpoint

    try:
        v = export_checkpoint(
            checkpoint,
            repo,
            model_name,
            instance_kind="KIND_GPU" if gpu else "KIND_CPU",
            instance_count=instances,
            torch_threads=threads,
        )
    except (ExportError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(
        f"exported {checkpoint} as {repo / model_name / str(v)} (model version {v}); "
        f"load it with TritonTower.load(), then `mind index --checkpoint {checkpoint}`"
    )


@app.command("index")
def index_cmd(
    milvus_uri: Annotated[
        str, typer.Option("--milvus-uri", envvar="MIND_MILVUS_URI", help="http://host:port or a local .db")
    ],
    checkpoint: CKPT_ = Path("runs/mind.pt"),
    repo: REPO_ = Path("model_repo"),
    model_name: MODEL_NAME_ = "mind_user_tower",
    version: Annotated[
        str | None,
        typer.Option(
            envvar="MIND_INDEX_VERSION", help="Exported version to index; default: this checkpoint's newest."
        ),
    ] = None,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental", envvar="MIND_INDEX_INCREMENTAL", help="Upsert --items into the active one."
        ),
    ] = False,
    items: Annotated[
        Path | None,
        typer.Option("--items", envvar="MIND_INDEX_ITEMS", help="Raw item ids to upsert, one per line."),
    ] = None,
    prefix: Annotated[str, typer.Option(envvar="MIND_MILVUS_PREFIX", help="Collection prefix.")] = "items",
    chunk: Annotated[int, typer.Option(min=1, envvar="MIND_INDEX_CHUNK", help="Rows per chunk.")] = 2048,
    drop_grace: Annotated[
        float, typer.Option(envvar="MIND_DROP_GRACE_S", help="Drop versions retired longer ago (s).")
    ] = 600.0,
) -> None:
    """Embed the whole catalogue with the checkpoint's model and index it as its exported version."""
    import os

    from indexer.store import IndexUnavailable, InvalidQuery, VersionMismatch
    from mind.serving import ServingError, index_checkpoint, read_item_ids
    from mind.train import load_checkpoint

    if incremental != (items is not None):
        raise typer.BadParameter("--incremental and --items go together", param_hint="--items")
    try:
        changed = read_item_ids(items, load_checkpoint(checkpoint)[1]["item_vocab"]) if items else None
        stats = index_checkpoint(
            checkpoint,
            milvus_uri,
            version,
            chunk=chunk,
            incremental=incremental,
            changed_ids=changed,
            drop_grace_s=drop_grace,
            repo=repo,
            model_name=model_name,
            prefix=prefix,
            token=os.environ.get("MIND_MILVUS_TOKEN"),
        )
    except (ServingError, IndexUnavailable, VersionMismatch, InvalidQuery, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(
        f"{stats.mode} index of {stats.version}: {stats.rows} rows x {stats.dim} in {stats.seconds:.1f}s; "
        f"active {stats.active} (was {stats.previous}); dropped {stats.dropped or 'none'}"
    )


@app.command("roll")
def roll_cmd(
    checkpoint: CKPT_ = Path("runs/mind.pt"),
    repo: REPO_ = Path("model_repo"),
    model_name: Annotated[
        str | None,
        typer.Option("--model-name", help="Model name in Triton (default: settings, MIND_TRITON_MODEL)."),
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Index collection prefix (default: MIND_MILVUS_PREFIX).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Settings file (TOML/YAML/JSON/.env); else $MIND_CONFIG.")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Addresses left unset come from the stack running here.")
    ] = None,
    drop_grace: Annotated[
        float, typer.Option(envvar="MIND_DROP_GRACE_S", help="Drop index versions retired longer ago (s).")
    ] = 600.0,
    keep: Annotated[int, typer.Option(min=0, help="Retired index versions always kept, for rollback.")] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Serve a new checkpoint while workers run: export -> index (built) -> Triton load -> flip.

    Exit 0 when the new version serves; 1 when a step failed (the previous version still serves);
    2 bad input. Order, guard and rollback: docs/rollout.md."""
    import json

    from stream.cli import _settings
    from stream.embedded.stack import terminate_as_interrupt
    from stream.roll import RollError, roll

    _setup_logging(False)
    if not checkpoint.is_file():
        _fail(FileNotFoundError(f"checkpoint {checkpoint} does not exist"))
    settings = _settings(config, run_dir, triton_model=model_name, milvus_prefix=prefix)
    try:
        with terminate_as_interrupt():
            res = roll(
                settings,
                checkpoint,
                repo=repo,
                progress=progress,
                echo=lambda line: typer.echo(line, err=True),
                drop_grace_s=drop_grace,
                keep=keep,
            )
    except KeyboardInterrupt:
        typer.echo("interrupted: the previous version still serves", err=True)
        raise typer.Exit(130) from None
    except RollError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
    else:
        steps = ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items() if k != "total")
        typer.echo(
            f"{res.model_name}: Triton version {res.old_version or '-'} -> {res.new_version}, index "
            f"{res.previous_index or '-'} -> {res.index_version} ({res.rows} items) in "
            f"{res.timings['total']:.1f}s ({steps})"
        )


@bench_app.command("serving")
def bench_serving(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/serving.json"),
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", "-c", envvar="MIND_CHECKPOINT", help="Default: random-init, Beauty-sized."
        ),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Triton batch sizes.")] = "1,8,64,256",
    calls: Annotated[int, typer.Option(min=1, help="Timed calls per batch size.")] = 200,
    warmup: Annotated[int, typer.Option(min=0)] = 20,
    nq: Annotated[str, typer.Option(help="Milvus queries per call.")] = "1,16,256",
    reps: Annotated[int, typer.Option(min=1, help="Timed searches per nq.")] = 30,
    top_n: Annotated[int, typer.Option("--n", min=1, help="Top-N per query.")] = 50,
    recall_queries: Annotated[int, typer.Option(min=1, help="Active interests per recall step.")] = 256,
    recall_reps: Annotated[int, typer.Option(min=1, help="Timed recall steps.")] = 100,
    items: Annotated[int, typer.Option(min=3, help="Catalogue size of the random-init model.")] = 12_103,
) -> None:
    """Triton tower and Milvus search beside in-process torch, same run; writes JSON and a PNG."""
    from mind.bench_serving import BenchSizes, run, table

    def ints(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in s.split(",") if x.strip())

    sizes = BenchSizes(
        batch_sizes=ints(batch_sizes),
        calls=calls,
        warmup=warmup,
        nqs=ints(nq),
        milvus_reps=reps,
        n=top_n,
        recall_queries=recall_queries,
        recall_reps=recall_reps,
        n_items=items,
    )
    res = run(out, checkpoint, sizes, log=lambda m: typer.echo(m, err=True))
    typer.echo(table(res))
    typer.echo(f"\nwrote {out} and {out.with_suffix('.png')} in {res['seconds']:.0f} s")


def _bench_on_stack(
    out: Path, run: Callable[[], dict[str, Any]], table: Callable[[dict[str, Any]], str]
) -> None:
    """Run a benchmark that starts the embedded stack (Ctrl-C or SIGTERM stop what it started), then print
    its table and where it wrote."""
    from stream.embedded.stack import StackError, terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            res = run()
    except KeyboardInterrupt:
        typer.echo("interrupted: everything started was stopped", err=True)
        raise typer.Exit(130) from None
    except StackError as exc:
        _fail(exc)
    typer.echo(table(res))
    typer.echo(f"\nwrote {out} and {out.with_suffix('.png')} in {res['seconds']:.0f} s")


BenchCheckpoint = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="Default: runs/beauty/mind.pt, else random-init, Beauty-sized."),
]


@bench_app.command("pipeline")
def bench_pipeline(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/pipeline.json"),
    checkpoint: BenchCheckpoint = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Users' clicks (the checkpoint's data set); default: Beauty if it fits."),
    ] = None,
    fmt: Fmt = "auto",
    loads: Annotated[str, typer.Option(help="Offered loads, clicks/s.")] = "100,500,2000",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per load.")] = 15.0,
    asap_clicks: Annotated[int, typer.Option(min=0, help="Clicks of the as-fast-as-possible run.")] = 20_000,
    reference_clicks: Annotated[int, typer.Option(min=1, help="Clicks timed in process.")] = 8192,
    items: Annotated[int, typer.Option(min=3, help="Catalogue size of the random-init model.")] = 12_103,
) -> None:
    """End-to-end latency and throughput on the embedded stack beside the in-process reference."""
    from mind.bench_pipeline import DEFAULT_DATA, PipelineSizes, run, table

    _setup_logging(False)
    if data is None and checkpoint is None and DEFAULT_DATA.exists():
        data = DEFAULT_DATA
    sizes = PipelineSizes(
        loads=tuple(int(x) for x in loads.split(",") if x.strip()),
        seconds=seconds,
        asap_clicks=asap_clicks,
        reference_clicks=reference_clicks,
        n_items=items,
    )
    _bench_on_stack(
        out,
        lambda: run(out, checkpoint, _load(data, fmt, False) if data else None, sizes, log=typer.echo),
        table,
    )


@bench_app.command("scale")
def bench_scale(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/scale.json"),
    checkpoint: BenchCheckpoint = None,
    workers: Annotated[str, typer.Option(help="Worker process counts.")] = "1,2,3",
    rounds: Annotated[int, typer.Option(min=1, help="Rounds over the counts (2: 1,2,3 then 3,2,1).")] = 2,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the clicks topic.")] = 6,
    loads: Annotated[str, typer.Option(help="Offered loads, clicks/s.")] = "250,500,1000",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per load.")] = 10.0,
    asap_clicks: Annotated[int, typer.Option(min=0, help="Clicks of the as-fast-as-possible run.")] = 15_000,
    items: Annotated[int, typer.Option(min=3, help="Catalogue size of the random-init model.")] = 12_103,
) -> None:
    """Throughput against worker processes (one group, N partitions) on the embedded stack; order and loss
    checked."""
    from mind.bench_scale import ScaleSizes, run, table

    _setup_logging(False)
    sizes = ScaleSizes(
        workers=tuple(int(x) for x in workers.split(",") if x.strip()),
        rounds=rounds,
        partitions=partitions,
        loads=tuple(int(x) for x in loads.split(",") if x.strip()),
        seconds=seconds,
        asap_clicks=asap_clicks,
        n_items=items,
    )
    _bench_on_stack(out, lambda: run(out, checkpoint, sizes, log=typer.echo), table)


from stream.cli import register  # noqa: E402

register(app)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
