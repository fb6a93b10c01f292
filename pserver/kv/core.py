"""The server's decisions, without I/O: ``handle(identity, msg, role) -> out`` applies one request
to the store and returns the replies it caused as (identity, Message) pairs. It owns the per-sender
FIFO holds, synchronous rounds, exactly-once after failover, range clocks and ack state; forwards to
replicas go through the Replicator it is given, worker groups' rights through its GroupGate
(pserver.kv.gate). The loop (pserver.kv.server) does the I/O."""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from operator import attrgetter

import numpy as np

from .. import security
from ..errors import (
    AuthError,
    LimitError,
    ProtocolError,
    PServerError,
    TableError,
    WrongOwnerError,
)
from ..ft import checkpoint as ft_checkpoint
from ..ft.exactly_once import ReplicationClock
from ..ft.fencing import fenced_masters
from ..ft.replica import ReplicaSide
from ..ft.replication import PrecopyAck, Replicator, RoundAck
from ..membership.view import ClusterView
from ..protocol import (
    AS_OF,
    CLOCK,
    CLOCK_ENTRIES,
    DUPLICATE,
    ERROR,
    FILTER_META,
    GROUP,
    ID,
    KEY_COUNT,
    KIND,
    LIMIT,
    NEXT,
    ORIGINS,
    PART,
    PUSH_FACTOR,
    PUSH_PULL,
    PUSHES,
    RING,
    RING_VERSION,
    ROUND,
    SEEN_WITHIN,
    SERVERS,
    SOURCE,
    SPAN,
    SPEC,
    SYNC_ROUND,
    WORKER_PART,
    WORKER_TS,
)
from ..ring import KeyRing
from ..store.apply import apply_pull, apply_push, sum_parts
from ..store.spec import TableSpec
from ..store.table import Table
from ..wire import Limits, Message
from . import keys as keyfmt
from .acks import AckBook
from .clocks import AppliedClocks
from .dispatch import SERVER_OPS
from .filtering import ServerFilters
from .gate import GroupGate
from .rounds import SyncRounds
from .tables import Tables

log = logging.getLogger(__name__)


