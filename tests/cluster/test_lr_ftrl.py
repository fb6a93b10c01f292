"""`pserver train lr --solver ftrl` on a real local cluster: FTRL-proximal over minibatches
reaches the held-out AUC of the true weights on generated data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pserver.apps.lr import gen
from pserver.apps.lr.data import read_shard
from pserver.apps.lr.model import Model, auc, load_model, predict


def true_auc(d: str) -> float:
    test = read_shard(f"{d}/test.libsvm")
    truth = np.load(f"{d}/truth.npz")
    order = np.argsort(truth["keys"])
    return auc(test.y, predict(Model(truth["keys"][order], truth["weights"][order]), test))


def test_ftrl_reaches_the_held_out_auc_of_the_true_weights(tmp_path):
    d = str(tmp_path / "data")
    gen.generate(d, 60_000, features=2000, nnz=20, seed=11, test_examples=5000)
    model_dir, summary = str(tmp_path / "model"), str(tmp_path / "summary.json")
    out = subprocess.run(
        [sys.executable, "-m", "pserver", "train", "lr", "--solver", "ftrl",
         "--data", f"{d}/train.libsvm", "--test", f"{d}/test.libsvm", "--servers", "2",
         "--workers", "2", "--l1", "20", "--alpha", "0.5", "--batch", "1024", "--epochs", "3",
         "--test-every-pass", "--model-out", model_dir, "--summary-json", summary,
         "--insecure"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pass   3  progressive logloss" in out.stdout
    s = json.loads(Path(summary).read_text())
    assert s["solver"] == "ftrl" and s["passes"] == 3 and s["examples"] == 60_000
    best = true_auc(d)
    assert best - 0.01 <= s["test_auc"] <= best + 0.01
    # the progressive logloss falls pass by pass, and every pass was scored on the held-out set
    losses = [h["progressive_logloss"] for h in s["history"]]
    assert losses[0] > losses[1] > losses[2]
    assert [e["epoch"] for e in s["test_every_pass"]] == [0, 1, 2]
    # time to quality: from the launch of the command, after each pass, in order
    ttq = s["time_to_quality"]
    assert [q["epoch"] for q in ttq] == [0, 1, 2]
    assert 0 < ttq[0]["seconds_from_launch"] < ttq[1]["seconds_from_launch"] \
        < ttq[2]["seconds_from_launch"] < s["total_seconds"] + 60
    assert ttq[-1]["logloss"] == pytest.approx(s["test_every_pass"][-1]["logloss"])
    # the last pass is scored once every worker's pushes are applied: on the final model
    assert ttq[-1]["logloss"] == pytest.approx(s["test_logloss"], abs=1e-5)
    assert "held-out logloss after each pass (seconds from launch): 1: " in out.stdout
    model = load_model(model_dir)   # L1 makes the model sparse; the export is what was scored
    assert 0 < model.nnz == s["nnz"] < 2000
    test = read_shard(f"{d}/test.libsvm")
    assert auc(test.y, predict(model, test)) == pytest.approx(s["test_auc"], abs=1e-9)
