"""The server core without sockets: synthetic messages in, replies and stored values out (holds,
rounds, exactly-once, range clocks, deferred replica applies, the dispatch table)."""

from __future__ import annotations

import numpy as np
import pytest

import pserver
from pserver import security
from pserver.ft import replica as replica_mod
from pserver.ft.replication import Replicator
from pserver.kv.core import ServerCore
from pserver.kv.dispatch import SERVER_OPS
from pserver.membership.view import ClusterView, NodeInfo
from pserver.ring import KeyRing
from pserver.store.updaters import FunctionUpdater, register_updater
from pserver.testing import RecordingTransport
from pserver.wire import Message

KEYS = np.arange(10, 310, 3, dtype=np.uint64)


def _core(workers=(4,), **kw) -> ServerCore:
    core = ServerCore(Replicator(None, 1, None), **kw)
    core.on_view(_view(workers))
    return core


def _view(workers, version: int = 1) -> ClusterView:
    return ClusterView(version=version, nodes={w: NodeInfo(w, "worker", i, "h", 0, 0)
                                               for i, w in enumerate(workers)})


def _push(ts: int, value: float, table: str = "default", keys=KEYS, **meta) -> Message:
    return Message("push", ts, table, {"kf": "k", "p": 0, **meta},
                   [keys, np.full((len(keys), 1), value, np.float32)])


def _pull(ts: int, table: str = "default", **meta) -> Message:
    return Message("pull", ts, table, {"kf": "k", "p": 0, **meta}, [KEYS])


def _forward(ts: int, value: float, op: str = "replicate", table: str = "default") -> Message:
    meta = {"kf": "k", "clk": [[4, ts, 0]]} if op == "replicate_agg" else \
        {"kf": "k", "src": 4, "wts": ts, "wp": 0}
    return Message(op, ts, table, meta, [KEYS, np.full((len(KEYS), 1), value, np.float32)])


def _sent(core: ServerCore) -> list[tuple[bytes, Message]]:
    out = list(core.out) + core.acks.take()
    core.out.clear()
    return out


def _acked(core: ServerCore, who: bytes = b"n4") -> list[int]:
    got = []
    for to, msg in _sent(core):
        if to == who:
            got += [a[0] for a in msg.meta["a"]] if msg.op == "acks" else [msg.ts]
    return got


def _sync(core: ServerCore, name: str = "s") -> None:
    core.tables.declare(pserver.TableSpec(name=name, updater="sum", sync=True))


def _declare(core: ServerCore, who: bytes, name: str = "s", **meta) -> Message:
    spec = pserver.TableSpec(name=name, updater="sum", sync=True).to_json()
    core.handle(who, Message("declare_table", 1, "", {"spec": spec, **meta}))
    return next(m for to, m in _sent(core) if to == who)


# ------------------------------------------------------------------------------ requests
def test_a_push_is_applied_and_acknowledged_and_a_bad_one_answered_with_an_error():
    core = _core()
    core.handle(b"n4", _push(1, 2.0))
    unsorted = Message("push", 2, "default", {"kf": "k"}, [KEYS[::-1].copy(), np.ones(100, np.float32)])
    core.handle(b"n4", unsorted)
    sent = _sent(core)
    assert [(m.op, m.ts) for _, m in sent] == [("error", 2), ("ack", 1)]
    assert sent[0][1].meta["kind"] == "ProtocolError"
    assert (core.tables["default"].pull(KEYS) == 2).all() and core.errors == 1


def test_an_unknown_op_and_an_unauthorised_role_are_refused():
    core = _core(secure=True)
    core.handle(b"n4", Message("format_disk", 1), role="worker")
    core.handle(b"n4", _forward(2, 1.0), role="worker")  # only servers replicate
    core.handle(b"n4", Message("shutdown", 3), role="worker")  # a scheduler's op
    core.handle(b"n4", Message("barrier", 4), role="worker")  # a worker's op, not a server's
    assert [m.meta["kind"] for _, m in _sent(core)] == ["AuthError"] * 3 + ["ProtocolError"]
    assert not core.replica.deferred
    insecure = _core()
    insecure.handle(b"n4", Message("format_disk", 1))
    assert [m.meta["kind"] for _, m in _sent(insecure)] == ["ProtocolError"]


