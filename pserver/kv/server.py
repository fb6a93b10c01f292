"""The server node's loop: the only part of a server that does I/O. It polls its ROUTER link (requests)
and its links to replicas, hands each message of a burst to :class:`~pserver.kv.core.ServerCore` and
sends what the core returns - replies at once, acknowledgements and forwards batched per burst. The
loop is the only owner of the store: no locks on the data path (docs/design.md walks a push).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import numpy as np

from .. import security, wire
from ..config import Config
from ..errors import PServerError
from ..ft import checkpoint as ft_checkpoint
from ..ft.replication import Replicator
from ..link import Link, LinkError, Poller
from ..membership.node import Membership
from ..metrics import families as metric_families
from ..metrics import start_endpoint as start_metrics
from ..protocol import ERROR, REBUILT, REPLICA_APPLY_ERRORS, RIDS
from ..store import index as store_index
from ..store.apply import sum_parts
from ..store.updaters import FunctionUpdater, register_updater
from ..trace import Tracer, node_path, sampled
from ..transport import Transport
from ..wire import Batch, Message, RequestsRefused
from . import keys as keyfmt
from .core import ServerCore
from .traffic import heartbeat_reporter

log = logging.getLogger(__name__)

ACK_DELAY = 200e-6  # s: the longest a worker's ack waits in a burst for others to share its message
BURST = 1000        # requests per burst at most, so liveness checks run between bursts
CHUNK = 16          # requests received, then decoded, then served, as a chunk of a burst
CHUNK_BYTES = 256 * 1024  # a chunk stops growing once its requests hold this much


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
        self.router, self.port = self.transport.router_link(host, self.cfg.port)
        self.membership = Membership(self.cfg, self.transport, "server", self.cfg.advertised(host),
                                     self.port)
        self.repl = Replicator(self.transport, -1, self._peer_address)
        self.core = ServerCore(self.repl, self.transport.limits, self.cfg.slot_cache_bytes,
                               default_updater, secure=self.transport.creds.secure)
        self.core.stats = self.stats
        self.core.tables.set_budget(self.cfg.max_table_bytes_value)
        self.membership.traffic = heartbeat_reporter(self.transport.counters,
                                                     self.core.filters.counters)
        self.poller = Poller()
        self.poller.register(self.router)
        self._replicas: dict[Link, int] = {}  # link -> server id: the replica links polled
        self._stop = self._leaving = False
        self._drain_ts: int | None = None
        self._drain_deadline = 0.0
        self._view_version = 0
        self._handle = self.core.handle  # sampled.traced(core.handle) under PSERVER_TRACE
        self._trace: Tracer | None = None

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
                 self.membership.rank, self.membership.host, self.port)
        # SIGTERM = leave gracefully: hand the key ranges over (two-phase migration), then exit
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_leaving", True))
        self.repl.my_id = self.core.exactly_once.me = self.membership.node_id
        # started with `pserver scheduler --restore DIR`: load what this server holds before serving
        tables, clocks = ft_checkpoint.restore_for(
            self.membership.view, self.membership.node_id, self.cfg.slot_cache_bytes)
        self.core.tables.update(tables)
        self.core.tables.set_budget(self.cfg.max_table_bytes_value)
        self.core.clocks.clocks.update(clocks)
        self._on_view()
        metrics = None
        try:  # a trace path it cannot write or no free metrics port: it leaves, as on any error
            metrics = start_metrics(self.cfg, "server", self.transport.creds.secure,
                                    lambda: metric_families.of_server(self))
            if self.cfg.trace:
                nid = self.membership.node_id
                self._trace = Tracer(node_path(self.cfg.trace, "server", nid), f"server {nid}")
                self._handle = sampled(self.core.handle, self._trace)
            self._serve()
        finally:
            if metrics is not None:
                metrics.close()
            if self._trace is not None:
                self._trace.close()
            self.membership.leave()
            self.membership.close()
            self.transport.close()

    def _serve(self) -> None:
        core, repl, replica, membership = self.core, self.repl, self.core.replica, self.membership
        rebuilder = repl.rebuilder
        spin, busy_until, clock = self.cfg.busy_poll, 0.0, time.perf_counter
        while not self._stop:
            if len(self._replicas) != len(repl.links):
                self._watch_replicas()
            # Busy polling (PSERVER_BUSY_POLL): for a while after a request, poll without sleeping -
            # a wake-up from the kernel costs tens of microseconds here, more than the next
            # request takes to arrive when a worker keeps several in flight.
            busy = spin and clock() < busy_until
            ready = self.poller.poll(0 if busy or replica.deferred or rebuilder.has_work() else 0.1)
            if ready and spin:
                busy_until = clock() + spin
            if not ready and replica.deferred:  # nothing waiting: time to apply them
                replica.apply_deferred()
            if ready:
                self._burst(ready)
            if rebuilder.has_work():
                replica.apply_deferred()
                rebuilder.rebuild_step(core.tables)
            if core.out or core.acks.due:
                self._flush()
            membership.report[REBUILT] = rebuilder.rebuilt_version
            if replica.apply_errors:
                membership.report[REPLICA_APPLY_ERRORS] = replica.apply_errors
            if membership.view.version != self._view_version:
                self._on_view()
            if self._leaving and self._leave_step():
                return
            if membership.shutdown_requested.is_set():
                log.info("shutdown requested by the scheduler")
                return
            if membership.declared_dead.is_set():
                log.error("the scheduler declared this server dead (missed heartbeats) and moved "
                          "its key ranges to other servers: exiting")
                return
            if repl.fenced_by is not None:  # logged by the Replicator (ft/fencing.py)
                return
            if membership.scheduler_lost.is_set():
                log.error("scheduler lost: exiting so that no orphan server stays behind")
                return

    def _leave_step(self) -> bool:
        """One step of a graceful leave; True once the scheduler moved this server's ranges."""
        self.core.replica.apply_deferred()
        if self._drain_ts is None:
            log.warning("leaving: asking the scheduler to move this server's key ranges")
            self._drain_ts = self.membership.send_request("drain", {"id": self.membership.node_id})
            self._drain_deadline = time.monotonic() + 120
        msg = self.membership.read_reply()
        if msg is not None and msg.op == "drained" and msg.ts == self._drain_ts:
            log.warning("key ranges handed over: exiting")
            return True
        if msg is not None and msg.op == "error":
            log.error("the scheduler refused the graceful leave: %s", msg.meta.get(ERROR))
            return True
        return time.monotonic() > self._drain_deadline

    def _on_view(self) -> None:
        view = self.membership.view
        self._view_version = view.version
        self.core.on_view(view)
        self._watch_replicas()
        self._flush()

    def _watch_replicas(self) -> None:
        """Poll the links to replicas the Replicator opened; stop polling those it closed."""
        links = self.repl.links
        for sid, link in links.items():
            if link not in self._replicas:
                self._replicas[link] = sid
                self.poller.register(link)
        for link in [lk for lk, sid in self._replicas.items() if links.get(sid) is not lk]:
            del self._replicas[link]
            self.poller.unregister(link)

    # -- bursts ---------------------------------------------------------------------------------
    def _burst(self, ready: list) -> None:
        """Serve everything one poll found waiting, as one burst. Replicas' acks are read first:
        the worker acks they release then leave with the burst's first flush. Forwards to
        replicas and acks of forwards are collected and sent at the end (one message per peer)."""
        self.core.replica.acks_due = {}
        self.repl.begin_batch()
        try:
            for link in ready:
                if link is not self.router:
                    self._drain_replica(link)
            if self.router in ready:
                self._drain_requests()
        finally:
            self._end_burst()

    def _drain_requests(self) -> None:
        """Serve the requests waiting on the ROUTER link, up to BURST, in chunks of CHUNK
        requests (or CHUNK_BYTES): each chunk is received, then decoded, then served in order -
        phase by phase, so each phase's code stays warm in the CPU's caches across the chunk
        (docs/performance.md, "Serving a burst in chunks")."""
        recv, decode = self.router.recv, self._decode
        due = time.perf_counter() + ACK_DELAY
        for _ in range(BURST // CHUNK):
            got, size = [], 0
            # up to CHUNK_BYTES: what a chunk holds beyond PSERVER_RECV_QUEUE stays small, and a
            # large request (whose cost is its data) makes a chunk of its own
            while len(got) < CHUNK and size < CHUNK_BYTES and (item := recv()) is not None:
                got.append(item)
                size += sum(map(len, item[1]))
            if got:
                due = self._serve_chunk(got, [decode(frames) for _, frames in got], due)
            if len(got) < CHUNK and size < CHUNK_BYTES:
                return

    def _decode(self, frames: list) -> tuple | Exception:
        """(message, role) of a request's frames, or the error that refuses it (never raises)."""
        try:
            return self.transport.decode_body(frames)
        except PServerError as e:  # malformed: answered in order, never applied
            return e
        except Exception as e:
            log.exception("unexpected error decoding a request")
            return e

    def _serve_chunk(self, got: list, decoded: list, due: float) -> float:
        """Serve decoded requests in order; returns when the next acks are due. Replies leave at
        once; acks every ACK_DELAY: a worker with several requests in flight then issues new ones
        while this server works on the rest, instead of both taking turns (docs/design.md,
        "Acknowledgements", has the numbers)."""
        core, clock = self.core, time.perf_counter
        handle, out, acks, reject = self._handle, core.out, core.acks, core.reject
        send, encode = self.router.send_frames, wire.encode
        for (identity, _), d in zip(got, decoded):
            if type(d) is tuple:
                msg, role = d
                if type(msg) is Batch:  # coalesced requests: served in order, as if sent apart
                    for m in msg.messages:
                        handle(identity, m, role)
                else:
                    handle(identity, msg, role)
            elif isinstance(d, RequestsRefused):  # a batch's, or a sealed request's: each
                # request answered with the error, none applied
                for ts, part in d.requests:
                    reject(identity, ts, d, part)
                if not d.requests:
                    reject(identity, 0, d)
            else:
                reject(identity, 0, d)
            if out:  # the replies of this request: at once (inlined _send_out: the hot path)
                for to, reply in out:
                    try:
                        send(encode(reply), reply.op, to)
                    except LinkError as e:
                        log.debug("cannot reply to %r: %s", to[:16], e)
                out.clear()
            if acks.due and clock() >= due:
                self._send_out(acks.take())
                due = clock() + ACK_DELAY
        return due

    def _drain_replica(self, link) -> None:
        """Read what a replica sent this server (acks of forwards, misses, re-copy requests)."""
        sid = self._replicas[link]
        for msg in self.transport.messages(link, f"replica {sid}"):
            self.core.on_replica_reply(sid, msg)

    def _end_burst(self) -> None:
        """Send what the burst collected: acks of replicas' forwards (on this burst's forward to
        that master when there is one), the forwards, then the workers' acks."""
        core, repl = self.core, self.repl
        acks_due, core.replica.acks_due = core.replica.acks_due or {}, None
        for identity, rids in acks_due.items():
            if not repl.attach_acks(int(identity[1:]), rids):
                core.out.append((identity, Message(
                    "repl_ack", rids[0], meta={RIDS: rids} if len(rids) > 1 else None)))
        core.on_replicated(repl.flush())  # a replica that cannot be reached: stop waiting
        for identity, rids in repl.unsent_acks():  # their carrier could not be sent
            core.out.append((identity, Message("repl_ack", rids[0], meta={RIDS: rids})))
        self._flush()

    def _flush(self) -> None:
        self._send_out()
        if self.core.acks.due:
            self._send_out(self.core.acks.take())

    def _send_out(self, out: list | None = None) -> None:
        """Send replies (default: the core's ``out``, emptied); a peer gone is not an error here."""
        if out is None:
            out = self.core.out
        send, encode = self.router.send_frames, wire.encode  # Link.send, one call layer less
        for identity, msg in out:
            try:
                send(encode(msg), msg.op, identity)
            except LinkError as e:
                log.debug("cannot reply to %r: %s", identity[:16], e)
        out.clear()

    def _peer_address(self, sid: int) -> tuple[str, int]:
        node = self.membership.view.nodes.get(sid)
        if node is not None:
            return node.host, node.port
        if sid in self.repl.known_peers:  # a joining server announced by a migration
            return self.repl.known_peers[sid]
        raise PServerError(f"unknown server {sid}")

    def stats(self) -> dict:
        core, repl = self.core, self.repl
        return {"id": self.membership.node_id, "pid": os.getpid(), "errors": core.errors,
                "rejected": dict(core.rejections), "duplicates": core.duplicates,
                "replication": {**repl.stats(), "replica_apply_errors": core.replica.apply_errors},
                "tables": {n: {"keys": len(t), "bytes": t.nbytes(), "spec": t.spec.to_json(),
                               "slot_cache": t.slot_cache.stats(), **t.churn_stats()}
                           for n, t in core.tables.items()},
                "traffic": self.transport.counters.to_json(), "time": time.time(),
                "filters": core.filters.counters.to_json()}


def _warm_up() -> None:
    """Load the machine code of the kernels every request uses (numba's cache; ~0.3 s)."""
    try:
        store_index.warm_up()
        keyfmt.sorted_unique(np.arange(3, dtype=np.uint64))
        part = (np.arange(2, dtype=np.uint64), np.ones((2, 1), np.float32))
        sum_parts([part, (part[0] + 1, part[1])], 1)
    except Exception:  # only an optimisation: the first requests compile what is missing
        log.exception("warming up the store kernels failed")
