"""Pipeline benchmark (`mind bench pipeline`): the whole stream on the embedded stack, end to end.

One embedded stack (Tansu, Valkey, milvus-lite, Triton on free loopback ports) serves one Beauty-size
model (`runs/beauty/mind.pt` when it exists, else a random-init MIND sized like Beauty). For each offered
load (clicks/s) the replay of `workflows.replay` publishes users' clicks, stamped at send time, to fresh
topics at that fixed rate; a worker started for the load turns them into recall messages; the replay's
reader times each click from produced to the first recall message consumed that covers it. An "asap"
run publishes as fast as it can: the consumed rate there is the highest throughput the pipeline sustains.

Lag: by Little's law the mean backlog (clicks produced, not yet answered) is achieved rate x mean
latency; it is bounded when the latency of the last fifth of the clicks is not far above the first
fifth's (a growing backlog makes later clicks wait longer).

Stage breakdown: the worker's own Prometheus histograms (`mind_worker_stage_seconds`, read in-process
from the registry, before/after each load): mean ms per micro-batch per stage. "kafka_wait" is the rest
of the mean click latency: the consumer's fetch wait and batch timeout, the producer's linger, the
reader's fetch, queueing behind earlier batches.

Reference, in the same run: the same tower in torch, exact top-N per interest and the Eq. 3 merge
(`mind.retrieval`), in process, 256 clicks per batch, no servers: clicks/s, and pipeline / reference.

The worker runs with the project's settings; MIND_* variables change them for a run (e.g.
MIND_BATCH_MAX=1024). The publisher, the reader and the worker are threads of this one process (as in
`mind replay`): they share the GIL and the 2 cores with the four servers. The machine is shared: the load
average is recorded at start and end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.bench_serving import BEAUTY, random_checkpoint
from harness.machine import host, loadavg
from mind.dataset import Interactions, pad_windows
from mind.experiment import write_json
from mind.retrieval import exact_topn, merge_interests
from mind.split import EvalCase
from mind.train import feature_tables, load_checkpoint
from stream.settings import load_settings
from workflows.demo import serving
from workflows.replay import replay

DEFAULT_CHECKPOINT = Path("runs/beauty/mind.pt")
DEFAULT_DATA = Path("../shared/data/beauty")
STAGES = ("parse", "window", "triton", "kv_write", "recall", "produce", "commit")


@dataclass
class PipelineSizes:
    """How much to measure; the defaults are the committed benchmark, tests pass tiny ones."""

    loads: tuple[int, ...] = (100, 500, 2000)  # offered clicks/s
    seconds: float = 15.0  # per fixed load
    asap_clicks: int = 20_000  # clicks of the as-fast-as-possible run (0 = skip it)
    reference_clicks: int = 8192  # clicks timed in process
    reference_batch: int = 256
    n: int = 50  # candidates per recall message
    n_items: int = BEAUTY["n_items"]  # random-init model only
    timeout_s: float = 120.0  # per run: the longest wait for the last recall


def _registry() -> dict[str, float]:
    """The worker's stage histograms (sum, count), batch size and click counters, now."""
    from prometheus_client import REGISTRY

    def v(name: str, **labels: str) -> float:
        return float(REGISTRY.get_sample_value(name, labels) or 0.0)

    out = {"batches": v("mind_worker_batch_size_count"), "batch_msgs": v("mind_worker_batch_size_sum")}
    out["batch_users"] = v("mind_worker_batch_users_sum")
    for s in STAGES:
        out[f"{s}_sum"] = v("mind_worker_stage_seconds_sum", stage=s)
        out[f"{s}_count"] = v("mind_worker_stage_seconds_count", stage=s)
    return out


def _stages(
    before: dict[str, float], after: dict[str, float], mean_latency_ms: float | None, seconds: float
) -> dict[str, Any]:
    """Mean ms per micro-batch per stage between two registry snapshots, the bottleneck and Kafka wait;
    per click (us) and the worker's busy share of the run (1.0 = saturated: throughput-bound)."""
    d = {k: after[k] - before[k] for k in after}
    batches = max(d["batches"], 1.0)
    ms = {s: round(1e3 * d[f"{s}_sum"] / max(d[f"{s}_count"], 1.0), 3) for s in STAGES}
    busy = sum(ms.values())
    out: dict[str, Any] = {
        **ms,
        "batch_total": round(busy, 3),
        "kafka_wait": round(max(0.0, mean_latency_ms - busy), 3) if mean_latency_ms is not None else None,
        "batches": int(d["batches"]),
        "clicks_per_batch": round(d["batch_msgs"] / batches, 1),
        "users_per_batch": round(d["batch_users"] / batches, 1),
        "per_click_us": {s: round(1e6 * d[f"{s}_sum"] / max(d["batch_msgs"], 1.0), 1) for s in STAGES},
        "worker_busy_share": round(sum(d[f"{s}_sum"] for s in STAGES) / max(seconds, 1e-9), 3),
    }
    out["bottleneck"] = max(STAGES, key=lambda s: ms[s])
    return out


