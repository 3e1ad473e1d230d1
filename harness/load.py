"""The load harness: real worker *processes* (`python -m stream.worker`, as deployed) on fresh topics of a
running stack, fed synthetic clicks at a fixed offered rate, timed and checked.

`LoadRun` publishes clicks (Zipf-drawn items of the checkpoint's catalogue, random users), reads `recall`
on its own thread to time each click (its send time -> the first recall message that covers it), samples
every worker's RSS (psutil) and /metrics and the lag held **in the broker** (clicks delivered - offsets the
group committed, from the delivery reports: Tansu 0.6 answers ListOffsets(latest) wrongly, see
stream/README.md), and at the end checks the outcome against what it published: every user's stored
window equals the tail of its clicks in click order (no click lost, none applied twice, order kept),
every offset committed, every user's last click answered by a recall message.

`mind bench pipeline`, `mind bench scale`, the soak, the backpressure run and `mind chaos` drive it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
from pydantic import SecretStr

from harness.bench_serving import random_checkpoint
from stream.embedded.process import free_port
from stream.fetch import available
from stream.schemas import Click, dump_click
from stream.settings import Settings, kafka_config, load_settings, redis_client
from stream.state import WindowState
from stream.topics import ensure_topics
from stream.window import load_catalog
from stream.worker import addresses
from workflows.demo import serving

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = Path("runs/beauty/mind.pt")  # `mind train --data ../shared/data/beauty --out ...`
ERROR_LEVELS = frozenset({"warning", "error", "critical", "exception"})


def _quiet(_msg: str) -> None:
    pass


# ---- worker processes -------------------------------------------------------------------------------------


def _scrape(host: str, port: int, timeout_s: float = 3.0) -> dict[str, float]:
    """A worker's /metrics, every sample summed over its labels (lag: over partitions)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.endswith("_bucket"):
                out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