def test_the_authorisation_of_server_ops_is_the_dispatch_table():
    for op, entry in SERVER_OPS.items():
        for role in security.ROLES:
            assert security.authorise(op, role, True) == (role in entry.roles), (op, role)


def test_a_resend_after_failover_of_a_part_this_replica_had_is_not_applied_twice():
    core = _core()
    core.handle(b"s2", _forward(7, 5.0))  # worker 4's push ts 7, part 0, through master 2
    core.replica.apply_deferred()
    _sent(core)
    core.handle(b"n4", _push(7, 5.0, orig=[[2, 0]]))
    reply = _sent(core)[0][1]
    assert (reply.op, reply.meta.get("dup")) == ("ack", 1) and core.duplicates == 1
    assert (core.tables["default"].pull(KEYS) == 5).all()


def test_an_as_of_pull_is_held_until_the_push_it_names_is_applied():
    core = _core()
    core.handle(b"n5", _pull(1, as_of={"4": 3}))
    core.handle(b"n5", _pull(2))  # FIFO: held behind it
    assert not _sent(core)
    core.handle(b"n4", _push(3, 1.5))
    sent = [(to, m.op, m.ts) for to, m in _sent(core)]
    assert sent == [(b"n5", "vals", 1), (b"n5", "vals", 2), (b"n4", "ack", 3)]


# ------------------------------------------------------------------------------ sync rounds
def test_a_round_waits_only_for_the_workers_that_declared_the_table_as_pushers():
    core = _core(workers=(4, 5, 6))
    assert _declare(core, b"n4").meta["round"] == 0
    assert _declare(core, b"n5").meta["round"] == 0
    _declare(core, b"n6", pushes=False)  # an evaluation client: reads only
    core.handle(b"n4", _push(2, 1.0, "s", rnd=0))
    assert _acked(core) == []  # n5 declared: its push is awaited
    core.handle(b"n5", _push(2, 2.0, "s", rnd=0))
    assert _acked(core, b"n4") == [2]
    assert (core.tables["s"].pull(KEYS) == 3).all()


def test_a_late_declarer_is_waited_for_from_the_round_its_reply_names():
    core = _core(workers=(4, 5, 6))
    _declare(core, b"n4")
    _declare(core, b"n5")
    core.handle(b"n4", _push(2, 1.0, "s", rnd=0))  # round 0 began
    assert _declare(core, b"n6").meta["round"] == 1
    core.handle(b"n5", _push(2, 1.0, "s", rnd=0))
    assert _acked(core, b"n4") == [2]  # round 0 did not wait for n6
    core.handle(b"n4", _push(3, 1.0, "s", rnd=1))
    core.handle(b"n5", _push(3, 1.0, "s", rnd=1))
    assert _acked(core, b"n4") == []  # round 1 does
    core.handle(b"n6", _push(2, 4.0, "s", rnd=1))
    assert _acked(core, b"n4") == [3]
    assert (core.tables["s"].pull(KEYS) == 2 + 2 + 4).all()


def test_a_declared_pusher_that_dies_is_no_longer_waited_for_and_held_requests_follow():
    core = _core(workers=(4, 5))
    _declare(core, b"n4")
    _declare(core, b"n5")
    core.handle(b"n4", _push(2, 1.0, "s", rnd=0))
    core.handle(b"n4", _pull(3, "s"))  # held behind its sync push
    assert _sent(core) == []
    core.on_view(_view((4,), version=2))
    assert [(m.op, m.ts) for _, m in _sent(core)] == [("vals", 3), ("ack", 2)]


def test_without_declarations_a_round_waits_for_every_live_worker():
    core = _core(workers=(4, 5))
    _sync(core)
    core.handle(b"n4", _push(2, 1.0, "s", rnd=0))
    assert _acked(core) == []
    core.handle(b"n5", _push(2, 1.0, "s", rnd=0))
    assert _acked(core) == [2]


