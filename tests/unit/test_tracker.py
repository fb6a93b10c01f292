"""The worker's request tracker, driven without sockets: parts, completion, paging, re-routing."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.errors import DataLostError, LimitError, RemoteError
from pserver.kv.tracker import Request, RequestTracker
from pserver.wire import Message


def _push(tracker: RequestTracker, sids=(1, 2), callback=None) -> tuple[int, Request]:
    ts = tracker.next_ts()
    req = Request("push", "t", np.arange(4, dtype=np.uint64), np.ones((4, 1), np.float32),
                  callback=callback)
    for i, sid in enumerate(sids):
        req.add_part(sid, slice(2 * i, 2 * i + 2), rv=1)
    tracker.register(ts, req)
    return ts, req


def test_an_ack_of_a_pull_or_push_pull_is_not_taken_as_its_answer_but_fails_it_as_a_misfit():
    tr = RequestTracker()
    ts = tr.next_ts()
    req = Request("pull", "t", np.arange(4, dtype=np.uint64), out=np.zeros((4, 1), np.float32))
    req.add_part(1, slice(0, 4), rv=1)
    tr.register(ts, req)
    assert tr.ack(1, ts, 0) is False and ts in tr.pending  # nothing changed: not a push
    tr.on_reply(1, ts, req, 0, Message("ack", ts, meta={"p": 0}))  # the caller's fallback
    with pytest.raises(RemoteError, match="does not fit"):
        raise tr.collect(ts).error
    # a push_pull, too, is answered with its values: an ack fails it instead of completing it empty
    ts = tr.next_ts()
    req = Request("pushpull", "t", np.arange(4, dtype=np.uint64), np.ones((4, 1), np.float32),
                  out=np.zeros((4, 1), np.float32))
    req.add_part(1, slice(0, 4), rv=1)
    tr.register(ts, req)
    assert tr.ack(1, ts, 0) is False
    tr.on_reply(1, ts, req, 0, Message("ack", ts, meta={"p": 0}))
    with pytest.raises(RemoteError, match="answered with 'ack'"):
        raise tr.collect(ts).error


def test_a_push_completes_when_every_part_is_acknowledged_and_is_then_forgotten():
    tr = RequestTracker()
    ts, _ = _push(tr)
    tr.ack(1, ts, 0)
    tr.ack(2, ts, 0)          # stale: part 0 went to server 1, not 2
    assert ts in tr.pending
    tr.ack(2, ts, 1)
    assert ts not in tr.pending and len(tr) == 0
    assert tr.collect(ts) is None  # completed and forgotten: wait returns None
    with pytest.raises(KeyError):
        tr.collect(99)


def test_a_pull_is_kept_until_collected_but_one_with_a_callback_is_not():
    tr = RequestTracker()
    got = []
    for cb in (None, got.append):
        ts = tr.next_ts()
        out = np.zeros((2, 1), np.float32)
        req = Request("pull", "t", np.arange(2, dtype=np.uint64), out=out, result=out,
                      callback=cb)
        req.add_part(1, slice(0, 2), rv=1)
        tr.register(ts, req)
        tr.on_reply(1, ts, req, 0, Message("vals", ts, meta={"p": 0},
                                           arrays=[np.full((2, 1), 7, np.float32)]))
    assert list(tr.finished) == [1] and len(got) == 1 and (got[0] == 7).all()
    assert (tr.collect(1).result == 7).all() and len(tr) == 0


def test_callback_only_requests_keep_nothing():
    tr = RequestTracker()
    done = []
    for _ in range(1000):
        ts, _ = _push(tr, sids=(1,), callback=lambda: done.append(1))
        tr.ack(1, ts, 0)
    assert len(done) == 1000 and len(tr) == 0


def test_a_failed_request_with_a_callback_is_kept_for_its_wait():
    tr = RequestTracker()
    ts, req = _push(tr, sids=(1,), callback=lambda: None)
    tr.on_reply(1, ts, req, 0, Message("error", ts, meta={"p": 0, "kind": "X", "error": "bad"}))
    with pytest.raises(RemoteError, match="bad"):
        raise tr.collect(ts).error


def test_a_refused_part_is_resent_after_the_retry_delay():
    tr = RequestTracker()
    ts, req = _push(tr)
    tr.on_reply(1, ts, req, 0, Message("error", ts, meta={"p": 0, "kind": "WrongOwnerError",
                                                          "rv": 2}))
    assert tr.refused and req.waiting == {0, 1}
    plan, retry = tr.reroute_plan({1, 2}, set(), ring_version=2, now=100.0)
    assert plan == [] and retry and not tr.refused
    plan, retry = tr.reroute_plan({1, 2}, set(), ring_version=2, now=101.0)
    assert [(t, p, o) for t, _, p, o in plan] == [(ts, 0, ())] and not retry  # not applied
    assert req.waiting == {1}


def test_a_part_whose_server_left_is_resent_naming_where_it_may_have_applied():
    tr = RequestTracker()
    ts, req = _push(tr)
    plan, _ = tr.reroute_plan({2, 3}, set(), ring_version=2, now=0.0)
    assert [(t, p, o) for t, _, p, o in plan] == [(ts, 0, ((1, 0),))]
    assert req.waiting == {1}
    req.waiting.discard(1)
    tr.settle(ts)
    assert ts not in tr.pending


def test_data_lost_fails_the_older_request_at_its_own_wait_not_a_new_one():
    tr = RequestTracker()
    old, _ = _push(tr)
    plan, _ = tr.reroute_plan({1, 2}, {1}, ring_version=1, now=0.0)  # server 1 lost, no replica
    assert plan == [] and old not in tr.pending
    new, _ = _push(tr, sids=(2,))
    tr.ack(2, new, 0)
    assert tr.collect(new) is None
    with pytest.raises(DataLostError, match="checkpoint"):
        raise tr.collect(old).error


def _range(tr: RequestTracker, lo: int, hi: int) -> tuple[int, Request]:
    ts = tr.next_ts()
    req = Request("range", "t", meta={"lo": lo, "hi": hi})
    req.add_part(1, (lo, hi), rv=1)
    tr.register(ts, req)
    return ts, req


def _answer(keys) -> list[np.ndarray]:
    k = np.asarray(keys, np.uint64)
    return [k, k.astype(np.float32).reshape(-1, 1)]


def test_a_paging_server_is_asked_for_the_next_page():
    tr = RequestTracker()
    ts, req = _range(tr, 0, 100)
    nxt = tr.on_reply(1, ts, req, 0, Message("range", ts, meta={"p": 0, "next": 50},
                                              arrays=_answer([3, 7])))
    assert [req.parts[p].sel for p in nxt] == [(50, 100)] and ts in tr.pending
    tr.on_reply(1, ts, req, nxt[0], Message("range", ts, meta={"p": nxt[0]},
                                            arrays=_answer([60])))
    keys, vals = tr.collect(ts).result
    assert keys.tolist() == [3, 7, 60] and vals.tolist() == [3, 7, 60]


def test_an_oversized_range_answer_asks_for_halves_and_an_oversized_pull_fails():
    tr = RequestTracker()
    ts, req = _range(tr, 0, 100)
    halves = tr.on_oversized(1, ts, 0, LimitError("too big"))
    assert [req.parts[p].sel for p in halves] == [(0, 50), (50, 100)]
    for p, keys in zip(halves, ([1], []), strict=True):
        tr.on_reply(1, ts, req, p, Message("range", ts, meta={"p": p}, arrays=_answer(keys)))
    assert tr.collect(ts).result[0].tolist() == [1]
    ts, req = _range(tr, 5, 6)  # one key that does not fit: nothing left to halve
    assert tr.on_oversized(1, ts, 0, LimitError("too big")) == []
    with pytest.raises(LimitError, match="PSERVER_MAX_MESSAGE_BYTES"):
        raise tr.collect(ts).error
    ts, req = _push(tr, sids=(1,))
    tr.on_oversized(1, ts, 0, LimitError("too big"))
    assert isinstance(tr.collect(ts).error, LimitError)


def test_a_declaration_takes_the_highest_round_of_its_servers():
    tr = RequestTracker()
    ts = tr.next_ts()
    req = Request("declare", meta={"spec": {}}, result={})
    for sid in (1, 2):
        req.add_part(sid, None, rv=1)
    tr.register(ts, req)
    tr.on_reply(1, ts, req, 0, Message("ok", ts, meta={"p": 0, "round": 3}))
    tr.on_reply(2, ts, req, 1, Message("ok", ts, meta={"p": 1, "round": 5, "push_factor": 2}))
    assert tr.collect(ts).result == {"round": 5, "push_factor": 2}
