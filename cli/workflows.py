"""The workflow commands of `mind`: demo (everything end to end), replay (streaming vs offline), roll
(a new model version while workers run) and catalogue (new items, cold start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.options import (
    BUDGET_,
    CKPT_,
    EPOCHS_,
    REPO_,
    Config,
    Data,
    Fmt,
    SkipBad,
    Speed,
    Users,
    fail,
    interruptible,
    load_data,
    parse_speed,
    settings_from,
    setup_logging,
)
from mind.split import comirec_split
from mind.synthetic import generate
from stream.settings import load_settings

commands = typer.Typer()


@commands.command()
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
    from workflows.demo import run_demo  # torch: imported when a command needs it

    setup_logging(False)
    inter = generate(n_users=synthetic_users) if data is None else load_data(data, fmt, skip_bad)
    with interruptible():
        run_demo(
            inter,
            out,
            run_dir,
            load_settings(None, metrics_port=0, log_level="WARNING"),
            budget_s=budget,
            epochs=epochs,
            users=users,
            speed=parse_speed(speed),
            rate=rate or None,
            echo=typer.echo,
        )
    typer.echo(f"\nwrote {out} and its PNGs")


@commands.command()
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
    from workflows.demo import serving, summary_table, write_replay
    from workflows.replay import replay as run_replay

    setup_logging(False)
    inter = load_data(data, fmt, skip_bad)
    cases = comirec_split(inter, seed=1230).test[: users or None]
    settings = load_settings(None, log_level="WARNING")
    try:
        with interruptible(), serving(checkpoint, run_dir, settings) as (s, version):
            rep = run_replay(
                checkpoint, inter, s, cases, parse_speed(speed), rate=rate or None, model_version=version
            )
    except (ValueError, FileNotFoundError) as exc:
        raise fail(exc) from None
    d = rep.as_dict()
    write_replay(d, out, rep.latencies_ms)
    typer.echo(summary_table(d))
    typer.echo(json.dumps(d["agreement"]))
    typer.echo(f"wrote {out}")


@commands.command("roll")
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
    config: Config = None,
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
    from workflows.roll import RollError, roll

    setup_logging(False)
    if not checkpoint.is_file():
        raise fail(f"checkpoint {checkpoint} does not exist")
    settings = settings_from(config, run_dir, triton_model=model_name, milvus_prefix=prefix)
    try:
        with interruptible("the previous version still serves"):
            res = roll(
                settings,
                checkpoint,
                repo=repo,
                progress=progress,
                echo=lambda line: typer.echo(line, err=True),
                drop_grace_s=drop_grace,
                keep=keep,
            )
    except RollError as exc:
        raise fail(exc, 1) from exc
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
    else:
        steps = ", ".join(f"{k} {v:.2f}s" for k, v in res.timings.items() if k != "total")
        typer.echo(
            f"{res.model_name}: Triton version {res.old_version or '-'} -> {res.new_version}, index "
            f"{res.previous_index or '-'} -> {res.index_version} ({res.rows} items, {res.cold_items} from "
            f"the catalogue{', new vocabulary' if res.vocabulary_changed else ''}) in "
            f"{res.timings['total']:.1f}s ({steps})"
        )


@commands.command("catalogue")
def catalogue_cmd(
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            exists=True,
            dir_okay=False,
            help="A JSONL file of catalog.v1 records to apply once; default: consume the catalogue topic.",
        ),
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Index collection prefix (default: MIND_MILVUS_PREFIX).")
    ] = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="With the topic: stop after this many seconds without a record (default: run on)."),
    ] = None,
    config: Config = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Addresses left unset come from the stack running here.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """New items before the next training: catalogue records -> catalogue -> the active index (cold start).

    Each record (item id, side ids) gets the next index beyond the served vocabulary and a vector from its
    side ids; workers learn it without a restart. Bad records go to the catalogue DLQ topic
    (docs/coldstart.md)."""
    from confluent_kafka import Producer

    from indexer.store import ItemIndex
    from stream.catalogue import CatalogueStore
    from stream.settings import kafka_config, redis_client
    from stream.worker import addresses
    from workflows.catalogue import CatalogueFeed, FeedError, catalogue_consumer, feed_file, run_topic

    setup_logging(False)
    settings = settings_from(config, run_dir, milvus_prefix=prefix)
    addr = addresses(settings)
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    client = redis_client(settings, addr["redis"])
    index = ItemIndex(addr["milvus"], token=token, prefix=settings.milvus_prefix)
    producer = Producer(kafka_config(settings, "producer", bootstrap=addr["kafka"]))
    try:
        with interruptible("records applied so far stay; the rest is applied by the next run"):
            feed = CatalogueFeed(CatalogueStore(client, settings.milvus_prefix), index)
            if file is not None:
                stats = feed_file(feed, file, producer, settings.catalog_dlq_topic, progress=progress)
            else:
                consumer = catalogue_consumer(settings, addr["kafka"])
                stats = run_topic(feed, consumer, producer, settings, idle_exit_s=idle_exit)
    except FeedError as exc:
        raise fail(exc, 1) from None
    finally:
        index.close()
        client.close()
    typer.echo(
        f"catalogue: {stats.records} records ({stats.new_items} new items), {stats.indexed} indexed into "
        f"{', '.join(stats.versions) or '-'}, {stats.trained} already trained, {stats.blank} without a known "
        f"side id, {stats.dead_letters} to {settings.catalog_dlq_topic}"
    )
