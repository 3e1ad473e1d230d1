"""`mind replay`: the online/offline consistency check, through the real pipeline.

Each test user's history clicks (ComiRec split: the first 80 %) go to `clicks`, stamped with their send
time; the worker (drop_seen off, window = the model's max_len, recall_n >= the largest N scored) turns
them into recall messages; the message triggered by each user's LAST history click is scored against the
user's targets. Beside it sits the offline evaluation of the same checkpoint on the same cases
(`mind.train.recommend`: exact top-N per interest + max merge). Both see the same window, so the two must
agree; a user whose lists differ is classified (missing recall, window, version, ANN error).

Latency is per click: its send time -> the first recall message consumed that covers it (triggered by
it or by a later click of the same user coalesced into one batch); same host clock.
Throughput is history clicks / (last recall consumed - first click sent).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mind.evaluate import evaluate_ranked, evaluate_ranked_per_user
from mind.train import load_checkpoint, recommend
from stream.fetch import available
from stream.schemas import Click, dump_click, parse_recall
from stream.settings import Settings, kafka_config, redis_client
from stream.state import WindowState
from stream.topics import ensure_topics
from stream.worker import run_worker

AGREEMENT_N = 50
AGREEMENT_TOL = 0.01  # relative


@dataclass
class ReplayReport:
    """What `mind replay` writes (as_dict) plus the raw latencies, for the histogram."""

    replay: dict[str, float]
    offline: dict[str, float]
    users: int
    published: int
    applied: int
    missing: int
    dlq: int
    recall_messages: int
    seconds: float
    model_version: str
    equal_lists: int  # users whose streamed top-N item list equals the offline one
    differing: list[dict[str, Any]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    per_user_diff: dict[str, float] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Clicks published but never applied to a window (and not dead-lettered)."""
        return max(0, self.published - self.applied - self.dlq)

    def agreement(self, n: int = AGREEMENT_N) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in ("recall", "hr", "ndcg"):
            key = f"{m}@{n}"
            a, b = self.replay.get(key), self.offline.get(key)
            if a is None or b is None:
                continue
            out[key] = abs(a - b) / b if b > 0 else (0.0 if a == b else float("inf"))
        out["ok"] = all(out[k] <= AGREEMENT_TOL for k in (f"recall@{n}", f"hr@{n}") if k in out)
        return out

    def as_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        q = (lambda p: round(float(np.percentile(lat, p)), 2)) if len(lat) else (lambda p: None)
        reasons: dict[str, int] = {}
        for d in self.differing:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        return {
            "replay": self.replay,
            "offline": self.offline,
            "agreement": {"n": AGREEMENT_N, "tolerance": AGREEMENT_TOL, "relative": self.agreement()},
            "latency_ms": {
                "p50": q(50),
                "p99": q(99),
                "mean": round(float(lat.mean()), 2) if len(lat) else None,
                "max": round(float(lat.max()), 2) if len(lat) else None,
                "samples": int(len(lat)),
            },
            "throughput_cps": round(self.published / self.seconds, 1) if self.seconds > 0 else 0.0,
            "dlq": self.dlq,
            "lost": self.lost,
            "published": self.published,
            "applied": self.applied,
            "users": self.users,
            "missing": self.missing,
            "recall_messages": self.recall_messages,
            "equal_lists": self.equal_lists,
            "differing_users": len(self.differing),
            "differing_reasons": reasons,
            "differing_sample": self.differing[:20],
            "model_version": self.model_version,
            "seconds": round(self.seconds, 2),
        }


def _applied_total() -> float:
    from prometheus_client import REGISTRY

    return float(REGISTRY.get_sample_value("mind_worker_clicks_applied_total") or 0.0)


def _events(
    inter: Any, cases: Sequence[Any], speed: float | None, rate: float | None = None
) -> list[tuple[float, int, int]]:
    """(due seconds after start, case index, position) in replay order: by original time when the data
    set has timestamps, else round-robin over users one (virtual) second apart, as `mind publish` does.
    Due = the later of the original pacing / speed and n / rate."""
    ev: list[tuple[float, int, int]] = []
    for ci, c in enumerate(cases):
        ts = inter.timestamps[c.user] if inter.timestamps is not None else None
        for pos in range(len(c.history)):
            ev.append((float(ts[pos]) if ts is not None else float(pos), pos, ci))
    ev.sort()
    if not ev:
        return []
    t0 = ev[0][0]
    out = []
    for n, (t, pos, ci) in enumerate(ev):
        orig = float(n) if inter.timestamps is None else t - t0  # no timestamps: one click per second
        out.append((max(orig / speed if speed else 0.0, n / rate if rate else 0.0), ci, pos))
    return out


def _windows(settings: Settings, users: Sequence[str]) -> dict[str, list[int]]:
    """Each user's stored window (the first non-empty over the clicks topic's partitions)."""

    client = redis_client(settings)
    try:
        st = WindowState(client, settings.clicks_topic, settings.window_len)
        pairs = [(p, u) for u in users for p in range(settings.partitions)]
        out: dict[str, list[int]] = {}
        for (_, u), w in zip(pairs, st.read_windows(pairs), strict=True):
            if w and u not in out:
                out[u] = w
        return out
    finally:
        client.close()


