"""Bounded memory under overload: 8 worker processes push far faster than one server applies (its
update rule takes 30 ms a push: tests/cluster/programs/slowrules.py). The
server reads at most PSERVER_RECV_QUEUE messages ahead from each peer (the rest waits in the peers'
TCP connections), so its resident memory stays within a budget derived from that bound, and every
push is still applied exactly once."""

from __future__ import annotations

import sys
import time

import pytest

from .conftest import PROGRAMS

pytestmark = pytest.mark.slow

WORKERS, PUSHES, NKEYS, QUEUE = 8, 30, 150_000, 4
MESSAGE = NKEYS * 12                      # uint64 keys + float32 values
BUDGET = WORKERS * QUEUE * MESSAGE + (64 << 20)   # the queue bound plus 64 MB of slack


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0


def _settled_rss(pid: int, timeout: float = 60.0) -> int:
    """The server's RSS once its start-up is over: it loads the store's compiled kernels in a
    background thread (~40 MB) after registering, which must not count as growth under load."""
    deadline = time.monotonic() + timeout
    last = _rss(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _rss(pid)
        if abs(now - last) < (1 << 20):
            return now
        last = now
    return last


def test_server_memory_stays_bounded_while_8_workers_overload_it(cluster_factory, tmp_path):
    cluster = cluster_factory(1, WORKERS, replication=0, settings={"recv_queue": QUEUE},
                              heartbeat_timeout=5.0, server_args=["--plugin", "slowrules"],
                              env={"PYTHONPATH": str(PROGRAMS)})
    server = cluster.procs["server 0"].pid
    cluster.wait_scheduler()
    baseline = _settled_rss(server)
    cmd = [sys.executable, str(PROGRAMS / "overload_worker.py"), str(tmp_path), str(PUSHES),
           str(NKEYS)]
    workers = [cluster.spawn_worker(cmd, rank) for rank in range(WORKERS)]
    peak = baseline
    deadline = time.monotonic() + 400
    while any(w.poll() is None for w in workers):
        assert time.monotonic() < deadline, "the workers did not finish"
        peak = max(peak, _rss(server))
        time.sleep(0.02)
    assert [w.returncode for w in workers] == [0] * WORKERS
    growth = peak - baseline
    print(f"server RSS: baseline {baseline >> 20} MB, peak {peak >> 20} MB, growth "
          f"{growth >> 20} MB; budget {BUDGET >> 20} MB, unbounded it could queue "
          f"{WORKERS * PUSHES * MESSAGE >> 20} MB")
    assert growth < BUDGET
    # every push applied once
    lo, hi = (float(v) for v in (tmp_path / "sums").read_text().split())
    assert lo == hi == WORKERS * PUSHES
