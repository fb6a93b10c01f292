"""CountMinSketch over an in-process stand-in for KVWorker (sum / assign tables in dicts)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pserver.apps.sketch import countmin
from pserver.apps.sketch.countmin import CountMinSketch
from pserver.apps.sketch.shape import SketchShape
from pserver.errors import ConfigError, DTypeError, TableError


class FakeKV:
    """The KVWorker calls CountMinSketch makes, against tables shared by every FakeKV given the
    same ``tables``; pushes apply at once and are checked as the real worker checks them."""

    def __init__(self, tables: dict | None = None):
        self.tables = {} if tables is None else tables
        self.pushes: list[tuple[str, int]] = []

    def declare_table(self, name, dim=1, dtype="float32", updater="sum", **_):
        spec = (dim, dtype, updater)
        if self.tables.setdefault(name, (spec, {}))[0] != spec:
            raise TableError(f"table {name} declared with another spec")

    def push(self, keys, vals, table):
        (dim, dtype, updater), rows = self.tables[table]
        assert keys.dtype == np.uint64 and np.all(np.diff(keys.astype(float)) > 0)
        assert vals.dtype == np.dtype(dtype)
        vals = vals.reshape(len(keys), dim)
        for k, v in zip(keys.tolist(), vals, strict=True):
            rows[k] = rows.get(k, 0) + v if updater == "sum" else v.copy()
        self.pushes.append((table, len(keys)))
        return len(self.pushes)

    def wait(self, ts):
        return None

    def pull(self, keys, table):
        (dim, _, _), rows = self.tables[table]
        out = np.array([rows.get(k, np.zeros(dim)) for k in keys.tolist()], dtype=np.float64)
        return out.reshape(len(keys), dim) if dim > 1 else out.reshape(len(keys))

    def pull_range(self, table):
        (dim, _, _), rows = self.tables[table]
        keys = np.array(sorted(rows), dtype=np.uint64)
        return keys, self.pull(keys, table).reshape(len(keys), dim)


def _stream(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"w{i}" for i in np.minimum(rng.zipf(1.2, n), 10_000)]


@pytest.mark.parametrize("conservative", [False, True])
def test_two_writers_estimates_and_heavy_hitters(conservative, monkeypatch):
    monkeypatch.setattr(countmin, "PUSH_TOKENS", 5_000)
    monkeypatch.setattr(countmin, "ITEM_BATCH", 3_000)
    tables: dict = {}
    shape = SketchShape.for_error(0.005, 0.01, seed=7)
    a = CountMinSketch(FakeKV(tables), "s", shape, conservative=conservative, share=0.01)
    b = CountMinSketch(FakeKV(tables), "s", shape, conservative=conservative, share=0.01)
    sa, sb = _stream(20_000, 1), _stream(15_000, 2)
    assert a.insert(iter(sa)) == len(sa)
    b.insert_text(" ".join(sb).encode())
    a.flush()
    b.flush()
    reader = CountMinSketch(FakeKV(tables), "s")          # opens it: shape from the servers
    assert reader.shape == shape and reader.conservative == conservative
    truth = Counter(sa + sb)
    items = list(truth)
    est = reader.estimate(items)
    true = np.array([truth[i] for i in items], dtype=float)
    assert reader.total() == len(sa) + len(sb)
    assert np.all(est >= true)
    assert np.mean(est - true > shape.eps * reader.total()) <= shape.delta
    found = {t.decode(): e for t, e in reader.heavy_hitters(0.02)}
    heavy = {i for i, c in truth.items() if c >= 0.02 * reader.total()}
    assert heavy and heavy <= set(found)
    assert all(e >= 0.02 * reader.total() for e in found.values())


def test_small_batches_wait_for_the_push_threshold(monkeypatch):
    kv = FakeKV()
    s = CountMinSketch(kv, "s", SketchShape(2, 64))
    s.insert(["a", "b", "a"])
    assert s.total() == 0 and s.inserted == 3          # aggregated locally, not pushed yet
    s.flush()
    assert s.total() == 3 and s.estimate(["a"])[0] >= 2
    s.flush()                                          # nothing pending: no empty push
    assert sum(1 for t, _ in kv.pushes if t == "s") == 1


def test_large_text_is_counted_in_chunks_cut_between_tokens(monkeypatch):
    import pserver.apps.sketch.text as text
    from pserver.apps.sketch import kernels

    monkeypatch.setattr(text.split, "__defaults__", (10,))
    sizes = []
    tokenize = kernels.tokenize_hash
    monkeypatch.setattr(kernels, "tokenize_hash",
                        lambda buf, fold: sizes.append(buf.size) or tokenize(buf, fold))
    data = b"alpha beta gammadelta " * 50 + b"omega"
    s = CountMinSketch(FakeKV(), "s", SketchShape(3, 4096))
    assert s.insert_text(data) == 151
    s.flush()
    est = s.estimate(["alpha", "gammadelta", "omega", "gamma"])
    assert est.tolist() == [50, 50, 1, 0]   # a wide sketch: exact; no token cut in two
    assert len(sizes) > 50 and max(sizes) <= 10 + len(b"gammadelta")


def test_opening_or_recreating_a_sketch_wrongly_raises():
    tables: dict = {}
    with pytest.raises(TableError, match="no sketch named"):
        CountMinSketch(FakeKV(tables), "missing")
    CountMinSketch(FakeKV(tables), "s", SketchShape(3, 100))
    CountMinSketch(FakeKV(tables), "s", SketchShape(3, 100))          # same shape: joins
    with pytest.raises(TableError, match="exists"):
        CountMinSketch(FakeKV(tables), "s", SketchShape(3, 101))
    with pytest.raises(TableError, match="exists"):
        CountMinSketch(FakeKV(tables), "s", SketchShape(3, 100), conservative=True)


def test_user_mistakes_raise_specific_errors():
    s = CountMinSketch(FakeKV(), "s", SketchShape(2, 64), share=0.01)
    with pytest.raises(DTypeError, match="str or bytes"):
        s.insert(["a", 3])
    with pytest.raises(DTypeError, match="encode"):
        s.insert_text("a str")
    with pytest.raises(DTypeError, match="encode"):
        s.insert_text(np.zeros(4, dtype=np.int64))
    with pytest.raises(ConfigError, match="phi"):
        s.heavy_hitters(0.001)
    with pytest.raises(ConfigError):
        CountMinSketch(FakeKV(), "t", SketchShape(2, 64), share=0)
    assert s.estimate([]).size == 0 and s.heavy_hitters(0.5) == []


def test_a_corrupt_meta_row_is_refused_not_trusted():
    for row in ([np.nan, 10, 0, 0, 0.1], [2, 1e30, 0, 0, 0.1], [2.5, 10, 0, 0, 0.1],
                [2, 10, 0, 3, 0.1], [2, 10, 0, 0, 2.0], [-2, 10, 0, 0, 0.1]):
        kv = FakeKV()
        CountMinSketch(kv, "s", SketchShape(2, 10))
        kv.tables["s_meta"][1][0] = np.array(row)
        with pytest.raises(TableError, match="does not describe a sketch"):
            CountMinSketch(kv, "s")


def test_writers_shard_by_the_job_size_not_by_who_is_connected(tmp_path):
    """A reader connected while the job runs (pserver sketch query) is a live worker too: the
    writers must still split the input by the job's worker count, or a shard goes uncounted."""
    import argparse
    from types import SimpleNamespace

    from pserver.apps.sketch import worker
    from pserver.apps.sketch.text import exact_counts

    path = tmp_path / "t.txt"
    path.write_bytes(b"alpha beta gamma alpha\n" * 500 + b"delta " * 300)
    tables: dict = {}
    args = argparse.Namespace(files=[str(path)], name="s", eps=0.01, delta=0.1, width=None,
                              depth=None, seed=0, conservative=False, share=0.01, top=0.1,
                              check=True, repeat=1, chunk_bytes=256)
    summary = {}
    for rank in (1, 0):
        kv = FakeKV(tables)
        kv.rank, kv.num_workers, kv.num_servers = rank, 3, 2   # 2 writers + 1 reader live
        kv.cfg = SimpleNamespace(num_workers=2)
        kv.barrier = lambda name: None
        summary = worker.run(kv, args)
    assert summary["inserts"] == sum(exact_counts([str(path)]).values())
    assert summary["check"]["below_true"] == 0 and summary["workers"] == 2
    assert "delta" in dict(summary["heavy_hitters"])
    kv.rank = 2  # a third writer in a job of two
    with pytest.raises(ConfigError, match="PSERVER_NUM_WORKERS"):
        worker.run(kv, args)
