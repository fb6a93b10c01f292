"""The sparse-LR job survives a server SIGKILLed mid-training (k=1): it finishes with the same
objective as an undisturbed run. Real processes on loopback."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from pserver.errors import SchedulerUnreachableError
from pserver.launch import LocalCluster
from pserver.membership.client import scheduler_request

# slow: two trainings of a 3-server cluster. (Formerly a non-strict xfail while an intermittent
# deadlock of a synchronous round across the failover was under observation: a resent part now
# joins the heir's open round, or is applied alone once that round is done.)
pytestmark = pytest.mark.slow


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


def _train(data, out, kill_after_iterations=None):
    cmd = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", str(data / "train.libsvm"),
           "--l1", "1", "--epochs", "30", "--blocks", "16", "--summary-json", str(out)]
    with LocalCluster(3, 2, insecure=True, replication=1, heartbeat_timeout=0.6) as cluster:
        workers = [cluster.spawn_worker(cmd, r) for r in range(2)]
        if kill_after_iterations is not None:
            deadline = time.monotonic() + 120
            while True:  # the scheduler's task progress tells how far training is
                done = _tasks_done(cluster)
                if done is not None and done >= kill_after_iterations:
                    break
                assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
                time.sleep(0.05)
            cluster.kill("server 1", signal.SIGKILL)
        assert [w.wait(150) for w in workers] == [0, 0]
    return json.loads(out.read_text())


def test_lr_survives_a_server_kill_and_reaches_the_same_objective(data, tmp_path):
    calm = _train(data, tmp_path / "calm.json")
    killed = _train(data, tmp_path / "killed.json", kill_after_iterations=16 * 8)
    assert killed["passes"] == calm["passes"] == 30
    # every acknowledged update survived the failover: the run ends where the undisturbed one does
    assert killed["train_objective"] == pytest.approx(calm["train_objective"], rel=1e-4)
