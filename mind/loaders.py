"""Readers that turn the common shapes of interaction data into one `Interactions`.

Formats (`fmt`):
- ``recbole``   RecBole atomic files: ``X.inter`` (typed, tab-separated header) with optional
  ``X.item`` (token fields -> item side ids) and ``X.user`` (token fields -> profile ids);
- ``sequences`` one user per line, ``user item item …`` in chronological order, with an optional
  ``*_item2attributes.json`` ({item: [attribute ids]}) beside it;
- ``pairs``     one interaction per line, ``user item [timestamp]``, whitespace- or comma-separated,
  with or without a header line;
- ``jsonl``     the click-event log the stream consumes, one JSON object per line.

Conventions every reader follows (so that the model, the export and the stream agree):
- item indices are assigned in first-seen file order (then catalogue-only items from side files);
  user indices likewise; sequences are sorted by timestamp (stable) when the source has them;
- side ids are namespaced ``field=value`` (``class=Comedy``, ``attr=17``) and share one vocabulary;
  ``item_side`` has at least one column (all zeros when there is no side data), at most 8;
- ``user_profile`` column j is always profile field j (the model concatenates per-field embeddings),
  0 where the user has no value; P may be 0;
- malformed lines raise `DataError` naming file, 1-based line and reason. With ``skip_bad=True`` they
  are skipped instead: the count is stored as ``inter.skipped`` (an attribute set after construction,
  0 when nothing was skipped) and logged as a warning. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mind.dataset import Interactions, Vocab

try:  # orjson is a project dependency; the stdlib fallback keeps the loader importable without it
    import orjson

    _json_loads = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover
    _json_loads = json.loads
    _JSONError = (json.JSONDecodeError,)

log = logging.getLogger(__name__)

FORMATS = ("recbole", "sequences", "pairs", "jsonl")
MAX_SIDE = 8  # side ids kept per item (the model averages them; more adds little)

_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_FREE_TEXT = ("title", "desc", "text", "comment", "review", "url", "address")  # not categorical side info
_USER_NAMES = ("user_id", "user", "userid", "uid")
_ITEM_NAMES = ("item_id", "item", "itemid", "iid")
_TS_NAMES = ("timestamp", "time", "ts", "unix_time", "datetime")
_HEADER_NAMES = frozenset((*_USER_NAMES, *_ITEM_NAMES, *_TS_NAMES, "rating"))


class DataError(ValueError):
    """Malformed input: the message is ``file:line: reason`` so a user can open the exact spot."""

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path.name}:{line}" if line else self.path.name
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------- shared machinery


@dataclass
class _Skips:
    """Collects bad lines when ``skip_bad`` is on; re-raises them otherwise."""

    skip_bad: bool
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def bad(self, err: DataError) -> None:
        if not self.skip_bad:
            raise err
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(str(err))


@dataclass
class _Builder:
    """Accumulates clicks and side/profile ids in first-seen order, then freezes an `Interactions`."""

    users: Vocab = field(default_factory=lambda: Vocab(reserved=0))
    items: Vocab = field(default_factory=Vocab)
    seqs: list[list[int]] = field(default_factory=list)
    ts: list[list[float]] = field(default_factory=list)
    side: Vocab = field(default_factory=lambda: Vocab(reserved=1))
    item_side: dict[int, list[int]] = field(default_factory=dict)
    profile: Vocab = field(default_factory=lambda: Vocab(reserved=1))
    user_profile: dict[int, list[int]] = field(default_factory=dict)

    def user(self, raw: str) -> int:
        u = self.users.add(raw)
        if u == len(self.seqs):
            self.seqs.append([])
            self.ts.append([])
        return u

    def click(self, user: str, item: str, ts: float = 0.0) -> None:
        u = self.user(user)
        self.seqs[u].append(self.items.add(item))
        self.ts[u].append(ts)

    def set_side(self, item_idx: int, raw_sides: Sequence[str]) -> None:
        ids: list[int] = []
        for s in raw_sides:
            sid = self.side.add(s)
            if sid not in ids:
                ids.append(sid)
        if ids:
            self.item_side[item_idx] = ids

    def set_profile(self, user_idx: int, raw_profile: Sequence[str | None]) -> None:
        """One entry per profile field (column); None/"" leaves that column at 0."""
        self.user_profile[user_idx] = [self.profile.add(p) if p else 0 for p in raw_profile]

    def build(self, name: str, has_ts: bool, skips: _Skips | None = None) -> Interactions:
        sequences: list[np.ndarray] = []
        stamps: list[np.ndarray] | None = [] if has_ts else None
        for seq, ts in zip(self.seqs, self.ts, strict=True):
            s = np.asarray(seq, dtype=np.int64)
            if has_ts:
                t = np.asarray(ts, dtype=np.float64)
                order = np.argsort(t, kind="stable")
                s, t = s[order], t[order]
                stamps.append(t)  # type: ignore[union-attr]
            sequences.append(s)
        n_items, n_users = len(self.items), len(self.users.raw)
        width = max(1, min(MAX_SIDE, max((len(v) for v in self.item_side.values()), default=0)))
        item_side = np.zeros((n_items, width), dtype=np.int64)
        capped = 0
        for i, ids in self.item_side.items():
            capped += len(ids) > width
            item_side[i, : min(width, len(ids))] = ids[:width]
        if capped:
            log.info("%s: %d items had more than %d side ids; kept the first %d", name, capped, width, width)
        p = max((len(v) for v in self.user_profile.values()), default=0)
        user_profile = np.zeros((n_users, p), dtype=np.int64)
        for u, ids in self.user_profile.items():
            user_profile[u, : len(ids)] = ids
        inter = Interactions(
            name=name,
            users=list(self.users.raw),
            sequences=sequences,
            items=self.items,
            item_side=item_side,
            n_side=len(self.side),
            user_profile=user_profile,
            n_profile=len(self.profile),
            timestamps=stamps,
            side_vocab=self.side,
            profile_vocab=self.profile,
        )
        _report(inter, skips)
        return inter


def _report(inter: Interactions, skips: _Skips | None) -> None:
    inter.skipped = skips.count if skips else 0  # type: ignore[attr-defined]
    if skips and skips.count:
        log.warning("%s: skipped %d bad line(s), e.g. %s", inter.name, skips.count, "; ".join(skips.examples))


def _lines(path: Path, skips: _Skips) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without the line break) for every non-blank line.

    Reads bytes and decodes per line so that an encoding error is reported at its line.
    """
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.bad(DataError(path, no, f"not UTF-8 text ({e.reason} at byte {e.start})"))
                continue
            if no == 1:
                text = text.lstrip("\ufeff")
            text = text.rstrip("\r\n")
            if text.strip():
                yield no, text


