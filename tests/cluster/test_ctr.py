"""The DeepFM CTR example on a real cluster (2 servers, 2 worker processes; embedding tables and
dense parameters on the servers) reaches the held-out AUC of the single-process torch baseline
(same model, seed, batches and adagrad rules) on generated Criteo-format data, within the noise of
asynchronous training on a small set."""

from __future__ import annotations

import json
import sys

import pytest

torch = pytest.importorskip("torch")

from pserver.apps.ctr import data, train  # noqa: E402
from pserver.launch import LocalCluster  # noqa: E402


@pytest.fixture(scope="module")
def ctr_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctr")
    return (str(data.generate(d / "train.tsv", 8000, seed=1)),
            str(data.generate(d / "test.tsv", 2000, seed=2)))


@pytest.fixture(scope="module")
def baseline(ctr_files):
    torch.set_num_threads(1)   # a loaded 2-core machine: two OpenMP threads spin for ages
    tr, te = ctr_files
    return train.train_local(data.read(tr), data.read(te), train.CTRConfig(epochs=2))


def _cmd(ctr_files, tmp_path):
    tr, te = ctr_files
    return [sys.executable, "-W", "ignore", "-m", "pserver.apps.ctr.train", "--train", tr,
            "--test", te, "--epochs", "2", "--out", str(tmp_path / "rank_RANK.json")]


def test_one_worker_on_the_cluster_reaches_the_baseline_auc_within_0_005(ctr_files, baseline,
                                                                          tmp_path):
    # one worker takes the baseline's steps in the baseline's order (same seed, batches and
    # adagrad rule, applied on the server): only floating-point rounding differs
    with LocalCluster(1, 1, insecure=True, heartbeat_timeout=10.0) as cluster:
        assert cluster.run_workers(_cmd(ctr_files, tmp_path), timeout=300) == 0
    rank = json.loads((tmp_path / "rank_0.json").read_text())
    assert rank["examples"] == 2 * 8000
    assert baseline["test_auc"] > 0.58
    assert abs(rank["test_auc"] - baseline["test_auc"]) < 0.005, (rank, baseline)


def test_deepfm_on_the_cluster_matches_the_single_process_auc(ctr_files, baseline, tmp_path):
    tr, te = ctr_files
    cmd = [sys.executable, "-W", "ignore", "-m", "pserver.apps.ctr.train", "--train", tr,
           "--test", te, "--epochs", "2", "--out", str(tmp_path / "rank_RANK.json")]
    with LocalCluster(2, 2, insecure=True, heartbeat_timeout=10.0) as cluster:
        assert cluster.run_workers(cmd, timeout=300) == 0
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert sum(r["examples"] for r in ranks) == 2 * 8000          # every example, each pass
    assert all(r["rows_pushed"] == r["rows_pulled"] > 0 for r in ranks)
    base = baseline
    assert base["test_auc"] > 0.58                                  # the baseline learns
    # two asynchronous workers do not take the baseline's exact steps: on 8,000 examples their
    # AUCs differ by a few hundredths either way (seen: -0.027 with other jobs running, up to
    # +0.0175); a broken bridge drops to ~0.5. Not worse than the baseline beyond that noise
    # (the 0.005 agreement is the one-worker test's, where the steps are the baseline's):
    assert ranks[0]["test_auc"] >= base["test_auc"] - 0.04, (ranks[0], base)
