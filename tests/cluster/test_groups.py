"""Worker groups on one cluster (real processes on loopback): separate ranks, barriers and
synchronous rounds per group, late joiners, read-only groups, dead members dropped."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from pserver import KVWorker
from pserver.errors import ReadOnlyGroupError, RemoteError

from .conftest import PROGRAMS, pserver_cli

KEYS = np.arange(0, 3000, 7, dtype=np.uint64)  # the program's keys
PROGRAM = [sys.executable, str(PROGRAMS / "group_worker.py")]


def _spawn(cluster, group: str, *args: str, rank: int | None = None):
    return cluster.spawn_worker([*PROGRAM, *args], rank, env={"PSERVER_GROUP": group})


def _wait_for(pred, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _exit_codes(procs, timeout: float = 120.0) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def _done(out, group: str) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out.glob(f"done-{group}-*.json")),
                  key=lambda d: d["rank"])


def test_two_groups_have_their_own_ranks_barriers_and_sync_rounds(cluster_factory, tmp_path):
    """Group a (2 workers, 3 rounds) and group b (3 workers, 6 rounds) push the same sync table:
    b's rounds 3..5 must not wait for a's workers, which stay alive until b has finished."""
    c = cluster_factory(2, 0, scheduler_args=["--keep-alive", "--group-size", "a=2",
                                              "--group-size", "b=3"])
    signal_file = str(tmp_path / "b-finished")
    a = [_spawn(c, "a", "job", str(tmp_path), "t", "3", "0", signal_file) for _ in range(2)]
    b = [_spawn(c, "b", "job", str(tmp_path), "t", "6") for _ in range(3)]
    assert _exit_codes(b) == [0, 0, 0]  # finished while every member of a is alive
    open(signal_file, "w").close()
    assert _exit_codes(a) == [0, 0]
    assert [(d["rank"], d["num_workers"]) for d in _done(tmp_path, "a")] == [(0, 2), (1, 2)]
    assert [(d["rank"], d["num_workers"]) for d in _done(tmp_path, "b")] == [(0, 3), (1, 3),
                                                                              (2, 3)]
    with KVWorker(c.config(), group="check") as kv:
        kv.declare_table("t", sync=True, pushes=False)
        np.testing.assert_array_equal(kv.pull(KEYS, table="t"), 2 * 3 + 3 * 6)  # exact sums


def test_a_worker_joining_a_running_sync_job_takes_part_from_the_current_round(
        cluster_factory, tmp_path):
    c = cluster_factory(2, 0, scheduler_args=["--keep-alive", "--group-size", "job=2"])
    rounds = 120
    first = [_spawn(c, "job", "job", str(tmp_path), "t", str(rounds), "0.02") for _ in range(2)]
    progress = tmp_path / "progress-job-0"
    _wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 15,
              what="the job's round 15")
    joiner = _spawn(c, "job", "job", str(tmp_path), "t", str(rounds))
    assert _exit_codes([*first, joiner]) == [0, 0, 0]
    done = _done(tmp_path, "job")
    assert [d["rank"] for d in done] == [0, 1, 2]  # the joiner got the next rank of its group
    late = done[2]["start"]
    assert 15 <= late < rounds  # the declare reply named the running job's current round
    with KVWorker(c.config(), group="check") as kv:
        kv.declare_table("t", sync=True, pushes=False)
        np.testing.assert_array_equal(kv.pull(KEYS, table="t"), 2 * rounds + (rounds - late))


def test_a_live_client_of_another_group_that_declared_the_table_blocks_no_round(
        cluster_factory, tmp_path):
    """A client of group "idle" declares the sync table as a pusher and never pushes: only its
    own group's rounds could wait for it, not the job's."""
    c = cluster_factory(2, 0, scheduler_args=["--keep-alive", "--group-size", "job=2"])
    with KVWorker(c.config(), group="idle") as idle:
        idle.declare_table("t", sync=True)
        job = [_spawn(c, "job", "job", str(tmp_path), "t", "5") for _ in range(2)]
        assert _exit_codes(job, timeout=90) == [0, 0]
        np.testing.assert_array_equal(idle.pull(KEYS, table="t"), 2 * 5)


def test_a_read_only_groups_pushes_are_refused_and_values_unchanged(cluster_factory):
    c = cluster_factory(2, 0, scheduler_args=["--keep-alive", "--read-only-group", "serve"])
    with KVWorker(c.config()) as writer, KVWorker(c.config(), group="serve") as reader, \
            KVWorker(c.config(), group="query", read_only=True) as asked:
        writer.declare_table("w")
        writer.wait(writer.push(KEYS, np.full(len(KEYS), 2.0, np.float32), table="w"))
        for kv in (reader, asked):
            kv.declare_table("w", pushes=False)  # reading is allowed
            np.testing.assert_array_equal(kv.pull(KEYS, table="w"), 2.0)
            with pytest.raises(ReadOnlyGroupError, match=f"group '{kv.group}' is read-only"):
                kv.declare_table("w")  # as a pusher
            kv.declare_table("v", pushes=False)
            kv._read_only.discard("v")  # a client that skips its own check: the servers refuse
            with pytest.raises(ReadOnlyGroupError, match=f"group '{kv.group}' is read-only"):
                kv.wait(kv.push(KEYS, np.ones(len(KEYS), np.float32), table="v"))
            with pytest.raises(ReadOnlyGroupError, match="read-only"):
                kv.push_pull(KEYS, np.ones(len(KEYS), np.float32), table="v")
        np.testing.assert_array_equal(writer.pull(KEYS, table="w"), 2.0)  # unchanged
        writer.declare_table("v")
        np.testing.assert_array_equal(writer.pull(KEYS, table="v"), 0.0)
        # a worker cannot make a group with writers read-only, nor lift a restriction
        with pytest.raises(RemoteError, match="writing member"):
            KVWorker(c.config(), read_only=True)
        with KVWorker(c.config(), group="serve", read_only=False) as again:
            again.declare_table("w", pushes=False)
            again._read_only.discard("w")
            with pytest.raises(ReadOnlyGroupError):
                again.wait(again.push(KEYS, np.ones(len(KEYS), np.float32), table="w"))
        np.testing.assert_array_equal(writer.pull(KEYS, table="w"), 2.0)
        status = writer.membership.status()["groups"]
        assert status["serve"]["read_only"] and status["query"]["read_only"]
        assert not status["default"]["read_only"]


def test_a_dead_member_is_dropped_from_its_groups_barrier(cluster_factory, tmp_path):
    """Group g: one member waits at a barrier, the other is SIGKILLed; a live worker of another
    group that never arrives does not count."""
    c = cluster_factory(1, 0, scheduler_args=["--keep-alive"])
    with KVWorker(c.config(), group="other"):
        hung = _spawn(c, "g", "hang", rank=1)
        _wait_for(lambda: len(c.wait_scheduler()["groups"].get("g", {}).get("members", [])) == 1,
                  what="the hanging member")
        waiter = _spawn(c, "g", "barrier", str(tmp_path), rank=0)
        time.sleep(1.0)  # let it arrive (no assertion rests on this)
        assert not (tmp_path / "released-0").exists()  # held: its group's other member is live
        os.kill(hung.pid, signal.SIGKILL)
        assert _exit_codes([waiter], timeout=60) == [0]
        assert (tmp_path / "released-0").exists()
        hung.wait(timeout=10)


def test_launch_runs_its_workers_in_the_group_it_is_given():
    # read between two barriers: after the first the other member may not leave (it waits at
    # the second), so num_workers counts it; CI saw 1 when it was read after a lone barrier
    code = ("import pserver; kv = pserver.KVWorker(); kv.barrier(); n = kv.num_workers; "
            "kv.barrier('read'); print('member', kv.group, kv.rank, n, flush=True); kv.close()")
    r = pserver_cli("launch", "-s", "1", "-w", "2", "--group", "g", "--insecure",
                    "--heartbeat-timeout", "2", "--", sys.executable, "-c", code, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    members = sorted(line.split("member ", 1)[1] for line in r.stdout.splitlines()
                     if "member " in line)
    assert members == ["g 0 2", "g 1 2"]  # the start did not wait for default-group workers
