"""Request coalescing on a live server: a batch's requests are served in order as if sent apart,
a batch with one bad request is refused whole (each request answered with the error, nothing
applied), and a worker keeping many requests in flight (which coalesces them) keeps per-sender order."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

import pserver
from pserver import wire
from pserver.wire import Message

KEYS = np.arange(5, 50, 5, dtype=np.uint64)


def _push(ts: int, value: float, keys=KEYS) -> bytes:
    return wire.encode(Message("push", ts, "default", {"kf": "k", "p": 0},
                               [keys, np.full((len(keys), 1), value, np.float32)]))[0]


def _pull(ts: int) -> bytes:
    return wire.encode(Message("pull", ts, "default", {"kf": "k", "p": 0}, [KEYS]))[0]


@pytest.fixture
def raw(cluster_factory):
    """A worker, and a DEALER of this test's own (as worker n9001) to the cluster's only server."""
    cluster = cluster_factory(1, 1, settings={"max_keys": 100})
    kv = pserver.KVWorker(cluster.config(0).with_(coalesce=1))   # PSERVER_COALESCE=1
    node = next(n for n in kv.membership.view.nodes.values() if n.role == "server")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger, sock.identity, sock.rcvtimeo = 0, b"n9001", 20_000
    sock.connect(f"tcp://{node.host}:{node.port}")
    yield kv, sock
    sock.close()
    ctx.term()
    kv.close()


def _replies(sock, count: int) -> dict[int, Message]:
    """The next replies until ``count`` requests were answered, by request ts."""
    got: dict[int, Message] = {}
    while len(got) < count:
        msg = wire.decode(sock.recv_multipart())
        if msg.op == "acks":
            for ts, part in msg.meta["a"]:
                got[ts] = Message("ack", ts, meta={"p": part})
        else:
            got[msg.ts] = msg
    return got


def test_a_batch_is_served_in_order_and_a_bad_one_refused_whole(raw):
    _, raw = raw
    raw.send(wire.encode_batch([_push(1, 1.0), _push(2, 2.0), _pull(3)]))
    got = _replies(raw, 3)
    assert got[1].op == got[2].op == "ack"
    np.testing.assert_array_equal(got[3].arrays[0].ravel(), 3.0)  # sees both pushes before it

    too_many = np.arange(200, dtype=np.uint64)  # over the server's max_keys of 100
    raw.send(wire.encode_batch([_push(4, 10.0), _push(5, 10.0, too_many), _push(6, 10.0)]))
    got = _replies(raw, 3)
    assert [got[t].op for t in (4, 5, 6)] == ["error"] * 3
    assert "exceeds the limit" in got[5].meta["error"]
    raw.send(wire.encode_batch([b"PS1" + bytes(9), _push(7, 10.0)]))  # garbage inside
    assert _replies(raw, 1)[7].op == "error"
    raw.send(_pull(8))
    np.testing.assert_array_equal(_replies(raw, 1)[8].arrays[0].ravel(), 3.0)  # nothing applied


def test_many_requests_in_flight_keep_per_sender_order(cluster_factory):
    cluster = cluster_factory(2, 1)
    with pserver.KVWorker(cluster.config(0).with_(coalesce=1)) as kv:
        keys = np.array([3, 2**63 + 11], dtype=np.uint64)  # one key on each server
        pulls = []
        for _ in range(60):  # no wait in between: most of these leave coalesced
            kv.push(keys, np.ones(2, np.float32))
            pulls.append(kv.pull(keys, wait=False))
        seen = [kv.wait(ts).copy() for ts in pulls]
        for i, vals in enumerate(seen):
            np.testing.assert_array_equal(vals, i + 1)  # each pull saw exactly the pushes before it


def test_a_coalesced_push_leaves_soon_though_the_caller_stops_calling_in(raw):
    kv, sock = raw
    kv.push(KEYS, np.ones(len(KEYS), np.float32))
    kv.push(KEYS, np.ones(len(KEYS), np.float32))  # the first is unanswered yet: this one waits
    time.sleep(1.0)  # the caller computes: no call into the worker
    sock.send(_pull(1))
    np.testing.assert_array_equal(_replies(sock, 1)[1].arrays[0].ravel(), 2.0)
