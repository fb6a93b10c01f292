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


def test_deepfm_on_the_cluster_matches_the_single_process_auc(ctr_files, tmp_path):
    tr, te = ctr_files
    cmd = [sys.executable, "-W", "ignore", "-m", "pserver.apps.ctr.train", "--train", tr,
           "--test", te, "--epochs", "2", "--out", str(tmp_path / "rank_RANK.json")]
    with LocalCluster(2, 2, insecure=True, heartbeat_timeout=10.0) as cluster:
        assert cluster.run_workers(cmd, timeout=300) == 0
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert sum(r["examples"] for r in ranks) == 2 * 8000          # every example, each pass
    assert all(r["rows_pushed"] == r["rows_pulled"] > 0 for r in ranks)
    torch.set_num_threads(1)   # a loaded 2-core machine: two OpenMP threads spin for ages
    base = train.train_local(data.read(tr), data.read(te), train.CTRConfig(epochs=2))
    assert base["test_auc"] > 0.58                                  # the baseline learns
    # two asynchronous workers do not take the baseline's exact steps: on 8,000 examples their
    # AUCs differ by up to ~0.02 either way (seen: +0.0007 to +0.0175); a broken bridge drops
    # to ~0.5. Not worse than the baseline beyond that noise:
    assert ranks[0]["test_auc"] >= base["test_auc"] - 0.015, (ranks[0], base)
