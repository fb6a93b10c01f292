"""The server's worker-group gate alone (pserver.kv.gate): newcomers held and released by views,
read-only members refused, the hold limit, declared groups, and the sets the core keeps bound."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from pserver.errors import ConfigError, ProtocolError, ReadOnlyGroupError
from pserver.kv.gate import _MAX_NEWCOMER_HELD, GroupGate
from pserver.membership.view import ClusterView, NodeInfo
from pserver.wire import Message

KEYS = np.arange(3, dtype=np.uint64)


def _view(*workers, read_only=(), version=1, dead=()) -> ClusterView:
    """``workers``: (id, group) pairs; a server 1 besides them."""
    nodes = {1: NodeInfo(1, "server", 0, "h", 0, 0)}
    for rank, (nid, group) in enumerate(workers):
        nodes[nid] = NodeInfo(nid, "worker", rank, "h", 0, 0, alive=nid not in dead, group=group)
    return ClusterView(version=version, nodes=nodes,
                       settings={"read_only_groups": list(read_only)})


def _push(ts=1, **meta) -> Message:
    return Message("push", ts, "w", {"kf": "k", **meta}, [KEYS, np.ones((3, 1), np.float32)])


def _gate(view: ClusterView) -> tuple[GroupGate, dict[bytes, deque]]:
    held: dict[bytes, deque] = {}
    gate = GroupGate(held)
    assert gate.learn(view) == []
    return gate, held


def test_a_newer_workers_data_request_waits_until_a_view_names_it():
    gate, held = _gate(_view((4, "default"), (5, "serve"), read_only=["serve"]))
    push = _push()
    assert gate.is_newcomer(b"n7", push)
    gate.hold(b"n7", push)
    assert list(held[b"n7"]) == [push]
    # a view that still does not name it keeps it waiting
    assert gate.learn(_view((4, "default"), (5, "serve"), read_only=["serve"], version=2)) == []
    released = gate.learn(_view((4, "default"), (5, "serve"), (7, "serve"),
                                read_only=["serve"], version=3))
    assert released == [b"n7"]
    assert b"n7" in gate.known and not gate.is_newcomer(b"n7", push)
    assert gate.learn(_view((4, "default"), (7, "serve"), read_only=["serve"], version=4)) == []
    assert list(held[b"n7"]) == [push]  # the queue is the caller's to serve


def test_newcomers_wait_only_for_data_requests_while_some_group_is_read_only():
    ping = Message("ping", 1, "")
    gate, _ = _gate(_view((4, "default"), read_only=["serve"]))
    assert not gate.is_newcomer(b"n7", ping)          # not a worker's data op
    assert not gate.is_newcomer(b"n3", _push())       # older than the newest node in the view
    assert not gate.is_newcomer(b"x7", _push())       # not a node identity: refused elsewhere
    assert gate.is_newcomer(b"n7", Message("declare_table", 1, ""))
    assert not _gate(_view((4, "default")))[0].is_newcomer(b"n7", _push())  # nothing read-only
    assert not GroupGate({}).is_newcomer(b"n7", _push())                     # no view yet


def test_a_view_without_read_only_groups_releases_every_newcomer():
    gate, _ = _gate(_view((4, "default"), read_only=["serve"]))
    gate.hold(b"n9", _push())
    assert gate.learn(_view((4, "default"), version=2)) == [b"n9"]


def test_a_read_only_members_push_is_refused_and_its_reads_are_not():
    gate, _ = _gate(_view((4, "default"), (5, "serve"), read_only=["serve"]))
    assert gate.read_only_ids == {5}
    for msg in (_push(), _push(pp=1), Message("declare_table", 1, "", {"spec": {}})):
        with pytest.raises(ReadOnlyGroupError, match="group 'serve' is read-only"):
            gate.check(b"n5", msg)
    gate.check(b"n5", Message("declare_table", 1, "", {"pushes": False}))
    gate.check(b"n5", Message("pull", 1, "w", {"kf": "k"}, [KEYS]))
    gate.check(b"n4", _push())  # a writing group's member


def test_the_hold_limit_refuses_more_requests_of_an_unnamed_sender():
    gate, held = _gate(_view((4, "default"), read_only=["serve"]))
    push = _push()
    for _ in range(_MAX_NEWCOMER_HELD):
        gate.hold(b"n7", push)
    with pytest.raises(ProtocolError, match="node 7, which this server's cluster view does not name"):
        gate.hold(b"n7", push)
    assert len(held[b"n7"]) == _MAX_NEWCOMER_HELD


def test_a_declared_group_is_used_until_the_view_names_one():
    gate, _ = _gate(_view((4, "default")))
    assert gate.group(8) == "default"
    gate.declare(8, "count")
    assert gate.group(8) == "count"
    with pytest.raises(ConfigError, match="not valid"):
        gate.declare(8, "no spaces")
    assert gate.group(8) == "count"
    gate.learn(_view((4, "default"), (8, "lr"), version=2))
    assert gate.group(8) == "lr"


def test_live_members_per_group_leave_out_dead_workers():
    gate, _ = _gate(_view((4, "default"), (5, "default"), (6, "count"), dead=(5,)))
    assert gate.live("default") == {4} and gate.live("count") == {6}
    assert gate.live("nobody") == set()


def test_the_sets_the_core_keeps_follow_every_view():
    gate, _ = _gate(_view((4, "default"), (5, "serve"), read_only=["serve"]))
    known, read_only = gate.known, gate.read_only_ids
    gate.learn(_view((4, "serve"), (6, "default"), read_only=["serve"], version=2))
    assert known == {b"n1", b"n4", b"n6"} and read_only == {4}
    gate.learn(_view((4, "serve"), version=3))
    assert read_only == set()
