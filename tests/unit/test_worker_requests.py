"""KVWorker's request paths driven without sockets (its sends recorded, replies fed back): a filtered
push resent after a failover counts held-back values once; declarations and synchronous rounds."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from pserver import wire
from pserver.errors import TableError
from pserver.kv.sending import Sender
from pserver.kv.tracker import Request, RequestTracker
from pserver.kv.worker import KVWorker
from pserver.ring import KeyRing
from pserver.store.spec import TableSpec
from pserver.wire import Message


class _Recorder(Sender):
    """A Sender that records what would go out instead of sending it."""

    def __init__(self) -> None:
        super().__init__(None, None, b"n9", threading.RLock())
        self.sent: list = []

    def send(self, sid: int, msg: Message) -> None:
        self.sent.append((sid, msg))

    def send_frames(self, sid: int, ts: int, frames: list, op: str) -> None:
        self.sent.append((sid, wire.decode(frames)))  # a plain push, already encoded


def _worker(spec: TableSpec, ring: KeyRing) -> tuple[KVWorker, list]:
    """A KVWorker without a cluster: its sends are recorded instead of going out."""
    kv = object.__new__(KVWorker)
    kv._tracker = RequestTracker()
    kv._tables = {spec.name: spec}
    kv._lock, kv._closed, kv.idle_timer = threading.RLock(), False, None
    kv._read_only, kv._rounds = set(), {}
    kv.cfg = SimpleNamespace(request_timeout=5.0, group="default", worker_busy_poll=0.0)
    kv.transport = None
    kv.membership = SimpleNamespace(view=SimpleNamespace(ring=ring, version=ring.version,
                                                         settings={}),
                                    scheduler_lost=threading.Event())
    sender = _Recorder()
    kv._assemble(sender)
    kv._router.routed_rv = kv._router.routed_view = ring.version
    kv._router.due = float("inf")
    return kv, sender.sent


def _answer_with(kv: KVWorker, sent: list, reply) -> None:
    """Make ``kv`` answer each recorded message with ``reply(server, message)`` when it waits."""
    def progress(_timeout: float) -> None:
        while sent:
            sid, msg = sent.pop(0)
            kv._replies.on_message(sid, reply(sid, msg))
    kv._progress = progress


def test_declare_table_sends_pushes_false_and_takes_the_highest_server_round():
    kv, sent = _worker(TableSpec(name="default"), KeyRing([1, 2], version=1))
    metas = []

    def reply(sid: int, msg: Message) -> Message:
        metas.append(msg.meta)
        return Message("ok", msg.ts, meta={"p": msg.meta["p"], "round": {1: 4, 2: 6}[sid]})

    _answer_with(kv, sent, reply)
    kv.declare_table("eval", sync=True, pushes=False)
    assert [m.get("pushes") for m in metas] == [False, False]
    assert kv._rounds["eval"] == 6
    with pytest.raises(TableError, match="pushes=True"):
        kv.push(np.arange(3, dtype=np.uint64), np.ones(3, np.float32), table="eval")
    assert len(kv._tracker) == 0 and not sent
    metas.clear()
    kv.declare_table("eval", sync=True)  # pushes=True: the field is left out
    assert [("pushes" in m) for m in metas] == [False, False]

    def ack(sid: int, msg: Message) -> Message:
        metas.append(msg.meta)
        return Message("ack", msg.ts, meta={"p": msg.meta["p"]})

    _answer_with(kv, sent, ack)
    metas.clear()
    kv.wait(kv.push(np.arange(3, dtype=np.uint64), np.ones(3, np.float32), table="eval"))
    assert {m["rnd"] for m in metas} == {6}  # joins at the servers' next round
    assert kv._rounds["eval"] == 7


def test_declaring_a_pushed_table_again_keeps_the_workers_own_round():
    """The servers' reply names their next round not begun; another worker may have begun this
    worker's next round already. Taking the reply would skip that round, which still waits for
    this worker's push: every worker of the job then hangs (the 4-worker LR job did)."""
    kv, sent = _worker(TableSpec(name="default"), KeyRing([1, 2], version=1))
    rounds = iter([0, 0, 2, 2])   # the second declaration: round 1 already began elsewhere
    metas = []

    def reply(sid: int, msg: Message) -> Message:
        metas.append(msg.meta)
        if msg.op == "declare_table":
            return Message("ok", msg.ts, meta={"p": msg.meta["p"], "round": next(rounds)})
        return Message("ack", msg.ts, meta={"p": msg.meta["p"]})

    _answer_with(kv, sent, reply)
    kv.declare_table("s", sync=True)
    keys = np.arange(3, dtype=np.uint64)
    kv.wait(kv.push(keys, np.ones(3, np.float32), table="s"))
    metas.clear()
    kv.declare_table("s", sync=True)
    kv.wait(kv.push(keys, np.ones(3, np.float32), table="s"))
    assert {m["rnd"] for m in metas if "rnd" in m} == {1}
    assert kv._rounds["s"] == 2


def test_a_resent_filtered_push_does_not_count_held_back_values_twice():
    spec = TableSpec(name="sig", push_filters="significant:abs:1.5")
    old, new = KeyRing([1, 2], version=1), KeyRing([2], version=2)
    kv, sent = _worker(spec, old)
    keys = np.arange(0, 4000, 7, dtype=np.uint64)
    vals = np.where(np.arange(len(keys)) % 2 == 0, 2.0, 1.0).astype(np.float32).reshape(-1, 1)
    ts = kv._tracker.next_ts()
    req = Request("push", "sig", keys, vals)
    msgs = [kv._parts.encode_part(ts, req, sid, sel, old.version) for sid, sel in old.split(keys)]
    kv._tracker.register(ts, req)
    for sid, msg in msgs:
        kv._send(sid, msg)
    n_first = len(sent)

    # server 1 leaves before acknowledging: its part goes to server 2, which may see it twice
    plan, _ = kv._tracker.reroute_plan(set(new.servers), set(), new.version, now=0.0)
    for t, r, pid, orig in plan:
        kv._router.resend(t, r, pid, orig, new)
    resent = sent[n_first:]
    assert resent and all(sid == 2 for sid, _ in resent)
    assert all(m.meta["orig"] == [[1, 0]] for _, m in resent)

    # what went out, first send and resend of server 1's part: each big value exactly once
    part1 = req.parts[0]
    first_keys = {int(k) for k in keys[part1.sel][vals[part1.sel, 0] == 2.0]}
    resent_keys = {int(k) for _, m in resent for k in m.arrays[0]}
    assert resent_keys == first_keys
    # held back (the 1.0 values): once in all, whatever server held them
    held_keys, held_vals = kv.filters.take_held(spec)
    assert held_keys.tolist() == keys[vals[:, 0] == 1.0].tolist()
    assert (held_vals == 1.0).all()
