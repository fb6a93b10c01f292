"""The sparse-LR job survives failures mid-training, with real processes on loopback:

- a server SIGKILLed (k=1): it finishes with the same objective as an undisturbed run;
- a worker SIGKILLed: by default the lowest live worker takes its data shard over and the job
  reaches the undisturbed run's objective over the full data set; with --on-worker-failure drop
  it finishes without the shard and the summary names it.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np
import pytest
import scipy.sparse as sp

from pserver.apps.lr.data import Shard, read_shard
from pserver.apps.lr.model import load_model, margins
from pserver.apps.lr.takeover import merge_shards
from pserver.errors import SchedulerUnreachableError
from pserver.launch import LocalCluster
from pserver.membership.client import scheduler_request

L1, EPOCHS, BLOCKS = 1.0, 30, 16
# Failure detection: patient enough that a live worker starved of CPU on this loaded 2-core
# machine is not declared dead (at 0.6 s it happened now and then at set-up: the job then went on
# without that worker's shard, as designed, and the test failed on the worker's exit code).
HEARTBEAT_TIMEOUT = 1.5


def _tasks_done(cluster) -> int | None:
    """Iterations the LR workers completed (the scheduler's task progress); None if the
    scheduler was too busy to answer in time (a loaded machine)."""
    try:
        status = scheduler_request(cluster.config(), "status", role="worker", timeout=2.0).meta
    except SchedulerUnreachableError:
        return None
    return status.get("tasks", {}).get("lr", {}).get("complete", 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pserver.apps.lr.gen import generate

    d = tmp_path_factory.mktemp("lrdata")
    generate(str(d), 40000, features=2**16, nnz=30, seed=1, test_examples=4000)
    return d


def _train(data, out, kills=(), args=(), workers=2):
    """Train on 3 servers (k=1) x `workers` workers. kills: (victim, iterations) pairs - victim
    "server 1" or a worker rank, SIGKILLed once the scheduler reports that many iterations
    complete. Returns the summary of the worker that reported it."""
    cmd = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", str(data / "train.libsvm"),
           "--l1", str(L1), "--epochs", str(EPOCHS), "--blocks", str(BLOCKS),
           "--summary-json", str(out), "--model-out", str(out.with_suffix(".model")), *args]
    with LocalCluster(3, workers, insecure=True, replication=1,
                      heartbeat_timeout=HEARTBEAT_TIMEOUT) as cluster:
        procs = [cluster.spawn_worker(cmd, r) for r in range(workers)]
        for victim, after in kills:
            deadline = time.monotonic() + 120
            while True:  # the scheduler's task progress tells how far training is
                done = _tasks_done(cluster)
                if done is not None and done >= after:
                    break
                assert time.monotonic() < deadline and all(
                    p.poll() is None for r, p in enumerate(procs) if r not in dict(kills))
                time.sleep(0.05)
            if victim == "server 1":
                cluster.kill("server 1", signal.SIGKILL)
            else:
                procs[victim].send_signal(signal.SIGKILL)
        codes = [p.wait(150) for p in procs]
    for victim, _ in kills:
        if isinstance(victim, int):
            assert codes[victim] == -signal.SIGKILL, "the worker finished before it was killed"
            codes[victim] = 0
    assert codes == [0] * workers
    return json.loads(out.read_text())


def _objective(data, summary_path, shards: list[int], num_shards: int = 2) -> tuple[float, float]:
    """(loss, l1 penalty) of the exported model on the given shards of the training data,
    computed here from scratch: what the job's reported objective must equal."""
    model = load_model(str(summary_path.with_suffix(".model")))
    loss = 0.0
    for r in shards:
        s = read_shard(str(data / "train.libsvm"), rank=r, num_workers=num_shards)
        loss += float(np.logaddexp(0.0, -s.y * margins(model, s)).sum())
    return loss, L1 * float(np.abs(model.weights.astype(np.float64)).sum())


@pytest.fixture(scope="module")
def calm(data, tmp_path_factory):
    return _train(data, tmp_path_factory.mktemp("calm") / "calm.json")


@pytest.mark.slow
def test_lr_survives_a_server_kill_and_reaches_the_same_objective(data, calm, tmp_path):
    killed = _train(data, tmp_path / "killed.json", kills=[("server 1", 16 * 8)])
    assert killed["passes"] == calm["passes"] == EPOCHS
    # every acknowledged update survived the failover: the run ends where the undisturbed one does
    assert killed["train_objective"] == pytest.approx(calm["train_objective"], rel=1e-4)


@pytest.mark.slow
def test_lr_worker_kill_shard_taken_over_reaches_the_full_objective(data, calm, tmp_path):
    # rank 0 dies: the reporter and the lowest rank; rank 1 inherits its shard and the report
    out = tmp_path / "takeover.json"
    s = _train(data, out, kills=[(0, 16 * 8)])
    sh = s["shards"]
    assert s["reported_by"] == 1 and sh["dead_workers"] == [0] and sh["dropped"] == []
    [t] = sh["taken_over"]
    assert t["shard"] == 0 and t["by"] == 1 and 16 * 8 < t["iteration"] < EPOCHS * BLOCKS
    # every pass from the takeover on covers all the data (a pass the dead worker did not finish
    # and that ended before the takeover misses its shard: whether there is one depends on timing)
    after = [h["examples"] for h in s["history"] if (h["epoch"] + 1) * BLOCKS > t["iteration"]]
    assert after and set(after) == {40000} and calm["examples"] == 40000
    assert s["passes"] == EPOCHS
    assert s["train_objective"] == pytest.approx(calm["train_objective"], rel=0.01)
    # the reported objective is exactly F(w) over the full data (shares of the penalty included)
    loss, penalty = _objective(data, out, [0, 1])
    assert s["train_objective"] == pytest.approx(loss + penalty, rel=1e-6)
    assert "taken over by worker 1" in _summary_text(s)


@pytest.mark.slow
def test_lr_worker_kill_with_drop_option_names_the_dropped_shard(data, calm, tmp_path):
    out = tmp_path / "drop.json"
    s = _train(data, out, kills=[(1, 16 * 8)], args=["--on-worker-failure", "drop"])
    sh = s["shards"]
    assert s["reported_by"] == 0 and s["passes"] == EPOCHS
    assert sh["policy"] == "drop" and sh["dropped"] == [1] and sh["taken_over"] == []
    shard0 = read_shard(str(data / "train.libsvm"), rank=0, num_workers=2).num_examples
    assert s["examples"] == shard0 < 40000
    # the objective now covers shard 0 only: its loss is exactly the model's loss there
    loss, _ = _objective(data, out, [0])
    assert s["history"][-1]["loss"] == pytest.approx(loss, rel=1e-6)
    assert "shard(s) 1 DROPPED" in _summary_text(s)


@pytest.mark.slow
def test_lr_heir_killed_too_the_next_worker_inherits_every_dead_shard(data, calm, tmp_path):
    # 3 workers: rank 0 dies (rank 1 inherits shard 0), then rank 1 (rank 2 inherits 0 and 1)
    out = tmp_path / "chain.json"
    s = _train(data, out, kills=[(0, 16 * 6), (1, 16 * 15)], workers=3)
    sh = s["shards"]
    assert s["reported_by"] == 2 and sh["dead_workers"] == [0, 1] and sh["dropped"] == []
    assert sorted((t["shard"], t["by"]) for t in sh["taken_over"]) == [(0, 2), (1, 2)]
    assert all(t["iteration"] > 16 * 15 for t in sh["taken_over"])
    assert s["examples"] == 40000 and s["passes"] == EPOCHS
    assert s["train_objective"] == pytest.approx(calm["train_objective"], rel=0.01)
    loss, penalty = _objective(data, out, [0, 1, 2], num_shards=3)
    assert s["train_objective"] == pytest.approx(loss + penalty, rel=1e-6)


def _summary_text(s: dict) -> str:
    from pserver.apps.lr.worker import format_summary
    return format_summary(s)


def test_merge_shards_stacks_rows_over_the_union_of_keys():
    rng = np.random.default_rng(3)

    def shard(keys, rows):
        keys = np.asarray(keys, np.uint64)
        X = sp.random(rows, keys.size, density=0.3, format="csc", random_state=rng,
                      dtype=np.float32)
        return Shard(X=X, y=rng.choice([-1.0, 1.0], rows), keys=keys)

    a, b = shard([2, 5, 9, 11], 7), shard([1, 5, 11, 20, 30], 4)
    merged, mult = merge_shards(a, b, np.array([1.0, 2.0, 1.0, 1.0]))
    assert merged.keys.tolist() == [1, 2, 5, 9, 11, 20, 30]
    assert mult.tolist() == [1, 1, 3, 1, 2, 1, 1]
    dense = np.zeros((11, 7), np.float32)
    dense[:7, np.searchsorted(merged.keys, a.keys)] = a.X.toarray()
    dense[7:, np.searchsorted(merged.keys, b.keys)] = b.X.toarray()
    assert np.array_equal(merged.X.toarray(), dense)
    assert merged.X.has_sorted_indices and merged.y.tolist() == a.y.tolist() + b.y.tolist()
