"""The worker client: push and pull (key, value) vectors, asynchronously, by timestamp.

A request is split by the key ring into one message per server; the caller continues at once with a
timestamp, and ``wait(ts)`` returns when every server involved answered. This class issues requests
and waits; its parts do the rest, each under the worker's lock: kv/routing.py (split, re-route),
kv/messages.py (a part's message), kv/sending.py (links, coalescing, the flush thread),
kv/replies.py (read replies), kv/tracker.py (parts, completion). Replies are read by whichever
thread waits; callbacks run there. Walkthrough: docs/design.md ("one push, function by function").
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from .. import security
from ..config import Config
from ..errors import PServerError, RequestTimeoutError, SchedulerUnreachableError, TableError
from ..groups import DEFAULT as DEFAULT_GROUP
from ..groups import check_name as check_group
from ..membership.node import Membership
from ..metrics import LatencyHistograms
from ..metrics import families as metric_families
from ..metrics import start_endpoint as start_metrics
from ..protocol import AS_OF, CLOCK, GROUP, HI, LIMIT, LO, PUSHES, SEEN_WITHIN, SPAN, SPEC
from ..store.spec import TableSpec
from ..trace import Tracer, node_path
from ..transport import Transport
from .arguments import check_keys, check_out, check_range, check_span, check_vals
from .filtering import WorkerFilters
from .messages import PartEncoder
from .replies import ReplyReader
from .routing import Router
from .sending import Sender
from .tracker import Request, RequestTracker
from .traffic import heartbeat_reporter

log = logging.getLogger(__name__)


class KVWorker:
    """A worker's connection to the cluster.

    Joins the cluster described by PSERVER_* variables (or ``cfg``/keyword overrides) and blocks until
    the scheduler admits it. group: the worker group to join (default PSERVER_GROUP, else
    "default"): rank, num_workers, barriers, synchronous rounds and task queues are the group's.
    read_only: join as a read-only member (the group may then only read; docs/groups.md).
    trace: write a timeline of this worker's requests and waits to this file (Chrome trace JSON;
        default PSERVER_TRACE with ".worker-ID" inserted; docs/observability.md).

    Raises:
        SchedulerUnreachableError: no scheduler admitted the worker within PSERVER_CONNECT_TIMEOUT;
            nothing is left open.
        ConfigError: an invalid setting (e.g. a group name), a trace file that cannot be written,
            or no free port from PSERVER_METRICS_PORT on; nothing is left open.
        RemoteError: the scheduler refused (e.g. read_only for a group that has writers).
    """

    trace: Tracer | None = None                # the timeline, if asked for
    latency: LatencyHistograms | None = None   # request latencies, with PSERVER_METRICS_PORT
    _metrics = None                            # the /metrics endpoint

    def __init__(self, cfg: Config | None = None, *,
                 credentials: security.Credentials | None = None, group: str | None = None,
                 read_only: bool | None = None, trace: str | None = None, **overrides):
        self.cfg = cfg or Config.from_env(**overrides)
        if group is not None or read_only is not None:
            self.cfg = self.cfg.with_(group=check_group(group or self.cfg.group),
                                      read_only=bool(self.cfg.read_only or read_only))
        self.transport = Transport(self.cfg, "worker", credentials)
        self.membership = Membership(self.cfg, self.transport, "worker",
                                     self.cfg.advertised(self.cfg.bind_host()), 0)
        try:
            self.membership.register(self.cfg.rank)
        except BaseException:  # e.g. a refused read-only registration: leave nothing open
            self.transport.close()
            raise
        self._lock = threading.RLock()
        self._tracker = RequestTracker()
        self._tables: dict[str, TableSpec] = {"default": TableSpec(name="default")}
        self._read_only: set[str] = set()  # tables declared with pushes=False
        self._rounds: dict[str, int] = {}
        self._closed = False
        self.idle_timer = None      # an IdleTimer: time blocked in wait() counts as waiting_net
        self._assemble(Sender(self.membership, self.transport, b"n%d" % self.membership.node_id,
                              self._lock, self.cfg.coalesce))
        self.membership.traffic = heartbeat_reporter(self.transport.counters, self.filters.counters)
        try:
            self._observe(trace)
        except BaseException:  # e.g. an unwritable trace path: leave nothing open
            if self.trace is not None:
                self.trace.close()
            self.membership.leave()
            self.membership.close()
            self.transport.close()
            raise
        atexit.register(self.close)

    def _assemble(self, sender: Sender) -> None:
        """Build the worker's parts around ``sender`` (a unit test passes one that records). The
        steps of the hot path are kept as bound methods, so a push calls them with no layer."""
        self._sender, self._outbox = sender, sender.outbox
        self._send, self._flush_held = sender.send, sender.flush_held
        # per-table filter chains (set_weights, select_all); resends go out through the sender
        self.filters = WorkerFilters(sender.send, self._tracker.pending)
        self._parts = PartEncoder(self._tables, self.filters)
        self._router = Router(self.membership, self._tracker, self.filters, sender, self._parts)
        self._replies = ReplyReader(self.cfg, self.transport, self._tracker, self.filters, sender,
                                    self._parts)
        self._message, self._split = self._parts.message, self._router.split
        self._progress = self._replies.progress

    def _observe(self, trace: str | None) -> None:
        """Latency histograms and /metrics (PSERVER_METRICS_PORT), the timeline (trace): each off
        unless asked for, and then only a None check on the request path."""
        nid = self.membership.node_id
        path = trace or (node_path(self.cfg.trace, "worker", nid) if self.cfg.trace else None)
        self.trace = Tracer(path, f"worker {nid} (rank {self.rank})") if path else None
        self.latency = LatencyHistograms() if self.cfg.metrics_port else None
        if self.latency is not None or self.trace is not None:
            self._tracker.on_complete = self._completed
        self._metrics = start_metrics(self.cfg, "worker", self.transport.creds.secure,
                                      lambda: metric_families.of_worker(self))

    def _completed(self, ts: int, req: Request) -> None:
        if not req.started:  # not a timed request (e.g. declare_table)
            return
        seconds = time.monotonic() - req.started
        if self.latency is not None:
            self.latency.observe(req.kind, seconds)
        if self.trace is not None:
            self.trace.request(req.kind, req.started, seconds, ts)

    # -- cluster facts ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This worker's rank within its group, 0 .. num_workers-1."""
        return self.membership.rank

    @property
    def group(self) -> str:
        """The worker group this worker belongs to."""
        return self.cfg.group

    @property
    def num_workers(self) -> int:
        """Live workers of this worker's group."""
        return len(self.membership.view.group_nodes(self.cfg.group))

    @property
    def num_servers(self) -> int:
        return self.membership.view.num_servers

    def barrier(self, name: str = "", timeout: float | None = None) -> None:
        """Block until every live worker of this worker's group reached the barrier ``name``
        (barriers of other groups are separate, even under the same name).

        Raises:
            BarrierTimeoutError: not every worker arrived within ``timeout`` s (default
                PSERVER_BARRIER_TIMEOUT); this worker is no longer counted at the barrier.
            SchedulerUnreachableError: the scheduler is gone.
        """
        with self._lock:  # requests issued before the barrier leave before it
            self._flush_held()
        self.membership.barrier(name, "worker", timeout)

    # -- tables -------------------------------------------------------------------------------
    def declare_table(self, name: str, dim: int = 1, dtype: str = "float32", init: str = "zeros",
                      seed: int = 0, updater: str = "sum", updater_args: dict | None = None,
                      sync: bool = False, push_filters: str = "", pull_filters: str = "",
                      pushes: bool = True, admit_after: int = 0, admit_prob: float = 1.0,
                      ttl_steps: int = 0, ttl_seconds: float = 0.0) -> TableSpec:
        """Declare a table on every server (idempotent for an identical spec). Returns the spec.

        push_filters / pull_filters: filter chains of the table's pushes / pulls (see
        docs/filters.md), e.g. "key_cache,compress". pushes=False: this worker only reads the
        table, so a synchronous round does not wait for it (its pushes raise TableError).
        Synchronous tables: the servers answer with their next round number, and this worker's
        pushes join from there (a worker that already pushes the table keeps its own round
        count when it declares it again). Workers of a sync job should all declare before anyone pushes
        (e.g. ``kv.barrier()`` after declaring); a worker that declares later joins from the
        next round. admit_after / admit_prob / ttl_steps / ttl_seconds: admission and eviction of
        rows (pserver.TableSpec; docs/torch.md).

        Raises:
            TableError: the table exists with another spec (nothing changed on the servers).
            ConfigError / LimitError: an invalid spec (nothing was sent).
            RequestTimeoutError: a server did not answer within PSERVER_REQUEST_TIMEOUT; the table
                may exist on some servers: declare it again.
            PServerError: the worker is closed.
        """
        spec = TableSpec.from_json(TableSpec(name=name, dim=dim, dtype=dtype, init=init, seed=seed,
                                             updater=updater, updater_args=updater_args or {},
                                             sync=sync, push_filters=push_filters,
                                             pull_filters=pull_filters, admit_after=admit_after,
                                             admit_prob=admit_prob, ttl_steps=ttl_steps,
                                             ttl_seconds=ttl_seconds).to_json())
        meta = {SPEC: spec.to_json()}
        if not pushes:
            meta[PUSHES] = False
        if self.cfg.group != DEFAULT_GROUP:  # a server whose view lags learns the round's group
            meta[GROUP] = self.cfg.group
        ts = self._issue_to_all(Request("declare", meta=meta, result={}), None)
        answer = self.wait(ts)
        factor = answer.get("push_factor")
        if spec.push_factor is None and factor:  # a rule registered only on the servers
            spec.with_push_factor(factor)
        with self._lock:
            # a pusher declaring again keeps its own count: the servers still wait for its next
            # round, while their reply names the next round not begun (taking that would skip one)
            was_pusher = name in self._tables and name not in self._read_only
            self._tables[name] = spec
            if pushes:
                self._read_only.discard(name)
            else:
                self._read_only.add(name)
            if sync and "round" in answer and not (pushes and was_pusher):
                self._rounds[name] = max(self._rounds.get(name, 0), answer["round"])
        return spec

    def next_round(self, table: str | None = None) -> int:
        """The synchronous round this worker's next push to ``table`` belongs to (a late joiner
        starts at the round its declaration's reply named). Raises TableError if the table is
        not declared here or not synchronous."""
        spec = self._spec(table)
        if not spec.sync:
            raise TableError(f"table {spec.name!r} is not synchronous: it has no rounds")
        with self._lock:
            return self._rounds.get(spec.name, 0)

    def _spec(self, table: str | None) -> TableSpec:
        name = table or "default"
        spec = self._tables.get(name)
        if spec is None:
            raise TableError(f"table {name!r} is not declared: call kv.declare_table({name!r}, "
                             f"dim=..., ...) first")
        return spec

    # -- push / pull ----------------------------------------------------------------------------
    def push(self, keys: np.ndarray, vals: np.ndarray, table: str | None = None,
             callback: Callable[[], None] | None = None, span: tuple[int, int] | None = None) -> int:
        """Send ``vals`` for ``keys`` to the servers; returns a timestamp at once.

        keys: 1-D uint64, sorted, unique. vals: the table's dtype, n*cols entries (flat, (n,) or
        (n, cols)), cols = dim (or 2*dim for curvature-carrying updaters such as l1_prox).
        span: the key range [lo, hi) this push stands for (paper: keys of the range missing from
        the message get its timestamp too); every server's range clock then covers all of it, so
        "as of" pulls and staleness checks see it. callback: called with no argument once every
        server acknowledged (the request is then forgotten: ``wait(ts)`` returns None).

        Raises (nothing was sent, no timestamp was used for a request, filter residuals may
        hold the values of earlier parts of this push when a filter raised):
            DTypeError / ValueShapeError / InvalidKeysError: keys or values not as described.
            TableError: the table is not declared, or was declared with pushes=False.
            ConfigError: a push filter lacks something it needs (e.g. set_weights).
            SchedulerUnreachableError: the cluster is gone. PServerError: the worker is closed.
        Errors of the servers (and DataLostError) are raised by ``wait(ts)``.
        """
        spec = self._spec(table)
        keys = check_keys(keys)
        vals = check_vals(vals, len(keys), spec.push_cols, spec.dtype, "vals")
        if span is None and not spec.push_filters and not spec.sync:
            return self._issue_plain_push(spec.name, keys, vals, callback)
        span = check_span(span, keys) if span is not None else None
        if spec.push_filters:
            self.filters.check(spec)
        return self._issue_push(spec, Request("push", spec.name, keys, vals, callback=callback),
                                span)

    def _issue_plain_push(self, name: str, keys: np.ndarray, vals: np.ndarray, callback) -> int:
        """``_issue_push`` of a push without filters, span or rounds - the common one - in one
        step: its parts' frames are built straight from the arrays (``PartEncoder.push_frames``)
        and go to the sender already encoded (docs/performance.md)."""
        with self._lock:
            self._check_pushable(name)
            tracker = self._tracker
            ts = tracker.next_ts()
            req = Request("push", name, keys, vals, callback=callback, started=time.monotonic())
            parts = self._split(keys)
            rv = self._router.ring.version
            frames_of = self._parts.push_frames
            out = [(sid, frames_of(ts, req, req.add_part(sid, sel, rv))) for sid, sel in parts.items()]
            tracker.register(ts, req)
            send = self._sender.send_frames
            for sid, frames in out:
                send(sid, ts, frames, "push")
        return ts

    def _issue_push(self, spec: TableSpec, req: Request, span: list[int] | None) -> int:
        """Encode a push (or push_pull) request's parts, then track and send them; returns its
        timestamp. Registered only once every part is encoded: an encoding error leaves nothing
        behind."""
        with self._lock:
            self._check_pushable(spec.name)
            ts = self._tracker.next_ts()
            req.started = time.monotonic()
            if spec.sync:
                req.rnd = self._rounds.get(spec.name, 0)
            parts = self._split(req.keys)
            if span is not None:
                req.meta[SPAN] = span
            if spec.sync or span is not None:  # every server takes part (an empty push if need be)
                for sid in self._router.all_servers():
                    parts.setdefault(sid, slice(0, 0))
            rv = self._router.ring.version
            msgs = [(sid, self._message(ts, req, req.add_part(sid, sel, rv)))
                    for sid, sel in parts.items()]
            if spec.sync:
                self._rounds[spec.name] = req.rnd + 1
            self._tracker.register(ts, req)
            for sid, msg in msgs:
                self._send(sid, msg)
        return ts

    def pull(self, keys: np.ndarray, table: str | None = None, out: np.ndarray | None = None,
             wait: bool = True, callback: Callable[[np.ndarray], None] | None = None,
             as_of: dict[int, int] | None = None, clock: bool = False):
        """Read the values of ``keys`` (never-written keys read as the table's initial value).

        Blocking form returns the values, shaped (n,) for dim 1 and (n, dim) otherwise. With
        ``wait=False`` returns a timestamp; ``wait(ts)`` then returns the values (also written into
        ``out`` when given). callback: called with the values once they are all here (the
        request is then forgotten: ``wait(ts)`` returns None, ``out`` holds them).
        as_of: {worker node id: timestamp}: each server answers only once its copy of the keys
        reflects every listed worker's pushes up to that timestamp (paper: range vector clocks);
        workers that left are not waited for. clock=True: the result (and the callback's argument)
        is ``(values, vc)`` with vc = {worker node id: newest timestamp t such that the values
        reflect all of its pushes <= t} (-1: none).

        Raises:
            DTypeError / ValueShapeError / InvalidKeysError / TableError: bad arguments (nothing
                was sent).
            LimitError: (blocking form, or at wait) a reply exceeds this worker's limits
                (PSERVER_MAX_MESSAGE_BYTES / PSERVER_MAX_KEYS): pull fewer keys at a time.
            RequestTimeoutError, RemoteError, DataLostError: as ``wait``; ``out`` may then hold
                the values of some servers only.
        """
        spec = self._spec(table)
        keys = check_keys(keys)
        n = len(keys)
        out = check_out(out, n, spec)
        with self._lock:
            self._check_usable()
            ts = self._tracker.next_ts()
            req = Request("pull", spec.name, keys, out=out.reshape(n, spec.dim),
                          callback=None if wait else callback, result=out,
                          started=time.monotonic())
            if as_of:
                req.meta[AS_OF] = {str(int(k)): int(v) for k, v in as_of.items()}
            if clock:
                req.meta[CLOCK] = 1
            parts = self._split(keys)
            rv = self._router.ring.version
            msgs = [(sid, self._message(ts, req, req.add_part(sid, sel, rv)))
                    for sid, sel in parts.items()]
            self._tracker.register(ts, req)
            for sid, msg in msgs:
                self._send(sid, msg)
        if not wait:
            return ts
        result = self.wait(ts)
        if callback is not None:
            callback(result)
        return result

    def push_pull(self, keys: np.ndarray, vals: np.ndarray, table: str | None = None,
                  out: np.ndarray | None = None, wait: bool = True,
                  callback: Callable[[np.ndarray], None] | None = None,
                  span: tuple[int, int] | None = None):
        """Push ``vals`` for ``keys``, then read the keys' values once the push is applied - in a
        synchronous table, once its round is - in one round trip per server (the reply carries
        the values instead of an acknowledgement). The same as ``push`` followed by ``pull`` of
        the same keys (which per-sender order already makes see the push), at half the messages.

        Arguments as for push and pull; returns the values (or, with ``wait=False``, a timestamp
        whose ``wait`` returns them). Tables with push or pull filters take the two requests.

        Raises: as ``push`` for bad arguments (nothing sent) and as ``wait`` once sent: after a
        RequestTimeoutError the push may or may not have been applied.
        """
        spec = self._spec(table)
        if spec.push_filters or spec.pull_filters:
            self.push(keys, vals, table, span=span)
            return self.pull(keys, table, out=out, wait=wait, callback=callback)
        keys = check_keys(keys)
        n = len(keys)
        vals = check_vals(vals, n, spec.push_cols, spec.dtype, "vals")
        span = check_span(span, keys) if span is not None else None
        out = check_out(out, n, spec)
        ts = self._issue_push(spec, Request("pushpull", spec.name, keys, vals,
                                            out=out.reshape(n, spec.dim),
                                            callback=None if wait else callback, result=out),
                              span)
        if not wait:
            return ts
        result = self.wait(ts)
        if callback is not None:
            callback(result)
        return result

    def push_range(self, lo: int, hi: int, vals: np.ndarray, table: str | None = None) -> int:
        """Push values for every key lo <= k < hi (a dense range; vals holds (hi-lo)*cols entries).

        Raises: InvalidKeysError for a bad range, otherwise as ``push``.
        """
        check_range(lo, hi)
        return self.push(np.arange(lo, hi, dtype=np.uint64), vals, table)

    def pull_range(self, lo: int = 0, hi: int = 1 << 64, table: str | None = None,
                   wait: bool = True, seen_within: int | None = None):
        """All stored entries with lo <= key < hi, as (keys, values) sorted by key; with
        ``seen_within`` T only those pushed during the table's last T pushes on their server.

        Asked in pages that fit this worker's limits: each server is asked for at most a page of
        entries ("limit"; a server that answers with more is asked again for halves of the range).

        Raises:
            InvalidKeysError / TableError: bad arguments (nothing was sent).
            LimitError: a single entry exceeds this worker's limits.
            RequestTimeoutError, RemoteError, DataLostError: as ``wait``.
        """
        check_range(lo, hi)
        spec = self._spec(table)
        row = 8 + spec.dim * np.dtype(spec.dtype).itemsize
        limit = max(1, min(self.cfg.max_keys, (self.cfg.max_message_bytes - 1024) // row))
        meta = {LO: int(lo), HI: int(hi), LIMIT: limit}
        if seen_within is not None:
            meta[SEEN_WITHIN] = int(seen_within)
        ts = self._issue_to_all(Request("range", spec.name, meta=meta), (int(lo), int(hi)))
        return self.wait(ts) if wait else ts

    def _issue_to_all(self, req: Request, sel) -> int:
        """Track ``req`` and send a part of it (``sel``) to every server of the ring; returns its
        timestamp. Raises PServerError if the worker is closed (nothing sent, nothing tracked)."""
        with self._lock:
            self._check_usable()
            ts = self._tracker.next_ts()
            req.started = time.monotonic()
            servers = self._router.all_servers()
            rv = self._router.ring.version
            msgs = [self._parts.encode_part(ts, req, sid, sel, rv) for sid in servers]
            self._tracker.register(ts, req)
            for sid, msg in msgs:
                self._send(sid, msg)
        return ts

    def flush(self, table: str | None = None) -> int | None:
        """Push everything the select filters of ``table`` hold back (significant's residuals),
        for every server; returns the push's timestamp, or None if nothing is held. On a
        synchronous table every worker must flush in the same round. ``close`` flushes every
        asynchronous table.

        Raises: TableError if the table is not declared; otherwise as ``push`` (the held-back
        values are then pushed by none and lost).
        """
        spec = self._spec(table)
        if not spec.push_filters:
            return None
        with self._lock:  # no push of this worker may add to the residuals meanwhile
            held = self.filters.take_held(spec)
            if held is None:
                return None
            self.filters.select_all(spec.name)
            try:
                return self.push(held[0], held[1], table=spec.name)
            finally:
                self.filters.select_all(spec.name, False)

    # -- completion -----------------------------------------------------------------------------
    def wait(self, ts: int, timeout: float | None = None):
        """Block until request ``ts`` completed; return its result (pulled values, (keys, values)
        for a range pull, None for a push, for a request with a callback and for one waited for
        already). With an ``idle_timer`` set, the time spent here counts as waiting_net.

        Raises (the request is forgotten, except after a timeout):
            RemoteError / TableError: a server refused the request; other servers may have
                applied their parts of a push.
            DataLostError: a server the request waited on died with no replica of its keys.
            LimitError: a reply exceeds this worker's limits (the request failed).
            RequestTimeoutError: no complete answer within ``timeout`` (default
                PSERVER_REQUEST_TIMEOUT; none by default). The request stays pending and may still
                complete: a push may or may not have been applied; wait again or give up.
            SchedulerUnreachableError: the cluster is gone.
            PServerError: ``ts`` was never issued.
        """
        if self.idle_timer is not None or self.trace is not None:
            return self._wait_observed(ts, timeout)
        return self._wait(ts, timeout)

    def _wait_observed(self, ts: int, timeout: float | None):
        """``_wait`` counted as waiting_net by the idle timer and traced as a "wait" span."""
        start = time.monotonic()
        try:
            if self.idle_timer is None:
                return self._wait(ts, timeout)
            with self.idle_timer.waiting_net():
                return self._wait(ts, timeout)
        finally:
            if self.trace is not None:
                self.trace.span("wait", start, time.monotonic() - start, None, {"ts": ts})

    def _wait(self, ts: int, timeout: float | None):
        timeout = timeout if timeout is not None else (self.cfg.request_timeout or None)
        deadline = None if timeout is None else time.monotonic() + timeout
        tracker = self._tracker
        while True:
            with self._lock:
                try:
                    req = tracker.collect(ts)
                except KeyError:
                    raise PServerError(f"unknown timestamp {ts}") from None
                if req is not None:
                    if req.error is not None:
                        raise req.error
                    return req.result
                pending = tracker.pending.get(ts)
                if pending is None:
                    return None  # completed earlier and already collected (or delivered)
                if self._outbox.holds(ts):
                    self._flush_held()
                self._progress(0.02)
                if ts in tracker.pending and self._router.needed():
                    self._router.reroute()
            if deadline is not None and time.monotonic() > deadline:
                servers = sorted({pending.parts[p].sid for p in pending.waiting})
                raise RequestTimeoutError(f"request {ts} got no reply within {timeout:g} s from "
                                          f"servers {servers}")

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait for every outstanding request.

        Raises: the first error of any request not waited for yet (as ``wait``; that request is
        forgotten, the later ones are not waited for: call again to go on).
        """
        while True:
            with self._lock:
                ts = self._tracker.oldest()
            if ts is None:
                return
            self.wait(ts, timeout)

    def _check_usable(self) -> None:
        if self._closed:
            raise PServerError("this KVWorker is closed")

    def _check_pushable(self, name: str) -> None:
        self._check_usable()
        if name in self._read_only:
            raise TableError(f"table {name!r} was declared with pushes=False: declare it again "
                             f"with pushes=True before pushing to it")
        if self.membership.scheduler_lost.is_set():
            raise SchedulerUnreachableError("lost contact with the scheduler; the cluster is gone")

    def tasks(self, app: str | None = None, model: str | None = None, **kw):
        """An Executor running this worker's tasks of application ``app`` under a consistency
        model (see pserver.consistency.executor); its IdleTimer becomes ``idle_timer``."""
        from ..consistency.executor import Executor

        return Executor(self, model, app=app, **kw)

    # -- misc -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Traffic of this worker: bytes and messages sent/received, in total and per op, and
        under "filters" bytes and pairs per message kind before/after each filter."""
        return {**self.transport.counters.to_json(), "filters": self.filters.counters.to_json()}

    def tracked(self) -> int:
        """Requests this worker holds: pending, or finished with a result or error not yet
        received through ``wait``."""
        with self._lock:
            return len(self._tracker)

    def close(self) -> None:
        """Push what filters hold back (asynchronous tables), wait up to 10 s for outstanding
        requests, leave the cluster and release sockets. Idempotent; never raises for a failed
        request (it is logged): requests still pending are abandoned."""
        if self._closed:
            return
        for name, spec in list(self._tables.items()):
            if spec.push_filters and name not in self._read_only:
                try:
                    if spec.sync:
                        if self.filters.holds(spec):
                            log.warning("closing with values held back by the filters of "
                                        "synchronous table %r: call kv.flush(%r) in a round every "
                                        "worker flushes", name, name)
                    else:
                        self.flush(name)
                except PServerError as e:
                    log.warning("closing: flushing table %r failed: %s", name, e)
        try:
            self.wait_all(timeout=10)
        except PServerError as e:
            log.warning("closing with a failed request: %s", e)
        with self._lock:  # the flush thread sends under the lock: none after this
            self._closed = True
            self._sender.close()
        self.membership.leave()
        self.membership.close()
        self.transport.close()
        if self._metrics is not None:
            self._metrics.close()
        if self.trace is not None:
            self.trace.close()
        atexit.unregister(self.close)

    def __enter__(self) -> KVWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
