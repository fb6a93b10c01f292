"""The worker's routing (kv/routing.py) without sockets: splitting with the current ring, when a
re-routing pass is due, and what it resends after a ring change."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from pserver import wire
from pserver.errors import DataLostError, SchedulerUnreachableError
from pserver.kv.filtering import WorkerFilters
from pserver.kv.messages import PartEncoder
from pserver.kv.routing import Router
from pserver.kv.sending import Sender
from pserver.kv.tracker import Request, RequestTracker
from pserver.ring import KeyRing
from pserver.store.spec import TableSpec
from pserver.wire import Message


class _Recorder(Sender):
    """A Sender that records what would go out instead of sending it."""

    def __init__(self) -> None:
        super().__init__(None, None, b"n9", threading.RLock())
        self.sent: list[tuple[int, Message]] = []

    def send(self, sid: int, msg: Message) -> None:
        self.sent.append((sid, msg))

    def send_frames(self, sid: int, ts: int, frames: list, op: str) -> None:
        self.sent.append((sid, wire.decode(frames)))  # a plain push, already encoded


class _Membership:
    def __init__(self, ring: KeyRing) -> None:
        self.view = SimpleNamespace(ring=ring, version=1, settings={})
        self.scheduler_lost = threading.Event()

    def change(self, ring: KeyRing, **settings) -> None:
        self.view = SimpleNamespace(ring=ring, version=self.view.version + 1, settings=settings)


KEYS = np.unique(np.random.default_rng(0).integers(0, 1 << 63, 300, dtype=np.uint64))


def _router(ring: KeyRing) -> tuple[Router, _Membership, RequestTracker, _Recorder]:
    membership, tracker, sender = _Membership(ring), RequestTracker(), _Recorder()
    filters = WorkerFilters(sender.send, tracker.pending)
    parts = PartEncoder({"default": TableSpec(name="default")}, filters)
    router = Router(membership, tracker, filters, sender, parts)
    router.routed_rv, router.routed_view, router.due = ring.version, 1, float("inf")
    return router, membership, tracker, sender


def _push(router: Router, tracker: RequestTracker, sender: _Recorder, keys, rnd=None) -> Request:
    """Issue a push the way KVWorker does: split, encode, track, send."""
    ts = tracker.next_ts()
    req = Request("push", "default", keys, np.ones((len(keys), 1), np.float32))
    req.rnd = rnd
    parts = router.split(keys)
    msgs = [router._encode_part(ts, req, sid, sel, router.ring.version)
            for sid, sel in parts.items()]
    tracker.register(ts, req)
    for sid, msg in msgs:
        sender.send(sid, msg)
    return req


def test_a_re_routing_pass_is_due_only_for_a_reason():
    router, membership, tracker, sender = _router(KeyRing([1, 2], version=1))
    assert not router.needed()
    sender.unsent = True                     # a part could not go out
    assert router.needed()
    sender.unsent = False
    tracker.refused = True                   # a server refused keys as not its own
    assert router.needed()
    tracker.refused = False
    membership.change(KeyRing([1, 2], version=1))  # the view changed
    assert router.needed()
    router.routed_view = membership.view.version
    router.due = 0.0                         # the safety net
    assert router.needed()


def test_a_push_split_after_a_ring_change_re_routes_the_parts_of_the_server_that_left_first():
    old, new = KeyRing([1, 2], version=1), KeyRing([2], version=2)
    router, membership, tracker, sender = _router(old)
    keys = KEYS
    first = _push(router, tracker, sender, keys)
    assert {sid for sid, _ in sender.sent} == {1, 2}
    assert router.ring is old
    sender.sent.clear()
    sender.unsent = True
    membership.change(new)
    _push(router, tracker, sender, keys[:3])
    # server 1's part went to server 2 before the new push, naming where it may have applied
    resent = [m for _, m in sender.sent if m.ts == 1]
    assert [sid for sid, _ in sender.sent] == [2, 2] and len(resent) == 1
    assert resent[0].meta["orig"] == [[1, 0]] and resent[0].meta["rv"] == 2
    assert router.ring is new and router.rings == {1: old, 2: new} and router.routed_rv == 2
    assert not sender.unsent and first.waiting == {1, 2}


def test_a_synchronous_round_resent_reaches_every_heir_and_a_lost_server_fails_its_request():
    old = KeyRing([1, 2, 3], version=1)
    router, membership, tracker, sender = _router(old)
    keys = KEYS[dict(old.split(KEYS))[1]]  # keys of server 1 only
    req = _push(router, tracker, sender, keys, rnd=0)
    sender.sent.clear()
    new = KeyRing([2, 3], version=2)
    membership.change(new)
    router.reroute()
    heirs = set(old.heirs(1, new))
    assert {sid for sid, _ in sender.sent} == heirs and heirs
    assert all(m.meta["orig"] == [[1, 0]] and m.meta["rnd"] == 0 for _, m in sender.sent)
    assert len(req.waiting) == len(heirs)

    router, membership, tracker, sender = _router(KeyRing([1, 2], version=1))
    ts = tracker.next_ts() + 1
    _push(router, tracker, sender, KEYS)
    membership.change(KeyRing([1, 2], version=1), lost=[1])  # server 1 died, no replica
    router.reroute()
    with pytest.raises(DataLostError, match="server 1"):
        raise tracker.collect(ts).error


def test_a_range_pull_is_asked_anew_of_every_server_and_a_lost_scheduler_raises():
    router, membership, tracker, sender = _router(KeyRing([1, 2], version=1))
    ts = tracker.next_ts()
    req = Request("range", "default", meta={"lo": 0, "hi": 1000, "limit": 10})
    msgs = [router._encode_part(ts, req, sid, (0, 1000), 1) for sid in router.all_servers()]
    tracker.register(ts, req)
    req.ranges.append("stale answer")
    sender.sent.clear()
    membership.change(KeyRing([2, 3], version=2))
    router.reroute()
    assert sorted(sid for sid, _ in sender.sent) == [2, 3] and not req.ranges
    assert all((m.meta["lo"], m.meta["hi"], m.meta["rv"]) == (0, 1000, 2) for _, m in sender.sent)
    assert len(msgs) == 2
    membership.scheduler_lost.set()
    with pytest.raises(SchedulerUnreachableError):
        router.reroute()
