"""Roll out a new model version while the workers keep running: export -> index -> Triton load -> flip.

`roll(settings, checkpoint)` (and `mind roll`) takes a newly trained checkpoint to serving:

  1 check    the checkpoint exists; its item vocabulary is the served tower's, or (with the catalogue)
             any other; Triton, Milvus and the key-value store answer; the repository holds the version
             Triton serves
  2 export   the user tower as the next numbered version N of the Triton model repository (mind.export)
  3 embed    the whole catalogue's item vectors with the new model (indexer.catalogue): its trained items,
             and the catalogue items it was not trained on (cold start: from their side ids alone). The
             new vocabulary and N's cold-start tables are published in the catalogue (stream/catalogue.py)
  4 index    a NEW collection `{prefix}_vN`, written and built (flushed, indexed, loaded), then the cold
             items upserted; NOT flipped
  5 load     Triton loads N by explicit model control (RepositoryModelLoad; the repository's policy
             `latest {num_versions: 1}` makes N serve as soon as it is ready and unloads the old version)
  6 flip     the index's active pointer -> vN, one atomic write; then the catalogue records applied since
             step 3 (the feed wrote them to v(N-1)) are embedded with N and upserted into vN
  7 cleanup  index versions retired longer ago than drop_grace_s are dropped (the previous one stays)

A new item vocabulary (a model retrained with new items) is safe because the behaviour windows hold global
item ids, which no model changes (stream/catalogue.py): the workers find the served version's vocabulary
published in the catalogue and map the same windows through it, one vocabulary per batch
(stream.worker.Worker._served_view). Without the catalogue (catalog_enabled = false) a new vocabulary is
refused, as the windows would then hold another vocabulary's indices.

Why load before flip. The worker asks Triton without pinning a version, then its recall step compares
the answering tower's model_version with the index's active version and refuses a mismatch
(`VersionMismatch`, counted in mind_recall_version_mismatch_total); the batch is retried after 0.1 s,
0.2 s, ... with nothing committed. So no recall message can mix versions in either order; the order only
decides how long the workers wait. Load-then-flip leaves a mismatch window of one pointer write
(milliseconds: tower N, index v(N-1)); flip-then-load would leave one of a whole Triton model load
(seconds: tower N-1, index vN). The recall search is pinned to the version the guard accepted, so a flip
between the guard and the search cannot mix versions either. The workers converge by themselves: the
next batch after the switch gets version N from Triton, checks its vocabulary once, and goes on.

Version names. Triton numbers versions with bare integers ("2"); an export from a checkpoint records that
number as the tower's model_version ("2"); the item index names the same version "v2" (collection
items_v2), because `indexer.store.normalize_version` maps 2, "2" and "v2" to "v2". A recall message
therefore carries model_version "2" and index_version "v2": they agree when `versions_agree` says so.

On failure nothing new serves: before the load, the exported version directory is retired (renamed to
`.failed-N-<time>`, which Triton ignores) and the new collection stays inactive; at or after the load,
the pointer is put back if it moved, and Triton is pinned back to the old version (a `specific` version
policy override, stream.tower.TritonTower.load), then the directory is retired. `RollError` says which
step failed and what was undone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.build import index_items
from indexer.catalogue import item_vectors
from indexer.store import ItemIndex, normalize_version
from mind.export import list_versions, parse_config, read_meta
from mind.train import load_checkpoint
from stream.catalogue import CatalogueStore
from stream.settings import Settings, redis_client
from stream.tower import TowerError, TritonTower
from stream.window import load_catalog
from stream.worker import addresses
from workflows.catalogue import cold_rows, publish_version, upsert_cold
from workflows.serving import export_checkpoint

log = logging.getLogger(__name__)

STEPS = ("check", "export", "embed", "index", "load", "flip", "cleanup")


class RollError(RuntimeError):
    """A step of the roll failed. The previous version still serves unless `undo_failed` lists why not."""

    def __init__(
        self, step: str, reason: str, undone: list[str] | None = None, undo_failed: str = ""
    ) -> None:
        self.step, self.reason, self.undone, self.undo_failed = step, reason, list(undone or []), undo_failed
        text = f"roll failed at step {step!r}: {reason}"
        if undone:
            text += f"; undone: {'; '.join(undone)}"
        if undo_failed:
            text += f"; UNDO FAILED, fix by hand: {undo_failed}"
        else:
            text += "; the previous version (if any) still serves"
        super().__init__(text)


@dataclass
class RollResult:
    """What one roll did; times are seconds per step (STEPS) plus `total`."""

    model_name: str
    old_version: str | None  # Triton version served before ("1"); None: the model was not loaded
    new_version: str  # Triton version served now ("2")
    model_version: str  # the new tower's model_version (meta.json; = new_version for checkpoint exports)
    index_version: str  # the item-index version searched now ("v2": collection {prefix}_v2)
    previous_index: str | None  # the index version active before
    rows: int  # items indexed
    dropped: list[str] = field(default_factory=list)  # old index versions dropped in cleanup
    cold_items: int = 0  # catalogue items the new model was not trained on, indexed from their side ids
    vocabulary_changed: bool = False  # the new model has another item vocabulary than the served one
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def versions_agree(model_version: str | int, index_version: str | int) -> bool:
    """True when a tower version and an item-index version name the same model ("2" and "v2" do)."""
    try:
        return normalize_version(model_version) == normalize_version(index_version)
    except ValueError:
        return False


def default_repo() -> Path:
    """The model repository the CLI commands share: $MIND_MODEL_REPO, else ./model_repo."""
    return Path(os.environ.get("MIND_MODEL_REPO") or "model_repo")


@contextlib.contextmanager
def _roll_lock(repo: Path, model_name: str) -> Iterator[None]:
    """One roll per model and repository at a time: two would race for the version number."""
    repo.mkdir(parents=True, exist_ok=True)
    with open(repo / f".roll-{model_name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RollError("check", f"another roll of {model_name!r} is running on {repo}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _served_config(repo: Path, model_name: str) -> dict[str, Any]:
    """Instance kind/count, batch size and threads of the repository's config, kept by the new export
    (a roll must not turn a GPU deployment into a CPU one)."""
    from tritonclient.grpc import model_config_pb2 as mc

    path = repo / model_name / "config.pbtxt"
    if not path.is_file():
        return {}
    cfg = parse_config(path)
    out: dict[str, Any] = {"max_batch_size": int(cfg.max_batch_size) or 256}
    if cfg.instance_group:
        out["instance_kind"] = mc.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind)
        out["instance_count"] = int(cfg.instance_group[0].count) or 1
    if "torch_threads" in cfg.parameters:
        out["torch_threads"] = int(cfg.parameters["torch_threads"].string_value or 0)
    else:
        out["torch_threads"] = 0
    return out


def _retire(repo: Path, model_name: str, version: int) -> str:
    """Move a version directory out of Triton's sight (non-numeric names are ignored), kept for a look."""
    src = repo / model_name / str(version)
    dst = src.with_name(f".failed-{version}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}")
    os.rename(src, dst)
    return f"version directory {src} retired to {dst.name}"


