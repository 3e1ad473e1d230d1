"""Load on the stream worker over time: a soak and a backpressure run of real worker processes, on the load
harness (harness/load.py).

- `soak(settings, checkpoint, ...)`: one worker at half the measured capacity (benchmarks/pipeline.json)
  for `duration_s`: flat RSS after warm-up, bounded lag, no growth of the error rate.
- `backpressure(settings, checkpoint, ...)`: the key-value store made slow for real (Valkey's
  `CLIENT PAUSE <ms> WRITE`, repeated) while clicks arrive faster than the worker can then go: the
  consumed rate drops, the backlog grows in the broker, the worker's RSS stays bounded (librdkafka's
  queues are bounded by settings), and once the store is fast again the backlog drains with no loss.

Both take the addresses of a running stack in `settings` (an address left unset = the embedded default, as
the worker resolves it) and a `spawn` function for worker processes (default `spawn_worker`), so the
chaos run can call them on its own stack. `mind bench soak` and `mind bench backpressure` start an embedded
stack themselves and write JSON + PNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.load import ROOT, LoadRun, Spawner, _pct, _quiet
from mind.experiment import write_json
from stream.settings import Settings, kafka_config, redis_client

PIPELINE_RESULTS = ROOT / "benchmarks" / "pipeline.json"


def pipeline_capacity(path: Path = PIPELINE_RESULTS) -> float:
    """The pipeline's measured capacity (clicks/s): `max_sustained_cps` of `mind bench pipeline`."""
    try:
        return float(json.loads(Path(path).read_text())["max_sustained_cps"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(
            f"no measured capacity in {path} ({exc}): run `mind bench pipeline` or pass capacity_cps"
        ) from exc


@contextlib.contextmanager
def _run_dir(run_dir: Path | None) -> Iterator[Path]:
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        yield Path(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix="mind-load-") as tmp:
        yield Path(tmp)


def soak(
    settings: Settings,
    checkpoint: str | Path,
    *,
    rate_cps: float | None = None,
    capacity_cps: float | None = None,
    duration_s: float = 600.0,
    warmup_s: float | None = None,
    sample_s: float = 5.0,
    users: int | None = None,
    partitions: int | None = None,
    linger_ms: int | None = None,
    spawn: Spawner | None = None,
    run_dir: Path | None = None,
    png: Path | None = None,
    drain_timeout_s: float = 120.0,
    log: Callable[[str], None] = _quiet,
) -> dict[str, Any]:
    """One worker process under a steady offered load (default: half of `capacity_cps`, itself by default
    the measured pipeline capacity) for `duration_s`. RSS is sampled every `sample_s`; `rss_mb_start` is
    the RSS once the warm-up (default: the first fifth, at most 60 s) is over. Memory is flat when the end
    is within max(3 %, 10 MB) of that start; lag is bounded when the second half's median backlog is not
    above twice the first half's plus one second of clicks. Errors: worker log lines at WARNING or above
    plus failed deliveries, per minute, first vs second half of the run. `partitions`: of the run's own
    topics (default settings.partitions); the embedded broker's cost per partition grows with its log
    (docs/load.md), so a long soak on Tansu spreads the clicks over more partitions."""
    capacity = capacity_cps if capacity_cps is not None else pipeline_capacity()
    rate = float(rate_cps if rate_cps is not None else capacity / 2.0)
    warm = float(warmup_s if warmup_s is not None else min(60.0, duration_s / 5.0))
    s = settings if partitions is None else settings.model_copy(update={"partitions": partitions})
    # A stationary workload: the average user clicks 2 x window_len times during the warm-up, so after it
    # the windows are full (K' = K interests, the largest seen-set) and a click costs the same at minute 1
    # and minute 10. With ever new users the recall step would get dearer as their histories grow. The
    # final check compares each window with the tail of the user's clicks.
    n_users = users or max(20, math.ceil(rate * warm / (2 * s.window_len)))
    with (
        _run_dir(run_dir) as rd,
        LoadRun(
            s, checkpoint, rd, spawn=spawn, users=n_users, label="soak", linger_ms=linger_ms, log=log
        ) as run,
    ):
        log(f"soak: {rate:.0f} clicks/s for {duration_s:g} s ({n_users} users), warm-up {warm:g} s")
        run.sample()
        run.start_sampling(sample_s)
        t_start = time.time()
        first, end = run.publish(rate, seconds=duration_s)
        t_end = time.time()
        run.sample()
        drained = run.drain(drain_timeout_s)
        exit_codes = run.stop_workers()
        check = run.verify()
        errs = run.errors(t_start, t_end)
        group = run.group_events()
        samples = [p for p in run.samples if p["t_s"] <= t_end - run.t0 + 1e-6]
    half = (t_start + t_end) / 2.0
    minutes = max((t_end - t_start) / 2.0 / 60.0, 1e-9)
    errors_first = sum(e["t"] < half for e in errs)
    # failed deliveries carry no time: charged to the second half (the pessimistic side)
    errors_second = len(errs) - errors_first + run.failed
    after = [p for p in samples if p["t_s"] >= warm] or samples[-1:]
    rss_start, rss_end = after[0]["rss_mb"], samples[-1]["rss_mb"]
    rss_max = max(p["rss_mb"] for p in samples)
    tol = max(0.03 * rss_start, 10.0)
    slope = _slope([p["t_s"] / 60.0 for p in after], [p["rss_mb"] for p in after])
    lags = [p["lag"] for p in samples]
    mid = (t_end - t_start) / 2.0
    lag_first = [p["lag"] for p in samples if warm <= p["t_s"] < mid] or lags[:1]
    lag_second = [p["lag"] for p in samples if p["t_s"] >= mid] or lags[-1:]
    measured = run.phase(first, end)
    lat_after = [
        x for x, t in zip(run.lat[first:end], run.sent[first:end], strict=True) if t >= t_start + warm
    ]
    res: dict[str, Any] = {
        "rss_mb_start": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_mb_max": round(rss_max, 1),
        "rss_mb_initial": round(samples[0]["rss_mb"], 1),
        "rss_slope_mb_per_min": round(slope, 3),
        "rss_flat": bool(abs(rss_end - rss_start) <= tol),
        "rss_tolerance_mb": round(tol, 1),
        "lag_max": int(max(lags)),
        "lag_end": int(lags[-1]),
        "lag_p50_first_half": float(np.median(lag_first)),
        "lag_p50_second_half": float(np.median(lag_second)),
        "lag_bounded": bool(np.median(lag_second) <= 2 * np.median(lag_first) + rate),
        "stalled_at_s": stalled_at(samples),
        "errors_per_min_first_half": round(errors_first / minutes, 3),
        "errors_per_min_second_half": round(errors_second / minutes, 3),
        "errors": errs[:50],
        "group_events": group[:50],
        "e2e_p50_ms": _pct(lat_after, 50),
        "e2e_p99_ms": _pct(lat_after, 99),
        "achieved_cps": round((end - first) / max(t_end - t_start, 1e-9), 1),
        "clicks": end - first,
        "duration_s": round(t_end - t_start, 1),
        "rate_cps": rate,
        "capacity_cps": capacity,
        "warmup_s": warm,
        "users": n_users,
        "partitions": s.partitions,
        "fetch_wait_max_ms": s.fetch_wait_max_ms,
        "publisher_linger_ms": linger_ms if linger_ms is not None else s.producer_linger_ms,
        "drained": drained,
        "worker_exit_codes": exit_codes,
        "check": check,
        "latency": measured,
        "bounds": queue_bounds(run.settings),
        "samples": samples,
    }
    if png is not None:
        res["png"] = str(plot_soak(res, Path(png)))
    return res


def stalled_at(samples: Sequence[dict[str, Any]], points: int = 3) -> float | None:
    """When the group stopped committing while clicks waited (for `points` samples in a row), else None:
    a worker that is alive but consumes nothing (e.g. every fetch answered empty)."""
    start, n = None, 0
    for prev, p in zip(samples[:-1], samples[1:], strict=True):
        if p["committed"] == prev["committed"] and p["lag"] > 0:
            start = prev["t_s"] if start is None else start
            n += 1
            if n >= points:
                return start
        else:
            start, n = None, 0
    return None


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope (y per x unit); 0 with fewer than 3 points."""
    if len(x) < 3:
        return 0.0
    return float(np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 1)[0])


def queue_bounds(settings: Settings) -> dict[str, Any]:
    """The librdkafka settings that bound what a worker holds in memory (consumer prefetch, producer
    queue), as the worker's clients get them."""
    cons, prod = kafka_config(settings, "consumer"), kafka_config(settings, "producer")
    keys_c = (
        "queued.max.messages.kbytes",
        "queued.min.messages",
        "fetch.max.bytes",
        "max.partition.fetch.bytes",
    )
    keys_p = ("queue.buffering.max.kbytes", "queue.buffering.max.messages")
    return {
        "consumer": {k: cons.get(k, "librdkafka default") for k in keys_c},
        "producer": {k: prod.get(k, "librdkafka default") for k in keys_p},
        "batch_max": settings.batch_max,
    }


# ---- backpressure ----------------------------------------------------------------------------------------


class WritePauser:
    """Makes the key-value store slow for real: `CLIENT PAUSE pause_ms WRITE` every `period_ms` on a thread.
    Valkey then holds every write command (the worker's window script and interest writes) until the
    pause ends, while reads go on; `CLIENT UNPAUSE` when stopped. Keep period - pause >= 100 ms: Valkey
    releases held clients on its 100 ms cron tick, so shorter gaps are often missed and a write can then
    wait several pauses (seconds) instead of at most one."""

    def __init__(self, settings: Settings, pause_ms: int, period_ms: int) -> None:
        if not 0 < pause_ms <= period_ms:
            raise ValueError("need 0 < pause_ms <= period_ms")
        self.client = redis_client(settings, socket_timeout=5.0)
        self.pause_ms, self.period_s = pause_ms, period_ms / 1000.0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None
        self.pauses = 0

    def _loop(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            self.client.execute_command("CLIENT", "PAUSE", self.pause_ms, "WRITE")
            self.pauses += 1
            nxt += self.period_s
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> WritePauser:
        self._t = threading.Thread(target=self._loop, name="kv-pauser", daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(5)
        try:
            self.client.execute_command("CLIENT", "UNPAUSE")
        finally:
            self.client.close()


def backpressure(
    settings: Settings,
    checkpoint: str | Path,
    *,
    offered_cps: float = 150.0,
    fast_s: float = 10.0,
    slow_s: float = 30.0,
    recover_s: float = 10.0,
    pause_ms: int = 900,
    period_ms: int = 1000,
    batch_max: int = 64,
    sample_s: float = 0.5,
    users: int | None = None,
    spawn: Spawner | None = None,
    run_dir: Path | None = None,
    png: Path | None = None,
    drain_timeout_s: float = 180.0,
    log: Callable[[str], None] = _quiet,
) -> dict[str, Any]:
    """A worker process fed `offered_cps` through three phases: `fast_s` with every server at full speed,
    `slow_s` with the key-value store's writes paused `pause_ms` of every `period_ms` (a real server
    behaviour, not a mock), then `recover_s` at full speed again; then publishing stops and the backlog
    drains. `batch_max` is lowered for the run (default 64): a micro-batch pays the paused writes whatever
    its size, so with the default 1024 the slowed worker would still outrun a modest offered rate
    (bigger batches absorb a slow call: that is the worker's first defence).

    `users` (default 200) first get window_len clicks each, as fast as possible and untimed: with full
    windows every refresh costs the same in every phase. Shows: the consumed rate drops below the offered
    one (the worker slows down), the backlog grows in the broker (clicks delivered - committed), the
    worker's RSS stays bounded (its librdkafka queues are bounded by settings: `bounds`), and after the
    store is fast again the backlog drains (`recovery_s`: end of the slow phase -> backlog back under the
    fast phase's level) with nothing lost."""
    s = settings.model_copy(update={"batch_max": batch_max})
    n_users = users or 200
    phases: dict[str, dict[str, Any]] = {}
    with (
        _run_dir(run_dir) as rd,
        LoadRun(s, checkpoint, rd, spawn=spawn, users=n_users, label="backpressure", log=log) as run,
    ):
        prefilled = run.prefill(s.window_len)  # every window full before the clock starts
        run.t0 = time.time()
        run.sample()
        run.start_sampling(sample_s)
        t_fast = time.time() - run.t0
        a, _ = run.publish(offered_cps, seconds=fast_s)
        t_slow = time.time() - run.t0
        log(f"backpressure: {offered_cps:g} clicks/s offered; store writes paused {pause_ms}/{period_ms} ms")
        with WritePauser(run.settings, pause_ms, period_ms) as pauser:
            b, _ = run.publish(offered_cps, seconds=slow_s)
            t_rec = time.time() - run.t0
        c, end = run.publish(offered_cps, seconds=recover_s)
        t_end_pub = time.time() - run.t0
        drained = run.drain(drain_timeout_s)
        t_drained = time.time() - run.t0
        run.sample()
        exit_codes = run.stop_workers()
        check = run.verify()
        samples = list(run.samples)
        errs = run.errors(run.t0, time.time())
        group = run.group_events()
        bounds = queue_bounds(run.settings)
        click_bytes = run.bytes_per_click
        lat = {
            k: {m: v[m] for m in ("clicks", "missing", "p50_ms", "p99_ms", "max_ms")}
            for k, v in {
                "fast": run.phase(a, b),
                "slow": run.phase(b, c),
                "recover": run.phase(c, end),
            }.items()
        }
    for name, (t0, t1) in {
        "fast": (t_fast, t_slow),
        "slow": (t_slow, t_rec),
        "recover": (t_rec, t_end_pub),
        "drain": (t_end_pub, t_drained),
    }.items():
        pts = [p for p in samples if t0 <= p["t_s"] <= t1 + sample_s / 2]
        if not pts:
            continue
        before = [p for p in samples if p["t_s"] <= t0] or pts[:1]
        dt = max(pts[-1]["t_s"] - before[-1]["t_s"], 1e-6)
        phases[name] = {
            "seconds": round(t1 - t0, 1),
            "offered_cps": round((pts[-1]["published"] - before[-1]["published"]) / dt, 1),
            "consumed_cps": round((pts[-1]["committed"] - before[-1]["committed"]) / dt, 1),
            "lag_start": before[-1]["lag"],
            "lag_end": pts[-1]["lag"],
            "lag_max": max(p["lag"] for p in pts),
            "rss_mb_max": max(p["rss_mb"] for p in pts),
            "rss_mb_end": pts[-1]["rss_mb"],
        }
    fast_lag = phases.get("fast", {}).get("lag_max", 0)
    threshold = max(2 * fast_lag, batch_max)
    back = [p["t_s"] for p in samples if p["t_s"] >= t_rec and p["lag"] <= threshold]
    slow, fast = phases.get("slow", {}), phases.get("fast", {})
    res: dict[str, Any] = {
        "offered_cps": offered_cps,
        "batch_max": batch_max,
        "slowdown": {
            "how": "Valkey CLIENT PAUSE <pause_ms> WRITE every period_ms: the window script and the "
            "interest writes wait, reads go on",
            "pause_ms": pause_ms,
            "period_ms": period_ms,
            "pauses": pauser.pauses,
        },
        "phases": phases,
        "latency": lat,
        "slowed_to": round(slow.get("consumed_cps", 0.0) / offered_cps, 3),
        "lag_growth_slow": slow.get("lag_end", 0) - slow.get("lag_start", 0),
        "backlog_mb_max": round(max(p["lag"] for p in samples) * click_bytes / 2**20, 2),
        "rss_mb_max_fast": fast.get("rss_mb_max"),
        "rss_mb_max_slow": slow.get("rss_mb_max"),
        "rss_mb_growth_slow": round(slow.get("rss_mb_max", 0.0) - fast.get("rss_mb_max", 0.0), 2),
        "rss_mb_max_recover": phases.get("recover", {}).get("rss_mb_max"),
        "users": n_users,
        "prefill_clicks": prefilled,
        "recovery_s": round(back[0] - t_rec, 2) if back else None,
        "recovery_threshold_lag": threshold,
        "drained": drained,
        "drain_s": round(t_drained - t_end_pub, 2),
        "worker_exit_codes": exit_codes,
        "errors": len(errs),
        "group_events": group[:50],
        "check": check,
        "lost": check["lost"],
        "applied_twice": check["applied_twice"],
        "bounds": bounds,
        "bytes_per_click": round(click_bytes, 1),
        "samples": samples,
        "phase_times_s": {"slow": [round(t_slow, 2), round(t_rec, 2)], "publishing_end": round(t_end_pub, 2)},
    }
    if png is not None:
        res["png"] = str(plot_backpressure(res, Path(png)))
    return res


# ---- plots -----------------------------------------------------------------------------------------------


def _figure(rows: int, height: float = 2.4) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, height * rows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, sharex=True)


def plot_soak(res: dict[str, Any], path: Path) -> Path:
    """RSS, broker lag and e2e latency of the soak against time."""
    pts = res["samples"]
    t = [p["t_s"] for p in pts]
    fig, (a, b, c) = _figure(3)
    a.plot(t, [p["rss_mb"] for p in pts], marker=".", color="tab:blue")
    a.axvline(res["warmup_s"], color="grey", linestyle=":", label="end of warm-up")
    a.axhline(
        res["rss_mb_start"], color="k", linestyle="--", linewidth=0.8, label=f"start {res['rss_mb_start']} MB"
    )
    a.set_ylabel("worker RSS (MB)")
    a.legend(fontsize=7)
    b.plot(t, [p["lag"] for p in pts], marker=".", color="tab:orange", label="broker: delivered - committed")
    b.plot(t, [p["lag_gauge"] for p in pts], color="tab:green", linewidth=0.8, label="worker gauge")
    b.set_ylabel("lag (clicks)")
    b.legend(fontsize=7)
    c.plot(t, [p.get("e2e_p50_ms") for p in pts], label="p50")
    c.plot(t, [p.get("e2e_p99_ms") for p in pts], label="p99")
    c.set_ylabel("click -> recall (ms)")
    c.set_xlabel("seconds")
    c.legend(fontsize=7)
    fig.suptitle(
        f"Soak: {res['rate_cps']:.0f} clicks/s offered (capacity {res['capacity_cps']:.0f}) "
        f"for {res['duration_s']:.0f} s",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_backpressure(res: dict[str, Any], path: Path) -> Path:
    """Offered vs consumed rate, broker lag and RSS against time, the slow phase shaded."""
    pts = res["samples"][1:]
    t = [p["t_s"] for p in pts]
    lo, hi = res["phase_times_s"]["slow"]
    fig, (a, b, c) = _figure(3)
    a.plot(t, [p.get("offered_cps") for p in pts], label="offered")
    a.plot(t, [p.get("consumed_cps") for p in pts], label="consumed (committed)")
    a.set_ylabel("clicks/s")
    a.legend(fontsize=7)
    b.plot(t, [p["lag"] for p in pts], color="tab:orange", label="in the broker")
    b.set_ylabel("backlog (clicks)")
    b.legend(fontsize=7)
    c.plot(t, [p["rss_mb"] for p in pts], color="tab:blue")
    c.set_ylabel("worker RSS (MB)")
    c.set_xlabel("seconds")
    for ax in (a, b, c):
        ax.axvspan(lo, hi, color="grey", alpha=0.2)
    fig.suptitle(
        f"Backpressure: key-value writes paused {res['slowdown']['pause_ms']} of every "
        f"{res['slowdown']['period_ms']} ms (shaded), batch_max {res['batch_max']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---- `python -m harness.soak`: on an embedded stack started here -------------------------------------------


# the soak's headline figures, printed by `mind bench soak`
SOAK_SUMMARY = (
    "rss_mb_start",
    "rss_mb_end",
    "rss_flat",
    "lag_max",
    "lag_end",
    "lag_bounded",
    "stalled_at_s",
    "errors_per_min_first_half",
    "errors_per_min_second_half",
    "e2e_p50_ms",
    "e2e_p99_ms",
)


def write_result(out: Path, res: dict[str, Any], machine: dict[str, Any]) -> None:
    """The results file: the run's figures and the machine with its load average at the start and end."""
    res["machine"] = {**machine, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    write_json(out, res)
