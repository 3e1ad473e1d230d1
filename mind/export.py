"""Export the MIND user tower as a new numbered version of a Triton model repository.

Layout written (see model_repo/README.md)::

    repo/<model_name>/config.pbtxt      # one config for the model, rewritten by each export
    repo/<model_name>/<v>/model.pt      # TorchScript user tower
    repo/<model_name>/<v>/model.py      # copy of model_repo/python_model.py (Python backend)
    repo/<model_name>/<v>/meta.json     # model_version, vocab_hash, K, d, max_len, S, P, vocab sizes,
                                        # created, items_beyond_vocab (ids >= n_items embedded: cold start)
    repo/<model_name>/<v>/item_side.npy # optional item -> side-id table the version was trained with

Why fixed padded shapes (ITEM_IDS [L], SIDE_IDS [L,S], PROFILE_IDS [P], TIMES [L]): Triton's dynamic
batcher only merges requests whose non-batch shapes are equal. Right-padding every window to the model's
max length lets requests from many worker processes merge into one forward pass; the tower masks padding.

TIMES (optional, INT64 [L]): the Unix seconds of each behaviour of the window, aligned with ITEM_IDS,
0 = unknown/padding. A tower trained with behaviour time reads the gap of each behaviour to the newest one
of the window (mind.model.time_bucket); any other tower ignores it. A request without TIMES is served as
all zeros (unknown), so clients that predate it keep working. meta.json's "times_input" says whether the
tower takes it at all, "uses_time" whether it changes the output.

Why `version_policy: latest {num_versions: 1}`: with explicit model control, `load_model` on a loaded
model loads the new version beside the serving one and switches only once it is ready; requests in
flight on the old version finish on it. So a new version goes live while requests flow, and only one
version holds memory afterwards. A specific version (rollback) is loaded with a config override
(see stream.tower.TritonTower.load).

The version directory is written under a temporary name and renamed into place, so a server never sees a
half-written version.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

TEMPLATE = Path(__file__).resolve().parent.parent / "model_repo" / "python_model.py"
INPUTS = ("ITEM_IDS", "SIDE_IDS", "PROFILE_IDS", "TIMES")
OUTPUTS = ("INTERESTS", "ACTIVE", "META", "COUPLING")  # META and COUPLING: only when a client asks


class ExportError(RuntimeError):
    """The tower cannot be exported faithfully (not scriptable, output mismatch, shape change)."""


def build_config(
    model_name: str,
    *,
    max_len: int,
    n_side: int,
    n_profile: int,
    K: int,
    d: int,
    max_batch_size: int = 256,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
    max_queue_delay_us: int = 200,
    torch_threads: int = 0,
) -> mc.ModelConfig:
    """Build the config with Triton's own protobuf schema, so field names are checked, not templated.

    torch_threads > 0 becomes the `torch_threads` parameter that python_model.py applies per instance
    (0 = torch's default, one thread per core). Why: every instance is its own stub process, and OpenMP
    threads of several processes on an oversubscribed CPU stall each other (measured on the shared 2-core
    machine: B=64 took 150 ms with 2 threads under load, 1.4 ms with 1).
    """
    cfg = mc.ModelConfig(name=model_name, backend="python", max_batch_size=max_batch_size)
    cfg.version_policy.latest.num_versions = 1
    for name, dims in zip(INPUTS, ([max_len], [max_len, n_side], [n_profile], [max_len]), strict=True):
        cfg.input.add(name=name, data_type=mc.TYPE_INT64, dims=dims, optional=name == "TIMES")
    cfg.output.add(name="INTERESTS", data_type=mc.TYPE_FP32, dims=[K, d])
    cfg.output.add(name="ACTIVE", data_type=mc.TYPE_BOOL, dims=[K])
    cfg.output.add(name="META", data_type=mc.TYPE_STRING, dims=[2])  # model_version, vocab_hash; on request
    cfg.output.add(name="COUPLING", data_type=mc.TYPE_FP32, dims=[max_len, K])  # routing w_ij; on request
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(instance_kind), count=instance_count)
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    if torch_threads > 0:
        cfg.parameters["torch_threads"].string_value = str(int(torch_threads))
    cfg.dynamic_batching.preferred_batch_size.extend(
        sorted({b for b in (16, 64, max_batch_size) if b <= max_batch_size})
    )
    return cfg


def parse_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema; raises text_format.ParseError on unknown fields."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def read_meta(repo: Path, model_name: str, version: int) -> dict:
    """The meta.json of one exported version."""
    return json.loads((Path(repo) / model_name / str(version) / "meta.json").read_text())


def list_versions(repo: Path, model_name: str) -> list[int]:
    """Numbered version directories present in the repository, ascending."""
    d = Path(repo) / model_name
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def probe_inputs(
    max_len: int,
    n_side: int,
    n_profile: int,
    *,
    n_items: int | None,
    side_vocab: Sequence[int] | None,
    profile_vocab: Sequence[int] | None,
    batch: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch covering the edge cases: empty window, one behaviour, full window, unknown ids, random;
    and behaviour times (Unix seconds, growing, 0 under padding; one row with unknown times)."""
    g = np.random.default_rng(seed)
    hi = max(n_items or 2, 2)
    lengths = [0, 1, max_len] + list(g.integers(0, max_len + 1, size=max(batch - 3, 0)))
    items = np.zeros((len(lengths), max_len), dtype=np.int64)
    for r, n in enumerate(lengths):
        items[r, :n] = g.integers(1, hi, size=n)
    items[1, 0] = 1  # unknown item
    sv = np.asarray(side_vocab if side_vocab is not None else [1] * n_side, dtype=np.int64)
    side = (g.random((len(lengths), max_len, n_side)) * sv).astype(np.int64) * (items[..., None] > 0)
    pv = np.asarray(profile_vocab if profile_vocab is not None else [1] * n_profile, dtype=np.int64)
    prof = (g.random((len(lengths), n_profile)) * pv).astype(np.int64)
    gaps = g.integers(0, 10**6, size=(len(lengths), max_len))
    times = (1_600_000_000 + np.cumsum(gaps, axis=1)) * (items > 0)
    times[-1] = 0  # a window whose times are unknown
    return torch.from_numpy(items), torch.from_numpy(side), torch.from_numpy(prof), torch.from_numpy(times)


def takes_times(tower: nn.Module) -> bool:
    """Whether the tower's forward has the optional 4th input `times` (mind.model.MIND does)."""
    try:
        params = list(inspect.signature(tower.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 4 and params[3] == "times"


def to_torchscript(tower: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """Script the tower (keeps data-dependent K'); fall back to tracing, which export then verifies."""
    tower = tower.eval()
    with warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated, but it is what Triton's Python backend (and the
        # PyTorch backend of the production container) load without a compiler toolchain.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.script(tower)
        except Exception:  # noqa: BLE001 - any scripting failure falls back to trace + verification
            with torch.no_grad():
                return torch.jit.trace(tower, example, check_trace=False)


def maps_beyond_vocab(tower: nn.Module, example: tuple[torch.Tensor, ...], n_items: int | None) -> bool:
    """Whether the tower embeds an item index >= n_items as the unknown item (1) with its own side ids, as
    mind.model.MIND does for cold-start items; meta.json then lets the server accept such ids."""
    if not n_items:
        return False
    items, rest = example[0], example[1:]
    real = items >= 2
    try:
        with torch.inference_mode():
            beyond, _ = tower(torch.where(real, items + n_items, items), *rest)
            unknown, _ = tower(torch.where(real, torch.ones_like(items), items), *rest)
    except Exception:  # noqa: BLE001 - e.g. an embedding that indexes out of range: it does not
        return False
    return bool(torch.equal(beyond, unknown))


def _per_slot(name: str, vocab: int | Sequence[int] | None, n: int) -> list[int] | None:
    """One vocabulary size per slot (an int is shared by all slots, as in mind.model.MIND)."""
    if vocab is None:
        return None
    sizes = [int(vocab)] * n if isinstance(vocab, (int, np.integer)) else [int(v) for v in vocab]
    if len(sizes) != n:
        raise ExportError(f"{name} must have {n} entries, got {len(sizes)}")
    return sizes


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_user_tower(
    tower: nn.Module,
    repo: Path,
    *,
    model_name: str = "mind_user_tower",
    max_len: int,
    n_side: int,
    n_profile: int,
    K: int,
    d: int,
    model_version: str | None,
    vocab_hash: str,
    item_side: np.ndarray | None = None,
    n_items: int | None = None,
    side_vocab: int | Sequence[int] | None = None,
    profile_vocab: int | Sequence[int] | None = None,
    max_batch_size: int = 256,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
    max_queue_delay_us: int = 200,
    torch_threads: int = 0,
    extra_meta: dict | None = None,
) -> int:
    """Write the next numbered version of `model_name` into `repo` and return its number.

    model_version=None records the new Triton version number itself (as a string), chosen here under the
    same rename that claims the number, so tower, Triton and index versions can be one number.
    extra_meta: more JSON fields for meta.json (e.g. a weights digest); they cannot override the core ones.

    n_items / side_vocab / profile_vocab are the vocabulary sizes the server checks ids against (side and
    profile sizes: one shared int, or one per slot, length S / P); n_items defaults to len(item_side).
    Unknown sizes are not range-checked by the server (the tower then fails on them instead).
    The TorchScript module is checked against the eager tower on an edge-case batch before anything is
    written (max abs diff <= 1e-5, identical active masks).
    """
    repo = Path(repo)
    if item_side is not None:
        item_side = np.asarray(item_side, dtype=np.int64)
        if item_side.ndim != 2 or item_side.shape[1] != n_side:
            raise ExportError(f"item_side must be [n_items, S={n_side}], got {item_side.shape}")
        n_items = n_items if n_items is not None else int(item_side.shape[0])
    side_vocab = _per_slot("side_vocab", side_vocab, n_side)
    profile_vocab = _per_slot("profile_vocab", profile_vocab, n_profile)

    probe = probe_inputs(
        max_len, n_side, n_profile, n_items=n_items, side_vocab=side_vocab, profile_vocab=profile_vocab
    )
    with_times = takes_times(tower)
    example = probe if with_times else probe[:3]
    was_training = tower.training
    try:
        scripted = to_torchscript(tower, example)  # eval mode: routing uses the stored init, not a draw
        with torch.inference_mode():
            ref_i, ref_a = tower.eval()(*example)
            got_i, got_a = scripted(*example)
            uses_time = with_times and not torch.equal(ref_i, tower(*probe[:3])[0])
    finally:
        tower.train(was_training)
    if tuple(ref_i.shape[1:]) != (K, d) or tuple(ref_a.shape[1:]) != (K,):
        raise ExportError(
            f"tower outputs {tuple(ref_i.shape)}, {tuple(ref_a.shape)}; expected [B,{K},{d}], [B,{K}]"
        )
    diff = float((ref_i.float() - got_i.float()).abs().max())
    if diff > 1e-5 or not torch.equal(ref_a.bool(), got_a.bool()):
        raise ExportError(f"TorchScript tower differs from eager (max abs diff {diff:.3g} or active mask)")
    beyond_vocab = maps_beyond_vocab(scripted, example, n_items)  # cold start: ids >= n_items accepted

    model_dir = repo / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(
        model_name,
        max_len=max_len,
        n_side=n_side,
        n_profile=n_profile,
        K=K,
        d=d,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instance_count=instance_count,
        max_queue_delay_us=max_queue_delay_us,
        torch_threads=torch_threads,
    )
    cfg_path = model_dir / "config.pbtxt"
    if cfg_path.exists():
        old = parse_config(cfg_path)
        # a config written before the optional TIMES input or COUPLING output existed is compatible: it is
        # rewritten with them
        before_times = [t for t in cfg.input if t.name != "TIMES"]
        before_coupling = [t for t in cfg.output if t.name != "COUPLING"]
        if list(old.input) not in (list(cfg.input), before_times) or list(old.output) not in (
            list(cfg.output),
            before_coupling,
        ):
            raise ExportError(
                f"{cfg_path} has other tensor shapes; one Triton config serves all versions, "
                "so export a tower with new K/d/L/S/P under a new model_name"
            )

    version = (list_versions(repo, model_name) or [0])[-1] + 1
    staging = model_dir / f".staging-{version}-{os.getpid()}-{time.monotonic_ns()}"
    staging.mkdir()
    try:
        scripted.save(str(staging / "model.pt"))
        shutil.copyfile(TEMPLATE, staging / "model.py")
        if item_side is not None:
            np.save(staging / "item_side.npy", item_side)
        meta = {
            **(extra_meta or {}),
            "model_version": model_version if model_version is not None else str(version),
            "vocab_hash": vocab_hash,
            "triton_version": version,
            "K": K,
            "d": d,
            "max_len": max_len,
            "S": n_side,
            "P": n_profile,
            "n_items": n_items,
            "side_vocab": side_vocab,
            "profile_vocab": profile_vocab,
            "has_item_side": item_side is not None,
            "items_beyond_vocab": beyond_vocab,
            "times_input": with_times,
            "uses_time": bool(uses_time),
            "torch": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(staging, model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    text = text_format.MessageToString(cfg)
    text_format.Parse(text, mc.ModelConfig())  # round-trip through the schema before writing
    _atomic_write(cfg_path, text)
    return version
