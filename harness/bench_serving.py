"""Serving benchmark: the user tower on a real Triton server and the item index in a real milvus-lite, each
timed beside its in-process torch reference in the same run (`mind bench serving`).

Why in the same run: the project's machine is shared (2 cores, other engineers' jobs), so absolute times
drift by 2-10x between runs. Only ratios taken call by call (served and reference calls alternate) are
comparable; the load average at start and end is recorded with the figures.

What is measured:
- Triton p50/p99 per batch size (client wall time of one gRPC call, dynamic batching on) beside the
  in-process torch tower on the same windows, and the max abs difference of their outputs (edge cases
  included: empty window, one behaviour, unknown item, full window);
- Milvus ms per query at each nq beside an exact torch top-N and an exact numpy top-N on the same
  vectors, ANN recall@N against exact, and the client's share (nq=256 at limit=1 vs limit=N: pymilvus
  builds one Python object per hit);
- the recall step as the stream worker calls it (`Recaller.recall`: one search for every active interest,
  then the Eq. 3 merge) beside the in-process exact `mind.retrieval.retrieve` (exact top-N + same merge).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.machine import host as machine_info
from indexer.catalogue import item_vectors
from indexer.store import ItemIndex
from mind.dataset import Interactions, Vocab
from mind.experiment import write_json
from mind.export import read_meta
from mind.model import MIND, MINDConfig
from mind.retrieval import merge_interests, retrieve
from mind.train import load_checkpoint, model_config_for, save_checkpoint
from stream.embedded.milvus import EmbeddedMilvus
from stream.embedded.triton import EmbeddedTriton, free_port
from stream.recall import Recaller
from stream.tower import TritonTower
from workflows.serving import MODEL_NAME, export_checkpoint, index_checkpoint

# Beauty as the project trains it (runs/beauty/*.pt): 12,103 item indices, d=64, L=14, 6 side ids per
# item from 638 side values, one (empty) profile field; K=4 interests.
BEAUTY = {"n_items": 12_103, "d": 64, "K": 4, "max_len": 14, "n_side_slots": 6, "n_side": 638}


@dataclass
class BenchSizes:
    """How much to measure; the defaults are the committed benchmark, tests pass tiny ones."""

    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    calls: int = 200  # timed Triton (and torch) calls per batch size
    warmup: int = 20
    nqs: tuple[int, ...] = (1, 16, 256)
    milvus_reps: int = 30  # timed searches per nq (and exact top-N runs)
    n: int = 50  # top-N per query
    recall_queries: int = 256  # active interests searched by one recall step
    recall_reps: int = 100  # timed recall steps (paired with the exact reference: the ratio is noisy)
    n_items: int = BEAUTY["n_items"]  # random-init model only
    threads: int = 1  # torch threads in this process (the exact references and the in-process tower)


def random_checkpoint(
    path: Path,
    n_items: int = BEAUTY["n_items"],
    d: int = BEAUTY["d"],
    K: int = BEAUTY["K"],
    max_len: int = BEAUTY["max_len"],
    n_side_slots: int = BEAUTY["n_side_slots"],
    n_side: int = BEAUTY["n_side"],
    n_users: int = 1024,
    seed: int = 0,
) -> Path:
    """A random-init MIND checkpoint of the given size, saved through the project's own save_checkpoint
    (so export and index read it exactly as a trained one)."""

    rng = np.random.default_rng(seed)
    side = rng.integers(1, n_side, size=(n_items, n_side_slots)) * (rng.random((n_items, n_side_slots)) < 0.8)
    side[:2] = 0
    inter = Interactions(
        name=f"random-{n_items}",
        users=[f"u{u}" for u in range(n_users)],
        sequences=[rng.integers(2, n_items, size=int(rng.integers(5, 30))) for _ in range(n_users)],
        items=Vocab([f"i{i}" for i in range(n_items - 2)]),
        item_side=side.astype(np.int64),
        n_side=n_side,
        user_profile=np.zeros((n_users, 1), dtype=np.int64),
        n_profile=1,
    )
    torch.manual_seed(seed)
    cfg: MINDConfig = model_config_for(inter, d=d, K=K, max_len=max_len)
    save_checkpoint(path, MIND(cfg), inter, None, extra={"random_init": True})
    return path


class WindowSampler:
    """Right-padded behaviour windows drawn like real ones: true lengths 1..L, popularity-skewed items
    (Zipf over a random item order), the items' own side ids, profiles of random users."""

    def __init__(self, item_side: np.ndarray, profiles: np.ndarray, max_len: int, seed: int = 0) -> None:
        self.item_side, self.profiles, self.L = item_side, profiles, max_len
        self.rng = np.random.default_rng(seed)
        m = item_side.shape[0]
        w = 1.0 / np.arange(1, m - 1) ** 1.0
        self.items = self.rng.permutation(np.arange(2, m))
        self.p = w / w.sum()

    def draw(self, b: int, lengths: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lens = lengths if lengths is not None else list(self.rng.integers(1, self.L + 1, size=b))
        items = np.zeros((len(lens), self.L), dtype=np.int64)
        drawn = self.rng.choice(self.items, size=int(sum(lens)), p=self.p)
        for r, (n, start) in enumerate(zip(lens, np.cumsum([0, *lens[:-1]]), strict=True)):
            items[r, :n] = drawn[start : start + n]
        side = self.item_side[items] * (items[..., None] > 1)
        prof = self.profiles[self.rng.integers(0, len(self.profiles), size=len(lens))]
        return items, side.astype(np.int64), prof.astype(np.int64)

    def edge_cases(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Empty window, one behaviour, the maximum length, an unknown item (id 1), and random rows."""
        items, side, prof = self.draw(8, lengths=[0, 1, self.L, 3, self.L, 5, 2, 7])
        items[3, 1] = 1
        side[3, 1] = 0
        return items, side, prof


def _ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1e3, 3)


def _median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 4)


def _alternate(fns: list[Callable[[], Any]], reps: int) -> list[list[float]]:
    """Time the functions call by call in turn, so that load changes hit all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does, so the servers are stopped on either."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _bench_triton(
    tower: Any, model: MIND, sampler: WindowSampler, sizes: BenchSizes, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """Latency per batch size (Triton and in-process torch alternating) and the output difference."""

    def torch_tower(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            v, a = model(*(torch.from_numpy(x) for x in batch))
        return v.numpy(), a.numpy()

    diff, active_equal = 0.0, True

    def compare(batch: tuple[np.ndarray, ...]) -> None:
        nonlocal diff, active_equal
        got_v, got_a, _ = tower.infer(*batch)
        ref_v, ref_a = torch_tower(batch)
        diff = max(diff, float(np.abs(got_v - ref_v).max()))
        active_equal &= bool(np.array_equal(got_a, ref_a))

    compare(sampler.edge_cases())
    out: dict[str, Any] = {"batch": {}}
    raw: dict[str, dict[str, list[float]]] = {}
    for b in sizes.batch_sizes:
        batches = [sampler.draw(b) for _ in range(4)]
        for batch in batches:
            compare(batch)
        for i in range(sizes.warmup):
            tower.infer(*batches[i % 4])
            torch_tower(batches[i % 4])
        tri, ref = [], []
        for i in range(sizes.calls):  # alternate, same windows for both
            batch = batches[i % len(batches)]
            for fn, times in ((tower.infer, tri), (lambda *x: torch_tower(x), ref)):
                t0 = time.perf_counter()
                fn(*batch)
                times.append(time.perf_counter() - t0)
        raw[str(b)] = {"triton": tri, "torch": ref}
        row = {
            "p50_ms": _ms(tri, 50),
            "p99_ms": _ms(tri, 99),
            "mean_ms": round(statistics.fmean(tri) * 1e3, 3),
            "torch_p50_ms": _ms(ref, 50),
            "torch_p99_ms": _ms(ref, 99),
            "ratio_p50": round(_ms(tri, 50) / max(_ms(ref, 50), 1e-9), 2),
            "calls": sizes.calls,
        }
        out["batch"][str(b)] = row
        log(f"triton B={b}: p50 {row['p50_ms']} ms (torch {row['torch_p50_ms']} ms)")
    out["max_abs_diff"] = diff
    out["active_equal"] = active_equal
    return out, raw


def _exact_numpy(q: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """Exact top-n ids by inner product, best first (argpartition, then a sort of the n)."""
    s = q @ x.T
    part = np.argpartition(-s, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _bench_milvus(
    index: Any, vectors: np.ndarray, queries: np.ndarray, sizes: BenchSizes, log: Callable[[str], None]
) -> dict[str, Any]:
    """ms per query at each nq: Milvus (ItemIndex.search) vs exact torch and numpy on the same vectors."""
    n = sizes.n
    x_np = np.ascontiguousarray(vectors[2:])  # rows 0/1 (PAD/OOV) are never indexed
    x_t = torch.from_numpy(x_np)
    out: dict[str, Any] = {"nq": {}}
    for _ in range(3):
        index.search(queries, n)
    for nq in sizes.nqs:
        q = queries[:nq]
        q_t = torch.from_numpy(q)
        mil, ex_t, ex_n = _alternate(
            [
                lambda q=q: index.search(q, n),
                lambda q_t=q_t: torch.topk(q_t @ x_t.T, n, dim=1),
                lambda q=q: _exact_numpy(q, x_np, n),
            ],
            sizes.milvus_reps,
        )
        m, e, en = (_median_ms(t) / nq for t in (mil, ex_t, ex_n))
        out["nq"][str(nq)] = {
            "ms_per_query": round(m, 4),
            "exact_ms_per_query": round(e, 4),
            "exact_numpy_ms_per_query": round(en, 4),
            "ratio": round(m / e, 2),
            "ratio_numpy": round(m / en, 2),
        }
        log(f"milvus nq={nq}: {m:.3f} ms/query (exact torch {e:.3f}, numpy {en:.3f})")
    got = index.search(queries, n).ids
    exact = torch.topk(torch.from_numpy(queries) @ x_t.T, n, dim=1).indices.numpy() + 2
    out["recall_vs_exact"] = round(
        float(np.mean([len(set(a) & set(b)) / n for a, b in zip(got, exact, strict=True)])), 4
    )
    # Where the time goes at the largest nq: the same call returning 1 hit per query instead of n.
    big = queries[: max(sizes.nqs)]
    one, full = _alternate([lambda: index.search(big, 1), lambda: index.search(big, n)], sizes.milvus_reps)
    t1, tn = _median_ms(one), _median_ms(full)
    out["breakdown"] = {
        "nq": len(big),
        "search_ms_limit_1": round(t1, 3),
        f"search_ms_limit_{n}": round(tn, 3),
        "per_hit_us": round((tn - t1) * 1e3 / (len(big) * max(n - 1, 1)), 3),
        "hits_share": round((tn - t1) / tn, 3) if tn > 0 else None,
    }
    return out


def _pick_users(active: np.ndarray, queries: int) -> np.ndarray:
    """Rows (users) whose active interests add up to exactly `queries` (or as close as the pool allows)."""
    rows, total = [], 0
    for r, k in enumerate(active.sum(1)):
        if total + k <= queries:
            rows.append(r)
            total += int(k)
        if total == queries:
            break
    return np.asarray(rows, dtype=np.int64)


def _exact_recall(
    v: np.ndarray, a: np.ndarray, x_t: torch.Tensor, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The recall step with Milvus replaced by torch: one exact top-n over the active interests only,
    then the same merge. The strongest in-process reference (`mind.retrieval.retrieve` also scores the
    inactive slots, up to K/K' times the work)."""

    s = torch.from_numpy(v[a]) @ x_t.T
    s[:, :2] = float("-inf")  # PAD / OOV are never candidates
    top = torch.topk(s, n, dim=1)
    ids = np.full((*a.shape, n), -1, dtype=np.int64)
    scores = np.full((*a.shape, n), -np.inf, dtype=np.float32)
    ids[a], scores[a] = top.indices.numpy(), top.values.numpy()
    return merge_interests(ids, scores, n)


def _bench_recall(
    index: Any,
    version: str,
    interests: np.ndarray,
    active: np.ndarray,
    vectors: np.ndarray,
    sizes: BenchSizes,
) -> dict[str, Any]:
    """The recall step as the worker calls it vs in-process exact retrieval followed by the same merge."""

    rows = _pick_users(active, sizes.recall_queries)
    v, a = interests[rows], active[rows]
    v_t, a_t, x_t = torch.from_numpy(v), torch.from_numpy(a), torch.from_numpy(vectors)
    n = sizes.n
    recaller = Recaller(index, n)
    served = recaller.recall(v, a, version)
    ref_ids, ref_sc, _ = _exact_recall(v, a, x_t, n)
    off_ids, _, _ = retrieve(v_t, a_t, x_t, n)
    top = min(20, n)
    rec, ex, off = _alternate(
        [
            lambda: recaller.recall(v, a, version),
            lambda: _exact_recall(v, a, x_t, n),
            lambda: retrieve(v_t, a_t, x_t, n),
        ],
        sizes.recall_reps,
    )
    q = int(a.sum())
    ms, ems, oms = _median_ms(rec), _median_ms(ex), _median_ms(off)
    pair = np.asarray(rec) / np.asarray(ex)  # call-by-call ratio: robust to slow load drift
    return {
        "users": len(rows),
        "queries": q,
        "n": n,
        "ms": round(ms, 3),
        "exact_ms": round(ems, 3),
        "ms_per_query": round(ms / q, 4),
        "exact_ms_per_query": round(ems / q, 4),
        "ratio": round(ms / ems, 2),
        "ratio_p25_p75": [round(float(x), 2) for x in np.percentile(pair, [25, 75])],
        "ratio_best_of": round(min(rec) / min(ex), 2),
        "reps": sizes.recall_reps,
        "offline_retrieve_ms": round(oms, 3),  # mind.retrieval.retrieve, all K slots scored
        "ratio_vs_offline_retrieve": round(ms / oms, 2),
        f"top{top}_ids_equal": round(float(np.mean(served.ids[:, :top] == ref_ids[:, :top])), 4),
        "exact_equals_offline_retrieve": bool(np.array_equal(ref_ids, off_ids)),
        "max_score_diff": float(
            np.nanmax(np.abs(np.where(np.isfinite(ref_sc), served.scores - ref_sc, 0.0)))
        ),
    }


def plot_latency(raw: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """Histogram of Triton (and in-process torch) call latency per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(raw), figsize=(4 * len(raw), 3.2), squeeze=False)
    for ax, (b, series) in zip(axes[0], raw.items(), strict=True):
        tri, ref = np.asarray(series["triton"]) * 1e3, np.asarray(series["torch"]) * 1e3
        hi = float(np.percentile(np.concatenate([tri, ref]), 99.5))
        bins = np.linspace(0.0, max(hi, 1e-3), 40)
        ax.hist(np.clip(tri, None, hi), bins=bins, alpha=0.7, label=f"Triton p50 {np.median(tri):.2f}")
        ax.hist(np.clip(ref, None, hi), bins=bins, alpha=0.6, label=f"torch p50 {np.median(ref):.2f}")
        ax.axvline(float(np.percentile(tri, 99)), color="C0", ls="--", lw=1)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("ms per call (clipped at p99.5)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("calls")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(res: dict[str, Any]) -> str:
    """The human-readable summary printed by `mind bench serving` (and pasted into the READMEs)."""
    lines = [
        "| batch | Triton p50 / p99 ms | torch p50 / p99 ms | Triton / torch (p50) |",
        "|---:|---:|---:|---:|",
    ]
    for b, r in res["triton"]["batch"].items():
        lines.append(
            f"| {b} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['torch_p50_ms']:.2f} / "
            f"{r['torch_p99_ms']:.2f} | {r['ratio_p50']:.1f}x |"
        )
    lines.append(f"\nTriton vs torch max abs diff: {res['triton']['max_abs_diff']:.3g}\n")
    m = res["milvus"]
    lines += [
        "| nq | Milvus ms/query | exact torch ms/query | exact numpy ms/query | Milvus / torch |",
        "|---:|---:|---:|---:|---:|",
    ]
    for nq, r in m["nq"].items():
        lines.append(
            f"| {nq} | {r['ms_per_query']:.3f} | {r['exact_ms_per_query']:.3f} | "
            f"{r['exact_numpy_ms_per_query']:.3f} | {r['ratio']:.1f}x |"
        )
    bd = m["breakdown"]
    lim_n = next(k for k in bd if k.startswith("search_ms_limit_") and k != "search_ms_limit_1")
    lines.append(
        f"\nMilvus recall@{res['sizes']['n']} vs exact: {m['recall_vs_exact']:.4f} ({m['rows']} rows). "
        f"nq={bd['nq']}: {bd['search_ms_limit_1']:.1f} ms at limit 1 vs {bd[lim_n]:.1f} ms at "
        f"limit {res['sizes']['n']} ({bd['per_hit_us']:.2f} us per extra hit, "
        f"{bd['hits_share']:.0%} of the call)"
    )
    r = res["recall_step"]
    lines.append(
        f"Recall step ({r['users']} users, {r['queries']} active interests): {r['ms']:.1f} ms vs exact "
        f"in-process {r['exact_ms']:.1f} ms = {r['ratio']:.1f}x ({r['ms_per_query']:.3f} vs "
        f"{r['exact_ms_per_query']:.3f} ms/query; call-by-call ratio p25-p75 {r['ratio_p25_p75']}, "
        f"best-of {r['ratio_best_of']}x). mind.retrieval.retrieve (scores all K slots): "
        f"{r['offline_retrieve_ms']:.1f} ms, {r['ratio_vs_offline_retrieve']:.1f}x"
    )
    ld = res["machine"]
    lines.append(f"Load average at start / end: {ld['loadavg_start']} / {ld['loadavg_end']}")
    return "\n".join(lines)


def run(
    out: Path,
    checkpoint: Path | None = None,
    sizes: BenchSizes | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start Triton and milvus-lite in a temporary run dir, export + index the model, measure, write JSON
    (and a PNG beside it). Both servers are stopped on any exit, Ctrl-C and SIGTERM included."""

    sizes = sizes or BenchSizes()
    out = Path(out)
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, sizes.threads))
    host = machine_info()
    try:
        with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mind-bench-serving-")))
            if checkpoint is None:
                ckpt = random_checkpoint(tmp / "random.pt", n_items=sizes.n_items)
                source = f"random-init MIND sized like Beauty ({sizes.n_items} items)"
            else:
                ckpt, source = Path(checkpoint), str(checkpoint)
            model, meta = load_checkpoint(ckpt)
            repo = tmp / "model_repo"
            t0 = time.perf_counter()
            version = export_checkpoint(ckpt, repo)
            export_s = time.perf_counter() - t0
            triton = EmbeddedTriton(
                repo,
                tmp / "triton",
                models=[MODEL_NAME],
                grpc_port=free_port(),
                http_port=free_port(),
                metrics_port=free_port(),
                ready_timeout_s=300,
            )
            stack.enter_context(triton)
            milvus = EmbeddedMilvus(tmp / "milvus")
            uri = stack.enter_context(milvus)
            log(f"tritonserver ready in {triton.start_seconds:.1f}s, milvus-lite {milvus.start_seconds:.1f}s")
            tower = TritonTower(triton.grpc_url, MODEL_NAME, timeout_s=60.0)
            stack.callback(tower.close)
            served = tower.meta()
            if served.model_version != str(version):
                raise RuntimeError(f"Triton serves model version {served.model_version}, exported {version}")

            item_side = np.asarray(meta["item_side"], dtype=np.int64)
            profiles = np.asarray(meta["user_profile"], dtype=np.int64)
            sampler = WindowSampler(item_side, profiles, model.cfg.max_len, seed=0)
            triton_res, raw = _bench_triton(tower, model, sampler, sizes, log)
            triton_res["server_start_s"] = round(triton.start_seconds or 0.0, 2)
            triton_res["export_s"] = round(export_s, 2)

            stats = index_checkpoint(ckpt, uri, version, repo=repo, progress=progress)
            index = ItemIndex(uri)
            stack.callback(index.close)
            vectors = item_vectors(model, item_side, progress=False)
            # Queries: real interest vectors of the model (active ones only), as the worker sends them.
            pool_v, pool_a = [], []
            while sum(int(a.sum()) for a in pool_a) < max(max(sizes.nqs), sizes.recall_queries) + 64:
                with torch.inference_mode():
                    v, a = model(*(torch.from_numpy(x) for x in sampler.draw(256)))
                pool_v.append(v.numpy())
                pool_a.append(a.numpy())
            interests, active = np.concatenate(pool_v), np.concatenate(pool_a)
            queries = np.ascontiguousarray(interests[active])
            milvus_res = _bench_milvus(index, vectors, queries, sizes, log)
            milvus_res.update(
                rows=stats.rows,
                dim=stats.dim,
                index=index.info(stats.version).index_type,
                metric=index.info(stats.version).metric,
                index_seconds=round(stats.seconds, 2),
            )
            recall_res = _bench_recall(index, str(version), interests, active, vectors, sizes)
            log(f"recall step: {recall_res['ms']} ms vs exact {recall_res['exact_ms']} ms")
            exported = read_meta(repo, MODEL_NAME, version)
    finally:
        torch.set_num_threads(old_threads)

    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res: dict[str, Any] = {
        "triton": triton_res,
        "milvus": milvus_res,
        "recall_step": recall_res,
        "model": {
            "source": source,
            "dataset": meta.get("dataset"),
            "trained_epochs": meta.get("epoch"),
            "valid_recall@50": (meta.get("valid") or {}).get("recall@50"),
            "version": version,
            "vocab_hash": exported["vocab_hash"],
            "model_digest": exported.get("model_digest"),
            "n_items": model.cfg.n_items,
            "K": model.cfg.K,
            "d": model.cfg.d,
            "L": model.cfg.max_len,
            "S": int(item_side.shape[1]),
            "P": int(profiles.shape[1]),
        },
        "sizes": asdict(sizes),
        "machine": host,
        "seconds": round(time.perf_counter() - t_start, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out, res)
    plot_latency(
        raw,
        out.with_suffix(".png"),
        f"Triton (gRPC, Python backend) vs in-process torch tower, same windows\n{source}; "
        f"load average {host['loadavg_start']} (shared machine)",
    )
    return res
