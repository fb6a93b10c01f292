"""Copies of key ranges between servers, made between request bursts: re-replication after a
failover (new replicas get the keys they lack), re-copies replicas ask for, and the pre-copy phase
of a live migration. A :class:`Rebuilder` is held by the :class:`~pserver.ft.replication.Replicator`
and reaches it only through :class:`CopyChannel` (placement, links, the one ack counter).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..link import Link, LinkError
from ..protocol import APPLIED, KEY_FORM, RANGE_CLOCK, SPEC
from ..ring import KeyRing
from ..wire import Message

log = logging.getLogger(__name__)

PRECOPY_KEYS = 1 << 16   # keys per migration pre-copy chunk, sent between request bursts


class CopyChannel(Protocol):
    """What a Rebuilder uses of its Replicator: where keys live (``k``, ``my_id``, ``ring``,
    ``next_ring``: read on every use, they change with the view), the links to peers, and the
    replication ids and ack counter that pre-copies share with forwards."""

    k: int
    my_id: int
    ring: KeyRing | None
    next_ring: KeyRing | None

    def link(self, sid: int) -> Link:
        """The link to server ``sid`` (opened on first use)."""

    def track(self, sid: int, tokens: list) -> int:
        """A new replication id for a message to ``sid`` whose ack settles one ack of each of
        ``tokens``."""

    def expect(self, token: object, n: int) -> None:
        """``n`` more acks are due for ``token``."""

    def lose(self, token: object) -> bool:
        """One expected ack of ``token`` will not come; True when it has none left."""

    def cancel(self, token: object) -> None:
        """Forget every ack still due for ``token``."""


class Rebuilder:
    """Background copies of ranges: a queue of (table, server, keys, token) jobs - token None for
    a re-replication or re-copy (not acknowledged), else the migration's pre-copy token - sent a
    chunk at a time by :meth:`rebuild_step`."""

    def __init__(self, channel: CopyChannel) -> None:
        self.channel = channel
        self.jobs: deque[tuple[str, int, np.ndarray, object]] = deque()
        self.rebuilt_version = 0   # ring version whose background copies are all sent
        self._rebuilding_version = 0
        self.last_copied = 0       # keys the last precopy queued
        self.resyncs: list[tuple[int, str, int, int]] = []  # re-copies replicas asked for
        self.resyncs_requested = 0
        # set by the server core: what travels with each copy
        self.clock_of: Callable[[str, int, int], dict | None] = lambda _t, _lo, _hi: None
        self.applied_of: Callable[[], np.ndarray] = lambda: np.empty((0, 4), np.int64)  # exactly-once windows

    def has_work(self) -> bool:
        """True while copies of ranges wait to be sent (see rebuild_step)."""
        return bool(self.jobs or self.resyncs)

    def mark_rebuilt(self, version: int) -> None:
        """Ring ``version`` needs no copies (adopted by a migration's commit, or with k=0)."""
        self.rebuilt_version = version

    def resync(self, sid: int, table: str, lo: int, hi: int) -> None:
        """Replica ``sid`` asked for keys [lo, hi) of ``table`` again; queued at the next step."""
        self.resyncs.append((sid, table, lo, hi))
        self.resyncs_requested += 1

    def drop_peer(self, sid: int) -> list[object]:
        """Server ``sid`` died: drop the pre-copies queued for it (their acks will not come).
        Returns the pre-copy tokens left with no acks due."""
        lose = self.channel.lose
        lost = [j for j in self.jobs if j[3] is not None and j[1] == sid]
        done: list[object] = []
        if lost:
            self.jobs = deque(j for j in self.jobs if j[3] is None or j[1] != sid)
            for _, _, keys, token in lost:
                for _ in range(chunks(len(keys))):
                    if lose(token):
                        done.append(token)
        return done

    # -- re-replication after a ring change -----------------------------------------------------
    def _copies(self, old: KeyRing | None, new: KeyRing, tables: dict, masters: KeyRing
                ) -> list[tuple[str, int, np.ndarray]]:
        """(table, server, keys): the keys this server masters under ``masters`` that a server
        holds under ``new`` but did not under ``old``."""
        ch, out = self.channel, []
        for name, table in tables.items():
            keys = table.keys_sorted()
            if not len(keys):
                continue
            # one pass over the keys per ring (a migration's prepare runs between requests)
            old_holders = old.holders(keys, ch.k) if old is not None else None
            if masters is old and old_holders is not None:
                mine = old_holders[:, 0] == ch.my_id
                old_holders = old_holders[mine]
            else:
                mine = masters.owner_of(keys) == ch.my_id
                if old_holders is not None:
                    old_holders = old_holders[mine]
            keys = keys[mine]
            if not len(keys):
                continue
            new_holders = new.holders(keys, ch.k)
            for sid in new.servers:
                if sid == ch.my_id:
                    continue
                need = (new_holders == sid).any(axis=1)
                if old_holders is not None:
                    need &= ~(old_holders == sid).any(axis=1)
                if need.any():
                    out.append((name, int(sid), keys[need]))
        return out

    def _send_copy(self, table, sid: int, keys: np.ndarray, rid: int = 0) -> None:
        """One repl_load: the keys' values and state as stored now, and this master's applied
        parts. ``rid`` > 0 asks the receiver to acknowledge it."""
        values, state = table.rows(keys)
        arrays = [keys, values] + ([state] if state is not None else []) + [self.applied_of()]
        meta = {KEY_FORM: "k", SPEC: table.spec.to_json(), APPLIED: 1}  # the last array
        clock = self.clock_of(table.spec.name, int(keys[0]), int(keys[-1]) + 1) if len(keys) else None
        if clock is not None:  # an "as of" read at the copy's holder must not wait for ever
            meta[RANGE_CLOCK] = clock
        self.channel.link(sid).send(Message("repl_load", rid, table.spec.name, meta, arrays))

    def plan_rebuild(self, old: KeyRing, new: KeyRing, tables: dict) -> int:
        """After a failover: queue copies of the keys this server masters under ``new`` to their
        new replicas; :meth:`rebuild_step` sends them a chunk at a time between requests, so the
        failed ranges are served at once while replicas are rebuilt in the background. Each chunk
        is read from the table when sent and links are FIFO, so a replica ends with the master's
        state: updates forwarded before a chunk are overwritten by it, later ones follow it.
        Returns the keys queued; replaces any copies still queued.

        Raises: nothing; a ring without ``k``/``my_id`` set yields no copies."""
        self.jobs = deque((name, sid, keys, None)
                          for name, sid, keys in self._copies(old, new, tables, masters=new))
        self._rebuilding_version = new.version
        if not self.jobs:
            self.rebuilt_version = new.version
        return sum(len(job[2]) for job in self.jobs)

    def rebuild_step(self, tables: dict, budget: int = 1 << 16) -> bool:
        """Send up to ``budget`` keys of queued copies (re-replication, re-copies, migration
        pre-copies); True while more remain.

        Raises: nothing - a copy that cannot be sent is logged and dropped (a replica's keys then
        have fewer copies; a pre-copy's migration times out and is aborted); a pre-copy of an
        aborted migration is dropped with its acks cancelled."""
        ch = self.channel
        if self.resyncs:
            self._plan_resyncs(tables)
        while budget > 0 and self.jobs:
            name, sid, keys, token = self.jobs[0]
            size = budget if token is None else PRECOPY_KEYS  # pre-copies go in counted chunks
            chunk, rest = keys[:size], keys[size:]
            if rest.size:
                self.jobs[0] = (name, sid, rest, token)
            else:
                self.jobs.popleft()
            budget -= chunk.size
            table = tables.get(name)
            if token is not None:
                if ch.next_ring is None:  # the migration was aborted
                    ch.cancel(token)
                    continue
                rid = ch.track(sid, [token])
                try:
                    self._send_copy(table, sid, chunk, rid)
                except LinkError as e:  # the migration then times out and is aborted
                    log.warning("cannot pre-copy to server %d: %s", sid, e)
                continue
            if table is None or ch.ring is None or sid not in ch.ring.servers:
                continue
            try:
                self._send_copy(table, sid, chunk)
            except LinkError as e:
                log.warning("cannot copy to replica %d: %s", sid, e)
        if not any(job[3] is None for job in self.jobs):
            self.rebuilt_version = self._rebuilding_version
        return bool(self.jobs)

    def _plan_resyncs(self, tables: dict) -> None:
        """Queue copies of the ranges replicas asked for again (their apply of a forward failed):
        the keys of each range that this server masters."""
        ch, (resyncs, self.resyncs) = self.channel, (self.resyncs, [])
        for sid, name, lo, hi in resyncs:
            table = tables.get(name)
            if table is None or ch.ring is None:
                continue
            keys = table.keys_sorted()
            keys = keys[np.searchsorted(keys, np.uint64(lo)):np.searchsorted(keys, np.uint64(hi - 1),
                                                                               side="right")]
            keys = keys[ch.ring.owner_of(keys) == ch.my_id] if len(keys) else keys
            if len(keys):
                self.jobs.append((name, sid, keys, None))

    def precopy(self, new: KeyRing, tables: dict, token: object) -> int:
        """Phase 1 of a migration: queue copies of the keys this server masters now to the
        servers that will hold them under ``new``, each chunk acknowledged to ``token``; they go
        out between request bursts (:meth:`rebuild_step`), so serving never stops for the copy.
        Meanwhile every update of those keys is forwarded to the new holders too (see
        replica_groups) - before or after their chunk, which is read from the table when sent, so
        the holder ends with the master's state either way. Returns the number of chunks to be
        acknowledged (0: nothing to wait for), which are also expected on the channel.

        Raises: nothing; nothing is sent until :meth:`rebuild_step`."""
        count = nkeys = 0
        ring = self.channel.ring
        for name, sid, keys in self._copies(ring, new, tables, masters=ring):
            self.jobs.append((name, sid, keys, token))
            count += chunks(len(keys))
            nkeys += len(keys)
        if count:
            self.channel.expect(token, count)
            log.info("pre-copying %d keys to their holders under ring v%d", nkeys, new.version)
        self.last_copied = nkeys
        return count


def chunks(n: int) -> int:
    """Number of pre-copy chunks of ``n`` keys."""
    return -(-n // PRECOPY_KEYS)
