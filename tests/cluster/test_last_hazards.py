"""The last hazards of fault tolerance, with real processes: a worker SIGKILLed between sending
pushes and their acknowledgements (the others' sums exact, its own pushes applied at most once and
at least as often as acknowledged), a stalled (SIGSTOPped) server resumed after the cluster replaced
it (it serves nothing stale and never comes back), and a restore with a missing shard (a clear
error naming the file). A checkpoint taken while a server dies: test_checkpoint_cluster.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pserver
from pserver.membership.client import scheduler_request

from .conftest import PROGRAMS

pytestmark = pytest.mark.slow
NKEYS = 20_000


def _progress(tmp_path, rank: int) -> int:
    try:
        return int((tmp_path / f"progress{rank}").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _wait(cond, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert all(p.poll() is None for p in procs), f"a process exited waiting for {what}"
        time.sleep(0.05)


def _states(cluster) -> dict[int, str]:
    nodes = scheduler_request(cluster.config(), "status", role="worker", timeout=5.0).meta["nodes"]
    return {n["rank"]: n["state"] for n in nodes if n["role"] == "server"}


def _counters(cluster, out, rounds: int) -> list:
    """Workers of rank 0 and 1 running the exact-count program (results in ``out``)."""
    cmd = [sys.executable, str(PROGRAMS / "progress_count_worker.py"), str(out), str(rounds),
           str(NKEYS)]
    return [cluster.spawn_worker(cmd, r) for r in (0, 1)]


def test_a_worker_killed_between_push_and_ack_applies_each_push_at_most_once(cluster_factory,
                                                                             tmp_path):
    rounds = 300
    cluster = cluster_factory(3, 3, replication=1)
    counters = _counters(cluster, tmp_path, rounds)
    victim = cluster.spawn_worker([sys.executable, str(PROGRAMS / "victim_push_worker.py"),
                                   str(tmp_path), str(NKEYS)], 2)
    victim_file = tmp_path / "victim"
    _wait(lambda: victim_file.exists() and int(victim_file.read_text().split()[1]) >= 20
          and _progress(tmp_path, 0) >= 20, 120, "pushes of every worker", [victim, *counters])
    victim.send_signal(signal.SIGKILL)            # 8 pushes in flight: sent, not acknowledged
    victim.wait(10)
    sent, acked = map(int, victim_file.read_text().split())
    assert sent > acked
    assert [c.wait(240) for c in counters] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    others = sum(r["acked"] for r in results)
    assert others == 2 * rounds
    for r in results:   # every key: the others' pushes once each, the victim's between acked and sent
        assert acked <= r["min"] - others and r["max"] - others <= sent, (r, sent, acked)


def test_a_stalled_server_resumed_after_its_replacement_serves_nothing_stale(cluster_factory,
                                                                             tmp_path):
    """SIGSTOP a server for longer than the heartbeat timeout: the scheduler declares it dead and
    its ranges fail over. Resumed (SIGCONT), it finds requests and forwards from before the stall
    in its socket: the replicas refuse its forwards (fencing), the scheduler tells it it is dead,
    and it exits; it never answers as the owner of anything again. Exact sums."""
    rounds = 1500
    cluster = cluster_factory(3, 2, replication=1, heartbeat_timeout=1.0)
    counters = _counters(cluster, tmp_path, rounds)
    _wait(lambda: _progress(tmp_path, 0) >= 20, 120, "the first pushes", counters)
    stalled = cluster.procs["server 0"]
    stalled.send_signal(signal.SIGSTOP)
    try:
        _wait(lambda: _states(cluster)[0] == "dead", 60, "the stalled server to be declared dead")
        at = _progress(tmp_path, 0)
        _wait(lambda: _progress(tmp_path, 0) >= at + 20, 120, "pushes after the failover", counters)
    finally:
        stalled.send_signal(signal.SIGCONT)
    stalled.wait(60)                                   # told it is dead: it leaves
    assert [c.wait(240) for c in counters] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = sum(r["acked"] for r in results)
    assert total == 2 * rounds
    for r in results:
        assert r["min"] == total and r["max"] == total, r
        assert r["ring_version"] > 1


def test_restoring_with_a_missing_shard_names_it(cluster_factory, tmp_path):
    d = tmp_path / "ckpt"
    cluster = cluster_factory(2, 1, checkpoint_dir=str(d))
    kv = pserver.KVWorker(cluster.config(0))
    keys = np.arange(1000, dtype=np.uint64)
    try:
        kv.wait(kv.push(keys, np.ones(len(keys), np.float32)))
        name = cluster.checkpoint()["name"]
    finally:
        kv.close()
    cluster.stop()
    shard = sorted((d / name).glob("shard-*.npz"))[0]
    kept = tmp_path / "kept.npz"
    shutil.move(shard, kept)
    env = {**cluster.env(), "PSERVER_CONNECT_TIMEOUT": "5"}
    done = subprocess.run([sys.executable, "-m", "pserver", "scheduler", "--restore", str(d)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"shard file {shard.name} of server" in done.stderr and "is missing" in done.stderr, \
        done.stderr
    shutil.move(kept, shard)                      # put back: the same checkpoint restores again
    restored = cluster_factory(2, 1, restore=str(d))
    kv = pserver.KVWorker(restored.config(0))
    try:
        assert kv.pull(keys).tolist() == [1.0] * len(keys)
    finally:
        kv.close()
