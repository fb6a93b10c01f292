"""The server: holds tables of (key, value) pairs and applies workers' pushes with the tables' update
functions. A single-threaded loop over one ROUTER socket: receive, apply, reply. That loop is the only
owner of the store, so there are no locks on the data path, and one sender's requests are applied in the
order it issued them (per-sender FIFO) - including across synchronous aggregation, where a sender whose push
waits for the other workers has its later requests held back, in order, until that push is applied.

Nothing received can raise out of the loop: a malformed or refused message is logged, counted and
answered with an error reply; stored values are only touched by requests that passed every check.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import numpy as np
import zmq

from .. import security
from ..config import Config
from ..consistency.clock import KEY_SPACE_END, NEVER, RangeClock
from ..errors import AuthError, LimitError, ProtocolError, PServerError, TableError, WrongOwnerError
from ..ft import checkpoint as ft_checkpoint
from ..ft.list_refs import check_refs
from ..ft.replication import Replicator
from ..membership.node import Membership
from ..ring import KeyRing
from ..store import index as store_index
from ..store.spec import TableSpec
from ..store.table import Table
from ..store.updaters import FunctionUpdater, register_updater
from ..transport import Transport, recv
from ..wire import Message
from . import keys as keyfmt
from .filtering import FILTER_META, ServerFilters
from .traffic import heartbeat_reporter

log = logging.getLogger(__name__)

# A replica applies the updates it acknowledged when nothing waits, or once this many keys wait.
DEFER_MAX_KEYS = 1 << 16
# ops that neither read nor replace what a replica holds: deferred updates may wait behind them
_DEFERRABLE = frozenset(("push", "pull", "replicate", "replicate_agg", "repl_batch", "ping"))
ACK_DELAY = 200e-6  # s: the longest a worker's ack waits in a burst for others to share its message

security.allow_op("replicate_agg", "server")
security.allow_op("repl_load", "server")
security.allow_op("repl_batch", "server")


class _Round:
    """One synchronous-aggregation round of a table: every live worker's k-th push. Rounds are keyed
    by (k, origin): pushes resent after a failover form their own round with the failed master as
    origin, since the new master completed round k for its own keys already."""

    __slots__ = ("parts", "senders", "waiting")

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.senders: dict[int, int] = {}            # worker -> its request timestamp
        self.waiting: list[tuple] = []               # ack tokens (identity, ts, part); None = replica


class _Ack:
    """A worker's acknowledgement, sent once the update is applied here and at every replica."""

    __slots__ = ("local", "replicas", "to")

    def __init__(self, to: tuple) -> None:
        self.local = False
        self.replicas = 0
        self.to = to


