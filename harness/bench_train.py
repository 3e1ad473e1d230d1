"""Training throughput and evaluation time, per model and torch thread count.

Each configuration trains for a fixed number of steps on the real training examples (after a
short warm-up) and reports the median step time; evaluation ranks every test user once.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mind.dataset import Interactions
from mind.experiment import LEARNED, machine, write_json
from mind.model import MIND
from mind.split import comirec_split
from mind.train import feature_tables, model_config_for, negative_distribution, recommend, training_examples


def _step_times(
    model: MIND, inter: Interactions, users: np.ndarray, batch: int, neg: int, steps: int
) -> list[float]:
    side_t, prof_t = feature_tables(inter)
    H, T, U = training_examples(inter.sequences, users, model.cfg.max_len)
    q = negative_distribution(inter.sequences, users, inter.n_items, "popularity")
    log_q = torch.log(q.clamp(min=1e-12) * neg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    model.train()
    times = []
    for s in range(steps + 3):
        idx = torch.as_tensor(rng.integers(0, len(T), batch))
        ids, label, rows = torch.as_tensor(H)[idx], torch.as_tensor(T)[idx], torch.as_tensor(U)[idx]
        t0 = time.perf_counter()
        negs = torch.multinomial(q, neg, replacement=True)
        loss = model.loss(ids, side_t[ids], prof_t[rows], label, side_t[label], negs, side_t[negs], log_q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s >= 3:
            times.append(time.perf_counter() - t0)
    return times


def run(inter: Interactions, out: Path, steps: int = 60, batch: int = 256, neg: int = 1000) -> dict:
    split = comirec_split(inter)
    users = np.asarray(split.train_users)
    results: dict = {
        "dataset": inter.name,
        "batch": batch,
        "neg": neg,
        "steps": steps,
        "machine": machine(),
        "train": {},
        "eval": {},
    }
    default_threads = torch.get_num_threads()
    for name, overrides in LEARNED.items():
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = MIND(model_config_for(inter, **overrides))
            t = _step_times(model, inter, users, batch, neg, steps)
            med = statistics.median(t)
            results["train"][f"{name}/threads={threads}"] = {
                "median_step_ms": round(1000 * med, 2),
                "p99_step_ms": round(1000 * float(np.percentile(t, 99)), 2),
                "samples_per_s": round(batch / med, 1),
            }
            print(
                f"train {name:<12} threads={threads}: {batch / med:>9.0f} samples/s  "
                f"(median step {1000 * med:.1f} ms)",
                flush=True,
            )
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        recommend(model, inter, split.test, 100)
        dt = time.perf_counter() - t0
        results["eval"][name] = {
            "users": len(split.test),
            "seconds": round(dt, 3),
            "ms_per_user": round(1000 * dt / max(len(split.test), 1), 3),
        }
        print(f"eval  {name:<12} {len(split.test)} users in {dt:.2f} s", flush=True)
    torch.set_num_threads(default_threads)
    write_json(out, results)
    return results
