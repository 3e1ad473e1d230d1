"""Catalogue-size serving benchmark: Milvus search (FLAT and IVF_FLAT) beside an exact in-process top-N, at
catalogue sizes from Beauty's 12k items up to 1M (`python -m harness.bench_catalogue --sizes 12k,100k,1M`).

Why: Beauty's catalogue (12k items) is small enough that an exact scan beats the server; a production
catalogue is not. This measures where an ANN index starts to pay, on item vectors shaped like trained
ones (clustered, popularity-skewed, norms that vary), because an IVF index's recall on isotropic random
vectors says little about its recall on real embeddings.

Per catalogue size and index type it reports Milvus ms per query at each nq (p50, and p99 / p99.9 of the
call latency), recall@N against exact, and an exact numpy top-N (matmul + argpartition) timed call by call
in the same run, with the ratio. IVF_FLAT gets nlist = 4 sqrt(n) (a power of two) and the smallest nprobe
whose recall@N on held-out queries reaches the target, found by doubling; the recall reported is measured
on other queries. At the smallest size the two search paths of ItemIndex (flat arrays off the wire, and
pymilvus' per-hit objects) are compared too.

The machine is shared (2 cores): compare figures within one run. Run it under the lock:
`flock /work/heavy.lock python -m harness.bench_catalogue`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from harness.machine import host, loadavg
from indexer.build import ivf_nlist
from indexer.store import ItemIndex
from mind.experiment import write_json
from stream.embedded.milvus import EmbeddedMilvus

DEFAULT_SIZES = (12_000, 100_000, 1_000_000)
INDEX_TYPES = ("FLAT", "IVF_FLAT")
MAX_INSERT_CHUNK = 2000  # milvus-lite 2.5.1: one 50k-row insert never returned (indexer/README.md)


@dataclass
class CatalogueConfig:
    """How much to measure; the defaults are the committed benchmark, tests pass tiny ones."""

    d: int = 64  # the model's embedding size
    n: int = 50  # top-N per query (recall@N)
    nqs: tuple[int, ...] = (1, 16, 256)
    budget_s: float = 15.0  # timed seconds per (size, index, nq), Milvus and exact calls together
    calls_nq1: int = 2000  # call cap at nq=1; nq=k gets calls_nq1 / sqrt(k)
    min_calls: int = 3
    warmup: int = 3
    recall_target: float = 0.95
    tune_queries: int = 256  # held-out queries for choosing nprobe
    test_queries: int = 256  # other queries for the recall reported
    paths_calls_nq1: int = 400  # flat vs pymilvus path at the smallest size; nq=k gets this / sqrt(k)
    chunk: int = MAX_INSERT_CHUNK
    seed: int = 0


# ---- synthetic item embeddings ----------------------------------------------------------------------


@dataclass
class Catalogue:
    """Synthetic item vectors [n_items, d] and what drew them (queries are drawn from the same clusters)."""

    vectors: np.ndarray
    centres: np.ndarray  # [C, d] unit cluster centres
    weights: np.ndarray  # [C] cluster popularity, sums to 1
    scale: np.ndarray  # [d] per-dimension standard deviation profile (anisotropy)


RECIPE = {
    "clusters": "C = max(8, round(sqrt(n_items) / 2)) Gaussian clusters (categories)",
    "anisotropy": "per-dimension scale s_j = (j + 1) ** -0.5, j = 0..d-1 (a decaying spectrum, as trained "
    "embeddings have); noise e = s * z / rms(s) / sqrt(d), z ~ N(0, I_d), so E|e|^2 = 1",
    "centres": "mu_k = unit(s * z_k), z_k ~ N(0, I_d)",
    "cluster_popularity": "w_k proportional to (k + 1) ** -1.1 (Zipf-like); each item's cluster ~ w",
    "item_direction": "unit(mu_k + 0.75 e): cosine to its centre about 0.8",
    "item_norm": "exp(0.3 g + 0.1 log(C w_k)), g ~ N(0, 1): log-normal spread, popular clusters a little "
    "longer (sampled-softmax training lengthens popular items)",
    "queries": "interest vectors: cluster k ~ w, unit(mu_k + 1.0 e) * exp(0.2 g) (blurrier than items)",
    "ids": "item id = row + 2 (0 = padding and 1 = OOV are never indexed)",
    "rng": "numpy default_rng(seed + n_items) for items, a separate stream per query set",
}


def synthetic_catalogue(n_items: int, d: int = 64, seed: int = 0) -> Catalogue:
    """Item vectors that look like trained item embeddings, by the recipe in RECIPE (also in the JSON)."""
    rng = np.random.default_rng(seed + n_items)
    c = max(8, round(math.sqrt(n_items) / 2))
    scale = (np.arange(d) + 1.0) ** -0.5
    centres = scale * rng.standard_normal((c, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = (np.arange(c) + 1.0) ** -1.1
    w /= w.sum()
    k = rng.choice(c, size=n_items, p=w)
    x = np.empty((n_items, d), dtype=np.float32)
    for s in range(0, n_items, 100_000):  # blocks keep float64 temporaries small at 1M items
        kk = k[s : s + 100_000]
        e = _noise(rng, len(kk), scale)
        v = centres[kk] + 0.75 * e
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        norm = np.exp(0.3 * rng.standard_normal(len(kk)) + 0.1 * np.log(c * w[kk]))
        x[s : s + len(kk)] = v * norm[:, None]
    return Catalogue(x, centres, w, scale)


def _noise(rng: np.random.Generator, m: int, scale: np.ndarray) -> np.ndarray:
    d = len(scale)
    return scale * rng.standard_normal((m, d)) / math.sqrt(float(np.mean(scale**2))) / math.sqrt(d)


def synthetic_queries(cat: Catalogue, nq: int, seed: int) -> np.ndarray:
    """Interest vectors drawn from the catalogue's clusters, popular clusters more often."""
    rng = np.random.default_rng(seed)
    k = rng.choice(len(cat.weights), size=nq, p=cat.weights)
    v = cat.centres[k] + 1.0 * _noise(rng, nq, cat.scale)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (v * np.exp(0.2 * rng.standard_normal(nq))[:, None]).astype(np.float32)


