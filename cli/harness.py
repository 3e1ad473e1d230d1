"""The harness commands of `mind`: `mind bench ...` (train, serving, pipeline, scale, soak, backpressure)
and `mind chaos`. They need the `harness` extra (hypothesis, psutil); without it they say so and exit 2.

The harness modules are imported inside the commands: a worker install without the extra still runs
every other command."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from cli.options import Data, Fmt, fail, interruptible, load_data, run_on_stack, setup_logging

commands = typer.Typer()
bench = typer.Typer(no_args_is_help=True, help="Benchmarks; each writes a JSON results file and a PNG.")

EXTRA = "harness"
EXTRA_MODULES = ("hypothesis", "psutil")


@contextmanager
def harness_extra() -> Iterator[None]:
    """Turn a missing extra dependency into one line that says what to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name == "harness":  # an image or install of the runtime only
            raise fail(
                "the harness package is not in this install: run it from a checkout of the project"
            ) from None
        if exc.name not in EXTRA_MODULES:
            raise
        raise fail(
            f"this command needs the '{EXTRA}' extra ({exc.name} is not installed): "
            f"pip install 'mind-stream[{EXTRA}]' (or `make install`)"
        ) from None


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


BenchCheckpoint = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", help="Default: runs/beauty/mind.pt, else random-init, Beauty-sized."),
]


@bench.command("train")
def bench_train(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/train.json"),
    data: Data = None,
    fmt: Fmt = "auto",
) -> None:
    """Training throughput (samples/s) per thread count and model, and evaluation time."""
    with harness_extra():
        from harness.bench_train import run
    run(load_data(data, fmt, False), out)


@bench.command("serving")
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
    catalogue_sizes: Annotated[
        str | None,
        typer.Option(
            "--catalogue-sizes",
            help="Instead: Milvus cost against catalogue size (e.g. 12k,100k,1M), FLAT and IVF_FLAT beside "
            "exact top-N, on synthetic clustered item vectors; writes benchmarks/catalogue.json by default.",
        ),
    ] = None,
) -> None:
    """Triton tower and Milvus search beside in-process torch, same run; writes JSON and a PNG."""
    if catalogue_sizes is not None:
        with harness_extra():
            from harness import bench_catalogue
        try:
            sizes_ = bench_catalogue.parse_sizes(catalogue_sizes)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--catalogue-sizes") from None
        target = out if out != Path("benchmarks/serving.json") else Path("benchmarks/catalogue.json")
        res = bench_catalogue.run(target, sizes_, log=lambda m: typer.echo(m, err=True))
        typer.echo(bench_catalogue.table(res))
        typer.echo(f"\nwrote {target} and {target.with_suffix('.png')}")
        return
    with harness_extra():
        from harness.bench_serving import BenchSizes, run, table
    sizes = BenchSizes(
        batch_sizes=_ints(batch_sizes),
        calls=calls,
        warmup=warmup,
        nqs=_ints(nq),
        milvus_reps=reps,
        n=top_n,
        recall_queries=recall_queries,
        recall_reps=recall_reps,
        n_items=items,
    )
    res = run(out, checkpoint, sizes, log=lambda m: typer.echo(m, err=True))
    typer.echo(table(res))
    typer.echo(f"\nwrote {out} and {out.with_suffix('.png')} in {res['seconds']:.0f} s")


