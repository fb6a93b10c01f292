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
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import zmq

from .. import security
from ..config import Config
from ..consistency.clock import RangeClock
from ..errors import ProtocolError, PServerError, TableError
from ..membership.node import Membership
from ..store.spec import TableSpec
from ..store.table import Table
from ..store.updaters import FunctionUpdater, register_updater
from ..transport import Transport
from ..wire import Message
from . import keys as keyfmt

log = logging.getLogger(__name__)


class _Round:
    """One synchronous-aggregation round of a table: every live worker's k-th push."""

    __slots__ = ("parts", "senders", "waiting")

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.senders: set[int] = set()
        self.waiting: list[tuple[bytes, int]] = []


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
            "default": Table(TableSpec(name="default", updater=default_updater))}
        self.rounds: dict[str, dict[int, _Round]] = {}
        self.held: dict[bytes, deque] = {}   # sender identity -> requests held behind a sync push
        self.clocks: dict[str, RangeClock] = {}  # table -> range vector clock of applied pushes
        self.errors = 0
        self.duplicates = 0
        self._stop = False
        self._view_version = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        """Register, then serve until the scheduler shuts the cluster down (or is lost)."""
        self.membership.register(self.cfg.rank)
        log.info("server %d (rank %d) serving on %s:%d", self.membership.node_id,
                 self.membership.rank, self.cfg.bind_host(), self.port)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop", True))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop:
                if poller.poll(100):
                    self._drain()
                if self.membership.view.version != self._view_version:
                    self._view_version = self.membership.view.version
                    self._recheck_rounds()
                if self.membership.shutdown_requested.is_set():
                    log.info("shutdown requested by the scheduler")
                    break
                if self.membership.scheduler_lost.is_set():
                    log.error("scheduler lost: exiting so that no orphan server stays behind")
                    break
        finally:
            self.membership.leave()
            self.membership.close()
            self.transport.close()

    def _drain(self) -> None:
        for _ in range(1000):  # bounded so liveness checks run between bursts
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_frames(frames)

    def _on_frames(self, frames: list) -> None:
        identity = bytes(frames[0].buffer)
        ts = 0
        try:
            _, msg, role = self.transport.decode(frames, routed=True)
            ts = msg.ts
            if self.transport.creds.secure and not security.authorise(msg.op, role, True):
                raise ProtocolError(f"a {role} may not send {msg.op!r} to a server")
            held = self.held.get(identity)
            if held is not None:
                held.append(msg)
            else:
                self._process(identity, msg)
        except PServerError as e:
            self._reject(identity, ts, e)
        except Exception as e:
            log.exception("unexpected error on a request")
            self._reject(identity, ts, e)

    def _reject(self, identity: bytes, ts: int, err: Exception) -> None:
        self.errors += 1
        log.warning("rejected a request from %r: %s", identity[:16], err)
        self._reply(identity, Message("error", ts, meta={"error": str(err)[:1000],
                                                         "kind": type(err).__name__}))

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
        if op == "push":
            table = self._table(msg.table)
            keys, vals = keyfmt.unpack_push(msg, table.spec.push_cols, table.dtype)
            sender = keyfmt.sender_id(identity)
            fresh = self._admit(table.spec.name, sender, keys, msg.ts)
            if fresh is False:  # a resend of an update already applied: acknowledge, apply nothing
                self.duplicates += 1
                self._reply(identity, Message("ack", msg.ts, meta={"dup": 1}))
                return
            if fresh is not True:
                keys = keyfmt.KeySet(keys=keys.as_array()[fresh])
                vals = vals[fresh]
            if table.spec.sync:
                self._aggregate(identity, msg, table, keys, vals)
                return
            keyfmt.apply_push(table, keys, vals)
            self._reply(identity, Message("ack", msg.ts))
        elif op == "pull":
            table = self._table(msg.table)
            keys = keyfmt.unpack_keys(msg)
            self._reply(identity, Message("vals", msg.ts, arrays=[keyfmt.apply_pull(table, keys)]))
        elif op == "pull_range":
            table = self._table(msg.table)
            lo, hi = keyfmt.range_bounds(msg.meta)
            k, v = table.range_items(lo, hi)
            self._reply(identity, Message("range", msg.ts, arrays=[k, v]))
        elif op == "declare_table":
            spec = TableSpec.from_json(msg.meta.get("spec"))
            self._declare(spec)
            self._reply(identity, Message("ok", msg.ts))
        elif op == "ping":
            self._reply(identity, Message("pong", msg.ts, meta={"id": self.membership.node_id}))
        elif op == "stats":
            self._reply(identity, Message("stats", msg.ts, meta=self.stats()))
        else:
            raise ProtocolError(f"unknown op {op!r} for a server")

    def _admit(self, table: str, sender: int, keys: keyfmt.KeySet, ts: int):
        """Range vector clock check of one push: True (all new), False (duplicate) or a mask."""
        if keys.n == 0:
            return True
        lo, hi = keys.span()
        return self.clocks.setdefault(table, RangeClock()).admit(sender, lo, hi, ts, keys.as_array)

    def _declare(self, spec: TableSpec) -> None:
        have = self.tables.get(spec.name)
        if have is None:
            self.tables[spec.name] = Table(spec)
            log.info("declared table %s", spec.to_json())
        elif have.spec != spec:
            raise TableError(f"table {spec.name!r} already exists with spec {have.spec.to_json()}; "
                             f"it was declared again as {spec.to_json()} - every worker must "
                             f"declare the same spec (or use another name)")

    # -- synchronous aggregation ----------------------------------------------------------------
    def _aggregate(self, identity: bytes, msg: Message, table: Table, keys, vals) -> None:
        sender = keyfmt.sender_id(identity)
        rnd = int(msg.meta.get("rnd", -1))
        if rnd < 0:
            raise ProtocolError("a push to a synchronous table must carry its round number")
        rounds = self.rounds.setdefault(table.spec.name, {})
        r = rounds.setdefault(rnd, _Round())
        if sender in r.senders:
            raise ProtocolError(f"duplicate push for round {rnd} of table {table.spec.name!r}")
        r.senders.add(sender)
        if keys.n:
            r.parts.append((keys.as_array(), vals))
        r.waiting.append((identity, msg.ts))
        self.held.setdefault(identity, deque())
        self._maybe_apply(table.spec.name, rnd)

    def _live_workers(self) -> set[int]:
        return {n.id for n in self.membership.view.role_nodes("worker")}

    def _maybe_apply(self, name: str, rnd: int) -> None:
        rounds = self.rounds.get(name, {})
        r = rounds.get(rnd)
        if r is None or not self._live_workers() <= r.senders:
            return
        # rounds complete in order: an earlier incomplete round blocks later ones
        if any(k < rnd for k in rounds):
            return
        del rounds[rnd]
        table = self.tables[name]
        if r.parts:
            keys, vals = keyfmt.sum_parts(r.parts, table.spec.push_cols)
            table.push(keys, vals)
        for identity, ts in r.waiting:
            self._reply(identity, Message("ack", ts))
        for identity, _ in r.waiting:
            self._release(identity)
        if rounds:
            self._maybe_apply(name, min(rounds))

    def _release(self, identity: bytes) -> None:
        """Process requests held behind a sender's sync push, in order, until another sync push of
        that sender has to wait again."""
        queue = self.held.pop(identity, None)
        while queue:
            msg = queue.popleft()
            try:
                self._process(identity, msg)
            except PServerError as e:
                self._reject(identity, msg.ts, e)
            except Exception as e:
                log.exception("unexpected error on a held request")
                self._reject(identity, msg.ts, e)
            if identity in self.held:  # blocked again: keep the rest behind it
                self.held[identity].extend(queue)
                return

    def _recheck_rounds(self) -> None:
        for name, rounds in list(self.rounds.items()):
            if rounds:
                self._maybe_apply(name, min(rounds))

    def stats(self) -> dict:
        return {"id": self.membership.node_id, "pid": os.getpid(), "errors": self.errors,
                "duplicates": self.duplicates,
                "tables": {n: {"keys": len(t), "bytes": t.nbytes(), "spec": t.spec.to_json()}
                           for n, t in self.tables.items()},
                "traffic": self.transport.counters.to_json(), "time": time.time()}
