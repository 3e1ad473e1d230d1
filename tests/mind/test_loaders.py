"""Loaders: every format, auto-detection, malformed input, skip_bad, k-core, the two real data sets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mind.dataset import OOV, PAD
from mind.loaders import (
    FORMATS,
    DataError,
    detect_format,
    filter_kcore,
    load,
    load_jsonl,
    load_pairs,
    load_recbole,
    load_sequences,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # /work/shared/data beside the repo
BEAUTY = DATA / "beauty"
ML100K = DATA / "ml-100k"
needs_beauty = pytest.mark.skipif(not (BEAUTY / "Beauty.txt").exists(), reason=f"no Beauty data at {BEAUTY}")
needs_ml = pytest.mark.skipif(not (ML100K / "ml-100k.inter").exists(), reason=f"no ml-100k data at {ML100K}")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def raw_seq(inter, u: int) -> list[str]:
    return [inter.items.raw_of(int(i)) for i in inter.sequences[u]]


# ------------------------------------------------------------------ RecBole


@pytest.fixture
def recbole_dir(tmp_path: Path) -> Path:
    d = tmp_path / "toy"
    d.mkdir()
    write(
        d / "toy.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ta\t5\t30\n"
        "u2\tb\t3\t10\n"
        "u1\tb\t4\t10\n"
        "u1\tc\t4\t10\n"
        "u2\ta\t1\t5\n",
    )
    write(
        d / "toy.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "a\tThe A Movie\t1995\tComedy Drama\n"
        "b\tB\t\tAction\n"
        "z\tOnly In Catalogue\t2001\tHorror\n",
    )
    write(
        d / "toy.user",
        "user_id:token\tage:token\tgender:token\tzip_code:token\n"
        "u1\t24\tM\t85711\n"
        "u2\t53\t\tT8H1N\n"
        "u9\t30\tF\t11111\n",
    )
    return d


def test_recbole_directory(recbole_dir: Path) -> None:
    inter = load(recbole_dir)
    assert inter.name == "toy"
    assert inter.users == ["u1", "u2"]
    # first-seen order a, b, c then the catalogue-only z
    assert inter.items.raw == ["a", "b", "c", "z"]
    assert raw_seq(inter, 0) == ["b", "c", "a"]  # sorted by timestamp, ties stay in file order
    assert raw_seq(inter, 1) == ["a", "b"]
    assert inter.timestamps is not None and inter.timestamps[0].tolist() == [10, 10, 30]
    side = inter.side_vocab
    a_sides = {side.raw_of(int(s)) for s in inter.item_side[inter.items.get("a")] if s}
    assert a_sides == {"release_year=1995", "class=Comedy", "class=Drama"}  # the title is free text
    assert {side.raw_of(int(s)) for s in inter.item_side[inter.items.get("b")] if s} == {"class=Action"}
    assert inter.item_side[PAD].tolist() == [0, 0, 0] and inter.item_side[OOV].tolist() == [0, 0, 0]
    assert inter.n_side == len(side) == 1 + 6
    prof = inter.profile_vocab
    assert inter.user_profile.shape == (2, 3)  # one column per field; u9 has no interactions
    assert [prof.raw_of(int(p)) for p in inter.user_profile[0]] == ["age=24", "gender=M", "zip_code=8"]
    assert inter.user_profile[1, 1] == 0  # missing gender stays "none"
    assert prof.raw_of(int(inter.user_profile[1, 2])) == "zip_code=T"
    assert inter.skipped == 0


def test_recbole_inter_path_and_named_format(recbole_dir: Path) -> None:
    a = load(recbole_dir / "toy.inter")
    b = load_recbole(recbole_dir)
    c = load(recbole_dir, fmt="recbole")
    assert a.users == b.users == c.users and a.items.raw == b.items.raw == c.items.raw


def test_recbole_malformed(recbole_dir: Path) -> None:
    p = recbole_dir / "toy.inter"
    lines = p.read_text().splitlines()
    write(p, "\n".join([*lines[:3], "u3\tq\t4", *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"^toy\.inter:4: expected 4 tab-separated fields, got 3$"):
        load(recbole_dir)
    write(p, "\n".join([*lines[:2], "u3\tq\t4\tyesterday", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"toy\.inter:3: non-numeric timestamp 'yesterday'") as e:
        load(recbole_dir)
    assert e.value.line == 3 and isinstance(e.value, ValueError)
    inter = load(recbole_dir, skip_bad=True)
    assert inter.skipped == 1 and inter.n_interactions == 5


def test_recbole_missing_id_column(tmp_path: Path) -> None:
    p = write(tmp_path / "x.inter", "user_id:token\tthing:token\nu\ti\n")
    with pytest.raises(DataError, match=r"x\.inter:1: header has no 'item_id' field"):
        load(p)


# ------------------------------------------------------------------ sequences


def test_sequences_with_attributes(tmp_path: Path) -> None:
    seq = write(tmp_path / "Toy.txt", "1 10 11 12\n2 11 13\n\n3 14 10\n")
    write(tmp_path / "Toy_item2attributes.json", json.dumps({"10": [1, 2], "11": [2], "99": [3]}))
    inter = load(tmp_path)
    assert inter.users == ["1", "2", "3"]
    assert raw_seq(inter, 0) == ["10", "11", "12"] and raw_seq(inter, 2) == ["14", "10"]
    assert inter.items.raw == ["10", "11", "12", "13", "14", "99"]  # 99 only in the attributes
    assert inter.timestamps is None
    sv = inter.side_vocab
    assert [sv.raw_of(int(s)) for s in inter.item_side[inter.items.get("10")] if s] == ["attr=1", "attr=2"]
    assert inter.item_side[inter.items.get("12")].tolist() == [0, 0]
    assert inter.n_side == 4 and inter.user_profile.shape == (3, 0) and inter.n_profile == 1
    assert load(seq).items.raw == inter.items.raw  # the attributes file is found beside the file too
    assert load_sequences(seq, attributes=tmp_path / "Toy_item2attributes.json").n_side == 4


def test_vocab_oov() -> None:
    from mind.dataset import Vocab

    v = Vocab(["x", "y"])
    assert v.get("x") == 2 and v.get("never seen") == OOV == 1 and len(v) == 4


def test_sequences_malformed(tmp_path: Path) -> None:
    p = write(tmp_path / "Beauty.txt", "1 10 11\n2 12\n3\n4 10 12\n2 13\n")
    with pytest.raises(DataError, match=r"^Beauty\.txt:3: expected `user item …`, got 1 field$"):
        load_sequences(p)
    with pytest.raises(DataError, match=r"^b\.txt:4: user '2' already has a sequence on line 2$"):
        load_sequences(write(tmp_path / "b.txt", "1 10 11\n2 12\n4 10 12\n2 13\n"))
    inter = load_sequences(p, skip_bad=True)
    assert inter.skipped == 2 and inter.users == ["1", "2", "4"]


def test_bad_attributes_json(tmp_path: Path) -> None:
    seq = write(tmp_path / "T.txt", "1 10 11\n")
    write(tmp_path / "T_item2attributes.json", '{"10": [1, 2],\n "11": [2,,]}')
    with pytest.raises(DataError, match=r"T_item2attributes\.json:2: bad JSON"):
        load_sequences(seq)
    write(tmp_path / "T_item2attributes.json", '{"10": 5}')
    with pytest.raises(DataError, match=r"item '10': expected a list"):
        load_sequences(seq)


def test_not_utf8_line(tmp_path: Path) -> None:
    p = tmp_path / "s.txt"
    p.write_bytes(b"1 10 11\n2 \xff\xfe 12\n")
    with pytest.raises(DataError, match=r"s\.txt:2: not UTF-8"):
        load_sequences(p)


# ------------------------------------------------------------------ pairs


def test_pairs_whitespace_with_timestamps(tmp_path: Path) -> None:
    p = write(tmp_path / "log.txt", "u1 a 300\nu2 b 100\nu1 b 100\nu1 c 200.5\n")
    inter = load(p)
    assert detect_format(p) == "pairs"
    assert raw_seq(inter, 0) == ["b", "c", "a"] and inter.timestamps[0].tolist() == [100, 200.5, 300]
    assert inter.items.raw == ["a", "b", "c"]


def test_pairs_csv_header_and_file_order(tmp_path: Path) -> None:
    p = write(tmp_path / "log.csv", "user_id,item_id\nu1,a\nu2,a\nu1,c\nu1,b\n")
    inter = load(p)
    assert inter.users == ["u1", "u2"] and raw_seq(inter, 0) == ["a", "c", "b"] and inter.timestamps is None
    q = write(tmp_path / "log2.csv", "timestamp, item, user\n5, a, u1\n1, b, u1\n")
    assert raw_seq(load(q), 0) == ["b", "a"]  # columns found by name


def test_pairs_item_column_named_after_the_item(tmp_path: Path) -> None:
    p = write(
        tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,10,3,1260759100\n"
    )
    assert raw_seq(load(p), 0) == ["10", "31"]  # MovieLens's own layout: sorted by the timestamp column
    q = write(tmp_path / "plays.csv", "user,count\nu1,3\n")
    with pytest.raises(DataError, match=r"plays\.csv:1: header has no item column such as 'item_id'"):
        load(q)


def test_pairs_tab_four_columns(tmp_path: Path) -> None:
    p = write(tmp_path / "u.data", "1\t10\t5\t881250949\n1\t11\t3\t881250000\n2\t10\t4\t881250001\n")
    inter = load(p)  # user item rating timestamp: the last column is the time
    assert raw_seq(inter, 0) == ["11", "10"]


def test_pairs_malformed(tmp_path: Path) -> None:
    p = write(tmp_path / "log.txt", "u1 a 1\nu1 b 2\nu2 c\nu2 d abc\nu2 e 5\n")
    with pytest.raises(DataError, match=r"^log\.txt:3: expected 3 fields like line 1, got 2$"):
        load_pairs(p)
    p2 = write(tmp_path / "log2.txt", "u1 a 1\nu1 b 2\nu2 d abc\n")
    with pytest.raises(DataError, match=r"^log2\.txt:3: non-numeric timestamp 'abc'$"):
        load_pairs(p2)
    inter = load_pairs(p, skip_bad=True)
    assert inter.skipped == 2 and inter.n_interactions == 3


# ------------------------------------------------------------------ JSONL


def event(eid: str, user: str, item: str, ts: float, **kw) -> str:
    return json.dumps({"event_id": eid, "user_id": user, "item_id": item, "timestamp": ts, **kw})


def test_jsonl(tmp_path: Path) -> None:
    p = write(
        tmp_path / "clicks.jsonl",
        "\n".join(
            [
                event(
                    "e1", "u1", "a", 30.0, side_ids=["cat=1", "brand=x"], profile_ids=["age=20", "gender=F"]
                ),
                event("e2", "u2", "b", 10.0),
                event("e3", "u1", "b", 20.0, profile_ids=["age=21", "gender=F"]),
                event("e4", "u1", "c", 25.0, side_ids=["cat=2"]),
            ]
        )
        + "\n",
    )
    inter = load(p)
    assert raw_seq(inter, 0) == ["b", "c", "a"] and inter.timestamps[0].tolist() == [20, 25, 30]
    sv, pv = inter.side_vocab, inter.profile_vocab
    assert [sv.raw_of(int(s)) for s in inter.item_side[inter.items.get("a")] if s] == ["cat=1", "brand=x"]
    assert [pv.raw_of(int(s)) for s in inter.user_profile[0]] == ["age=20", "gender=F"]  # the latest event
    assert inter.user_profile[1].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"event_id": "e2", "user_id": "u1", "item_id": ', "bad JSON"),
        ('{"event_id": "e2", "user_id": "u1", "timestamp": 3}', "missing field 'item_id'"),
        ('{"event_id": "e2", "item_id": "a", "timestamp": 3}', "missing field 'user_id'"),
        ('{"user_id": "u1", "item_id": "a", "timestamp": 3}', "missing field 'event_id'"),
        ('{"event_id": "e2", "user_id": "u1", "item_id": "a"}', "missing field 'timestamp'"),
        ('{"event_id": "e2", "user_id": "u1", "item_id": "a", "timestamp": "noon"}', "timestamp must be"),
        ('{"event_id": "e2", "user_id": null, "item_id": "a", "timestamp": 1}', "missing field 'user_id'"),
        ('{"event_id": "e2", "user_id": ["u"], "item_id": "a", "timestamp": 1}', "user_id must be"),
        ('{"event_id": "e2", "user_id": "u", "item_id": "a", "timestamp": 1, "side_ids": "x"}', "side_ids"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_jsonl_malformed(tmp_path: Path, line: str, reason: str) -> None:
    text = event("e1", "u1", "a", 1.0) + "\n\n" + line + "\n" + event("e3", "u1", "b", 2) + "\n"
    p = write(tmp_path / "c.jsonl", text)
    with pytest.raises(DataError, match=rf"^c\.jsonl:3: {reason}"):
        load_jsonl(p)
    inter = load_jsonl(p, skip_bad=True)
    assert inter.skipped == 1 and raw_seq(inter, 0) == ["a", "b"]


def test_skip_bad_logs_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = write(tmp_path / "s.txt", "1 10 11\nbad\n2 12 13\nworse\n")
    with caplog.at_level(logging.WARNING, logger="mind.loaders"):
        inter = load(p, fmt="sequences", skip_bad=True)
    assert inter.skipped == 2
    assert "skipped 2 bad line(s)" in caplog.text and "s.txt:2" in caplog.text


# ------------------------------------------------------------------ detection


def test_detection(tmp_path: Path, recbole_dir: Path) -> None:
    assert detect_format(recbole_dir) == "recbole"
    assert detect_format(recbole_dir / "toy.inter") == "recbole"
    assert detect_format(write(tmp_path / "a.txt", "1 2 3 4\n2 5\n3 6 7\n")) == "sequences"
    assert detect_format(write(tmp_path / "b.txt", "1 2 3\n2 5 6\n3 6 7\n")) == "sequences"  # distinct users
    assert detect_format(write(tmp_path / "c.txt", "1 2 3\n1 5 6\n3 6 7\n")) == "pairs"  # repeated user
    assert detect_format(write(tmp_path / "d.txt", "1 2 1600000000\n2 5 1600000001\n")) == "pairs"
    assert detect_format(write(tmp_path / "e.log", '{"event_id": "1"}\n')) == "jsonl"
    assert detect_format(write(tmp_path / "f.dat", "user item\nu i\n")) == "pairs"
    assert detect_format(write(tmp_path / "g.csv", "u,i\n")) == "pairs"
    typed = write(tmp_path / "h.tsv", "user_id:token\titem_id:token\nu\ti\n")
    assert detect_format(typed) == "recbole"  # a typed header wins over the extension
    assert detect_format(write(tmp_path / "h.csv", "user,item\nu,i\n")) == "pairs"
    jd = tmp_path / "jdir"
    jd.mkdir()
    write(jd / "x.jsonl", event("e", "u", "i", 1) + "\n")
    assert detect_format(jd) == "jsonl" and load(jd).n_interactions == 1


@pytest.mark.parametrize("content", ["", "\n\n", "lonely\n"])
def test_undetectable(tmp_path: Path, content: str) -> None:
    p = write(tmp_path / "mystery.bin", content)
    with pytest.raises(DataError, match=r"mystery\.bin: cannot detect the data format") as e:
        load(p)
    for fmt in FORMATS:
        assert fmt in str(e.value)


def test_unknown_format_and_missing_path(tmp_path: Path) -> None:
    p = write(tmp_path / "a.txt", "1 2\n")
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        load(p, fmt="parquet")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.txt")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="cannot detect"):
        load(empty)


# ------------------------------------------------------------------ k-core


def test_filter_kcore(tmp_path: Path) -> None:
    # a: 3 clicks, b: 2, d: 2, c: 1. min 2/2: c goes; then u3 (only d left) and u4 (only a) go.
    # One pass, as ComiRec: d is kept although only u1's click of it remains.
    p = write(tmp_path / "log.txt", "u1 a 1\nu1 b 2\nu1 d 3\nu2 a 1\nu2 b 2\nu3 d 1\nu3 c 2\nu4 a 5\n")
    inter = load(p)
    out = filter_kcore(inter, min_item=2, min_user=2)
    assert out.users == ["u1", "u2"] and out.items.raw == ["a", "b", "d"]
    assert raw_seq(out, 0) == ["a", "b", "d"] and out.timestamps[0].tolist() == [1, 2, 3]
    assert out.sequences[0].tolist() == [2, 3, 4]
    assert out.item_side.shape[0] == out.n_items
    assert load(p, min_count=2).users == out.users


@needs_ml
def test_filter_kcore_ml100k(ml: object) -> None:
    out = filter_kcore(ml, 5, 5)
    counts = np.bincount(np.concatenate(ml.sequences), minlength=ml.n_items)
    kept = {ml.items.raw_of(i) for i in range(2, ml.n_items) if counts[i] >= 5}
    assert set(out.items.raw) == kept
    for u in range(0, len(out.users), 97):  # same raw items, same order, same timestamps
        v = ml.users.index(out.users[u])
        mask = np.array([ml.items.raw_of(int(i)) in kept for i in ml.sequences[v]])
        assert raw_seq(out, u) == [r for r, m in zip(raw_seq(ml, v), mask, strict=True) if m]
        assert np.array_equal(out.timestamps[u], ml.timestamps[v][mask])
        assert np.array_equal(out.user_profile[u], ml.user_profile[v])
    i_new = out.items.get("50")
    assert np.array_equal(out.item_side[i_new], ml.item_side[ml.items.get("50")])


# ------------------------------------------------------------------ the real data sets


@pytest.fixture(scope="module")
def ml():
    if not (ML100K / "ml-100k.inter").exists():
        pytest.skip(f"no ml-100k data at {ML100K}")
    return load(ML100K)


@pytest.fixture(scope="module")
def beauty():
    if not (BEAUTY / "Beauty.txt").exists():
        pytest.skip(f"no Beauty data at {BEAUTY}")
    return load(BEAUTY)


def test_shared_data_path() -> None:
    assert DATA.parent.name == "shared" and DATA.name == "data"


@needs_ml
def test_ml100k(ml) -> None:
    assert ml.name == "ml-100k"
    assert len(ml.users) == 943 and ml.n_items == 1682 + 2 and ml.n_interactions == 100_000
    assert all(np.all(np.diff(t) >= 0) for t in ml.timestamps)
    assert ml.user_profile.shape == (943, 4) and np.all(ml.user_profile > 0)
    assert ml.item_side.shape[1] <= 8 and ml.item_side[2:].any(axis=1).all()
    titles = [r for r in ml.side_vocab.raw if r.startswith("movie_title")]
    assert not titles and any(r == "class=Comedy" for r in ml.side_vocab.raw)
    assert ml.n_side == len(ml.side_vocab) and int(ml.item_side.max()) < ml.n_side
    assert int(ml.user_profile.max()) < ml.n_profile
    assert load(ML100K / "ml-100k.inter").items.raw == ml.items.raw


@needs_beauty
def test_beauty(beauty) -> None:
    assert beauty.name == "Beauty"
    assert len(beauty.users) == 22_363 and beauty.n_items == 12_101 + 2 and beauty.n_interactions == 198_502
    assert beauty.timestamps is None and beauty.user_profile.shape == (22_363, 0)
    assert beauty.n_side == 637 + 1 and beauty.item_side.shape == (12_103, 6)
    assert beauty.items.raw_of(int(beauty.sequences[0][0])) == "1"
    first = beauty.items.get("4")
    assert sorted(beauty.side_vocab.raw_of(int(s)) for s in beauty.item_side[first] if s) == [
        "attr=1",
        "attr=2",
        "attr=3",
    ]
    assert all(int(s.min()) >= 2 for s in beauty.sequences)


def test_recbole_item_identifier_fields_are_not_side_ids(tmp_path: Path) -> None:
    d = tmp_path / "shop"
    d.mkdir()
    write(
        d / "shop.inter", "user_id:token\titem_id:token\n" + "".join(f"u{i % 3}\ti{i}\n" for i in range(40))
    )
    rows = "".join(f"i{i}\tName Of {i}\tb{i % 4}\tsku{i}\n" for i in range(40))
    write(d / "shop.item", "item_id:token\titem_name:token_seq\tbrand_name:token\tsku:token\n" + rows)
    inter = load(d)
    assert {r.partition("=")[0] for r in inter.side_vocab.raw} == {"brand_name"}  # sku/name: one per item
    assert inter.n_side == 1 + 4 and inter.timestamps is None
