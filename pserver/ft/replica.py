"""The replica's half of replication (no I/O: replies go to ``out``): updates forwarded by the
masters of the keys this server replicates, applied in arrival order after their acknowledgement
(deferred), copies of whole ranges (``repl_load``) with their range clocks, and - when a deferred
apply fails - a request to the master to copy the range again (never a silent divergence)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..errors import ProtocolError, PServerError
from ..kv import keys as keyfmt
from ..protocol import (
    APPLIED,
    CARRIED_ACKS,
    CLOCK_ENTRIES,
    ERROR,
    ERRORS,
    HI,
    ITEMS,
    KEY_DROP,
    KEY_REF,
    KEY_STORE,
    LO,
    RANGE_CLOCK,
    SOURCE,
    SPEC,
    SYNC_ROUND,
    WORKER_PART,
    WORKER_TS,
)
from ..store.apply import apply_push
from ..store.spec import TableSpec
from ..wire import Message
from .exactly_once import ReplicationClock, applied_rows
from .fencing import FENCED
from .list_refs import check_refs
from .replication import Replicator

log = logging.getLogger(__name__)

# Deferred updates are applied when nothing waits, or once this many keys wait.
DEFER_MAX_KEYS = 1 << 16


def master_of(identity: bytes) -> int:
    """The server id of a master's DEALER identity (b"s<id>"); ProtocolError for anyone else."""
    if not identity.startswith(b"s") or not identity[1:].isdigit() or len(identity) > 12:
        raise ProtocolError("replication messages come only from servers")
    return int(identity[1:])