class KVServer:
    """A parameter server node.

    handle: optional user update function ``fn(weights, pushed) -> None`` (in place, vectorised over
        rows); registered as the updater named ``"handle"``, which tables may then name, and used by
        the default table.
    updaters: more user update rules, name -> factory(**args) returning a pserver Updater.
    """

    def __init__(self, cfg: Config | None = None, *, handle: Callable | None = None,
                 updaters: dict[str, Callable] | None = None,
                 credentials: security.Credentials | None = None, **overrides):
        self.cfg = cfg or Config.from_env(**overrides)
        for name, factory in (updaters or {}).items():
            register_updater(name, factory)
        default_updater = "sum"
        if handle is not None:
            register_updater("handle", lambda **_: FunctionUpdater(handle))
            default_updater = "handle"
        self.transport = Transport(self.cfg, "server", credentials)
        host = self.cfg.bind_host()
        self.sock, self.port = self.transport.bind_router(host, self.cfg.port)
        self.membership = Membership(self.cfg, self.transport, "server", host, self.port)
        self.tables: dict[str, Table] = {
            "default": Table(TableSpec(name="default", updater=default_updater),
                             slot_cache=self.cfg.slot_cache_bytes)}
        self.rounds: dict[str, dict[tuple, _Round]] = {}
        self.done_rounds: dict[tuple, int] = {}  # (table, origin) -> last round applied here
        self.held: dict[bytes, deque] = {}   # sender identity -> requests held behind a sync push
        self.filters = ServerFilters.from_env(self.held, self.cfg.max_message_bytes)
        self.membership.traffic = heartbeat_reporter(self.transport.counters, self.filters.counters)
        self.acks: dict[tuple, _Ack] = {}    # (identity, ts, part) -> acknowledgement in progress
        # push_pull token -> (table, keys) to read, or the values read once the update applied
        self.pp_reads: dict[tuple, tuple | np.ndarray] = {}
        self.ring = None
        self.repl = Replicator(self.transport, -1, self._peer_address)
        self.clocks: dict[str, RangeClock] = {}  # table -> range vector clock of applied pushes
        self.errors = 0
        self.rejections: Counter[str] = Counter()  # reason (exception class) -> rejected requests
        self.duplicates = 0
        self._stop = False
        self._ack_batch: dict[bytes, list] | None = None
        self._repl_acks: dict[bytes, list[int]] | None = None  # while draining: master -> rids
        self._leaving = False
        self._known_peers: dict[int, tuple[str, int]] = {}
        self._drain_ts: int | None = None
        self._drain_deadline = 0.0
        self._view_version = 0
        self._as_of_waiting: set[bytes] = set()  # senders whose first held request is an as_of pull
        # updates received as a replica, acknowledged but not applied yet (see _defer_apply)
        self._deferred: list[tuple[Table, keyfmt.KeySet, np.ndarray]] = []
        self._deferred_keys = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self, warm_first: bool = False) -> None:
        """Register, then serve until the scheduler shuts the cluster down (or is lost).

        The compiled store kernels are loaded while registering, not on the first requests - or,
        with ``warm_first`` (a server joining a running cluster), before registering: a joiner's
        first requests are the forwards of a live migration, which every push then waits for."""
        if warm_first:
            _warm_up()
        else:
            threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()
        self.membership.register(self.cfg.rank)
        log.info("server %d (rank %d) serving on %s:%d", self.membership.node_id,
                 self.membership.rank, self.cfg.bind_host(), self.port)
        # SIGTERM = leave gracefully: hand the key ranges over (two-phase migration), then exit
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_leaving", True))
        self.repl.my_id = self.membership.node_id
        # started with `pserver scheduler --restore DIR`: load what this server holds before serving
        tables, clocks = ft_checkpoint.restore_for(
            self.membership.view, self.membership.node_id, self.cfg.slot_cache_bytes)
        self.tables.update(tables)
        self.clocks.update(clocks)
        self._on_view()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        polled: set = set()
        spin, busy_until = self.cfg.busy_poll, 0.0
        try:
            while not self._stop:
                for sock in self.repl.sock_peer:
                    if sock not in polled:
                        poller.register(sock, zmq.POLLIN)
                        polled.add(sock)
                # Busy polling (PSERVER_BUSY_POLL): for a while after a request, poll without
                # sleeping - a wake-up from the kernel costs tens of microseconds here, more than
                # the next request takes to arrive when a worker keeps several in flight.
                busy = spin and time.perf_counter() < busy_until
                events = poller.poll(0 if self.repl.jobs or busy or self._deferred else 100)
                if events and spin:
                    busy_until = time.perf_counter() + spin
                if not events and self._deferred:  # nothing waiting: time to apply them
                    self._apply_deferred()
                if events:
                    self._burst(events)
                if self.repl.jobs:
                    self._apply_deferred()
                    self.repl.rebuild_step(self.tables)
                self.membership.report["rebuilt"] = self.repl.rebuilt_version
                if self.membership.view.version != self._view_version:
                    self._on_view()
                    for sock in list(polled):
                        if sock not in self.repl.sock_peer:
                            poller.unregister(sock)
                            polled.discard(sock)
                if self._leaving and self._leave_step():
                    break
                if self.membership.shutdown_requested.is_set():
                    log.info("shutdown requested by the scheduler")
                    break
                if self.membership.declared_dead.is_set():
                    log.error("the scheduler declared this server dead (missed heartbeats) and "
                              "moved its key ranges to other servers: exiting")
                    break
                if self.membership.scheduler_lost.is_set():
                    log.error("scheduler lost: exiting so that no orphan server stays behind")
                    break
        finally:
            self.membership.leave()
            self.membership.close()
            self.transport.close()

    def _leave_step(self) -> bool:
        """One step of a graceful leave; True once the scheduler moved this server's ranges."""
        self._apply_deferred()
        if self._drain_ts is None:
            log.warning("leaving: asking the scheduler to move this server's key ranges")
            self._drain_ts = self.membership.send_request("drain", {"id": self.membership.node_id})
            self._drain_deadline = time.monotonic() + 120
        msg = self.membership.read_reply()
        if msg is not None and msg.op == "drained" and msg.ts == self._drain_ts:
            log.warning("key ranges handed over: exiting")
            return True
        if msg is not None and msg.op == "error":
            log.error("the scheduler refused the graceful leave: %s", msg.meta.get("error"))
            return True
        return time.monotonic() > self._drain_deadline

    def _burst(self, events: list) -> None:
        """Serve everything one poll found waiting, as one burst.

        Acknowledgements of a burst go out together, one message per worker: with many requests
        in flight a send per ack would cost more than the updates themselves. Forwards to
        replicas are batched the same way (one message per replica and burst). Replicas' acks
        are read first: the worker acks they release then leave with the burst's first flush."""
        self._begin_burst()
        try:
            for sock, _ in events:
                if sock is not self.sock:
                    self._drain_replica(sock)
            if any(sock is self.sock for sock, _ in events):
                self._drain_requests()
        finally:
            self._end_burst()

    def _drain_requests(self) -> None:
        # A long burst still sends the acks it has every ACK_DELAY: a worker with several
        # requests in flight then issues new ones while this server works on the rest, instead
        # of both taking turns (docs/design.md, "Acknowledgements", has the numbers).
        sock, on_frames, clock = self.sock, self._on_frames, time.perf_counter
        due = clock() + ACK_DELAY
        for _ in range(1000):  # bounded so liveness checks run between bursts
            frames = recv(sock)
            if frames is None:
                return
            on_frames(frames)
            if self._ack_batch and clock() >= due:
                self._send_acks()
                due = clock() + ACK_DELAY

    def _begin_burst(self) -> None:
        """From now until _end_burst, acks and forwards are collected, not sent one by one."""
        self._ack_batch, self._repl_acks = {}, {}
        self.repl.begin_batch()

    def _end_burst(self) -> None:
        """Send what a burst collected: forwards to replicas (carrying this burst's
        acknowledgements of their forwards when there is a message to them anyway), the other
        replica acknowledgements (one message per master), then the workers' acks."""
        repl_acks, self._repl_acks = self._repl_acks or {}, None
        for identity, rids in repl_acks.items():
            if not self.repl.attach_acks(int(identity[1:]), rids):
                self._reply(identity, Message("repl_ack", rids[0], meta={"rids": rids} if len(rids) > 1
                                              else None))
        for token in self.repl.flush():  # a replica that cannot be reached: stop waiting
            self._on_replica_ack(token)
        for identity, rids in self.repl.unsent_acks():  # their carrier could not be sent
            self._reply(identity, Message("repl_ack", rids[0], meta={"rids": rids}))
        self._send_acks()
        self._ack_batch = None

    def _send_acks(self) -> None:
        """Send the workers' acknowledgements collected so far, one message per worker."""
        batch, self._ack_batch = self._ack_batch, {}
        for identity, acks in (batch or {}).items():
            if len(acks) == 1:
                ts, part = acks[0]
                self._reply(identity, _ack(ts, part))
            else:
                self._reply(identity, Message("acks", 0, meta={"a": acks}))

    def _on_frames(self, frames: list) -> None:
        identity = frames[0].bytes  # cached by the frame: transport.decode reuses it
        ts = 0
        part = None
        try:
            _, msg, role = self.transport.decode(frames, routed=True)
            ts = msg.ts
            part = msg.meta.get("p")
            if part is not None and type(part) is not int:
                part = None
                raise ProtocolError("meta 'p' (the request part) must be an integer")
            if self.transport.creds.secure and not security.authorise(msg.op, role, True):
                raise AuthError(f"a {role} may not send {msg.op!r} to a server")
            held = self.held.get(identity)
            if held is not None and self.filters.is_awaited_resend(identity, msg):
                held.appendleft(msg)  # resent after a key-cache miss: it goes first
                self._release(identity)
            elif held is not None:
                held.append(msg)
            else:
                self._process(identity, msg)
        except PServerError as e:
            self._reject(identity, ts, e, part)
        except Exception as e:
            log.exception("unexpected error on a request")
            self._reject(identity, ts, e, part)

    def _reject(self, identity: bytes, ts: int, err: Exception, part=None) -> None:
        self.errors += 1
        self.rejections[type(err).__name__] += 1
        meta = {"error": str(err)[:1000], "kind": type(err).__name__}
        if isinstance(err, WrongOwnerError):
            meta["rv"] = self._ring_version()
            log.info("request from %r for keys this server does not master: %s", identity[:16], err)
        else:
            log.warning("rejected a request from %r: %s", identity[:16], err)
        if part is not None:
            meta["p"] = part
        self._reply(identity, Message("error", ts, meta=meta))

    def _answer(self, identity: bytes, req: Message, op: str, arrays=(), meta=None) -> None:
        """Reply to request ``req``, echoing its part id so the worker can match split requests."""
        meta = dict(meta or {})
        if "p" in req.meta:
            meta["p"] = req.meta["p"]
        self._reply(identity, Message(op, req.ts, meta=meta, arrays=list(arrays)))

    def _reply(self, identity: bytes, msg: Message) -> None:
        try:
            self.transport.send(self.sock, msg, identity)
        except zmq.ZMQError as e:
            log.debug("cannot reply to %r: %s", identity[:16], e)

    # -- requests -------------------------------------------------------------------------
    def _table(self, name: str) -> Table:
        table = self.tables.get(name or "default")
        if table is None:
            raise TableError(f"table {name!r} is not declared on this server; call "
                             f"kv.declare_table({name!r}, ...) on the workers first")
        return table

    def _process(self, identity: bytes, msg: Message) -> None:
        op = msg.op
        if self._deferred and op not in _DEFERRABLE:
            self._apply_deferred()  # whatever reads or replaces replica data sees every update
        if op == "push":
            self._push(identity, msg)
        elif op == "pull":
            table = self._table(msg.table)
            if "as_of" in msg.meta and not self._as_of_met(identity, msg, table):
                return  # held, with this sender's later requests, until the clocks cover it
            if table.spec.pull_filters or FILTER_META in msg.meta:
                keys = self.filters.decode_pull(identity, msg, table)
                self._check_limits(keys, table)
                self._check_owner(msg, keys)
                vals = keyfmt.apply_pull(table, keys)
                arrays, meta = self.filters.encode_reply(identity, table, vals)
                self._answer(identity, msg, "vals", arrays, {**meta, **self._clock_meta(msg, table, keys)})
                return
            keys = keyfmt.unpack_keys(msg)
            self._check_limits(keys, table)
            self._check_owner(msg, keys)
            self._answer(identity, msg, "vals", [keyfmt.apply_pull(table, keys)],
                         self._clock_meta(msg, table, keys))
        elif op == "pull_range":
            table = self._table(msg.table)
            lo, hi = keyfmt.range_bounds(msg.meta)
            k, v = table.range_items(lo, hi)
            if self.ring is not None and len(self.ring.servers) > 1 and len(k):
                mine = self.ring.owner_of(k) == self.repl.my_id  # replicas answer nothing
                k, v = k[mine], v[mine]
            self._answer(identity, msg, "range", [k, v], {"rv": self._ring_version()})
        elif op in ("replicate", "replicate_agg", "repl_load"):
            self._replica_update(identity, msg)
        elif op == "repl_batch":
            self._replica_batch(identity, msg)
        elif op in ("migrate_prepare", "migrate_commit", "migrate_abort"):
            self._migrate(identity, msg)
        elif op == "checkpoint_write":  # from the scheduler: write this server's shard
            report = ft_checkpoint.handle_write(msg.meta, self.membership.node_id, self.tables,
                                                self.clocks)
            self._reply(identity, Message("ok", msg.ts, meta=report))
        elif op == "declare_table":
            spec = TableSpec.from_json(msg.meta.get("spec"))
            if spec.dim > self.transport.limits.max_dim:
                raise LimitError(f"table dim {spec.dim} exceeds this server's limit of "
                                 f"{self.transport.limits.max_dim} (--max-dim / PSERVER_MAX_DIM)")
            if spec.push_factor is None:
                raise TableError(f"update rule {spec.updater!r} is not registered on this server: "
                                 f"start servers with --plugin MODULE (a module that calls "
                                 f"pserver.register_updater)")
            self._declare(spec)
            self._answer(identity, msg, "ok", meta={"push_factor": spec.push_factor})
        elif op == "ping":
            self._answer(identity, msg, "pong", meta={"id": self.membership.node_id})
        elif op == "stats":
            self._answer(identity, msg, "stats", meta=self.stats())
        else:
            raise ProtocolError(f"unknown op {op!r} for a server")

    def _push(self, identity: bytes, msg: Message) -> None:
        table = self._table(msg.table)
        pp = msg.meta.get("pp") == 1  # push_pull: answer with the keys' values once applied
        if table.spec.push_filters or FILTER_META in msg.meta:
            if pp:
                raise ProtocolError("push_pull is not supported on tables with filters")
            keys, vals = self.filters.decode_push(identity, msg, table)
        else:
            keys, vals = keyfmt.unpack_push(msg, table.spec.push_cols, table.dtype)
        self._check_limits(keys, table)
        sender = keyfmt.sender_id(identity)
        self._check_owner(msg, keys)
        part = msg.meta.get("p")
        token = (identity, msg.ts, part)
        orig = _origins(msg.meta.get("orig"))
        if orig and any(self.repl.seen(s, sender, msg.ts, p) for s, p in orig):
            # a resend after failover of an update this server already has (it was the replica)
            self.duplicates += 1
            if pp:
                self._answer(identity, msg, "vals", [keyfmt.apply_pull(table, keys)], {"dup": 1})
            else:
                self._answer(identity, msg, "ack", meta={"dup": 1})
            return
        self._record_clock(table.spec.name, sender, keys, msg.ts, msg.meta.get("span"))
        self.repl.note_applied(sender, msg.ts, part)
        for s, p in orig:  # an old master's own forward of the part may still be on its way
            self.repl.record(s, sender, msg.ts, p)
        if pp:
            self.pp_reads[token] = (table, keys)  # read when its acknowledgement is due
        if table.spec.sync:
            try:
                self._aggregate(token, msg, table, keys, vals, sender)
            except PServerError:
                self.pp_reads.pop(token, None)
                raise
            return
        keyfmt.apply_push(table, keys, vals)
        if self._as_of_waiting:
            self._recheck_as_of()
        if not self.repl.active():
            self._send_ack(identity, msg.ts, part)
            return
        ack = self.acks[token] = _Ack(token)
        kept = keys.as_array()
        ack.replicas += self.repl.forward(token, "replicate", table.spec.name,
                                          {"src": sender, "wts": msg.ts, "wp": part},
                                          kept, vals, memo=table.slot_cache.memo(kept))
        self._local_done(token)

    def _check_owner(self, msg: Message, keys: keyfmt.KeySet) -> None:
        """Serve only keys this server masters. A request split with the same ring version is
        trusted (the hot path); otherwise the keys' owners are computed."""
        ring = self.ring
        if ring is None or msg.meta.get("rv") == ring.version or keys.n == 0:
            return
        if len(ring.servers) == 1 and ring.servers[0] == self.repl.my_id:
            return
        owners = ring.owner_of(keys.as_array())
        if not (owners == self.repl.my_id).all():
            raise WrongOwnerError(f"{int((owners != self.repl.my_id).sum())} of {keys.n} keys are "
                                  f"not mastered here under ring v{ring.version}")

    def _check_limits(self, keys: keyfmt.KeySet, table: Table) -> None:
        """LimitError unless the keys of a request - a runs request only declares how many - and the
        rows they read or write fit this node's limits. Before anything is allocated for them."""
        lim = self.transport.limits
        if keys.keys is None and ((keys.lengths > lim.max_keys).any()  # checked first: the sum
                                  or int(keys.lengths.sum()) > lim.max_keys):  # cannot wrap then
            raise LimitError(f"request declares more than {lim.max_keys} keys (PSERVER_MAX_KEYS)")
        if keys.n * table.dim * table.dtype.itemsize > lim.max_message_bytes:
            raise LimitError(f"{keys.n} keys x {table.dim} values exceed the message size limit of "
                             f"{lim.max_message_bytes} bytes (PSERVER_MAX_MESSAGE_BYTES)")

    def _ring_version(self) -> int:
        return self.ring.version if self.ring is not None else -1

    # -- acknowledgements and replication ------------------------------------------------------
    def _local_done(self, token: tuple) -> None:
        ack = self.acks.get(token)
        if ack is None:
            return
        ack.local = True
        read = self.pp_reads.get(token)
        if type(read) is tuple:  # push_pull: the values just after this update, as a pull would
            self.pp_reads[token] = keyfmt.apply_pull(*read)  # read them; sent with the ack
        self._maybe_ack(token, ack)

    def _maybe_ack(self, token: tuple, ack: _Ack) -> None:
        if ack.local and ack.replicas <= 0:
            del self.acks[token]
            self._send_ack(*token)

    def _send_ack(self, identity: bytes, ts: int, part) -> None:
        """Acknowledge part ``part`` of push ``ts`` - with the rest of this burst's, if draining;
        a push_pull is answered with its keys' values instead."""
        if self.pp_reads:
            read = self.pp_reads.pop((identity, ts, part), None)
            if read is not None:
                vals = keyfmt.apply_pull(*read) if type(read) is tuple else read
                self._reply(identity, Message("vals", ts, meta={"p": part} if part is not None
                                              else None, arrays=[vals]))
                return
        if self._ack_batch is not None:
            batch = self._ack_batch.get(identity)
            if batch is None:
                self._ack_batch[identity] = [(ts, part)]
            else:
                batch.append((ts, part))
            return
        self._reply(identity, _ack(ts, part))

    def _on_replica_ack(self, token) -> None:
        if token is None:
            return
        if token[0] == "migrate":  # every pre-copy of a migration is in place
            self._reply(token[1], Message("migrate_ready", token[2],
                                          meta={"keys": self.repl.last_copied}))
            return
        if token[0] == "agg":  # an aggregated round: every participant's ack
            for t in token[1:]:
                ack = self.acks.get(t)
                if ack is not None:
                    ack.replicas = 0
                    self._maybe_ack(t, ack)
            return
        ack = self.acks.get(token)  # every replica acknowledged (the Replicator counts them)
        if ack is not None:
            ack.replicas = 0
            self._maybe_ack(token, ack)

    def _drain_replica(self, sock) -> None:
        """Read the replies of a replica (inside a burst)."""
        for msg in self.transport.drain(sock, "a replica"):
            if msg.op == "error" or msg.meta.get("errors"):
                log.error("a replica refused an update: %s", msg.meta.get("error"))
            if msg.op in ("repl_ack", "error"):
                rids = msg.meta.get("rids", [msg.ts]) if msg.op == "repl_ack" else [msg.ts]
                self._replica_acked(self.repl.sock_peer.get(sock, -1), rids)
            elif msg.op == "repl_miss":
                for token in self.repl.on_miss(msg.ts, self.repl.sock_peer.get(sock, -1)):
                    self._on_replica_ack(token)

    def _replica_acked(self, sid: int, rids) -> None:
        """Replica ``sid`` acknowledged the forwards ``rids`` (ids this server gave them)."""
        if type(rids) is not list or len(rids) > 1 << 16 or not all(type(r) is int for r in rids):
            raise ProtocolError("replica acknowledgements must be a list of integer ids")
        for rid in rids:
            for token in self.repl.on_ack(rid, sid):
                self._on_replica_ack(token)

    def _replica_batch(self, identity: bytes, msg: Message) -> None:
        """Several updates forwarded by a master in one message (see Replicator.flush): applied
        in order, each as if it came alone, then acknowledged once. A refused item is logged
        and counted in the ack; the others are still applied."""
        items = msg.meta.get("items")
        if (type(items) is not list or not 1 <= len(items) <= 64 or len(msg.arrays) != 2 * len(items)
                or not all(type(it) is list and len(it) == 3 and it[0] in ("replicate", "replicate_agg")
                           and type(it[1]) is str and type(it[2]) is dict for it in items)):
            raise ProtocolError("a repl_batch needs items [op, table, meta] and two arrays per item")
        if not identity.startswith(b"s") or not identity[1:].isdigit():
            raise ProtocolError("replication messages come only from servers")
        if "acks" in msg.meta:  # this server's forwards to the sender, acknowledged on the way
            self._replica_acked(int(identity[1:]), msg.meta["acks"])
        if not check_refs(self.repl.ref_stores.get(int(identity[1:])), (it[2] for it in items)):
            self._reply(identity, Message("repl_miss", msg.ts))  # nothing applied: it comes again
            return
        errors = []
        for i, (op, table, meta) in enumerate(items):
            try:
                self._replica_update(identity, Message(op, msg.ts, table, meta,
                                                       msg.arrays[2 * i:2 * i + 2]), reply=False)
            except PServerError as e:
                self.errors += 1
                self.rejections[type(e).__name__] += 1
                errors.append(str(e)[:200])
        if errors:
            log.warning("refused %d of %d forwarded updates: %s", len(errors), len(items), errors[0])
            self._reply(identity, Message("repl_ack", msg.ts, meta={"errors": len(errors),
                                                                     "error": errors[0]}))
        else:
            self._ack_forward(identity, msg.ts)

    def _ack_forward(self, identity: bytes, rid: int) -> None:
        """Acknowledge forward ``rid`` of master ``identity``: at the end of the burst, with the
        burst's others, on a forward to that master if there is one."""
        if self._repl_acks is None:
            self._reply(identity, Message("repl_ack", rid))
        else:
            self._repl_acks.setdefault(identity, []).append(rid)

    def _replica_update(self, identity: bytes, msg: Message, reply: bool = True) -> None:
        """An update forwarded by the master of the keys (this server is their replica)."""
        if not identity.startswith(b"s") or not identity[1:].isdigit():
            raise ProtocolError("replication messages come only from servers")
        master = int(identity[1:])
        if msg.op == "repl_load":
            spec = TableSpec.from_json(msg.meta.get("spec"))
            if spec.name not in self.tables:
                self._declare(spec)
            table = self.tables[spec.name]
            keys = keyfmt.unpack_keys(msg).as_array()
            if len(msg.arrays) not in (2, 3) or msg.arrays[1].shape != (len(keys), table.dim):
                raise ProtocolError("a replica snapshot needs keys, values (and state) that match")
            table.load(keys, msg.arrays[1], msg.arrays[2] if len(msg.arrays) == 3 else None)
            for worker, parts in msg.meta.get("applied", []):
                for ts, part in parts[-4096:]:
                    self.repl.record(master, int(worker), int(ts), part)
            if msg.ts:  # a pre-copy of a migration: the master waits for it
                self._reply(identity, Message("repl_ack", msg.ts))
            return
        if reply and not check_refs(self.repl.ref_stores.get(master), (msg.meta,)):
            self._reply(identity, Message("repl_miss", msg.ts))  # nothing applied: it comes again
            return
        table = self._table(msg.table)
        keys, vals, ref = self._forwarded_keys(master, msg, table)
        if msg.op == "replicate_agg":
            self._defer_apply(table, keys, vals, ref)
            for worker, ts, part in msg.meta.get("clk", []):
                self.repl.record(master, int(worker), int(ts), part)
        else:
            src, wts, wp = int(msg.meta["src"]), int(msg.meta["wts"]), msg.meta.get("wp")
            if wp is not None and type(wp) is not int:
                raise ProtocolError("meta 'wp' must be an integer part id")
            if not self.repl.seen(master, src, wts, wp):
                self.repl.record(master, src, wts, wp)
                self._record_clock(table.spec.name, src, keys, wts)
                if table.spec.sync and "rnd" in msg.meta:
                    self._apply_deferred()  # in order with this master's earlier forwards
                    self._aggregate(None, msg, table, keys, vals, src, origin=master)
                else:
                    self._defer_apply(table, keys, vals, ref)
        if reply:
            self._ack_forward(identity, msg.ts)

    def _forwarded_keys(self, master: int, msg: Message, table: Table
                        ) -> tuple[keyfmt.KeySet, np.ndarray, tuple | None]:
        """(keys, values, (store, id) of the key list stored or used) of a forward: its keys, or the list it
        names ("kr", see pserver.ft.list_refs; check_refs made sure it is held). Drops the lists
        the master evicted ("kd") and stores the keys it asks to ("ks")."""
        meta = msg.meta
        drop, put, use = meta.get("kd"), meta.get("ks"), meta.get("kr")
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

    def _defer_apply(self, table: Table, keys: keyfmt.KeySet, vals: np.ndarray,
                     ref: tuple | None = None) -> None:
        """Apply an update forwarded by a master after this burst's acknowledgements are sent.

        A replica holds the update in memory either way, so acknowledging it before applying
        loses nothing a crash would not lose anyway; it takes the replica's apply off the path
        of the worker's acknowledgement, and on a busy machine moves it to when nothing waits.
        Everything that reads or replaces replica data applies the deferred updates first:
        every op but the hot ones (_DEFERRABLE), a new cluster view (promotion to master), a
        background re-replication step and a graceful leave."""
        self._deferred.append((table, keys, vals, ref))
        self._deferred_keys += keys.n
        if self._deferred_keys > DEFER_MAX_KEYS:
            self._apply_deferred()

    def _apply_deferred(self) -> None:
        """Apply the acknowledged forwards still waiting, in the order they arrived."""
        deferred, self._deferred, self._deferred_keys = self._deferred, [], 0
        for table, keys, vals, ref in deferred:
            try:
                keyfmt.apply_push(table, keys, vals)
                if ref is not None:  # hold the slot cache's copy of the list: found at once next time
                    own = table.slot_cache.own_copy(keys.keys)
                    if own is not None and own is not keys.keys:
                        ref[0].adopt(ref[1], own)
            except Exception as e:  # a user update rule that fails here failed on the master too
                self.errors += 1
                self.rejections[type(e).__name__] += 1
                log.exception("a forwarded update could not be applied")

    def _migrate(self, identity: bytes, msg: Message) -> None:
        """Scheduler-driven change of the key ring (see pserver.ft.migration)."""
        if msg.op == "migrate_abort":
            self.repl.next_ring = None
            return
        ring = KeyRing.from_json(msg.meta["ring"])
        if msg.op == "migrate_prepare":
            for sid, (host, port) in msg.meta.get("servers", {}).items():
                self._known_peers[int(sid)] = (str(host), int(port))
            self.repl.next_ring = ring
            token = ("migrate", identity, msg.ts)
            if not self.repl.precopy(ring, self.tables, token):
                self._reply(identity, Message("migrate_ready", msg.ts, meta={"keys": 0}))
            return
        self.repl.next_ring = None  # commit: switch now, before the view's broadcast
        self._adopt_ring(ring, copied=True)

    def _peer_address(self, sid: int) -> tuple[str, int]:
        node = self.membership.view.nodes.get(sid)
        if node is not None:
            return node.host, node.port
        if sid in self._known_peers:  # a joining server announced by a migration
            return self._known_peers[sid]
        raise PServerError(f"unknown server {sid}")

    def _on_view(self) -> None:
        """React to a new cluster view: a new key ring (failover, join, leave) and membership."""
        self._apply_deferred()  # a replica promoted to master serves every update it acknowledged
        view = self.membership.view
        self._view_version = view.version
        settings = view.settings
        k = int(settings.get("replication", 0))
        after = bool(settings.get("replicate_after_aggregation", True))
        self.repl.k, self.repl.after_aggregation = k, after
        limit = settings.get("replica_key_cache")
        if type(limit) is int and limit >= 0 and limit != self.repl.ref_limit:
            self.repl.ref_limit = limit
            self.repl.ref_senders.clear()  # accounts made for another bound
        new = view.ring
        if new is not None and (self.ring is None or new.version > self.ring.version):
            self._adopt_ring(new, copied=False)
        for sid in list(self.repl.ref_stores):  # lists stored here by masters that are gone
            node = view.nodes.get(sid)
            if node is None or not node.alive:
                del self.repl.ref_stores[sid]
        for sid in list(self.repl.socks):
            node = view.nodes.get(sid)  # a joiner may not be in this view yet: not dead
            if node is not None and not node.alive:
                for token in self.repl.drop_replica(sid):
                    self._on_replica_ack(token)
        self.filters.on_view(view)
        self._recheck_rounds()
        self._recheck_as_of()

    def _adopt_ring(self, new, copied: bool) -> None:
        """Serve under ring ``new``. After a failover, copy what new replicas lack; after a
        migration's commit the copies were made in its prepare phase."""
        old = self.ring
        if old is not None and new.version <= old.version:
            return
        self.ring = new
        self.repl.ring = new
        if old is not None:
            log.info("key ring v%d -> v%d (servers %s)", old.version, new.version, new.servers)
            if not copied and self.repl.k:
                n = self.repl.plan_rebuild(old, new, self.tables)
                if n:
                    log.info("re-replicating %d keys in the background (ring v%d)", n, new.version)
            else:
                self.repl.rebuilt_version = new.version

    def _record_clock(self, table: str, sender: int, keys: keyfmt.KeySet, ts: int,
                      span=None) -> None:
        """Advance the range vector clock of ``sender`` over the request's key span (for "as of"
        reads and staleness checks; exactly-once after failover is the replication clock's job).
        A push may declare the key range it stands for (meta "span"; paper: keys of the range
        missing from a message get its timestamp too): the clock then covers all of it."""
        lo_hi = _declared_span(span, keys) if span is not None else None
        if lo_hi is None and keys.n:
            lo_hi = keys.span()
        if lo_hi is not None:
            self.clocks.setdefault(table, RangeClock()).advance(sender, lo_hi[0], lo_hi[1], ts)

    # -- reads "as of" a time (range vector clocks) -------------------------------------------
    def _applied_time(self, table: str, node: int, lo: int, hi: int) -> int:
        """Newest t such that this server's copy of [lo, hi) reflects every push of ``node``
        stamped <= t (NEVER: none): the range clock, lowered below any push of the node still
        waiting in an incomplete synchronous round (the clock advances when a push arrives)."""
        clock = self.clocks.get(table)
        t = clock.time(node, lo, hi) if clock is not None else NEVER
        for r in self.rounds.get(table, {}).values():
            pending = r.senders.get(node)  # its request timestamp (with the part id)
            if pending is not None:
                t = min(t, (pending[0] if isinstance(pending, tuple) else pending) - 1)
        return t

    def _as_of_met(self, identity: bytes, msg: Message, table: Table) -> bool:
        """True if a pull with meta "as_of" {node: t} may be answered now: for every listed node
        that is alive, the pulled keys reflect its pushes up to t. Otherwise the pull is held at
        the head of its sender's queue (per-sender FIFO) and retried after every applied push."""
        as_of = msg.meta["as_of"]
        if table.spec.pull_filters or FILTER_META in msg.meta:
            raise ProtocolError("as_of pulls are not supported on tables with pull filters")
        try:
            wanted = [(int(n), int(t)) for n, t in as_of.items()]
        except (AttributeError, TypeError, ValueError):
            raise ProtocolError("as_of must map worker node ids to integer timestamps") from None
        keys = keyfmt.unpack_keys(msg)
        if keys.n:
            lo, hi = keys.span()
            view = self.membership.view
            for node, t in wanted:
                if view.alive(node) and self._applied_time(table.spec.name, node, lo, hi) < t:
                    self.held.setdefault(identity, deque()).appendleft(msg)
                    self._as_of_waiting.add(identity)
                    return False
        return True

    def _recheck_as_of(self) -> None:
        """Retry held "as of" pulls (after a push was applied, or a worker left): each is
        processed again first in its sender's queue, and holds itself again if still early."""
        for identity in list(self._as_of_waiting):
            self._as_of_waiting.discard(identity)
            queue = self.held.get(identity)
            if queue and queue[0].op == "pull" and "as_of" in queue[0].meta:
                self._release(identity)

    def _clock_meta(self, msg: Message, table: Table, keys: keyfmt.KeySet) -> dict:
        """Reply meta of a pull that asked for the clock (meta "vc"): {"vc": {node: applied
        time over the pulled keys' span}} for every worker that pushed to the table."""
        if not msg.meta.get("vc") or not keys.n:
            return {}
        lo, hi = keys.span()
        name = table.spec.name
        clock = self.clocks.get(name)
        nodes = set(clock.nodes()) if clock is not None else set()
        for r in self.rounds.get(name, {}).values():
            nodes.update(r.senders)
        return {"vc": {str(n): self._applied_time(name, n, lo, hi) for n in sorted(nodes)}}

    def _declare(self, spec: TableSpec) -> None:
        have = self.tables.get(spec.name)
        if have is None:
            self.tables[spec.name] = Table(spec, slot_cache=self.cfg.slot_cache_bytes)
            log.info("declared table %s", spec.to_json())
        elif have.spec != spec:
            raise TableError(f"table {spec.name!r} already exists with spec {have.spec.to_json()}; "
                             f"it was declared again as {spec.to_json()} - every worker must "
                             f"declare the same spec (or use another name)")

    # -- synchronous aggregation ----------------------------------------------------------------
    def _aggregate(self, token, msg: Message, table: Table, keys, vals, sender: int,
                   origin: int | None = None) -> None:
        """Add one worker's push to its synchronous round; apply the round once every live worker
        has pushed. ``token`` None: a copy forwarded by the master (this server is a replica)."""
        rnd = msg.meta.get("rnd")
        if type(rnd) is not int or rnd < 0:
            raise ProtocolError("a push to a synchronous table must carry its round number")
        # A part resent after a failover joins this server's own round r: the other workers may send
        # round r here only after the failover, as ordinary parts. If round r is already applied
        # here, the resent part is applied on its own (it holds keys no earlier part of r had).
        resend = origin is None and bool(msg.meta.get("orig"))
        key = (rnd, origin)
        rounds = self.rounds.setdefault(table.spec.name, {})
        if resend and rnd <= self.done_rounds.get((table.spec.name, None), -1):
            self._apply_late_part(token, msg, table, keys, vals, sender)
            return
        r = rounds.setdefault(key, _Round())
        if sender in r.senders and not resend:
            raise ProtocolError(f"duplicate push for round {rnd} of table {table.spec.name!r}")
        r.senders[sender] = (msg.ts, msg.meta.get("wp" if token is None else "p"))
        if keys.n:
            r.parts.append((keys.as_array(), vals))
        if token is not None:
            r.waiting.append(token)
            self.acks[token] = ack = _Ack(token)
            self.held.setdefault(token[0], deque())
            if self.repl.active() and not self.repl.after_aggregation:
                ack.replicas += self.repl.forward(
                    token, "replicate", table.spec.name, {"src": sender, "wts": msg.ts, "wp": msg.meta.get("p"),
                                                            "rnd": rnd},
                    keys.as_array(), vals, always=True)
        self._maybe_apply(table.spec.name, key)

    def _apply_late_part(self, token, msg: Message, table: Table, keys, vals, sender: int) -> None:
        """A resent part of a synchronous round this server already applied: apply it alone,
        replicate it like an aggregate, and acknowledge it once the replicas have it."""
        if keys.n:
            keyfmt.apply_push(table, keys, vals)
        if token is None:
            return
        ack = self.acks[token] = _Ack(token)
        if self.repl.active():
            ack.replicas += self.repl.forward(
                token, "replicate_agg", table.spec.name,
                {"clk": [[sender, msg.ts, msg.meta.get("p")]]}, keys.as_array(), vals)
        self._local_done(token)

    def _live_workers(self) -> set[int]:
        return {n.id for n in self.membership.view.role_nodes("worker")}

    def _maybe_apply(self, name: str, key: tuple) -> None:
        rounds = self.rounds.get(name, {})
        r = rounds.get(key)
        if r is None or not self._live_workers() <= set(r.senders):
            return
        # rounds of one origin complete in order: an earlier incomplete round blocks later ones
        if any(k[1] == key[1] and k[0] < key[0] for k in rounds):
            return
        del rounds[key]
        done = self.done_rounds.get((name, key[1]), -1)
        self.done_rounds[(name, key[1])] = max(done, key[0])
        table = self.tables[name]
        keys = np.empty(0, np.uint64)
        vals = np.empty((0, table.spec.push_cols), table.dtype)
        if r.parts:
            keys, vals = keyfmt.sum_parts(r.parts, table.spec.push_cols)
            table.push(keys, vals)
        if r.waiting and self.repl.active() and self.repl.after_aggregation:
            clk = [[w, t, p] for w, (t, p) in r.senders.items()]
            if self.repl.forward(("agg", *r.waiting), "replicate_agg", name, {"clk": clk}, keys,
                                 vals, always=True, memo=table.slot_cache.memo(keys)):
                for token in r.waiting:
                    self.acks[token].replicas = 1  # released together by the aggregated ack
        for token in r.waiting:
            self._local_done(token)
        for token in r.waiting:
            self._release(token[0])
        if self._as_of_waiting:
            self._recheck_as_of()
        later = [k for k in rounds if k[1] == key[1]]
        if later:
            self._maybe_apply(name, min(later))

    def _release(self, identity: bytes) -> None:
        """Process requests held behind a sender's sync push, in order, until another sync push of
        that sender has to wait again."""
        queue = self.held.pop(identity, None)
        while queue:
            msg = queue.popleft()
            try:
                self._process(identity, msg)
            except PServerError as e:
                self._reject(identity, msg.ts, e, msg.meta.get("p"))
            except Exception as e:
                log.exception("unexpected error on a held request")
                self._reject(identity, msg.ts, e, msg.meta.get("p"))
            if identity in self.held:  # blocked again: keep the rest behind it
                self.held[identity].extend(queue)
                return

    def _recheck_rounds(self) -> None:
        for name, rounds in list(self.rounds.items()):
            for origin in {k[1] for k in rounds}:
                mine = [k for k in rounds if k[1] == origin]
                if mine:
                    self._maybe_apply(name, min(mine))

    def stats(self) -> dict:
        return {"id": self.membership.node_id, "pid": os.getpid(), "errors": self.errors,
                "rejected": dict(self.rejections),
                "duplicates": self.duplicates,
                "replication": {"forwards": self.repl.messages_forwarded,
                                "bytes_forwarded": self.repl.bytes_forwarded,
                                "key_list_misses": self.repl.ref_misses,
                                "key_lists_held": {m: len(st.lists) for m, st in self.repl.ref_stores.items()}},
                "tables": {n: {"keys": len(t), "bytes": t.nbytes(), "spec": t.spec.to_json(),
                               "slot_cache": t.slot_cache.stats()}
                           for n, t in self.tables.items()},
                "traffic": self.transport.counters.to_json(), "time": time.time(),
                "filters": self.filters.counters.to_json()}