# ------------------------------------------------------------------------------ replica side
@pytest.mark.parametrize("op", ["replicate_agg", "replicate"])
def test_a_replica_acknowledges_a_forward_before_applying_it(op):
    core = _core()
    core.tables.declare(pserver.TableSpec(name="last", updater="assign"))
    core.replica.acks_due = {}  # in a burst
    for ts in range(1, 7):
        core.handle(b"s2", _forward(ts, ts, op, "last"))
    assert core.replica.acks_due == {b"s2": [1, 2, 3, 4, 5, 6]}
    assert (core.tables["last"].pull(KEYS) == 0).all()  # not applied yet
    core.replica.apply_deferred()  # what the loop does when a poll finds nothing waiting
    assert (core.tables["last"].pull(KEYS) == 6).all() and not core.replica.deferred


@pytest.mark.parametrize("reader", ["stats", "pull_range", "view"])
def test_deferred_forwards_are_applied_before_anything_reads_replica_data(reader):
    core = _core()
    core.stats = lambda: {"keys": len(core.tables["default"])}
    for ts in (1, 2, 3):
        core.handle(b"s2", _forward(ts, ts))
    assert core.replica.deferred
    if reader == "view":  # how a replica learns it was promoted to master
        core.on_view(_view((4,), version=2))
    else:
        core.handle(b"n4", Message(reader, 9, "default", {"lo": 0, "hi": 2**64}))
    assert not core.replica.deferred and (core.tables["default"].pull(KEYS) == 6).all()


def test_deferred_forwards_are_bounded(monkeypatch):
    monkeypatch.setattr(replica_mod, "DEFER_MAX_KEYS", 150)  # two forwards of 100 keys pass it
    core = _core()
    for ts in range(1, 6):
        core.handle(b"s2", _forward(ts, ts))
    assert len(core.replica.deferred) == 1 and core.replica.deferred_keys == len(KEYS)
    assert (core.tables["default"].pull(KEYS) == 1 + 2 + 3 + 4).all()


def test_a_deferred_forward_that_fails_is_counted_reported_and_recopied_from_its_master():
    def refuse_twos(w, pushed):
        if (pushed == 2).any():
            raise ValueError("no twos")
        w += pushed
    register_updater("refuse_twos", lambda **_: FunctionUpdater(refuse_twos))
    core = _core(default_updater="refuse_twos")
    for ts in (1, 2, 3):
        core.handle(b"s2", _forward(ts, ts))
    _sent(core)
    core.replica.apply_deferred()  # must not raise out of the server loop
    assert core.replica.apply_errors == 1 and core.rejections["ValueError"] == 1
    assert (core.tables["default"].pull(KEYS) == 1 + 3).all()
    resync = [(to, m) for to, m in _sent(core) if m.op == "repl_resync"]
    assert len(resync) == 1 and resync[0][0] == b"s2"  # the master is asked to copy the range
    lo, hi = int(KEYS[0]), int(KEYS[-1]) + 1
    assert (resync[0][1].table, resync[0][1].meta) == ("default", {"lo": lo, "hi": hi})


def test_the_master_answers_a_recopy_request_with_a_copy_of_its_keys_in_the_range():
    cap = RecordingTransport()
    repl = Replicator(cap, 1, lambda sid: ("h", sid))
    master = ServerCore(repl)
    master.on_view(ClusterView(version=1, nodes=_view((4,)).nodes, ring=KeyRing([1, 2], virtual=8)))
    keys = np.unique(np.random.default_rng(1).integers(0, 2**64 - 1, 200, dtype=np.uint64))
    master.handle(b"n4", _push(1, 3.0, keys=keys, rv=0))
    lo = int(keys[50])
    mine = keys[50:][repl.ring.owner_of(keys[50:]) == 1]
    assert 0 < len(mine) < len(keys) - 50
    repl.on_reply(2, Message("repl_resync", 0, "default", {"lo": lo, "hi": 2**64}))
    assert repl.rebuilder.has_work()
    repl.rebuilder.rebuild_step(master.tables)
    sent = [m for _, m in cap.sent]
    assert [m.op for m in sent] == ["repl_load"] and np.array_equal(sent[0].arrays[0], mine)
    assert (sent[0].arrays[1] == 3).all() and "clock" in sent[0].meta
    assert repl.stats()["resyncs_requested"] == 1