class ServerCore:
    """One server's state machine. ``repl``: its Replicator (a k=0 one forwards nothing);
    ``secure``: check each op's roles (the dispatch table's) against the sender's proven role.

    Handlers (``on_*``, named by the dispatch table) raise PServerError for a refused request
    before any stored value changed; ``handle`` answers it with an error reply and counts it."""

    def __init__(self, repl: Replicator, limits: Limits | None = None, slot_cache_bytes: int = 0,
                 default_updater: str = "sum", secure: bool = False) -> None:
        self.repl, self.limits, self.secure = repl, limits or Limits(), secure
        self.slot_cache_bytes = slot_cache_bytes
        self.tables = Tables(slot_cache_bytes, default_updater)
        self.out: list[tuple[bytes, Message]] = []
        self.held: dict[bytes, deque] = {}   # sender -> requests held behind its sync push
        self.filters = ServerFilters.from_env(self.held, self.limits.max_message_bytes)
        self.rounds = SyncRounds()
        self.clocks = AppliedClocks(self.rounds)
        self.acks = AckBook(self.out)
        self.exactly_once = ReplicationClock(repl.my_id)
        self.replica = ReplicaSide(
            repl, self.exactly_once, self.clocks, self.out, self.tables.table, self.tables.declare_missing,
            lambda msg, table, keys, vals, worker, master: self._aggregate(
                None, msg, table, keys, vals, worker, origin=master),
            self.count, self.on_replicated)
        repl.rebuilder.clock_of = self.clocks.copy_json
        repl.rebuilder.applied_of = self.exactly_once.applied_array
        self.view = ClusterView()
        self._prepare_held: tuple[bytes, Message] | None = None  # a migration's prepare ahead of our view
        self.errors = self.duplicates = 0
        self.rejections: Counter[str] = Counter()  # reason (exception class) -> refused requests
        self.stats: Callable[[], dict] = lambda: {}  # the node's stats, set by the loop
        self._as_of_waiting: set[bytes] = set()  # senders whose first held request is an as_of pull
        self.gate = GroupGate(self.held)
        # the gate's sets, bound here for the per-request checks (it updates them in place)
        self._known, self._read_only_ids = self.gate.known, self.gate.read_only_ids
        self._ops = {op: (attrgetter(e.handler)(self), e.roles, e.deferrable)
                     for op, e in SERVER_OPS.items()}

    # -- entry points -------------------------------------------------------------------------------
    def handle(self, identity: bytes, msg: Message, role: str | None = None) -> list:
        """Serve ``msg`` from ``identity`` (held, in order, if an earlier request of the sender
        waits). Never raises: a refused request is answered with an error. Returns ``out``, the
        replies to send (the caller empties it); acks due are collected in ``acks``."""
        try:
            part = msg.meta.get(PART)
            if part is not None and type(part) is not int:
                raise ProtocolError("meta 'p' (the request part) must be an integer")
            if self.secure:
                entry = self._ops.get(msg.op)
                # an op a server does not serve: refused as the cluster's table says (a worker
                # sending a scheduler's op is an AuthError, not an unknown op)
                if (role not in entry[1]) if entry is not None else \
                        not security.authorise(msg.op, role, True):
                    raise AuthError(f"a {role} may not send {msg.op!r} to a server")
            if identity not in self._known and self.gate.is_newcomer(identity, msg):
                self.gate.hold(identity, msg)
                return self.out
            held = self.held.get(identity)
            if held is not None and self.filters.is_awaited_resend(identity, msg):
                held.appendleft(msg)  # resent after a key-cache miss: it goes first
                self._release(identity)
            elif held is not None:
                held.append(msg)
            else:
                self._process(identity, msg)
        except Exception as e:  # noqa: BLE001 - every refusal is answered (see _refuse)
            self._refuse(identity, msg, e)
        return self.out

    def _refuse(self, identity: bytes, msg: Message, err: Exception) -> None:
        """Answer ``msg`` with ``err``; an error that is not a PServerError is a bug: logged."""
        if not isinstance(err, PServerError):
            log.exception("unexpected error on a request")
        self.reject(identity, msg.ts, err, msg.meta.get(PART))

    def reject(self, identity: bytes, ts: int, err: Exception, part=None) -> None:
        """Answer request ``ts`` with an error (kind: the exception class) and count it."""
        self.count(err)
        meta = {ERROR: str(err)[:1000], KIND: type(err).__name__}
        if isinstance(err, WrongOwnerError):
            meta[RING_VERSION] = _ring_version(self.repl)
            log.info("request from %r for keys this server does not master: %s", identity[:16], err)
        else:
            log.warning("rejected a request from %r: %s", identity[:16], err)
        if type(part) is int:
            meta[PART] = part
        self.out.append((identity, Message("error", ts, meta=meta)))

    def count(self, err: Exception) -> None:
        """Count a refused request (stats "errors" and "rejected" by exception class)."""
        self.errors += 1
        self.rejections[type(err).__name__] += 1

    def _process(self, identity: bytes, msg: Message) -> None:
        entry = self._ops.get(msg.op)
        if entry is None:
            raise ProtocolError(f"unknown op {msg.op!r} for a server")
        if self.replica.deferred and not entry[2]:
            self.replica.apply_deferred()  # whatever reads or replaces replica data sees them all
        entry[0](identity, msg)

    def _answer(self, identity: bytes, req: Message, op: str, arrays=(), meta=None) -> None:
        """Reply to ``req``, echoing its part id so the worker can match split requests."""
        meta = dict(meta or {})
        if PART in req.meta:
            meta[PART] = req.meta[PART]
        self.out.append((identity, Message(op, req.ts, meta=meta, arrays=list(arrays))))

    # -- handlers (see pserver.kv.dispatch) ---------------------------------------------------------
    def on_push(self, identity: bytes, msg: Message) -> None:
        if self._read_only_ids:
            self.gate.check(identity, msg)
        table = self.tables.table(msg.table)
        pp = msg.meta.get(PUSH_PULL) == 1  # push_pull: answer with the keys' values once applied
        if table.spec.push_filters or FILTER_META in msg.meta:
            if pp:
                raise ProtocolError("push_pull is not supported on tables with filters")
            keys, vals = self.filters.decode_push(identity, msg, table)
        else:
            keys, vals = keyfmt.unpack_push(msg, table.spec.push_cols, table.dtype)
        check_limits(keys, table, self.limits)
        sender = keyfmt.sender_id(identity)
        self._check_owner(msg, keys)
        part = msg.meta.get(PART)
        token = (identity, msg.ts, part)
        repl, once = self.repl, self.exactly_once
        orig = origins(msg.meta.get(ORIGINS))
        if orig and any(once.seen(s, sender, msg.ts, p) for s, p in orig):
            # a resend after failover of an update this server already has (it was the replica)
            self.duplicates += 1
            if pp:
                self._answer(identity, msg, "vals", [apply_pull(table, keys)], {DUPLICATE: 1})
            else:
                self._answer(identity, msg, "ack", meta={DUPLICATE: 1})
            return
        self.clocks.record(table.spec.name, sender, keys, msg.ts, msg.meta.get(SPAN))
        once.note_applied(sender, msg.ts, part)
        for s, p in orig:  # an old master's own forward of the part may still be on its way
            once.record(s, sender, msg.ts, p)
        if pp:
            self.acks.reads[token] = (table, keys)  # read when its acknowledgement is due
        if table.spec.sync:
            try:
                self._aggregate(token, msg, table, keys, vals, sender)
            except PServerError:
                self.acks.reads.pop(token, None)
                raise
            return
        apply_push(table, keys, vals)
        if self._as_of_waiting:
            self._recheck_as_of()
        if not repl.active():
            self.acks.send(identity, msg.ts, part)
        else:
            kept = keys.as_array()
            self.acks.expect(token, repl.forward(
                token, "replicate", table.spec.name,
                {SOURCE: sender, WORKER_TS: msg.ts, WORKER_PART: part},
                kept, vals, memo=table.slot_cache.memo(kept)) > 0)
            self.acks.local_done(token)
        if table.eviction is not None:  # after the forward: replicas evict after applying it
            self._evict(table)

    def on_pull(self, identity: bytes, msg: Message) -> None:
        table = self.tables.table(msg.table)
        if AS_OF in msg.meta:
            if table.spec.pull_filters or FILTER_META in msg.meta:
                raise ProtocolError("as_of pulls are not supported on tables with pull filters")
            if self.clocks.behind(table.spec.name, keyfmt.unpack_keys(msg), msg.meta[AS_OF],
                                  self.view.alive):
                # held at the head of its sender's queue, retried after every applied push
                self.held.setdefault(identity, deque()).appendleft(msg)
                self._as_of_waiting.add(identity)
                return
        if table.spec.pull_filters or FILTER_META in msg.meta:
            keys = self.filters.decode_pull(identity, msg, table)
            check_limits(keys, table, self.limits)
            self._check_owner(msg, keys)
            arrays, meta = self.filters.encode_reply(identity, table, apply_pull(table, keys))
            if msg.meta.get(CLOCK) and keys.n:
                meta = {**meta, **self.clocks.meta(table.spec.name, keys)}
            self._answer(identity, msg, "vals", arrays, meta)
            return
        keys = keyfmt.unpack_keys(msg)
        check_limits(keys, table, self.limits)
        self._check_owner(msg, keys)
        meta = self.clocks.meta(table.spec.name, keys) if msg.meta.get(CLOCK) and keys.n else None
        self._answer(identity, msg, "vals", [apply_pull(table, keys)], meta)

    def on_pull_range(self, identity: bytes, msg: Message) -> None:
        """The entries of [lo, hi) this server masters, sorted; with meta "limit" L at most L of
        them, and meta "next" in the reply (the key to go on from) when more remain; with meta
        "within" T only the rows pushed during the table's last T pushes here (TableError if
        the table tracks no usage)."""
        table = self.tables.table(msg.table)
        lo, hi = keyfmt.range_bounds(msg.meta)
        k, v = table.range_items(lo, hi)
        ring = self.repl.ring
        if ring is not None and len(ring.servers) > 1 and len(k):
            mine = ring.owner_of(k) == self.repl.my_id  # replicas answer nothing
            k, v = k[mine], v[mine]
        within = msg.meta.get(SEEN_WITHIN)
        if within is not None:  # an export of the rows in use only
            if type(within) is not int or within < 1:
                raise ProtocolError("meta 'within' of a range pull must be an integer >= 1")
            recent = table.pushed_within(k, within)
            k, v = k[recent], v[recent]
        meta = {RING_VERSION: _ring_version(self.repl)}
        limit = msg.meta.get(LIMIT)
        if limit is not None:  # a page: at most limit entries, and where the next page starts
            if type(limit) is not int or limit < 1:
                raise ProtocolError("meta 'limit' of a range pull must be an integer >= 1")
            if len(k) > limit:
                k, v = k[:limit], v[:limit]
                meta[NEXT] = int(k[-1]) + 1
        self._answer(identity, msg, "range", [k, v], meta)

    def on_declare_table(self, identity: bytes, msg: Message) -> None:
        """Declare a table (meta "spec"). For a sync table, a worker is a pusher unless meta
        "pushes" is false; the reply's "round" is the first round that waits for it."""
        spec = TableSpec.from_json(msg.meta.get(SPEC))
        if spec.dim > self.limits.max_dim:
            raise LimitError(f"table dim {spec.dim} exceeds this server's limit of "
                             f"{self.limits.max_dim} (--max-dim / PSERVER_MAX_DIM)")
        if spec.push_factor is None:
            raise TableError(f"update rule {spec.updater!r} is not registered on this server: "
                             f"start servers with --plugin MODULE (a module that calls "
                             f"pserver.register_updater)")
        if self._read_only_ids:
            self.gate.check(identity, msg)
        self.tables.declare(spec)
        meta = {PUSH_FACTOR: spec.push_factor}
        if spec.sync:
            sender = keyfmt.sender_id(identity)
            if GROUP in msg.meta:  # used until the view names the sender's group
                self.gate.declare(sender, msg.meta[GROUP])
            meta[ROUND] = self.rounds.declare(spec.name, sender,
                                              msg.meta.get(PUSHES, True) is not False,
                                              self.gate.group(sender))
        self._answer(identity, msg, "ok", meta=meta)

    def on_migrate(self, identity: bytes, msg: Message) -> None:
        """Scheduler-driven change of the key ring (see pserver.ft.migration). A prepare made from
        a ring this server has not adopted yet (the view announcing a failover may arrive after
        it) waits for that view: the pre-copy must cover every key this server masters then."""
        if msg.op == "migrate_abort":
            self.repl.next_ring = None
            self._prepare_held = None
            return
        ring = KeyRing.from_json(msg.meta[RING])
        if msg.op == "migrate_prepare":
            start = msg.meta.get(RING_VERSION)
            if type(start) is not int and start is not None:
                raise ProtocolError("meta 'rv' of a migrate_prepare must be a ring version")
            mine = self.repl.ring.version if self.repl.ring is not None else -1
            if start is not None and mine < start:
                self._prepare_held = (identity, msg)
                log.info("migration to ring v%d waits for ring v%d (this server has v%d)",
                         ring.version, start, mine)
                return
            self._prepare_held = None
            for sid, (host, port) in msg.meta.get(SERVERS, {}).items():
                self.repl.known_peers[int(sid)] = (str(host), int(port))
            self.repl.next_ring = ring
            if not self.repl.rebuilder.precopy(ring, self.tables, PrecopyAck(identity, msg.ts)):
                self.out.append((identity, Message("migrate_ready", msg.ts, meta={KEY_COUNT: 0})))
            return
        self.repl.next_ring = None  # commit: switch now, before the view's broadcast
        self._prepare_held = None
        self.repl.adopt_ring(ring, True, self.tables)

    def on_checkpoint_write(self, identity: bytes, msg: Message) -> None:
        # the one handler with I/O (it writes this server's shard to disk): a rare, scheduler-driven
        # op that must see the store between two requests, so the loop's thread runs it
        report = ft_checkpoint.handle_write(msg.meta, self.repl.my_id, self.tables,
                                            self.clocks.clocks)
        self.out.append((identity, Message("ok", msg.ts, meta=report)))

    def on_ping(self, identity: bytes, msg: Message) -> None:
        self._answer(identity, msg, "pong", meta={ID: self.repl.my_id})

    def on_stats(self, identity: bytes, msg: Message) -> None:
        self._answer(identity, msg, "stats", meta=self.stats())

    def _evict(self, table: Table) -> None:
        """The master's eviction sweep of ``table`` (pserver.store.eviction): the rows it drops
        are forwarded to the replicas as a key list, so every copy drops the same rows."""
        repl = self.repl
        ring = repl.ring
        copies = 1 + min(repl.k, len(ring.servers) - 1) if repl.active() and ring else 1
        keys = table.eviction_due(self._mastered, copies)
        if keys.size:
            table.evict(keys)
            if repl.active():
                repl.forward(_EVICTED, "repl_evict", table.spec.name, {}, keys,
                             np.empty((keys.size, 0), table.dtype))

    def _mastered(self, keys: np.ndarray) -> np.ndarray:
        ring = self.repl.ring
        if ring is None or len(ring.servers) < 2:
            return np.ones(keys.size, bool)
        return ring.owner_of(keys) == self.repl.my_id

    # -- ownership ---------------------------------------------------------------------------------
    def _check_owner(self, msg: Message, keys: keyfmt.KeySet) -> None:
        """Serve only keys this server masters. A request split with the same ring version is
        trusted (the hot path); otherwise the keys' owners are computed."""
        ring = self.repl.ring
        if ring is None or msg.meta.get(RING_VERSION) == ring.version or keys.n == 0:
            return
        me = self.repl.my_id
        if len(ring.servers) == 1 and ring.servers[0] == me:
            return
        owners = ring.owner_of(keys.as_array())
        if not (owners == me).all():
            raise WrongOwnerError(f"{int((owners != me).sum())} of {keys.n} keys are "
                                  f"not mastered here under ring v{ring.version}")

    # -- synchronous rounds -------------------------------------------------------------------------
    def _aggregate(self, token, msg: Message, table: Table, keys, vals, sender: int,
                   origin: int | None = None) -> None:
        """Add a push to its round; apply the rounds that are complete. ``token`` None: a part
        forwarded by master ``origin`` (this server is its replica)."""
        rnd = msg.meta.get(SYNC_ROUND)
        if type(rnd) is not int or rnd < 0:
            raise ProtocolError("a push to a synchronous table must carry its round number")
        # A part resent after a failover joins this server's own round r: the other workers send
        # round r here only after the failover, as ordinary parts. If round r is already applied
        # here, the part is applied on its own (a resend holds keys no earlier part of r had; a
        # worker that declared after r began, and did not adopt the round its reply named, must
        # not open a round r again that nobody else would push).
        resend = origin is None and bool(msg.meta.get(ORIGINS))
        name = table.spec.name
        group = self.gate.group(sender)  # rounds are per (table, group)
        if origin is None and self.rounds.is_done(name, None, rnd, group):
            self._apply_late_part(token, msg, table, keys, vals, sender)
            return
        r = self.rounds.add(name, (rnd, origin), sender,
                            (msg.ts, msg.meta.get(WORKER_PART if token is None else PART)),
                            keys.as_array() if keys.n else None, vals, resend, group)
        if token is not None:
            r.waiting.append(token)
            self.acks.expect(token, False)
            self.held.setdefault(token[0], deque())
            if self.repl.active() and not self.repl.after_aggregation:
                self.acks.expect(token, self.repl.forward(
                    token, "replicate", name, {SOURCE: sender, WORKER_TS: msg.ts,
                                               WORKER_PART: msg.meta.get(PART), SYNC_ROUND: rnd},
                    keys.as_array(), vals, always=True) > 0)
        self._apply_rounds(name, group)

    def _apply_late_part(self, token, msg: Message, table: Table, keys, vals, sender: int) -> None:
        """A resent part of a round already applied here: applied alone, replicated like an
        aggregate, acknowledged once the replicas have it."""
        if keys.n:
            apply_push(table, keys, vals)
        if token is None:
            return
        self.acks.expect(token, self.repl.active() and self.repl.forward(
            token, "replicate_agg", table.spec.name, {CLOCK_ENTRIES: [[sender, msg.ts, msg.meta.get(PART)]]},
            keys.as_array(), vals) > 0)
        self.acks.local_done(token)

    def _apply_rounds(self, name: str, group: str) -> None:
        """Apply every complete round of table ``name`` in worker group ``group``, then serve
        what their pushers held."""
        for _, r in self.rounds.pop_ready(name, self.gate.live(group), group):
            table = self.tables[name]
            if r.parts:
                keys, vals = sum_parts(r.parts, table.spec.push_cols)
                table.push(keys, vals)
            else:
                keys = np.empty(0, np.uint64)
                vals = np.empty((0, table.spec.push_cols), table.dtype)
            if r.waiting and self.repl.active() and self.repl.after_aggregation:
                clk = [[w, t, p] for w, (t, p) in r.senders.items()]
                if self.repl.forward(RoundAck(r.waiting), "replicate_agg", name, {CLOCK_ENTRIES: clk}, keys,
                                     vals, always=True, memo=table.slot_cache.memo(keys)):
                    for token in r.waiting:  # released together by the aggregated ack
                        self.acks.wait_replicas(token)
            for token in r.waiting:
                self.acks.local_done(token)
            for token in r.waiting:
                self._release(token[0])
            if self._as_of_waiting:
                self._recheck_as_of()

    # -- holds --------------------------------------------------------------------------------------
    def _release(self, identity: bytes) -> None:
        """Serve requests held behind a sender's sync push, in order, until one holds again."""
        queue = self.held.pop(identity, None)
        while queue:
            msg = queue.popleft()
            try:
                self._process(identity, msg)
            except Exception as e:  # noqa: BLE001 - answered, as in handle
                self._refuse(identity, msg, e)
            if identity in self.held:  # blocked again: keep the rest behind it
                self.held[identity].extend(queue)
                return

    def _recheck_as_of(self) -> None:
        """Retry held "as of" pulls: each is served again first in its sender's queue, and holds
        itself again if still early."""
        for identity in list(self._as_of_waiting):
            self._as_of_waiting.discard(identity)
            queue = self.held.get(identity)
            if queue and queue[0].op == "pull" and AS_OF in queue[0].meta:
                self._release(identity)

    # -- replication and the cluster view -----------------------------------------------------------
    def on_replicated(self, tokens: list) -> None:
        """Every replica acknowledged the updates of ``tokens`` (settled by the Replicator)."""
        for token in tokens:
            kind = type(token)
            if kind is tuple:
                self.acks.replicated(token)
            elif kind is RoundAck:
                for t in token.tokens:
                    self.acks.replicated(t)
            elif kind is PrecopyAck:  # every pre-copy of a migration is in place
                self.out.append((token.to, Message("migrate_ready", token.ts,
                                                   meta={KEY_COUNT: self.repl.rebuilder.last_copied})))

    def on_replica_reply(self, sid: int, msg: Message) -> None:
        """A message from replica ``sid`` (acks, a key list miss, a re-copy request)."""
        try:
            self.on_replicated(self.repl.on_reply(sid, msg))
        except PServerError as e:
            self.count(e)
            log.warning("malformed message from replica %d: %s", sid, e)

    def on_view(self, view: ClusterView) -> None:
        """A new cluster view: replication settings, dead peers, a newer ring; rounds and held
        "as of" pulls may now be complete (a worker left)."""
        self.replica.apply_deferred()  # a replica promoted to master serves all it acknowledged
        self.view = view
        self.replica.fenced = fenced_masters(view)
        self.on_replicated(self.repl.configure(view))
        if view.ring is not None:
            self.repl.adopt_ring(view.ring, False, self.tables)
        if self._prepare_held is not None:  # the view it waited for may be this one
            self.on_migrate(*self._prepare_held)
        self.filters.on_view(view)
        for identity in self.gate.learn(view):  # newcomers the view now names, in order
            self._release(identity)
        for name, group in self.rounds.tables():
            self._apply_rounds(name, group)
        self._recheck_as_of()


