"""Pipeline benchmark (`mind bench pipeline`): click -> fresh candidates end to end, with the worker as its
own process, as it is deployed.

One embedded stack (Tansu, Valkey, milvus-lite, Triton on free loopback ports) serves one Beauty-size model:
`runs/beauty/mind.pt` when it exists; else, with Beauty on disk, the default Beauty model, trained first
(progress bar) and saved there; else a random-init MIND sized like Beauty. For each offered load a fresh
load run (harness/load.py): fresh topics and consumer group, one worker process (`python -m
stream.worker`), every user's window filled first (untimed, so each refresh pays full windows), then
clicks at the fixed rate for `seconds`. The "asap" run publishes `asap_clicks` as fast as possible: the
rate the worker answered them is the most it sustains. The load generator and the recall reader are this
process, the worker is another, and the four servers are theirs.

Per load: end-to-end p50 / p99 / p99.9 (click produced -> the first recall message covering it consumed),
achieved rate, lag (by Little's law, and whether it grew), per-stage p50 / p99 (the worker's own per-batch
timings, from its debug log), the CPU seconds each process used, and the outcome checked against what was
published: clicks lost and applied twice (both must be 0).

The broker alone, in the same run: one message at a time produced -> consumed at 100 messages/s with the
load generator's linger and the worker's fetch wait (`broker_hop_ms`); a click pays that hop twice.

Reference, in the same run: the same model in torch in this process (tower, exact top-N per interest with
the seen items dropped, the Eq. 3 merge) on the asap run's clicks, in micro-batches of the size the worker
formed at capacity; clicks/s, and pipeline / reference.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from harness.bench_serving import BEAUTY, random_checkpoint
from harness.load import DEFAULT_CHECKPOINT, LoadRun, _lag, fresh_topics, sustained_cps
from harness.machine import host, loadavg
from mind.experiment import build, rule_settings, write_json
from mind.loaders import filter_kcore, load
from mind.model import MIND
from mind.retrieval import exact_topn, merge_interests
from mind.split import comirec_split
from mind.train import load_checkpoint, save_checkpoint, train
from stream.embedded.stack import read_state
from stream.settings import Settings, kafka_config, load_settings
from stream.topics import ensure_topics
from stream.window import Catalog, load_catalog
from workflows.demo import serving

DEFAULT_DATA = Path("../shared/data/beauty")
STAGES = ("parse", "window", "triton", "kv_write", "recall", "produce", "commit")
SERVERS = ("kafka", "redis", "milvus", "triton")


@dataclass
class PipelineSizes:
    """How much to measure; the defaults are the committed benchmark, tests pass tiny ones."""

    loads: tuple[int, ...] = (100, 500, 2000)  # offered clicks/s
    seconds: float = 15.0  # per fixed load
    asap_clicks: int = 20_000  # clicks of the as-fast-as-possible run (0 = skip it)
    users: int = 2000  # distinct users clicking (their windows are filled first)
    n: int = 50  # candidates per recall message
    n_items: int = BEAUTY["n_items"]  # random-init model only
    publisher_linger_ms: int = 1  # the load generator's linger.ms: a web backend batching its sends a little
    drain_timeout_s: float = 180.0  # per run: the longest wait for the last recall
    partitions: int | None = None  # clicks topic; None = the settings' (MIND_PARTITIONS, default 4)
    recall_partitions: int | None = None  # recall topic; None = the settings' (MIND_RECALL_PARTITIONS)


# ---- the model -----------------------------------------------------------------------------------------


def default_model(
    checkpoint: Path | None, data: Path | None, n_items: int, tmp: Path, log: Callable[[str], None]
) -> tuple[Path, str]:
    """The checkpoint to serve and what it is: the one given; else runs/beauty/mind.pt; else, with Beauty on
    disk, the default Beauty model trained now and saved there (so a newcomer's run matches the README);
    else a random-init MIND with Beauty's catalogue size."""
    if checkpoint is not None:
        return Path(checkpoint), str(checkpoint)
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT, f"{DEFAULT_CHECKPOINT} (trained)"
    source = data or DEFAULT_DATA
    if source.exists():
        log(f"no {DEFAULT_CHECKPOINT}: training the default model on {source} first")
        inter = filter_kcore(load(source))
        split = comirec_split(inter)
        cfg, tcfg = build(inter, split, "mind", rule_settings(inter, split, "mind"))
        net = MIND(cfg)
        res = train(net, inter, np.asarray(split.train_users), split.valid, tcfg, progress=True)
        DEFAULT_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(DEFAULT_CHECKPOINT, net, inter, tcfg, extra={"epoch": res.best_epoch})
        return DEFAULT_CHECKPOINT, f"{DEFAULT_CHECKPOINT} (trained now on {source}, {res.seconds:.0f} s)"
    ckpt = random_checkpoint(tmp / "random.pt", n_items=n_items)
    return ckpt, f"random-init MIND sized like Beauty ({n_items} items)"


# ---- one load ------------------------------------------------------------------------------------------


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user + system CPU seconds each process has used so far (absent if it is gone)."""
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = (
                t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
            )
        except psutil.Error:
            continue
    return out


def _pcts(x: list[float]) -> dict[str, float | None]:
    a = np.asarray(x, dtype=np.float64)
    if not len(a):
        return {"p50": None, "p99": None, "mean": None}
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
    }


def stage_stats(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage p50 / p99 / mean ms per batch from the worker's per-batch log lines, and the batch sizes."""
    out: dict[str, Any] = {s: _pcts([b["ms"].get(s, 0.0) for b in batches]) for s in STAGES}
    sizes = [b["size"] for b in batches]
    out["batches"] = len(batches)
    out["clicks_per_batch"] = _pcts([float(s) for s in sizes])
    out["users_per_batch"] = _pcts([float(b.get("users", 0)) for b in batches])
    means = {s: out[s]["mean"] or 0.0 for s in STAGES}
    out["bottleneck"] = max(STAGES, key=lambda s: means[s]) if batches else None
    return out


def _one_load(
    settings: Settings,
    checkpoint: Path,
    run_dir: Path,
    rate: float | None,
    label: str,
    sizes: PipelineSizes,
    servers: dict[str, int],
    log: Callable[[str], None],
) -> tuple[dict[str, Any], list[float], LoadRun, int]:
    """One load on fresh topics with a fresh worker process: its latency, rate, lag, stages, CPU, checks.
    Also returns the run and the first timed click (the reference replays the same clicks)."""
    s = settings.model_copy(update={"recall_n": sizes.n})
    with LoadRun(
        s,
        checkpoint,
        run_dir,
        users=sizes.users,
        label=f"pipe{label}",
        linger_ms=sizes.publisher_linger_ms,
        worker_log_level="DEBUG",
    ) as run:
        run.prefill(s.window_len, timeout_s=sizes.drain_timeout_s)
        worker = run.workers[0]
        worker.read_log()
        skip = len(worker.events)  # the prefill's batches are not timed
        pids = {"worker": worker.pid, "load generator + reader": os.getpid(), **servers}
        cpu0, t0 = _cpu_seconds(pids), time.monotonic()
        if rate is None:
            first, end = run.publish(None, clicks=sizes.asap_clicks)
        else:
            first, end = run.publish(rate, seconds=sizes.seconds)
        drained = run.drain(sizes.drain_timeout_s)
        cpu1, wall = _cpu_seconds(pids), time.monotonic() - t0
        phase = run.phase(first, end)
        run.stop_workers()
        check = run.verify()
        batches = [e for e in worker.events[skip:] if e.get("event") == "batch"]
    ok = [x for x in run.lat[first:end] if np.isfinite(x)]
    res = {
        "offered_cps": rate,
        "p50_ms": phase["p50_ms"],
        "p99_ms": phase["p99_ms"],
        "p999_ms": phase["p999_ms"],
        "mean_ms": phase["mean_ms"],
        "max_ms": phase["max_ms"],
        "achieved_cps": phase["achieved_cps"],
        "clicks": phase["clicks"],
        "missing": phase["missing"],
        "drained": drained,
        "lost": check["lost"],
        "applied_twice": check["applied_twice"],
        "out_of_order_users": check["out_of_order_users"],
        "uncommitted": check["uncommitted"],
        "dlq": check["dlq"],
        "lag": _lag(ok, phase["achieved_cps"]),
        "stages_ms": stage_stats(batches),
        "cpu_seconds": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1 if k in cpu0},
        "wall_seconds": round(wall, 2),
    }
    log(
        f"{label:>5} clicks/s: p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, p99.9 {res['p999_ms']} ms, "
        f"achieved {res['achieved_cps']} clicks/s, lag x{res['lag']['growth']}, "
        f"{res['stages_ms']['clicks_per_batch']['mean']} clicks/batch, lost {res['lost']}, "
        f"twice {res['applied_twice']}"
    )
    return res, ok, run, first


