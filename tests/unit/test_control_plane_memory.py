"""The control-plane loops over in-memory links: the real scheduler loop, memberships (registration,
heartbeats, barriers), scheduler_request and the executor's task channel - no socket, no process."""

from __future__ import annotations

import threading
import time

import pytest

from pserver import wire
from pserver.consistency.executor import Executor
from pserver.errors import RemoteError, SchedulerUnreachableError, WorkerDeclaredDeadError
from pserver.link import MemoryHub
from pserver.membership.client import scheduler_request
from pserver.membership.scheduler import Scheduler
from pserver.testing import MemoryCluster, MemoryTransport, RecordingLink, ScriptedKV, memory_config
from pserver.wire import Message


def _in_thread(fn, *args):
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_registration_and_barrier_run_in_memory():
    with MemoryCluster(num_servers=1, num_workers=2) as c:
        server, w1, w2 = c.join_all(["server", "worker", "worker"])
        assert server.node_id == 1 and {w1.rank, w2.rank} == {0, 1}  # servers are admitted first
        assert w1.view.num_workers == 2 and w1.view.ring.servers == [1]
        t, out = _in_thread(w1.barrier, "b")
        t.join(0.2)
        assert t.is_alive()                       # w2 has not arrived: w1 waits
        w2.barrier("b")
        t.join(10)
        assert not t.is_alive() and out == {"value": None}
        status = w1.status()
        assert status["scheduler"]["started"] and len(status["nodes"]) == 3


def test_a_released_barrier_brings_the_view_it_completed_in():
    # CI: a worker read num_workers == 1 right after a barrier both workers passed (the view
    # naming the second one had not come on its heartbeat link yet); the reply now carries it
    with MemoryCluster(num_servers=1, num_workers=2) as c:
        _, w1, w2 = c.join_all(["server", "worker", "worker"])
        t, out = _in_thread(w2.barrier, "b")
        done = w1.request("barrier", {"id": w1.node_id, "name": "b", "group": "worker"}, 10,
                          "barrier_done")
        t.join(10)
        assert out == {"value": None}
        view = done.meta["view"]
        assert done.meta["v"] == view["version"] == c.scheduler.view.version
        assert sorted(n["id"] for n in view["nodes"] if n["role"] == "worker") == sorted(
            [w1.node_id, w2.node_id])


def test_a_dead_worker_releases_the_barrier_and_is_refused_at_its_next_one():
    # the refusal: a false failover (a lossy link) let the live workers pass the barrier without
    # it, and it waited for them at the same barrier until the barrier timeout
    with MemoryCluster(num_servers=1, num_workers=2) as c:
        _, w1, w2 = c.join_all(["server", "worker", "worker"])
        t, out = _in_thread(w1.barrier, "b")
        w2.close()                                # its heartbeats stop: the scheduler declares it dead
        t.join(20)
        assert out == {"value": None}
        assert not c.scheduler.view.alive(w2.node_id)
        with pytest.raises(RemoteError, match=f"worker {w2.node_id} was declared dead"):
            w2.barrier("b")
        w2.declared_dead.set()                    # what its next heartbeat reply says
        with pytest.raises(WorkerDeclaredDeadError, match="restart it"):
            w2.barrier("b")


def test_a_node_cannot_arrive_at_a_barrier_for_another():
    with MemoryCluster(num_servers=1, num_workers=2) as c:
        _, w1, w2 = c.join_all(["server", "worker", "worker"])
        with pytest.raises(RemoteError, match="only for itself"):
            w1.request("barrier", {"id": w2.node_id, "name": "x"}, 5, "barrier_done")


def test_a_barrier_of_an_unknown_group_is_refused():
    # before: the barrier had no members and every node passed it at once
    with MemoryCluster(num_servers=1, num_workers=1) as c:
        _, w = c.join_all(["server", "worker"])
        with pytest.raises(RemoteError, match="unknown barrier group"):
            w.barrier("x", group="workers", timeout=5)


def test_scheduler_request_in_memory_and_without_a_scheduler():
    with MemoryCluster(num_servers=1, num_workers=1) as c:
        c.join_all(["server", "worker"])
        tr = MemoryTransport(c.hub, c.cfg, "worker")
        reply = scheduler_request(c.cfg, "status", transport=tr)
        assert reply.op == "status" and reply.meta["scheduler"]["expected_workers"] == 1
    cfg = memory_config()
    with pytest.raises(SchedulerUnreachableError, match="no answer from the scheduler"):
        scheduler_request(cfg, "status", transport=MemoryTransport(MemoryHub(), cfg, "worker"))


class _KV(ScriptedKV):
    """What the executor's task channel needs of a KVWorker: transport, membership, cfg."""

    def __init__(self, membership):
        super().__init__()
        self.membership, self.transport, self.cfg = membership, membership.transport, membership.cfg


def test_executor_gets_its_tasks_from_the_scheduler_in_memory():
    with MemoryCluster(num_servers=1, num_workers=1) as c:
        _, w = c.join_all(["server", "worker"])
        ex = Executor(_KV(w), "bounded_delay:1", app="demo", lookahead=4)
        ex.plan(6)
        ran = []
        for t, _ in ex.assigned():
            ex.run(t, lambda t: (ran.append(t), ex.push(None, None)))
        ex.close()
        assert ran == list(range(6))
        # the last report reaches the scheduler's loop a little later: ask it (the status reply
        # is built in that loop, after the report it received first)
        progress = w.status()["tasks"]["demo"]
        assert progress["complete"] == 6 and progress["finished"], progress


