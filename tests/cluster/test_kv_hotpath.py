"""The per-request hot path: the codec's array views, the compiled sortedness check, the
transport's send/recv, and the server's acknowledgements during a long burst (in process, with a
recording socket), then pipelined pushes on a real cluster: every ack, exact values, FIFO order."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import pserver
from pserver import transport as transport_mod
from pserver import wire
from pserver.config import Config
from pserver.kv import keys as keyfmt
from pserver.kv import server as server_mod
from pserver.kv.server import KVServer
from pserver.link import ZmqLink
from pserver.wire import Message


# ------------------------------------------------------------------------------ codec
@pytest.mark.parametrize("nbytes_total", [0, 64, wire.INLINE_BYTES + 8])  # empty, inline, frames
def test_decoded_arrays_are_views_equal_to_what_was_sent(nbytes_total):
    n = nbytes_total // 16
    keys = np.arange(n, dtype=np.uint64) * 3
    vals = np.arange(2 * n, dtype=np.float32).reshape(n, 2)[:, ::-1]  # not C-contiguous
    small = np.array(7, dtype=np.int32)  # 0-d: travels as shape (1,), as it always did
    frames = [f if isinstance(f, bytes) else f.tobytes()
              for f in wire.encode(Message("push", 9, "t", {"kf": "k"}, [keys, vals, small]))]
    assert (len(frames) == 1) == (nbytes_total <= wire.INLINE_BYTES)
    msg = wire.decode(frames)
    assert [a.shape for a in msg.arrays] == [(n,), (n, 2), (1,)]
    assert [a.dtype for a in msg.arrays] == [np.uint64, np.float32, np.int32]
    assert np.array_equal(msg.arrays[0], keys) and np.array_equal(msg.arrays[1], vals)
    assert int(msg.arrays[2][0]) == 7
    for a in msg.arrays:  # views on the received frames, no copies
        assert not a.flags.owndata and a.base is not None


def test_decode_of_a_reply_without_arrays_checks_its_frames():
    (frame,) = wire.encode(Message("ack", 5, meta={"p": 2}))
    msg = wire.decode([frame])
    assert (msg.op, msg.ts, msg.meta, msg.arrays) == ("ack", 5, {"p": 2}, [])
    with pytest.raises(wire.ProtocolError, match="declares 0 arrays but 1 frames"):
        wire.decode([frame, b"x"])
    with pytest.raises(wire.ProtocolError, match="trailing"):
        wire.decode([frame + b"x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 3, 2**32, 2**63, 2**64 - 2, 2**64 - 1]), max_size=40),
       st.booleans())
def test_sorted_unique_agrees_with_numpy(values, sort):
    keys = np.array(sorted(values) if sort else values, dtype=np.uint64)
    expected = len(keys) < 2 or bool((keys[1:] > keys[:-1]).all())
    assert bool(keyfmt.sorted_unique(keys)) == expected


def test_sorted_unique_finds_one_bad_pair_anywhere_in_a_long_array():
    keys = np.arange(100_000, dtype=np.uint64)
    assert keyfmt.sorted_unique(keys)
    for i in (1, 50_000, 99_999):
        bad = keys.copy()
        bad[i] = bad[i - 1]  # a duplicate
        assert not keyfmt.sorted_unique(bad)


# ------------------------------------------------------------------------------ transport
def test_transport_links_send_and_recv_whole_messages_in_order():
    cfg = Config.from_env(scheduler="127.0.0.1:9", insecure=True)
    tr = transport_mod.Transport(cfg, "server")
    try:
        router, port = tr.router_link("127.0.0.1")
        dealer = tr.dealer_link("127.0.0.1", port, "server", identity=b"n7")
        big = np.arange(wire.INLINE_BYTES // 8 + 10, dtype=np.uint64)  # several frames
        sent = [Message("push", 1, "", {"kf": "k"}, [big, np.ones(len(big), np.float32)]),
                Message("ping", 2), Message("pull", 3, "", {"kf": "k"}, [big[:4]])]
        for m in sent:
            dealer.send(m)
        got, deadline = [], time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            item = router.recv()
            if item is None:
                router.poll(0.01)
                continue
            got.append((item[0], tr.decode_body(item[1])[0]))
        assert [(ident, m.op, m.ts) for ident, m in got] == [
            (b"n7", "push", 1), (b"n7", "ping", 2), (b"n7", "pull", 3)]
        assert np.array_equal(got[0][1].arrays[0], big) and np.array_equal(got[2][1].arrays[0], big[:4])
        assert router.recv() is None  # nothing left: None, not an exception
        # the reply path (identity frame first) and the byte counters of both directions
        router.send(Message("ack", 1, meta={"p": 0}), b"n7")
        assert dealer.poll(5)
        reply = next(tr.messages(dealer, "server"))
        assert (reply.op, reply.ts, reply.meta) == ("ack", 1, {"p": 0})
        stats = tr.counters.to_json()
        push_bytes = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in wire.encode(sent[0]))
        assert stats["sent_by_op"]["push"] == {"messages": 1, "bytes": push_bytes}
        assert stats["received_by_op"]["push"] == {"messages": 1, "bytes": push_bytes}
        assert stats["sent_by_op"]["ack"]["bytes"] == stats["received_by_op"]["ack"]["bytes"] + 2
    finally:
        tr.close()


# ------------------------------------------------------------------------------ server burst
class _RecordingSocket:
    """Stands in for the server's ROUTER: hands out queued frames, records what is sent and when
    (as positions in one event log shared by receives and sends)."""

    type = zmq.ROUTER

    def __init__(self, messages: list[list[bytes]]):
        self.frames = []
        for parts in messages:
            for i, p in enumerate(parts):
                f = zmq.Frame(p)
                f.more = i < len(parts) - 1
                self.frames.append(f)
        self.events: list[tuple] = []
        self._out: list = []

    def getsockopt(self, option):
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.frames else 0

    def recv(self, flags=0, copy=True):
        if not self.frames:
            raise zmq.Again()
        f = self.frames.pop(0)
        if not f.more:
            self.events.append(("recv",))
        return f

    def send(self, data, flags=0, copy=True):
        self._out.append(bytes(data))
        if not flags & zmq.SNDMORE:
            ident, *body = self._out
            self._out = []
            self.events.append(("send", ident, wire.decode(body)))


def _serve(srv: KVServer, messages: list[list[bytes]]) -> _RecordingSocket:
    """What the serving loop does when a poll finds ``messages`` waiting on the server's link."""
    sock = _RecordingSocket(messages)
    srv.router = ZmqLink(sock)
    srv._burst([srv.router])
    return sock