# ---- one broker hop --------------------------------------------------------------------------------------


def broker_hop(
    settings: Settings, linger_ms: int, messages: int = 300, rate: float = 100.0, warm: int = 20
) -> dict[str, Any]:
    """Produced -> consumed through the broker alone, one message at a time at `rate`, with the load
    generator's linger and the worker's consumer settings (fetch wait): what each of a click's two hops
    (clicks topic, recall topic) costs before any worker stage runs. The first `warm` are not counted."""
    tag = f"hop-{os.getpid()}-{time.monotonic_ns()}"
    s = fresh_topics(settings, tag, partitions=1)
    ensure_topics(AdminClient(kafka_config(s, "admin")), s)
    producer = Producer(kafka_config(s, "producer", **{"linger.ms": linger_ms}))
    consumer = Consumer(kafka_config(s, "consumer"))
    consumer.subscribe([s.clicks_topic])
    hops: list[float] = []
    try:
        for k in range(warm + messages):
            key = str(k).encode()
            t0 = time.perf_counter()
            producer.produce(s.clicks_topic, b"x", key)
            producer.poll(0)
            while True:  # the first one also waits out the group join
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None and msg.key() == key:
                    break
                if k >= warm and time.perf_counter() - t0 > 10.0:
                    raise RuntimeError("the broker did not deliver a message within 10 s")
            if k >= warm:
                hops.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(max(0.0, t0 + 1.0 / rate - time.perf_counter()))  # pacing, not waiting on a condition
    finally:
        consumer.close()
        producer.flush(5)
    a = np.asarray(hops)
    return {
        "messages": len(hops),
        "rate": rate,
        "linger_ms": linger_ms,
        "fetch_wait_max_ms": s.fetch_wait_max_ms,
        **{k: round(float(np.percentile(a, q)), 3) for k, q in (("p50", 50), ("p99", 99), ("p999", 99.9))},
    }