def roll(
    settings: Settings,
    checkpoint: str | os.PathLike[str],
    *,
    repo: str | os.PathLike[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    drop_grace_s: float | None = 600.0,
    keep: int = 1,
    chunk: int = 2048,
    index_type: str | None = None,
    load_timeout_s: float = 300.0,
) -> RollResult:
    """Serve `checkpoint` as the next model version; see the module docstring for the steps and order.

    settings: Triton/Milvus addresses, model name (triton_model) and index prefix (milvus_prefix); unset
    addresses mean the embedded servers. repo: the model repository Triton serves (default
    $MIND_MODEL_REPO or ./model_repo). drop_grace_s: drop index versions retired longer ago than this
    (None: drop nothing); keep: retired versions spared anyway, for rollback. progress: tqdm bars for the
    embedding and the writes; echo: one line per step (default: logging at INFO). index_type: None picks
    it by catalogue size (indexer.build.choose_index).
    Raises RollError (the previous version still serves) or KeyboardInterrupt (after undoing).
    """

    say = echo or log.info
    repo_p = Path(repo) if repo is not None else default_repo()
    name = settings.triton_model
    addr = addresses(settings)
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def done(step: str, t0: float, what: str) -> None:
        timings[step] = round(time.perf_counter() - t0, 3)
        say(f"roll {STEPS.index(step) + 1}/{len(STEPS)} {step}: {what} ({timings[step]:.2f} s)")

    with _roll_lock(repo_p, name), contextlib.ExitStack() as closing:
        # ---- 1 check: nothing changes until every precondition holds --------------------------------
        t0 = time.perf_counter()
        if not Path(checkpoint).is_file():
            raise RollError("check", f"checkpoint {checkpoint} does not exist")
        try:
            model, meta = load_checkpoint(Path(checkpoint))
        except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a bad file
            raise RollError("check", f"cannot read checkpoint {checkpoint}: {exc}") from None
        vocab_hash = str(meta["vocab_hash"])
        tower = TritonTower(addr["triton"], name, settings.triton_timeout_s)
        closing.callback(tower.close)
        try:
            tower.client.is_server_live(client_timeout=settings.triton_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable"
            raise RollError("check", f"Triton at {addr['triton']} does not answer ({exc})") from None
        old: str | None = None
        old_meta = None
        try:
            old = tower.versions()[-1] if tower.ready() else None
            old_meta = tower.meta(old) if old is not None else None
        except TowerError as exc:
            raise RollError("check", str(exc)) from None
        exported = list_versions(repo_p, name)
        if old is not None and int(old) not in exported:
            raise RollError(
                "check",
                f"Triton serves version {old} of {name!r}, which is not in {repo_p / name} (versions "
                f"{exported}): pass the model repository Triton serves (--repo / MIND_MODEL_REPO)",
            )
        store: CatalogueStore | None = None
        if settings.catalog_enabled:
            try:
                client = redis_client(
                    settings, addr["redis"], socket_timeout=10.0, socket_connect_timeout=5.0
                )
                closing.callback(client.close)
                client.ping()
                store = CatalogueStore(client, settings.milvus_prefix)
            except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable"
                raise RollError(
                    "check", f"the key-value store at {addr['redis']} (catalogue): {exc}"
                ) from None
        new_vocab = old_meta is not None and old_meta.vocab_hash != vocab_hash
        if new_vocab and store is None:
            raise RollError(
                "check",
                f"the checkpoint's item vocabulary ({vocab_hash}) is not the served tower's "
                f"({old_meta.vocab_hash if old_meta else None}) and the catalogue is off (catalog_enabled): "
                "the workers could not follow it. Deploy it as a new model (other --model-name / prefix) "
                "with new workers, or roll with the catalogue on",
            )
        if old_meta is not None and not new_vocab:
            served_side = repo_p / name / old / "item_side.npy"
            new_side = _numpy(meta["item_side"]).astype(np.int64)
            if served_side.is_file() and not np.array_equal(np.load(served_side), new_side):
                raise RollError(
                    "check",
                    "the checkpoint's item -> side-id table differs from the served version's; the "
                    "workers send side ids from their checkpoint, so restart them with the new one",
                )
        try:
            index = ItemIndex(addr["milvus"], token=token, prefix=settings.milvus_prefix)
            closing.callback(index.close)
            previous_index = index.active_version(max_age_s=0)
        except Exception as exc:  # noqa: BLE001 - IndexUnavailable, MilvusException, grpc errors
            raise RollError("check", f"Milvus at {addr['milvus']}: {exc}") from None
        next_version = (exported or [0])[-1] + 1
        if previous_index == normalize_version(next_version):
            raise RollError(
                "check",
                f"the active index version is already {previous_index!r}, the number the next export "
                f"would take: {repo_p / name} is not the repository this index was built from",
            )
        if (
            old_meta is not None
            and previous_index is not None
            and not versions_agree(old_meta.model_version, previous_index)
        ):
            say(
                f"warning: Triton serves model version {old_meta.model_version} but the index serves "
                f"{previous_index}: the workers are refusing every batch; this roll fixes that"
            )
        done("check", t0, f"Triton serves {name} {old or '(nothing)'}, index active {previous_index}")

        step, loaded, undone = "export", False, []
        new: int | None = None
        index_version = ""
        try:
            # ---- 2 export ---------------------------------------------------------------------------
            t0 = time.perf_counter()
            new = export_checkpoint(checkpoint, repo_p, name, **_served_config(repo_p, name))
            model_version = str(read_meta(repo_p, name, new)["model_version"])
            index_version = normalize_version(model_version)
            if index_version == previous_index:  # someone exported by hand since the check
                raise RollError("export", f"the export took version {new}, which the index already serves")
            done("export", t0, f"{repo_p / name / str(new)} (model version {model_version})")

            # ---- 3 embed, 4 index (written and built, not flipped) ----------------------------------
            step, t0 = "embed", time.perf_counter()
            side_table, cold, live, log_pos = meta["item_side"], [], None, 0
            if store is not None:  # trained items, then the catalogue's items this model does not know
                log_pos = store.log_length()  # records applied from here on are caught up after the flip
                live = publish_version(store, load_catalog(Path(checkpoint)), model, index_version)
                side_table, cold = live.view().side_table(), cold_rows(live.view())
            vectors = item_vectors(model, side_table, chunk=chunk, progress=progress)
            n_items = model.cfg.n_items
            done("embed", t0, f"{n_items} items + {len(cold)} catalogue items x {vectors.shape[1]}")
            step, t0 = "index", time.perf_counter()
            stats = index_items(
                vectors[:n_items],
                index_version,
                index=index,
                chunk=chunk,
                index_type=index_type,
                flip=False,
                progress=progress,
            )
            if cold:
                index.upsert(index_version, np.asarray(cold), vectors[cold], batch=chunk, progress=progress)
            done(
                "index",
                t0,
                f"{index.collection(index_version)}: {stats.rows} + {len(cold)} rows, built, not active yet",
            )

            # ---- 5 load: Triton switches to N when it is ready, then unloads the old version --------
            step, t0, loaded = "load", time.perf_counter(), True
            served = tower.load(timeout_s=load_timeout_s)
            if served != str(new):
                raise RollError("load", f"Triton serves version {served} after loading, not {new}")
            got = tower.meta(served)
            if not versions_agree(got.model_version, index_version) or got.vocab_hash != vocab_hash:
                raise RollError(
                    "load",
                    f"Triton version {served} reports model version {got.model_version} / vocabulary "
                    f"{got.vocab_hash}, not {model_version} / {vocab_hash}",
                )
            done("load", t0, f"Triton serves {name} {served} (was {old or 'nothing'})")

            # ---- 6 flip ----------------------------------------------------------------------------
            step, t0 = "flip", time.perf_counter()
            index.flip(index_version)
            active = index.active_version(max_age_s=0)
            if active != index_version:
                raise RollError("flip", f"the active index version reads {active!r} after the flip")
            caught = 0
            if store is not None and live is not None:  # records the feed wrote to the old version meanwhile
                live.sync(force=True)
                since = store.read_since(len(live.space.extras), log_pos)[1]
                tables = store.load_tables(index_version)
                if since and tables is not None:
                    caught = upsert_cold(
                        index, index_version, live.view(), tables, cold_rows(live.view(), since)
                    )
            done(
                "flip", t0, f"active index version {previous_index} -> {index_version} (+{caught} caught up)"
            )
        except BaseException as exc:
            undo_failed = ""
            if new is not None:
                undo_failed = _undo(
                    tower, index, repo_p, name, new, old, previous_index, index_version, loaded, undone
                )
            if isinstance(exc, KeyboardInterrupt):
                say(f"interrupted at step {step}; undone: {'; '.join(undone) or 'nothing to undo'}")
                raise
            reason = exc.reason if isinstance(exc, RollError) else f"{type(exc).__name__}: {exc}"
            raise RollError(step, reason, undone, undo_failed) from exc

        # ---- 7 cleanup (best effort: the new version already serves) ------------------------------
        t0 = time.perf_counter()
        dropped: list[str] = []
        if drop_grace_s is not None:
            try:
                dropped = index.drop_old(grace_s=drop_grace_s, keep=keep)
            except Exception as exc:  # noqa: BLE001 - leftovers are dropped by the next roll
                say(f"warning: dropping old index versions failed: {exc}")
        try:
            still = [v for v in tower.versions() if v != str(new)]
        except TowerError:
            still = []
        if still:
            say(f"warning: Triton still serves versions {still} beside {new} (a version policy override?)")
        done("cleanup", t0, f"dropped index versions {dropped or 'none'}")
    timings["total"] = round(time.perf_counter() - t_start, 3)
    return RollResult(
        model_name=name,
        old_version=old,
        new_version=str(new),
        model_version=model_version,
        index_version=index_version,
        previous_index=previous_index,
        rows=stats.rows,
        dropped=dropped,
        timings=timings,
        cold_items=len(cold),
        vocabulary_changed=new_vocab,
    )


def _undo(
    tower: TritonTower,
    index: ItemIndex,
    repo: Path,
    name: str,
    new: int,
    old: str | None,
    previous_index: str | None,
    index_version: str,
    loaded: bool,
    undone: list[str],
) -> str:
    """Put the previous version back; returns what could not be undone ("" when everything was).

    Order: the pointer first (if it moved), then Triton, then the directory. Between the steps tower and
    index may disagree; the workers' guard refuses those batches, so nothing mixed is produced."""
    failed: list[str] = []
    try:
        if index_version != previous_index and index.active_version(max_age_s=0) == index_version:
            if previous_index is None:
                failed.append(f"the index points at {index_version} and there is no previous version")
            else:
                index.flip(previous_index)
                undone.append(f"index pointer back to {previous_index}")
    except Exception as exc:  # noqa: BLE001 - report, keep undoing
        failed.append(f"could not check/restore the index pointer ({exc}); flip it to {previous_index}")
    if loaded:
        try:
            if old is None:
                if tower.ready():
                    tower.unload()
                    undone.append(f"unloaded {name} from Triton")
            else:
                # always pin, even when the old version still answers: a load that timed out on the
                # client may still finish on the server and switch to the new version later
                tower.load(old)  # a `specific` version policy override: pinned to the old version
                undone.append(f"Triton pinned back to version {old}")
        except Exception as exc:  # noqa: BLE001
            failed.append(f"Triton still serves the new version ({exc}); run TritonTower.load({old})")
    try:
        undone.append(_retire(repo, name, new))
    except OSError as exc:
        failed.append(f"remove {repo / name / str(new)} ({exc})")
    undone.append(f"index {index_version} left inactive (replaced by the next roll, or dropped later)")
    return "; ".join(failed)
