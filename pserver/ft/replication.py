"""Replication of a server's updates to the replicas of its key ranges (the server side of fault
tolerance).

Placement: a key's replicas are the next k distinct servers clockwise on the key ring after its master
(:meth:`KeyRing.replica_table`), so when a master dies each of its segments falls to a server that already
holds it, and failover moves no data.

Protocol: the master applies a worker's push, forwards it (split by replica set) to the replicas with the
worker's id and timestamp, and acknowledges the worker only once every replica acknowledged - so an
acknowledged push survives any k failures of its range. Under synchronous aggregation the master may instead
forward the aggregated update once per round (``replicate_after_aggregation``): k/n of the bandwidth.

Exactly-once after failover: every server keeps a *replication clock*, for each (master, worker) pair the
latest worker timestamp it received through that master. Links are FIFO, so a worker's resend of request t
(tagged with the master it first went to) is a duplicate at the new master exactly when that clock is >= t:
the new master was the replica of precisely the keys being resent. Masters also remember the latest
timestamp they applied from each worker, which travels with replica snapshots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import zmq

from ..ring import KeyRing
from ..transport import Transport
from ..wire import Message

log = logging.getLogger(__name__)

SNAPSHOT_KEYS = 1 << 20  # keys per replica-snapshot message


class Replicator:
    """Forwarding to replicas, outstanding replica acknowledgements and the replication clock."""

    def __init__(self, transport: Transport, my_id: int, peer_address: Callable[[int], tuple[str, int]]):
        self.transport = transport
        self.my_id = my_id
        self.peer_address = peer_address
        self.k = 0
        self.after_aggregation = True
        self.ring: KeyRing | None = None
        self.socks: dict[int, zmq.Socket] = {}
        self.sock_peer: dict[zmq.Socket, int] = {}
        self._next_rid = 0
        self.waiting: dict[int, object] = {}      # replication id -> token of the request it belongs to
        self._rid_peer: dict[int, int] = {}       # replication id -> replica it went to
        self.outstanding: dict[object, int] = {}  # token -> replica acks still missing
        self.clock: dict[tuple[int, int], int] = {}   # (master, worker) -> latest ts received through it
        self.applied: dict[int, int] = {}             # worker -> latest ts applied here as master
        self.bytes_forwarded = 0
        self.messages_forwarded = 0

    # -- configuration --------------------------------------------------------------------------
    def configure(self, ring: KeyRing | None, k: int, after_aggregation: bool) -> None:
        self.ring, self.k, self.after_aggregation = ring, k, after_aggregation

    def active(self) -> bool:
        return self.k > 0 and self.ring is not None and len(self.ring.servers) > 1

    def _sock(self, sid: int) -> zmq.Socket:
        sock = self.socks.get(sid)
        if sock is None:
            host, port = self.peer_address(sid)
            sock = self.transport.connect_dealer(host, port, "server", b"s%d" % self.my_id)
            self.socks[sid] = sock
            self.sock_peer[sock] = sid
        return sock

    def forget_peer(self, sid: int) -> None:
        sock = self.socks.pop(sid, None)
        if sock is not None:
            self.sock_peer.pop(sock, None)
            sock.close(linger=0)

    # -- forwarding -----------------------------------------------------------------------------
    def replica_groups(self, keys: np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
        """Split keys (which this server masters) by replica: [(server id, selector)]."""
        ring = self.ring
        others = [s for s in ring.servers if s != self.my_id]
        if len(others) <= self.k:  # every other server replicates everything
            return [(s, slice(0, len(keys))) for s in others]
        reps = ring.replica_table(self.k)[ring.vnode_of(keys)]
        out = []
        for sid in np.unique(reps):
            if sid < 0:
                continue
            mask = (reps == sid).any(axis=1)
            out.append((int(sid), slice(0, len(keys)) if mask.all() else np.flatnonzero(mask)))
        return out

    def forward(self, token: object, op: str, table: str, meta: dict, keys: np.ndarray,
                vals: np.ndarray, always: bool = False) -> int:
        """Send an update to the replicas of its keys; returns how many acks to wait for.

        ``always``: send to every replica even with no keys (synchronous rounds need the message).
        """
        if not self.active():
            return 0
        groups = self.replica_groups(keys) if len(keys) else \
            [(s, slice(0, 0)) for s in self.ring.servers if s != self.my_id][: self.k if always else 0]
        sent = 0
        for sid, sel in groups:
            k, v = keys[sel], vals[sel]
            if not len(k) and not always:
                continue
            self._next_rid += 1
            rid = self._next_rid
            self.waiting[rid] = token
            self._rid_peer[rid] = sid
            msg = Message(op, rid, table, dict(meta, kf="k"), [k, v])
            try:
                self.transport.send(self._sock(sid), msg)
            except zmq.ZMQError as e:
                log.warning("cannot forward to replica %d: %s", sid, e)
                del self.waiting[rid]
                del self._rid_peer[rid]
                continue
            self.bytes_forwarded += k.nbytes + v.nbytes
            self.messages_forwarded += 1
            sent += 1
        if sent:
            self.outstanding[token] = self.outstanding.get(token, 0) + sent
        return sent

    def on_ack(self, rid: int) -> object | None:
        """A replica acknowledged ``rid``; returns the request token when it has no acks left."""
        token = self.waiting.pop(rid, None)
        self._rid_peer.pop(rid, None)
        if token is None:
            return None
        left = self.outstanding.get(token, 1) - 1
        if left > 0:
            self.outstanding[token] = left
            return None
        self.outstanding.pop(token, None)
        return token

    def drop_replica(self, sid: int) -> list[object]:
        """A replica died: stop waiting for its acks (its keys have fewer copies until the
        snapshot rebuilds them). Returns the tokens that became complete."""
        done = []
        for rid, token in list(self.waiting.items()):
            if self._rid_peer.get(rid) == sid:
                del self.waiting[rid]
                del self._rid_peer[rid]
                left = self.outstanding.get(token, 1) - 1
                if left > 0:
                    self.outstanding[token] = left
                else:
                    self.outstanding.pop(token, None)
                    done.append(token)
        self.forget_peer(sid)
        return done

    # -- exactly-once bookkeeping ---------------------------------------------------------------
    def record(self, master: int, worker: int, ts: int) -> None:
        key = (master, worker)
        if ts > self.clock.get(key, -1):
            self.clock[key] = ts

    def seen(self, master: int, worker: int, ts: int) -> bool:
        """True if request ``ts`` of ``worker`` already reached this server through ``master``."""
        return self.clock.get((master, worker), -1) >= ts or \
            (master == self.my_id and self.applied.get(worker, -1) >= ts)

    def note_applied(self, worker: int, ts: int) -> None:
        if ts > self.applied.get(worker, -1):
            self.applied[worker] = ts

    # -- re-replication after a ring change -----------------------------------------------------
    def rebuild(self, old: KeyRing | None, new: KeyRing, tables: dict) -> int:
        """Send snapshots of the keys this server masters under ``new`` to replicas that did not
        hold them under ``old``. Runs in the server loop before any further request, so every later
        forwarded update reaches the replica after the snapshot (links are FIFO). Returns keys sent."""
        if self.k == 0 or len(new.servers) < 2:
            return 0
        sent = 0
        for name, table in tables.items():
            keys, values, state = table.items()
            if not len(keys):
                continue
            mine = new.owner_of(keys) == self.my_id
            if not mine.any():
                continue
            keys, values = keys[mine], values[mine]
            state = state[mine] if state is not None else None
            new_reps = new.replica_table(self.k)[new.vnode_of(keys)]
            old_holders = old.holders(keys, self.k) if old is not None else \
                np.full((len(keys), 1), -1)
            for sid in np.unique(new_reps):
                if sid < 0 or sid == self.my_id:
                    continue
                need = (new_reps == sid).any(axis=1) & ~(old_holders == sid).any(axis=1)
                if not need.any():
                    continue
                idx = np.flatnonzero(need)
                for start in range(0, len(idx), SNAPSHOT_KEYS):
                    part = idx[start:start + SNAPSHOT_KEYS]
                    arrays = [keys[part], values[part]]
                    if state is not None:
                        arrays.append(state[part])
                    meta = {"spec": table.spec.to_json(),
                            "applied": [[w, t] for w, t in self.applied.items()]}
                    self.transport.send(self._sock(int(sid)),
                                        Message("repl_load", 0, name, meta, arrays))
                    sent += len(part)
        if sent:
            log.info("re-replicated %d keys to new replicas (ring v%d)", sent, new.version)
        return sent
