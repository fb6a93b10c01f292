"""The server store: hash index, tables, updaters, initializers, table specs."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.errors import TableError, ValueShapeError
from pserver.store import FunctionUpdater, TableSpec, initial_values, make_updater
from pserver.store.index import HashIndex
from pserver.store.spec import MAX_DIM
from pserver.store.table import RUN_MIN, SLICE_MIN, Table
from pserver.store.updaters import Updater, register_updater

MAX_KEY = 2**64 - 1
U64 = np.uint64


def keys_of(*ks: int) -> np.ndarray:
    return np.array(sorted(ks), dtype=U64)


def sorted_unique(a: np.ndarray) -> np.ndarray:
    # np.unique is hash-based in numpy 2.4 and ~70x slower than this on millions of uint64
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))]


def rand_keys(rng: np.random.Generator, n: int, high: int = MAX_KEY) -> np.ndarray:
    return sorted_unique(rng.integers(0, high, size=n, dtype=U64, endpoint=True))


# ---- reference update rules, written independently of pserver.store.updaters -----------------

def ref_step(name: str, args: dict, w: np.ndarray, st: np.ndarray | None, p: np.ndarray):
    """One update of rows w (n, d) with state st and pushed p, in float64; returns (w, st)."""
    w, p = w.astype(np.float64), p.astype(np.float64)
    st = None if st is None else st.astype(np.float64)
    d = w.shape[1]
    if name == "sum":
        return w + p, st
    if name == "assign":
        return p.copy(), st
    if name == "sgd":
        return w - args["lr"] * p, st
    if name == "adagrad":
        n = st + p**2
        return w - args["lr"] * p / np.sqrt(n + args.get("eps", 1e-8)), n
    if name == "ftrl":
        a, b = args["alpha"], args.get("beta", 1.0)
        l1, l2 = args.get("l1", 0.0), args.get("l2", 0.0)
        z, n = st[:, :d].copy(), st[:, d:].copy()
        out = np.empty_like(w)
        for idx in np.ndindex(*w.shape):
            g = p[idx]
            sigma = (np.sqrt(n[idx] + g * g) - np.sqrt(n[idx])) / a
            z[idx] += g - sigma * w[idx]
            n[idx] += g * g
            if abs(z[idx]) <= l1:
                out[idx] = 0.0
            else:
                out[idx] = -(z[idx] - np.sign(z[idx]) * l1) / ((b + np.sqrt(n[idx])) / a + l2)
        return out, np.hstack([z, n])
    if name == "adam":   # row-wise: each row's own step count t (state column 2d)
        b1, b2 = args["beta1"], args["beta2"]
        m, v, tb = st[:, :d].copy(), st[:, d:2 * d].copy(), st[:, 2 * d:].copy()
        tb[:, 0] += 1
        t = tb[:, :1]
        m = b1 * m + (1 - b1) * p
        v = b2 * v + (1 - b2) * p * p
        out = w - args["lr"] * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + args["eps"])
        return out, np.hstack([m, v, tb])
    if name == "l1_prox":
        l1, l2, eta = args["l1"], args.get("l2", 0.0), args.get("eta", 1.0)
        g, u = p[:, :d], p[:, d:] / eta
        out = w.copy()
        for idx in np.ndindex(*w.shape):
            den = u[idx] + l2
            if den != 0:
                x = u[idx] * w[idx] - g[idx]
                out[idx] = np.sign(x) * max(abs(x) - l1, 0.0) / den
        return out, st
    raise AssertionError(name)


UPDATERS = [
    ("sum", {}),
    ("assign", {}),
    ("sgd", {"lr": 0.3}),
    ("adagrad", {"lr": 0.5, "eps": 1e-6}),
    ("adam", {"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6}),
    ("ftrl", {"alpha": 0.5, "beta": 1.0, "l1": 0.4, "l2": 0.1}),
    ("l1_prox", {"l1": 0.3, "l2": 0.2, "eta": 2.0}),
]


def pushed_for(spec: TableSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    p = rng.normal(size=(n, spec.push_cols))
    if spec.updater == "l1_prox":        # curvature column block must be >= 0
        p[:, spec.dim:] = np.abs(p[:, spec.dim:]) * 3
    return p.astype(spec.dtype)


@pytest.mark.parametrize("name,args", UPDATERS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_updaters_match_reference(name, args, dtype):
    rng = np.random.default_rng(1)
    spec = TableSpec(dim=3, dtype=dtype, init="uniform:1", seed=5, updater=name,
                     updater_args=args)
    table = Table(spec, capacity=16)
    keys = rand_keys(rng, 200)
    updater = make_updater(name, args)
    w = initial_values(spec, keys).astype(np.float64)
    st = np.zeros((keys.size, 3 * updater.state_factor)) if updater.state_factor else None
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == "float64" else {"rtol": 2e-4, "atol": 1e-5}
    for _ in range(4):
        sub = np.sort(rng.choice(keys.size, size=120, replace=False))  # new and old keys mixed
        p = pushed_for(spec, rng, sub.size)
        table.push(keys[sub], p)
        w_sub, st_sub = ref_step(name, args, w[sub], None if st is None else st[sub], p)
        w[sub] = w_sub
        if st is not None:
            st[sub] = st_sub
    np.testing.assert_allclose(table.pull(keys), w, **tol)    # includes never-pushed keys
    if st is not None:
        k, _, state = table.items()
        np.testing.assert_allclose(state, st[np.searchsorted(keys, k)], **tol)


@pytest.mark.parametrize("name,args", UPDATERS)
def test_numpy_rules_match_reference(name, args):
    """Updater.apply (what a subclass or a Python path runs) against the same reference."""
    rng = np.random.default_rng(2)
    spec = TableSpec(dim=3, dtype="float64", updater=name, updater_args=args)
    updater = make_updater(name, args)
    w = rng.normal(size=(50, 3))
    st = np.zeros((50, 3 * updater.state_factor)) if updater.state_factor else None
    for _ in range(3):
        p = pushed_for(spec, rng, 50).astype(np.float64)
        want_w, want_st = ref_step(name, args, w, st, p)
        updater.apply(w, st, p)
        np.testing.assert_allclose(w, want_w, rtol=1e-12, atol=1e-12)
        if st is not None:
            np.testing.assert_allclose(st, want_st, rtol=1e-12, atol=1e-12)


def test_l1_prox_leaves_w_where_curvature_plus_l2_is_zero():
    spec = TableSpec(dim=2, dtype="float64", init="constant:0.7", updater="l1_prox",
                     updater_args={"l1": 0.1})
    table = Table(spec)
    k = keys_of(3)
    table.push(k, np.array([[1.0, 0.5, 0.0, 2.0]]))    # [g0, g1, u0, u1]
    x = 2.0 * 0.7 - 0.5
    np.testing.assert_allclose(table.pull(k), [[0.7, (x - 0.1) / 2.0]])


def test_ftrl_l1_zeroes_small_weights():
    spec = TableSpec(dtype="float64", updater="ftrl", updater_args={"alpha": 1.0, "l1": 10.0})
    table = Table(spec)
    k = keys_of(1, 2)
    table.push(k, np.array([[0.5], [30.0]]))
    w = table.pull(k)
    assert w[0, 0] == 0.0                              # |z| = 0.5 <= l1
    assert w[1, 0] == pytest.approx(-(30.0 - 10.0) / ((1.0 + 30.0) / 1.0))


def test_function_updater_and_custom_registry():
    def halve_then_add(w, pushed):
        w *= 0.5
        w += pushed
    table = Table(TableSpec(dtype="float64", init="constant:4"),
                  updater=FunctionUpdater(halve_then_add))
    k = keys_of(7, 9)
    table.push(k, np.array([[1.0], [2.0]]))
    np.testing.assert_array_equal(table.pull(k), [[3.0], [4.0]])

    class Scale(Updater):
        def __init__(self, factor: float):
            self.factor = factor

        def apply(self, w, state, pushed):
            w[...] = self.factor * pushed
    register_updater("test_scale", Scale, replace=True)
    t2 = Table(TableSpec(dtype="float64", updater="test_scale", updater_args={"factor": 3}))
    t2.push(k, np.array([[1.0], [2.0]]))
    np.testing.assert_array_equal(t2.pull(k), [[3.0], [6.0]])
    with pytest.raises(TableError):
        register_updater("sum", Scale)


# ---- tables ----------------------------------------------------------------------------------

def test_missing_keys_read_initial_values_and_are_not_inserted():
    spec = TableSpec(dim=4, init="normal:0.1", seed=3)
    table = Table(spec)
    k = keys_of(0, 10, MAX_KEY)
    np.testing.assert_array_equal(table.pull(k), initial_values(spec, k))
    assert len(table) == 0
    table.push(keys_of(10), np.ones((1, 4), np.float32))
    got = table.pull(k)
    np.testing.assert_array_equal(got[[0, 2]], initial_values(spec, keys_of(0, MAX_KEY)))
    np.testing.assert_allclose(got[1], initial_values(spec, keys_of(10))[0] + 1, rtol=1e-6)
    assert len(table) == 1


def test_extreme_keys():
    table = Table(TableSpec(dtype="float64"))
    k = keys_of(0, 1, MAX_KEY - 1, MAX_KEY)
    table.push(k, np.array([[1.0], [2.0], [3.0], [4.0]]))
    table.push(keys_of(0, MAX_KEY), np.array([[10.0], [40.0]]))
    np.testing.assert_array_equal(table.pull(k).ravel(), [11, 2, 3, 44])
    keys, rows = table.range_items(MAX_KEY - 1, 2**64)
    np.testing.assert_array_equal(keys, keys_of(MAX_KEY - 1, MAX_KEY))
    np.testing.assert_array_equal(rows.ravel(), [3, 44])
    assert table.remove(keys_of(0, MAX_KEY, 5)) == 2
    np.testing.assert_array_equal(table.pull(k).ravel(), [0, 2, 3, 0])


def test_growth_to_millions_of_keys():
    rng = np.random.default_rng(2)
    keys = rand_keys(rng, 2_000_000)
    vals = (keys % U64(1000)).astype(np.float32)[:, None]
    table = Table(TableSpec(), capacity=16)
    perm = rng.permutation(keys.size)
    for part in np.array_split(perm, 4):          # batches in random key order overall
        part = np.sort(part)
        table.push(keys[part], vals[part])
    assert len(table) == keys.size
    assert table._index.n_buckets >= 2 * keys.size
    np.testing.assert_array_equal(table.pull(keys), vals)
    is_gone = np.zeros(keys.size, dtype=bool)
    is_gone[::3] = True
    gone, left = keys[is_gone], keys[~is_gone]
    assert table.remove(gone) == gone.size
    np.testing.assert_array_equal(table.pull(left), vals[~is_gone])
    np.testing.assert_array_equal(table.pull(gone), np.zeros((gone.size, 1)))
    assert len(table) == left.size


def test_hash_index_against_dict_model():
    """Random inserts/removes with many resizes and probe clusters (backward-shift deletion)."""
    rng = np.random.default_rng(3)
    index = HashIndex(capacity=4)
    model: dict[int, int] = {}
    universe = rng.integers(0, MAX_KEY, size=3000, dtype=U64, endpoint=True)
    next_slot = 0
    for _ in range(60):
        cand = np.unique(rng.choice(universe, size=rng.integers(1, 200)))
        present = np.array([int(k) in model for k in cand])
        if rng.random() < 0.6:
            new = cand[~present]
            slots = np.arange(next_slot, next_slot + new.size)
            next_slot += new.size
            index.insert(new, slots)
            model.update(zip(map(int, new), map(int, slots)))
        else:
            freed = index.remove(cand)
            expect = sorted(model.pop(int(k)) for k in cand[present])
            assert sorted(freed.tolist()) == expect
        assert len(index) == len(model)
        got, missing = index.lookup(universe)
        want = np.array([model.get(int(k), -1) for k in universe])
        np.testing.assert_array_equal(got, want)
        assert missing == int((want < 0).sum())
    k, s = index.scan(0, MAX_KEY)
    assert dict(zip(map(int, k), map(int, s))) == model


def test_wrong_pushed_shape_raises():
    table = Table(TableSpec(dim=2, updater="l1_prox", updater_args={"l1": 0.0}))
    assert table.push_cols == 4
    with pytest.raises(ValueShapeError):
        table.push(keys_of(1, 2), np.ones((2, 2)))
    with pytest.raises(ValueShapeError):
        table.push_runs(np.array([0], U64), np.array([3]), np.ones((2, 4)))


# ---- runs fast path --------------------------------------------------------------------------

def expand(starts, lengths):
    return np.concatenate([np.arange(n, dtype=U64) + U64(s) for s, n in zip(starts, lengths)])


@pytest.mark.parametrize("name,args", UPDATERS)
def test_runs_equal_key_lists(name, args):
    rng = np.random.default_rng(4)
    spec = TableSpec(dim=2, dtype="float64", init="uniform:0.5", updater=name, updater_args=args)
    by_runs, by_keys = Table(spec), Table(spec)
    batches = [
        ([0], [5000]),                             # new long run -> registered
        ([0], [5000]),                             # fully covered -> one slice
        ([10, 200, 4000], [100, 3000, 1000]),      # covered: small gather + big slices
        ([4990, 6000, 9000], [20, 70, 3]),         # partly covered, new run, short new run
        ([100, 6010, 7000], [SLICE_MIN + 5, 50, 2000]),
        ([2**64 - 100], [100]),                    # run ending at the largest key
    ]
    for starts, lengths in batches:
        starts, lengths = np.array(starts, U64), np.array(lengths)
        k = expand(starts, lengths)
        p = pushed_for(spec, rng, k.size)
        by_runs.push_runs(starts, lengths, p)
        by_keys.push(k, p)
        # the two paths' compiled kernels may round differently (FMA) near zero: atol for that
        np.testing.assert_allclose(by_runs.pull_runs(starts, lengths), by_keys.pull(k),
                                   rtol=1e-12, atol=1e-15)
    a, b = by_runs.items(), by_keys.items()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12)
    if a[2] is not None:
        np.testing.assert_allclose(a[2], b[2], rtol=1e-12)


def test_covered_runs_do_no_hash_lookups(monkeypatch):
    table = Table(TableSpec(dtype="float64"))
    starts, lengths = np.array([0], U64), np.array([100_000])
    table.push_runs(starts, lengths, np.ones((100_000, 1)))
    table.push_runs(np.array([100_000], U64), np.array([RUN_MIN]), np.ones((RUN_MIN, 1)))
    assert len(table.runs) == 1                     # adjacent runs merged into one slice
    assert int(table.runs.last[0]) == 100_000 + RUN_MIN - 1

    def no_lookup(keys):
        raise AssertionError("covered run went through the hash index")
    monkeypatch.setattr(table._index, "lookup", no_lookup)
    table.push_runs(np.array([0, 50_000], U64), np.array([10, 50_000 + RUN_MIN]),
                    np.ones((50_010 + RUN_MIN, 1)))
    out = table.pull_runs(np.array([0, 9, 49_999], U64), np.array([2, 2, 3]))
    np.testing.assert_array_equal(out.ravel(), [2, 2, 2, 1, 1, 2, 2])


def test_key_list_of_dense_ids_registers_runs():
    table = Table(TableSpec())
    table.push(np.arange(1000, 2000, dtype=U64), np.ones((1000, 1), np.float32))
    table.push(keys_of(5, 7, 9), np.ones((3, 1), np.float32))   # short: not registered
    assert (table.runs.lo.tolist(), table.runs.last.tolist()) == ([1000], [1999])


def test_remove_and_load_keep_run_registry_correct():
    spec = TableSpec(dtype="float64")
    table = Table(spec)
    starts, lengths = np.array([0, 1000], U64), np.array([500, 500])
    table.push_runs(starts, lengths, np.ones((1000, 1)))
    assert len(table.runs) == 2
    assert table.remove(keys_of(10, 20, 600)) == 2       # 600 was never stored
    assert len(table.runs) == 1 and int(table.runs.lo[0]) == 1000
    # Reused slots must not alias the dropped run's remaining keys.
    table.push(np.arange(3000, 3002, dtype=U64), np.full((2, 1), 7.0))
    table.push_runs(starts, lengths, np.ones((1000, 1)))
    got = table.pull_runs(starts, lengths).ravel()
    want = np.full(1000, 2.0)
    want[[10, 20]] = 1.0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(table.pull(np.arange(3000, 3002, dtype=U64)).ravel(), [7, 7])

    k = np.arange(1100, 1300, dtype=U64)
    table.load(k, np.full((k.size, 1), -3.0))               # overwrite inside a run
    table.load(np.arange(5000, 5100, dtype=U64), np.full((100, 1), 9.0))  # new run
    out = table.pull_runs(np.array([1000, 5000], U64), np.array([500, 100])).ravel()
    assert (out[100:300] == -3).all() and (out[:100] == 2).all() and (out[500:] == 9).all()
    assert len(table) == 1000 - 2 + 2 + 2 + 100     # removed, 3000-3001, 10 and 20 again, new


def test_items_range_items_load_round_trip():
    rng = np.random.default_rng(5)
    spec = TableSpec(dim=2, dtype="float32", updater="adagrad", updater_args={"lr": 0.1})
    table = Table(spec)
    keys = rand_keys(rng, 3000)
    table.push(keys, pushed_for(spec, rng, keys.size))
    k, v, s = table.items()
    np.testing.assert_array_equal(k, keys)
    assert v.shape == (keys.size, 2) and s.shape == (keys.size, 2)
    lo, hi = int(keys[100]), int(keys[2000])
    rk, rv = table.range_items(lo, hi)
    np.testing.assert_array_equal(rk, keys[100:2000])
    np.testing.assert_array_equal(rv, v[100:2000])
    assert table.range_items(hi, lo)[0].size == 0

    copy = Table(spec)
    copy.load(k, v, s)
    k2, v2, s2 = copy.items()
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(s2, s)
    p = pushed_for(spec, rng, keys.size)      # same state -> same next step
    copy.push(keys, p)
    table.push(keys, p)
    np.testing.assert_array_equal(copy.pull(keys), table.pull(keys))

    copy.load(k[:10], v[:10])                 # no state: reset to zero
    assert (copy.items()[2][:10] == 0).all()
    with pytest.raises(ValueShapeError):
        copy.load(k[:10], v[:9])

    assert table.remove(keys) == keys.size
    assert len(table) == 0 and table.items()[0].size == 0
    assert table.nbytes() > 0


# ---- initializers ----------------------------------------------------------------------------

def test_initializer_is_deterministic_and_seeded():
    k = keys_of(0, 1, 2, 12345, MAX_KEY)
    a = Table(TableSpec(dim=3, init="uniform:2", seed=1)).pull(k)
    b = Table(TableSpec(dim=3, init="uniform:2", seed=1)).pull(k)
    c = Table(TableSpec(dim=3, init="uniform:2", seed=2)).pull(k)
    np.testing.assert_array_equal(a, b)
    assert not np.isclose(a, c).any()
    assert len(np.unique(a)) == a.size            # columns and keys decorrelated
    # the value of (key, column) does not depend on which other keys are asked for
    np.testing.assert_array_equal(Table(TableSpec(dim=3, init="uniform:2", seed=1))
                                  .pull(keys_of(12345))[0], a[3])


@pytest.mark.parametrize("init,mean,std", [("normal:0.5", 0.0, 0.5),
                                           ("uniform:3", 0.0, 3 / np.sqrt(3)),
                                           ("constant:-1.5", -1.5, 0.0),
                                           ("zeros", 0.0, 0.0)])
def test_initializer_distributions(init, mean, std):
    k = np.arange(100_000, dtype=U64) * U64(7919)
    v = initial_values(TableSpec(dim=2, init=init, dtype="float64"), k)
    assert v.shape == (k.size, 2)
    assert abs(v.mean() - mean) < 0.01 + 0.01 * std
    assert abs(v.std() - std) < 0.01 * max(std, 1.0)
    if init.startswith("uniform"):
        assert v.min() >= -3 and v.max() < 3
    if init.startswith("normal"):
        assert abs(np.mean(np.abs(v) > 2 * 0.5) - 0.0455) < 0.005   # tails of a Gaussian


# ---- TableSpec -------------------------------------------------------------------------------

def test_spec_json_round_trip_and_identity():
    s = TableSpec(name="w", dim=8, dtype="float64", init="normal:0.01", seed=2**64 - 1,
                  updater="ftrl", updater_args={"alpha": 0.1, "l1": 1}, sync=True)
    j = s.to_json()
    assert TableSpec.from_json(j) == s
    assert hash(TableSpec.from_json(dict(j))) == hash(s)
    assert s != TableSpec(name="w", dim=8)
    assert len({s, TableSpec.from_json(j), TableSpec()}) == 2
    args = {"lr": 0.1}
    t = TableSpec(updater="sgd", updater_args=args)
    args["lr"] = 5.0                               # the spec keeps its own copy
    assert t.updater_args == {"lr": 0.1}
    assert TableSpec.from_json({}) == TableSpec()
    assert TableSpec(dim=3, updater="l1_prox", updater_args={"l1": 0}).push_cols == 6


@pytest.mark.parametrize("bad", [
    [1, 2],
    {"dimension": 3},
    {"dim": 0}, {"dim": MAX_DIM + 1}, {"dim": "4"}, {"dim": 4.0}, {"dim": True},
    {"dtype": "int32"}, {"dtype": 5},
    {"init": "gauss"}, {"init": "normal:-1"}, {"init": "uniform:x"}, {"init": "zeros:1"},
    {"init": "constant:nan"}, {"init": 0},
    {"seed": -1}, {"seed": 2**64}, {"seed": 1.5},
    {"name": ""}, {"name": 3}, {"name": "a\nb"}, {"name": "x" * 200},
    {"updater": None},
    {"updater": "sgd"},                                        # lr missing
    {"updater": "sgd", "updater_args": {"lr": -1}},
    {"updater": "sgd", "updater_args": {"lr": "0.1"}},
    {"updater": "sgd", "updater_args": {"lr": 0.1, "momentum": 0.9}},
    {"updater": "sgd", "updater_args": {"lr": 10**400}},
    {"updater": "adagrad", "updater_args": {"lr": 0.1, "eps": 0}},
    {"updater_args": [1]}, {"updater_args": {"a": True}}, {"updater_args": {"a": float("inf")}},
    {"sync": "yes"}, {"sync": 1},
])
def test_spec_from_json_rejects_bad_input(bad):
    with pytest.raises(TableError):
        TableSpec.from_json(bad)


def test_make_updater_errors():
    with pytest.raises(TableError, match="unknown updater"):
        make_updater("nope", {})
    with pytest.raises(TableError, match="bad arguments"):
        make_updater("ftrl", {})
    assert make_updater("l1_prox", {"l1": 1}).push_factor == 2
    assert make_updater("ftrl", {"alpha": 1}).state_factor == 2


def test_huge_rows_start_small():
    dim = min(MAX_DIM, 1 << 22)                          # 16 MB rows
    table = Table(TableSpec(dim=dim))                    # must not reserve 1024 such rows
    assert table.nbytes() < 2**30
    k = keys_of(42)
    row = np.ones((1, dim), np.float32)
    table.push(k, row)
    table.push(k, row)
    assert (table.pull(k) == 2).all()


def test_spec_with_a_rule_registered_only_on_the_servers():
    """A worker need not import a server plugin: the rule's name is kept, and the push width comes
    from the servers (KVWorker.declare_table); using the spec before that is a clear error."""
    spec = TableSpec.from_json({"name": "w", "updater": "not_registered_here"})
    assert spec.push_factor is None
    with pytest.raises(TableError, match="not registered here"):
        _ = spec.push_cols
    assert spec.with_push_factor(2).push_cols == 2


# -- slot cache ------------------------------------------------------------------------------------
def _sparse_keys(rng, n, space=1 << 40):
    return np.unique(rng.integers(0, space, n, dtype=U64))


def test_slot_cache_serves_a_list_from_its_third_sighting(monkeypatch):
    table = Table(TableSpec(dtype="float64"))
    keys = _sparse_keys(np.random.default_rng(0), 2000)
    ones = np.ones((keys.size, 1))
    table.push(keys, ones)          # first sighting: fingerprint only
    table.push(keys, ones)          # second: cached
    assert table.slot_cache.stats()["lists"] == 1

    def no_lookup(keys):
        raise AssertionError("a cached list went through the hash index")
    monkeypatch.setattr(table._index, "lookup", no_lookup)
    table.push(keys.copy(), ones)   # equal content, another array
    np.testing.assert_array_equal(table.pull(keys).ravel(), np.full(keys.size, 3.0))
    assert table.slot_cache.hits == 2


def test_slot_cache_off_and_short_lists_never_cached():
    rng = np.random.default_rng(1)
    off = Table(TableSpec(), slot_cache=0)
    keys = _sparse_keys(rng, 1000)
    for _ in range(3):
        off.push(keys, np.ones((keys.size, 1), np.float32))
    assert off.slot_cache.stats() == {"lists": 0, "bytes": 0, "hits": 0, "misses": 0}
    on = Table(TableSpec())
    short = keys[:100]
    for _ in range(3):
        on.push(short, np.ones((short.size, 1), np.float32))
    assert on.slot_cache.stats()["lists"] == 0


def test_slot_cache_fingerprint_collision_is_a_miss_not_a_wrong_slot():
    table = Table(TableSpec(dtype="float64"))
    a = np.arange(0, 4000, 2, dtype=U64)   # same length, first, middle and last key ...
    b = a.copy()
    b[1] += 1                               # ... but one key differs
    for _ in range(3):
        table.push(a, np.ones((a.size, 1)))
    table.push(b, np.full((b.size, 1), 10.0))
    table.push(b, np.full((b.size, 1), 10.0))
    assert table.pull(keys_of(2, 3)).ravel().tolist() == [3.0, 20.0]
    np.testing.assert_array_equal(table.pull(a)[2:].ravel(), np.full(a.size - 2, 23.0))


def test_slot_cache_is_cleared_when_keys_are_removed():
    table = Table(TableSpec(dtype="float64"))
    keys = _sparse_keys(np.random.default_rng(2), 1000)
    for _ in range(2):
        table.push(keys, np.ones((keys.size, 1)))
    assert table.slot_cache.stats()["lists"] == 1
    table.remove(keys[:1])
    assert table.slot_cache.stats()["lists"] == 0
    table.push(keys_of(1 << 50), np.full((1, 1), 7.0))   # takes the freed slot
    table.push(keys, np.ones((keys.size, 1)))
    got = table.pull(keys).ravel()
    assert got[0] == 1.0 and (got[1:] == 3.0).all()
    assert table.pull(keys_of(1 << 50)).ravel().tolist() == [7.0]


def test_slot_cache_stays_within_its_bound():
    rng = np.random.default_rng(3)
    table = Table(TableSpec(), slot_cache=100_000)
    for _ in range(20):
        keys = _sparse_keys(rng, 1000)
        for _ in range(2):
            table.push(keys, np.ones((keys.size, 1), np.float32))
        assert table.slot_cache.nbytes <= 100_000
    assert 1 <= table.slot_cache.stats()["lists"] <= 6   # 16 kB a 1000-key list


@pytest.mark.parametrize("seed", range(4))
def test_slot_cache_matches_a_table_without_it(seed):
    """Random pushes, pulls, removes and loads of repeating lists: the same values either way."""
    rng = np.random.default_rng(seed)
    spec = TableSpec(dtype="float64", updater="adagrad", updater_args={"lr": 0.5})
    cached, plain = Table(spec), Table(spec, slot_cache=0)
    pool = [_sparse_keys(rng, int(rng.integers(256, 1500)), space=5000) for _ in range(6)]
    for _ in range(300):
        op = rng.integers(10)
        keys = pool[rng.integers(len(pool))]
        if op < 6:
            g = rng.normal(size=(keys.size, 1))
            cached.push(keys, g)
            plain.push(keys, g)
        elif op < 8:
            np.testing.assert_array_equal(cached.pull(keys), plain.pull(keys))
        elif op == 8:
            gone = np.unique(rng.choice(keys, 20))
            assert cached.remove(gone) == plain.remove(gone)
        else:
            v = rng.normal(size=(keys.size, 1))
            cached.load(keys, v)
            plain.load(keys, v)
    assert cached.slot_cache.hits > 50
    k1, v1, s1 = cached.items()
    k2, v2, s2 = plain.items()
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(s1, s2)


def test_slot_cache_does_not_admit_lists_that_come_back_after_a_cache_worth_of_others():
    rng = np.random.default_rng(6)
    lists = [_sparse_keys(rng, 1000) for _ in range(10)]   # ~16 kB of entry each
    table = Table(TableSpec(), slot_cache=60_000)           # room for 3
    for _ in range(3):                                       # a cycle of 10: never comes back in time
        for keys in lists:
            table.push(keys, np.ones((keys.size, 1), np.float32))
    assert table.slot_cache.stats()["lists"] == 0 and table.slot_cache.seen_bytes <= 60_000
    for _ in range(3):                                       # a cycle of 3 fits: cached, then hits
        for keys in lists[:3]:
            table.push(keys, np.ones((keys.size, 1), np.float32))
    assert table.slot_cache.stats()["lists"] == 3 and table.slot_cache.hits == 3