@pytest.fixture
def lone_server():
    """A KVServer that never registers: its requests come from a recording socket."""
    srv = KVServer(Config.from_env(scheduler="127.0.0.1:9", insecure=True))
    yield srv
    srv.transport.close()


def _pushes(n: int, table: str = "default") -> tuple[np.ndarray, list[list[bytes]]]:
    keys = np.unique(np.random.default_rng(3).integers(0, 2**64 - 1, 200, dtype=np.uint64))
    msgs = []
    for ts in range(1, n + 1):
        vals = np.full((len(keys), 1), ts, np.float32)  # push ts carries the value ts
        body = wire.encode(Message("push", ts, table, {"kf": "k", "p": 0}, [keys, vals]))
        msgs.append([b"n4", *body])
    return keys, msgs


def _acks(events) -> list[tuple[int, int]]:
    out = []
    for ev in events:
        if ev[0] == "send":
            msg = ev[2]
            out += [tuple(a) for a in msg.meta["a"]] if msg.op == "acks" else [(msg.ts, msg.meta["p"])]
    return out


@pytest.mark.parametrize("delay", [0.0, 3600.0])
def test_a_long_burst_acknowledges_every_push_once_in_order(lone_server, monkeypatch, delay):
    monkeypatch.setattr(server_mod, "ACK_DELAY", delay)
    srv = lone_server
    keys, msgs = _pushes(30)
    sock = _serve(srv, msgs)
    acks = _acks(sock.events)
    assert acks == [(ts, 0) for ts in range(1, 31)]  # every push, once, in the order applied
    assert (srv.core.tables["default"].pull(keys) == sum(range(1, 31))).all()  # "sum": exact
    sends = [ev for ev in sock.events if ev[0] == "send"]
    if delay:  # nothing due before the burst ended: one message for all
        assert len(sends) == 1 and sock.events[-1][0] == "send"
    else:  # every ack due at once: sent as soon as its request is served, before the next
        # chunk is read (a chunk: CHUNK requests received, then decoded, then served)
        assert len(sends) == 30
        chunk = server_mod.CHUNK
        expected = []
        for first in range(0, 30, chunk):
            n = min(chunk, 30 - first)
            expected += ["recv"] * n + ["send"] * n
        assert [ev[0] for ev in sock.events] == expected