@bench.command("coldstart")
def bench_coldstart(
    data: Annotated[Path, typer.Option("--data", envvar="MIND_DATA", help="Data set (file or directory).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Results JSON; default reports/coldstart_<data set>.json."),
    ] = None,
    holdout: Annotated[
        str, typer.Option(help="auto (latest with timestamps, else random) | latest | random")
    ] = "auto",
    fraction: Annotated[float, typer.Option(min=0.01, max=0.9, help="Share of the items held out.")] = 0.1,
    budget: Annotated[float, typer.Option(min=1.0, help="Training seconds per model.")] = 600.0,
    threads: Annotated[int, typer.Option(min=0, help="Torch threads (0 = default).")] = 1,
    checkpoints: Annotated[
        Path, typer.Option(help="Where the models are kept (reused when trained on the same data).")
    ] = Path("runs/coldstart"),
    unknown_rate: Annotated[
        float,
        typer.Option(
            min=0.0, max=0.9, help="> 0: also score a model trained for cold start (train --unknown-rate)."
        ),
    ] = 0.1,
) -> None:
    """Cold start: hold items out of training, feed them through the catalogue, score three ways."""
    with harness_extra():
        from harness.coldstart import ColdstartConfig, run, table

    if holdout not in ("auto", "latest", "random"):
        raise typer.BadParameter("auto, latest or random", param_hint="--holdout")
    cfg = ColdstartConfig(
        holdout=holdout, fraction=fraction, budget_s=budget, threads=threads, unknown_rate=unknown_rate
    )
    target = out or Path("reports") / f"coldstart_{data.name if data.is_dir() else data.stem}.json"
    try:
        res = run(data, target, cfg, checkpoints, log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError) as exc:
        raise fail(exc) from None
    typer.echo(table(res))
    typer.echo(f"\nwrote {target} in {res['seconds']['total']:.0f} s")


@bench.command("pipeline")
def bench_pipeline(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/pipeline.json"),
    checkpoint: BenchCheckpoint = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Data set to train the default model on when there is no checkpoint."),
    ] = None,
    loads: Annotated[str, typer.Option(help="Offered loads, clicks/s.")] = "100,500,2000",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per load.")] = 15.0,
    asap_clicks: Annotated[int, typer.Option(min=0, help="Clicks of the as-fast-as-possible run.")] = 20_000,
    users: Annotated[int, typer.Option(min=1, help="Distinct users clicking.")] = 2000,
    items: Annotated[int, typer.Option(min=3, help="Catalogue size of the random-init model.")] = 12_103,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="Partitions of the clicks topic (default: the settings').")
    ] = None,
    recall_partitions: Annotated[
        int | None, typer.Option(min=1, help="Partitions of the recall topic (default: the settings').")
    ] = None,
) -> None:
    """End-to-end latency and throughput, the worker as its own process, beside the in-process reference."""
    with harness_extra():
        from harness.bench_pipeline import PipelineSizes, run, table
    setup_logging(False)
    sizes = PipelineSizes(
        loads=_ints(loads),
        seconds=seconds,
        asap_clicks=asap_clicks,
        users=users,
        n_items=items,
        partitions=partitions,
        recall_partitions=recall_partitions,
    )
    run_on_stack(out, lambda: run(out, checkpoint, data, sizes, log=typer.echo), table)


@bench.command("scale")
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
    with harness_extra():
        from harness.bench_scale import ScaleSizes, run, table
    setup_logging(False)
    sizes = ScaleSizes(
        workers=_ints(workers),
        rounds=rounds,
        partitions=partitions,
        loads=_ints(loads),
        seconds=seconds,
        asap_clicks=asap_clicks,
        n_items=items,
    )
    run_on_stack(out, lambda: run(out, checkpoint, sizes, log=typer.echo), table)


SoakCheckpoint = Annotated[
    Path | None, typer.Option("--checkpoint", "-c", help="Default: runs/beauty/mind.pt.")
]


def _load_run(out: Path, checkpoint: Path | None, run: Callable[..., dict]) -> dict:
    """One worker-process load run on a fresh embedded stack; its result written to `out` with the host."""
    with harness_extra():
        from harness.load import on_embedded_stack
        from harness.machine import host
        from harness.soak import write_result
    machine = host()
    with interruptible():
        res = on_embedded_stack(checkpoint, None, run)
    write_result(out, res, machine)
    return res


