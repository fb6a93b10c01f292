"""The master's half of replication: forwarding updates to the replicas of their key ranges,
counting the replicas' acknowledgements (one counter, typed tokens) and key caching on the link;
copies of ranges are made by the :class:`~pserver.ft.rebuild.Rebuilder` it holds. A key's replicas
are the next k distinct servers clockwise on the ring after its master, so failover moves no data.
Forwards of a burst travel as one ``repl_batch`` per replica. The protocol is described in
docs/fault-tolerance.md, "Replication".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numba
import numpy as np

from ..errors import ProtocolError
from ..link import Link, LinkError
from ..protocol import CARRIED_ACKS, ERROR, ERRORS, HI, ITEMS, KEY_DROP, KEY_FORM, KEY_REF, KEY_STORE, LO, RIDS
from ..ring import KeyRing
from ..transport import Transport
from ..wire import Message
from . import list_refs
from .fencing import FENCED, fenced_reason
from .list_refs import RefSender, RefStore
from .rebuild import Rebuilder

log = logging.getLogger(__name__)

BATCH_ITEMS = 31         # updates per repl_batch message (two arrays each, under the array limit)
_NO_KEYS = np.zeros(0, np.uint64)  # the keys of a forward that names a list the replica holds


class RoundAck:
    """Token of a synchronous round's aggregated forward: its ack releases every participant's."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: list[tuple]) -> None:
        self.tokens = tokens


class PrecopyAck:
    """Token of a migration's pre-copies: once all are acknowledged, ``to`` (the scheduler) is
    answered ``migrate_ready`` for its request ``ts``."""

    __slots__ = ("to", "ts")

    def __init__(self, to: bytes, ts: int) -> None:
        self.to, self.ts = to, ts


