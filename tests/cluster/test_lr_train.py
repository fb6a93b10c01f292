"""DBPG logistic regression: convergence against scikit-learn, ground-truth recovery, and the
`pserver train lr` command end to end.

The algorithm's unit tests run against FakeKV, an in-process stand-in with the same semantics as
pserver.KVWorker (synchronous sum over workers, l1_prox updater, per-sender FIFO). Everything that
claims distributed results runs on a real LocalCluster: real processes, real sockets.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pserver.apps.lr import gen
from pserver.apps.lr.data import read_shard
from pserver.apps.lr.dbpg import DBPG, DBPGConfig
from pserver.apps.lr.model import auc, load_model, predict

sklearn = pytest.importorskip("sklearn.linear_model")


# -- an in-process fake of the worker API (for the algorithm's unit tests only) -------------------
class _FakeTable:
    def __init__(self, spec: dict):
        self.spec = spec
        self.keys = np.empty(0, np.uint64)
        self.vals = np.zeros((0, spec["dim"]), spec["dtype"])
        self.rounds: dict[int, list] = {}
        self.applied = 0

    def rows(self, keys: np.ndarray) -> np.ndarray:
        new = np.setdiff1d(keys, self.keys)
        if new.size:
            allk = np.concatenate([self.keys, new])
            order = np.argsort(allk)
            self.keys = allk[order]
            self.vals = np.concatenate([self.vals, np.zeros((new.size, self.vals.shape[1]),
                                                            self.vals.dtype)])[order]
        return np.searchsorted(self.keys, keys)

    def apply(self, keys: np.ndarray, vals: np.ndarray) -> None:
        pos = self.rows(keys)
        if self.spec["updater"] == "sum":
            self.vals[pos] += vals
            return
        a = self.spec["updater_args"]
        w = self.vals[pos, 0].astype(np.float64)
        g, u = vals[:, 0].astype(np.float64), vals[:, 1] / a.get("eta", 1.0)
        x = u * w - g
        den = u + a.get("l2", 0.0)
        shrunk = np.sign(x) * np.maximum(np.abs(x) - a["l1"], 0.0)
        self.vals[pos, 0] = np.where(den > 0, shrunk / np.where(den > 0, den, 1.0), w)


class FakeCluster:
    """Shared state of the fake: tables and synchronous rounds (threads stand in for workers)."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.tables: dict[str, _FakeTable] = {}
        self.cond = threading.Condition()

    def workers(self) -> list[FakeKV]:
        return [FakeKV(self, r) for r in range(self.num_workers)]


class FakeKV:
    def __init__(self, cluster: FakeCluster, rank: int):
        self.c, self.rank, self.num_workers, self.num_servers = cluster, rank, \
            cluster.num_workers, 1
        self.rounds: dict[str, int] = {}
        self.results: dict[int, object] = {}
        self.ts = 0
        self.sent = 0

    def declare_table(self, name, dim=1, dtype="float32", init="zeros", updater="sum",
                      updater_args=None, sync=False):
        spec = dict(dim=dim, dtype=dtype, updater=updater, updater_args=updater_args or {},
                    sync=sync)
        with self.c.cond:
            t = self.c.tables.setdefault(name, _FakeTable(spec))
            assert t.spec == spec, f"table {name} declared with another spec"

    def _next(self, result=None) -> int:
        self.ts += 1
        self.results[self.ts] = result
        return self.ts

    def push(self, keys, vals, table="default"):
        t = self.c.tables[table]
        cols = t.spec["dim"] * (2 if t.spec["updater"] == "l1_prox" else 1)
        assert keys.dtype == np.uint64 and np.all(keys[1:] > keys[:-1])
        assert vals.dtype == np.dtype(t.spec["dtype"]) and vals.size == keys.size * cols
        vals = vals.reshape(keys.size, cols)
        self.sent += keys.nbytes + vals.nbytes
        with self.c.cond:
            if not t.spec["sync"]:
                t.apply(keys, vals)
                return self._next()
            k = self.rounds.get(table, 0)
            self.rounds[table] = k + 1
            parts = t.rounds.setdefault(k, [])
            parts.append((keys.copy(), vals.copy()))
            if len(parts) == self.num_workers:
                allk = np.concatenate([p[0] for p in parts])
                allv = np.concatenate([p[1] for p in parts]).astype(np.float64)
                uk, inv = np.unique(allk, return_inverse=True)
                summed = np.zeros((uk.size, cols))
                np.add.at(summed, inv, allv)
                t.apply(uk, summed)
                t.applied += 1
                del t.rounds[k]
                self.c.cond.notify_all()
        return self._next()

    def push_pull(self, keys, vals, table="default", out=None, wait=True):
        self.push(keys, vals, table)
        return self.pull(keys, table, out=out, wait=wait)

    def _synced(self, table):
        t = self.c.tables[table]
        if t.spec["sync"]:
            self.c.cond.wait_for(lambda: t.applied >= self.rounds.get(table, 0), timeout=30)

    def pull(self, keys, table="default", out=None, wait=True):
        t = self.c.tables[table]
        with self.c.cond:
            self._synced(table)
            pos = t.rows(keys)
            v = t.vals[pos].copy()
        v = v[:, 0] if t.spec["dim"] == 1 else v
        if out is not None:
            out[...] = v.reshape(out.shape)
        ts = self._next(v)
        return self.wait(ts) if wait else ts

    def pull_range(self, lo=0, hi=1 << 64, table="default", wait=True):
        t = self.c.tables[table]
        with self.c.cond:
            self._synced(table)
            sel = (t.keys >= np.uint64(lo)) & ((hi >= 1 << 64) | (t.keys < np.uint64(
                min(hi, (1 << 64) - 1))))
            v = t.vals[sel].copy()
            result = t.keys[sel].copy(), (v[:, 0] if t.spec["dim"] == 1 else v)
        return result if wait else self._next(result)

    def wait(self, ts):
        return self.results.pop(ts, None)

    def barrier(self):
        pass

    def stats(self):
        return {"bytes_sent": self.sent, "bytes_received": 0}

    def close(self):
        pass