def _lag(latencies_ms: Sequence[float], cps: float) -> dict[str, Any]:
    """Mean backlog by Little's law and whether it stays bounded (last fifth vs first fifth of latencies)."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    if len(lat) < 10:
        return {"mean_clicks": None, "growth": None, "bounded": None}
    k = max(1, len(lat) // 5)
    first, last = float(np.median(lat[:k])), float(np.median(lat[-k:]))
    growth = last / max(first, 1e-3)
    return {
        "mean_clicks": round(cps * float(lat.mean()) / 1e3, 1),
        "first_fifth_p50_ms": round(first, 2),
        "last_fifth_p50_ms": round(last, 2),
        "growth": round(growth, 2),
        "bounded": bool(growth < 2.0 or last < 100.0),
    }


def sustained_cps(loads: dict[str, dict[str, Any]], asap: dict[str, Any] | None) -> float:
    """The highest rate the pipeline sustains: the best fixed load it kept up with (achieved >= 90 % of
    offered, lag bounded, no click unanswered), or the as-fast-as-possible run's consumed rate if higher."""
    kept = [
        r["achieved_cps"]
        for r in loads.values()
        if r["lag"]["bounded"] and r["achieved_cps"] >= 0.9 * float(r["offered_cps"]) and not r["missing"]
    ]
    return max([*kept, asap["achieved_cps"] if asap and not asap["missing"] else 0.0])


def clicks_inter(
    meta: dict[str, Any], data: Interactions | None, min_users: int, seed: int = 0
) -> Interactions:
    """The users whose clicks are replayed: `data` when it is the checkpoint's vocabulary, else synthetic
    users with popularity-skewed (Zipf) sequences of 5-20 items of the checkpoint's catalogue."""
    if data is not None and data.items.digest() == str(meta["vocab_hash"]):
        return data
    vocab = meta["item_vocab"]
    m = len(vocab)
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.arange(2, m))
    p = 1.0 / np.arange(1, m - 1)
    p /= p.sum()
    n_users = max(min_users, 1)
    seqs = [rng.choice(order, size=int(rng.integers(5, 21)), p=p).astype(np.int64) for _ in range(n_users)]
    prof = np.asarray(meta["user_profile"])
    return Interactions(
        name=f"synthetic clicks over {meta.get('dataset')}",
        users=[f"bench-u{u}" for u in range(n_users)],
        sequences=seqs,
        items=vocab,
        item_side=np.asarray(meta["item_side"], dtype=np.int64),
        n_side=int(np.asarray(meta["item_side"]).max()) + 1,
        user_profile=np.zeros((n_users, max(1, prof.shape[1] if prof.ndim == 2 else 1)), dtype=np.int64),
        n_profile=1,
    )


def take_cases(inter: Interactions, clicks: int, start: int = 0) -> list[EvalCase]:
    """Users from `start` on (wrapping), each replaying all but its last item, until `clicks` are reached."""
    out: list[EvalCase] = []
    total, u, n = 0, start, len(inter.users)
    while total < clicks and len(out) < n:
        seq = inter.sequences[u % n]
        if len(seq) >= 2:
            out.append(EvalCase(u % n, seq[:-1], seq[-1:]))
            total += len(seq) - 1
        u += 1
    return out


