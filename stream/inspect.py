"""One user, looked at from the stores the worker writes: what the candidate view's user page shows
beyond the recall message. Read-only.

    behaviours   the window list in the key-value store (`mind:{<clicks>.<click_partition>}:win:<user>`,
                 through stream.state.WindowState's read methods), raw item and side ids from the
                 checkpoint's Catalog
    interests    the user's interests hash in the same partition's slot (vec [k, d], model_version, ts)
    top items    each interest's own nearest items in Milvus, in the recall message's index version
    coupling     the user tower's optional COUPLING output (Triton) for the same window: which behaviour
                 fed which interest (routing's w_ij, the paper's Fig. 5)

Why read the stores rather than have the worker publish what the page needs: the page is for an engineer
looking at one user now and then, so it should cost the hot path nothing. The worker's loop, its recall
messages and their size stay as they are, and the page pays for its own reads (a few milliseconds)
only when someone looks. The price is a small race: the stores are read when the page is asked for, so
a click that arrived after the list was produced already shows in the window and the interests (the
page says so when the interests are newer than the list).

Every part is fetched on its own: a part that cannot be (no address or checkpoint configured, a server
down, a tower exported before COUPLING existed) becomes a note saying what is missing and why, and the
page shows the rest. Connections are opened on first use and kept; calls run on a worker thread of the
view (they block), with short timeouts and no retries (reloading the page is the retry).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from redis.backoff import NoBackoff
from redis.retry import Retry

from indexer.store import ItemIndex
from mind.dataset import PAD
from stream.settings import Settings, redis_client
from stream.state import WindowState
from stream.tower import TritonTower

if TYPE_CHECKING:  # stream.window imports torch (to read the checkpoint): see Inspector.catalog
    from stream.window import Catalog

TOP_PER_INTEREST = 10  # each interest's own top items shown on the page
_T = TypeVar("_T")


@dataclass
class Behaviour:
    """One item of the window, oldest first."""

    index: int  # model item index (1 = unknown item)
    item_id: str  # raw id, or "#<index>" without the checkpoint
    side: list[str]  # raw side ids ("category=3"), or "#<index>" without the checkpoint
    interest: int = -1  # the interest that took most of it (coupling argmax); -1 = unknown
    weight: float = 0.0  # that coupling coefficient


@dataclass
class Interest:
    """One active interest k: its own top items and the behaviours it gathered."""

    k: int
    top: list[tuple[str, float]] = field(default_factory=list)  # (item id, score), best first
    gathered: list[tuple[int, float]] = field(
        default_factory=list
    )  # (behaviour position, w), strongest first
    candidates: int = 0  # candidates of the merged list that came from this interest


@dataclass
class UserLook:
    """Everything the page shows for one user; `notes` say what is missing and why."""

    user_id: str
    msg: dict[str, Any]  # the stored recall message
    behaviours: list[Behaviour] = field(default_factory=list)
    window_key: str = ""
    interests: list[Interest] = field(default_factory=list)
    interests_version: str = ""  # model_version stored with the interest vectors
    interests_ts: float | None = None
    coupling: np.ndarray | None = None  # [len(behaviours), k active]
    coupling_version: str = ""  # model version of the tower that answered COUPLING
    catalog_version: str = ""  # vocab hash of the checkpoint used for raw ids
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # sources that failed (for the metrics): redis, ...
    timings_ms: dict[str, float] = field(default_factory=dict)


def raw_item(catalog: Catalog | None, index: int) -> str:
    """A model index as the page shows it: the raw id with the checkpoint, else `#index`."""
    if index == PAD:
        return "(padding)"
    if index < 2:
        return "(unknown item)"
    if catalog is None:
        return f"#{index}"
    try:
        return catalog.raw_item(index)
    except IndexError:
        return f"#{index} (not in the checkpoint)"


def side_names(catalog: Catalog | None, index: int) -> list[str]:
    """Raw side ids of an item index (none for padding / unknown ids)."""
    if catalog is None or not 0 <= index < len(catalog.item_side):
        return []
    names = catalog.side_names
    return [names[s - 1] if 0 < s <= len(names) else f"#{s}" for s in catalog.item_side[index] if s > 0]


class Inspector:
    """Lazily connected, read-only clients of the key-value store, Triton and Milvus, plus the Catalog.

    Addresses come from the settings (flags, MIND_* variables or the running stack, as for `mind view`);
    an address left unset is not guessed: the page says which setting is missing.
    """

    def __init__(self, settings: Settings, *, timeout_s: float = 5.0) -> None:
        self.settings, self.timeout_s = settings, timeout_s
        self._lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._state: WindowState | None = None
        self._tower: TritonTower | None = None
        self._index: ItemIndex | None = None

    # ---- clients, opened on first use ---------------------------------------------------------

    def catalog(self) -> Catalog:
        with self._lock:
            if self._catalog is None:
                path = self.settings.checkpoint
                if path is None:
                    raise LookupError(
                        "no checkpoint configured (--checkpoint or MIND_CHECKPOINT): items show as model "
                        "indices, without raw ids or side ids, and the coupling heatmap needs it"
                    )
                if not Path(path).is_file():
                    raise LookupError(f"checkpoint {path} does not exist")
                # Not a circle: torch (to read the checkpoint) costs the view ~1.4 s and ~190 MB at start,
                # so it is loaded when the first page needs it, as `mind` loads torch per command.
                from stream.window import load_catalog

                self._catalog = load_catalog(path)
            return self._catalog

    def state(self) -> WindowState:
        with self._lock:
            if self._state is None:
                if not self.settings.redis_url:
                    raise LookupError(
                        "no key-value store address (MIND_REDIS_URL): no behaviours, no interests"
                    )
                client = redis_client(
                    self.settings,
                    socket_timeout=self.timeout_s,
                    socket_connect_timeout=self.timeout_s,
                    retry=Retry(NoBackoff(), 0),
                )
                self._state = WindowState(
                    client, self.settings.clicks_topic, self.settings.window_len, attempts=1
                )
            return self._state

    def tower(self) -> TritonTower:
        with self._lock:
            if self._tower is None:
                if not self.settings.triton_url:
                    raise LookupError("no Triton address (MIND_TRITON_URL): no coupling coefficients")
                self._tower = TritonTower(
                    self.settings.triton_url, self.settings.triton_model, self.timeout_s
                )
            return self._tower

    def index(self) -> ItemIndex:
        with self._lock:
            if self._index is None:
                if not self.settings.milvus_uri:
                    raise LookupError("no Milvus address (MIND_MILVUS_URI): no per-interest top items")
                token = self.settings.milvus_token
                self._index = ItemIndex(
                    self.settings.milvus_uri,
                    token=token.get_secret_value() if token else None,
                    prefix=self.settings.milvus_prefix,
                    timeout_s=self.timeout_s,
                    retries=1,
                )
            return self._index

    def close(self) -> None:
        with self._lock:
            for closer in (self._state and self._state.client.close, self._tower and self._tower.close):
                if closer:
                    closer()
            if self._index is not None:
                self._index.close()
            self._state = self._tower = self._index = None

    # ---- one user ---------------------------------------------------------------------------

    def look(self, msg: dict[str, Any]) -> UserLook:
        """Gather the page's data for one stored recall message (blocking: run it on a thread)."""
        user = str(msg["user_id"])
        look = UserLook(user, msg)
        catalog = self._part(look, "checkpoint", self.catalog)
        if catalog is not None:
            look.catalog_version = catalog.vocab_hash
        window = self._window(look, catalog)
        vectors = self._interests(look)
        k = len(vectors) if vectors is not None else 0
        look.interests = [Interest(j) for j in range(k)]
        for c in msg["candidates"]:
            j = int(c.get("interest", -1))
            if 0 <= j < k:
                look.interests[j].candidates += 1
        if vectors is not None and k:
            self._top_items(look, catalog, vectors, window or [])
        if window and catalog is not None:
            self._coupling(look, catalog, window, k)
        elif window and catalog is None:
            look.notes.append("coupling coefficients need the checkpoint (side ids of the window's items)")
        return look

    def _part(self, look: UserLook, source: str, fn: Callable[[], _T]) -> _T | None:
        """Run one read; a failure becomes a note (and a source error), never an exception."""
        t0 = time.perf_counter()
        try:
            return fn()
        except LookupError as exc:  # not configured / not found: a note, not an error
            look.notes.append(str(exc.args[0]) if exc.args else str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - the page shows what it can and says what failed
            look.notes.append(f"{source}: {type(exc).__name__}: {str(exc)[:300]}")
            look.errors.append(source)
            return None
        finally:
            look.timings_ms[source] = look.timings_ms.get(source, 0.0) + (time.perf_counter() - t0) * 1e3

    def _window(self, look: UserLook, catalog: Catalog | None) -> list[int] | None:
        state = self._part(look, "redis", self.state)  # first: a missing address is worth a note too
        part = look.msg.get("click_partition")
        if part is None:
            look.notes.append(
                "the recall message carries no click_partition: the window and the interests cannot be found"
            )
            return None
        if state is None:
            return None
        look.window_key = state.window_key(int(part), look.user_id)
        got = self._part(look, "redis", lambda: state.read_windows([(int(part), look.user_id)])[0])
        if got is None:
            return None
        if not got:
            look.notes.append(
                f"the window {look.window_key} is empty: is MIND_CLICKS_TOPIC the worker's clicks topic?"
            )
        look.behaviours = [Behaviour(i, raw_item(catalog, i), side_names(catalog, i)) for i in got]
        return got

    def _interests(self, look: UserLook) -> np.ndarray | None:
        part = look.msg.get("click_partition")
        state = self._state  # opened (or its absence noted) by _window
        if part is None or state is None:  # the interests live in the partition's slot, like the window
            return None

        def read() -> tuple[np.ndarray, str, float]:
            got = state.read_interests(int(part), look.user_id)
            if got is None:
                key = state.interests_key(int(part), look.user_id)
                raise LookupError(f"no interests stored for this user ({key})")
            return got[0], got[1], got[2]

        got = self._part(look, "redis", read)
        if got is None:
            return None
        vectors, look.interests_version, look.interests_ts = got
        produced = float(look.msg["produced_at"])
        if look.interests_ts is not None and look.interests_ts > produced + 1e-3:
            look.notes.append(
                "the stored interests are newer than this list: a refresh for a later click is on its way"
            )
        if look.interests_version != look.msg["model_version"]:
            look.notes.append(
                f"the stored interests are of model {look.interests_version!r}, the list of "
                f"{look.msg['model_version']!r}"
            )
        return vectors

    def _top_items(
        self, look: UserLook, catalog: Catalog | None, vectors: np.ndarray, seen: list[int]
    ) -> None:
        """Each interest's own nearest items (seen items dropped, as the worker does by default)."""
        index = self._part(look, "milvus", self.index)
        if index is None:
            return
        n = TOP_PER_INTEREST + len(set(seen))
        version = look.msg["index_version"]
        res = self._part(look, "milvus", lambda: index.search(vectors, n, version=version))
        if res is None:
            return
        drop = set(seen)
        for it, ids, scores in zip(look.interests, res.ids, res.scores, strict=True):
            keep = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0 and i not in drop]
            it.top = [(raw_item(catalog, i), s) for i, s in keep[:TOP_PER_INTEREST]]

    def _coupling(self, look: UserLook, catalog: Catalog, window: list[int], k: int) -> None:
        """Ask the tower for this window's coupling coefficients; assign each behaviour to an interest."""
        tower = self._part(look, "triton", self.tower)
        if tower is None:
            return

        def ask() -> tuple[np.ndarray, np.ndarray, str]:
            max_len = int(next(t for t in tower.config()["input"] if t["name"] == "ITEM_IDS")["dims"][0])
            tail = window[-max_len:]
            profile = catalog.profile_row(look.user_id, [])
            items, side, prof = catalog.tower_inputs([tail], [profile], max_len)
            _, active, w, served = tower.coupling(items, side, prof)
            return w[0, : len(tail)], active[0], served

        got = self._part(look, "triton", ask)
        if got is None:
            return
        w, active, served = got
        meta = self._part(look, "triton", lambda: tower.meta(served))
        if meta is not None:
            look.coupling_version = meta.model_version
            if meta.model_version != look.msg["model_version"]:
                look.notes.append(
                    f"the coupling comes from model {meta.model_version!r} (served now), the list from "
                    f"{look.msg['model_version']!r}"
                )
            if catalog.vocab_hash and meta.vocab_hash and meta.vocab_hash != catalog.vocab_hash:
                look.notes.append(
                    f"the checkpoint's vocabulary ({catalog.vocab_hash}) is not the served tower's "
                    f"({meta.vocab_hash}): raw ids and the heatmap may be wrong"
                )
        k_active = int(active.sum()) or k
        w = np.asarray(w[:, :k_active], dtype=np.float32)
        skipped = len(window) - len(w)
        look.coupling = w
        rows = look.behaviours[skipped:]
        for pos, (b, row) in enumerate(zip(rows, w, strict=True), start=skipped):
            b.interest, b.weight = int(row.argmax()), float(row.max())
            if b.interest < len(look.interests):
                look.interests[b.interest].gathered.append((pos, b.weight))
        for it in look.interests:
            it.gathered.sort(key=lambda pw: -pw[1])
