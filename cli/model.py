"""The model commands of `mind`: train, evaluate, explain, export (to Triton) and index (into Milvus).

torch is imported inside the commands that need it, so that `mind --help` and the stream commands start
fast."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from cli.options import (
    BATCH_,
    BEHAVIOUR_DROPOUT_,
    BUDGET_,
    CKPT_,
    D_,
    DROPOUT_,
    DYNAMIC_K_,
    EPOCHS_,
    HARD_BETA_,
    IGNORE_TUNED_,
    INIT_,
    ITERS_,
    K_,
    LEN_,
    LR_,
    MERGE_DECAY_,
    MODEL_NAME_,
    NEG_,
    P_,
    PROFILE_,
    RECENCY_,
    REPO_,
    RR_,
    SEED_,
    SIGMA_,
    SOFTMAX_,
    TEMPERATURE_,
    THREADS_,
    TIME_GAPS_,
    TUNED_,
    Data,
    Fmt,
    SkipBad,
    fail,
    load_data,
    model_overrides,
    setup_logging,
    train_overrides,
)

commands = typer.Typer()


@commands.command()
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
    neg: NEG_ = None,
    epochs: EPOCHS_ = None,
    lr: LR_ = None,
    batch_size: BATCH_ = None,
    seed: SEED_ = 42,
    budget: BUDGET_ = None,
    threads: THREADS_ = 0,
    softmax: SOFTMAX_ = None,
    hard_beta: HARD_BETA_ = None,
    rr: RR_ = None,
    time_gaps: TIME_GAPS_ = None,
    recency: RECENCY_ = None,
    dynamic_k: DYNAMIC_K_ = None,
    dropout: DROPOUT_ = None,
    behaviour_dropout: BEHAVIOUR_DROPOUT_ = None,
    temperature: TEMPERATURE_ = None,
    merge_decay: MERGE_DECAY_ = None,
    profile: PROFILE_ = None,
    unknown_rate: Annotated[
        float,
        typer.Option(
            "--unknown-rate",
            min=0.0,
            max=0.9,
            envvar="MIND_UNKNOWN_RATE",
            help="Cold start: share of items each step treats as unknown (side ids only); 0 = off.",
        ),
    ] = 0.0,
    tuned_dir: TUNED_ = Path("runs/tuned"),
    ignore_tuned: IGNORE_TUNED_ = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train one model on the training users (stopped when the validation users converge) and save it.

    Settings not given come from the choice `evaluate --tune` recorded for this data set, else from the data
    set's rules (mind.experiment.rule_settings), as in `evaluate`.
    Under `torchrun --nproc_per_node=N -m cli train ...` the same flags train data-parallel
    (DDP, --batch-size per process); rank 0 alone saves and prints (docs/training.md).
    """
    import numpy as np
    import torch

    from mind.experiment import LEARNED, build, model_settings
    from mind.model import MIND
    from mind.split import comirec_split
    from mind.train import distributed, save_checkpoint
    from mind.train import train as fit

    with distributed() as ddp:
        setup_logging(verbose and ddp.main)
        if model not in LEARNED:
            raise typer.BadParameter(f"choose one of {', '.join(LEARNED)}", param_hint="--model")
        inter = load_data(data, fmt, skip_bad)
        split = comirec_split(inter)
        mo = model_overrides(
            K,
            d,
            p,
            sigma,
            iters,
            max_len,
            routing_init,
            time_gaps=time_gaps,
            recency=recency,
            dynamic_k=dynamic_k,
            dropout=dropout,
            temperature=temperature,
            merge_decay=merge_decay,
            profile=profile,
        )
        to = train_overrides(
            epochs=epochs,
            lr=lr,
            neg=neg,
            batch_size=batch_size,
            budget=budget,
            softmax=softmax,
            hard_beta=hard_beta,
            rr=rr,
            behaviour_dropout=behaviour_dropout,
        )
        to.update(seed=seed, threads=threads, unknown_rate=unknown_rate)
        chosen, read = model_settings(inter, split, model, None if ignore_tuned else tuned_dir)
        if ddp.main and read is not None:
            typer.echo(f"settings chosen by --tune: {read}")
        cfg, tcfg = build(inter, split, model, chosen.merged(mo, to))
        torch.manual_seed(seed)
        net = MIND(cfg)
        res = fit(net, inter, np.asarray(split.train_users), split.valid, tcfg, ckpt=out, dist=ddp)
        if ddp.main:
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
    if ddp.active:
        end_worker()