def _row_click(
    b: _Builder, skips: _Skips, path: Path, no: int, user: str, item: str, ts_raw: str | None
) -> None:
    """One interaction row of a table (RecBole `.inter` or pairs): checked, then recorded or reported."""
    if not user or not item:
        skips.bad(DataError(path, no, "empty user or item"))
        return
    ts = 0.0
    if ts_raw is not None:
        t = _float(ts_raw)
        if t is None:
            skips.bad(DataError(path, no, f"non-numeric timestamp {ts_raw!r}"))
            return
        ts = t
    b.click(user, item, ts)


def _float(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- RecBole atomic files


def _parse_header(path: Path, text: str) -> list[tuple[str, str]]:
    cols = []
    for f in text.split("\t"):
        name, _, typ = f.strip().partition(":")
        typ = typ or "token"
        if typ not in _RECBOLE_TYPES:
            raise DataError(path, 1, f"unknown RecBole field type {typ!r} in {f!r} (one of {_RECBOLE_TYPES})")
        cols.append((name, typ))
    return cols


def _recbole_rows(path: Path, skips: _Skips) -> tuple[list[tuple[str, str]], Iterator[tuple[int, list[str]]]]:
    lines = _lines(path, skips)
    first = next(lines, None)
    if first is None:
        raise DataError(path, 1, "empty file: expected a typed header such as `user_id:token item_id:token`")
    header = _parse_header(path, first[1])

    def rows() -> Iterator[tuple[int, list[str]]]:
        for no, text in lines:
            row = text.split("\t")
            if len(row) != len(header):
                skips.bad(DataError(path, no, f"expected {len(header)} tab-separated fields, got {len(row)}"))
                continue
            yield no, row

    return header, rows()


def _col(
    path: Path, header: list[tuple[str, str]], names: Sequence[str], required: bool = True
) -> int | None:
    lower = [n.lower() for n, _ in header]
    for n in names:
        if n in lower:
            return lower.index(n)
    if required:
        raise DataError(path, 1, f"header has no {names[0]!r} field (fields: {[n for n, _ in header]})")
    return None


def load_recbole(path: str | Path, skip_bad: bool = False) -> Interactions:
    """Read RecBole atomic files: a directory holding ``X.inter`` or the ``.inter`` path itself.

    ``X.item`` beside it gives side ids: every token/token_seq field except the item id, free text
    (title/description/… by name) and identifier-like fields (more distinct values than half the
    items, e.g. names or SKUs); ``X.user`` gives one profile column per token field (``zip`` fields
    bucketed to their first character). Float fields are not used as ids. Users that appear only
    in ``X.user`` are ignored; items that appear only in ``X.item`` join the vocabulary.
    """
    inter_path = _resolve(Path(path), "recbole")
    skips = _Skips(skip_bad)
    b = _Builder()
    header, rows = _recbole_rows(inter_path, skips)
    ui, ii = _col(inter_path, header, ("user_id",)), _col(inter_path, header, ("item_id",))
    ti = _col(inter_path, header, ("timestamp",), required=False)
    assert ui is not None and ii is not None
    for no, row in rows:
        _row_click(
            b, skips, inter_path, no, row[ui].strip(), row[ii].strip(), None if ti is None else row[ti]
        )

    item_path = inter_path.with_suffix(".item")
    if item_path.exists():
        header, rows = _recbole_rows(item_path, skips)
        ii = _col(item_path, header, ("item_id",))
        item_rows = [row for _, row in rows]
        side_cols = [
            (j, n, t)
            for j, (n, t) in enumerate(header)
            if j != ii and t in ("token", "token_seq") and not any(w in n.lower() for w in _FREE_TEXT)
        ]

        def values(row: list[str], j: int, t: str) -> list[str]:
            return row[j].split() if t == "token_seq" else [v] if (v := row[j].strip()) else []

        # a field with nearly one value per item (names, addresses) is an identifier, not shared side info
        limit = max(16, len(item_rows) // 2)
        side_cols = [
            (j, n, t)
            for j, n, t in side_cols
            if len({v for r in item_rows for v in values(r, j, t)}) <= limit
        ]
        for row in item_rows:
            item = row[ii].strip()  # type: ignore[index]
            if item:  # catalogue-only items join the vocabulary
                b.set_side(
                    b.items.add(item), [f"{n}={v}" for j, n, t in side_cols for v in values(row, j, t)]
                )

    user_path = inter_path.with_suffix(".user")
    if user_path.exists():
        header, rows = _recbole_rows(user_path, skips)
        ui = _col(user_path, header, ("user_id",))
        prof_cols = [(j, n) for j, (n, t) in enumerate(header) if j != ui and t == "token"]
        for _, row in rows:
            u = b.users.get(row[ui].strip(), -1)  # type: ignore[index]
            if u < 0:  # a profile without interactions is not a user of this data set
                continue
            vals = []
            for j, n in prof_cols:
                v = row[j].strip()
                if v and "zip" in n.lower():
                    v = v[0]
                vals.append(f"{n}={v}" if v else None)
            b.set_profile(u, vals)
    return b.build(inter_path.stem, has_ts=ti is not None, skips=skips)


# --------------------------------------------------------------------------- sequences


def _find_attributes(seq_path: Path) -> Path | None:
    exact = seq_path.with_name(f"{seq_path.stem}_item2attributes.json")
    if exact.exists():
        return exact
    found = sorted(seq_path.parent.glob("*_item2attributes.json"))
    return found[0] if len(found) == 1 else None


def load_sequences(
    path: str | Path, attributes: str | Path | None = None, skip_bad: bool = False
) -> Interactions:
    """Read ``user item item …`` lines (chronological, whitespace-separated; no timestamps).

    ``attributes`` is an ``{item: [attribute ids]}`` JSON; by default ``<stem>_item2attributes.json``
    (or the only ``*_item2attributes.json``) beside the file is used. A user on two lines is an error.
    """
    seq_path = _resolve(Path(path), "sequences")
    skips = _Skips(skip_bad)
    b = _Builder()
    first_line: dict[str, int] = {}
    for no, text in _lines(seq_path, skips):
        f = text.split()
        if len(f) < 2:
            skips.bad(DataError(seq_path, no, f"expected `user item …`, got {_plural(len(f), 'field')}"))
            continue
        if f[0] in first_line:
            reason = f"user {f[0]!r} already has a sequence on line {first_line[f[0]]}"
            skips.bad(DataError(seq_path, no, reason))
            continue
        first_line[f[0]] = no
        u = b.user(f[0])
        b.seqs[u].extend(b.items.add(i) for i in f[1:])
    attr_path = Path(attributes) if attributes is not None else _find_attributes(seq_path)
    if attr_path is not None:
        _read_attributes(attr_path, b)
    return b.build(seq_path.stem, has_ts=False, skips=skips)


def _read_attributes(path: Path, b: _Builder) -> None:
    try:
        data = _json_loads(path.read_bytes())
    except _JSONError as e:
        raise DataError(path, getattr(e, "lineno", None), f"bad JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(path, 1, f"expected an object {{item: [attribute ids]}}, got {type(data).__name__}")
    for item, attrs in data.items():
        if not isinstance(attrs, list) or not all(isinstance(a, (int, str)) for a in attrs):
            raise DataError(path, None, f"item {item!r}: expected a list of attribute ids, got {attrs!r}")
        b.set_side(b.items.add(str(item)), [f"attr={a}" for a in attrs])


# --------------------------------------------------------------------------- pairs


def _split_fn(first: str):
    if "," in first:
        return lambda s: [x.strip() for x in s.split(",")]
    if "\t" in first:
        return lambda s: [x.strip() for x in s.split("\t")]
    return str.split


def _is_header(fields: list[str], sniffing: bool = False) -> bool:
    """A header names a known column; when sniffing, a non-numeric 3rd+ column also counts."""
    names = [f.lower().partition(":")[0] for f in fields]
    if any(n in _HEADER_NAMES for n in names):
        return True
    return sniffing and len(fields) >= 3 and _float(fields[-1]) is None


def load_pairs(path: str | Path, skip_bad: bool = False) -> Interactions:
    """Read ``user item [timestamp]`` lines (whitespace, tab or comma separated).

    With a header line the user/item/timestamp columns are found by name (an item column may be named
    after what the item is, as MovieLens's ``userId,movieId,rating,timestamp`` is); without one, column 0 is
    the user, column 1 the item and, when there are 3 or more columns, the last is the timestamp
    (so ``user item rating timestamp`` works too). Every line must have the first line's width.
    Sorted by timestamp per user (stable) when present, else kept in file order.
    """
    p = _resolve(Path(path), "pairs")
    skips = _Skips(skip_bad)
    b = _Builder()
    lines = _lines(p, skips)
    first = next(lines, None)
    if first is None:
        raise DataError(p, 1, "empty file: expected `user item [timestamp]` lines")
    split = _split_fn(first[1])
    head = split(first[1])
    if _is_header(head):
        hdr = [h.lower().partition(":")[0] for h in head]
        cols = [(h, "") for h in hdr]
        ui = _col(p, cols, _USER_NAMES)
        ii = _col(p, cols, _ITEM_NAMES, required=False)
        if ii is None:  # an item column named after what it is: movieId, artistID, business_id
            ii = next((j for j, h in enumerate(hdr) if j != ui and h.endswith("id")), None)
        if ii is None:
            raise DataError(
                p, first[0], f"header has no item column such as 'item_id' or 'movieId' (fields: {hdr})"
            )
        ti = _col(p, cols, _TS_NAMES, required=False)
        width = len(head)
        body: Iterator[tuple[int, str]] = lines
    else:
        width = len(head)
        ui, ii, ti = 0, 1, (width - 1 if width >= 3 else None)

        def body_gen() -> Iterator[tuple[int, str]]:
            yield first
            yield from lines

        body = body_gen()
    if width < 2:
        raise DataError(p, first[0], f"expected `user item [timestamp]`, got {_plural(width, 'field')}")
    assert ui is not None and ii is not None
    for no, text in body:
        f = split(text)
        if len(f) != width:
            reason = f"expected {_plural(width, 'field')} like line {first[0]}, got {len(f)}"
            skips.bad(DataError(p, no, reason))
            continue
        _row_click(b, skips, p, no, f[ui], f[ii], None if ti is None else f[ti])
    return b.build(p.stem, has_ts=ti is not None, skips=skips)


# --------------------------------------------------------------------------- JSONL click log


def _id_field(ev: dict, key: str) -> str:
    v = ev.get(key)
    if v is None:
        raise KeyError(key)
    if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
        raise TypeError(f"{key} must be a non-empty string, got {v!r}")
    return str(v)


def _str_list(ev: dict, key: str) -> list[str]:
    v = ev.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
        raise TypeError(f"{key} must be a list of strings, got {v!r}")
    return [str(x) for x in v]


def load_jsonl(path: str | Path, skip_bad: bool = False) -> Interactions:
    """Read the click-event log: one ``{"event_id", "user_id", "item_id", "timestamp", …}`` per line.

    ``side_ids`` describe the item (the first non-empty list seen for an item wins); ``profile_ids``
    describe the user (the most recent event's list wins; column j = position j). Events are sorted
    by timestamp per user (stable). Duplicate event ids are kept (the log is taken as given).
    """
    p = _resolve(Path(path), "jsonl")
    skips = _Skips(skip_bad)
    b = _Builder()
    profile_ts: dict[int, float] = {}
    for no, text in _lines(p, skips):
        try:
            ev = _json_loads(text)
        except _JSONError as e:
            skips.bad(DataError(p, no, f"bad JSON: {e}"))
            continue
        if not isinstance(ev, dict):
            skips.bad(DataError(p, no, f"expected a JSON object, got {type(ev).__name__}"))
            continue
        try:
            _id_field(ev, "event_id")
            user, item = _id_field(ev, "user_id"), _id_field(ev, "item_id")
            ts = ev.get("timestamp")
            if ts is None:
                raise KeyError("timestamp")
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
                raise TypeError(f"timestamp must be a number (unix seconds), got {ts!r}")
            sides, prof = _str_list(ev, "side_ids"), _str_list(ev, "profile_ids")
        except KeyError as e:
            skips.bad(DataError(p, no, f"missing field {e.args[0]!r}"))
            continue
        except TypeError as e:
            skips.bad(DataError(p, no, str(e)))
            continue
        b.click(user, item, float(ts))
        if sides:
            i = b.items.get(item)
            if i not in b.item_side:
                b.set_side(i, sides)
        if prof:
            u = b.users.get(user)
            if ts >= profile_ts.get(u, -math.inf):
                profile_ts[u] = float(ts)
                b.set_profile(u, prof)
    return b.build(p.stem, has_ts=True, skips=skips)


# --------------------------------------------------------------------------- detection and entry point


def _resolve(path: Path, fmt: str) -> Path:
    """Map a directory to the data file of the given format inside it (files pass through)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        return path
    patterns = {
        "recbole": ("*.inter",),
        "sequences": ("*.txt",),
        "pairs": ("*.csv", "*.tsv", "*.txt"),
        "jsonl": ("*.jsonl", "*.ndjson"),
    }[fmt]
    found = sorted(f for pat in patterns for f in path.glob(pat) if f.is_file())
    named = [f for f in found if f.stem.lower() == path.name.lower()]
    if len(named) == 1:
        return named[0]
    if len(found) == 1:
        return found[0]
    what = "no" if not found else f"{len(found)} candidate"
    raise DataError(
        path,
        None,
        f"{what} {fmt} data file(s) ({', '.join(patterns)}) in the directory; pass the file itself",
    )


def _undetectable(path: Path, why: str) -> DataError:
    return DataError(
        path,
        None,
        f"cannot detect the data format ({why}); pass fmt= one of {FORMATS}: "
        "recbole (.inter), sequences (`user item item …`), "
        "pairs (`user item [timestamp]`), jsonl (click events)",
    )


def detect_format(path: str | Path) -> str:
    """Guess the format from the directory contents, the extension, then the first lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        for fmt, pats in (
            ("recbole", ("*.inter",)),
            ("jsonl", ("*.jsonl", "*.ndjson")),
            ("sequences", ("*.txt",)),
            ("pairs", ("*.csv", "*.tsv")),
        ):
            if any(f.is_file() for pat in pats for f in path.glob(pat)):
                if fmt == "sequences":  # a .txt may hold either shape: sniff it
                    return detect_format(_resolve(path, fmt))
                return fmt
        raise _undetectable(path, "directory has no .inter, .txt, .csv, .tsv or .jsonl file")
    ext = path.suffix.lower()
    if ext == ".inter":
        return "recbole"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    sample: list[list[str]] = []
    first = ""
    with open(path, "rb") as f:
        for raw in f:
            try:
                text = raw.decode("utf-8").lstrip("\ufeff").strip()
            except UnicodeDecodeError:
                if not first:
                    raise _undetectable(path, "not UTF-8 text") from None
                continue  # the reader reports it at its line
            if not text:
                continue
            if not first:
                first = text
            sample.append(text.split())
            if len(sample) >= 200:
                break
    if not first:
        raise _undetectable(path, "the file is empty")
    if first.startswith("{"):
        return "jsonl"
    if any(f.partition(":")[2] in _RECBOLE_TYPES for f in first.split("\t")):
        return "recbole"
    if "," in first or ext in (".csv", ".tsv"):
        return "pairs"
    if _is_header(first.split(), sniffing=True):
        return "pairs"
    widths = {len(f) for f in sample}
    if min(widths) < 2:
        raise _undetectable(path, f"line 1 has {_plural(len(sample[0]), 'field')}")
    if len(widths) > 1:
        return "sequences"
    if widths == {2}:
        return "pairs"  # `user item`: pairs and one-item sequences read the same anyway
    users = [f[0] for f in sample]
    timestamp_like = all((t := _float(f[-1])) is not None and t > 1e8 for f in sample)
    if len(set(users)) < len(users) or timestamp_like:
        return "pairs"
    return "sequences"


def load(path: str | Path, fmt: str = "auto", skip_bad: bool = False, min_count: int = 0) -> Interactions:
    """Load any supported data set; ``min_count > 0`` applies the ComiRec k-core filter afterwards.

    The number of skipped bad lines (``skip_bad=True``) is ``result.skipped``.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"recbole": load_recbole, "sequences": load_sequences, "pairs": load_pairs, "jsonl": load_jsonl}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; use 'auto' or one of {FORMATS}")
    inter = readers[fmt](path, skip_bad=skip_bad)
    if min_count > 0:
        inter = filter_kcore(inter, min_item=min_count, min_user=min_count)
    return inter


# --------------------------------------------------------------------------- filtering


def filter_kcore(inter: Interactions, min_item: int = 5, min_user: int = 5) -> Interactions:
    """ComiRec's filter: keep items with >= min_item interactions, then users with >= min_user of them.

    One pass in that order (as ComiRec does), so a kept user may hold items that now have fewer than
    min_item interactions. Items are reindexed in their old order; side and profile vocabularies are
    kept as they are (some ids may become unused).
    """
    flat = np.concatenate(inter.sequences) if inter.sequences else np.zeros(0, dtype=np.int64)
    counts = np.bincount(flat, minlength=inter.n_items)
    keep_item = counts >= min_item
    keep_item[: inter.items.reserved] = False
    new_index = np.zeros(inter.n_items, dtype=np.int64)
    kept = np.flatnonzero(keep_item)
    new_index[kept] = np.arange(len(kept)) + inter.items.reserved
    vocab = Vocab([inter.items.raw_of(int(i)) for i in kept], reserved=inter.items.reserved)

    users, seqs, stamps, rows, masks = [], [], [] if inter.timestamps is not None else None, [], []
    for u, s in enumerate(inter.sequences):
        mask = keep_item[s]
        if int(mask.sum()) < min_user:
            continue
        masks.append(mask)
        users.append(inter.users[u])
        seqs.append(new_index[s[mask]])
        rows.append(u)
        if stamps is not None:
            stamps.append(inter.timestamps[u][mask])  # type: ignore[index]
    item_side = np.concatenate([inter.item_side[: inter.items.reserved], inter.item_side[kept]])
    out = Interactions(
        name=inter.name,
        users=users,
        sequences=seqs,
        items=vocab,
        item_side=item_side,
        n_side=inter.n_side,
        user_profile=inter.user_profile[np.asarray(rows, dtype=np.int64)],
        n_profile=inter.n_profile,
        timestamps=stamps,
        planted=inter.planted,
        side_vocab=inter.side_vocab,
        profile_vocab=inter.profile_vocab,
    )
    if inter.planted is not None:  # keep the synthetic truth aligned with the new indices
        planted = dict(inter.planted)
        if "item_category" in planted:
            planted["item_category"] = np.concatenate(
                [np.full(inter.items.reserved, -1), np.asarray(planted["item_category"])[kept]]
            )
        for key in ("user_categories", "user_weights"):
            if key in planted:
                planted[key] = [planted[key][u] for u in rows]
        if "noise_mask" in planted:  # per click: filter like the sequences
            planted["noise_mask"] = [planted["noise_mask"][u][m] for u, m in zip(rows, masks, strict=True)]
        out.planted = planted
    out.skipped = getattr(inter, "skipped", 0)  # type: ignore[attr-defined]
    dropped = len(inter.users) - len(users), int((counts[inter.items.reserved :] > 0).sum()) - len(kept)
    log.info("%s: k-core(%d, %d) dropped %d users and %d items", inter.name, min_item, min_user, *dropped)
    return out
