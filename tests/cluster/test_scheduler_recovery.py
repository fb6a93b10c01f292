"""The scheduler SIGKILLed during an exact-count job: servers and workers serve on without it
(pushes are still acknowledged), a scheduler restarted with --recover on the same address rebuilds
the view from the nodes' rejoins (same ids, ranks and ring), and the job finishes with exact sums."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from pserver.membership.client import scheduler_request

from .conftest import PROGRAMS

pytestmark = pytest.mark.slow

WORKERS, ROUNDS, NKEYS = 2, 400, 20_000


def _progress(tmp_path, rank: int) -> int:
    try:
        return int((tmp_path / f"progress{rank}").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _status(cluster) -> dict:
    return scheduler_request(cluster.config(), "status", role="worker", timeout=5.0).meta


def test_scheduler_killed_and_recovered_mid_job_exact_sums(cluster_factory, tmp_path):
    cluster = cluster_factory(3, WORKERS, replication=1)
    cmd = [sys.executable, str(PROGRAMS / "progress_count_worker.py"), str(tmp_path), str(ROUNDS),
           str(NKEYS)]
    workers = [cluster.spawn_worker(cmd, rank) for rank in range(WORKERS)]
    deadline = time.monotonic() + 120
    while not all(_progress(tmp_path, r) >= 20 for r in range(WORKERS)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.05)
    before = {(n["role"], n["rank"], n["id"]) for n in _status(cluster)["nodes"]}
    ring_before = _status(cluster)["ring"]

    cluster.kill("scheduler", signal.SIGKILL)
    cluster.procs["scheduler"].wait(10)
    at_kill = sum(_progress(tmp_path, r) for r in range(WORKERS))
    time.sleep(3.0)   # longer than the old 3 s "scheduler lost" exit of the nodes
    during = sum(_progress(tmp_path, r) for r in range(WORKERS))
    servers = [p for name, p in cluster.procs.items() if name.startswith("server")]
    assert all(p.poll() is None for p in servers), "a server exited without the scheduler"
    assert all(w.poll() is None for w in workers), "a worker gave up without the scheduler"
    assert during > at_kill, "no push was acknowledged while the scheduler was down"

    cluster.restart_scheduler()
    codes = [w.wait(240) for w in workers]
    assert codes == [0] * WORKERS
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORKERS)]
    total = sum(r["acked"] for r in results)
    assert total == WORKERS * ROUNDS
    for r in results:
        assert r["min"] == total and r["max"] == total, r
        assert r["ring_version"] == ring_before["version"]       # no failover happened
        assert ("worker", r["rank"], r["id"]) in before          # same id, same rank