_EVICTED = object()  # the token of eviction forwards: their acks release nothing


def _ring_version(repl: Replicator) -> int:
    return repl.ring.version if repl.ring is not None else -1


def check_limits(keys: keyfmt.KeySet, table: Table, lim: Limits) -> None:
    """LimitError unless the keys of a request - a runs request only declares how many - and the
    rows they read or write fit this node's limits. Before anything is allocated for them."""
    if keys.keys is None and ((keys.lengths > lim.max_keys).any()  # checked first: the sum
                              or int(keys.lengths.sum()) > lim.max_keys):  # cannot wrap then
        raise LimitError(f"request declares more than {lim.max_keys} keys (PSERVER_MAX_KEYS)")
    if keys.n * table.dim * table.dtype.itemsize > lim.max_message_bytes:
        raise LimitError(f"{keys.n} keys x {table.dim} values exceed the message size limit of "
                         f"{lim.max_message_bytes} bytes (PSERVER_MAX_MESSAGE_BYTES)")


def origins(raw) -> list[tuple[int, object]]:
    """The (server, part id) pairs a resent part names (see Router.resend in kv/routing.py)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > 64 or not all(
            isinstance(o, list) and len(o) == 2 and type(o[0]) is int and type(o[1]) is int
            for o in raw):
        raise ProtocolError("meta 'orig' must be a list of [server id, part id] pairs")
    return [(o[0], o[1]) for o in raw]
