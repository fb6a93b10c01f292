"""CountMin kernels, shape, candidates and text shards, without a cluster."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from pserver.apps.sketch import candidates, kernels, text
from pserver.apps.sketch.countmin import item_hashes
from pserver.apps.sketch.shape import SketchShape
from pserver.errors import ConfigError

SAMPLE = (b"The quick brown Fox, the LAZY dog; caf\xc3\xa9 na\xc3\xafve 42x 42x\n"
          b"tab\tseparated-words_and under_scores 3.14 THE end")


def _zipf_items(n: int, vocab: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.3, n), vocab)
    return [b"w%d" % i for i in ids]


def test_tokens_match_the_reference_tokeniser_and_item_hashes():
    buf = np.frombuffer(SAMPLE, dtype=np.uint8)
    hashes, starts, ends = kernels.tokenize_hash(buf, kernels.FOLD)
    toks = [SAMPLE[s:e].lower() for s, e in zip(starts, ends, strict=True)]
    assert toks == text.tokens(SAMPLE)
    assert b"caf\xc3\xa9" in toks and b"the" in toks and b"42x" in toks
    # a token hashes like the same item given directly (lower-case)
    assert np.array_equal(hashes, item_hashes(toks))
    assert item_hashes(["THE"])[0] != item_hashes(["the"])[0]   # items are not folded


def test_warm_up_runs_every_kernel():
    kernels.warm_up()


def test_empty_and_separator_only_input():
    for data in (b"", b" ,;\n\t"):
        hashes, _, _ = kernels.tokenize_hash(np.frombuffer(data, dtype=np.uint8), kernels.FOLD)
        assert hashes.size == 0
    assert kernels.aggregate(np.zeros(0, dtype=np.uint64))[0].size == 0


def test_aggregate_counts_each_distinct_hash_once():
    items = _zipf_items(20_000, 500)
    hashes = item_hashes(items)
    uniq, counts, first = kernels.aggregate(hashes)
    truth = Counter(items)
    assert len(uniq) == len(truth)
    for h, c, f in zip(uniq, counts, first, strict=True):
        assert hashes[f] == h and truth[items[f]] == c
    assert list(first) == sorted(first)  # order of first occurrence


@pytest.mark.parametrize("conservative", [False, True])
def test_estimates_never_below_and_within_eps_n(conservative):
    items = _zipf_items(50_000, 5_000, seed=1)
    shape = SketchShape.for_error(0.01, 0.01, seed=3)
    salts = kernels.row_salts(np.uint64(shape.seed), shape.depth)
    cm = np.zeros(shape.cells)
    local, cu = np.zeros(shape.cells), np.zeros(shape.cells)
    # several batches, as a writer sees them
    for lo in range(0, len(items), 7_000):
        uniq, counts, _ = kernels.aggregate(item_hashes(items[lo:lo + 7_000]))
        kernels.add_counts(uniq, counts, salts, shape.width, cm)
        kernels.add_conservative(uniq, counts, salts, shape.width, local, cu)
    assert np.array_equal(local, cu)  # one writer: its pushes are its sketch
    assert cm.reshape(shape.depth, -1).sum(axis=1) == pytest.approx(len(items))
    assert np.all(cu <= cm)           # conservative update never exceeds plain CountMin
    table = cu if conservative else cm
    truth = Counter(items)
    keys = list(truth)
    cells = kernels.cells(item_hashes(keys), salts, shape.width)
    est = table[cells].min(axis=1)
    true = np.array([truth[k] for k in keys], dtype=float)
    assert np.all(est >= true)
    assert np.mean(est - true > shape.eps * len(items)) <= shape.delta


def test_conservative_sub_sketches_summed_stay_above_the_truth():
    """Two writers, each conservative on its own half: the servers' sum is never below the
    truth (the concurrency argument of docs/sketch.md)."""
    items = _zipf_items(30_000, 3_000, seed=2)
    shape = SketchShape(3, 200)
    salts = kernels.row_salts(np.uint64(0), shape.depth)
    server = np.zeros(shape.cells)
    for part in (items[::2], items[1::2]):
        local, pending = np.zeros(shape.cells), np.zeros(shape.cells)
        for lo in range(0, len(part), 1000):
            uniq, counts, _ = kernels.aggregate(item_hashes(part[lo:lo + 1000]))
            kernels.add_conservative(uniq, counts, salts, shape.width, local, pending)
        server += pending
    truth = Counter(items)
    cells = kernels.cells(item_hashes(list(truth)), salts, shape.width)
    assert np.all(server[cells].min(axis=1) >= np.array(list(truth.values())))


def test_cells_lie_in_their_rows():
    shape = SketchShape(4, 1000)
    cells = kernels.cells(item_hashes([b"a", b"b", b"c"]), kernels.row_salts(np.uint64(0), 4),
                          shape.width)
    assert np.array_equal(cells // shape.width, np.tile(np.arange(4), (3, 1)))
    other = kernels.cells(item_hashes([b"a"]), kernels.row_salts(np.uint64(1), 4), shape.width)
    assert not np.array_equal(cells[0], other[0])  # the seed changes the hashes


def test_shape_from_error_and_its_bound():
    s = SketchShape.for_error(1e-3, 0.01)
    assert (s.depth, s.width) == (math.ceil(math.log(100)), math.ceil(math.e * 1000))
    assert s.eps <= 1e-3 and s.delta <= 0.01
    assert s.total_key == s.depth * s.width
    assert "eps*N" in s.bound(1000)
    for bad in (dict(eps=0, delta=0.1), dict(eps=0.1, delta=1), dict(eps=-1, delta=0.5)):
        with pytest.raises(ConfigError):
            SketchShape.for_error(**bad)
    for bad in ((0, 10), (2, 0), (2, True), (1 << 17, 1 << 17)):
        with pytest.raises(ConfigError):
            SketchShape(*bad)


def test_candidate_rows_round_trip():
    items = [b"the", b"", "caf\u00e9".encode(), bytes(range(256))[:48], b"x" * 49]
    back = candidates.decode(candidates.encode(items))
    assert back[:4] == items[:4]
    assert back[4] == b"x" * 48 + b"..."


def test_malformed_candidate_rows_decode_to_a_marker():
    rows = candidates.encode([b"ok", b"ok"])
    rows[0, 1] = -1.0
    rows[1, 0] = np.nan
    assert candidates.decode(rows) == [b"?", b"?"]


def test_every_item_above_the_share_is_a_candidate_of_some_batch():
    """The pigeonhole argument of candidates.py, on a stream cut into uneven batches."""
    items = _zipf_items(40_000, 2_000, seed=4)
    share = 0.01
    truth = Counter(items)
    picked: set[bytes] = set()
    cuts = [0, 123, 5_000, 5_001, 22_222, 40_000]
    for lo, hi in itertools.pairwise(cuts):
        batch = items[lo:hi]
        hashes = item_hashes(batch)
        _, counts, first = kernels.aggregate(hashes)
        picked.update(batch[first[j]] for j in candidates.select(counts, len(batch), share))
    heavy = {k for k, c in truth.items() if c >= share * len(items)}
    assert heavy and heavy <= picked


@pytest.mark.parametrize("shards,chunk", [(1, 1 << 20), (3, 7), (4, 64), (7, 5)])
def test_shards_and_chunks_cover_every_token_once(tmp_path, shards, chunk):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_bytes((SAMPLE + b"\n") * 5)
    b.write_bytes(b"averyveryverylongtokenwithoutanyseparator" * 3 + b" x")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    paths = [str(a), str(empty), str(b)]
    got: Counter = Counter()
    for r in range(shards):
        for c in text.shard_chunks(paths, r, shards, chunk_bytes=chunk):
            got.update(text.tokens(c.tobytes()))
    assert got == text.exact_counts(paths)
    assert got[b"the"] == 15


def test_shards_refuse_a_missing_file_or_rank(tmp_path):
    with pytest.raises(ConfigError):
        list(text.shard_chunks([str(tmp_path / "nope")]))
    with pytest.raises(ConfigError):
        list(text.shard_chunks([], rank=2, num_shards=2))


def test_pull_then_max_conservative_update_loses_counts_under_concurrency():
    """Why --conservative is per writer (docs/sketch.md): two writers that read the shared cells,
    then push max(cell, min + count), both adding x once, leave x's estimate below its count;
    the per-writer sub-sketches summed (what CountMinSketch does) do not."""
    shape = SketchShape(3, 50)
    salts = kernels.row_salts(np.uint64(0), shape.depth)
    x = item_hashes([b"x"])
    shared = np.zeros(shape.cells)
    cells = kernels.cells(x, salts, shape.width)[0]
    seen = [shared[cells].copy() for _ in range(2)]         # both read before either writes
    for s in seen:
        np.maximum.at(shared, cells, s.min() + 1.0)         # the "max" rule on the servers
    assert shared[cells].min() == 1.0                        # true count is 2
    summed = np.zeros(shape.cells)
    for _ in range(2):
        local, pending = np.zeros(shape.cells), np.zeros(shape.cells)
        kernels.add_conservative(x, np.ones(1), salts, shape.width, local, pending)
        summed += pending
    assert summed[cells].min() == 2.0
