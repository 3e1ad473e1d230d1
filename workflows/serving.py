"""From a trained checkpoint to the two serving artifacts: the user tower on Triton, item vectors in Milvus.

One number names a model version everywhere: `export_checkpoint` records the new Triton version number as
the tower's `model_version`, and `index_checkpoint` writes the item index under that same number (`v3` in
Milvus is Triton's `3`), so the recall step's version guard compares like with like.

Why the checks: interest vectors of one model searched against another model's item vectors return
plausible-looking garbage. So indexing refuses a checkpoint whose item vocabulary (hash) differs from the
exported version's, and also one whose weights differ (a weights digest recorded at export): a retrain on
the same data has the same vocabulary but other vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from indexer.build import IndexStats, index_items
from indexer.catalogue import item_vectors
from indexer.store import ItemIndex
from mind.dataset import Vocab
from mind.export import export_user_tower, list_versions, read_meta
from mind.model import MIND
from mind.train import load_checkpoint
from stream.catalogue import CatalogueStore
from stream.window import load_catalog
from workflows.catalogue import cold_rows, publish_version

MODEL_NAME = "mind_user_tower"
DEFAULT_REPO = Path("model_repo")


class ServingError(RuntimeError):
    """The checkpoint, the exported tower and the index do not belong together; the message says why."""


def model_digest(model: MIND) -> str:
    """Stable hash of the weights and buffers (names, dtypes, shapes, bytes): identifies one trained model.
    Tables the model never reads (behaviour time or recency when off) are left out, so a checkpoint saved
    before they existed keeps its digest."""
    unused = tuple(f"{name}." for name in model.unread_tables())
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(unused):
            continue
        arr = t.detach().cpu().contiguous()
        h.update(f"{name}|{arr.dtype}|{tuple(arr.shape)}\0".encode())
        h.update(arr.numpy().tobytes())
    return h.hexdigest()[:16]


def _as_numpy(x: object) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def export_checkpoint(
    ckpt: str | Path,
    repo: str | Path = DEFAULT_REPO,
    model_name: str = MODEL_NAME,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
    max_batch_size: int = 256,
    torch_threads: int = 1,
) -> int:
    """Export the checkpoint's user tower as the next numbered Triton version; return that number.

    torch_threads: intra-op threads per model instance (0 = one per core). 1 by default: scale with
    `instance_count` and dynamic batching instead, since OpenMP threads of several processes stall each
    other on a busy CPU (mind.export.build_config).

    meta.json records the vocabulary hash, every size the server range-checks ids against, the weights
    digest and the checkpoint path; item_side.npy holds the side-id table. model_version is the version
    number itself.
    """
    model, meta = load_checkpoint(Path(ckpt))
    cfg = model.cfg
    item_side = _as_numpy(meta["item_side"]).astype(np.int64)
    profile = _as_numpy(meta["user_profile"])
    return export_user_tower(
        model,
        Path(repo),
        model_name=model_name,
        max_len=cfg.max_len,
        n_side=int(item_side.shape[1]),
        n_profile=int(profile.shape[1]),
        K=cfg.K,
        d=cfg.d,
        model_version=None,  # = the new Triton version number
        vocab_hash=str(meta["vocab_hash"]),
        item_side=item_side,
        n_items=cfg.n_items,
        side_vocab=cfg.n_side,  # one side-id embedding table shared by all S slots
        profile_vocab=cfg.n_profile,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instance_count=instance_count,
        torch_threads=torch_threads,
        extra_meta={
            "model_digest": model_digest(model),
            "checkpoint": str(Path(ckpt).resolve()),
            "dataset": meta.get("dataset"),
            "model_config": cfg.to_dict(),
        },
    )


def _parse_version(version: str | int) -> int:
    s = str(version).strip()
    s = s[1:] if s[:1] in ("v", "V") else s
    if not s.isdigit():
        raise ServingError(f"version {version!r} is not a Triton version number (e.g. 3 or v3)")
    return int(s)


def resolve_version(
    repo: str | Path, model_name: str, vocab_hash: str, digest: str, version: str | int | None = None
) -> int:
    """The exported version a checkpoint's item vectors belong to.

    version=None: the newest export with the checkpoint's vocabulary hash and weights digest. A given
    version must exist and match both. Exports without a recorded digest are matched on vocabulary only.
    """
    versions = list_versions(Path(repo), model_name)
    if not versions:
        raise ServingError(
            f"no exported versions of {model_name!r} in {repo}; run `mind export --checkpoint ...` first"
        )
    metas = {v: read_meta(Path(repo), model_name, v) for v in versions}

    def mismatch(v: int) -> str | None:
        m = metas[v]
        if m.get("vocab_hash") != vocab_hash:
            return (
                f"version {v} was exported with item-vocabulary hash {m.get('vocab_hash')!r}, "
                f"the checkpoint has {vocab_hash!r} (another data set or item mapping)"
            )
        if m.get("model_digest") not in (None, digest):
            return (
                f"version {v} was exported from other weights (digest {m['model_digest']}, checkpoint "
                f"{digest}; same vocabulary, another training run)"
            )
        return None

    if version is not None:
        v = _parse_version(version)
        if v not in metas:
            raise ServingError(f"version {v} of {model_name!r} is not in {repo} (exported: {versions})")
        why = mismatch(v)
        if why:
            raise ServingError(f"refusing to index this checkpoint as version {v}: {why}")
        return v
    for v in reversed(versions):
        if mismatch(v) is None:
            return v
    seen = ", ".join(f"{v}: {metas[v].get('vocab_hash')}" for v in versions)
    raise ServingError(
        f"no exported version of {model_name!r} in {repo} comes from this checkpoint (vocabulary hash "
        f"{vocab_hash}, weights {digest}; exported versions' hashes: {seen}). Export it first "
        "(`mind export --checkpoint ...`), then index it"
    )


def read_item_ids(path: str | Path, vocab: Vocab) -> np.ndarray:
    """Item indices for the raw item ids listed in a file (one per line; blank lines and # comments skip).

    Unknown ids are refused: this file names items of the checkpoint's vocabulary (incremental mode
    re-embeds them, or re-upserts rows). A new item comes in through the catalogue (`mind catalogue`, a
    catalog.v1 record with its side ids), which embeds it from its side ids until a retrain knows it.
    """
    raw = [ln.split("#", 1)[0].strip() for ln in Path(path).read_text().splitlines()]
    raw = [r for r in raw if r]
    ids = np.array([vocab.get(r, -1) for r in raw], dtype=np.int64)
    unknown = [r for r, i in zip(raw, ids, strict=True) if i < 0]
    if unknown:
        raise ServingError(
            f"{len(unknown)} item id(s) in {path} are not in the checkpoint's vocabulary "
            f"(first: {unknown[:5]}); add new items through the catalogue (`mind catalogue --file`, "
            "records with their side ids), or retrain, export and index fully"
        )
    return ids


def index_checkpoint(
    ckpt: str | Path,
    uri: str,
    version: str | int | None = None,
    chunk: int = 2048,
    incremental: bool = False,
    changed_ids: Iterable[int] | None = None,
    drop_grace_s: float | None = 600.0,
    *,
    repo: str | Path = DEFAULT_REPO,
    model_name: str = MODEL_NAME,
    prefix: str = "items",
    token: str | None = None,
    progress: bool = True,
    index_type: str | None = None,
    catalogue: CatalogueStore | None = None,
) -> IndexStats:
    """Embed the whole catalogue with the checkpoint's model and index it as its exported version.

    catalogue (full mode): also publish the version to the catalogue (its vocabulary and cold-start tables,
    stream/catalogue.py) and index the catalogue's items the model was not trained on, from their side ids,
    before the flip; the catalogue feed can then add new items to this version. Incremental mode ignores it.

    Full mode writes a new collection, builds it, flips the active pointer, then drops versions retired
    more than drop_grace_s ago (None keeps them). Incremental mode upserts `changed_ids` into the active
    version, which must be this one. `chunk` bounds both the embedding chunk and the insert call size
    (milvus-lite 2.5 stalls on large inserts: indexer/README.md). index_type: None picks it by catalogue
    size (indexer.build.choose_index); a type given wins.
    """
    model, meta = load_checkpoint(Path(ckpt))
    v = resolve_version(repo, model_name, str(meta["vocab_hash"]), model_digest(model), version)
    if catalogue is not None and not incremental:
        return _index_with_catalogue(
            model, ckpt, v, uri, catalogue, chunk, drop_grace_s, token, prefix, progress, index_type
        )
    vectors = item_vectors(model, _as_numpy(meta["item_side"]), chunk=chunk, progress=progress)
    return index_items(
        vectors,
        v,
        uri=uri,
        chunk=chunk,
        incremental=incremental,
        changed_ids=changed_ids,
        token=token,
        prefix=prefix,
        drop_grace_s=drop_grace_s,
        progress=progress,
        index_type=index_type,
    )


def _index_with_catalogue(
    model: MIND,
    ckpt: str | Path,
    version: int,
    uri: str,
    catalogue: CatalogueStore,
    chunk: int,
    drop_grace_s: float | None,
    token: str | None,
    prefix: str,
    progress: bool,
    index_type: str | None,
) -> IndexStats:
    """Full index of the trained items plus the catalogue's cold items (published first), then the flip."""
    live = publish_version(catalogue, load_catalog(Path(ckpt)), model, version)
    view = live.view()
    cold = cold_rows(view)
    vectors = item_vectors(model, view.side_table(), chunk=chunk, progress=progress)
    index = ItemIndex(uri, token=token, prefix=prefix)
    try:
        stats = index_items(
            vectors[: model.cfg.n_items],
            version,
            index=index,
            chunk=chunk,
            flip=False,
            progress=progress,
            index_type=index_type,
        )
        if cold:
            index.upsert(stats.version, np.asarray(cold), vectors[cold], batch=chunk, progress=progress)
        stats.previous = index.active_version(max_age_s=0)
        index.flip(stats.version)
        stats.active = stats.version
        stats.rows += len(cold)
        if drop_grace_s is not None:
            stats.dropped = index.drop_old(grace_s=drop_grace_s)
        return stats
    finally:
        index.close()