def test_a_copy_carries_full_exactly_once_windows_of_several_workers_within_the_header_limit():
    # the chaos soak: after a few thousand pushes per worker a copy's applied parts (a JSON list in
    # the header) passed 64 KB, and the new replica refused every copy of a migration
    from pserver import wire
    from pserver.ft.exactly_once import WINDOW

    cap = RecordingTransport()
    repl = Replicator(cap, 1, lambda sid: ("h", sid))
    master = ServerCore(repl)
    master.on_view(ClusterView(version=1, nodes=_view((4, 5, 6)).nodes,
                               ring=KeyRing([1, 2], virtual=8)))
    keys = np.unique(np.random.default_rng(1).integers(0, 2**64 - 1, 200, dtype=np.uint64))
    master.handle(b"n4", _push(1, 3.0, keys=keys, rv=0))
    for w in (4, 5, 6):
        for ts in range(2, WINDOW + 2):
            master.exactly_once.note_applied(w, ts, ts % 3 if ts % 5 else None)
    repl.on_reply(2, Message("repl_resync", 0, "default", {"lo": 0, "hi": 2**64}))
    repl.rebuilder.rebuild_step(master.tables)
    load = next(m for _, m in cap.sent if m.op == "repl_load")
    frames = wire.encode(load)
    assert len(bytes(frames[0])) < wire.DEFAULT_LIMITS.max_header_bytes
    holder = ServerCore(Replicator(None, 2, None))
    holder.on_view(ClusterView(version=1, nodes=_view((4, 5, 6)).nodes,
                               ring=KeyRing([1, 2], virtual=8)))
    holder.handle(b"s1", wire.decode([bytes(f) for f in frames]))
    assert not [m for _, m in _sent(holder) if m.op == "error"]
    once = holder.exactly_once
    for w in (4, 5, 6):   # the oldest and newest parts of every window, with and without part ids
        assert once.seen(1, w, 2, 2) and once.seen(1, w, WINDOW + 1, (WINDOW + 1) % 3)
        assert once.seen(1, w, 5, None) and not once.seen(1, w, 5, 2)
    assert not once.seen(1, 4, WINDOW + 2, 0)


@pytest.mark.parametrize("applied", [[np.zeros((3, 2), np.int64)], []])
def test_a_copy_whose_applied_parts_are_not_rows_of_four_int64_changes_nothing(applied):
    holder = _core()   # (3, 2) rows, or none at all although the header says they are there
    spec = holder.tables["default"].spec.to_json()
    holder.handle(b"s2", Message("repl_load", 0, "default", {"kf": "k", "spec": spec, "applied": 1},
                                 [KEYS, np.ones((len(KEYS), 1), np.float32), *applied]))
    assert [m.meta["kind"] for _, m in _sent(holder)] == ["ProtocolError"]
    assert len(holder.tables["default"]) == 0


# ------------------------------------------------------------------------------ clocks in copies
def test_a_copy_of_keys_carries_their_range_clock():
    master = _core()
    master.handle(b"n4", _push(5, 1.0))
    clock = master.clocks.copy_json("default", int(KEYS[0]), int(KEYS[-1]) + 1)
    holder = _core()
    load = Message("repl_load", 0, "default",
                   {"kf": "k", "spec": master.tables["default"].spec.to_json(), "clock": clock},
                   [KEYS, master.tables["default"].pull(KEYS)])
    holder.handle(b"s2", load)
    holder.handle(b"n5", _pull(1, as_of={"4": 5}))
    assert [m.op for _, m in _sent(holder)] == ["vals"]  # not held: the copy is as of ts 5


def test_a_malformed_clock_in_a_copy_changes_nothing():
    holder = _core()
    spec = holder.tables["default"].spec.to_json()
    holder.handle(b"s2", Message("repl_load", 0, "default", {"kf": "k", "spec": spec, "clock": {"x": 1}},
                                 [KEYS, np.ones((len(KEYS), 1), np.float32)]))
    assert [m.meta["kind"] for _, m in _sent(holder)] == ["ProtocolError"]
    assert len(holder.tables["default"]) == 0