@bench.command("soak")
def soak_cmd(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/soak.json"),
    checkpoint: SoakCheckpoint = None,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of steady load.")] = 600.0,
    rate: Annotated[float | None, typer.Option(help="Clicks/s; default half the capacity.")] = None,
    capacity: Annotated[float | None, typer.Option(help="Default: benchmarks/pipeline.json.")] = None,
    sample: Annotated[float, typer.Option(min=0.1, help="Seconds between samples.")] = 5.0,
    partitions: Annotated[int | None, typer.Option(min=1, help="Of the run's topics.")] = None,
    linger_ms: Annotated[int | None, typer.Option(min=0, help="The publisher's linger.ms.")] = None,
) -> None:
    """A worker process at a steady offered load: RSS, lag, errors and latency over time."""
    with harness_extra():
        from harness.soak import SOAK_SUMMARY, soak
    res = _load_run(
        out,
        checkpoint,
        lambda s, ck, rd: soak(
            s,
            ck,
            rate_cps=rate,
            capacity_cps=capacity,
            duration_s=duration,
            sample_s=sample,
            partitions=partitions,
            linger_ms=linger_ms,
            run_dir=rd,
            png=out.with_suffix(".png"),
            log=typer.echo,
        ),
    )
    typer.echo(json.dumps({k: res[k] for k in SOAK_SUMMARY}))
    typer.echo(
        json.dumps({k: res["check"][k] for k in ("lost", "applied_twice", "unprocessed", "missing_recall")})
    )


@bench.command("backpressure")
def backpressure_cmd(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/backpressure.json"),
    checkpoint: SoakCheckpoint = None,
    offered: Annotated[float, typer.Option(min=1, help="Clicks/s, in every phase.")] = 150.0,
    fast: Annotated[float, typer.Option(min=1, help="Seconds before the slowdown.")] = 10.0,
    slow: Annotated[float, typer.Option(min=1, help="Seconds of slow key-value writes.")] = 30.0,
    recover: Annotated[float, typer.Option(min=0, help="Seconds at full speed again.")] = 10.0,
    pause_ms: Annotated[int, typer.Option(min=1)] = 900,
    period_ms: Annotated[int, typer.Option(min=1)] = 1000,
    batch_max: Annotated[int, typer.Option(min=1)] = 64,
) -> None:
    """A worker process while the key-value store is made slow (Valkey CLIENT PAUSE WRITE), then fast."""
    with harness_extra():
        from harness.soak import backpressure
    res = _load_run(
        out,
        checkpoint,
        lambda s, ck, rd: backpressure(
            s,
            ck,
            offered_cps=offered,
            fast_s=fast,
            slow_s=slow,
            recover_s=recover,
            pause_ms=pause_ms,
            period_ms=period_ms,
            batch_max=batch_max,
            run_dir=rd,
            png=out.with_suffix(".png"),
            log=typer.echo,
        ),
    )
    typer.echo(json.dumps({k: v for k, v in res.items() if k not in ("samples", "check", "bounds")}))
    typer.echo(json.dumps(res["check"]))


@commands.command("chaos")
def chaos_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Results JSON.")] = Path("chaos.json"),
    quick: Annotated[bool, typer.Option("--quick", help="The CI size: a few kills, short outages.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the data, the users and the fault timing.")] = 0,
    soak_s: Annotated[
        float | None, typer.Option("--soak-s", min=0.0, help="Soak seconds (default 600; --quick 30).")
    ] = None,
    kills: Annotated[int | None, typer.Option("--kills", min=0, help="Override the number of kills.")] = None,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Its own stack, model and logs.")] = Path(
        "runs/chaos"
    ),
) -> None:
    """Fault injection: kill -9 workers, stop each server, rebalance, roll, hostile input; checked against
    the replay's ground truth; writes chaos.json. Exit 1 when a check fails."""
    with harness_extra():
        from harness.chaos import FAILURE_FIELDS, run_chaos
    setup_logging(level="WARNING")
    with interruptible():
        d = run_chaos(out, run_dir, quick=quick, seed=seed, soak_s=soak_s, kills=kills, echo=typer.echo)
    typer.echo(f"wrote {out}")
    failed = [k for k in FAILURE_FIELDS if d[k]]
    if failed:
        typer.secho(f"FAILED: {', '.join(failed)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