class Replicator:
    """The master's half: forwarding to replicas and the outstanding replica acknowledgements (the
    one place they are counted, per token: a worker's (identity, ts, part), a RoundAck or a
    PrecopyAck). Methods that settle acks return the tokens that have none left; the server
    releases those. ``rebuilder`` makes the copies of ranges; it uses this object only as its
    :class:`~pserver.ft.rebuild.CopyChannel` (``link``, ``track``, ``expect``, ``lose``,
    ``cancel``)."""

    def __init__(self, transport: Transport, my_id: int, peer_address: Callable[[int], tuple[str, int]]):
        self.transport = transport
        self.my_id = my_id
        self.peer_address = peer_address
        self.k = 0
        self.after_aggregation = True
        self.ring: KeyRing | None = None
        self.next_ring: KeyRing | None = None     # during a migration: the ring being prepared
        self.links: dict[int, Link] = {}          # replica (or new holder) id -> link to it
        self._next_rid = 0
        self.waiting: dict[int, list] = {}        # replication id -> tokens of the requests it carries
        self._rid_peer: dict[int, int] = {}       # replication id -> replica it went to
        self.outstanding: dict[object, int] = {}  # token -> replica acks still missing
        self.bytes_forwarded = 0
        self.messages_forwarded = 0
        self._batch: dict[int, list[tuple]] | None = None  # while draining: replica -> queued updates
        self._acks: dict[int, list[int]] = {}   # while draining: replica acks to carry, per master
        self._unsent_acks: list[tuple[bytes, list[int]]] = []
        self._dest_key: tuple | None = None
        self._dest: tuple[list[int], np.ndarray] = ([], np.zeros((0, 0), np.bool_))
        # key caching on the link (list_refs): what this master stored at each replica, what each
        # master stored here, and the forwards in flight (kept to resend them after a miss)
        self._split_key: tuple | None = None   # what the last replica_groups split depended on
        self._next_ref = 0
        self.ref_senders: dict[int, RefSender] = {}
        self.ref_stores: dict[int, RefStore] = {}
        self._in_flight: dict[int, list[tuple]] = {}
        self.ref_misses = 0
        self.ref_limit = list_refs.REF_BYTES      # the cluster's replica_key_cache (0 = off)
        self.known_peers: dict[int, tuple[str, int]] = {}  # joiners announced by a migration
        self.rebuilder = Rebuilder(self)
        self.fenced_by: int | None = None  # a replica that refused our forwards (ft/fencing.py)

    # -- the server's interface -----------------------------------------------------------------
    def configure(self, view) -> list[object]:
        """Adopt the settings of cluster view ``view`` (k, replicate_after_aggregation,
        replica_key_cache) and forget dead peers; returns the tokens whose acks are settled by
        a replica's death."""
        settings = view.settings
        self.k = int(settings.get("replication", 0))
        self.after_aggregation = bool(settings.get("replicate_after_aggregation", True))
        limit = settings.get("replica_key_cache")
        if type(limit) is int and limit >= 0 and limit != self.ref_limit:
            self.ref_limit = limit
            self.ref_senders.clear()  # accounts made for another bound
        for sid in list(self.ref_stores):  # lists stored here by masters that are gone
            node = view.nodes.get(sid)
            if node is None or not node.alive:
                del self.ref_stores[sid]
        done: list[object] = []
        for sid in list(self.links):
            node = view.nodes.get(sid)  # a joiner may not be in this view yet: not dead
            if node is not None and not node.alive:
                done += self.drop_replica(sid)
        return done

    def adopt_ring(self, new: KeyRing, copied: bool, tables: dict) -> None:
        """Serve under ring ``new`` (ignored unless newer). After a failover, queue copies of what
        new replicas lack; after a migration's commit (``copied``) they were made in its prepare."""
        old = self.ring
        if old is not None and new.version <= old.version:
            return
        self.ring = new
        if old is None:
            return
        log.info("key ring v%d -> v%d (servers %s)", old.version, new.version, new.servers)
        if not copied and self.k:
            n = self.rebuilder.plan_rebuild(old, new, tables)
            if n:
                log.info("re-replicating %d keys in the background (ring v%d)", n, new.version)
        else:
            self.rebuilder.mark_rebuilt(new.version)

    def on_reply(self, sid: int, msg: Message) -> list[object]:
        """A message from replica ``sid`` to this master: acks (``repl_ack``, ``error``), a miss
        of a named key list, a request to copy a range again, or ``repl_fenced`` (this server was
        declared dead: ``fenced_by`` is set, nothing settles). Returns the settled tokens.
        Raises ProtocolError for a malformed ack (nothing settled then)."""
        if msg.op == "error" or msg.meta.get(ERRORS):
            log.error("replica %d refused an update: %s", sid, msg.meta.get(ERROR))
        if msg.op in ("repl_ack", "error"):
            return self.carried_acks(sid, msg.meta.get(RIDS, [msg.ts]) if msg.op == "repl_ack"
                                     else [msg.ts])
        if msg.op == "repl_miss":
            return self.on_miss(msg.ts, sid)
        if msg.op == FENCED:  # this server is dead to the cluster: nothing it waits for settles
            if self.fenced_by is None:
                log.error("%s", fenced_reason(sid))
            self.fenced_by = sid
            return []
        if msg.op == "repl_resync":
            lo, hi = msg.meta.get(LO), msg.meta.get(HI)
            if type(lo) is not int or type(hi) is not int or not 0 <= lo < hi <= 1 << 64:
                raise ProtocolError("a repl_resync needs integer bounds 0 <= lo < hi <= 2**64")
            self.rebuilder.resync(sid, msg.table, lo, hi)
            log.error("replica %d could not apply an update of table %r: copying keys [%d, %d) "
                      "to it again", sid, msg.table, lo, hi)
        return []

    def carried_acks(self, sid: int, rids) -> list[object]:
        """Replica ``sid`` acknowledged this server's forwards ``rids``; the settled tokens.
        Raises ProtocolError unless ``rids`` is a list of integers."""
        if type(rids) is not list or len(rids) > 1 << 16 or not all(type(r) is int for r in rids):
            raise ProtocolError("replica acknowledgements must be a list of integer ids")
        done: list[object] = []
        for rid in rids:
            done += self.on_ack(rid, sid)
        return done

    def stats(self) -> dict:
        """Counters for the server's stats: forwards sent, their bytes, key list misses, lists held
        for each master, re-copies replicas asked for."""
        return {"forwards": self.messages_forwarded, "bytes_forwarded": self.bytes_forwarded,
                "key_list_misses": self.ref_misses,
                "key_lists_held": {m: len(st.lists) for m, st in self.ref_stores.items()},
                "resyncs_requested": self.rebuilder.resyncs_requested}

    # -- configuration --------------------------------------------------------------------------
    def active(self) -> bool:
        return self.ring is not None and (self.next_ring is not None
                                          or (self.k > 0 and len(self.ring.servers) > 1))

    def link(self, sid: int) -> Link:
        """The link to server ``sid``, opened on first use (its address from ``peer_address``)."""
        link = self.links.get(sid)
        if link is None:
            host, port = self.peer_address(sid)
            link = self.links[sid] = self.transport.dealer_link(host, port, "server",
                                                                 b"s%d" % self.my_id)
        return link

    def forget_peer(self, sid: int) -> None:
        self.ref_senders.pop(sid, None)
        link = self.links.pop(sid, None)
        if link is not None:
            link.close()

    # -- forwarding -----------------------------------------------------------------------------
    def replica_groups(self, keys: np.ndarray, memo: dict | None = None
                       ) -> list[tuple[int, slice | np.ndarray]]:
        """Split keys (which this server masters) by the servers that must receive their updates:
        their replicas, plus - during a migration - their holders under the ring being prepared.

        ``memo``: a dict kept with this very key list (a table's SlotCache.memo): the split is
        remembered there with the ring version and k it was made for (the latest only), so a list
        pushed again is not hashed again."""
        ring = self.ring
        others = [s for s in ring.servers if s != self.my_id]
        self._split_key = None
        if self.next_ring is None and len(others) <= self.k:  # everyone else replicates everything
            self._split_key = ("all", ring.version, self.k)
            return [(s, slice(0, len(keys))) for s in others]
        if self.next_ring is None:
            if not self.k:
                return []
            sids, dest = self._destinations(ring)
            self._split_key = self._dest_key
            if memo is not None:
                made_for, groups = memo.get("replica_groups", (None, None))
                if made_for == self._dest_key:
                    return groups
            counts, idx = _group_by_destination(ring.vnode_of(keys), dest)
            out: list[tuple[int, slice | np.ndarray]] = []
            start = 0
            for sid, c in zip(sids, counts.tolist()):
                sel = idx[start:start + c]
                start += c
                if c:
                    out.append((sid, slice(int(sel[0]), int(sel[0]) + c) if sel[-1] - sel[0] + 1 == c
                                else sel))
            if memo is not None:
                memo["replica_groups"] = (self._dest_key, out)
            return out
        targets = ring.replica_table(self.k)[ring.vnode_of(keys)] if self.k else \
            np.empty((len(keys), 0), np.int64)
        targets = np.column_stack([targets, self.next_ring.holders(keys, self.k)])
        out = []
        # candidates from the ring's few servers, not np.unique over every key's targets
        for sid in (s for s in self.next_ring.servers + ring.servers if s != self.my_id):
            if any(sid == o for o, _ in out):
                continue
            mask = (targets == sid).any(axis=1)
            if not mask.any():
                continue
            out.append((int(sid), slice(0, len(keys)) if mask.all() else np.flatnonzero(mask)))
        return out

    def _destinations(self, ring: KeyRing) -> tuple[list[int], np.ndarray]:
        """The other servers, and for each virtual server of ``ring`` which of them replicate it
        ((virtual servers, servers) bool array); cached per ring and k."""
        key = (id(ring), ring.version, self.k)
        if self._dest_key != key:
            sids = [s for s in ring.servers if s != self.my_id]
            table = ring.replica_table(self.k)
            dest = np.zeros((len(table), len(sids)), np.bool_)
            for j, sid in enumerate(sids):
                dest[:, j] = (table == sid).any(axis=1)
            self._dest_key, self._dest = key, (sids, dest)
        return self._dest

    def forward(self, token: object, op: str, table: str, meta: dict, keys: np.ndarray,
                vals: np.ndarray, always: bool = False, memo: dict | None = None) -> int:
        """Send an update to the replicas of its keys (or queue it, inside a batch); returns how
        many replica acks to wait for.

        ``always``: send to every replica even with no keys (synchronous rounds need the message).
        ``memo``: see :meth:`replica_groups`.
        """
        if not self.active():
            return 0
        if len(keys):
            groups = self.replica_groups(keys, memo)
        else:
            self._split_key = None
            groups = [(s, slice(0, 0)) for s in self.ring.servers if s != self.my_id][: self.k if always else 0]
        sent = 0
        for sid, sel in groups:
            v = vals[sel]
            if not len(v) and not always:
                continue
            m = {**meta, KEY_FORM: "k"}
            # (token, op, table, meta, keys sent, values, the list and the part of it they are)
            item = (token, op, table, m, self._keys_to_send(sid, keys, sel, memo, m), v, keys, sel)
            if self._batch is not None:
                self._batch.setdefault(sid, []).append(item)
            elif not self._send_items(sid, [item]):
                continue
            sent += 1
        if sent:
            self.outstanding[token] = self.outstanding.get(token, 0) + sent
        return sent

    def _keys_to_send(self, sid: int, keys: np.ndarray, sel, memo: dict | None, meta: dict
                      ) -> np.ndarray:
        """The keys of the part ``sel`` of ``keys`` for replica ``sid`` - or none, with meta "kr",
        if the replica holds them from an earlier forward of the same list (see list_refs). Only
        lists with a memo (cached, so likely to come back) are stored at the replica."""
        if memo is None or self._split_key is None or not self.ref_limit:
            return keys[sel]
        refs = memo.get("refs")
        if refs is None or refs[0] != self._split_key:  # a new split: new parts
            refs = memo["refs"] = (self._split_key, {})
        sender = self.ref_senders.get(sid)
        if sender is None:
            sender = self.ref_senders[sid] = RefSender(self.ref_limit)
        ref = refs[1].get(sid)
        if ref is not None and sender.use(ref):
            meta[KEY_REF] = ref
            return _NO_KEYS
        part = keys[sel]
        if part.size < list_refs.MIN_KEYS:
            return part
        self._next_ref += 1
        evicted = sender.store(self._next_ref, part.nbytes)
        if evicted is None:
            return part
        meta[KEY_STORE] = refs[1][sid] = self._next_ref
        if evicted:
            meta[KEY_DROP] = evicted
        return part

    def on_miss(self, rid: int, sid: int) -> list[object]:
        """Replica ``sid`` refused forward ``rid``: it does not hold a list the forward named.
        Forget what this server stored there and send the forward again, with its keys (ignored
        unless ``rid`` is a forward in flight to ``sid``). Returns the request tokens that have no
        acks left (the replica could not be reached)."""
        if self._rid_peer.get(rid) != sid or rid not in self._in_flight:
            return []
        self.ref_misses += 1
        items = self._in_flight.pop(rid)
        del self.waiting[rid], self._rid_peer[rid]
        drop = self.ref_senders[sid].reset() if sid in self.ref_senders else []
        resend = []
        for token, op, table, meta, _k, v, keys, sel in items:
            meta = {f: x for f, x in meta.items() if f not in (KEY_REF, KEY_STORE, KEY_DROP)}
            resend.append((token, op, table, meta, keys[sel], v, keys, sel))
        resend[0][3][KEY_DROP] = drop
        log.warning("replica %d lacked a key list this server named: forward sent again with its keys",
                    sid)
        if self._send_items(sid, resend):  # the same requests now wait for the new forward
            return []
        return [tok for tok in (it[0] for it in items) if self.lose(tok)]

    def ref_store(self, master: int) -> RefStore:
        """The lists ``master`` stored at this server (created on first use)."""
        store = self.ref_stores.get(master)
        if store is None:
            store = self.ref_stores[master] = RefStore(self.ref_limit)
        return store

    def begin_batch(self) -> None:
        """Queue forwards from now on, until :meth:`flush`."""
        self._batch = {}

    def attach_acks(self, sid: int, rids: list[int]) -> bool:
        """Carry this server's acknowledgements ``rids`` of forwards from master ``sid`` on the
        forward queued for it in this batch, saving a message each way; False if none is queued."""
        if not (self._batch or {}).get(sid):
            return False
        self._acks[sid] = rids
        return True

    def unsent_acks(self) -> list[tuple[bytes, list[int]]]:
        """(master identity, rids) of attached acks whose carrier could not be sent (since the
        last call): they must go on their own."""
        out, self._unsent_acks = self._unsent_acks, []
        return out

    def flush(self) -> list[object]:
        """Send the queued forwards, one message per replica (chunked). Returns the tokens whose
        acks can no longer come (their replica could not be reached)."""
        batch, self._batch = self._batch, None
        acks, self._acks = self._acks, {}
        lost: list[object] = []
        for sid, items in (batch or {}).items():
            carried = acks.pop(sid, None)
            limit = self.transport.limits.max_message_bytes // 2
            start = 0
            while start < len(items):
                end, size = start, 0
                while end < len(items) and end - start < BATCH_ITEMS and (
                        end == start or size + items[end][4].nbytes + items[end][5].nbytes <= limit):
                    size += items[end][4].nbytes + items[end][5].nbytes
                    end += 1
                if not self._send_items(sid, items[start:end], carried):
                    lost += [tok for tok in (it[0] for it in items[start:end]) if self.lose(tok)]
                    if carried:
                        self._unsent_acks.append((b"s%d" % sid, carried))
                carried = None
                start = end
        return lost

    def lose(self, token: object) -> bool:
        """One expected ack of ``token`` will not come; True when it has none left."""
        left = self.outstanding.get(token, 1) - 1
        if left > 0:
            self.outstanding[token] = left
            return False
        self.outstanding.pop(token, None)
        return True

    # -- the rest of the Rebuilder's CopyChannel (link and lose above) -------------------------
    def track(self, sid: int, tokens: list) -> int:
        """A new replication id for a message to ``sid``: its ack (or ``sid``'s death) settles
        one ack of each of ``tokens``."""
        self._next_rid += 1
        self.waiting[self._next_rid] = tokens
        self._rid_peer[self._next_rid] = sid
        return self._next_rid

    def expect(self, token: object, n: int) -> None:
        """``n`` more replica acks are due for ``token``."""
        self.outstanding[token] = self.outstanding.get(token, 0) + n

    def cancel(self, token: object) -> None:
        """Forget every ack still due for ``token`` (an aborted migration's pre-copies)."""
        self.outstanding.pop(token, None)

    def _send_items(self, sid: int, items: list[tuple], acks: list[int] | None = None) -> bool:
        """One message to replica ``sid`` with ``items`` (token, op, table, meta, keys, values),
        and ``acks`` (rids of ``sid``'s forwards to this server) if given; False if it could not
        be sent."""
        self._next_rid += 1
        rid = self._next_rid
        if len(items) == 1 and not acks:
            _, op, table, meta, k, v = items[0][:6]
            msg = Message(op, rid, table, meta, [k, v])
        else:
            meta = {ITEMS: [[it[1], it[2], it[3]] for it in items]}
            if acks:
                meta[CARRIED_ACKS] = acks
            msg = Message("repl_batch", rid, "", meta, [a for it in items for a in it[4:6]])
        try:
            self.link(sid).send(msg)
        except LinkError as e:
            log.warning("cannot forward to replica %d: %s", sid, e)
            return False
        self.waiting[rid] = [it[0] for it in items]
        self._in_flight[rid] = items
        self._rid_peer[rid] = sid
        self.bytes_forwarded += sum(it[4].nbytes + it[5].nbytes for it in items)
        self.messages_forwarded += 1
        return True

    def on_ack(self, rid: int, sid: int) -> list[object]:
        """Replica ``sid`` acknowledged ``rid`` (ignored unless ``rid`` went to it); returns the
        request tokens that have no acks left."""
        if self._rid_peer.get(rid) != sid:
            return []
        tokens = self.waiting.pop(rid, None)
        self._rid_peer.pop(rid, None)
        self._in_flight.pop(rid, None)
        return [t for t in tokens or () if self.lose(t)]

    def drop_replica(self, sid: int) -> list[object]:
        """A replica died: stop waiting for its acks (its keys have fewer copies until the
        snapshot rebuilds them). Returns the tokens that became complete."""
        done = []
        for rid in [r for r, peer in self._rid_peer.items() if peer == sid]:
            del self._rid_peer[rid]
            self._in_flight.pop(rid, None)
            done += [t for t in self.waiting.pop(rid, ()) if self.lose(t)]
        if self._batch is not None:  # queued for it, not sent yet
            done += [it[0] for it in self._batch.pop(sid, ()) if self.lose(it[0])]
        done += self.rebuilder.drop_peer(sid)  # pre-copies queued for it
        self.forget_peer(sid)
        return done

@numba.njit(cache=True, nogil=True)
def _group_by_destination(vnodes: np.ndarray, dest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each destination column of ``dest`` (virtual server -> receives it), the positions of
    the keys whose virtual server it receives, ascending: (counts, concatenated positions)."""
    n, m = len(vnodes), dest.shape[1]
    counts = np.zeros(m, np.int64)
    for i in range(n):
        for j in range(m):
            if dest[vnodes[i], j]:
                counts[j] += 1
    fill = np.zeros(m, np.int64)
    for j in range(1, m):
        fill[j] = fill[j - 1] + counts[j - 1]
    idx = np.empty(counts.sum(), np.int64)
    for i in range(n):
        for j in range(m):
            if dest[vnodes[i], j]:
                idx[fill[j]] = i
                fill[j] += 1
    return counts, idx
