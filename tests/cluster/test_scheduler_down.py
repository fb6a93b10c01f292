"""What needs the scheduler: a server that dies while the scheduler is down is not failed over
until a scheduler is back (its parts wait in the workers), and the restarted scheduler (--recover)
finds it missing from the rejoins, declares it dead and fails its ranges over. Exact sums, no
acknowledged push lost. (Pushes and pulls without the scheduler: test_scheduler_recovery.py.)"""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from pserver.errors import PServerError
from pserver.membership.client import scheduler_request

from .conftest import PROGRAMS

pytestmark = pytest.mark.slow
WORKERS, ROUNDS, NKEYS = 2, 600, 20_000


def _progress(tmp_path) -> int:
    total = 0
    for r in range(WORKERS):
        try:
            total += int((tmp_path / f"progress{r}").read_text())
        except (FileNotFoundError, ValueError):
            pass
    return total


def test_a_server_dying_while_the_scheduler_is_down_fails_over_once_it_is_back(cluster_factory,
                                                                                tmp_path):
    cluster = cluster_factory(3, WORKERS, replication=1, heartbeat_timeout=1.0)
    cmd = [sys.executable, str(PROGRAMS / "progress_count_worker.py"), str(tmp_path), str(ROUNDS),
           str(NKEYS)]
    workers = [cluster.spawn_worker(cmd, rank) for rank in range(WORKERS)]
    deadline = time.monotonic() + 120
    while _progress(tmp_path) < 40:
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.05)
    cluster.kill("scheduler", signal.SIGKILL)
    cluster.procs["scheduler"].wait(10)
    cluster.kill("server 0", signal.SIGKILL)
    cluster.procs["server 0"].wait(10)
    time.sleep(1.0)
    stalled = _progress(tmp_path)
    time.sleep(2.0)
    # every push has keys on server 0, and nobody can fail it over: no push completes
    assert _progress(tmp_path) - stalled < 5 * WORKERS
    assert all(w.poll() is None for w in workers)

    cluster.restart_scheduler()
    deadline = time.monotonic() + 60
    while _server_state(cluster, 0) != "dead":     # not rejoined: the detector declares it dead
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert [w.wait(240) for w in workers] == [0] * WORKERS
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORKERS)]
    total = sum(r["acked"] for r in results)
    assert total == WORKERS * ROUNDS
    for r in results:
        assert r["min"] == total and r["max"] == total, r
        assert r["ring_version"] > 1                          # the failover happened


def _server_state(cluster, rank: int) -> str | None:
    try:
        nodes = scheduler_request(cluster.config(), "status", role="worker", timeout=2.0).meta["nodes"]
    except PServerError:  # not answering yet (recovering)
        return None
    return {n["rank"]: n["state"] for n in nodes if n["role"] == "server"}.get(rank)