# -- the scheduler's message handling, one turn of its loop at a time --------------------------------
class _RecordingTransport(MemoryTransport):
    """The scheduler's ROUTER is a RecordingLink: the test scripts what arrives."""

    def router_link(self, host, port=0, handover=False):
        self.router = RecordingLink(routed=True)
        return self.router, port


def _scheduler() -> tuple[Scheduler, RecordingLink]:
    cfg = memory_config(num_servers=1, num_workers=1)
    tr = _RecordingTransport(MemoryHub(), cfg, "scheduler")
    return Scheduler(cfg, transport=tr), tr.router


def test_malformed_input_gets_an_error_reply_and_changes_nothing():
    sched, link = _scheduler()
    link.push([b"garbage"], b"a")
    link.push(Message("register", 1, meta={"role": "worker"}), b"b")         # no host/port
    link.push(Message("register", 2, meta={"role": "scheduler", "host": "h", "port": 1,
                                           "pid": 1}), b"c")
    link.push(Message("heartbeat", 3, meta={"id": 9}), b"d")                 # unknown node
    link.push(Message("nonsense", 4), b"e")
    link.fail_to.add(b"e")                                                   # e vanished meanwhile
    assert sched.step() is False
    assert [(to, m.op) for to, m in link.sent] == [(b"a", "error"), (b"b", "error"),
                                                   (b"c", "error"), (b"d", "error")]
    assert sched.rejected == 5 and sched.rejections["ProtocolError"] == 1
    assert sched.view.nodes == {} and sched.pending.requests == [] and not sched.started


def test_registration_answers_and_starts_the_cluster_once_all_came():
    sched, link = _scheduler()
    reg = {"host": "h", "port": 7, "pid": 1}
    link.push(Message("register", 1, meta={"role": "worker", **reg}), b"w")
    sched.step()
    assert [(to, m.op) for to, m in link.sent] == [(b"w", "registered")] and not sched.started
    link.push(Message("register", 1, meta={"role": "server", **reg}), b"s")
    sched.step()
    welcome = {to: m for to, m in link.sent if m.op == "welcome"}
    assert sched.started and welcome[b"s"].meta["id"] == 1 and welcome[b"w"].meta["id"] == 2
    assert welcome[b"w"].meta["view"]["ring"]["servers"] == [1]


def test_recording_link_decodes_what_was_sent():
    link = RecordingLink(routed=False)
    link.send(wire.Message("push", 3, meta={"x": 1}))
    assert link.sent[0][1].meta == {"x": 1} and link.events == [("send", None, link.sent[0][1])]


def _until(cond, timeout: float = 20.0) -> bool:
    """Wait (not a timing assertion: a generous bound) for ``cond()`` to hold."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_heartbeats_carry_a_late_join_and_the_shutdown_to_every_node():
    with MemoryCluster(num_servers=1, num_workers=1) as c:
        server, w1 = c.join_all(["server", "worker"])
        w2 = c.join("worker")                     # the cluster runs: admitted at once
        assert w2.rank == 1 and w2.view.num_workers == 2
        assert _until(lambda: w1.view.num_workers == 2 and server.view.num_workers == 2)
        tr = MemoryTransport(c.hub, c.cfg, "scheduler")
        assert scheduler_request(c.cfg, "shutdown", transport=tr).op == "ok"
        assert _until(lambda: all(n.shutdown_requested.is_set() for n in (server, w1, w2)))


def test_a_shutdown_before_the_start_answers_the_nodes_still_waiting_for_it():
    # they waited out their connect timeout (10 s of every test teardown of such a cluster)
    with MemoryCluster(num_servers=1, num_workers=2, connect_timeout=30.0) as c:
        t, out = _in_thread(c.join, "server")
        assert _until(lambda: c.scheduler.pending.count("server") == 1)
        tr = MemoryTransport(c.hub, c.cfg, "scheduler")
        start = time.monotonic()
        assert scheduler_request(c.cfg, "shutdown", transport=tr).op == "ok"
        t.join(10)
        assert not t.is_alive() and time.monotonic() - start < 5
        assert isinstance(out["error"], RemoteError)
        assert "shut down before it started" in str(out["error"])


def test_a_replicas_failed_applies_reach_the_status_never_silent():
    from pserver.cli import format_status

    sched, link = _scheduler()
    reg = {"host": "h", "port": 7, "pid": 1}
    link.push(Message("register", 1, meta={"role": "server", **reg}), b"s")
    link.push(Message("register", 1, meta={"role": "worker", **reg}), b"w")
    sched.step()
    link.push(Message("heartbeat", 2, meta={"id": 1, "replica_apply_errors": 3}), b"s")
    sched.step()
    status = sched.status()
    server = next(n for n in status["nodes"] if n["id"] == 1)
    assert server["replica_apply_errors"] == 3
    assert "server 1: 3 forwarded updates failed to apply as a replica" in format_status(status)