def describe(cat: Catalogue, seed: int = 0) -> dict[str, Any]:
    """Statistics that show the vectors are clustered and anisotropic, not isotropic noise."""
    rng = np.random.default_rng(seed)
    x = cat.vectors
    norms = np.linalg.norm(x, axis=1)
    a, b = rng.integers(0, len(x), size=(2, 20_000))
    cos = np.sum(x[a] * x[b], axis=1) / (norms[a] * norms[b])
    sample = x[rng.choice(len(x), size=min(len(x), 20_000), replace=False)].astype(np.float64)
    sv = np.linalg.svd(sample - sample.mean(0), compute_uv=False) ** 2
    sizes = np.sort(np.bincount(_nearest_centre(cat), minlength=len(cat.weights)))[::-1]
    return {
        "items": len(x),
        "clusters": len(cat.weights),
        "norm_p5_p50_p95": [round(float(v), 3) for v in np.percentile(norms, [5, 50, 95])],
        "mean_cosine_random_pairs": round(float(cos.mean()), 3),
        "variance_share_top10_pcs": round(float(sv[:10].sum() / sv.sum()), 3),
        "largest_cluster_share": round(float(sizes[0] / len(x)), 3),
        "median_cluster_size": int(np.median(sizes)),
    }


def _nearest_centre(cat: Catalogue) -> np.ndarray:
    out = np.empty(len(cat.vectors), dtype=np.int64)
    for s in range(0, len(out), 65_536):
        out[s : s + 65_536] = np.argmax(cat.vectors[s : s + 65_536] @ cat.centres.T, axis=1)
    return out


# ---- exact reference --------------------------------------------------------------------------------