def run_fake(shards, cfg: DBPGConfig) -> list:
    """Train with one thread per shard on a FakeCluster; returns every worker's DBPG."""
    cluster = FakeCluster(len(shards))
    algos: list = [None] * len(shards)
    errors: list = []

    def work(rank, kv):
        try:
            algos[rank] = DBPG(kv, shards[rank], cfg)
            algos[rank].run()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r, kv))
               for r, kv in enumerate(cluster.workers())]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    if errors:
        raise errors[0]
    return algos


# -- shared data and references -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A data set small enough for scikit-learn: 3000 examples over 1500 ids."""
    d = str(tmp_path_factory.mktemp("lr_small"))
    gen.generate(d, 3000, features=1500, nnz=20, noise=0.05, seed=1, test_examples=500)
    return os.path.join(d, "train.libsvm")


def objective(X, y, w, l1, l2) -> float:
    return float(np.logaddexp(0, -y * (X @ w)).sum() + l1 * np.abs(w).sum() + 0.5 * l2 * w @ w)


_SKLEARN: dict = {}


def sklearn_fit(path: str, l1: float, l2: float) -> tuple[float, np.ndarray]:
    """(F(w*), w*) of scikit-learn's solution: C = 1/l1 with an L1 penalty, C = 1/l2 with L2
    (w* over the shard's columns, in key order)."""
    if (path, l1, l2) not in _SKLEARN:
        s = read_shard(path)
        C, ratio = (1 / l1, 1.0) if l1 else (1 / l2, 0.0)
        clf = sklearn.LogisticRegression(C=C, l1_ratio=ratio, solver="liblinear", tol=1e-8,
                                         max_iter=10_000, fit_intercept=False).fit(s.X, s.y)
        w = clf.coef_.ravel()
        _SKLEARN[(path, l1, l2)] = (objective(s.X, s.y, w, l1, l2), w)
    return _SKLEARN[(path, l1, l2)]


def sklearn_objective(path: str, l1: float, l2: float) -> float:
    return sklearn_fit(path, l1, l2)[0]


# -- the algorithm on the fake --------------------------------------------------------------------
@pytest.mark.parametrize("l1,l2,curvature", [(2.0, 0.0, "hessian"), (0.0, 2.0, "hessian"),
                                             (2.0, 0.0, "bound")])
