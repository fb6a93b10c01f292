"""Fencing without sockets: a replica refuses every forward of a master its view names dead (nothing
applied, nothing acknowledged, ``repl_fenced`` back), and a master told so settles nothing - the
worker's push is never acknowledged by a server the cluster declared dead."""

from __future__ import annotations

import numpy as np

from pserver.ft.fencing import FENCED, fenced_masters
from pserver.ft.replication import Replicator
from pserver.kv.core import ServerCore
from pserver.membership.view import ClusterView, NodeInfo
from pserver.ring import KeyRing
from pserver.testing import RecordingTransport
from pserver.wire import Message

KEYS = np.arange(0, 2**64 - 2**54, 2**54, dtype=np.uint64)


def _view(dead=(), version: int = 1, servers=(1, 2, 3)) -> ClusterView:
    nodes = {s: NodeInfo(s, "server", i, "h", s, 0, alive=s not in dead,
                         state="dead" if s in dead else "up") for i, s in enumerate(servers)}
    nodes[4] = NodeInfo(4, "worker", 0, "h", 0, 0)
    live = [s for s in servers if s not in dead]
    return ClusterView(version=version, nodes=nodes, ring=KeyRing(live, version=version),
                       settings={"replication": 1})


def _forward(ts: int) -> Message:
    return Message("replicate", ts, "default", {"kf": "k", "src": 4, "wts": ts, "wp": 0},
                   [KEYS, np.ones((len(KEYS), 1), np.float32)])


def _replica(view: ClusterView) -> ServerCore:
    core = ServerCore(Replicator(RecordingTransport(), 2, lambda sid: ("h", sid)))
    core.on_view(view)
    return core


def test_the_fenced_masters_are_the_servers_the_view_names_dead_or_gone():
    view = _view(dead=(1,))
    view.nodes[3].alive, view.nodes[3].state = False, "left"
    view.nodes[9] = NodeInfo(9, "worker", 1, "h", 0, 0, alive=False, state="dead")
    assert fenced_masters(view) == {b"s1", b"s3"}
    assert fenced_masters(_view()) == frozenset()


def test_a_replica_refuses_a_forward_from_a_master_its_view_names_dead():
    core = _replica(_view(dead=(1,), version=2))
    core.handle(b"s1", _forward(7), "server")
    core.replica.apply_deferred()
    assert [(to, m.op, m.ts) for to, m in core.out] == [(b"s1", FENCED, 7)]
    assert core.replica.acks_due is None and core.replica.refused_fenced == 1
    assert "default" not in core.tables or not core.tables["default"].pull(KEYS).any()
    # the worker's resend to the new master, naming the dead one, is not a duplicate: applied
    assert not core.exactly_once.seen(1, 4, 7, 0)


def test_a_fenced_masters_forwards_are_each_refused_but_logged_once(caplog):
    core = _replica(_view(dead=(1,), version=2))
    with caplog.at_level("WARNING", logger="pserver.ft.replica"):
        for ts in (7, 8, 9):
            core.handle(b"s1", _forward(ts), "server")
    assert [m.ts for _, m in core.out] == [7, 8, 9] and core.replica.refused_fenced == 3
    assert sum("names dead" in r.getMessage() for r in caplog.records) == 1


def test_a_replica_applies_forwards_of_live_masters_and_of_servers_it_does_not_know():
    core = _replica(_view(dead=(1,), version=2))
    core.handle(b"s3", _forward(7), "server")
    core.handle(b"s8", _forward(8), "server")   # a joiner the view does not name yet
    core.replica.apply_deferred()
    assert [m.op for _, m in core.out] == ["repl_ack", "repl_ack"]
    assert core.tables["default"].pull(KEYS).ravel().tolist() == [2.0] * len(KEYS)


def test_a_fenced_master_never_acknowledges_the_push_and_says_so():
    cap = RecordingTransport()
    repl = Replicator(cap, 1, lambda sid: ("h", sid))
    core = ServerCore(repl)
    core.on_view(_view(servers=(1, 2)))
    push = Message("push", 7, "default", {"kf": "k", "p": 0, "rv": 1},
                   [KEYS, np.ones((len(KEYS), 1), np.float32)])
    repl.begin_batch()
    core.handle(b"n4", push)
    core.on_replicated(repl.flush())
    ((sid, fwd),) = cap.sent
    core.on_replica_reply(sid, Message(FENCED, fwd.ts))
    assert repl.fenced_by == sid
    assert core.acks.take() == [] and not [m for to, m in core.out if to == b"n4"]
