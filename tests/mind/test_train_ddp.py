"""`mind train` under torchrun: a real 2-process DDP run on the CPU (gloo), as on N GPUs.

The runs go through `python -m torch.distributed.run --standalone` (a free rendezvous port) in a
subprocess, exactly as a user launches them; the data is a small planted click log.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from mind.loaders import filter_kcore, load
from mind.split import comirec_split
from mind.synthetic import generate, to_jsonl
from mind.train import load_checkpoint, shard, state_checksum

FLAGS = ["--epochs", "2", "--dim", "16", "--neg", "50", "--batch-size", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "clicks.jsonl"
    to_jsonl(generate(n_users=200, n_items=150, n_categories=8, seed=5), path)
    return path


def torchrun(nproc: int, clicks: Path, out: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m cli train ...` with the usual flags."""
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # the CPU path (gloo) even on a GPU box
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "cli", "train", "--data", str(clicks), "--out", str(out), *FLAGS]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_two_processes_train_one_model_and_rank0_alone_writes(clicks, tmp_path):
    out = tmp_path / "runs" / "mind.pt"
    res = torchrun(2, clicks, out)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    # rank 0 alone prints progress and saves: one line per epoch, one "saved", one file
    epochs = [float(m) for m in re.findall(r"^epoch \d+: loss ([\d.]+)", res.stdout, re.M)]
    assert len(epochs) == 2 and epochs[1] < epochs[0], res.stdout
    assert res.stdout.count("saved ") == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["mind.pt"]
    # the replicas ended identical (train() would fail otherwise) and equal to the checkpoint
    ddp = r"^ddp: 2 processes on cpu, (\d+) steps, parameter checksum per rank: (.+)$"
    (line,) = re.findall(ddp, res.stdout, re.M)
    steps, sums = int(line[0]), line[1].split()
    model, meta = load_checkpoint(out)
    assert sums == [state_checksum(model)] * 2
    assert meta["epoch"] >= 1 and 0.0 < meta["valid"]["recall@50"] <= 1.0
    # each rank steps through its half of the examples, 64 at a time: half the single-process steps
    inter = filter_kcore(load(clicks))
    n = sum(len(inter.sequences[u]) - 1 for u in comirec_split(inter).train_users)
    assert steps == 2 * math.ceil(math.ceil(n / 2) / 64)


def test_one_torchrun_process_is_bit_identical_to_plain_mind_train(clicks, tmp_path):
    """The DDP path (group, shard, seed + rank, gradient averaging) reduces exactly to one process."""
    plain = CliRunner().invoke(app, ["train", "--data", str(clicks), "--out", str(tmp_path / "a.pt"), *FLAGS])
    assert plain.exit_code == 0, plain.output
    res = torchrun(1, clicks, tmp_path / "b.pt")
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    a, _ = load_checkpoint(tmp_path / "a.pt")
    b, _ = load_checkpoint(tmp_path / "b.pt")
    assert state_checksum(a) == state_checksum(b)
    assert re.findall(r"^epoch.*$", plain.output, re.M) == re.findall(r"^epoch.*$", res.stdout, re.M)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (11, 2), (7, 3), (1, 2)])
def test_shards_cover_every_example_with_equal_step_counts(n, world):
    order = np.random.default_rng(0).permutation(n)
    parts = [shard(order, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # DDP hangs if one rank takes an extra step
    assert set(np.concatenate(parts)) == set(range(n))
    assert sum(len(p) for p in parts) - n < world  # at most world - 1 repeats
