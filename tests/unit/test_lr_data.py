"""Feature hashing, the libsvm/Criteo readers, sharding and the data generator of the LR app."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from pserver.apps.lr import gen
from pserver.apps.lr.data import plan_shards, read_ranges, read_shard
from pserver.apps.lr.hashing import column_salt, int_keys, mix64, str_keys
from pserver.errors import ConfigError, DataFormatError

M64 = (1 << 64) - 1


# -- a pure-Python reference of the documented hash spec -----------------------------------------
def ref_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_salt(c: int) -> int:
    return ref_mix(((c + 1) * 0x9E3779B97F4A7C15) & M64)


def ref_fnv(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & M64
    return h


def ref_int_key(v: int, c: int) -> int:
    return ref_mix((v & M64) ^ ref_salt(c))


def ref_str_key(s: str, c: int) -> int:
    return ref_mix(ref_fnv(s.encode()) ^ ref_salt(c))


# -- hashing ------------------------------------------------------------------------------------
def test_hash_pinned_values():
    # Pinned forever: changing these breaks every saved model (bump HASH_SPEC instead).
    assert int_keys([0, 1, -1], 0).tolist() == [
        5197578548964807871, 11385487063155714807, 17492683508065611904]
    assert str_keys(["", "a", "68fd1e64", "é"], 14).tolist() == [
        15907020142385076111, 7683382115375195298, 2053384913911395641, 2871009230833122475]
    assert int(column_salt(0)) == 16294208416658607535
    assert mix64(np.array([0, 1], np.uint64)).tolist() == [0, 6238072747940578789]


def test_hash_matches_reference_spec():
    rng = np.random.default_rng(3)
    vals = rng.integers(-(1 << 62), 1 << 62, 200)
    for c in (0, 1, 13, 39):
        assert int_keys(vals, c).tolist() == [ref_int_key(int(v), c) for v in vals]
    words = ["", "x", "05db9164", "naïve", "日本", "a" * 100]
    assert str_keys(words, 20).tolist() == [ref_str_key(w, 20) for w in words]


def test_int_keys_are_a_bijection_and_columns_differ():
    keys = int_keys(np.arange(1_000_000), 0)
    assert np.unique(keys).size == keys.size
    assert not np.array_equal(int_keys(np.arange(100), 1), int_keys(np.arange(100), 2))
    # hashed keys spread over the key space: every eighth of it gets about 1/8 of the keys
    counts = np.bincount((keys >> np.uint64(61)).astype(np.int64), minlength=8)
    assert counts.min() > 0.95 * keys.size / 8


# -- libsvm ---------------------------------------------------------------------------------------
def write(tmp_path, name: str, text: str | bytes) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def dense(shard) -> dict:
    """{(row, key): value} of a shard."""
    X = shard.X.tocoo()
    return {(int(r), int(shard.keys[c])): float(v) for r, c, v in zip(X.row, X.col, X.data)}


def test_libsvm_parse_values_labels_comments(tmp_path):
    text = ("# a comment line\n"
            "1 3:1 10:0.5\n"
            "\n"
            "-1 3:2.5e-1 7:-4 # trailing comment\r\n"
            "0 12:1E2\t5:+3.25\n"
            "+1 1:0.000123456789\n"
            "1.0\n")                      # a line with no features is a valid example
    path = write(tmp_path, "a.svm", text)
    s = read_shard(path)
    assert s.y.tolist() == [1, -1, -1, 1, 1]
    assert s.X.shape == (5, 6)
    assert np.all(np.diff(s.keys.astype(object)) > 0)       # columns sorted by key
    k = lambda i: int(int_keys([i], 0)[0])                  # noqa: E731
    want = {(0, k(3)): 1.0, (0, k(10)): 0.5, (1, k(3)): 0.25, (1, k(7)): -4.0,
            (2, k(12)): 100.0, (2, k(5)): 3.25, (3, k(1)): 0.000123456789}
    got = dense(s)
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert math.isclose(got[key], v, rel_tol=1e-6)
    raw = read_shard(path, raw_keys=True)
    assert raw.keys.tolist() == [1, 3, 5, 7, 10, 12]


def test_libsvm_duplicate_index_adds_up(tmp_path):
    s = read_shard(write(tmp_path, "d.svm", "1 4:1 4:2 9:1\n-1 4:1\n"), raw_keys=True)
    assert dense(s) == {(0, 4): 3.0, (0, 9): 1.0, (1, 4): 1.0}


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_reader_grows_its_buffers_past_a_short_guess(tmp_path, chunk_bytes):
    # Room is guessed from the byte count (a row per 64 bytes, an entry per 8): many 2-byte lines
    # and one line of 3000 features both overflow the guess, so the parser stops and resumes.
    lines = ["1"] * 3000 + ["-1 " + " ".join(f"{i}:{i % 7 + 1}" for i in range(3000))] + ["1 5:1"]
    path = write(tmp_path, "grow.svm", "\n".join(lines) + "\n")
    s = read_shard(path, raw_keys=True, chunk_bytes=chunk_bytes)
    assert s.num_examples == 3002 and s.y[3000] == -1 and s.X.nnz == 3001
    assert dense(s) == {**{(3000, i): float(i % 7 + 1) for i in range(3000)}, (3001, 5): 1.0}
    cats = [f"c{i}" for i in range(26)]
    crit = write(tmp_path, "grow.tsv", "".join(criteo_line(i % 2, [i] * 13, cats) + "\n"
                                               for i in range(500)))
    c = read_shard(crit, "criteo", chunk_bytes=chunk_bytes)
    assert c.num_examples == 500 and c.X.nnz == 500 * 39 and c.y.sum() == 0


@pytest.mark.parametrize("line,reason", [
    ("2 1:1", "label must be -1, 0, +1 or 1"),
    ("abc 1:1", "label is not a number"),
    ("1 x:1", "feature must be idx:value"),
    ("1 -3:1", "feature must be idx:value"),
    ("1 3", "feature must be idx:value"),
    ("1 3:", "feature value is not a number"),
    ("1 3:1.5.2", "feature value is not a number"),
])
def test_libsvm_malformed_line_names_file_and_line(tmp_path, line, reason):
    lines = [f"{1 if i % 2 else -1} {i}:1" for i in range(40)]
    lines[27] = line
    path = write(tmp_path, "bad.svm", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as e:
        read_shard(path, chunk_bytes=64)   # small chunks: the line number must survive chunking
    assert f"{path}:28: {reason}" in str(e.value)
    s = read_shard(path, skip_bad=True, chunk_bytes=64)
    assert s.skipped == 1 and s.num_examples == 39


def test_bad_line_number_in_a_later_shard(tmp_path):
    lines = [f"1 {i}:1" for i in range(1000)]
    lines[901] = "1 oops"
    path = write(tmp_path, "late.svm", "\n".join(lines) + "\n")
    read_shard(path, rank=0, num_workers=2)              # the first half is fine
    with pytest.raises(DataFormatError, match=r"late.svm:902: "):
        read_shard(path, rank=1, num_workers=2, chunk_bytes=100)


# -- criteo ---------------------------------------------------------------------------------------
def criteo_line(label, ints, cats) -> str:
    return "\t".join([str(label)] + ["" if v is None else str(v) for v in ints] +
                     ["" if c is None else c for c in cats])


def test_criteo_keys_bins_and_missing(tmp_path):
    ints = [0, -1, 2, 3, 1000, None] + [5] * 7
    cats = ["68fd1e64", None, "80e26c9b"] + ["a1b2c3d4"] * 23
    path = write(tmp_path, "c.tsv", criteo_line(1, ints, cats) + "\n" +
                 criteo_line(0, [None] * 13, [None] * 26) + "\r\n")
    s = read_shard(path, "criteo")
    assert s.y.tolist() == [1, -1]
    bins = {0: 0, -1: -1, 2: 2, 3: 3 + math.floor(math.log(3) ** 2),
            1000: 3 + math.floor(math.log(1000) ** 2), 5: 3 + math.floor(math.log(5) ** 2)}
    want = {ref_int_key(bins[v], c + 1) for c, v in enumerate(ints) if v is not None}
    want |= {ref_str_key(x, 14 + c) for c, x in enumerate(cats) if x is not None}
    assert {k for (r, k) in dense(s)} == want and len(dense(s)) == 12 + 25
    assert s.X[1].nnz == 0
    raw = read_shard(path, "criteo", int_bins="raw")
    assert ref_int_key(1000, 5) in set(raw.keys.tolist())


@pytest.mark.parametrize("line,reason", [
    ("1\t2\t3", "expected 40 tab-separated fields"),
    (criteo_line(2, [1] * 13, ["a"] * 26), "label must be 0 or 1"),
    (criteo_line(1, [1] * 12 + ["x7"], ["a"] * 26), "integer column is not an integer"),
    (criteo_line(1, [1] * 13, ["a"] * 26) + "\textra", "expected 40 tab-separated fields"),
])
def test_criteo_malformed(tmp_path, line, reason):
    good = criteo_line(0, [1] * 13, ["a"] * 26)
    path = write(tmp_path, "c.tsv", "\n".join([good, good, line, good]) + "\n")
    with pytest.raises(DataFormatError, match=f":3: {reason}"):
        read_shard(path, "criteo")
    assert read_shard(path, "criteo", skip_bad=True).skipped == 1


# -- sharding -------------------------------------------------------------------------------------
def make_files(tmp_path, sizes: list[int], seed: int = 0) -> tuple[list[str], int]:
    """Files of lines of random length; line number n carries feature `n:1` (raw key n)."""
    rng = np.random.default_rng(seed)
    paths, n = [], 0
    for f, size in enumerate(sizes):
        lines = []
        for _ in range(size):
            pad = " ".join(f"{1_000_000 + j}:0" for j in range(int(rng.integers(0, 6))))
            lines.append(f"{1 if n % 3 else -1} {n}:1 {pad}".rstrip())
            n += 1
        text = "\n".join(lines) + ("\n" if f % 2 == 0 else "")   # odd files: no final newline
        paths.append(write(tmp_path, f"part{f}.svm", text))
    return paths, n


def example_ids(shard) -> list[int]:
    X = shard.X.tocoo()
    keep = shard.keys[X.col] < 1_000_000
    ones = X.data[keep] == 1
    return sorted(int(k) for k in shard.keys[X.col[keep][ones]])


@pytest.mark.parametrize("split", ["bytes", "file"])
def test_every_example_read_exactly_once(tmp_path, split):
    paths, n = make_files(str(tmp_path), [1, 37, 0, 250, 3])
    for workers in [1, 2, 3, 4, 5, 7, 9, 16, 40]:
        seen = []
        for rank in range(workers):
            s = read_shard(paths, rank=rank, num_workers=workers, split=split, raw_keys=True,
                           chunk_bytes=97)
            assert s.num_examples == len(example_ids(s))
            seen += example_ids(s)
        assert sorted(seen) == list(range(n)), f"{workers} workers, split={split}"


def test_byte_split_is_balanced_and_file_split_keeps_files(tmp_path):
    paths, _ = make_files(str(tmp_path), [400, 400])
    plan = plan_shards(paths, 4, "bytes")
    sizes = [sum(r.end - r.start for r in p) for p in plan]
    assert max(sizes) - min(sizes) <= 1
    plan = plan_shards(paths, 4, "file")
    assert sorted(len(p) for p in plan) == [0, 0, 1, 1]
    assert all(r.start == 0 and r.end == os.path.getsize(r.path) for p in plan for r in p)
    with pytest.raises(ConfigError, match="does not exist"):
        plan_shards([paths[0], "/nonexistent.svm"], 2)
    assert read_ranges([], "libsvm").num_examples == 0


def test_columns_in_key_range(tmp_path):
    s = read_shard(write(tmp_path, "r.svm", "1 5:1 9:1 100:1\n-1 7:1 9:1\n"), raw_keys=True)
    assert s.keys.tolist() == [5, 7, 9, 100]
    assert s.columns_in(6, 10) == (1, 3) and s.columns_in(0, None) == (0, 4)
    assert s.columns_in(101, None) == (4, 4)


# -- generator ------------------------------------------------------------------------------------
def test_generator_properties(tmp_path):
    out = str(tmp_path / "g")
    meta = gen.generate(out, 5000, features=1 << 12, nnz=30, noise=0.1, seed=5, vw=True)
    assert json.loads(Path(out, "meta.json").read_text())["examples"] == 5000
    train = read_shard(os.path.join(out, "train.libsvm"), raw_keys=True)
    test = read_shard(os.path.join(out, "test.libsvm"), raw_keys=True)
    assert train.num_examples == 5000 and test.num_examples == meta["test_examples"] == 1000
    row_nnz = np.diff(train.X.tocsr().indptr)
    assert row_nnz.max() <= 30 and row_nnz.mean() > 20          # duplicates removed
    assert train.keys.max() < 1 << 12 and np.all(train.X.data == 1)
    # power law: the most frequent id is in most examples, the median id in few
    freq = np.sort(np.diff(train.X.indptr))[::-1]
    assert freq[0] > 0.3 * 5000 and np.median(freq) < 0.01 * 5000
    # same seed, same bytes; the VW copy has the same examples
    gen.generate(str(tmp_path / "g2"), 5000, features=1 << 12, nnz=30, noise=0.1, seed=5)
    assert Path(out, "train.libsvm").read_bytes() == (tmp_path / "g2" / "train.libsvm").read_bytes()
    first = Path(out, "train.vw").read_text().split("\n")[0].split()
    svm = Path(out, "train.libsvm").read_text().split("\n")[0].split()
    assert first[0] == svm[0] and first[1] == "|f" and first[2:] == svm[1:]
    # the truth is sparse, keyed like the reader, and explains the labels
    truth = np.load(os.path.join(out, "truth.npz"))
    assert truth["keys"].tolist() == int_keys(truth["ids"], 0).tolist()
    assert 0.05 < truth["ids"].size / (1 << 12) < 0.15
    w = dict(zip(truth["ids"].tolist(), truth["weights"].tolist()))
    margin = test.X @ np.array([w.get(int(k), 0.0) for k in test.keys])
    agree = np.mean(np.sign(margin) == test.y)
    assert 0.57 < agree < 0.9                     # signal (~0.65 alone), 10% flipped labels


def test_bias_adds_one_constant_column(tmp_path):
    from pserver.apps.lr.data import BIAS_KEY

    assert BIAS_KEY == str_keys(["bias"], 0)[0] == ref_str_key("bias", 0)
    s = read_shard(write(tmp_path, "b.svm", "1 5:2\n-1 7:1\n"), raw_keys=True, bias=True)
    assert BIAS_KEY in set(s.keys.tolist()) and np.all(np.diff(s.keys.astype(object)) > 0)
    col = int(np.searchsorted(s.keys, BIAS_KEY))
    assert s.X[:, col].toarray().ravel().tolist() == [1.0, 1.0]
    assert dense(s)[(0, 5)] == 2.0 and s.X.nnz == 4


@pytest.mark.parametrize("case", ["hashed", "binary", "small", "shared_top_bits", "empty"])
@pytest.mark.parametrize("chunks,estimate", [(1, 1.0), (7, 1.0), (7, 0.05), (7, 30.0)])
def test_column_builder_equals_a_stable_argsort(case, chunks, estimate):
    # chunks: how the entries are handed over; estimate: the expected total as a multiple of the
    # truth (0.05: the regions overflow and the columns cannot be written in place)
    from pserver.apps.lr.columns import ColumnBuilder

    rng = np.random.default_rng(0)
    n = 0 if case == "empty" else 50_000
    keys = {"hashed": lambda: rng.integers(0, 1 << 63, n).astype(np.uint64) | np.uint64(1 << 63),
            "binary": lambda: rng.integers(0, 1 << 20, n).astype(np.uint64) << np.uint64(44),
            "small": lambda: rng.integers(0, 1000, n).astype(np.uint64),
            # distinct keys equal in the radix-sorted top bits: the merge-sort fix-up orders them
            "shared_top_bits": lambda: (rng.integers(0, 50, n).astype(np.uint64) << np.uint64(40))
            + rng.integers(0, 3, n).astype(np.uint64),
            "empty": lambda: np.zeros(0, np.uint64)}[case]()
    row_nnz = np.full(n // 10, 10)
    vals = np.ones(n, np.float32) if case == "binary" else rng.random(n).astype(np.float32)
    b = ColumnBuilder()
    cuts = np.linspace(0, row_nnz.size, chunks + 1).astype(int)
    for r0, r1 in itertools.pairwise(cuts):
        e0, e1 = 10 * r0, 10 * r1
        b.add(keys[e0:e1].copy(), None if case == "binary" else vals[e0:e1].copy(),
              row_nnz[r0:r1], int(r0), int(n * estimate))
    X, uniq = b.finish(row_nnz.size)
    order = np.argsort(keys, kind="stable")
    k, rows = keys[order], np.repeat(np.arange(row_nnz.size), row_nnz)[order]
    assert np.array_equal(uniq, np.unique(keys))
    if case in ("small", "shared_top_bits"):   # repeated keys in a row: summed
        ref = sp.csc_matrix((vals, (np.repeat(np.arange(row_nnz.size), row_nnz),
                                    np.searchsorted(uniq, keys))), shape=X.shape)
        assert abs(X - ref).max() < 1e-5 if n else X.nnz == 0
        return
    assert np.array_equal(X.indices, rows) and np.array_equal(X.data, vals[order])
    assert np.array_equal(X.indptr, [*np.searchsorted(k, uniq).tolist(), n])
