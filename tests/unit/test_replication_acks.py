"""The master's replication interface without sockets: typed tokens settled by one ack counter,
configuration from the cluster view, replies from replicas (acks, malformed acks, re-copy
requests), and a master core releasing a worker's ack only once its replica acknowledged."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.errors import ProtocolError
from pserver.ft.replication import PrecopyAck, Replicator, RoundAck
from pserver.kv.core import ServerCore
from pserver.membership.view import ClusterView, NodeInfo
from pserver.ring import KeyRing
from pserver.testing import RecordingTransport
from pserver.wire import Message


def _view(servers=(1, 2, 3), dead=(), k: int = 1, workers=(4,)) -> ClusterView:
    nodes = {s: NodeInfo(s, "server", i, "h", s, 0, alive=s not in dead) for i, s in enumerate(servers)}
    nodes.update({w: NodeInfo(w, "worker", i, "h", 0, 0) for i, w in enumerate(workers)})
    return ClusterView(version=1, nodes=nodes, ring=KeyRing(list(servers), version=1),
                       settings={"replication": k})


def _master() -> tuple[Replicator, RecordingTransport]:
    cap = RecordingTransport()
    repl = Replicator(cap, 1, lambda sid: ("h", sid))
    repl.configure(_view())
    repl.adopt_ring(KeyRing([1, 2, 3], version=1), False, {})
    return repl, cap


KEYS = np.arange(0, 2**64 - 2**54, 2**54, dtype=np.uint64)


def test_every_token_kind_is_counted_once_per_replica_and_settled_by_the_last_ack():
    repl, cap = _master()
    vals = np.ones((len(KEYS), 1), np.float32)
    rnd = RoundAck([(b"n4", 1, 0), (b"n5", 1, 0)])
    assert repl.forward(rnd, "replicate_agg", "t", {"clk": []}, KEYS, vals, always=True) == 2
    assert repl.outstanding == {rnd: 2}
    (sid_a, first), (sid_b, second) = cap.sent
    assert repl.on_reply(sid_a, Message("repl_ack", first.ts)) == []
    assert repl.on_reply(sid_b, Message("repl_ack", 0, meta={"rids": [second.ts]})) == [rnd]
    assert repl.outstanding == {} and repl.waiting == {}


def test_a_malformed_ack_is_refused_and_settles_nothing():
    repl, cap = _master()
    token = (b"n4", 1, 0)
    repl.forward(token, "replicate", "t", {}, KEYS, np.ones((len(KEYS), 1), np.float32))
    with pytest.raises(ProtocolError):
        repl.on_reply(cap.sent[0][0], Message("repl_ack", 0, meta={"rids": ["x"]}))
    assert repl.outstanding == {token: 2}


def test_a_dead_replica_in_a_new_view_settles_what_waited_for_it():
    repl, cap = _master()
    token = (b"n4", 1, 0)
    repl.forward(token, "replicate", "t", {}, KEYS, np.ones((len(KEYS), 1), np.float32))
    (sid_a, first), (sid_b, _) = cap.sent
    assert repl.on_reply(sid_a, Message("repl_ack", first.ts)) == []
    assert repl.configure(_view(dead=(sid_b,))) == [token]


def test_a_recopy_request_is_counted_and_checked():
    repl, _ = _master()
    repl.on_reply(2, Message("repl_resync", 0, "t", {"lo": 5, "hi": 10}))
    rebuilder = repl.rebuilder
    assert rebuilder.resyncs == [(2, "t", 5, 10)] and rebuilder.has_work()
    assert repl.stats()["resyncs_requested"] == 1
    with pytest.raises(ProtocolError):
        repl.on_reply(2, Message("repl_resync", 0, "t", {"lo": 10, "hi": 5}))


def test_a_master_acknowledges_a_push_only_after_its_replicas_did():
    cap = RecordingTransport()
    repl = Replicator(cap, 1, lambda sid: ("h", sid))
    core = ServerCore(repl)
    core.on_view(_view())
    push = Message("push", 7, "default", {"kf": "k", "p": 0, "rv": 1},
                   [KEYS, np.ones((len(KEYS), 1), np.float32)])
    repl.begin_batch()
    core.handle(b"n4", push)
    core.on_replicated(repl.flush())
    assert core.acks.due == {} and len(cap.sent) == 2  # applied here, waiting for two replicas
    for sid, fwd in cap.sent:
        core.on_replica_reply(sid, Message("repl_ack", fwd.ts))
    assert core.acks.take()[0][1].ts == 7


def test_the_last_precopy_ack_answers_the_scheduler():
    core = ServerCore(Replicator(None, 1, None))
    core.on_replicated([PrecopyAck(b"sched", 12)])
    assert [(to, m.op, m.ts) for to, m in core.out] == [(b"sched", "migrate_ready", 12)]