def test_dbpg_reaches_sklearn_objective_and_descends(small, l1, l2, curvature):
    shard = read_shard(small)
    algo = run_fake([shard], DBPGConfig(l1=l1, l2=l2, epochs=12, blocks=16,
                                        curvature=curvature))[0]
    objs = [s.objective for s in algo.history]
    best = sklearn_objective(small, l1, l2)
    assert objs[-1] <= best * 1.005
    assert objs[-1] >= best * (1 - 1e-4)          # not below the optimum: F is computed right
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(objs)), objs   # monotone
    # the reported objective is F of the worker's weights and margins
    keys, w = algo.weights()
    assert objs[-1] == pytest.approx(objective(shard.X, shard.y, w, l1, l2), rel=1e-6)
    assert algo.history[-1].nnz == np.count_nonzero(w)
    if l1:
        assert 0 < algo.history[-1].nnz < keys.size      # L1 gives a sparse model
        # KKT filter: keys whose column mass is <= l1 are never pushed, and are zero at the
        # optimum (scikit-learn's too)
        mass = np.add.reduceat(np.abs(shard.X.data), shard.X.indptr[:-1])
        never = mass <= l1
        assert algo.filtered == never.sum() > 0
        assert np.all(w[never] == 0) and np.all(sklearn_fit(small, l1, l2)[1][never] == 0)


def test_dbpg_is_the_same_algorithm_for_any_number_of_workers(small):
    cfg = DBPGConfig(l1=2.0, epochs=3, blocks=4)
    one = run_fake([read_shard(small)], cfg)[0].history
    shards = [read_shard(small, rank=r, num_workers=3) for r in range(3)]
    three = run_fake(shards, cfg)
    for a, b in zip(one, three[0].history):
        assert b.objective == pytest.approx(a.objective, rel=1e-5)
        assert b.nnz == a.nnz and b.examples == 3000
    # every worker sees the same global objective, and the same weight for a shared key
    assert len({round(x.history[-1].objective, 3) for x in three}) == 1
    k0, w0 = three[0].weights()
    k1, w1 = three[1].weights()
    common, i0, i1 = np.intersect1d(k0, k1, return_indices=True)
    assert common.size > 100 and np.array_equal(w0[i0], w1[i1])


def test_dbpg_config_errors():
    from pserver.errors import ConfigError
    for bad in (dict(tau=-1), dict(curvature="newton"), dict(l1=-1.0), dict(blocks=0),
                dict(eta=0.0)):
        with pytest.raises(ConfigError):
            DBPGConfig(**bad).check()


@pytest.mark.parametrize("l1", [0.0, 0.3, 2.0, 4.0, 7.5, 1e9])
def test_capped_masses_decide_the_kkt_prefilter_exactly(l1):
    from pserver.apps.lr.dbpg import mass_cap

    threshold = l1 * (1 + 1e-6)
    cap = np.float32(mass_cap(threshold))
    assert cap > threshold and (cap == np.floor(cap) or np.isinf(cap))
    rng = np.random.default_rng(7)
    sides = set()
    for workers in (1, 2, 3, 5):
        counts = rng.integers(0, 2 * int(min(l1, 50)) + 3, (4000, workers))   # binary features
        reals = rng.random((4000, workers)) * 2 * max(threshold, 1.0)
        for m in (counts.astype(np.float32), reals.astype(np.float32)):
            # the servers add float32 rows in order; capped or not, the decision is the same
            exact = np.add.reduce(m, axis=1, dtype=np.float32) > threshold
            capped = np.add.reduce(np.minimum(m, cap), axis=1, dtype=np.float32) > threshold
            assert np.array_equal(exact, capped)
            sides |= set(exact.tolist())
    assert sides == ({True, False} if 0 < l1 < 1e6 else sides)   # both sides were tested


def test_kkt_reset_passes_stay_full_until_one_converges():
    from types import SimpleNamespace

    resets: list[bool] = []
    algo = DBPG.__new__(DBPG)   # only the stop rule: no cluster needed
    algo.kv = SimpleNamespace(filters=SimpleNamespace(
        select_all=lambda table, on=True: resets.append(on)))
    algo.cfg, algo.full_pass = DBPGConfig(l1=1.0, kkt=True), False
    # converged on the active set -> full passes (one reset) until a full pass converges
    assert [algo._converged(c) for c in (False, True, False, False, True)] == \
        [False, False, False, False, True]
    assert resets == [True] and algo.full_pass
    algo.cfg, algo.full_pass = DBPGConfig(l1=1.0), False
    assert [algo._converged(c) for c in (False, True)] == [False, True]


# -- on a real cluster: processes and sockets ----------------------------------------------------
def run_cluster(workers: int, argv: list[str], tmp_path, servers: int = 2) -> dict:
    from pserver.launch import LocalCluster

    out = str(tmp_path / f"summary_{workers}.json")
    with LocalCluster(servers, workers, insecure=True, heartbeat_timeout=10.0) as cluster:
        rc = cluster.run_workers([sys.executable, "-m", "pserver.apps.lr.worker", *argv,
                                  "--summary-json", out], timeout=120)
    assert rc == 0
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_real_cluster_matches_sklearn_l1(small, tmp_path, workers):
    s = run_cluster(workers, ["--data", small, "--l1", "2", "--epochs", "12", "--blocks", "16"],
                    tmp_path)
    best = sklearn_objective(small, 2.0, 0.0)
    assert s["workers"] == workers and s["examples"] == 3000
    assert best * (1 - 1e-4) <= s["train_objective"] <= best * 1.005
    assert s["bytes_sent"] > 0 and s["bytes_received"] > 0