def replay(
    checkpoint: str | Path,
    inter: Any,
    settings: Settings,
    cases: Sequence[Any],
    speed: float | str | None = None,
    *,
    rate: float | None = None,
    ns: Sequence[int] = (10, 20, 50, 100),
    timeout_s: float = 120.0,
    model_version: str | None = None,
    progress: bool = False,
) -> ReplayReport:
    """Replay `cases` (EvalCase: user, history, targets; indices of `inter`, the checkpoint's data set)
    through a worker started here, and score streaming against offline. The servers must run and the
    checkpoint be exported and indexed; settings' topics should be fresh (a replay reads them from the
    start). speed: None / "asap" = as fast as possible, a number = that many times the original pacing;
    rate: at most this many clicks/s (both: the slower wins)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient

    sp = None if speed in (None, "asap") else float(speed)
    model, meta = load_checkpoint(Path(checkpoint))
    if str(meta["vocab_hash"]) != inter.items.digest():
        raise ValueError(
            "the data set's item vocabulary is not the checkpoint's (another data set or filter)"
        )
    n_max = max(ns)
    settings = settings.model_copy(
        update={"window_len": model.cfg.max_len, "recall_n": max(settings.recall_n, n_max), "metrics_port": 0}
    )
    ns = [n for n in ns if n <= settings.recall_n]
    cases = [c for c in cases if len(c.history)]
    if not cases:
        raise ValueError("no test user with a history to replay")
    vocab = meta["item_vocab"]
    users = [inter.users[c.user] for c in cases]
    tag = uuid.uuid4().hex[:8]
    last_event = {u: f"replay-{tag}-{c.user}-{len(c.history) - 1}" for u, c in zip(users, cases, strict=True)}

    ensure_topics(AdminClient(kafka_config(settings, "admin")), settings)
    consumer = Consumer(
        kafka_config(settings, "consumer", **{"group.id": f"replay-{tag}", "fetch.wait.max.ms": 5})
    )
    consumer.assign(
        [
            TopicPartition(settings.recall_topic, p, OFFSET_BEGINNING)
            for p in range(settings.recall_partition_count)
        ]
        + [TopicPartition(settings.dlq_topic, p, OFFSET_BEGINNING) for p in range(settings.dlq_partitions)]
    )
    producer = Producer(kafka_config(settings, "producer"))
    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            run_worker(settings, stop, checkpoint=checkpoint, drop_seen=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="replay-worker", daemon=True)
    final: dict[str, dict[str, Any]] = {}
    sent_at: dict[str, list[float]] = {u: [] for u in users}  # send time per history position
    covered: dict[str, int] = {}  # positions of the user already answered by a recall message
    latencies: list[float] = []  # per click: its send time -> the first recall that covers it
    counts = {"dlq": 0, "recalls": 0}
    reading = threading.Event()

    def consume() -> None:
        """Own thread, so recall messages are timed when they arrive, not when the publisher is free.
        A recall triggered by a user's click at position p answers every earlier click not yet answered
        (the worker coalesces one user's clicks in a batch), so each click gets one latency."""
        try:
            while not reading.is_set():
                for m in available(consumer, 500, 0.05):
                    if m.error():
                        continue
                    if m.topic() == settings.dlq_topic:
                        counts["dlq"] += 1
                        continue
                    now = time.time()
                    rec = parse_recall(m.value())
                    u = rec["user_id"]
                    times = sent_at.get(u)
                    if times is not None and rec["event_id"].startswith(f"replay-{tag}-"):
                        counts["recalls"] += 1
                        pos = int(rec["event_id"].rsplit("-", 1)[1])
                        k = covered.get(u, 0)
                        latencies.extend((now - t) * 1e3 for t in times[k : pos + 1])
                        covered[u] = max(k, pos + 1)
                    if last_event.get(u) == rec["event_id"]:
                        final[u] = rec
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)

    reader = threading.Thread(target=consume, name="replay-reader", daemon=True)

    def wait_for(done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if failure:
                raise RuntimeError(f"{what}: {failure[0]!r}") from failure[0]
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)

    try:
        worker.start()
        reader.start()
        # warm-up: one click of a user outside the replay, so the group join, Triton and Milvus are ready
        warm_user = f"replay-warmup-{tag}"
        last_event[warm_user] = f"replay-{tag}-warmup"
        warm = Click(last_event[warm_user], warm_user, vocab.raw_of(int(cases[0].history[0])), time.time())
        producer.produce(settings.clicks_topic, dump_click(warm), warm.user_id.encode())
        producer.flush(30)
        wait_for(lambda: warm_user in final, "the worker failed before its first recall")
        if warm_user not in final:
            raise RuntimeError(f"no recall for the warm-up click after {timeout_s:g} s")
        del final[warm_user], last_event[warm_user]
        applied0 = _applied_total()
        schedule = _events(inter, cases, sp, rate)
        t0 = time.monotonic()
        t_first = time.time()
        for due, ci, pos in schedule:
            wait = t0 + due - time.monotonic()
            if wait > 0.0005:
                time.sleep(wait)
            c, now = cases[ci], time.time()
            sent_at[users[ci]].append(now)  # before producing: the reader may see the recall at once
            # the click's own time, as offline: a tower trained with behaviour time reads its gaps
            at = float(inter.timestamps[c.user][pos]) if inter.timestamps is not None else now
            value = dump_click(
                Click(f"replay-{tag}-{c.user}-{pos}", users[ci], vocab.raw_of(int(c.history[pos])), at)
            )
            while True:
                try:
                    producer.produce(settings.clicks_topic, value, users[ci].encode())
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        producer.flush(60)
        wait_for(lambda: len(final) >= len(users), "the worker failed")
        t_last = time.time()
        time.sleep(0.5)  # stragglers (duplicates) and dead letters
        applied = int(_applied_total() - applied0)
        seconds = t_last - t_first
    finally:
        stop.set()
        reading.set()
        worker.join(30)
        reader.join(10)
        consumer.close()
    if failure:
        raise RuntimeError(f"the worker failed: {failure[0]!r}") from failure[0]

    # ---- scoring --------------------------------------------------------------------------------------
    off = np.asarray(recommend(model, inter, list(cases), settings.recall_n))
    stream = np.full_like(off, -1)
    for i, u in enumerate(users):
        rec = final.get(u)
        if rec is not None:
            ids = [vocab.get(c["item_id"]) for c in rec["candidates"][: settings.recall_n]]
            stream[i, : len(ids)] = ids
    rep = evaluate_ranked(stream, cases, ns)
    offm = evaluate_ranked(off, cases, ns)
    per_s = evaluate_ranked_per_user(stream, cases, [AGREEMENT_N])
    per_o = evaluate_ranked_per_user(off, cases, [AGREEMENT_N])
    key = f"recall@{AGREEMENT_N}"
    n_cmp = min(AGREEMENT_N, settings.recall_n)
    versions = {rec["model_version"] for rec in final.values()}
    want_version = model_version or (
        max(versions, key=lambda v: sum(r["model_version"] == v for r in final.values())) if versions else ""
    )
    diffs = [u for i, u in enumerate(users) if not np.array_equal(stream[i, :n_cmp], off[i, :n_cmp])]
    differing: list[dict[str, Any]] = []
    windows = _windows(settings, diffs) if diffs else {}
    for i, u in enumerate(users):
        if u not in diffs:
            continue
        rec = final.get(u)
        c = cases[i]
        want_win = [int(x) for x in c.history[-model.cfg.max_len :]]
        if rec is None:
            reason = "missing recall"
        elif rec["model_version"] != want_version:  # the worker itself refuses an index of another version
            reason = "version mismatch"
        elif windows.get(u) != want_win:
            reason = "window length"
        elif set(stream[i, :n_cmp].tolist()) == set(off[i, :n_cmp].tolist()):
            reason = "order only (same items, near-equal scores)"
        else:
            reason = "ANN error (Milvus ids differ from exact)"
        differing.append(
            {
                "user": u,
                "reason": reason,
                f"overlap@{n_cmp}": len(set(stream[i, :n_cmp].tolist()) & set(off[i, :n_cmp].tolist())),
                f"{key} replay": round(float(per_s[key][i]), 4),
                f"{key} offline": round(float(per_o[key][i]), 4),
            }
        )
    return ReplayReport(
        replay={k: round(float(v), 5) for k, v in rep.items()},
        offline={k: round(float(v), 5) for k, v in offm.items()},
        users=len(users),
        published=len(schedule),
        applied=applied,
        missing=len(users) - len(final),
        dlq=counts["dlq"],
        recall_messages=counts["recalls"],
        seconds=seconds,
        model_version=want_version,
        equal_lists=len(users) - len(diffs),
        differing=differing,
        latencies_ms=latencies,
        per_user_diff={"max_abs_" + key: float(np.abs(per_s[key] - per_o[key]).max()) if len(users) else 0.0},
    )


def plot_latency(latencies_ms: Sequence[float], path: str | Path) -> Path:
    """PNG histogram of click -> recall latency (log-spaced bins), p50/p99 marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lat = np.asarray(latencies_ms, dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(lat):
        lo, hi = max(lat.min(), 0.1), max(lat.max(), 1.0)
        ax.hist(lat, bins=np.geomspace(lo, hi * 1.01, 40))
        ax.set_xscale("log")
        for p, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(lat, p))
            ax.axvline(v, color="k", linestyle=style, label=f"p{p} {v:.1f} ms")
        ax.legend()
    ax.set_xlabel("click produced -> recall consumed (ms)")
    ax.set_ylabel("clicks")
    ax.set_title("End-to-end latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