def test_a_range_pull_with_a_limit_answers_pages_that_cover_the_range_once():
    core = _core()
    core.handle(b"n4", _push(1, 2.0), "worker")
    _sent(core)
    got, lo, hi = [], 0, 1 << 64
    for ts in range(2, 100):
        core.handle(b"n4", Message("pull_range", ts, "default", {"lo": lo, "hi": hi, "limit": 7}),
                    "worker")
        (_, reply), = _sent(core)
        assert reply.op == "range" and len(reply.arrays[0]) <= 7
        got.append(reply.arrays[0])
        if "next" not in reply.meta:
            break
        lo = reply.meta["next"]
    assert np.array_equal(np.concatenate(got), KEYS) and len(got) == -(-len(KEYS) // 7)


@pytest.mark.parametrize("limit", [0, -1, 1.5, "7"])
def test_a_range_pull_with_a_bad_limit_is_refused(limit):
    core = _core()
    core.handle(b"n4", Message("pull_range", 1, "default", {"lo": 0, "hi": 100, "limit": limit}), "worker")
    (_, reply), = _sent(core)
    assert reply.op == "error" and "limit" in reply.meta["error"]


# ------------------------------------------------------------------------------ migrations
def _servers_view(version: int, ring: KeyRing, dead=()) -> ClusterView:
    nodes = {4: NodeInfo(4, "worker", 0, "h", 0, 0)}
    for i, sid in enumerate((1, 2, 5)):
        nodes[sid] = NodeInfo(sid, "server", i, "h", sid, 0, alive=sid not in dead,
                              state="dead" if sid in dead else "up")
    return ClusterView(version=version, nodes=nodes, ring=ring, settings={"replication": 1})


def test_a_prepare_made_from_a_ring_this_server_lacks_waits_for_it_and_then_copies_every_key():
    """Server 1 replicates server 2 (k = 1). Server 2 dies and server 5 joins: the scheduler's
    prepare (from the failover ring v2, where 1 masters all) may arrive before the view of v2.
    Pre-copied then, it would leave out the keys 1 took over from 2 - lost at 5 after the commit."""
    cap = RecordingTransport()
    repl = Replicator(cap, 1, lambda sid: ("h", sid))
    core = ServerCore(repl)
    v1 = KeyRing([1, 2], virtual=8, version=1)
    core.on_view(_servers_view(1, v1))
    keys = np.unique(np.random.default_rng(3).integers(0, 2**64 - 1, 400, dtype=np.uint64))
    of1, of2 = keys[v1.owner_of(keys) == 1], keys[v1.owner_of(keys) == 2]
    assert len(of1) and len(of2)
    core.handle(b"n4", _push(1, 2.0, keys=of1, rv=1))
    spec = core.tables["default"].spec.to_json()
    core.handle(b"s2", Message("repl_load", 0, "default", {"kf": "k", "spec": spec},
                               [of2, np.full((len(of2), 1), 7.0, np.float32)]))
    v3 = KeyRing([1, 5], virtual=8, version=3)
    prepare = Message("migrate_prepare", 1, "", {"ring": v3.to_json(), "rv": 2,
                                                  "servers": {"1": ["h", 1], "5": ["h", 5]}})
    core.handle(b"sched", prepare)
    assert not repl.rebuilder.has_work() and not _sent(core)  # held: this server has ring v1
    core.on_view(_servers_view(2, KeyRing([1], virtual=8, version=2), dead=(2,)))
    while repl.rebuilder.rebuild_step(core.tables):
        pass
    copied = np.concatenate([m.arrays[0] for port, m in cap.sent if port == 5 and m.op == "repl_load"])
    assert np.array_equal(np.sort(copied), keys)  # k = 1 of two servers: 5 holds every key


def test_a_malformed_start_ring_of_a_prepare_is_refused():
    core = _core()
    core.handle(b"sched", Message("migrate_prepare", 1, "",
                                  {"ring": KeyRing([1]).to_json(), "rv": "two"}))
    assert [m.op for _, m in _sent(core)] == ["error"] and core.repl.next_ring is None