@torch.inference_mode()
def reference_cps(
    model: Any, inter: Interactions, cases: Sequence[EvalCase], sizes: PipelineSizes
) -> dict[str, Any]:
    """In-process clicks/s: every click's window (its user's last L items) through the torch tower, exact
    top-N per interest and the max merge, `reference_batch` clicks per batch."""

    side_t, prof_t = feature_tables(inter)
    items = model.item_vectors(side_t)  # the index, built once (as Milvus is, before the run)
    L = model.cfg.max_len
    wins, users = [], []
    for c in cases:
        for pos in range(len(c.history)):
            wins.append(c.history[max(0, pos + 1 - L) : pos + 1])
            users.append(c.user)
            if len(wins) >= sizes.reference_clicks:
                break
        if len(wins) >= sizes.reference_clicks:
            break
    b = sizes.reference_batch
    batches = []
    for i in range(0, len(wins), b):
        ids = torch.as_tensor(pad_windows(wins[i : i + b], L))
        batches.append((ids, side_t[ids], prof_t[torch.as_tensor(users[i : i + b])]))
    run = batches[: max(1, len(batches) // 10)]  # warm-up
    times: list[float] = []
    for batch in run + batches:
        t0 = time.perf_counter()
        v, active = model(*batch)
        ids_, scores = exact_topn(v, active, items, sizes.n)
        merge_interests(ids_, scores, sizes.n)
        times.append(time.perf_counter() - t0)
    timed = times[len(run) :]
    return {
        "cps": round(len(wins) / sum(timed), 1),
        "clicks": len(wins),
        "batch": b,
        "ms_per_batch_p50": round(float(np.median(timed)) * 1e3, 2),
        "torch_threads": torch.get_num_threads(),
    }


def plot_latency(lat: dict[str, list[float]], path: Path, title: str) -> Path:
    """One latency histogram per load (log-spaced bins, p50/p99 marked), in one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k, v in lat.items() if len(v)]
    fig = Figure(figsize=(4.0 * max(1, len(keys)), 3.6))
    FigureCanvasAgg(fig)
    for i, k in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        x = np.asarray(lat[k], dtype=np.float64)
        ax.hist(x, bins=np.geomspace(max(x.min(), 0.1), max(x.max(), 1.0) * 1.01, 40))
        ax.set_xscale("log")
        for p, style in ((50, "--"), (99, ":")):
            q = float(np.percentile(x, p))
            ax.axvline(q, color="k", linestyle=style, label=f"p{p} {q:.1f} ms")
        ax.legend(fontsize=8)
        ax.set_title(f"{k} clicks/s" if k != "asap" else "asap (as fast as possible)", fontsize=9)
        ax.set_xlabel("click produced -> recall consumed (ms)")
        if i == 0:
            ax.set_ylabel("clicks")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _one_load(
    checkpoint: Path,
    inter: Interactions,
    settings: Any,
    cases: list[EvalCase],
    rate: float | None,
    label: str,
    version: str | None,
    sizes: PipelineSizes,
) -> tuple[dict[str, Any], list[float]]:
    """One replay on fresh topics and a fresh consumer group; its latency, throughput, lag and stages."""

    tag = f"bench-{uuid.uuid4().hex[:6]}-{label}"
    s = settings.model_copy(
        update={
            "clicks_topic": f"{tag}-clicks",
            "recall_topic": f"{tag}-recall",
            "dlq_topic": f"{tag}-dlq",
            "group_id": tag,
            "recall_n": sizes.n,
        }
    )
    before = _registry()
    rep = replay(
        checkpoint,
        inter,
        s,
        cases,
        "asap",
        rate=rate,
        ns=(sizes.n,),
        timeout_s=sizes.timeout_s,
        model_version=version,
    )
    after = _registry()
    d = rep.as_dict()
    lat = d["latency_ms"]
    cps = d["throughput_cps"]
    res = {
        "offered_cps": rate,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "mean_ms": lat["mean"],
        "max_ms": lat["max"],
        "achieved_cps": cps,
        "clicks": rep.published,
        "users": rep.users,
        "seconds": d["seconds"],
        "answered": lat["samples"],
        "missing": rep.missing,
        "lost": rep.lost,
        "dlq": rep.dlq,
        "lag": _lag(rep.latencies_ms, cps),
        "stages_ms": _stages(before, after, lat["mean"], float(d["seconds"])),
    }
    return res, rep.latencies_ms


def run(
    out: Path,
    checkpoint: Path | None = None,
    data: Interactions | None = None,
    sizes: PipelineSizes | None = None,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the embedded stack, serve and index the model, run every load, the asap run and the reference;
    write the JSON and a PNG beside it. Everything started is stopped on any exit."""
    import tempfile

    sizes = sizes or PipelineSizes()
    out = Path(out)
    t_start = time.perf_counter()
    machine = host()
    with tempfile.TemporaryDirectory(prefix="mind-bench-pipeline-") as tmp:
        rd = Path(run_dir) if run_dir is not None else Path(tmp)
        if checkpoint is None and DEFAULT_CHECKPOINT.is_file():
            checkpoint = DEFAULT_CHECKPOINT
        if checkpoint is None:
            ckpt = random_checkpoint(Path(tmp) / "random.pt", n_items=sizes.n_items)
            source = f"random-init MIND sized like Beauty ({sizes.n_items} items)"
        else:
            ckpt, source = Path(checkpoint), str(checkpoint)
        model, meta = load_checkpoint(ckpt)
        need = int(max([*sizes.loads, 1]) * sizes.seconds) + sizes.asap_clicks
        inter = clicks_inter(meta, data, min_users=need // 8 + 64)
        log(f"model {source}; clicks from {inter.name} ({len(inter.users)} users)")
        ports = {f"embedded_{k}_port": 0 for k in ("kafka", "redis", "triton_grpc", "triton_http")}
        ports.update(embedded_triton_metrics_port=0, embedded_milvus_port=0)
        settings = load_settings(None, metrics_port=0, log_level="WARNING", **ports)
        loads: dict[str, Any] = {}
        lat: dict[str, list[float]] = {}
        start = 0
        with serving(ckpt, rd, settings) as (s, version):
            log(f"stack up, model {version} indexed after {time.perf_counter() - t_start:.0f} s")
            runs: list[tuple[str, float | None, int]] = [
                (str(r), float(r), int(r * sizes.seconds)) for r in sizes.loads
            ]
            if sizes.asap_clicks:
                runs.append(("asap", None, sizes.asap_clicks))
            for label, rate, clicks in runs:
                cases = take_cases(inter, clicks, start)
                start += len(cases)
                res, lat[label] = _one_load(ckpt, inter, s, cases, rate, label, version, sizes)
                loads[label] = res
                log(
                    f"{label:>5} clicks/s: p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, achieved "
                    f"{res['achieved_cps']} clicks/s, lag x{res['lag']['growth']}, "
                    f"bottleneck {res['stages_ms']['bottleneck']}"
                )
        ref = reference_cps(model, inter, take_cases(inter, sizes.reference_clicks), sizes)
        log(f"in-process reference: {ref['cps']} clicks/s")
    asap = loads.pop("asap", None)
    max_sustained = sustained_cps(loads, asap)
    top = asap or loads[max(loads, key=float)]
    machine["loadavg_end"] = loadavg()
    res: dict[str, Any] = {
        "catalogue": {
            "source": source,
            "dataset": meta.get("dataset"),
            "items": int(model.cfg.n_items),
            "d": int(model.cfg.d),
            "K": int(model.cfg.K),
            "L": int(model.cfg.max_len),
            "clicks_from": inter.name,
            "recall_n": sizes.n,
        },
        "loads": loads,
        "asap": asap,
        "max_sustained_cps": max_sustained,
        "reference_cps": ref["cps"],
        "reference": ref,
        "ratio_pipeline_to_reference": round(max_sustained / ref["cps"], 3) if ref["cps"] else None,
        "stages_ms": top["stages_ms"],
        "stages_at": "asap" if asap else f"{max(loads, key=float)} clicks/s",
        "worker": {
            k: getattr(s, k)
            for k in (
                "batch_max",
                "batch_timeout_ms",
                "fetch_wait_max_ms",
                "partitions",
                "producer_linger_ms",
            )
        },
        "notes": (
            "publisher, reader and worker are threads of one process (one GIL) beside the 4 servers on "
            "the same cores; max_sustained_cps is the asap run's consumed rate (or the highest fixed load "
            "whose lag stayed bounded); stages_ms: worker histograms, ms per micro-batch; kafka_wait = "
            "mean latency - processing (fetch waits, batch timeout, linger, queueing)"
        ),
        "sizes": asdict(sizes),
        "machine": machine,
        "seconds": round(time.perf_counter() - t_start, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out, res)
    plot_latency(
        lat,
        out.with_suffix(".png"),
        f"End-to-end latency on the embedded stack; {source}; load average {machine['loadavg_start']}",
    )
    return res


def table(res: dict[str, Any]) -> str:
    """The results as a short text table."""
    rows = [f"{'load (clicks/s)':>16}{'p50 ms':>9}{'p99 ms':>9}{'achieved':>10}{'lag growth':>12}"]
    for k, r in [*res["loads"].items(), *([("asap", res["asap"])] if res.get("asap") else [])]:
        rows.append(
            f"{k:>16}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['achieved_cps']:>10}{r['lag']['growth']!s:>12}"
        )
    st = res["stages_ms"]
    rows += [
        f"max sustained {res['max_sustained_cps']} clicks/s; in-process reference {res['reference_cps']} "
        f"clicks/s; ratio {res['ratio_pipeline_to_reference']}",
        f"stages (ms per batch at {res['stages_at']}, {st['clicks_per_batch']} clicks/batch): "
        + ", ".join(f"{s} {st[s]}" for s in (*STAGES, "kafka_wait"))
        + f"; bottleneck {st['bottleneck']}",
        f"load average {res['machine']['loadavg_start']} -> {res['machine']['loadavg_end']}",
    ]
    return "\n".join(rows)