def test_real_cluster_matches_sklearn_l2(small, tmp_path):
    s = run_cluster(2, ["--data", small, "--l1", "0", "--l2", "2", "--epochs", "12",
                        "--blocks", "16"], tmp_path)
    best = sklearn_objective(small, 0.0, 2.0)
    assert best * (1 - 1e-4) <= s["train_objective"] <= best * 1.005


def test_push_pull_and_separate_requests_give_the_same_run(small, tmp_path):
    """One push_pull per iteration (the default) and a push plus a pull are the same algorithm:
    under sequential consistency the objectives of every pass agree to rounding."""
    argv = ["--data", small, "--l1", "2", "--epochs", "4", "--blocks", "8"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_cluster(2, argv, tmp_path / "one")
    two = run_cluster(2, [*argv, "--separate-pull"], tmp_path / "two")
    a = [p["objective"] for p in one["history"]]
    b = [p["objective"] for p in two["history"]]
    assert len(a) == len(b) == 4 and np.allclose(a, b, rtol=1e-6)
    # and the flag took effect: a separate pull sends the keys a second time
    assert two["bytes_sent"] > one["bytes_sent"] * 1.2


def test_train_command_recovers_the_true_model(tmp_path):
    """`pserver train lr` as a user runs it; held-out AUC within 0.01 of the true weights'."""
    d = str(tmp_path / "data")
    gen.generate(d, 60_000, features=2000, nnz=20, seed=11, test_examples=5000)
    model_dir, summary = str(tmp_path / "model"), str(tmp_path / "summary.json")
    out = subprocess.run(
        [sys.executable, "-m", "pserver", "train", "lr", "--data", f"{d}/train.libsvm",
         "--test", f"{d}/test.libsvm", "--servers", "2", "--workers", "2", "--l1", "4",
         "--epochs", "10", "--blocks", "16", "--model-out", model_dir, "--summary-json",
         summary, "--insecure"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pass  10  objective" in out.stdout and "held-out (5,000 examples)" in out.stdout
    s = json.loads(Path(summary).read_text())
    test = read_shard(f"{d}/test.libsvm")
    truth = np.load(f"{d}/truth.npz")
    order = np.argsort(truth["keys"])
    from pserver.apps.lr.model import Model
    true_auc = auc(test.y, predict(Model(truth["keys"][order], truth["weights"][order]), test))
    model = load_model(model_dir)
    assert auc(test.y, predict(model, test)) == pytest.approx(s["test_auc"], abs=1e-9)
    assert true_auc - 0.01 <= s["test_auc"] <= true_auc + 0.01
    assert model.nnz == s["nnz"] and 0 < s["nnz"] < 2000
    assert model.meta["l1"] == 4.0 and model.meta["data_format"] == "libsvm"


def test_dbpg_reaches_sklearn_on_a_real_data_set_in_the_documented_passes():
    """scikit-learn's breast cancer set (569 x 30, standardised; dense, correlated, nearly
    separable: slow for coordinate methods): within 0.5% of liblinear's optimum after 10 passes
    of 30 blocks, one feature each (docs/lr.md, "DBPG per pass")."""
    import scipy.sparse as sp
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    from pserver.apps.lr.data import Shard

    X, y = load_breast_cancer(return_X_y=True)
    X = sp.csc_matrix(StandardScaler().fit_transform(X).astype(np.float32))
    y = np.where(y > 0, 1, -1).astype(np.int8)
    keys = np.arange(1, 31, dtype=np.uint64) << np.uint64(58)   # spread over the key space
    clf = sklearn.LogisticRegression(C=1 / 5.0, l1_ratio=1.0, solver="liblinear", tol=1e-8,
                                     max_iter=10_000, fit_intercept=False).fit(X, y)
    best = objective(X, y, clf.coef_.ravel(), 5.0, 0.0)
    algo = run_fake([Shard(X=X, y=y, keys=keys)], DBPGConfig(l1=5.0, epochs=10, blocks=30))[0]
    objs = [s.objective for s in algo.history]
    assert best * (1 - 1e-4) <= objs[-1] <= best * 1.005
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(objs))