def test_acks_sent_during_a_burst_keep_fifo_application(lone_server, monkeypatch):
    """An "assign" table makes the order visible: the last push applied wins."""
    monkeypatch.setattr(server_mod, "ACK_DELAY", 0.0)
    srv = lone_server
    srv.core.tables.declare(pserver.TableSpec(name="last", updater="assign"))
    keys, msgs = _pushes(25, table="last")
    sock = _serve(srv, msgs)
    assert _acks(sock.events) == [(ts, 0) for ts in range(1, 26)]
    assert (srv.core.tables["last"].pull(keys) == 25).all()


def test_a_replica_acknowledges_forwards_once_per_burst(lone_server):
    """A burst of forwards from one master is acknowledged by one repl_ack naming them all, sent
    at the end of the burst (the applies are deferred: tests/unit/test_server_core.py)."""
    keys = np.arange(300, dtype=np.uint64) * 7
    msgs = [[b"s2", *wire.encode(Message("replicate", ts, "default",
                                         {"kf": "k", "src": 4, "wts": ts, "wp": 0},
                                         [keys, np.ones((300, 1), np.float32)]))]
            for ts in range(1, 7)]
    sock = _serve(lone_server, msgs)
    sends = [ev[2] for ev in sock.events if ev[0] == "send"]
    assert [(m.op, m.meta.get("rids")) for m in sends] == [("repl_ack", [1, 2, 3, 4, 5, 6])]


# ------------------------------------------------------------------------------ real cluster
def test_pipelined_pushes_every_ack_exact_values_and_fifo(cluster_factory):
    cluster = cluster_factory(2, 1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.unique(np.random.default_rng(5).integers(0, 2**64 - 1, 1000, dtype=np.uint64))
        ones = np.ones(len(keys), np.float32)
        done: list[int] = []
        window: list[int] = []
        issued: list[int] = []
        for i in range(600):  # 16 in flight, refilled as the oldest completes
            ts = kv.push(keys, ones, callback=lambda i=i: done.append(i))
            issued.append(ts)
            window.append(ts)
            if len(window) >= 16:
                assert kv.wait(window.pop(0)) is None
        for ts in window:
            kv.wait(ts)
        assert sorted(done) == list(range(600))  # every push completed (both servers acked) once
        assert (kv.pull(keys) == 600).all()
        # FIFO: pushes of an "assign" table then a pull, nothing waited for in between
        kv.declare_table("last", updater="assign")
        for v in range(1, 41):
            kv.push(keys, np.full(len(keys), v, np.float32), table="last")
        assert (kv.pull(keys, table="last") == 40).all()
        kv.wait_all()


def test_malformed_requests_in_a_chunk_are_answered_in_order_and_apply_nothing(lone_server,
                                                                                monkeypatch):
    """A chunk is decoded before any of it is served: a malformed request among valid ones is
    still answered at its place in the order, and only the valid pushes are applied."""
    monkeypatch.setattr(server_mod, "ACK_DELAY", 0.0)
    keys, msgs = _pushes(5)
    msgs[1] = [b"n4", b"not a pserver message"]
    msgs[3] = [b"n4", msgs[3][1][:40]]  # a push cut short
    sock = _serve(lone_server, msgs)
    replies = [(ev[2].op, ev[2].ts) for ev in sock.events if ev[0] == "send"]
    assert replies == [("ack", 1), ("error", 0), ("ack", 3), ("error", 0), ("ack", 5)]
    assert (lone_server.core.tables["default"].pull(keys) == 1 + 3 + 5).all()
    assert lone_server.core.errors == 2


def test_a_chunk_stops_growing_at_its_byte_bound(lone_server, monkeypatch):
    """Requests past CHUNK_BYTES wait in the link's queue (bounded by PSERVER_RECV_QUEUE), not in
    the chunk: with a bound below one request, each chunk holds one and is served before the next
    is read."""
    monkeypatch.setattr(server_mod, "ACK_DELAY", 0.0)
    monkeypatch.setattr(server_mod, "CHUNK_BYTES", 1)
    keys, msgs = _pushes(20)
    sock = _serve(lone_server, msgs)
    assert [ev[0] for ev in sock.events] == ["recv", "send"] * 20
    assert (lone_server.core.tables["default"].pull(keys) == sum(range(1, 21))).all()
