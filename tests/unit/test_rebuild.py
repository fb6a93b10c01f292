"""The Rebuilder over its narrow CopyChannel, with no Replicator: migration pre-copies counted on
the channel's ack counter, an aborted migration's chunks cancelled, a dead peer's chunks lost, and
re-replication copies sent unacknowledged."""

from __future__ import annotations

import numpy as np

from pserver.ft.rebuild import PRECOPY_KEYS, Rebuilder
from pserver.ring import KeyRing
from pserver.store.spec import TableSpec
from pserver.store.table import Table


class Sent:
    """A link that keeps what is sent on it."""

    def __init__(self) -> None:
        self.msgs: list = []

    def send(self, msg, to=None) -> None:
        self.msgs.append(msg)


class Channel:
    """A CopyChannel that records what the Rebuilder asks of it."""

    def __init__(self, my_id: int, ring: KeyRing, k: int = 1) -> None:
        self.k, self.my_id, self.ring, self.next_ring = k, my_id, ring, None
        self.links: dict[int, Sent] = {}
        self.rids: dict[int, tuple] = {}
        self.outstanding: dict[object, int] = {}

    def link(self, sid):
        return self.links.setdefault(sid, Sent())

    def track(self, sid, tokens):
        rid = len(self.rids) + 1
        self.rids[rid] = (sid, tokens)
        return rid

    def expect(self, token, n):
        self.outstanding[token] = self.outstanding.get(token, 0) + n

    def lose(self, token):
        self.outstanding[token] -= 1
        if self.outstanding[token]:
            return False
        del self.outstanding[token]
        return True

    def cancel(self, token):
        self.outstanding.pop(token, None)


def _tables(n: int) -> dict:
    table = Table(TableSpec(name="t"))
    keys = np.unique(np.random.default_rng(3).integers(0, 2**64 - 1, n, dtype=np.uint64))
    table.load(keys, np.ones((len(keys), 1), np.float32))
    return {"t": table}


def test_precopies_are_counted_on_the_channel_and_sent_with_tracked_ids():
    ch = Channel(1, KeyRing([1, 2], version=1), k=0)
    rebuilder, tables = Rebuilder(ch), _tables(3 * PRECOPY_KEYS)
    ch.next_ring = new = KeyRing([1, 2, 3], version=2)
    count = rebuilder.precopy(new, tables, "token")
    assert count > 0 and ch.outstanding == {"token": count} and rebuilder.has_work()
    while rebuilder.rebuild_step(tables):
        pass
    assert len(ch.rids) == count and all(tokens == ["token"] for _, tokens in ch.rids.values())
    sent = [(sid, m.ts) for sid, link in ch.links.items() for m in link.msgs]
    assert sorted(rid for _, rid in sent) == sorted(ch.rids)  # each chunk under its tracked id
    assert all(ch.rids[rid][0] == sid for sid, rid in sent)


def test_an_aborted_migration_cancels_its_precopies_and_a_dead_peer_loses_them():
    ch = Channel(1, KeyRing([1, 2], version=1), k=0)
    rebuilder, tables = Rebuilder(ch), _tables(3 * PRECOPY_KEYS)
    new = KeyRing([1, 3, 4], version=2)  # server 1 hands keys to 3 and 4
    rebuilder.precopy(new, tables, "a")
    while rebuilder.rebuild_step(tables):  # next_ring is None: the migration was aborted
        pass
    assert "a" not in ch.outstanding and ch.rids == {} and ch.links == {}
    ch.next_ring = new
    count = rebuilder.precopy(new, tables, "b")
    to_three = sum(-(-len(j[2]) // PRECOPY_KEYS) for j in rebuilder.jobs if j[1] == 3)
    assert 0 < to_three < count
    assert rebuilder.drop_peer(3) == [] and ch.outstanding == {"b": count - to_three}
    assert all(j[1] != 3 for j in rebuilder.jobs)


def test_rebuilding_after_a_failover_sends_unacknowledged_copies_and_marks_the_version():
    old = KeyRing([1, 2, 3], version=1)
    new = KeyRing([1, 2], version=2)
    ch = Channel(1, new)
    rebuilder, tables = Rebuilder(ch), _tables(1000)
    assert rebuilder.plan_rebuild(old, new, tables) > 0 and rebuilder.rebuilt_version == 0
    assert not rebuilder.rebuild_step(tables)
    assert rebuilder.rebuilt_version == 2 and ch.rids == {} and ch.outstanding == {}
    assert [m.op for m in ch.links[2].msgs] == ["repl_load"] and ch.links[2].msgs[0].ts == 0