def exact_top(q: np.ndarray, x: np.ndarray, n: int, block: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n rows of x by inner product, best first: matmul + argpartition, in query blocks whose
    score matrix stays under `block` floats (256 queries x 1M items would be 1 GB)."""
    per = max(1, block // x.shape[0])
    ids = np.empty((len(q), n), dtype=np.int64)
    scores = np.empty((len(q), n), dtype=np.float32)
    for s in range(0, len(q), per):
        sc = q[s : s + per] @ x.T
        part = np.argpartition(-sc, n - 1, axis=1)[:, :n]
        top = np.take_along_axis(sc, part, axis=1)
        order = np.argsort(-top, axis=1)
        ids[s : s + per] = np.take_along_axis(part, order, axis=1)
        scores[s : s + per] = np.take_along_axis(top, order, axis=1)
    return ids, scores


def recall_at(got: np.ndarray, want: np.ndarray) -> float:
    """Mean share of the exact top-N ids that the search returned."""
    return float(
        np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(got, want, strict=True)])
    )


# ---- IVF recall model -------------------------------------------------------------------------------


class IvfModel:
    """An in-process IVF_FLAT for inner product, to find the nprobe a server that applies it would need.

    milvus-lite 2.5.1 does not apply nprobe (nor nlist): it searches one growing segment with its own
    interim index (measured: nprobe 1 and nlist return the same ids). So the nprobe rule comes from this
    model of faiss/knowhere's IVF_FLAT with metric IP: spherical k-means (IP assignment, unit centroids)
    trained on a sample of 32 points per list for 10 iterations (faiss trains on up to 256 per list for 25,
    so this quantizer is a little worse and the nprobe it asks for errs high), items in the list of their
    highest-IP centroid, a query scans its nprobe highest-IP lists exactly. Recall only; no timing.
    """

    def __init__(self, x: np.ndarray, nlist: int, seed: int = 0, per_list: int = 32, iters: int = 10) -> None:
        rng = np.random.default_rng(seed)
        self.x, self.nlist = x, min(nlist, len(x))
        sample = x[rng.choice(len(x), size=min(len(x), per_list * self.nlist), replace=False)]
        sample = sample / np.linalg.norm(sample, axis=1, keepdims=True)
        c = sample[rng.choice(len(sample), size=self.nlist, replace=False)].copy()
        for _ in range(iters):
            a = self._assign(sample, c)
            sums = np.zeros_like(c)
            np.add.at(sums, a, sample)
            empty = np.bincount(a, minlength=self.nlist) == 0
            sums[empty] = sample[rng.choice(len(sample), size=int(empty.sum()))]  # re-seed empty lists
            c = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        self.centroids = c.astype(np.float32)
        lists = self._assign(x, self.centroids)
        self.order = np.argsort(lists, kind="stable")
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=self.nlist))])

    @staticmethod
    def _assign(x: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=np.int64)
        per = max(1, (1 << 24) // len(c))
        for s in range(0, len(x), per):
            out[s : s + per] = np.argmax(x[s : s + per] @ c.T, axis=1)
        return out

    def search(self, q: np.ndarray, n: int, nprobe: int) -> tuple[np.ndarray, float]:
        """Top-n row indices per query (-1 padded) and the mean share of the catalogue scanned."""
        probe = np.argsort(-(q @ self.centroids.T), axis=1)[:, :nprobe]
        ids = np.full((len(q), n), -1, dtype=np.int64)
        scanned = 0
        for r, lists in enumerate(probe):
            cand = np.concatenate([self.order[self.offsets[k] : self.offsets[k + 1]] for k in lists])
            scanned += len(cand)
            sc = self.x[cand] @ q[r]
            k = min(n, len(cand))
            top = np.argpartition(-sc, k - 1)[:k] if k < len(cand) else np.arange(len(cand))
            ids[r, :k] = cand[top[np.argsort(-sc[top])]]
        return ids, scanned / len(q) / len(self.x)


def ivf_model_nprobe(
    x: np.ndarray,
    nlist: int,
    tune: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    cfg: CatalogueConfig,
) -> dict[str, Any]:
    """The smallest power-of-two nprobe whose model recall@N on the tuning queries reaches the target,
    and the recall and scanned share at that nprobe on the test queries. Truth arrays hold row indices."""
    t0 = time.perf_counter()
    model = IvfModel(x, nlist, cfg.seed)
    train_s = time.perf_counter() - t0
    tried, p, chosen = [], 1, None
    while p <= model.nlist:
        got, share = model.search(tune[0], cfg.n, p)
        r = recall_at(got, tune[1])
        tried.append({"nprobe": p, "recall": round(r, 4), "scanned_share": round(share, 4)})
        if r >= cfg.recall_target:
            chosen = p
            break
        p *= 2
    chosen = chosen or model.nlist
    got, share = model.search(test[0], cfg.n, chosen)
    return {
        "nlist": model.nlist,
        "nprobe": chosen,
        f"recall@{cfg.n}": round(recall_at(got, test[1]), 4),
        "scanned_share": round(share, 4),
        "tried": tried,
        "train_s": round(train_s, 1),
        "model": "in-process spherical k-means IVF (IvfModel); recall only",
    }


# ---- timing -----------------------------------------------------------------------------------------


def _pct(ms: list[float], q: float, need: int) -> float | None:
    """Percentile of call times in ms; None when too few calls to say anything about that tail."""
    return round(float(np.percentile(ms, q)), 3) if len(ms) >= need else None


def _summary(seconds: list[float], nq: int) -> dict[str, Any]:
    ms = [t * 1e3 for t in seconds]
    p50 = statistics.median(ms)
    return {
        "calls": len(ms),
        "p50_ms": round(p50, 3),
        "p99_ms": _pct(ms, 99, 100),
        "p99_9_ms": _pct(ms, 99.9, 1000),
        "max_ms": round(max(ms), 3),
        "ms_per_query": round(p50 / nq, 4),
    }


def _alternate(
    fns: Sequence[Callable[[np.ndarray], Any]],
    batches: Callable[[int], np.ndarray],
    cap: int,
    cfg: CatalogueConfig,
) -> list[list[float]]:
    """Call the functions in turn on the same batch until `cap` rounds or the time budget (at least
    min_calls rounds), so load changes on the shared machine hit all of them alike."""
    for i in range(cfg.warmup):
        for fn in fns:
            fn(batches(i))
    times: list[list[float]] = [[] for _ in fns]
    t_end = time.perf_counter() + cfg.budget_s
    i = 0
    while i < cap and (i < cfg.min_calls or time.perf_counter() < t_end):
        q = batches(i)
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn(q)
            ts.append(time.perf_counter() - t0)
        i += 1
    return times


def _batcher(pool: np.ndarray, nq: int) -> Callable[[int], np.ndarray]:
    """The i-th batch of nq queries, rotating through the pool (so calls do not repeat one batch)."""
    per = max(1, len(pool) // nq)
    return lambda i: pool[(i % per) * nq : (i % per) * nq + nq]


# ---- the benchmark ----------------------------------------------------------------------------------


def _available_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return None


def _tune_nprobe(
    index: ItemIndex, version: str, nlist: int, val_q: np.ndarray, val_truth: np.ndarray, cfg: CatalogueConfig
) -> dict[str, Any]:
    """Smallest nprobe (doubling from 1) whose recall@N on held-out queries reaches the target. First
    checks that the server honours nprobe at all: milvus-lite 2.5.1 searches its own interim index."""
    tried: list[dict[str, Any]] = []

    def measure(p: int) -> tuple[float, np.ndarray]:
        index.set_search_params(version, {"nprobe": p})
        got = index.search(val_q, cfg.n, version=version).ids
        r = recall_at(got, val_truth)
        tried.append({"nprobe": p, "recall": round(r, 4)})
        return r, got

    r_lo, ids_lo = measure(1)
    r_hi, ids_hi = measure(nlist)
    honoured = not np.array_equal(ids_lo, ids_hi)
    chosen: int | None = None
    if not honoured:
        note = (
            f"nprobe 1 and {nlist} return the same ids: this server does not apply nprobe; "
            f"recall {r_lo:.3f} is what its own search gives"
        )
    elif r_lo >= cfg.recall_target:
        chosen, note = 1, "nprobe 1 already reaches the target"
    else:
        p = 2
        while p < nlist:
            r, _ = measure(p)
            if r >= cfg.recall_target:
                chosen = p
                break
            p *= 2
        if chosen is None:
            chosen = nlist
        note = f"smallest power of two reaching recall {cfg.recall_target} on the tuning queries"
    index.set_search_params(version, {"nprobe": chosen if chosen is not None else 16})
    return {
        "tried": sorted(tried, key=lambda t: t["nprobe"]),
        "nprobe_honoured": honoured,
        "nprobe": chosen,
        "note": note,
    }


def _bench_paths(
    index: ItemIndex, version: str, pool: np.ndarray, cfg: CatalogueConfig, log: Callable[[str], None]
) -> dict[str, Any]:
    """ItemIndex.search with flat arrays off the wire vs pymilvus' per-hit objects, alternating."""
    out: dict[str, Any] = {"version": version, "nq": {}}
    for nq in cfg.nqs:
        batches = _batcher(pool, nq)
        a, b = (
            index.search(batches(0), cfg.n, version=version, flat=True),
            index.search(batches(0), cfg.n, version=version, flat=False),
        )
        cap = max(cfg.min_calls, round(cfg.paths_calls_nq1 / math.sqrt(nq)))
        flat, client = _alternate(
            [
                lambda q: index.search(q, cfg.n, version=version, flat=True),
                lambda q: index.search(q, cfg.n, version=version, flat=False),
            ],
            batches,
            cap,
            cfg,
        )
        f, c = _summary(flat, nq), _summary(client, nq)
        out["nq"][str(nq)] = {
            "flat": f,
            "pymilvus": c,
            "speedup_p50": round(c["p50_ms"] / f["p50_ms"], 2),
            "ids_equal": bool(np.array_equal(a.ids, b.ids)),
            "max_score_diff": float(np.max(np.abs(a.scores - b.scores))),
        }
        log(f"  search paths nq={nq}: flat {f['p50_ms']:.2f} ms vs pymilvus {c['p50_ms']:.2f} ms per call")
    return out


def _bench_size(
    index: ItemIndex, size: int, cfg: CatalogueConfig, paths: bool, progress: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    t0 = time.perf_counter()
    cat = synthetic_catalogue(size, cfg.d, cfg.seed)
    x, ids = cat.vectors, np.arange(2, size + 2, dtype=np.int64)
    out: dict[str, Any] = {"data": describe(cat, cfg.seed), "draw_s": round(time.perf_counter() - t0, 2)}
    tune_q = synthetic_queries(cat, cfg.tune_queries, cfg.seed + 1)
    test_q = synthetic_queries(cat, cfg.test_queries, cfg.seed + 2)
    pool = synthetic_queries(cat, max(1024, max(cfg.nqs) * 4), cfg.seed + 3)
    t0 = time.perf_counter()
    tune_rows, test_rows = exact_top(tune_q, x, cfg.n)[0], exact_top(test_q, x, cfg.n)[0]
    tune_truth, test_truth = tune_rows + 2, test_rows + 2
    out["exact_truth_s"] = round(time.perf_counter() - t0, 2)
    out["loadavg_start"] = loadavg()
    out["ivf_model"] = ivf_model_nprobe(x, ivf_nlist(size), (tune_q, tune_rows), (test_q, test_rows), cfg)
    im = out["ivf_model"]
    log(
        f"{size} items, IVF model: nlist {im['nlist']} needs nprobe {im['nprobe']} for recall@{cfg.n} "
        f"{im[f'recall@{cfg.n}']:.3f} (scans {im['scanned_share']:.1%} of the items)"
    )
    out["indexes"] = {}
    for index_type in INDEX_TYPES:
        res: dict[str, Any] = {}
        out["indexes"][index_type] = res
        try:
            version = f"n{size}_{index_type.lower()}"
            if index_type == "IVF_FLAT":
                nlist = ivf_nlist(size)
                res["index_params"], search_params = {"nlist": nlist}, {"nprobe": 16}
            else:
                res["index_params"], search_params = {}, {}
            t0 = time.perf_counter()
            index.create_version(
                version,
                cfg.d,
                index_type=index_type,
                index_params=res["index_params"],
                search_params=search_params,
            )
            index.insert(version, ids, x, batch=min(cfg.chunk, MAX_INSERT_CHUNK), progress=progress)
            t1 = time.perf_counter()
            index.build(version)
            t2 = time.perf_counter()
            res.update(
                insert_s=round(t1 - t0, 2), build_s=round(t2 - t1, 2), rows_per_s=round(size / (t1 - t0))
            )
            log(f"{size} items {index_type}: inserted in {t1 - t0:.1f} s, built in {t2 - t1:.1f} s")
            if index_type == "IVF_FLAT":
                res["tuning"] = _tune_nprobe(
                    index, version, res["index_params"]["nlist"], tune_q, tune_truth, cfg
                )
                log(f"  nprobe: {res['tuning']['note']} (tried {res['tuning']['tried']})")
            res["search_params"] = index.info(version, refresh=True).search_params
            rec = recall_at(index.search(test_q, cfg.n, version=version).ids, test_truth)
            res[f"recall@{cfg.n}"] = round(rec, 4)
            res["meets_target"] = rec >= cfg.recall_target
            log(f"  recall@{cfg.n} {rec:.4f} (search params {res['search_params']})")
            res["nq"] = {}
            for nq in cfg.nqs:
                cap = max(cfg.min_calls, round(cfg.calls_nq1 / math.sqrt(nq)))
                mil, ex = _alternate(
                    [
                        lambda q, v=version: index.search(q, cfg.n, version=v),
                        lambda q: exact_top(q, x, cfg.n),
                    ],
                    _batcher(pool, nq),
                    cap,
                    cfg,
                )
                m, e = _summary(mil, nq), _summary(ex, nq)
                pair = np.asarray(mil) / np.asarray(ex)
                res["nq"][str(nq)] = {
                    "milvus": m,
                    "exact": e,
                    "ratio_p50": round(m["p50_ms"] / e["p50_ms"], 2),
                    "paired_ratio_p50": round(float(np.median(pair)), 2),
                }
                log(
                    f"  nq={nq}: Milvus {m['ms_per_query']:.3f} ms/query (p99 {m['p99_ms']} ms/call, "
                    f"{m['calls']} calls) vs exact {e['ms_per_query']:.3f} ms/query"
                )
            if paths and index_type == "FLAT":
                out["search_paths"] = _bench_paths(index, version, pool, cfg, log)
        except Exception as exc:  # noqa: BLE001 - recorded; the other index type still runs
            res["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{size} items {index_type}: failed: {exc}")
        index.drop_old(grace_s=0)  # never flipped: every version of this run's prefix goes, memory back
    out["loadavg_end"] = loadavg()
    out["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return out


WIN_MARGIN = 0.9  # "faster" = p50 below 0.9x the other's, at that size and every larger one measured


def _p50(r: dict[str, Any], nq: str, who: str = "milvus") -> float:
    return float(r["nq"][nq][who]["p50_ms"])


def _from(rows: list[tuple[int, bool]]) -> int | None:
    """The smallest size from which the condition holds at every larger measured size too."""
    best = None
    for size, ok in reversed(rows):
        if not ok:
            break
        best = size
    return best


def _ann_wins(sizes: dict[str, Any], nqs: Sequence[int], target: float) -> dict[str, Any]:
    """Per nq, the smallest measured catalogue from which IVF_FLAT as served stays faster (p50, by the
    WIN_MARGIN) than FLAT, than exact in-process search, and than FLAT while meeting the recall target."""
    done = sorted(((int(k), v["indexes"]) for k, v in sizes.items() if "indexes" in v), key=lambda t: t[0])
    out: dict[str, Any] = {}
    for nq in map(str, nqs):
        rows = [
            (s, ix["IVF_FLAT"], ix["FLAT"])
            for s, ix in done
            if {"IVF_FLAT", "FLAT"} <= set(ix)
            and nq in ix["IVF_FLAT"].get("nq", {})
            and nq in ix["FLAT"].get("nq", {})
        ]
        faster = [(s, _p50(i, nq) < WIN_MARGIN * _p50(f, nq)) for s, i, f in rows]
        out[nq] = {
            "ivf_faster_than_flat_from": _from(faster),
            "ivf_faster_than_exact_from": _from(
                [(s, _p50(i, nq) < WIN_MARGIN * _p50(i, nq, "exact")) for s, i, _ in rows]
            ),
            f"ivf_faster_than_flat_at_recall_{target}_from": _from(
                [(s, ok and i["meets_target"]) for (s, ok), (_, i, _) in zip(faster, rows, strict=True)]
            ),
        }
    return out


def run(
    out: Path,
    sizes: Sequence[int] = DEFAULT_SIZES,
    log: Callable[[str], None] = print,
    cfg: CatalogueConfig | None = None,
    progress: bool = True,
    merge: bool = False,
) -> dict[str, Any]:
    """Measure every catalogue size on one milvus-lite server in a temporary directory; write the results
    JSON to `out` and the plot beside it (`out` with .png). A size that cannot be built or measured here
    (memory, time) is recorded with the reason, and the others still run.

    merge=True keeps the sizes already in `out` (measured with the same config) and replaces only those
    measured now, so a long run can be split into shorter holds of the shared machine; every size records
    its own load average and time."""
    cfg = cfg or CatalogueConfig()
    out = Path(out)
    t_start = time.perf_counter()
    machine = host()
    res: dict[str, Any] = {"recipe": RECIPE, "config": asdict(cfg), "sizes": {}}
    if merge and out.exists():
        old = json.loads(out.read_text())
        same = json.loads(
            json.dumps({"config": res["config"], "recipe": RECIPE})
        )  # tuples read back as lists
        if {"config": old.get("config"), "recipe": old.get("recipe")} != same:
            raise ValueError(f"{out} was measured with another config or recipe; run without merge")
        res["sizes"] = old["sizes"]
        if old.get("search_paths"):
            res["sizes"][old["search_paths"]["size"]]["search_paths"] = old["search_paths"]
        res["runs"] = old.get("runs", [])
    sizes = sorted({int(s) for s in sizes})
    paths_size = min([*sizes, *(int(k) for k in res["sizes"])])  # the search paths: smallest size only
    with tempfile.TemporaryDirectory(prefix="mind-bench-catalogue-") as tmp, EmbeddedMilvus(tmp) as uri:
        index = ItemIndex(uri, prefix="cat", pointer_ttl_s=60.0, timeout_s=60.0)
        try:
            for size in sizes:
                need = size * cfg.d * 4 * 4  # our matrix, the server's copy, its SQLite rows, slack
                avail = _available_bytes()
                if avail is not None and need > avail:
                    res["sizes"][str(size)] = {
                        "skipped": f"needs about {need >> 20} MB, {avail >> 20} MB free"
                    }
                    log(f"{size} items: skipped ({res['sizes'][str(size)]['skipped']})")
                    continue
                try:
                    res["sizes"][str(size)] = _bench_size(index, size, cfg, size == paths_size, progress, log)
                except Exception as exc:  # noqa: BLE001 - recorded; the other sizes still run
                    res["sizes"][str(size)] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"{size} items: failed: {exc}")
                    index.drop_old(grace_s=0)
        finally:
            index.close()
    res["sizes"] = {str(k): res["sizes"][str(k)] for k in sorted(int(k) for k in res["sizes"])}
    first = next((k for k, v in res["sizes"].items() if "search_paths" in v), None)
    if first is not None:
        res["search_paths"] = {"size": first, **res["sizes"][first].pop("search_paths")}
    res["ann_wins"] = _ann_wins(res["sizes"], cfg.nqs, cfg.recall_target)
    machine["loadavg_end"] = loadavg()
    res["machine"] = machine
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    res["runs"] = [
        *res.get("runs", []),
        {"sizes": sizes, "created": res["created"], "seconds": res["seconds"]},
    ]
    write_json(out, res)
    plot(res, out.with_suffix(".png"))
    return res


# ---- output -----------------------------------------------------------------------------------------


def plot(res: dict[str, Any], path: Path) -> None:
    """ms per query (p50) against catalogue size, one panel per nq: each index type and exact numpy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nqs = res["config"]["nqs"]
    done = sorted((int(k), v) for k, v in res["sizes"].items() if "indexes" in v)
    fig, axes = plt.subplots(1, len(nqs), figsize=(4.6 * len(nqs), 3.8), squeeze=False)
    for ax, nq in zip(axes[0], nqs, strict=True):
        for it, style in (("FLAT", "o-"), ("IVF_FLAT", "s--")):
            pts = [(s, v["indexes"][it]) for s, v in done if "nq" in v["indexes"].get(it, {})]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ax.plot(
                xs, [r["nq"][str(nq)]["milvus"]["ms_per_query"] for _, r in pts], style, label=f"Milvus {it}"
            )
            for s, r in pts:
                ax.annotate(
                    f"R {r['recall@' + str(res['config']['n'])]:.2f}",
                    (s, r["nq"][str(nq)]["milvus"]["ms_per_query"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 4),
                )
        ex = [
            (s, statistics.median(r["nq"][str(nq)]["exact"]["ms_per_query"] for r in rs))
            for s, v in done
            if (rs := [r for r in v["indexes"].values() if "nq" in r])
        ]
        if ex:
            ax.plot(*zip(*ex, strict=True), "k:", marker="^", label="exact numpy (in-process)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"nq = {nq}")
        ax.set_xlabel("catalogue size (items)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per query (p50)")
    axes[0][-1].legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(
        f"Milvus (milvus-lite {m.get('milvus_lite')}) vs exact top-{res['config']['n']}, "
        f"d={res['config']['d']}, synthetic clustered items; R = recall@{res['config']['n']}; "
        f"load {m['loadavg_start']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(res: dict[str, Any]) -> str:
    """The human-readable summary (printed by the command, pasted into indexer/README.md)."""
    n = res["config"]["n"]
    lines = [
        "| items | index | nq | Milvus ms/query | Milvus p99 / p99.9 ms per call | exact ms/query "
        f"| Milvus / exact | recall@{n} |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size, v in sorted((int(k), v) for k, v in res["sizes"].items()):
        if "indexes" not in v:
            lines.append(f"| {size:,} | — | | | {v.get('skipped') or v.get('error')} | | | |")
            continue
        for it, r in v["indexes"].items():
            if "error" in r:
                lines.append(f"| {size:,} | {it} | | | {r['error']} | | | |")
            for nq, t in r.get("nq", {}).items():
                m, e = t["milvus"], t["exact"]
                tail = " / ".join("—" if m[k] is None else f"{m[k]:.2f}" for k in ("p99_ms", "p99_9_ms"))
                lines.append(
                    f"| {size:,} | {it} | {nq} | {m['ms_per_query']:.3f} | {tail} | "
                    f"{e['ms_per_query']:.3f} | {t['ratio_p50']:.2f}x | {r[f'recall@{n}']:.3f} |"
                )
    lines.append("")
    for size, v in sorted((int(k), v) for k, v in res["sizes"].items()):
        ivf, im = v.get("indexes", {}).get("IVF_FLAT"), v.get("ivf_model")
        if ivf and "tuning" in ivf:
            tn = ivf["tuning"]
            lines.append(
                f"IVF_FLAT at {size:,} on this server: nlist {ivf['index_params']['nlist']}, "
                f"nprobe {tn['nprobe']}: {tn['note']}"
            )
        if im:
            lines.append(
                f"IVF model at {size:,}: nlist {im['nlist']} needs nprobe {im['nprobe']} for recall@{n} "
                f"{im[f'recall@{n}']:.3f}, scanning {im['scanned_share']:.1%} of the items"
            )
    target = res["config"]["recall_target"]
    for nq, w in res["ann_wins"].items():
        a, b, c = (
            f"{w[k]:,} items" if w[k] else "no measured size"
            for k in (
                "ivf_faster_than_flat_from",
                "ivf_faster_than_exact_from",
                f"ivf_faster_than_flat_at_recall_{target}_from",
            )
        )
        lines.append(
            f"nq={nq}: IVF_FLAT as served is faster than FLAT from {a}, than exact in-process "
            f"from {b}; faster than FLAT at recall >= {target} from {c}"
        )
    sp = res.get("search_paths")
    if sp:
        lines += [
            "",
            "| nq | flat arrays ms/call | pymilvus objects ms/call | speed-up | ids equal |",
            "|---:|---:|---:|---:|---|",
        ]
        for nq, t in sp["nq"].items():
            lines.append(
                f"| {nq} | {t['flat']['p50_ms']:.2f} | {t['pymilvus']['p50_ms']:.2f} | "
                f"{t['speedup_p50']:.2f}x | {t['ids_equal']} |"
            )
    m = res["machine"]
    lines.append(
        f"\nLoad average at start / end: {m['loadavg_start']} / {m['loadavg_end']}; {res['seconds']:.0f} s"
    )
    return "\n".join(lines)


def parse_sizes(text: str) -> tuple[int, ...]:
    """'12k,100k,1M' -> (12000, 100000, 1000000); plain integers and decimals ('1.5M') too."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", part)
        if not m:
            raise ValueError(f"bad catalogue size {part!r}: use e.g. 12k, 100k, 1M or 12103")
        v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
        if v < 100:
            raise ValueError(f"catalogue size {part!r} is below 100 items")
        out.append(int(round(v)))
    return tuple(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", "-o", type=Path, default=Path("benchmarks/catalogue.json"))
    p.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES, help="e.g. 12k,100k,1M")
    p.add_argument(
        "--budget-s", type=float, default=CatalogueConfig.budget_s, help="timed seconds per setting"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", action="store_true", help="keep the other sizes already in --out")
    a = p.parse_args(argv)
    cfg = CatalogueConfig(budget_s=a.budget_s, seed=a.seed)
    res = run(a.out, a.sizes, cfg=cfg, progress=not a.no_progress, merge=a.merge)
    print(table(res))
    print(f"\nwrote {a.out} and {a.out.with_suffix('.png')} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
