"""The stream commands of `mind`: up, down, status, publish, view, candidates, worker, topics.

Every command takes `--config FILE` and reads MIND_* environment variables through stream.settings
(flags override both). Addresses left unset are taken from the stack running on the run dir (`mind up`),
so after `mind up` the other commands need no address at all. The worker, the view and the publisher are
imported inside their commands (torch, faust): `mind --help` stays fast.

Exit codes: 0 fine; 1 failed (a service did not start, messages undelivered, view unreachable);
2 bad input (flags, config, source file); 3 a stack is already running / none is running;
4 unknown user (`mind candidates`).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from cli.options import AsJson, Bootstrap, Config, RunDir, echo_json, fail, settings_from, setup_logging
from stream.embedded.stack import (
    SERVICES,
    Stack,
    StackError,
    StackRunning,
    down,
    owner_alive,
    read_state,
    status,
    terminate_as_interrupt,
)
from stream.settings import kafka_config
from stream.topics import ensure_topics, topic_specs

VIEW_URL = "http://127.0.0.1:6066"


# ---- up / down / status ---------------------------------------------------------------------------------


def _print_stack(state: dict[str, Any]) -> None:
    for name, svc in state.get("services", {}).items():
        health = "" if "healthy" not in svc else ("  healthy" if svc["healthy"] else "  NOT HEALTHY")
        typer.echo(f"  {name:<7} {svc['address']:<28} pid {svc['pid']:<8} log {svc['log_dir']}{health}")
    for name, why in state.get("skipped", {}).items():
        typer.echo(f"  {name:<7} skipped: {why}")
    env = {
        "kafka_bootstrap": "MIND_KAFKA_BOOTSTRAP",
        "redis_url": "MIND_REDIS_URL",
        "milvus_uri": "MIND_MILVUS_URI",
        "triton_url": "MIND_TRITON_URL",
    }
    addrs = state.get("addresses", {})
    if addrs:
        typer.echo("  other processes find these through the run dir, or:")
        typer.echo("    export " + " ".join(f"{env[k]}={v}" for k, v in addrs.items()))


def _up_detached(run_dir: Path, argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Start `mind up` (foreground mode) as a background supervisor; return its state once ready."""

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "stack.log"
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives this terminal; `mind down` stops it
        )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            code = child.poll()
            if code is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise fail(
                    f"the stack did not start (exit {code}); {log_path}:\n{tail}", 3 if code == 3 else 1
                )
            state = read_state(run_dir)
            if state and state.get("phase") == "ready" and (state.get("owner") or {}).get("pid") == child.pid:
                return state
            if time.monotonic() > deadline:
                raise fail(f"the stack was not ready within {timeout_s:.0f}s; see {log_path}", 1)
            time.sleep(0.1)
    except BaseException:  # Ctrl-C or failure while waiting: the supervisor cleans up on SIGTERM
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
        state = read_state(run_dir)
        if state and not owner_alive(state):
            down(run_dir)
        raise


