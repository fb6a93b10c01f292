"""Replica forwarding: batching per drain burst (unit, on the Replicator's bookkeeping) and the
replica's handling of a batch message (a live server, over real sockets)."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

import pserver
from pserver import wire
from pserver.ft import replication
from pserver.ft.replication import Replicator
from pserver.ring import KeyRing
from pserver.testing import RecordingTransport
from pserver.wire import Limits, Message


def _replicator(max_bytes: int = 1 << 31) -> tuple[Replicator, RecordingTransport]:
    cap = RecordingTransport(Limits(max_message_bytes=max_bytes))
    repl = Replicator(cap, 1, lambda sid: ("127.0.0.1", sid))
    repl.k = 1
    repl.ring = KeyRing([1, 2, 3], version=1)
    return repl, cap


def _my_keys(repl: Replicator, n: int) -> np.ndarray:
    keys = np.unique(np.random.default_rng(n).integers(0, 2**63, 20 * n, dtype=np.uint64))
    return keys[repl.ring.owner_of(keys) == 1][:n]


def test_forwards_of_a_burst_travel_as_one_message_per_replica():
    repl, cap = _replicator()
    keys = _my_keys(repl, 200)
    holders = repl.ring.replica_table(1)[repl.ring.vnode_of(keys), 0]
    assert set(holders.tolist()) == {2, 3}  # both other servers replicate some of these keys
    repl.begin_batch()
    expected = {}
    for t in range(5):
        n = repl.forward(("w", t), "replicate", "default", {"src": 9, "wts": t, "wp": 0},
                         keys, np.full((len(keys), 1), t, np.float32))
        assert n == 2
        expected[("w", t)] = 2
    assert cap.sent == [] and repl.outstanding == expected   # queued, not sent
    assert repl.flush() == []
    assert sorted(sid for sid, _ in cap.sent) == [2, 3]
    for sid, msg in cap.sent:
        assert msg.op == "repl_batch" and len(msg.meta["items"]) == 5
        assert [m["wts"] for _, _, m in msg.meta["items"]] == [0, 1, 2, 3, 4]  # in order
        for i in range(5):
            k, v = msg.arrays[2 * i], msg.arrays[2 * i + 1]
            assert np.array_equal(k, keys[holders == sid]) and (v == i).all()
    # one ack per message releases every request it carried, once all replicas answered
    (rid2, sid2), (rid3, sid3) = sorted((m.ts, sid) for sid, m in cap.sent)
    assert repl.on_ack(rid2, sid2) == []
    assert sorted(repl.on_ack(rid3, sid3)) == sorted(expected)
    assert repl.outstanding == {} and repl.waiting == {}


def test_batches_are_chunked_by_item_count_and_size():
    repl, cap = _replicator(max_bytes=64_000)  # half of it per message: 32,000 bytes
    keys = _my_keys(repl, 300)
    repl.begin_batch()
    for t in range(replication.BATCH_ITEMS + 4):
        repl.forward(("w", t), "replicate", "default", {"src": 9, "wts": t, "wp": 0}, keys,
                     np.ones((len(keys), 1), np.float32))
    repl.flush()
    per_replica: dict[int, list[int]] = {}
    for sid, msg in cap.sent:
        items = msg.meta["items"] if msg.op == "repl_batch" else [[msg.op, msg.table, msg.meta]]
        per_replica.setdefault(sid, []).extend(m["wts"] for _, _, m in items)
        assert sum(a.nbytes for a in msg.arrays) <= 32_000 or len(items) == 1
        assert len(items) <= replication.BATCH_ITEMS
    for sid, order in per_replica.items():  # every update once, in order
        assert order == list(range(replication.BATCH_ITEMS + 4)), sid
    assert len(cap.sent) > 2


def test_a_dead_replica_releases_what_it_was_sent_and_what_was_queued_for_it():
    repl, cap = _replicator()
    keys = _my_keys(repl, 100)
    repl.forward(("w", 0), "replicate", "default", {"src": 9, "wts": 0, "wp": 0}, keys,
                 np.ones((len(keys), 1), np.float32))   # outside a burst: sent at once
    assert len(cap.sent) == 2
    repl.begin_batch()
    repl.forward(("w", 1), "replicate", "default", {"src": 9, "wts": 1, "wp": 0}, keys,
                 np.ones((len(keys), 1), np.float32))
    for sid, msg in cap.sent:
        if sid == 2:
            repl.on_ack(msg.ts, sid)
    # replica 3 dies: request 0 (acked by 2) completes; request 1 still waits for replica 2
    assert repl.drop_replica(3) == [("w", 0)]
    assert repl.outstanding == {("w", 1): 1}
    repl.flush()
    (sid, msg), = cap.sent[2:]
    assert sid == 2
    assert repl.on_ack(msg.ts, sid) == [("w", 1)]


@pytest.fixture
def replica(cluster_factory):
    cluster = cluster_factory(2, 1)
    kv = pserver.KVWorker(cluster.config(0))
    ctx = zmq.Context()
    node = kv.membership.view.role_nodes("server")[0]
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = b"s77"  # poses as another server (the cluster is not authenticated)
    sock.connect(f"tcp://{node.host}:{node.port}")
    yield kv, sock
    sock.close()
    ctx.term()
    kv.close()


def _ask(sock, msg: Message) -> Message:
    sock.send_multipart(wire.encode(msg))
    assert sock.poll(10_000), "no reply"
    return wire.decode(sock.recv_multipart())


def _stored(sock) -> int:
    return _ask(sock, Message("stats", 1)).meta["tables"]["default"]["keys"]


def test_a_replica_applies_a_batch_in_order_and_refuses_malformed_ones(replica):
    _, sock = replica
    before = _stored(sock)
    k1 = np.array([2**40 + 1, 2**40 + 2, 2**40 + 3], np.uint64)
    k2 = np.array([2**41 + 5, 2**41 + 6], np.uint64)
    items = [["replicate", "default", {"kf": "k", "src": 9, "wts": 1, "wp": 0}],
             ["replicate", "default", {"kf": "k", "src": 9, "wts": 2, "wp": 0}]]
    arrays = [k1, np.ones((3, 1), np.float32), k2, np.ones((2, 1), np.float32)]
    reply = _ask(sock, Message("repl_batch", 5, "", {"items": items}, arrays))
    assert reply.op == "repl_ack" and reply.ts == 5 and not reply.meta.get("errors")
    assert _stored(sock) == before + 5
    # one bad item: refused and counted, the good one still applied
    bad = [["replicate", "default", {"kf": "k", "src": 9, "wts": 3, "wp": 0}],
           ["replicate", "nope", {"kf": "k", "src": 9, "wts": 4, "wp": 0}]]
    k3 = np.array([2**42 + 1], np.uint64)
    reply = _ask(sock, Message("repl_batch", 6, "", {"items": bad},
                               [k3, np.ones((1, 1), np.float32), k3, np.ones((1, 1), np.float32)]))
    assert reply.op == "repl_ack" and reply.meta["errors"] == 1 and "nope" in reply.meta["error"]
    assert _stored(sock) == before + 6
    # malformed batches: a ProtocolError reply, nothing stored
    for meta, arrs in [({"items": items}, arrays[:3]),                     # arrays missing
                       ({"items": [["push", "default", {}]]}, arrays[:2]),  # not a forward op
                       ({"items": "x"}, []), ({}, [])]:
        reply = _ask(sock, Message("repl_batch", 7, "", meta, arrs))
        assert (reply.op, reply.meta.get("kind")) == ("error", "ProtocolError"), reply
    assert _stored(sock) == before + 6


def test_replica_acks_ride_on_the_forward_to_their_master():
    repl, cap = _replicator()
    keys = _my_keys(repl, 200)
    holders = repl.ring.replica_table(1)[repl.ring.vnode_of(keys), 0]
    repl.begin_batch()
    assert not repl.attach_acks(2, [11, 12])     # nothing queued for server 2 yet
    repl.forward(("w", 0), "replicate_agg", "default", {"clk": []}, keys[holders == 2],
                 np.ones((int((holders == 2).sum()), 1), np.float32))
    assert repl.attach_acks(2, [11, 12])
    repl.flush()
    (sid, msg), = cap.sent
    # one item, still sent as a batch: the acks need its meta
    assert sid == 2 and msg.op == "repl_batch" and msg.meta["acks"] == [11, 12]
    assert len(msg.meta["items"]) == 1 and repl.unsent_acks() == []
    # the next burst carries nothing unless acks are attached again
    repl.begin_batch()
    repl.forward(("w", 1), "replicate_agg", "default", {"clk": []}, keys[holders == 2],
                 np.ones((int((holders == 2).sum()), 1), np.float32))
    repl.flush()
    assert cap.sent[-1][1].op == "replicate_agg" and "acks" not in cap.sent[-1][1].meta


def test_acks_whose_carrier_cannot_be_sent_are_handed_back():
    repl, cap = _replicator()
    keys = _my_keys(repl, 200)
    cap.refuse = {2, 3}
    repl.begin_batch()
    repl.forward(("w", 0), "replicate_agg", "default", {"clk": []}, keys, np.ones((len(keys), 1),
                                                                                  np.float32))
    assert repl.attach_acks(3, [5])
    lost = repl.flush()
    assert ("w", 0) in lost
    assert repl.unsent_acks() == [(b"s3", [5])] and repl.unsent_acks() == []


def test_an_ack_from_a_server_the_forward_did_not_go_to_is_ignored():
    repl, cap = _replicator()
    keys = _my_keys(repl, 100)
    holders = repl.ring.replica_table(1)[repl.ring.vnode_of(keys), 0]
    sel = holders == 2
    repl.forward(("w", 0), "replicate_agg", "default", {"clk": []}, keys[sel],
                 np.ones((int(sel.sum()), 1), np.float32))
    (sid, msg), = cap.sent
    assert sid == 2
    assert repl.on_ack(msg.ts, 3) == [] and repl.outstanding == {("w", 0): 1}
    assert repl.on_ack(msg.ts, 2) == [("w", 0)]


def test_a_replica_takes_acks_carried_by_a_batch_and_checks_them(replica):
    _, sock = replica
    k1 = np.array([2**43 + 1], np.uint64)
    items = [["replicate_agg", "default", {"kf": "k", "clk": []}]]
    arrays = [k1, np.ones((1, 1), np.float32)]
    # acks of forwards this server never sent to s77: ignored, the batch still applied
    reply = _ask(sock, Message("repl_batch", 8, "", {"items": items, "acks": [123456]}, arrays))
    assert reply.op == "repl_ack" and reply.ts == 8
    before = _stored(sock)
    reply = _ask(sock, Message("repl_batch", 9, "", {"items": items, "acks": ["x"]}, arrays))
    assert (reply.op, reply.meta.get("kind")) == ("error", "ProtocolError")
    assert _stored(sock) == before


def test_a_memo_keeps_the_split_of_a_key_list_per_ring(monkeypatch):
    repl, _ = _replicator()
    keys = _my_keys(repl, 300)
    memo: dict = {}
    first = repl.replica_groups(keys, memo)
    assert len(first) == 2 and memo

    def no_hashing(keys):
        raise AssertionError("a memoised list was hashed again")
    monkeypatch.setattr(repl.ring, "vnode_of", no_hashing)
    again = repl.replica_groups(keys, memo)
    assert again is first
    monkeypatch.undo()
    repl.ring = KeyRing([1, 2, 3, 4], version=2)   # a new ring: split again, in place of the old
    fresh = repl.replica_groups(keys, memo)
    assert len(memo) == 1 and memo["replica_groups"][1] is fresh
    assert repl.replica_groups(keys, memo) is fresh
    plain = repl.replica_groups(keys)
    assert [(s, np.arange(len(keys))[g].tolist()) for s, g in fresh] == \
        [(s, np.arange(len(keys))[g].tolist()) for s, g in plain]


def test_a_table_hands_out_the_memo_of_the_list_it_just_served():
    from pserver.store.table import Table
    table = Table(pserver.TableSpec(dtype="float64"))
    keys = np.arange(0, 2000, 3, dtype=np.uint64)
    table.push(keys, np.ones((keys.size, 1)))
    assert table.slot_cache.memo(keys) is None          # first sighting: not cached
    table.push(keys, np.ones((keys.size, 1)))
    memo = table.slot_cache.memo(keys)
    assert memo == {}
    same = keys.copy()
    assert table.slot_cache.memo(same) is None          # another array object: no memo
    table.push(same, np.ones((keys.size, 1)))
    assert table.slot_cache.memo(same) is memo          # the entry it hit
    table.remove(keys[:1])
    assert table.slot_cache.memo(same) is None