class ReplicaSide:
    """``clocks``: the server's applied range clocks (the core's ``AppliedClocks``: ``record``,
    ``merge_json``; passed in, so that ft/ does not import kv/); ``table(name)``/``declare(spec)``:
    the server's tables; ``aggregate(msg, table, keys, vals, worker, master)``: a forwarded part of
    a synchronous round; ``reject(err)``: count a refusal; ``replicated(tokens)``:
    release tokens settled by acks a master carried on its forwards."""

    def __init__(self, repl: Replicator, exactly_once: ReplicationClock, clocks,
                 out: list, table: Callable, declare: Callable, aggregate: Callable,
                 reject: Callable, replicated: Callable) -> None:
        self.repl, self.exactly_once, self.clocks, self.out = repl, exactly_once, clocks, out
        self.table, self.declare, self.aggregate, self.reject = table, declare, aggregate, reject
        self.replicated = replicated
        self.deferred: list[tuple] = []   # (table, keys, values, key list ref, master)
        self.deferred_keys = 0
        self.acks_due: dict[bytes, list[int]] | None = None  # in a burst: master -> forward ids
        self.apply_errors = 0
        self.fenced: frozenset[bytes] = frozenset()  # masters the view names dead (ft/fencing.py)
        self.refused_fenced = 0
        self._fenced_logged: set[bytes] = set()  # masters whose refusal was logged
        self._items = {"replicate": self._update, "replicate_agg": self._update,
                       "repl_evict": self._evict}
        self._ops = {**self._items, "repl_batch": self._batch, "repl_load": self._load}

    def handle(self, identity: bytes, msg: Message) -> None:
        """A message of op replicate, replicate_agg, repl_evict, repl_batch or repl_load from a master.
        Raises ProtocolError (or another PServerError) if refused; nothing was applied then. A
        master in ``fenced`` is answered ``repl_fenced`` and nothing is applied or acknowledged."""
        if self.fenced and identity in self.fenced:
            self.refused_fenced += 1
            if identity not in self._fenced_logged:  # once per master: it sends until it exits
                self._fenced_logged.add(identity)
                log.warning("refused a %s from server %r, which the cluster view names dead (its "
                            "further forwards are refused too, counted in stats)", msg.op, identity)
            self.out.append((identity, Message(FENCED, msg.ts)))
            return
        self._ops[msg.op](identity, msg)

    def _ack(self, identity: bytes, rid: int) -> None:
        """Acknowledge forward ``rid``: with the burst's others (on a forward to that master if
        there is one), or at once outside a burst."""
        if self.acks_due is None:
            self.out.append((identity, Message("repl_ack", rid)))
        else:
            self.acks_due.setdefault(identity, []).append(rid)

    def _batch(self, identity: bytes, msg: Message) -> None:
        """Several forwards in one message: applied in order, each as if it came alone, then
        acknowledged once. A refused item is counted in the ack; the others are still applied."""
        items = msg.meta.get(ITEMS)
        if (type(items) is not list or not 1 <= len(items) <= 64 or len(msg.arrays) != 2 * len(items)
                or not all(type(it) is list and len(it) == 3 and it[0] in self._items
                           and type(it[1]) is str and type(it[2]) is dict for it in items)):
            raise ProtocolError("a repl_batch needs items [op, table, meta] and two arrays per item")
        master = master_of(identity)
        if CARRIED_ACKS in msg.meta:  # this server's forwards to the sender, acknowledged on the way
            self.replicated(self.repl.carried_acks(master, msg.meta[CARRIED_ACKS]))
        if not check_refs(self.repl.ref_stores.get(master), (it[2] for it in items)):
            self.out.append((identity, Message("repl_miss", msg.ts)))  # nothing applied: resent
            return
        errors = []
        for i, (op, table, meta) in enumerate(items):
            try:
                self._items[op](identity, Message(op, msg.ts, table, meta,
                                                  msg.arrays[2 * i:2 * i + 2]), reply=False)
            except PServerError as e:
                self.reject(e)
                errors.append(str(e)[:200])
        if errors:
            log.warning("refused %d of %d forwarded updates: %s", len(errors), len(items), errors[0])
            self.out.append((identity, Message("repl_ack", msg.ts, meta={ERRORS: len(errors),
                                                                          ERROR: errors[0]})))
        else:
            self._ack(identity, msg.ts)

    def _load(self, identity: bytes, msg: Message) -> None:
        """A copy of keys (re-replication, a migration's pre-copy, a re-copy): values, state, the
        master's applied parts and the range clock of the copied range."""
        master = master_of(identity)
        spec = TableSpec.from_json(msg.meta.get(SPEC))
        self.declare(spec)
        table = self.table(spec.name)
        keys = keyfmt.unpack_keys(msg).as_array()
        arrays = list(msg.arrays)
        applied = None
        if msg.meta.get(APPLIED) == 1:   # the master's exactly-once windows: the last array
            if len(arrays) < 3:
                raise ProtocolError("a copy that names its applied parts must carry them last")
            applied = applied_rows(arrays.pop())
        if len(arrays) not in (2, 3) or arrays[1].shape != (len(keys), table.dim):
            raise ProtocolError("a replica snapshot needs keys, values (and state) that match")
        clock = msg.meta.get(RANGE_CLOCK)
        if clock is not None:
            self.clocks.merge_json(spec.name, clock)  # checked before anything is stored
        table.load(keys, arrays[1], arrays[2] if len(arrays) == 3 else None)
        if applied is not None:
            self.exactly_once.load(master, applied)
        if msg.ts:  # a pre-copy of a migration: the master waits for it
            self.out.append((identity, Message("repl_ack", msg.ts)))

    def _update(self, identity: bytes, msg: Message, reply: bool = True) -> None:
        """One forwarded update (replicate: a worker's push; replicate_agg: a round's sum)."""
        master = master_of(identity)
        if reply and not check_refs(self.repl.ref_stores.get(master), (msg.meta,)):
            self.out.append((identity, Message("repl_miss", msg.ts)))  # nothing applied: resent
            return
        table = self.table(msg.table)
        keys, vals, ref = self._forwarded_keys(master, msg, table)
        name = table.spec.name
        if msg.op == "replicate_agg":
            self._defer(table, keys, vals, ref, master)
            for worker, ts, part in msg.meta.get(CLOCK_ENTRIES, []):
                self.exactly_once.record(master, int(worker), int(ts), part)
                self.clocks.record(name, int(worker), keys, int(ts))
        else:
            src, wts, wp = int(msg.meta[SOURCE]), int(msg.meta[WORKER_TS]), msg.meta.get(WORKER_PART)
            if wp is not None and type(wp) is not int:
                raise ProtocolError("meta 'wp' must be an integer part id")
            if not self.exactly_once.seen(master, src, wts, wp):
                self.exactly_once.record(master, src, wts, wp)
                self.clocks.record(name, src, keys, wts)
                if table.spec.sync and SYNC_ROUND in msg.meta:
                    self.apply_deferred()  # in order with this master's earlier forwards
                    self.aggregate(msg, table, keys, vals, src, master)
                else:
                    self._defer(table, keys, vals, ref, master)
        if reply:
            self._ack(identity, msg.ts)

    def _evict(self, identity: bytes, msg: Message, reply: bool = True) -> None:
        """Rows the master evicted (pserver.store.eviction): removed here too, after the forwards
        that came before them, so that the copies hold the same rows."""
        master_of(identity)
        table = self.table(msg.table)
        keys = keyfmt.unpack_keys(msg).as_array()
        self.apply_deferred()
        table.evict(keys)
        if reply:
            self._ack(identity, msg.ts)

    def _forwarded_keys(self, master: int, msg: Message, table
                        ) -> tuple[keyfmt.KeySet, np.ndarray, tuple | None]:
        """(keys, values, (store, id) of the key list stored or used) of a forward: its keys, or
        the list it names ("kr", see pserver.ft.list_refs; check_refs made sure it is held).
        Drops the lists the master evicted ("kd") and stores the keys it asks to ("ks")."""
        meta = msg.meta
        drop, put, use = meta.get(KEY_DROP), meta.get(KEY_STORE), meta.get(KEY_REF)
        store = self.repl.ref_store(master) if drop or put is not None or use is not None else None
        if drop:
            store.drop(drop)
        if use is None:
            keys, vals = keyfmt.unpack_push(msg, table.spec.push_cols, table.dtype)
            if put is None:
                return keys, vals, None
            store.put(put, keys.as_array())
            return keys, vals, (store, put)
        if len(msg.arrays) != 2 or len(msg.arrays[0]):
            raise ProtocolError("a forward naming a stored key list carries no keys, then its values")
        held = store.lists.get(use)
        if held is None:  # an earlier item of the message was to store it, and was refused
            raise ProtocolError(f"key list {use} is not held here")
        keys = keyfmt.KeySet(keys=held)
        vals = keyfmt.push_values(msg.arrays[1], keys.n, table.spec.push_cols, table.dtype)
        return keys, vals, (store, use)

    def _defer(self, table, keys: keyfmt.KeySet, vals: np.ndarray, ref, master: int) -> None:
        """Apply a forward after this burst's acknowledgements are sent: the replica holds it in
        memory either way, and the apply leaves the path of the worker's ack (docs/fault-tolerance.md,
        "Replication"). Whatever reads or replaces replica data applies them first."""
        self.deferred.append((table, keys, vals, ref, master))
        self.deferred_keys += keys.n
        if self.deferred_keys > DEFER_MAX_KEYS:
            self.apply_deferred()

    def apply_deferred(self) -> None:
        """Apply the acknowledged forwards still waiting, in arrival order. One that fails is
        counted (stats "replica_apply_errors"), logged, and its range is asked for again from
        its master (a ``repl_resync``, answered with a ``repl_load``): the copy never diverges
        silently."""
        deferred, self.deferred, self.deferred_keys = self.deferred, [], 0
        for table, keys, vals, ref, master in deferred:
            try:
                apply_push(table, keys, vals)
                if ref is not None:  # hold the slot cache's copy of the list: found at once next time
                    own = table.slot_cache.own_copy(keys.keys)
                    if own is not None and own is not keys.keys:
                        ref[0].adopt(ref[1], own)
            except Exception as e:
                self.apply_errors += 1
                self.reject(e)
                lo, hi = keys.span() if keys.n else (0, 0)
                log.exception("a forwarded update of table %r from server %d could not be applied: "
                              "asking it to copy keys [%d, %d) again", table.spec.name, master, lo, hi)
                if keys.n:
                    self.out.append((b"s%d" % master, Message(
                        "repl_resync", 0, table.spec.name, meta={LO: lo, HI: hi})))