def _ack(ts: int, part) -> Message:
    """The acknowledgement of part ``part`` (None: an unsplit request) of request ``ts``."""
    return Message("ack", ts, meta={"p": part} if part is not None else None)


def _warm_up() -> None:
    """Load the machine code of the kernels every request uses (numba's cache; ~0.3 s)."""
    try:
        store_index.warm_up()
        keyfmt.sorted_unique(np.arange(3, dtype=np.uint64))
        part = (np.arange(2, dtype=np.uint64), np.ones((2, 1), np.float32))
        keyfmt.sum_parts([part, (part[0] + 1, part[1])], 1)
    except Exception:  # only an optimisation: the first requests compile what is missing
        log.exception("warming up the store kernels failed")


def _declared_span(span, keys: keyfmt.KeySet) -> tuple[int, int]:
    """The key range [lo, hi) a push declares (meta "span"); ProtocolError unless it is a valid
    range holding every key of the message."""
    try:
        lo, hi = (int(x) for x in span)
    except (TypeError, ValueError):
        raise ProtocolError("a push's span must be [lo, hi] with integer bounds") from None
    if not 0 <= lo < hi <= KEY_SPACE_END:
        raise ProtocolError(f"a push's span [{lo}, {hi}) is not a key range")
    if keys.n:
        first, end = keys.span()
        if first < lo or end > hi:
            raise ProtocolError(f"a push's keys [{first}, {end}) leave its span [{lo}, {hi})")
    return lo, hi


def _origins(raw) -> list[tuple[int, object]]:
    """The (server, part id) pairs a resent part names (see KVWorker._resend)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > 64 or not all(
            isinstance(o, list) and len(o) == 2 and type(o[0]) is int and type(o[1]) is int
            for o in raw):
        raise ProtocolError("meta 'orig' must be a list of [server id, part id] pairs")
    return [(o[0], o[1]) for o in raw]