# ---- the in-process reference ----------------------------------------------------------------------------


@torch.inference_mode()
def reference_cps(
    model: MIND, catalog: Catalog, run: LoadRun, first: int, batch: int, n: int
) -> dict[str, Any]:
    """Clicks/s of the same model on the same clicks in this process: each click's window (its user's
    items up to it, the last L) through the torch tower, exact top-(n + |window|) per interest against the
    catalogue's item vectors, the Eq. 3 merge with the window's items dropped; `batch` clicks per batch."""
    side_t = torch.as_tensor(catalog.item_side)
    items = model.item_vectors(side_t)  # the index, built once (as Milvus is, before the run)
    L = model.cfg.max_len
    wins: list[list[int]] = []
    users: list[str] = []
    for user, seqs in run.seqs.items():
        hist = run.history[user]
        for i, q in enumerate(seqs):
            if q >= first:
                wins.append(hist[max(0, i + 1 - L) : i + 1])
                users.append(user)
    order = np.random.default_rng(0).permutation(len(wins))  # users interleaved, as in the stream
    wins, users = [wins[i] for i in order], [users[i] for i in order]
    batches = []
    for i in range(0, len(wins), batch):
        w = wins[i : i + batch]
        prof = [catalog.profile_row(u, []) for u in users[i : i + batch]]
        ids, side, p = catalog.tower_inputs(w, prof, L)
        batches.append((torch.as_tensor(ids), torch.as_tensor(side), torch.as_tensor(p), w))
    warm = batches[: max(1, len(batches) // 10)]
    times: list[float] = []
    for ids, side, p, w in warm + batches:
        t0 = time.perf_counter()
        v, active = model(ids, side, p)
        per = n + max(len(x) for x in w)
        top_ids, scores = exact_topn(v, active, items, per)
        merge_interests(top_ids, scores, n, seen=[set(x) for x in w])
        times.append(time.perf_counter() - t0)
    timed = times[len(warm) :]
    return {
        "cps": round(len(wins) / sum(timed), 1),
        "clicks": len(wins),
        "batch": batch,
        "batch_from": "the median batch the worker formed in the asap run",
        "ms_per_batch_p50": round(float(np.median(timed)) * 1e3, 2),
        "torch_threads": torch.get_num_threads(),
    }


# ---- the whole benchmark ---------------------------------------------------------------------------------


def plot_latency(lat: dict[str, list[float]], path: Path, title: str) -> Path:
    """One latency histogram per load (log-spaced bins, p50 / p99 / p99.9 marked), side by side in one PNG."""
    keys = list(lat)
    fig = Figure(figsize=(4.2 * len(keys), 3.6))
    FigureCanvasAgg(fig)
    for i, k in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        x = np.asarray(lat[k], dtype=np.float64)
        if not len(x):
            continue
        ax.hist(x, bins=np.geomspace(max(x.min(), 0.1), max(x.max(), 1.0) * 1.01, 40))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor labels collide on a narrow panel
        for p, style in ((50, "--"), (99, ":"), (99.9, "-.")):
            q = float(np.percentile(x, p))
            ax.axvline(q, color="k", linestyle=style, label=f"p{p:g} {q:.1f} ms")
        ax.legend(fontsize=8)
        ax.set_title(f"{k} clicks/s" if k != "asap" else "asap (as fast as possible)", fontsize=9)
        ax.set_xlabel("click produced -> recall consumed (ms)")
        if i == 0:
            ax.set_ylabel("clicks")
    fig.suptitle(textwrap.fill(title, width=int(60 * len(keys))), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run(
    out: Path,
    checkpoint: Path | None = None,
    data: Path | None = None,
    sizes: PipelineSizes | None = None,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the embedded stack, serve and index the model, run every load, the asap run and the reference;
    write the JSON and PNGs (one latency histogram per load, and all of them in one). Everything started
    is stopped on any exit."""
    import tempfile

    sizes = sizes or PipelineSizes()
    out = Path(out)
    t_start = time.perf_counter()
    machine = host()
    with tempfile.TemporaryDirectory(prefix="mind-bench-pipeline-") as tmp:
        rd = Path(run_dir) if run_dir is not None else Path(tmp)
        ckpt, source = default_model(checkpoint, data, sizes.n_items, Path(tmp), log)
        model, meta = load_checkpoint(ckpt)
        catalog = load_catalog(ckpt)
        log(f"model {source}")
        ports = {f"embedded_{k}_port": 0 for k in ("kafka", "redis", "triton_grpc", "triton_http")}
        ports.update(embedded_triton_metrics_port=0, embedded_milvus_port=0)
        layout = {"partitions": sizes.partitions, "recall_partitions": sizes.recall_partitions}
        settings = load_settings(
            None,
            metrics_port=0,
            log_level="WARNING",
            window_len=model.cfg.max_len,
            **ports,
            **{k: v for k, v in layout.items() if v is not None},
        )
        loads: dict[str, Any] = {}
        lat: dict[str, list[float]] = {}
        asap_run: tuple[LoadRun, int] | None = None
        with serving(ckpt, rd, settings) as (s, version):
            state = read_state(rd / "stack") or {}
            servers = {k: v["pid"] for k, v in state.get("services", {}).items() if k in SERVERS}
            log(f"stack up, model {version} indexed after {time.perf_counter() - t_start:.0f} s")
            hop = broker_hop(s, sizes.publisher_linger_ms)
            log(f"one broker hop at 100 messages/s: p50 {hop['p50']} ms, p99 {hop['p99']} ms")
            runs: list[tuple[str, float | None]] = [(str(r), float(r)) for r in sizes.loads]
            if sizes.asap_clicks:
                runs.append(("asap", None))
            for label, rate in runs:
                loads[label], lat[label], lr, first = _one_load(s, ckpt, rd, rate, label, sizes, servers, log)
                if rate is None:
                    asap_run = (lr, first)
        asap = loads.pop("asap", None)
        if asap is not None and asap_run is not None:
            batch = int(round(asap["stages_ms"]["clicks_per_batch"]["p50"] or 1))
            ref = reference_cps(model, catalog, *asap_run, max(1, batch), sizes.n)
        else:
            ref = {"cps": None}
        log(f"in-process reference: {ref['cps']} clicks/s")
    max_sustained = sustained_cps(loads, asap)
    machine["loadavg_end"] = loadavg()
    res: dict[str, Any] = {
        "catalogue": {
            "source": source,
            "dataset": meta.get("dataset"),
            "items": int(model.cfg.n_items),
            "d": int(model.cfg.d),
            "K": int(model.cfg.K),
            "L": int(model.cfg.max_len),
            "recall_n": sizes.n,
            "clicks": f"synthetic: {sizes.users} users, Zipf-drawn items, windows filled first",
        },
        "loads": loads,
        "broker_hop_ms": hop,
        "asap": asap,
        "max_sustained_cps": max_sustained,
        "reference_cps": ref["cps"],
        "reference": ref,
        "ratio_pipeline_to_reference": round(max_sustained / ref["cps"], 3) if ref["cps"] else None,
        "lost": sum(r["lost"] for r in [*loads.values(), *([asap] if asap else [])]),
        "applied_twice": sum(r["applied_twice"] for r in [*loads.values(), *([asap] if asap else [])]),
        "worker": {
            k: getattr(s, k)
            for k in (
                "batch_max",
                "batch_timeout_ms",
                "fetch_wait_max_ms",
                "partitions",
                "recall_partitions",
                "producer_linger_ms",
                "event_id_memory",
            )
        },
        "notes": (
            "worker: its own process (python -m stream.worker); load generator and recall reader: this "
            "process; servers: theirs; all on the same cores. max_sustained_cps: the asap run's achieved "
            "rate or the highest fixed load kept up with (lag bounded). stages_ms: the worker's per-batch "
            "timings (debug log), ms per batch; the tail stages (kv_write, recall, produce) of batch n "
            "overlap the head stages (window, triton) of batch n+1."
        ),
        "sizes": asdict(sizes),
        "machine": machine,
        "seconds": round(time.perf_counter() - t_start, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out, res)
    title = f"End-to-end latency, worker as a process; {source}; load average {machine['loadavg_start']}"
    for label, x in lat.items():
        plot_latency({label: x}, out.with_name(f"{out.stem}_{label}.png"), title)
    plot_latency(lat, out.with_suffix(".png"), title)
    return res


def table(res: dict[str, Any]) -> str:
    """The results as a short text table."""
    rows = [
        f"{'load (clicks/s)':>16}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'achieved':>10}{'lag growth':>12}"
    ]
    for k, r in [*res["loads"].items(), *([("asap", res["asap"])] if res.get("asap") else [])]:
        rows.append(
            f"{k:>16}{r['p50_ms']!s:>9}{r['p99_ms']!s:>9}{r['p999_ms']!s:>10}{r['achieved_cps']:>10}"
            f"{r['lag']['growth']!s:>12}"
        )
    top = res["asap"] or res["loads"][max(res["loads"], key=float)]
    st = top["stages_ms"]
    rows += [
        f"max sustained {res['max_sustained_cps']} clicks/s; in-process reference {res['reference_cps']} "
        f"clicks/s (batch {res['reference'].get('batch')}); ratio {res['ratio_pipeline_to_reference']}",
        f"stages at capacity (ms per batch p50/p99, {st['clicks_per_batch']['mean']} clicks/batch): "
        + ", ".join(f"{s} {st[s]['p50']}/{st[s]['p99']}" for s in STAGES)
        + f"; bottleneck {st['bottleneck']}",
        f"CPU seconds at capacity: {top['cpu_seconds']}",
        f"one broker hop, produced -> consumed at 100 messages/s (ms p50/p99/p99.9): "
        f"{res['broker_hop_ms']['p50']}/{res['broker_hop_ms']['p99']}/{res['broker_hop_ms']['p999']}; "
        "a click makes two (clicks topic, recall topic)",
        f"lost {res['lost']}, applied twice {res['applied_twice']}; "
        f"load average {res['machine']['loadavg_start']} -> {res['machine']['loadavg_end']}",
    ]
    return "\n".join(rows)