@dataclass
class WorkerProc:
    """One worker process as the harness sees it: pid (RSS), /metrics port, JSON log file (assignments,
    errors). A custom `spawn` returns one of these around its own process."""

    proc: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    host: str = "127.0.0.1"
    events: list[dict[str, Any]] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    _log_pos: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float | None:

        try:
            return psutil.Process(self.pid).memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    def scrape(self) -> dict[str, float]:
        """/metrics now (kept in last_metrics); {} while the process does not answer."""
        try:
            self.last_metrics = _scrape(self.host, self.metrics_port)
        except OSError:
            return {}
        return self.last_metrics

    def read_log(self) -> list[dict[str, Any]]:
        """JSON log lines written since the last call (anything else, e.g. a traceback, is skipped)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a partial last line is read next time
        self._log_pos += end
        new = []
        for line in data[:end].splitlines():
            if line.startswith(b"{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    new.append(orjson.loads(line))
        self.events.extend(new)
        return new

    def assigned(self) -> set[int] | None:
        """Partitions held after the latest assignment event in the log; None before any."""
        self.read_log()
        held: set[int] | None = None
        for e in self.events:
            if e.get("event") == "partitions assigned":
                held = set(e.get("partitions") or [])
            elif e.get("event") == "partitions revoked":
                held = set()
        return held

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (finish the batch, commit, leave the group), then SIGKILL after timeout_s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.read_log()
        return self.proc.returncode


Spawner = Callable[[Settings, Path], WorkerProc]  # (the run's settings, log file) -> a started worker


def child_config(settings: Settings, path: Path) -> dict[str, str]:
    """Write `settings` as a JSON config file for a worker process; secrets are not written but returned as
    MIND_* environment variables for the child (a file on disk must not hold them)."""
    data = settings.model_dump(mode="json")
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            env[f"MIND_{name.upper()}"] = value.get_secret_value()
        if value is None or isinstance(value, SecretStr):
            data.pop(name, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(data))
    return env


def spawn_worker(checkpoint: str | Path) -> Spawner:
    """A Spawner that runs `python -m stream.worker --config FILE --checkpoint CKPT` from this checkout,
    with no MIND_* variable of ours leaking in (the config file is the whole configuration)."""

    def start(settings: Settings, log_path: Path) -> WorkerProc:
        config = log_path.with_suffix(".json")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MIND_")}
        env.update(child_config(settings, config))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stream.worker",
                    "--config",
                    str(config),
                    "--checkpoint",
                    str(checkpoint),
                ],
                cwd=ROOT,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        return WorkerProc(proc, settings.metrics_port, log_path, settings.metrics_host)

    return start


# ---- the harness -----------------------------------------------------------------------------------------


def resolved(settings: Settings) -> Settings:
    """Settings with every address explicit (unset = the embedded default, as the worker resolves it)."""

    a = addresses(settings)
    return settings.model_copy(
        update={
            "kafka_bootstrap": a["kafka"],
            "redis_url": a["redis"],
            "triton_url": a["triton"],
            "milvus_uri": a["milvus"],
        }
    )


def fresh_topics(settings: Settings, tag: str, **update: Any) -> Settings:
    """Settings on topics and a consumer group of their own, named by `tag` (plus any other `update`):
    a run that starts from empty logs and no committed offsets."""
    names = {"clicks_topic": f"{tag}-clicks", "recall_topic": f"{tag}-recall", "dlq_topic": f"{tag}-dlq"}
    return settings.model_copy(update={**names, "group_id": tag, **update})


def _pct(x: Sequence[float] | np.ndarray, p: float) -> float | None:
    a = np.asarray(x, dtype=np.float64)
    a = a[~np.isnan(a)]
    return round(float(np.percentile(a, p)), 2) if len(a) else None


class LoadRun:
    """Fresh topics and group on a running stack, `workers` worker processes, a paced publisher, a recall
    reader and a sampler. Use as a context manager: everything started is stopped on exit."""

    def __init__(
        self,
        settings: Settings,
        checkpoint: str | Path,
        run_dir: Path,
        *,
        workers: int = 1,
        spawn: Spawner | None = None,
        users: int = 1000,
        label: str = "load",
        seed: int = 0,
        linger_ms: int | None = None,
        worker_log_level: str = "INFO",
        log: Callable[[str], None] = _quiet,
    ) -> None:

        self.tag = f"{label}-{uuid.uuid4().hex[:6]}"
        self.settings = fresh_topics(
            resolved(settings),
            self.tag,
            log_json=True,
            log_level=worker_log_level,  # DEBUG: one line per batch with its stage timings
        )
        self.checkpoint, self.run_dir, self.n_workers = Path(checkpoint), Path(run_dir), workers
        self.spawn = spawn or spawn_worker(self.checkpoint)
        self.log = log
        self.linger_ms = linger_ms  # the publisher's; None = settings.producer_linger_ms
        vocab = load_catalog(self.checkpoint).items
        self._raw = vocab.raw
        m = len(vocab)
        rng = np.random.default_rng(seed)
        order = rng.permutation(np.arange(2, m))
        p = 1.0 / np.arange(1, m - 1)  # Zipf popularity over the catalogue
        self._item_order, self._item_p = order, p / p.sum()
        self._rng = rng
        self.users = [f"{self.tag}-u{u}" for u in range(max(1, users))]
        self.workers: list[WorkerProc] = []
        # what was published (index = sequence number = the event id's suffix)
        self.sent: list[float] = []  # send time
        self.lat: list[float] = []  # ms to the first recall covering it (nan until then)
        self.recv: list[float] = []  # when that recall was consumed
        self.offset: list[int] = []  # its offset in the clicks topic (-1 until delivered)
        self.history: dict[str, list[int]] = {}  # user -> item indices in click order
        self.seqs: dict[str, list[int]] = {}  # user -> sequence numbers in click order
        self.partition: dict[str, int] = {}  # user -> partition (from the delivery reports)
        self.ends: dict[int, int] = {}  # partition -> last delivered offset + 1
        self.delivered = 0
        self.failed = 0
        self.first_error: str | None = None
        self._pending: dict[str, deque[int]] = {}
        self.recalls = 0
        self.dlq = 0
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failure: list[BaseException] = []
        self._lock = threading.Lock()
        self._sampling = threading.Lock()
        self._items: Iterator[int] = iter(())
        self._user_draw: Iterator[int] = iter(())
        self._producer: Any = None
        self._reader: Any = None
        self._group: Any = None
        self.bytes_per_click = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LoadRun:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, join_timeout_s: float = 90.0) -> None:
        """Topics, reader, workers; waits until every worker holds partitions, then warms the pipeline up
        (one answered click per partition: group joined, Triton and Milvus connections open)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
        from confluent_kafka.admin import AdminClient

        s = self.settings
        ensure_topics(AdminClient(kafka_config(s, "admin")), s)
        linger = {} if self.linger_ms is None else {"linger.ms": self.linger_ms}
        self._producer = Producer(kafka_config(s, "producer", **linger))
        # the reader fetches like the workers do (fetch_wait_max_ms): Tansu 0.6 answers a fetch with nothing
        # once scanning a partition's batches takes longer than the wait (docs/load.md)
        self._reader = Consumer(kafka_config(s, "consumer", **{"group.id": f"{self.tag}-reader"}))
        self._reader.assign(
            [TopicPartition(s.recall_topic, p, OFFSET_BEGINNING) for p in range(s.recall_partition_count)]
            + [TopicPartition(s.dlq_topic, p, OFFSET_BEGINNING) for p in range(s.dlq_partitions)]
        )
        self._group = Consumer(kafka_config(s, "consumer"))  # never subscribes: reads committed offsets
        self._thread(self._read, "load-reader")
        for i in range(self.n_workers):
            ws = s.model_copy(update={"metrics_port": free_port(s.metrics_host)})
            self.workers.append(self.spawn(ws, self.run_dir / f"{self.tag}-worker-{i}.log"))
        self.wait_assigned(join_timeout_s)
        warm = 0
        while len(self.ends) < s.partitions and warm < 64 * s.partitions:  # one click on every partition
            self.publish_one(f"{self.tag}-warm{warm}")
            self._producer.flush(30)
            warm += 1
        if not self.drain(join_timeout_s):
            raise RuntimeError(
                f"warm-up: no recall after {join_timeout_s:g} s; worker logs in {self.run_dir}"
            )
        self.t0 = time.time()

    def wait_assigned(self, timeout_s: float) -> None:
        """Until every partition is held by exactly one worker and each worker holds some (if it can)."""
        deadline = time.monotonic() + timeout_s
        parts = set(range(self.settings.partitions))
        while True:
            dead = [w for w in self.workers if not w.alive()]
            if dead:
                raise RuntimeError(f"worker exited with {dead[0].proc.returncode}; log {dead[0].log_path}")
            held = [w.assigned() for w in self.workers]
            sets = [h for h in held if h is not None]
            union = set().union(*sets) if sets else set()
            need_each = self.n_workers <= len(parts)
            if (
                len(sets) == len(held)
                and union == parts
                and sum(len(h) for h in sets) == len(parts)
                and (not need_each or all(sets))
            ):
                self.log(f"group {self.tag}: assignment {[sorted(h) for h in sets]}")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"group {self.tag} not settled after {timeout_s:g} s: {held}")
            time.sleep(0.2)

    def _thread(self, fn: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by check()
                self._failure.append(exc)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def check(self) -> None:
        """Raise what a background thread died of, or a worker process that exited."""
        if self._failure:
            raise RuntimeError(f"load harness thread failed: {self._failure[0]!r}") from self._failure[0]
        for w in self.workers:
            if not w.alive():
                raise RuntimeError(f"worker {w.pid} exited with {w.proc.returncode}; log {w.log_path}")

    def stop_workers(self) -> list[int | None]:
        """Graceful stop of every worker (their final metrics scraped first); their exit codes."""
        for w in self.workers:
            w.scrape()
        return [w.stop() for w in self.workers]

    def close(self) -> None:
        self._stop.set()
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.stop()
        for t in self._threads:
            t.join(10)
        for c in (self._reader, self._group):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        if self._producer is not None:
            self._producer.flush(10)
            # librdkafka keeps reconnecting until the client is freed; a run read after its stack is down
            # (the in-process reference reads its clicks) must not hold one
            self._producer = None

    # ---- publishing ------------------------------------------------------------------------------

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            self.first_error = self.first_error or str(err)
            return
        p, off = msg.partition(), msg.offset()
        self.delivered += 1
        self.ends[p] = max(self.ends.get(p, 0), off + 1)
        self.partition.setdefault(msg.key().decode(), p)
        self.offset[int(orjson.loads(msg.value())["event_id"].rsplit("-", 1)[1])] = off

    def _next_item(self) -> int:
        try:
            return next(self._items)
        except StopIteration:
            draw = self._rng.choice(self._item_order, size=65536, p=self._item_p)
            self._items = iter(draw.tolist())
            return next(self._items)

    def _next_user(self) -> str:
        try:
            return self.users[next(self._user_draw)]
        except StopIteration:
            self._user_draw = iter(self._rng.integers(0, len(self.users), size=65536).tolist())
            return self.users[next(self._user_draw)]

    def publish_one(self, user: str | None = None) -> int:
        """One click of `user` (default: a random one) with a Zipf-drawn item; returns its sequence number."""
        user = user or self._next_user()
        item = self._next_item()
        seq, now = len(self.sent), time.time()
        self.sent.append(now)
        self.lat.append(math.nan)
        self.recv.append(math.nan)
        self.offset.append(-1)
        self.history.setdefault(user, []).append(item)
        self.seqs.setdefault(user, []).append(seq)
        self._pending.setdefault(user, deque()).append(seq)  # before producing: the recall may come first
        value = dump_click(Click(f"{self.tag}-{seq}", user, self._raw[item - 2], now))
        self.bytes_per_click += (len(value) - self.bytes_per_click) / (seq + 1)
        while True:
            try:
                self._producer.produce(
                    self.settings.clicks_topic, value, user.encode(), on_delivery=self._on_delivery
                )
                break
            except BufferError:  # the producer's bounded queue is full: wait for deliveries
                self._producer.poll(0.05)
        self._producer.poll(0)
        return seq

    def prefill(self, per_user: int, timeout_s: float = 180.0) -> int:
        """`per_user` clicks for every user, as fast as possible, answered and committed before returning:
        full windows from the start make a stationary workload (every refresh pays K interests and the
        largest seen-set). Returns the clicks sent."""
        for _ in range(per_user):
            for u in self.users:
                self.publish_one(u)
        if not self.drain(timeout_s):
            raise RuntimeError(f"prefill not answered within {timeout_s:g} s")
        return per_user * len(self.users)

    def publish(
        self,
        rate: float | None,
        *,
        seconds: float | None = None,
        clicks: int | None = None,
        tick: Callable[[], None] | None = None,
    ) -> tuple[int, int]:
        """Clicks at `rate` per second (None = as fast as possible), sleep-to-schedule so the rate does not
        drift, for `seconds` or `clicks`; `tick` runs about every 0.1 s. Returns [first, end) sequence."""
        if seconds is None and clicks is None:
            raise ValueError("publish needs seconds or clicks")
        first = len(self.sent)
        t0 = time.monotonic()
        next_tick = t0
        n = 0
        while True:
            now = time.monotonic()
            if (seconds is not None and now - t0 >= seconds) or (clicks is not None and n >= clicks):
                break
            if rate:
                wait = t0 + n / rate - now
                if wait > 0.0005:
                    time.sleep(min(wait, 0.1))
                    continue
            self.publish_one()
            n += 1
            if now >= next_tick:
                next_tick = now + 0.1
                self.check()
                if tick is not None:
                    tick()
        self._producer.flush(60)
        return first, len(self.sent)

    # ---- reading and sampling --------------------------------------------------------------------

    def _read(self) -> None:
        """Time every click: a recall triggered by a user's click covers that click and every earlier click
        of the user not yet answered (the worker coalesces one user's clicks in a batch)."""
        s, prefix = self.settings, f"{self.tag}-"
        while not self._stop.is_set():
            for m in available(self._reader, 500, 0.05):  # no batch wait added to the latencies
                if m.error():
                    continue
                if m.topic() == s.dlq_topic:
                    self.dlq += 1
                    continue
                now = time.time()
                rec = orjson.loads(m.value())
                event = rec.get("event_id", "")
                if not event.startswith(prefix):
                    continue
                self.recalls += 1
                seq = int(event.rsplit("-", 1)[1])
                dq = self._pending.get(rec.get("user_id", ""))
                while dq and dq[0] <= seq:
                    k = dq.popleft()
                    self.lat[k] = (now - self.sent[k]) * 1e3
                    self.recv[k] = now

    def committed(self) -> dict[int, int]:
        """The group's committed offset per partition of clicks (0 where none yet)."""
        from confluent_kafka import TopicPartition

        s = self.settings
        with self._lock:
            tps = self._group.committed(
                [TopicPartition(s.clicks_topic, p) for p in range(s.partitions)], timeout=10
            )
        return {tp.partition: max(tp.offset, 0) for tp in tps}

    def broker_lag(self, committed: dict[int, int] | None = None) -> int:
        """Clicks delivered to the broker that the group has not committed: the backlog in the broker."""
        c = committed if committed is not None else self.committed()
        return sum(max(0, end - c.get(p, 0)) for p, end in list(self.ends.items()))

    def sample(self) -> dict[str, Any]:
        """One point of the time series: RSS, lag (broker; worker gauge), committed, published, errors."""
        with self._sampling:  # the sampler thread and an explicit call: one point at a time, in order
            return self._sample()

    def _sample(self) -> dict[str, Any]:
        now = time.time()
        c = self.committed()
        rss = [w.rss_mb() for w in self.workers]
        mets = [w.scrape() for w in self.workers]
        point: dict[str, Any] = {
            "t_s": round(now - self.t0, 2),
            "rss_mb": round(sum(r for r in rss if r is not None), 2),
            "rss_mb_each": [round(r, 2) if r is not None else None for r in rss],
            "lag": self.broker_lag(c),
            "lag_gauge": int(sum(m.get("mind_worker_consumer_lag", 0.0) for m in mets)),
            "committed": int(sum(c.values())),
            "published": len(self.sent),
            "applied": int(sum(m.get("mind_worker_clicks_applied_total", 0.0) for m in mets)),
            "retries": int(sum(m.get("mind_worker_retries_total", 0.0) for m in mets)),
            "paused": int(sum(m.get("mind_worker_paused", 0.0) for m in mets)),
        }
        if self.samples:
            prev = self.samples[-1]
            dt = max(point["t_s"] - prev["t_s"], 1e-6)
            point["consumed_cps"] = round((point["committed"] - prev["committed"]) / dt, 1)
            point["offered_cps"] = round((point["published"] - prev["published"]) / dt, 1)
            n = len(self.sent)
            lo, since = max(0, n - 20_000), self.t0 + prev["t_s"]
            recent = [x for x, r in zip(self.lat[lo:n], self.recv[lo:n], strict=True) if r >= since]
            point["e2e_p50_ms"] = _pct(recent, 50)
            point["e2e_p99_ms"] = _pct(recent, 99)
        self.samples.append(point)
        return point

    def start_sampling(self, every_s: float) -> None:
        """Sample on a thread every `every_s` until close()."""

        def loop() -> None:
            while not self._stop.wait(every_s):
                self.sample()

        self._thread(loop, "load-sampler")

    # ---- outcome ---------------------------------------------------------------------------------

    def drain(self, timeout_s: float) -> bool:
        """Wait until every delivered click is committed by the group and answered by a recall message."""
        deadline = time.monotonic() + timeout_s
        self._producer.flush(30)
        while time.monotonic() < deadline:
            self.check()
            if all(not dq for dq in self._pending.values()):
                c = self.committed()
                if all(c.get(p, 0) >= end for p, end in self.ends.items()):
                    return True
            time.sleep(0.1)
        return False

    def phase(self, first: int, end: int) -> dict[str, Any]:
        """Latency and achieved rate of clicks [first, end): first sent -> last one answered."""

        lat = np.asarray(self.lat[first:end], dtype=np.float64)
        recv = np.asarray(self.recv[first:end], dtype=np.float64)
        n = end - first
        answered = int(np.isfinite(lat).sum())
        seconds = float(np.nanmax(recv) - self.sent[first]) if answered else 0.0
        cps = round(n / seconds, 1) if seconds > 0 else 0.0
        ok = lat[np.isfinite(lat)]
        return {
            "clicks": n,
            "answered": answered,
            "missing": n - answered,
            "seconds": round(seconds, 2),
            "achieved_cps": cps,
            "p50_ms": _pct(ok, 50),
            "p99_ms": _pct(ok, 99),
            "p999_ms": _pct(ok, 99.9),
            "mean_ms": round(float(ok.mean()), 2) if len(ok) else None,
            "max_ms": round(float(ok.max()), 2) if len(ok) else None,
            "lag": _lag(ok.tolist(), cps),
        }

    def verify(self) -> dict[str, Any]:
        """Compare what the workers did with what was published. The cut per partition is the offset the
        state says it applied up to; every user's window must equal the last window_len of its clicks up
        to that cut, in click order: missing items count as lost, extra ones as applied twice, the same
        items in another order as an order violation. Clicks beyond the cut were not processed (a run that
        did not drain): `unprocessed`, not lost. Every delivered offset should be committed (`uncommitted`)
        and every user's last click answered by a recall message (`missing_recall`)."""
        from collections import Counter

        s = self.settings
        client = redis_client(s)
        lost = twice = disorder = mismatched = unprocessed = 0
        try:
            state = WindowState(client, s.clicks_topic, s.window_len)
            cut = state.offsets(list(range(s.partitions)))
            users = [u for u in self.history if u in self.partition]
            for i in range(0, len(users), 2000):
                chunk = users[i : i + 2000]
                got = state.read_windows([(self.partition[u], u) for u in chunk])
                for u, w in zip(chunk, got, strict=True):
                    upto = cut.get(self.partition[u], -1)
                    done = [
                        item
                        for q, item in zip(self.seqs[u], self.history[u], strict=True)
                        if 0 <= self.offset[q] <= upto
                    ]
                    unprocessed += len(self.history[u]) - len(done)
                    want = done[-s.window_len :]
                    if w == want:
                        continue
                    mismatched += 1
                    cw, cg = Counter(want), Counter(w)
                    lost += sum((cw - cg).values())
                    twice += sum((cg - cw).values())
                    disorder += int(cw == cg)
        finally:
            client.close()
        c = self.committed()
        uncommitted = sum(max(0, end - c.get(p, 0)) for p, end in self.ends.items())
        full = all(len(h) <= s.window_len for h in self.history.values())
        return {
            "published": len(self.sent),
            "delivered": self.delivered,
            "delivery_failures": self.failed,
            "users": len(self.history),
            "lost": lost,
            "applied_twice": twice,
            "out_of_order_users": disorder,
            "mismatched_windows": mismatched,
            "windows_hold_whole_history": full,
            "unprocessed": unprocessed,
            "uncommitted": uncommitted,
            "state_behind_commit": sorted(p for p, off in c.items() if off > cut.get(p, -1) + 1),
            "missing_recall": sum(1 for dq in self._pending.values() if dq),
            "recall_messages": self.recalls,
            "dlq": self.dlq,
            "applied_counter": int(
                sum(w.last_metrics.get("mind_worker_clicks_applied_total", 0) for w in self.workers)
            ),
            "duplicates_skipped": int(
                sum(w.last_metrics.get("mind_worker_duplicates_skipped_total", 0) for w in self.workers)
            ),
        }

    def group_events(self) -> list[dict[str, Any]]:
        """Each worker's assignments and revocations, in time order (a stall shows here first)."""
        out = []
        for w in self.workers:
            w.read_log()
            for e in w.events:
                if e.get("event") in ("partitions assigned", "partitions revoked", "worker stopping"):
                    out.append(
                        {
                            "timestamp": e.get("timestamp"),
                            "worker": w.pid,
                            "event": e.get("event"),
                            "partitions": e.get("partitions"),
                        }
                    )
        return sorted(out, key=lambda e: str(e["timestamp"]))

    def errors(self, t_from: float, t_to: float) -> list[dict[str, Any]]:
        """Worker log lines at WARNING or above (retries, refused commits, crashes) between two times."""
        out = []
        for w in self.workers:
            w.read_log()
            for e in w.events:
                if str(e.get("level", "")).lower() not in ERROR_LEVELS:
                    continue
                ts = e.get("timestamp")
                try:
                    t = datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
                if t_from <= t <= t_to:
                    out.append({"t": t, "worker": w.pid, "event": e.get("event"), "level": e.get("level")})
        return sorted(out, key=lambda e: e["t"])


# ---- soak ------------------------------------------------------------------------------------------------


# ---- reading a run -----------------------------------------------------------------------------------


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


def on_embedded_stack(
    checkpoint: Path | None,
    run_dir: Path | None,
    fn: Callable[[Settings, Path, Path], dict[str, Any]],
    *,
    n_items: int | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Start a fresh embedded stack (free ports), serve and index the checkpoint (default: the pipeline
    benchmark's model, else a random-init one with `n_items` items, Beauty-sized by default), run
    `fn(settings, checkpoint, workers' run dir)`, stop everything. `kw`: more settings."""

    with tempfile.TemporaryDirectory(prefix="mind-load-") as tmp:
        rd = Path(run_dir) if run_dir is not None else Path(tmp)
        ckpt = checkpoint or (DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None)
        if ckpt is None:
            ckpt = random_checkpoint(Path(tmp) / "random.pt", **({"n_items": n_items} if n_items else {}))
        ports = {f"embedded_{k}_port": 0 for k in ("kafka", "redis", "triton_grpc", "triton_http")}
        ports.update(embedded_triton_metrics_port=0, embedded_milvus_port=0)
        base = load_settings(None, metrics_port=0, log_level="WARNING", **ports, **kw)
        with serving(ckpt, rd, base) as (s, _version):
            return fn(s, ckpt, rd / "workers")
