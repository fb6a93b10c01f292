"""The worker's sending and reading of replies (kv/sending.py, kv/replies.py) over in-memory links:
a link per server, coalescing into batches, the flush thread, dead servers, acks and refused replies."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from pserver import wire
from pserver.errors import LimitError
from pserver.kv.filtering import WorkerFilters
from pserver.kv.messages import PartEncoder
from pserver.kv.replies import ReplyReader
from pserver.kv.sending import Sender
from pserver.kv.tracker import Request, RequestTracker
from pserver.link import MemoryHub
from pserver.store.spec import TableSpec
from pserver.testing import MemoryTransport, memory_config, view_of
from pserver.wire import Message


class _Worker:
    """A Sender and a ReplyReader as a KVWorker wires them, with servers 1 and 2 as routers of a
    MemoryHub (server 2 absent unless ``both``)."""

    def __init__(self, coalesce: int = 0, both: bool = True, dead: tuple = (), **cfg) -> None:
        self.hub = MemoryHub()
        self.cfg = memory_config(**cfg)
        transport = MemoryTransport(self.hub, self.cfg, "worker")
        self.servers = {1: self.hub.router("127.0.0.1:7001")}
        if both:
            self.servers[2] = self.hub.router("127.0.0.1:7002")
        membership = SimpleNamespace(view=view_of(2, dead=dead))
        self.sender = Sender(membership, transport, b"n9", threading.RLock(), coalesce)
        self.tracker = RequestTracker()
        filters = WorkerFilters(self.sender.send, self.tracker.pending)
        self.parts = PartEncoder({"default": TableSpec(name="default")}, filters)
        self.replies = ReplyReader(self.cfg, transport, self.tracker, filters, self.sender,
                                   self.parts)

    def push(self, sid: int, n: int = 3) -> int:
        ts = self.tracker.next_ts()
        req = Request("push", "default", np.arange(n, dtype=np.uint64), np.ones((n, 1), np.float32))
        msg = self.parts.encode_part(ts, req, sid, slice(0, n), 1)[1]
        self.tracker.register(ts, req)
        self.sender.send(sid, msg)
        return ts

    def received(self, sid: int) -> list[tuple[bytes, Message]]:
        """Everything server ``sid`` received, decoded: (sender identity, message or batch)."""
        out = []
        while (got := self.servers[sid].recv()) is not None:
            out.append((got[0], wire.decode(got[1])))
        return out

    def reply(self, sid: int, msg: Message) -> None:
        self.servers[sid].send_frames(wire.encode(msg), msg.op, b"n9")


def test_a_message_leaves_at_once_on_the_one_link_made_for_its_server():
    w = _Worker()
    w.push(1)
    w.push(1)
    w.push(2)
    got = w.received(1)
    assert [(who, m.op, m.ts) for who, m in got] == [(b"n9", "push", 1), (b"n9", "push", 2)]
    assert [m.ts for _, m in w.received(2)] == [3]
    assert sorted(w.sender.links) == [1, 2] and len(w.sender.poller.links()) == 2
    assert {w.sender.link_server[link] for link in w.sender.links.values()} == {1, 2}
    assert not w.sender.unsent and not w.sender.outbox.held


def test_a_dead_or_unreachable_server_leaves_the_part_unsent_and_flags_it():
    w = _Worker(dead=(2,))
    w.push(2)
    assert w.sender.unsent and not w.sender.links  # not alive: no link made
    w = _Worker(both=False)                        # alive in the view, nothing listens
    w.push(2)
    assert w.sender.unsent and 2 in w.sender.links
    assert not w.received(1)


def test_coalesced_messages_leave_in_order_as_one_batch_and_acks_release_the_server():
    w = _Worker(coalesce=1)
    with w.sender.lock:  # as in KVWorker: the flush thread must not send meanwhile
        first, second, third = w.push(1), w.push(1), w.push(1)
        assert [m.ts for _, m in w.received(1)] == [first]  # one unanswered: the next ones wait
        assert w.sender.outbox.holds(second)
        w.sender.flush_held()
    (_, batch), = w.received(1)
    assert type(batch) is wire.Batch and [m.ts for m in batch.messages] == [second, third]
    w.reply(1, Message("acks", 0, meta={"a": [[first, 0], "junk", [second, 0]]}))
    w.replies.progress(1.0)
    assert list(w.tracker.pending) == [third] and w.sender.outbox.in_flight[1] == 0
    w.reply(1, Message("ack", third, meta={"p": 0}))
    w.replies.progress(1.0)
    assert not w.tracker.pending
    w.sender.close()


def test_the_flush_thread_sends_what_waits_when_nobody_calls_in():
    w = _Worker(coalesce=1)
    w.push(1)
    held = w.push(1)
    assert w.servers[1].poll(10.0)
    w.received(1)
    assert w.servers[1].poll(10.0)  # no flush_held, no progress: the thread sent it
    assert [m.ts for _, m in w.received(1)] == [held]
    with w.sender.lock:
        w.sender.close()


def test_replies_complete_their_requests_and_stale_or_malformed_ones_change_nothing():
    w = _Worker()
    ts = w.push(1)
    w.reply(1, Message("ack", ts + 5, meta={"p": 0}))          # of no request
    w.reply(1, Message("acks", 0, meta={"a": "not a list"}))
    w.servers[1].send_frames([b"garbage"], "x", b"n9")
    w.replies.progress(1.0)
    assert ts in w.tracker.pending
    w.reply(1, Message("ack", ts, meta={"p": 0}))
    w.replies.progress(1.0)
    assert not w.tracker.pending


def test_a_reply_over_the_worker_s_limits_fails_its_request_with_what_to_do():
    w = _Worker(max_keys=10)
    ts = w.tracker.next_ts()
    req = Request("pull", "default", np.arange(5, dtype=np.uint64),
                  out=np.zeros((5, 1), np.float32), result=np.zeros(5, np.float32))
    w.sender.send(*w.parts.encode_part(ts, req, 1, slice(0, 5), 1))
    w.tracker.register(ts, req)
    w.reply(1, Message("vals", ts, meta={"p": 0}, arrays=[np.zeros(20, np.float32)]))
    w.replies.progress(1.0)
    with pytest.raises(LimitError, match="PSERVER_MAX_KEYS"):
        raise w.tracker.collect(ts).error


class _CountingPoller:
    """Stands in for the Sender's poller: counts the polls that do not sleep, finds nothing."""

    def __init__(self) -> None:
        self.spins = 0

    def poll(self, timeout: float | None) -> list:
        self.spins += timeout == 0
        return []


def test_busy_polling_spins_for_a_lone_request_only():
    w = _Worker(worker_busy_poll=0.002)
    w.replies._poller = poller = _CountingPoller()
    w.push(1)
    w.replies.progress(0.0)
    assert poller.spins > 1            # one request pending: it polls without sleeping first
    w.push(1)
    poller.spins = 0
    w.replies.progress(0.0)
    assert poller.spins == 1           # two pending: straight to the (here zero) timeout