def up(
    config: Config = None,
    run_dir: RunDir = None,
    model_repo: Annotated[
        Path, typer.Option("--model-repo", envvar="MIND_MODEL_REPO", help="Triton model repository.")
    ] = Path("model_repo"),
    triton: Annotated[
        bool | None,
        typer.Option(
            "--triton/--no-triton", help="Require / skip Triton (default: start it if a model exists)."
        ),
    ] = None,
    only: Annotated[
        str | None, typer.Option("--only", help="Comma-separated subset: kafka,redis,milvus,triton.")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background; return when ready.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for --detach.")] = 300.0,
    as_json: AsJson = False,
) -> None:
    """Start the embedded broker, key-value store, Milvus and Triton on loopback (Ctrl-C stops them)."""

    settings = settings_from(config, run_dir, use_stack=False)
    services = tuple(s.strip() for s in only.split(",")) if only else None
    if services and set(services) - set(SERVICES):
        raise fail(f"--only: unknown services {sorted(set(services) - set(SERVICES))}; use {SERVICES}", 2)
    current = status(settings.run_dir)
    if current["running"]:
        typer.secho(f"a stack is already running on {settings.run_dir}:", fg=typer.colors.YELLOW, err=True)
        _print_stack(current)
        raise typer.Exit(3)
    if detach:
        argv = ["--run-dir", str(settings.run_dir), "--model-repo", str(model_repo)]
        argv += ["--config", str(config)] if config else []
        argv += [] if triton is None else ["--triton" if triton else "--no-triton"]
        argv += ["--only", only] if only else []
        state = _up_detached(Path(settings.run_dir), argv, timeout)
        if as_json:
            echo_json(state)
        else:
            typer.echo(f"stack ready on {settings.run_dir} (supervisor pid {state['owner']['pid']}):")
            _print_stack(state)
        return
    setup_logging(level="INFO")
    stack = Stack(
        settings.run_dir,
        settings,
        model_repository=model_repo,
        services=services,
        triton=triton,
        supervisor=True,
    )
    code = 0
    with terminate_as_interrupt():
        try:
            t0 = time.monotonic()
            stack.start()
            state = stack.state()
            if as_json:
                echo_json(state)
            else:
                typer.echo(
                    f"stack ready in {time.monotonic() - t0:.1f}s on {stack.run_dir} (Ctrl-C stops it):"
                )
                _print_stack(state)
            sys.stdout.flush()
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            typer.echo("stopping the stack...", err=True)
        except StackRunning as exc:
            raise fail(str(exc), 3) from None
        except StackError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            code = 1
        finally:
            stack.stop()
    raise typer.Exit(code)


def down_cmd(
    config: Config = None,
    run_dir: RunDir = None,
    grace: Annotated[float, typer.Option("--grace", help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
    as_json: AsJson = False,
) -> None:
    """Stop the stack started by `mind up` on the run dir (from any process); verifies nothing is left."""

    settings = settings_from(config, run_dir, use_stack=False)
    try:
        report = down(settings.run_dir, grace_s=grace)
    except StackError as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        echo_json({"services": report.services, "owner": report.owner, "seconds": round(report.seconds, 2)})
    elif report.owner == "no stack":
        typer.echo(f"no stack on {settings.run_dir}")
    else:
        for name, what in report.services.items():
            typer.echo(f"  {name:<7} {what}")
        typer.echo(
            f"stack on {settings.run_dir} stopped in {report.seconds:.1f}s (supervisor: {report.owner})"
        )


def status_cmd(config: Config = None, run_dir: RunDir = None, as_json: AsJson = False) -> None:
    """What runs on the run dir, with a health check per service (exit 3: nothing runs, 1: unhealthy)."""

    settings = settings_from(config, run_dir, use_stack=False)
    st = status(settings.run_dir)
    healthy = st["running"] and all(s["healthy"] for s in st["services"].values())
    if as_json:
        echo_json({**st, "healthy": healthy})
    elif not st["running"]:
        typer.echo(f"no stack running on {settings.run_dir}")
    else:
        owner = st.get("owner") or {}
        alive = "alive" if st["owner_alive"] else "GONE"
        typer.echo(f"stack on {st['run_dir']} ({st['phase']}; owner pid {owner.get('pid')} {alive}):")
        _print_stack(st)
    if not st["running"]:
        raise typer.Exit(3)
    if not healthy:
        raise typer.Exit(1)


# ---- publish / view / candidates / worker ---------------------------------------------------------------


def publish_cmd(
    source: Annotated[Path, typer.Argument(help="A JSONL click log, or any data set mind.loaders reads.")],
    rate: Annotated[float | None, typer.Option("--rate", help="Clicks per second (default: max).")] = None,
    speedup: Annotated[
        float | None, typer.Option("--speedup", help="Replay the original timestamps N times faster.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N events.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="JSONL lines sent unvalidated and unmodified.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="auto|jsonl|recbole|sequences|pairs")] = "auto",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip (and count) invalid lines.")] = False,
    topic: Annotated[str | None, typer.Option("--topic", help="Default: the clicks topic.")] = None,
    ensure_topics: Annotated[bool, typer.Option("--ensure-topics/--no-ensure-topics")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    config: Config = None,
    run_dir: RunDir = None,
    bootstrap: Bootstrap = None,
    as_json: AsJson = False,
) -> None:
    """Send a click log or a data set to the clicks topic (key = user id), paced, delivery confirmed."""
    from workflows.publish import PublishError, publish  # the data loaders: imported when needed

    settings = settings_from(config, run_dir, kafka_bootstrap=bootstrap)
    if not settings.kafka_bootstrap:
        raise fail("no broker: start one with `mind up`, or pass --bootstrap / MIND_KAFKA_BOOTSTRAP", 3)
    try:
        stats = publish(
            source,
            settings,
            rate=rate,
            speedup=speedup,
            limit=limit,
            progress=progress,
            raw=raw,
            fmt=fmt,
            skip_bad=skip_bad,
            topic=topic,
            ensure=ensure_topics,
        )
    except (PublishError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        echo_json(stats.as_dict())
    else:
        typer.echo(
            f"{stats.delivered}/{stats.sent} clicks delivered to {stats.topic} in {stats.seconds:.2f}s "
            f"({stats.rate:.0f}/s); {stats.failed} failed, {stats.skipped} invalid skipped"
        )
    if stats.failed:
        raise fail(f"{stats.failed} messages not delivered: {stats.first_error}", 1)
    if stats.interrupted:
        raise fail("interrupted: the rest of the source was not sent", 130)


def view_cmd(
    host: Annotated[str, typer.Option("--host", envvar="MIND_VIEW_HOST", help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="MIND_VIEW_PORT")] = 6066,
    app_id: Annotated[
        str, typer.Option("--app-id", envvar="MIND_VIEW_APP_ID", help="Distinct per full replica.")
    ] = "mind-view",
    store: Annotated[
        str, typer.Option("--store", envvar="MIND_VIEW_STORE", help="memory:// or rocksdb://")
    ] = "memory://",
    max_in_flight: Annotated[
        int, typer.Option("--max-in-flight", help="Concurrent requests, then 503.")
    ] = 256,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", help="Model checkpoint: raw item and side ids on the user page (MIND_CHECKPOINT)."
        ),
    ] = None,
    config: Config = None,
    run_dir: RunDir = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Serve GET /users/{id}/candidates, the user page /users/{id} and /metrics from a faust table of the
    recall topic (foreground; SIGTERM stops)."""
    from stream.view import run_view  # faust: imported when a view starts

    settings = settings_from(config, run_dir, kafka_bootstrap=bootstrap, checkpoint=checkpoint)
    if not settings.kafka_bootstrap:
        raise fail("no broker: start one with `mind up`, or pass --bootstrap / MIND_KAFKA_BOOTSTRAP", 3)
    run_view(
        settings,
        host=host,
        port=port,
        app_id=app_id,
        store=store,
        max_in_flight=max_in_flight,
        log_level=log_level,
    )


def candidates_cmd(
    user: Annotated[str, typer.Argument(help="User id.")],
    url: Annotated[str, typer.Option("--url", envvar="MIND_VIEW_URL", help="The candidate view.")] = VIEW_URL,
    top: Annotated[int, typer.Option("--top", "-n", help="Rows to print (all with --json).")] = 20,
    timeout: Annotated[float, typer.Option("--timeout")] = 5.0,
    as_json: AsJson = False,
) -> None:
    """Ask the candidate view for a user's latest candidates (exit 4 when the user is unknown)."""
    import orjson

    target = f"{url.rstrip('/')}/users/{urllib.parse.quote(user, safe='')}/candidates"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            body = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            err = orjson.loads(exc.read()).get("error", exc.reason)
        except (orjson.JSONDecodeError, AttributeError):
            err = exc.reason
        if exc.code == 404:
            raise fail(f"unknown user {user!r} (no recall message yet)", 4) from None
        raise fail(f"view answered {exc.code}: {err}", 2 if exc.code == 400 else 1) from None
    except (urllib.error.URLError, OSError) as exc:
        raise fail(f"cannot reach the candidate view at {url} ({exc}); is `mind view` running?", 1) from None
    if as_json:
        echo_json(body)
        return
    cands = body["candidates"]
    typer.echo(
        f"user {body['user_id']}  model {body['model_version']}  index {body['index_version']}  "
        f"event {body['event_id']}  fresh {body['freshness_s']:.2f}s  ({len(cands)} candidates)"
    )
    width = max([len("item"), *(len(c["item_id"]) for c in cands[:top])])
    typer.echo(f"  {'#':>3}  {'item':<{width}}  {'score':>9}  interest")
    for rank, c in enumerate(cands[:top], 1):
        typer.echo(f"  {rank:>3}  {c['item_id']:<{width}}  {c['score']:>9.4f}  {c['interest']:>8}")
    if len(cands) > top:
        typer.echo(f"  ... {len(cands) - top} more (--top, or --json)")


def worker_cmd(
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Model checkpoint (MIND_CHECKPOINT).")
    ] = None,
    keep_seen: Annotated[
        bool, typer.Option("--keep-seen", help="Do not drop the window's items from the candidates.")
    ] = False,
    config: Config = None,
    run_dir: RunDir = None,
    bootstrap: Bootstrap = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="MIND_REDIS_URL")] = None,
    triton_url: Annotated[str | None, typer.Option("--triton-url", help="MIND_TRITON_URL")] = None,
    milvus_uri: Annotated[str | None, typer.Option("--milvus-uri", help="MIND_MILVUS_URI")] = None,
) -> None:
    """Run the stream worker: clicks -> windows -> Triton -> Milvus -> recall (SIGTERM: graceful stop)."""
    from stream.worker import run_worker  # torch: imported when a worker starts

    settings = settings_from(
        config,
        run_dir,
        kafka_bootstrap=bootstrap,
        redis_url=redis_url,
        triton_url=triton_url,
        milvus_uri=milvus_uri,
        checkpoint=checkpoint,
        drop_seen=False if keep_seen else None,
    )
    missing = settings.embedded()
    if missing:
        raise fail(f"no address for {', '.join(missing)}: start the stack (`mind up`) or configure them", 3)
    try:
        run_worker(settings)
    except ValueError as exc:  # configuration mistakes (no checkpoint...): one line, no traceback
        raise fail(str(exc), 2) from None


# ---- topics / config-reference (deployment) -------------------------------------------------------------


def topics_cmd(
    partitions: Annotated[
        int | None,
        typer.Option("--partitions", min=1, help="Partitions of clicks and recall (MIND_PARTITIONS)."),
    ] = None,
    recall_partitions: Annotated[
        int | None,
        typer.Option(
            "--recall-partitions",
            min=1,
            help="Partitions of recall, when they differ from --partitions (MIND_RECALL_PARTITIONS).",
        ),
    ] = None,
    replication: Annotated[
        int | None, typer.Option("--replication", min=1, help="Replication factor (MIND_REPLICATION).")
    ] = None,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0, help="Seconds to keep retrying while the cluster is not ready yet."),
    ] = 0.0,
    config: Config = None,
    run_dir: RunDir = None,
    bootstrap: Bootstrap = None,
    as_json: AsJson = False,
) -> None:
    """Create the clicks, recall (compacted) and DLQ topics from the settings; print what the broker has.

    Existing topics are never altered; one that differs from the settings (partitions, configs) is
    printed and exits 1. --wait retries while brokers are still joining (e.g. replication 3 needs three).
    """

    settings = settings_from(
        config,
        run_dir,
        kafka_bootstrap=bootstrap,
        partitions=partitions,
        recall_partitions=recall_partitions,
        replication=replication,
    )
    if not settings.kafka_bootstrap:
        raise fail("no broker: start one with `mind up`, or pass --bootstrap / MIND_KAFKA_BOOTSTRAP", 3)
    admin = AdminClient(kafka_config(settings, "admin"))

    def note(rs: Any) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        typer.echo(f"cluster not ready ({str(exc)[:200]}); retrying", err=True)

    try:
        states = Retrying(
            retry=retry_if_exception_type(KafkaException),
            stop=stop_after_delay(wait),
            wait=wait_exponential(multiplier=0.5, max=5.0),
            before_sleep=note,
            reraise=True,
        )(ensure_topics, admin, settings)
    except KafkaException as exc:
        raise fail(f"could not create the topics on {settings.kafka_bootstrap}: {exc}", 1) from None
    specs = {s.name: s for s in topic_specs(settings)}
    rows = [
        {
            "topic": name,
            "created": st.created,
            "partitions": st.partitions,
            "replication": specs[name].replication,
            "config": specs[name].config,
            "mismatches": st.mismatches,
        }
        for name, st in states.items()
    ]
    if as_json:
        echo_json(rows)
    else:
        for r in rows:
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "broker defaults"
            typer.echo(
                f"  {r['topic']:<20} {'created' if r['created'] else 'exists':<8} "
                f"partitions {r['partitions']:<4} replication {r['replication']:<3} {cfg}"
            )
            for m in r["mismatches"]:
                typer.secho(f"    differs from the settings: {m} (not altered)", fg=typer.colors.YELLOW)
    if any(r["mismatches"] for r in rows):
        raise typer.Exit(1)


commands = typer.Typer()
commands.command("up")(up)
commands.command("down")(down_cmd)
commands.command("status")(status_cmd)
commands.command("publish")(publish_cmd)
commands.command("view")(view_cmd)
commands.command("candidates")(candidates_cmd)
commands.command("worker")(worker_cmd)
commands.command("topics")(topics_cmd)
