"""`mind demo`: the whole system on one machine, from nothing running to nothing running.

train (+ offline baselines) -> export -> embedded stack -> index -> worker + candidate view -> replay of
the test users -> table, demo.json, PNGs -> stop. Every server, thread and subprocess is started inside a
try/finally, so an error or Ctrl-C at any step stops what was started (`Stack.stop` verifies its groups).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from mind.evaluate import plot_metric_vs_n
from mind.experiment import run_offline, table
from mind.split import comirec_split
from mind.train import TrainConfig
from stream.catalogue import CatalogueStore
from stream.embedded.process import free_port
from stream.embedded.stack import Stack, StackRunning, live_services, read_state, settings_for
from stream.settings import Settings, redis_client
from workflows.replay import plot_latency, replay
from workflows.serving import export_checkpoint, index_checkpoint


@contextlib.contextmanager
def serving(checkpoint: Path, run_dir: Path, settings: Settings) -> Iterator[tuple[Settings, str | None]]:
    """Export the checkpoint, start the embedded servers not configured, index the items; stop on exit.

    With every address configured nothing is started: the model must already be served and indexed there
    (yields version None: the replay then takes the version the recall messages carry)."""

    if not settings.embedded():
        yield settings, None
        return
    repo = run_dir / "model_repo"
    if repo.exists():  # a fresh repository: the served version is the one exported now
        shutil.rmtree(repo)
    stack_dir = run_dir / "stack"
    state = read_state(stack_dir) if stack_dir.exists() else None
    if state is not None and live_services(state):
        raise StackRunning(f"a stack runs on {stack_dir}: `mind down --run-dir {stack_dir}` first", state)
    # a fresh stack: the broker keeps its log in memory, so stored windows/offsets of an earlier run
    # would not match it, and milvus-lite would still hold this version's index
    shutil.rmtree(stack_dir, ignore_errors=True)
    version = export_checkpoint(checkpoint, repo)
    stack = Stack(stack_dir, settings, model_repository=repo)
    try:
        stack.start()
        s = settings_for(stack, settings)
        assert s.milvus_uri is not None
        # published to the catalogue too, so that `mind catalogue` can add new items to this stack
        store = CatalogueStore(redis_client(s), s.milvus_prefix) if s.catalog_enabled else None
        index_checkpoint(
            checkpoint, s.milvus_uri, repo=repo, prefix=s.milvus_prefix, progress=False, catalogue=store
        )
        yield s, str(version)
    finally:
        stack.stop()


@contextlib.contextmanager
def candidate_view(run_dir: Path, settings: Settings) -> Iterator[str]:
    """`mind view` as a subprocess in its own session (stopped with its group); yields its base URL."""

    port = free_port()
    env = {**os.environ, **{f"MIND_{k.upper()}": str(v) for k, v in _addresses(settings).items()}}
    log = open(run_dir / "view.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "view", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://{settings.embedded_host}:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _addresses(settings: Settings) -> dict[str, Any]:
    keys = (
        "kafka_bootstrap",
        "redis_url",
        "triton_url",
        "milvus_uri",
        "clicks_topic",
        "recall_topic",
        "dlq_topic",
        "partitions",
    )
    out = {k: getattr(settings, k) for k in keys}
    return {k: v for k, v in out.items() if v is not None}


def view_users(url: str, want: int, timeout_s: float = 30.0) -> int:
    """Users the view holds, waiting (bounded) until it holds `want` (its group join takes ~5 s)."""
    deadline, users = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                users = int(json.loads(r.read()).get("users", 0))
            if users >= want:
                break
        time.sleep(0.5)
    return users


def summary_table(d: dict[str, Any]) -> str:
    """The short table the demo prints."""
    rows = [f"{'':<22}{'offline':>10}{'streaming':>11}"]
    for key in ("recall@20", "hr@20", "recall@50", "hr@50", "ndcg@50", "recall@100", "hr@100"):
        if key in d["offline"] and key in d["replay"]:
            rows.append(f"{key:<22}{d['offline'][key]:>10.4f}{d['replay'][key]:>11.4f}")
    a = d["agreement"]["relative"]
    lat = d["latency_ms"]
    rows += [
        f"{'agreement @50 (rel.)':<22}recall {a.get('recall@50', 0):.2%}, hr {a.get('hr@50', 0):.2%} "
        f"({'OK' if a.get('ok') else 'NOT within 1 %'})",
        f"{'same candidate lists':<22}{d['equal_lists']} of {d['users']} users",
        f"{'latency p50 / p99':<22}{lat['p50']} / {lat['p99']} ms",
        f"{'throughput':<22}{d['throughput_cps']} clicks/s ({d['published']} clicks)",
        f"{'DLQ / lost / missing':<22}{d['dlq']} / {d['lost']} / {d['missing']}",
    ]
    return "\n".join(rows)


def run_demo(
    inter: Any,
    out: Path,
    run_dir: Path,
    settings: Settings,
    *,
    budget_s: float = 60.0,
    epochs: int = 30,
    users: int | None = None,
    speed: float | str | None = None,
    rate: float | None = 300.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The demo's steps 1-5; returns what demo.json holds."""

    t0 = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    echo(
        f"1/4 training MIND and the baselines on {inter.name} ({len(inter.users)} users, "
        f"{inter.n_items - 2} items; budget {budget_s:g} s)"
    )
    offline = run_offline(
        inter,
        models=("mostpop", "itemcf", "mind"),
        train_cfg=TrainConfig(epochs=epochs, max_seconds=budget_s),
        checkpoint_dir=run_dir / "checkpoints",
        progress=False,
    )
    echo(table(offline))
    checkpoint = run_dir / "checkpoints" / "mind.pt"
    cases = comirec_split(inter, seed=1230).test[: users or None]
    t_train = time.monotonic() - t0
    echo("2/4 exporting, starting the embedded stack, indexing the items")
    with serving(checkpoint, run_dir, settings) as (s, version):
        t_up = time.monotonic() - t0 - t_train
        echo(f"3/4 worker + candidate view; replaying {len(cases)} test users")
        with candidate_view(run_dir, s) as url:
            rep = replay(checkpoint, inter, s, cases, speed, rate=rate, model_version=version)
            held = view_users(url, rep.users - rep.missing)
    d = rep.as_dict()
    d.update(
        view_users=held,
        baselines=offline["models"],
        seconds={
            "train": round(t_train, 1),
            "stack_up_and_index": round(t_up, 1),
            "total": round(time.monotonic() - t0, 1),
        },
        checkpoint=str(checkpoint),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(d, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    plot_latency(rep.latencies_ms, out.with_name(out.stem + "_latency.png"))
    curves = {
        **{k: v for k, v in offline["models"].items() if k != "mind"},
        "mind (offline)": rep.offline,
        "mind (streaming)": rep.replay,
    }
    plot_metric_vs_n(curves, out.with_name(out.stem + "_recall_vs_n.png"), metric="recall")
    echo(f"4/4 done in {d['seconds']['total']:.0f} s; the view holds {held} users\n")
    echo(summary_table(d))
    return d


def write_replay(d: dict[str, Any], out: Path, latencies_ms: Sequence[float]) -> None:
    """`mind replay`'s files: the JSON and the latency histogram beside it."""

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(d, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    plot_latency(latencies_ms, out.with_name(out.stem + "_latency.png"))
