"""Key caching on the replication link (pserver.ft.list_refs): a master names a key list its
replica stored instead of sending the keys again. Unit tests of the bookkeeping, of the master's
forwards (the Replicator over a capturing transport) and of a live replica over real sockets."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.errors import ProtocolError
from pserver.ft import list_refs
from pserver.ft.list_refs import RefSender, RefStore, check_refs
from pserver.ring import KeyRing
from pserver.wire import Message

from .test_replication import _ask, _my_keys, _replicator, replica  # noqa: F401 (fixture)


def test_a_sender_accounts_what_the_replica_holds_and_evicts_least_recent_first():
    s = RefSender(limit=100)
    assert s.store(1, 40) == [] and s.store(2, 40) == []
    assert s.use(1)                              # 1 is now the most recent
    assert s.store(3, 40) == [2]                 # room for 3: 2 goes
    assert not s.use(2) and s.use(3) and s.nbytes == 80
    assert s.store(4, 101) is None               # larger than the bound: never stored
    assert sorted(s.reset()) == [1, 3] and s.nbytes == 0 and not s.use(1)


def test_a_store_keeps_copies_within_its_bound_and_refuses_more():
    st = RefStore(limit=64)
    keys = np.arange(4, dtype=np.uint64)
    st.put(7, keys)
    keys[0] = 99                                 # the store holds a copy
    assert st.lists[7].tolist() == [0, 1, 2, 3]
    assert not st.put(8, np.arange(5, dtype=np.uint64))  # 32 + 40 bytes > 64: not stored
    assert 8 not in st.lists and st.nbytes == 32
    assert st.put(7, np.arange(2, dtype=np.uint64))      # stored again under 7: replaces it
    assert st.lists[7].tolist() == [0, 1] and st.nbytes == 16
    st.drop([7, 12345])
    assert st.lists == {} and st.nbytes == 0
    st.put(8, np.arange(5, dtype=np.uint64))
    same = np.arange(5, dtype=np.uint64)
    st.adopt(8, same)
    assert st.lists[8] is same
    st.adopt(8, np.arange(3, dtype=np.uint64))   # not the same list: kept as it was
    assert st.lists[8] is same


def test_check_refs_follows_the_items_in_order():
    st = RefStore()
    st.put(1, np.arange(3, dtype=np.uint64))
    assert check_refs(st, [{"kr": 1}])
    assert not check_refs(st, [{"kr": 2}]) and not check_refs(None, [{"kr": 1}])
    assert check_refs(st, [{"ks": 2}, {"kr": 2}])             # stored by an earlier item
    assert not check_refs(st, [{"kd": [1]}, {"kr": 1}])        # dropped by an earlier item
    assert check_refs(st, [{}, {"kf": "k"}])
    assert not check_refs(st, [{"ks": 3}, {"kd": [3]}, {"kr": 3}])  # stored, then dropped again
    assert check_refs(st, [{"kd": [1]}, {"ks": 1}, {"kr": 1}])      # dropped, then stored again
    for bad in ({"kd": 1}, {"kd": [[1]]}, {"kr": "1"}, {"ks": 1.5}):
        with pytest.raises(ProtocolError):
            check_refs(st, [bad])


def _forward(repl, keys, memo, token=("w", 0)):
    repl.forward(token, "replicate_agg", "default", {"clk": []}, keys,
                 np.ones((len(keys), 1), np.float32), memo=memo)


def test_a_master_sends_a_repeated_list_once_per_replica_then_names_it():
    repl, cap = _replicator()
    keys = _my_keys(repl, 3000)
    memo: dict = {}
    _forward(repl, keys, memo)
    first = {sid: msg for sid, msg in cap.sent}
    assert set(first) == {2, 3}
    for msg in first.values():
        assert "ks" in msg.meta and "kr" not in msg.meta and len(msg.arrays[0]) > 0
    _forward(repl, keys, memo, ("w", 1))
    again = {sid: msg for sid, msg in cap.sent[2:]}
    for sid, msg in again.items():               # no keys, the same values
        assert msg.meta["kr"] == first[sid].meta["ks"] and len(msg.arrays[0]) == 0
        assert len(msg.arrays[1]) == len(first[sid].arrays[0])
    _forward(repl, keys, None, ("w", 2))         # a list without a memo: keys every time
    assert all("kr" not in m.meta and "ks" not in m.meta for _, m in cap.sent[4:])
    repl.ring = KeyRing([1, 2, 3, 4], version=2)  # a new split: new parts, stored afresh
    _forward(repl, keys, memo, ("w", 3))
    assert all("ks" in m.meta and len(m.arrays[0]) for _, m in cap.sent[6:])


def test_with_the_setting_at_0_every_forward_carries_its_keys():
    repl, cap = _replicator()
    repl.ref_limit = 0
    keys = _my_keys(repl, 3000)
    memo: dict = {}
    for i in range(3):
        _forward(repl, keys, memo, ("w", i))
    assert all("ks" not in m.meta and "kr" not in m.meta and len(m.arrays[0]) for _, m in cap.sent)


def test_short_parts_travel_with_their_keys():
    repl, cap = _replicator()
    keys = _my_keys(repl, list_refs.MIN_KEYS)  # split over 2 replicas: both parts too short
    memo: dict = {}
    _forward(repl, keys, memo)
    _forward(repl, keys, memo)
    assert all("ks" not in m.meta and "kr" not in m.meta and len(m.arrays[0]) for _, m in cap.sent)


def test_the_master_evicts_lists_beyond_the_bound_and_tells_the_replica():
    repl, cap = _replicator()
    a, b = _my_keys(repl, 3000), _my_keys(repl, 2900)
    size = {(i, sid): np.arange(len(x))[sel].size * 8
            for i, x in enumerate((a, b)) for sid, sel in repl.replica_groups(x)}
    big = max(size, key=size.get)[1]              # the replica with the larger parts
    small = 5 - big                               # the other one (servers 2 and 3)
    limit = max(size.values())                    # room for either part, not both, at `big`
    assert size[0, big] + size[1, big] > limit >= size[0, small] + size[1, small]
    repl.ref_limit = limit
    ma: dict = {}
    mb: dict = {}
    _forward(repl, a, ma)
    _forward(repl, b, mb)
    first = {sid: m for sid, m in cap.sent[:2]}
    second = {sid: m for sid, m in cap.sent[2:]}
    assert second[big].meta["kd"] == [first[big].meta["ks"]]   # a's part evicted there
    assert "kd" not in second[small].meta                      # both fit there
    _forward(repl, a, ma)
    third = {sid: m for sid, m in cap.sent[4:]}
    assert "ks" in third[big].meta and len(third[big].arrays[0])   # a's keys travel again
    assert third[small].meta["kr"] == first[small].meta["ks"]


def test_a_miss_resends_the_forward_with_its_keys_and_forgets_every_stored_list():
    repl, cap = _replicator()
    keys = _my_keys(repl, 3000)
    memo: dict = {}
    _forward(repl, keys, memo)
    for sid, msg in cap.sent:
        repl.on_ack(msg.ts, sid)
    _forward(repl, keys, memo, ("w", 1))
    (sid, named), = [(s, m) for s, m in cap.sent[2:] if s == 2]
    assert named.meta["kr"] and repl.outstanding[("w", 1)] == 2
    assert repl.on_miss(named.ts, 3) == []        # not where the forward went: ignored
    assert repl.on_miss(named.ts, 2) == []
    resent = cap.sent[-1]
    assert resent[0] == 2 and resent[1].ts != named.ts
    assert "kr" not in resent[1].meta and resent[1].meta["kd"] == [named.meta["kr"]]
    assert resent[1].arrays[0].tolist() == [int(k) for k in keys[np.isin(keys, resent[1].arrays[0])]]
    assert len(resent[1].arrays[0]) == len(named.arrays[1])
    assert repl.on_ack(named.ts, 2) == []         # the refused forward is no longer awaited
    other = next(m for s, m in cap.sent[2:-1] if s == 3)
    assert repl.on_ack(other.ts, 3) == []
    assert repl.on_ack(resent[1].ts, 2) == [("w", 1)]
    _forward(repl, keys, memo, ("w", 2))          # stored again at replica 2
    assert next(m for s, m in cap.sent[-2:] if s == 2).meta.get("ks")


def _values(kv, sock, keys) -> list[float]:
    # The test plays a master whose keys this server masters too, so the worker's pull (deferrable:
    # it reads master data) could overtake forwards acknowledged but not applied yet. A stats
    # request is not deferrable: the server applies every acknowledged forward before it answers.
    _ask(sock, Message("stats", 0))
    return kv.pull(keys).ravel().tolist()


def test_a_replica_applies_named_lists_and_refuses_a_message_naming_one_it_lacks(replica):  # noqa: F811
    kv, sock = replica
    node = kv.membership.view.role_nodes("server")[0]
    cand = np.arange(2**44, 2**44 + 20000, dtype=np.uint64)
    keys = cand[kv.membership.view.ring.owner_of(cand) == node.id][:300]  # pulled from that server
    assert len(keys) == 300
    ones = np.ones((300, 1), np.float32)
    item = ["replicate_agg", "default", {"kf": "k", "clk": [], "ks": 501}]
    reply = _ask(sock, Message("repl_batch", 1, "", {"items": [item]}, [keys, ones]))
    assert reply.op == "repl_ack" and not reply.meta.get("errors")
    named = ["replicate_agg", "default", {"kf": "k", "clk": [], "kr": 501}]
    reply = _ask(sock, Message("repl_batch", 2, "", {"items": [named, named]},
                               [np.zeros(0, np.uint64), 2 * ones] * 2))
    assert reply.op == "repl_ack" and not reply.meta.get("errors")
    assert _values(kv, sock, keys) == [5.0] * 300
    # a message naming a list the replica lacks is refused whole: its first item is not applied
    missing = ["replicate_agg", "default", {"kf": "k", "clk": [], "kr": 999}]
    reply = _ask(sock, Message("repl_batch", 3, "", {"items": [named, missing]},
                               [np.zeros(0, np.uint64), ones] * 2))
    assert (reply.op, reply.ts) == ("repl_miss", 3)
    reply = _ask(sock, Message("replicate_agg", 4, "default", missing[2], [np.zeros(0, np.uint64), ones]))
    assert (reply.op, reply.ts) == ("repl_miss", 4)
    # dropped by the master: then missing too
    dropped = ["replicate_agg", "default", {"kf": "k", "clk": [], "kd": [501]}]
    k2 = keys[:1]
    reply = _ask(sock, Message("repl_batch", 5, "", {"items": [dropped, named]},
                               [k2, ones[:1], np.zeros(0, np.uint64), ones]))
    assert (reply.op, reply.ts) == ("repl_miss", 5)
    assert _values(kv, sock, keys) == [5.0] * 300
    # a named list with keys, or values of the wrong length: refused, nothing applied
    for arrays in ([keys, ones], [np.zeros(0, np.uint64), ones[:7]]):
        reply = _ask(sock, Message("replicate_agg", 6, "default", named[2], arrays))
        assert (reply.op, reply.meta.get("kind")) == ("error", "ProtocolError"), reply
    assert _values(kv, sock, keys) == [5.0] * 300
    # an item meant to store a list is refused (no such table): a later item naming it is refused
    # too, with its own error, and the server goes on
    bad_store = ["replicate_agg", "nope", {"kf": "k", "clk": [], "ks": 502}]
    uses = ["replicate_agg", "default", {"kf": "k", "clk": [], "kr": 502}]
    reply = _ask(sock, Message("repl_batch", 8, "", {"items": [bad_store, uses]},
                               [keys, ones, np.zeros(0, np.uint64), ones]))
    assert reply.op == "repl_ack" and reply.meta["errors"] == 2 and "nope" in reply.meta["error"]
    assert _values(kv, sock, keys) == [5.0] * 300
    stats = _ask(sock, Message("stats", 7)).meta["replication"]
    assert stats["key_lists_held"] == {"77": 1}
