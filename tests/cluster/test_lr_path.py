"""`--l1 a,b,c` and `--l1 auto`: the regularisation path on a real cluster picks the value a
brute-force grid (scikit-learn, from scratch per value) picks on the same validation split; the
warm start writes the previous weights into the new table exactly."""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pserver.apps.lr import gen
from pserver.apps.lr.data import read_shard
from pserver.apps.lr.dbpg import DBPG, DBPGConfig
from pserver.apps.lr.model import logloss, sigmoid
from tests.cluster.test_lr_train import FakeCluster

sklearn = pytest.importorskip("sklearn.linear_model")
WORKERS, FRACTION = 2, 0.1


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lr_path"))
    gen.generate(d, 3000, features=1500, nnz=20, noise=0.05, seed=1, test_examples=500)
    return os.path.join(d, "train.libsvm")


def brute_force(path: str, values: list[float]) -> list[float]:
    """Validation logloss of scikit-learn's L1 optimum per value, trained from scratch on the
    rows the workers train on, scored on the rows they hold out (the last 10% of each shard)."""
    full = read_shard(path)
    rows, offset = [], 0
    for r in range(WORKERS):
        n = read_shard(path, rank=r, num_workers=WORKERS).num_examples
        cut = n - round(n * FRACTION)
        rows.append((np.arange(offset, offset + cut), np.arange(offset + cut, offset + n)))
        offset += n
    assert offset == full.num_examples
    train = np.concatenate([t for t, _ in rows])
    valid = np.concatenate([v for _, v in rows])
    X = full.X.tocsr()
    out = []
    for l1 in values:
        clf = sklearn.LogisticRegression(C=1 / l1, l1_ratio=1.0, solver="liblinear", tol=1e-8,
                                         max_iter=10_000, fit_intercept=False)
        clf.fit(X[train], full.y[train])
        out.append(logloss(full.y[valid], sigmoid(X[valid] @ clf.coef_.ravel())))
    return out


def run_path(small: str, l1: str, tmp_path) -> dict:
    from pserver.launch import LocalCluster

    out = str(tmp_path / "summary.json")
    argv = ["--data", small, "--l1", l1, "--epochs", "40", "--blocks", "16", "--tol", "1e-7",
            "--validation", str(FRACTION), "--summary-json", out]
    with LocalCluster(2, WORKERS, insecure=True, heartbeat_timeout=10.0) as cluster:
        rc = cluster.run_workers([sys.executable, "-m", "pserver.apps.lr.worker", *argv],
                                 timeout=300)
    assert rc == 0
    return json.loads(Path(out).read_text())


def test_l1_list_picks_what_a_brute_force_grid_picks(small, tmp_path):
    values = [16.0, 8.0, 4.0, 2.0, 1.0]
    s = run_path(small, "1,2,4,8,16", tmp_path)
    path = s["l1_path"]
    assert [p["l1"] for p in path["points"]] == values        # largest first: warm starts
    grid = brute_force(small, values)
    assert s["l1"] == path["chosen_l1"] == values[int(np.argmin(grid))]
    # the path's validation losses are those of the optimum per value (DBPG converged there)
    assert np.allclose([p["validation_logloss"] for p in path["points"]], grid, atol=2e-3)
    assert s["nnz"] == path["points"][int(np.argmin(grid))]["nnz"]   # the chosen model's


def test_l1_auto_picks_the_best_of_its_path_as_brute_force_does(small, tmp_path):
    s = run_path(small, "auto", tmp_path)
    points = s["l1_path"]["points"]
    values = [p["l1"] for p in points]
    assert len(values) >= 3 and all(a == 2 * b for a, b in itertools.pairwise(values))
    assert points[0]["nnz"] < points[-1]["nnz"]     # from sparse to dense
    grid = brute_force(small, values)
    assert s["l1"] == values[int(np.argmin(grid))]
    assert 0 < int(np.argmin(grid)) < len(values) - 1   # the best lies inside the path


def test_warm_start_writes_the_weights_into_the_new_table(small):
    shards = [read_shard(small, rank=r, num_workers=3) for r in range(3)]
    cluster = FakeCluster(3)
    kvs = cluster.workers()
    first = DBPGConfig(l1=4.0, epochs=3, blocks=4, table="a")
    second = DBPGConfig(l1=2.0, l2=0.5, epochs=0, blocks=4, table="b", eta=2.0)
    algos: list = [None] * 3
    errors: list = []

    def work(r):
        try:
            a = DBPG(kvs[r], shards[r], first)
            a.run()
            algos[r] = (a, DBPG(kvs[r], shards[r], second, init=a.w.copy()))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for a, b in algos:
        assert np.count_nonzero(a.w) > 10
        assert np.allclose(b.w, a.w, rtol=1e-5, atol=1e-7)   # the new table holds w
        ka, wa = kvs[0].pull_range(table="b")
        pos = np.searchsorted(ka, b.shard.keys)
        assert np.array_equal(wa[pos], b.w.astype(np.float32))   # the worker's view is exact