def end_worker() -> NoReturn:
    """End a torchrun worker whose model is saved and whose process group is destroyed.

    DDP leaves gloo's threads running after destroy_process_group (torch 2.13 keeps the group alive once a
    DDP wrapper was built), and the interpreter's teardown races them: under CPU load about one worker in
    ten aborted at exit (SIGABRT), and torchrun reported a finished run as failed. Nothing is left to do,
    so the worker flushes what it wrote and exits without that teardown.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@commands.command()
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
    neg: NEG_ = None,
    epochs: EPOCHS_ = None,
    lr: LR_ = None,
    batch_size: BATCH_ = None,
    seed: SEED_ = 42,
    budget: BUDGET_ = None,
    threads: THREADS_ = 0,
    softmax: SOFTMAX_ = None,
    hard_beta: HARD_BETA_ = None,
    rr: RR_ = None,
    time_gaps: TIME_GAPS_ = None,
    recency: RECENCY_ = None,
    dynamic_k: DYNAMIC_K_ = None,
    dropout: DROPOUT_ = None,
    behaviour_dropout: BEHAVIOUR_DROPOUT_ = None,
    temperature: TEMPERATURE_ = None,
    merge_decay: MERGE_DECAY_ = None,
    profile: PROFILE_ = None,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds", min=1, envvar="MIND_SEEDS", help="Train each learned model with N seeds: mean ± s.e."
        ),
    ] = 1,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="Choose negatives, lr, window, K and one lever per model on the validation users.",
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
    tuned_dir: TUNED_ = Path("runs/tuned"),
    ignore_tuned: IGNORE_TUNED_ = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train every model, evaluate on the test users (ComiRec + MIND-paper protocols), write the report.

    Settings not given come from --tune, from the choice an earlier --tune recorded for this data set, or from
    the data set's rules; the report records each one's source.
    """
    from mind.experiment import run_offline, table

    setup_logging(verbose)
    inter = load_data(data, fmt, skip_bad)
    mo = model_overrides(
        K,
        d,
        p,
        sigma,
        iters,
        max_len,
        routing_init,
        time_gaps=time_gaps,
        recency=recency,
        dynamic_k=dynamic_k,
        dropout=dropout,
        temperature=temperature,
        merge_decay=merge_decay,
        profile=profile,
    )
    to = train_overrides(
        epochs=epochs,
        lr=lr,
        neg=neg,
        batch_size=batch_size,
        budget=budget,
        softmax=softmax,
        hard_beta=hard_beta,
        rr=rr,
        behaviour_dropout=behaviour_dropout,
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
        tuned_dir=None if ignore_tuned else tuned_dir,
    )
    typer.echo(f"\n{report['dataset']}: {report['users']['test']} test users, ComiRec protocol\n")
    typer.echo(table(report))
    if "tuned_file" in report:
        typer.echo(f"\nsettings chosen by --tune: {report['tuned_file']}")
    typer.echo(f"\nwrote {out} and {out.with_suffix('.png')} in {report['seconds']:.0f} s")


@commands.command()
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
    inter = load_data(data, fmt, False)
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


@commands.command("export")
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
    from workflows.serving import export_checkpoint

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
        raise fail(exc) from None
    typer.echo(
        f"exported {checkpoint} as {repo / model_name / str(v)} (model version {v}); "
        f"load it with TritonTower.load(), then `mind index --checkpoint {checkpoint}`"
    )


@commands.command("index")
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
    index_type: Annotated[
        str | None,
        typer.Option(
            "--index-type",
            envvar="MIND_INDEX_TYPE",
            help="FLAT, IVF_FLAT, ...; default: chosen by catalogue size (FLAT below 100k items).",
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            envvar="MIND_REDIS_URL",
            help="Full mode: publish the version to the item catalogue there and index its new items too.",
        ),
    ] = None,
) -> None:
    """Embed the whole catalogue with the checkpoint's model and index it as its exported version."""

    import redis

    from indexer.store import IndexUnavailable, InvalidQuery, VersionMismatch
    from mind.train import load_checkpoint
    from stream.catalogue import CatalogueStore
    from workflows.serving import ServingError, index_checkpoint, read_item_ids

    if incremental != (items is not None):
        raise typer.BadParameter("--incremental and --items go together", param_hint="--items")
    store = CatalogueStore(redis.Redis.from_url(redis_url), prefix) if redis_url and not incremental else None
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
            index_type=index_type,
            catalogue=store,
        )
    except (ServingError, IndexUnavailable, VersionMismatch, InvalidQuery, FileNotFoundError) as exc:
        raise fail(exc) from None
    typer.echo(
        f"{stats.mode} index of {stats.version}: {stats.rows} rows x {stats.dim} in {stats.seconds:.1f}s; "
        f"active {stats.active} (was {stats.previous}); dropped {stats.dropped or 'none'}"
    )
