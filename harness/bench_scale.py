"""Scale-out benchmark (`mind bench scale`): throughput against the number of worker processes.

One embedded stack (Tansu, Valkey, milvus-lite, Triton on free loopback ports) serves the pipeline
benchmark's model (`runs/beauty/mind.pt` when it exists, else a random-init MIND sized like Beauty). For
each worker count (default 1, 2, 3) a fresh clicks topic with 6 partitions and a fresh consumer group get
that many `python -m stream.worker` processes (harness.soak.LoadRun: it waits until the group has settled,
every partition held once, then warms up one click per partition). Then, as `mind bench pipeline` does:
fixed offered loads, each drained before the next, and one as-fast-as-possible run; the maximum sustained
throughput is `harness.bench_pipeline.sustained_cps` of those (the best fixed load kept up with, lag bounded,
or the asap run's consumed rate). At the end of each worker count the outcome is checked against what was
published: every user's stored window equals its clicks in click order (nothing lost, nothing applied
twice, per-user order kept), every offset committed, every user's last click answered.

CPU: the cores the workers used during the asap run (process CPU seconds / wall seconds) and the
machine's busy share, so that a flat curve can be read for what it is. On this project's 2-core machine
the four servers, the publisher and reader (this process) and the workers share two cores: little growth
is expected beyond 2 workers, and the recall step (milvus-lite, one server process) is the bottleneck the
pipeline benchmark found.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from harness.bench_serving import BEAUTY
from harness.load import LoadRun, on_embedded_stack, sustained_cps
from harness.machine import host, loadavg
from mind.experiment import write_json
from mind.train import load_checkpoint
from stream.embedded.stack import read_state

SCALE_NOTE = (
    "workers are separate processes (python -m stream.worker), one consumer group, range assignment over "
    "the partitions; the publisher and the recall reader are threads of the benchmark process; all of "
    "them and the four servers share the machine's cores. max_sustained_cps: "
    "harness.bench_pipeline.sustained_cps over the fixed loads and the asap run."
)


@dataclass
class ScaleSizes:
    """How much to measure; the defaults are the committed benchmark, tests pass tiny ones."""

    workers: tuple[int, ...] = (1, 2, 3)
    rounds: int = 2  # 2: the counts run 1, 2, 3 then 3, 2, 1, so a drift of the shared machine's load cancels
    partitions: int = 6
    loads: tuple[int, ...] = (250, 500, 1000)  # offered clicks/s
    seconds: float = 10.0  # per fixed load
    asap_clicks: int = 15_000  # clicks of the as-fast-as-possible run (0 = skip it)
    n_items: int = BEAUTY["n_items"]  # random-init model only
    drain_timeout_s: float = 180.0  # per run: the longest wait for the backlog to be answered


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children (Triton's Python-backend stubs are children)."""

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _cpu(pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """(time, CPU seconds per named process) now."""
    return time.monotonic(), {name: _cpu_seconds(pid) for name, pid in pids.items()}


def server_pids(stack_dir: Path) -> dict[str, int]:
    """The embedded servers' pids from the stack's state file ({} when there is none)."""

    state = read_state(stack_dir) or {}
    return {name: int(svc["pid"]) for name, svc in state.get("services", {}).items() if svc.get("pid")}


def one_count(
    settings: Any,
    checkpoint: Path,
    workers: int,
    sizes: ScaleSizes,
    run_dir: Path,
    log: Callable[[str], None],
    servers: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Every load and the asap run with `workers` worker processes; then the outcome check. `servers`:
    name -> pid of the servers whose CPU use during the asap run is recorded beside the workers'."""

    s = settings.model_copy(update={"partitions": sizes.partitions, "max_poll_interval_ms": 15_000})
    total = int(sum(sizes.loads) * sizes.seconds) + sizes.asap_clicks
    users = max(200, 2 * total // s.window_len + 1)  # every history fits its window: the check sees it all
    t0 = time.perf_counter()
    with LoadRun(
        s, checkpoint, run_dir, workers=workers, users=users, label=f"scale{workers}", log=log
    ) as run:
        startup = round(time.perf_counter() - t0, 1)
        loads: dict[str, Any] = {}
        for rate in sizes.loads:
            a, b = run.publish(float(rate), seconds=sizes.seconds)
            run.drain(sizes.drain_timeout_s)
            r = loads[str(rate)] = {"offered_cps": float(rate), **run.phase(a, b)}
            log(
                f"{workers} worker(s), {rate:>5} clicks/s: achieved {r['achieved_cps']}, "
                f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, lag x{r['lag']['growth']}"
            )
        asap = None
        if sizes.asap_clicks:
            pids = {f"worker{i}": w.pid for i, w in enumerate(run.workers)} | (servers or {})
            psutil.cpu_percent(None)
            tc0, c0 = _cpu(pids)
            a, b = run.publish(None, clicks=sizes.asap_clicks)
            run.drain(sizes.drain_timeout_s)
            tc1, c1 = _cpu(pids)
            busy = psutil.cpu_percent(None)
            asap = {"offered_cps": None, **run.phase(a, b)}
            wall = max(tc1 - tc0, 1e-9)
            cores = {k: round((c1[k] - c0[k]) / wall, 2) for k in c0}
            cores["all workers"] = round(sum(v for k, v in cores.items() if k.startswith("worker")), 2)
            asap.update(cores=cores, machine_busy_pct=busy, loadavg=loadavg())
            log(
                f"{workers} worker(s), asap: achieved {asap['achieved_cps']} clicks/s; cores used {cores}; "
                f"machine {busy:.0f} % busy"
            )
        assignment = [sorted(w.assigned() or []) for w in run.workers]
        exit_codes = run.stop_workers()
        check = run.verify()
    return {
        "workers": workers,
        "partitions": sizes.partitions,
        "assignment": assignment,
        "startup_s": startup,
        "users": users,
        "loads": loads,
        "asap": asap,
        "max_sustained_cps": sustained_cps(loads, asap),
        "check": check,
        "worker_exit_codes": exit_codes,
    }


def run(
    out: Path,
    checkpoint: Path | None = None,
    sizes: ScaleSizes | None = None,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the embedded stack, serve and index the model, measure every worker count (in rounds); write
    the JSON and a PNG of throughput against workers beside it. Everything started is stopped on any exit."""

    sizes = sizes or ScaleSizes()
    out = Path(out)
    t_start = time.perf_counter()
    machine = host()
    rounds: dict[str, list[dict[str, Any]]] = {}
    used: dict[str, Any] = {}

    def measure(s: Any, ckpt: Path, rd: Path) -> dict[str, Any]:
        model, meta = load_checkpoint(ckpt)
        used.update(
            source=str(ckpt),
            dataset=meta.get("dataset"),
            items=int(model.cfg.n_items),
            d=int(model.cfg.d),
            K=int(model.cfg.K),
            L=int(model.cfg.max_len),
        )
        log(f"stack up after {time.perf_counter() - t_start:.0f} s; model {ckpt}")
        servers = server_pids(rd.parent / "stack")  # workflows.demo.serving's stack directory
        order = [n for r in range(sizes.rounds) for n in (sizes.workers[::-1] if r % 2 else sizes.workers)]
        for i, n in enumerate(order):
            res = one_count(s, ckpt, n, sizes, rd, log, servers)
            res["round"] = i // len(sizes.workers)
            rounds.setdefault(str(n), []).append(res)
            log(f"{n} worker(s), round {res['round']}: max sustained {res['max_sustained_cps']} clicks/s")
        return {"worker": {k: getattr(s, k) for k in ("batch_max", "batch_timeout_ms", "fetch_wait_max_ms")}}

    extra = on_embedded_stack(checkpoint, run_dir, measure, n_items=sizes.n_items)
    ks = sorted(rounds, key=int)
    sustained = {k: round(float(np.mean([r["max_sustained_cps"] for r in rounds[k]])), 1) for k in ks}
    base = sustained[ks[0]] if ks else 0.0
    machine["loadavg_end"] = loadavg()
    runs = [r for k in ks for r in rounds[k]]

    def total(key: str) -> int:
        return int(sum(r["check"][key] for r in runs))

    res: dict[str, Any] = {
        "catalogue": used,
        "partitions": sizes.partitions,
        "max_sustained_cps": sustained,
        "max_sustained_cps_rounds": {k: [r["max_sustained_cps"] for r in rounds[k]] for k in ks},
        "speedup": {k: round(sustained[k] / base, 2) if base else None for k in ks},
        "asap_cores": {k: [(r["asap"] or {}).get("cores") for r in rounds[k]] for k in ks},
        "clicks_checked": total("published"),
        "lost": total("lost"),
        "applied_twice": total("applied_twice"),
        "out_of_order_users": total("out_of_order_users"),
        "mismatched_windows": total("mismatched_windows"),
        "uncommitted": total("uncommitted"),
        "unprocessed": total("unprocessed"),
        "missing_recall": total("missing_recall"),
        "runs": runs,
        **extra,
        "notes": SCALE_NOTE
        + f" This machine has {os.cpu_count()} CPU cores: beyond {os.cpu_count()} busy processes a worker "
        "can only take CPU from the others (servers included), so little growth is expected there.",
        "sizes": asdict(sizes),
        "machine": machine,
        "seconds": round(time.perf_counter() - t_start, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out, res)
    plot(res, out.with_suffix(".png"))
    return res


def plot(res: dict[str, Any], path: Path) -> Path:
    """Max sustained throughput against worker processes (mean and each round), with linear scaling."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = sorted(res["max_sustained_cps"], key=int)
    n = [int(k) for k in ks]
    sus = [res["max_sustained_cps"][k] for k in ks]
    fig = Figure(figsize=(5.6, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(n, sus, marker="o", label="max sustained (mean of rounds)")
    xs = [int(k) for k in ks for _ in res["max_sustained_cps_rounds"][k]]
    ys = [v for k in ks for v in res["max_sustained_cps_rounds"][k]]
    ax.scatter(xs, ys, marker="x", color="tab:blue", alpha=0.6, label="each round")
    if sus and sus[0]:
        ax.plot(n, [sus[0] * k / n[0] for k in n], color="grey", linestyle="--", label="linear from 1 worker")
    cores = res["machine"].get("cpu_count")
    ax.axvline(cores, color="k", linewidth=0.6, linestyle="-.", label=f"{cores} CPU cores")
    ax.set_xticks(n)
    ax.set_xlabel(f"worker processes (one group, {res['partitions']} partitions)")
    ax.set_ylabel("clicks/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(f"Scale-out on the embedded stack; {res['catalogue'].get('source')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def table(res: dict[str, Any]) -> str:
    """The results as a short text table."""
    rows = [f"{'workers':>8}{'sustained (mean)':>18}{'rounds':>22}{'speedup':>9}"]
    for k in sorted(res["max_sustained_cps"], key=int):
        per = ", ".join(str(v) for v in res["max_sustained_cps_rounds"][k])
        rows.append(f"{k:>8}{res['max_sustained_cps'][k]:>18}{per:>22}{res['speedup'][k]!s:>9}")
    rows += [
        f"clicks checked {res['clicks_checked']}: lost {res['lost']}, applied twice {res['applied_twice']}, "
        f"users out of order {res['out_of_order_users']}, uncommitted {res['uncommitted']}, "
        f"missing recall {res['missing_recall']}",
        f"{res['machine'].get('cpu_count')} cores; load average {res['machine']['loadavg_start']} -> "
        f"{res['machine']['loadavg_end']}",
    ]
    return "\n".join(rows)
