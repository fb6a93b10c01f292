"""Model export/load/predict and the metrics of the LR app (no cluster involved)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from pserver.apps.lr.data import Shard, read_shard
from pserver.apps.lr.hashing import int_keys
from pserver.apps.lr.model import (
    Model,
    auc,
    load_model,
    logloss,
    margins,
    predict,
    save_model,
    sigmoid,
)
from pserver.errors import ConfigError

metrics = pytest.importorskip("sklearn.metrics")


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        y = rng.choice([-1, 1], n)
        if len(set(y)) < 2:
            continue
        s = np.round(rng.normal(size=n) + 0.5 * y, int(rng.integers(0, 3)))   # many ties
        assert auc(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
        assert auc((y > 0).astype(int), s) == pytest.approx(metrics.roc_auc_score(y, s))
    assert math.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))   # one class only


def test_logloss_matches_sklearn_and_clips():
    rng = np.random.default_rng(1)
    y = rng.choice([-1, 1], 500)
    p = rng.random(500)
    assert logloss(y, p) == pytest.approx(metrics.log_loss(y, p), rel=1e-12)
    assert np.isfinite(logloss(np.array([1, -1]), np.array([0.0, 1.0])))
    assert sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]


def test_save_load_predict_roundtrip(tmp_path):
    keys = np.array([30, 10, 20, 40], np.uint64)
    w = np.array([0.5, -1.0, 0.0, 2.0])
    m = save_model(str(tmp_path / "m"), keys, w, {"l1": 1.0, "data_format": "libsvm"})
    assert m.keys.tolist() == [10, 30, 40] and m.weights.tolist() == [-1.0, 0.5, 2.0]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == "pserver-lr-model" and meta["version"] == 1
    assert meta["num_weights"] == 3 and meta["l1"] == 1.0 and "mix64" in meta["hash_spec"]
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.keys.dtype == np.uint64 and loaded.keys.tolist() == [10, 30, 40]
    assert loaded.weights_for(np.array([40, 5, 10, 30], np.uint64)).tolist() == [2, 0, -1, 0.5]
    # a shard whose columns are other keys: unknown keys weigh 0
    X = sp.csc_matrix(np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]))
    shard = Shard(X=X, y=np.array([1.0, -1.0]), keys=np.array([10, 40, 99], np.uint64))
    assert margins(loaded, shard).tolist() == [-1 + 4, 2]
    assert predict(loaded, shard) == pytest.approx(1 / (1 + np.exp(-np.array([3.0, 2.0]))))
    assert predict(loaded, (X, shard.keys)) == pytest.approx(predict(loaded, shard))


def test_load_model_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no model\.json"):
        load_model(str(tmp_path))
    save_model(str(tmp_path / "m"), np.zeros(0, np.uint64), np.zeros(0), {})
    assert load_model(str(tmp_path / "m")).keys.size == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["version"] = 99
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="unsupported model format"):
        load_model(str(tmp_path / "m"))


def test_predict_command(tmp_path):
    data = tmp_path / "t.svm"
    data.write_text("1 1:1 2:1\n-1 2:1 3:1\n1 1:1\n")
    keys = int_keys([1, 2, 3], 0)
    save_model(str(tmp_path / "m"), keys, np.array([2.0, 0.5, -3.0]), {"data_format": "libsvm"})
    out = subprocess.run([sys.executable, "-m", "pserver", "predict", "--model",
                          str(tmp_path / "m"), "--data", str(data)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    p = [float(x) for x in out.stdout.split()]
    assert p == pytest.approx(list(sigmoid(np.array([2.5, -2.5, 2.0]))), abs=1e-6)
    assert "3 examples: logloss" in out.stderr and "AUC 1.00000" in out.stderr
    model = load_model(str(tmp_path / "m"))
    assert predict(model, read_shard(str(data))) == pytest.approx(p, abs=1e-6)
    assert isinstance(model, Model) and model.nnz == 3 and os.path.isdir(tmp_path / "m")
