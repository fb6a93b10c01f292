"""The worker client: push and pull (key, value) vectors, asynchronously, by timestamp.

A request is split by the key ring into one message per server; the caller continues at once with a
timestamp, and ``wait(ts)`` returns when every server involved answered (merging pulled values into one
array). Messages are sent from the caller's thread (one DEALER per server, guarded by a lock) and replies
are read by whichever thread waits - there is no background I/O thread on the data path, so a round trip
costs no thread hand-offs. Callbacks run in the thread that makes progress (any call into the worker).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from .. import security
from ..config import Config
from ..errors import (
    DataLostError,
    DTypeError,
    InvalidKeysError,
    PServerError,
    RemoteError,
    RequestTimeoutError,
    SchedulerUnreachableError,
    ServerDeadError,
    TableError,
    ValueShapeError,
)
from ..membership.node import Membership
from ..store.spec import TableSpec
from ..transport import Transport, recv
from ..wire import Message
from . import keys as keyfmt
from .filtering import FILTER_META, WorkerFilters, heartbeat_reporter

log = logging.getLogger(__name__)

_ERRORS = {"TableError": TableError, "DataLostError": DataLostError}
_RETRY_AFTER = 0.01  # seconds before resending a part a server refused as not its own
_OPS = {"range": "pull_range", "declare": "declare_table", "pushpull": "push"}  # kind -> wire op


class _Part:
    """One message of a request: the keys ``sel`` of the request sent to server ``sid``."""

    __slots__ = ("sid", "sel", "rv", "orig", "refused_at", "refused_rv")

    def __init__(self, sid: int, sel, rv: int, orig: tuple = ()):
        self.sid = sid
        self.sel = sel                 # slice or index array into the request's keys
        self.rv = rv                   # ring version it was split with
        self.orig = orig               # resends: ((server, part id), ...) that may have applied it
        self.refused_at = 0.0          # WrongOwner: when, and the server's ring version
        self.refused_rv = -1


class _Request:
    """One push, pull, range pull or table declaration, until every part is answered. Plain slots:
    one is built per call on the hot path."""

    __slots__ = ("kind", "table", "keys", "vals", "rnd", "meta", "out", "parts", "waiting",
                 "ranges", "callback", "error", "result", "started", "clock")

    def __init__(self, kind: str, table: str = "default", keys: np.ndarray | None = None,
                 vals: np.ndarray | None = None, *, meta: dict | None = None,
                 out: np.ndarray | None = None, callback: Callable | None = None,
                 result: object = None, started: float = 0.0):
        self.kind = kind               # push | pull | pushpull | range | declare
        self.table = table
        self.keys = keys               # kept until acknowledged, to re-split after a failover
        self.vals = vals               # push values (n, cols), kept likewise (not copied)
        self.rnd: int | None = None    # synchronous round of a push
        self.meta = meta if meta is not None else {}
        self.out = out                 # pull: (n, dim) result buffer
        self.parts: dict[int, _Part] = {}
        self.waiting: set[int] = set()  # part ids not answered yet
        self.ranges: list[tuple[np.ndarray, np.ndarray]] = []
        self.callback = callback
        self.error: Exception | None = None
        self.result = result
        self.started = started
        self.clock: dict[int, int] | None = None  # pull with clock=True: node -> time reflected


class KVWorker:
    """A worker's connection to the cluster.

    Joins the cluster described by PSERVER_* variables (or ``cfg``/keyword overrides) and blocks until
    the scheduler admits it (SchedulerUnreachableError after PSERVER_CONNECT_TIMEOUT).
    """

    def __init__(self, cfg: Config | None = None, *,
                 credentials: security.Credentials | None = None, **overrides):
        self.cfg = cfg or Config.from_env(**overrides)
        self.transport = Transport(self.cfg, "worker", credentials)
        self.membership = Membership(self.cfg, self.transport, "worker", self.cfg.bind_host(), 0)
        self.membership.register(self.cfg.rank)
        self._identity = b"n%d" % self.membership.node_id
        self._lock = threading.RLock()
        self._last_ts = 0
        self._socks: dict[int, zmq.Socket] = {}
        self._sock_server: dict[zmq.Socket, int] = {}
        self._poller = zmq.Poller()
        self._pending: dict[int, _Request] = {}
        self._finished: dict[int, _Request] = {}   # completed, with a result or error not yet waited for
        self._tables: dict[str, TableSpec] = {"default": TableSpec(name="default")}
        self._rounds: dict[str, int] = {}
        self._rings = {}            # ring version -> KeyRing, for re-splitting after a change
        self._routed_rv = -1        # ring version of the last re-routing pass
        self._routed_view = -1      # view version of the last re-routing pass
        self._reroute_due = 0.0     # monotonic time of the next safety-net re-routing pass
        self._reroute_flag = False  # a part was refused or could not be sent: re-route soon
        self._ring = self.membership.view.ring   # the ring requests are being split with
        self._closed = False
        self.idle_timer = None      # an IdleTimer: time blocked in wait() counts as waiting_net
        self.filters = WorkerFilters(self)  # per-table filter chains (set_weights, flush)
        self.membership.traffic = heartbeat_reporter(self.transport.counters, self.filters.counters)
        atexit.register(self.close)

    # -- cluster facts ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This worker's rank, 0 .. num_workers-1."""
        return self.membership.rank

    @property
    def num_workers(self) -> int:
        return self.membership.view.num_workers

    @property
    def num_servers(self) -> int:
        return self.membership.view.num_servers

    def barrier(self, name: str = "", timeout: float | None = None) -> None:
        """Block until every live worker reached the barrier ``name`` (BarrierTimeoutError after
        ``timeout`` s, default PSERVER_BARRIER_TIMEOUT)."""
        self.membership.barrier(name, "worker", timeout)

    # -- tables -------------------------------------------------------------------------------
    def declare_table(self, name: str, dim: int = 1, dtype: str = "float32", init: str = "zeros",
                      seed: int = 0, updater: str = "sum", updater_args: dict | None = None,
                      sync: bool = False, push_filters: str = "", pull_filters: str = "") -> TableSpec:
        """Declare a table on every server (idempotent for an identical spec; TableError if the
        table exists with another spec). Returns the spec. push_filters / pull_filters: filter
        chains of the table's pushes / pulls (see docs/filters.md), e.g. "key_cache,compress"."""
        spec = TableSpec.from_json(TableSpec(name=name, dim=dim, dtype=dtype, init=init, seed=seed,
                                             updater=updater, updater_args=updater_args or {},
                                             sync=sync, push_filters=push_filters,
                                             pull_filters=pull_filters).to_json())
        with self._lock:
            ts = self._next_ts()
            req = _Request("declare", meta={"spec": spec.to_json()}, started=time.monotonic())
            self._pending[ts] = req
            for sid in self._all_servers():
                self._send_part(ts, req, sid, None)
        factor = self.wait(ts)
        if spec.push_factor is None and factor:  # a rule registered only on the servers
            spec.with_push_factor(factor)
        self._tables[name] = spec
        return spec

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
        "as of" pulls and staleness checks see it. Must contain the keys (InvalidKeysError).
        """
        spec = self._spec(table)
        keys = _check_keys(keys)
        vals = _check_vals(vals, len(keys), spec.push_cols, spec.dtype, "vals")
        span = _check_span(span, keys) if span is not None else None
        if spec.push_filters:
            self.filters.check(spec)
        return self._issue_push(spec, _Request("push", spec.name, keys, vals, callback=callback),
                                span)

    def _issue_push(self, spec: TableSpec, req: _Request, span: list[int] | None) -> int:
        """Send a push (or push_pull) request: its round, its parts; returns its timestamp."""
        with self._lock:
            self._check_usable()
            ts = self._next_ts()
            req.started = time.monotonic()
            if spec.sync:
                req.rnd = self._rounds.get(spec.name, 0)
                self._rounds[spec.name] = req.rnd + 1
            self._pending[ts] = req
            parts = self._split(req.keys)
            if span is not None:
                req.meta["span"] = span
            if spec.sync or span is not None:  # every server takes part (an empty push if need be)
                for sid in self._all_servers():
                    parts.setdefault(sid, slice(0, 0))
            for sid, sel in parts.items():
                self._send_part(ts, req, sid, sel)
            if not req.waiting:
                self._complete(ts, req)
        return ts

    def pull(self, keys: np.ndarray, table: str | None = None, out: np.ndarray | None = None,
             wait: bool = True, callback: Callable[[np.ndarray], None] | None = None,
             as_of: dict[int, int] | None = None, clock: bool = False):
        """Read the values of ``keys`` (never-written keys read as the table's initial value).

        Blocking form returns the values, shaped (n,) for dim 1 and (n, dim) otherwise. With
        ``wait=False`` returns a timestamp; ``wait(ts)`` then returns the values (also written into
        ``out`` when given).
        as_of: {worker node id: timestamp}: each server answers only once its copy of the keys
        reflects every listed worker's pushes up to that timestamp (paper: range vector clocks);
        workers that left are not waited for. clock=True: the result (and the callback's argument)
        is ``(values, vc)`` with vc = {worker node id: newest timestamp t such that the values
        reflect all of its pushes <= t} (-1: none).
        """
        spec = self._spec(table)
        keys = _check_keys(keys)
        n = len(keys)
        out = _check_out(out, n, spec)
        with self._lock:
            self._check_usable()
            ts = self._next_ts()
            req = _Request("pull", spec.name, keys, out=out.reshape(n, spec.dim), callback=callback,
                           result=out, started=time.monotonic())
            if as_of:
                req.meta["as_of"] = {str(int(k)): int(v) for k, v in as_of.items()}
            if clock:
                req.meta["vc"] = 1
            self._pending[ts] = req
            for sid, sel in self._split(keys).items():
                self._send_part(ts, req, sid, sel)
            if not req.waiting:
                self._complete(ts, req)
        return self.wait(ts) if wait else ts

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
        """
        spec = self._spec(table)
        if spec.push_filters or spec.pull_filters:
            self.push(keys, vals, table, span=span)
            return self.pull(keys, table, out=out, wait=wait, callback=callback)
        keys = _check_keys(keys)
        n = len(keys)
        vals = _check_vals(vals, n, spec.push_cols, spec.dtype, "vals")
        span = _check_span(span, keys) if span is not None else None
        out = _check_out(out, n, spec)
        ts = self._issue_push(spec, _Request("pushpull", spec.name, keys, vals,
                                             out=out.reshape(n, spec.dim), callback=callback,
                                             result=out), span)
        return self.wait(ts) if wait else ts

    def push_range(self, lo: int, hi: int, vals: np.ndarray, table: str | None = None) -> int:
        """Push values for every key lo <= k < hi (a dense range; vals holds (hi-lo)*cols entries)."""
        _check_range(lo, hi)
        return self.push(np.arange(lo, hi, dtype=np.uint64), vals, table)

    def pull_range(self, lo: int = 0, hi: int = 1 << 64, table: str | None = None,
                   wait: bool = True):
        """All stored entries with lo <= key < hi, as (keys, values) sorted by key."""
        _check_range(lo, hi)
        spec = self._spec(table)
        with self._lock:
            self._check_usable()
            ts = self._next_ts()
            req = _Request("range", spec.name, meta={"lo": int(lo), "hi": int(hi)},
                           started=time.monotonic())
            self._pending[ts] = req
            for sid in self._all_servers():
                self._send_part(ts, req, sid, None)
        return self.wait(ts) if wait else ts

    # -- completion -----------------------------------------------------------------------------
    def wait(self, ts: int, timeout: float | None = None):
        """Block until request ``ts`` completed; return its result (pulled values, (keys, values)
        for a range pull, None for a push). Raises the request's error, ServerDeadError when a server
        it waits on died, RequestTimeoutError after ``timeout`` (default PSERVER_REQUEST_TIMEOUT).
        With an ``idle_timer`` set, the time spent here counts as waiting_net."""
        if self.idle_timer is not None:
            with self.idle_timer.waiting_net():
                return self._wait(ts, timeout)
        return self._wait(ts, timeout)

    def _wait(self, ts: int, timeout: float | None):
        timeout = timeout if timeout is not None else (self.cfg.request_timeout or None)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                req = self._finished.pop(ts, None)
                if req is not None:
                    if req.error is not None:
                        raise req.error
                    return req.result
                pending = self._pending.get(ts)
                if pending is None:
                    if 0 < ts <= self._last_ts:
                        return None  # completed earlier and already collected
                    raise PServerError(f"unknown timestamp {ts}")
                self._progress(0.02)
                if ts in self._pending and self._reroute_needed():
                    self._reroute()
            if deadline is not None and time.monotonic() > deadline:
                servers = sorted({pending.parts[p].sid for p in pending.waiting})
                raise RequestTimeoutError(f"request {ts} got no reply within {timeout:g} s from "
                                          f"servers {servers}")

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait for every outstanding request (errors of un-waited requests are raised here)."""
        while True:
            with self._lock:
                ts = min(self._pending, default=None) or min(self._finished, default=None)
            if ts is None:
                return
            self.wait(ts, timeout)

    def _next_ts(self) -> int:
        self._last_ts += 1
        return self._last_ts

    def _progress(self, timeout: float) -> None:
        for sock, _ in self._poller.poll(timeout * 1000):
            sid = self._sock_server[sock]
            while (frames := recv(sock)) is not None:
                self._on_reply(sid, frames)

    def _on_reply(self, sid: int, frames: list) -> None:
        try:
            _, msg, _ = self.transport.decode(frames, routed=False)
        except PServerError as e:
            log.error("malformed reply from server %d dropped: %s", sid, e)
            return
        if msg.op == "acks":  # several acknowledgements in one message
            acks = msg.meta.get("a")
            if not isinstance(acks, list):
                log.error("malformed acks from server %d dropped", sid)
                return
            for entry in acks:
                if type(entry) is list and len(entry) == 2 and type(entry[0]) is int:
                    self._on_ack(sid, entry[0], entry[1])
            return
        self._on_message(sid, msg)

    def _on_ack(self, sid: int, ts: int, pid) -> None:
        """One acknowledged part of a push (the common reply, kept short)."""
        if self.filters.sent:  # a filtered push: its reply may ask for a resend
            self._on_message(sid, Message("ack", ts, meta={"p": pid}))
            return
        req = self._pending.get(ts)
        if req is None or pid not in req.waiting or req.parts[pid].sid != sid:
            return
        req.waiting.discard(pid)
        if not req.waiting:
            self._complete(ts, req)

    def _on_message(self, sid: int, msg: Message) -> None:
        req = self._pending.get(msg.ts)
        pid = msg.meta.get("p")
        if req is None or pid not in req.waiting or req.parts[pid].sid != sid:
            return
        part = req.parts[pid]
        if self.filters.sent or FILTER_META in msg.meta:
            msg = self.filters.on_reply((msg.ts, pid), sid, msg)
            if msg is None:  # a key-cache miss: the part was resent with its keys
                return
        try:
            if msg.op == "error":
                if msg.meta.get("kind") == "WrongOwnerError":
                    part.refused_at = time.monotonic()  # re-split and resend with a newer ring
                    part.refused_rv = int(msg.meta.get("rv", -1))
                    self._reroute_flag = True
                    return
                err = _ERRORS.get(msg.meta.get("kind"), RemoteError)
                req.error = err(f"server {sid}: {msg.meta.get('error')}")
            elif req.kind == "pull" or (req.kind == "pushpull" and msg.op == "vals"):
                req.out[part.sel] = msg.arrays[0]
                if "vc" in msg.meta:
                    req.clock = _merge_clock(req.clock, msg.meta["vc"])
            elif req.kind == "range":
                req.ranges.append((msg.arrays[0], msg.arrays[1]))
            elif req.kind == "declare" and "push_factor" in msg.meta:
                req.result = int(msg.meta["push_factor"])
        except (IndexError, ValueError) as e:
            req.error = RemoteError(f"server {sid} sent a reply that does not fit the request: {e}")
        req.waiting.discard(pid)
        if not req.waiting:
            self._complete(msg.ts, req)

    def _complete(self, ts: int, req: _Request) -> None:
        del self._pending[ts]
        if req.kind == "range" and req.error is None:
            spec_dim = req.ranges[0][1].shape[1] if req.ranges and req.ranges[0][1].ndim == 2 else 1
            keys = np.concatenate([k for k, _ in req.ranges]) if req.ranges else \
                np.empty(0, np.uint64)
            vals = np.concatenate([v for _, v in req.ranges]) if req.ranges else \
                np.empty((0, spec_dim))
            order = np.argsort(keys, kind="stable")
            vals = vals[order]
            req.result = (keys[order], vals[:, 0] if vals.ndim == 2 and vals.shape[1] == 1
                          else vals)
        if req.kind == "pull" and "vc" in req.meta and req.error is None:
            req.result = (req.result, req.clock or {})
        if req.callback is not None and req.error is None:
            try:
                req.callback(req.result) if req.kind in ("pull", "pushpull") else req.callback()
            except Exception:
                log.exception("callback of request %d raised", ts)
        if req.kind != "push" or req.error is not None:
            self._finished[ts] = req

    def _reroute_needed(self) -> bool:
        """Whether a re-routing pass may find work: the view changed since the last one, a part
        was refused or could not be sent, or - as a safety net - 50 ms went by."""
        return (self._reroute_flag or self.membership.view.version != self._routed_view
                or time.monotonic() >= self._reroute_due)

    def _reroute(self) -> None:
        """Failover on the worker side: resend every unanswered part whose server left the ring
        (died, or handed its keys over) or refused the keys, re-split with the current ring, in
        timestamp order so per-sender FIFO holds at the new owners. Servers drop the duplicates."""
        view = self.membership.view
        ring = self._ring = view.ring
        if self.membership.scheduler_lost.is_set():
            raise SchedulerUnreachableError("lost contact with the scheduler")
        lost = set(view.settings.get("lost", []))
        now = time.monotonic()
        self._routed_view, self._reroute_due, self._reroute_flag = view.version, now + 0.05, False
        for ts in sorted(self._pending):
            req = self._pending.get(ts)
            if req is None:
                continue
            for pid in sorted(req.waiting):
                part = req.parts[pid]
                gone = part.sid not in ring.servers
                refused = part.refused_at and now - part.refused_at > _RETRY_AFTER and \
                    ring.version >= part.refused_rv
                if part.refused_at and not refused:
                    self._reroute_flag = True  # refused: resent once the retry delay passed
                if not gone and not refused:
                    if part.sid in lost:
                        del self._pending[ts]
                        raise DataLostError(
                            f"server {part.sid} died and no replica holds its keys (servers lost: "
                            f"{sorted(lost)}); restore the cluster from the last checkpoint with "
                            f"`pserver scheduler --restore DIR`")
                    continue
                req.waiting.discard(pid)
                # a refused part was not applied; one whose server left may have been (and forwarded)
                may_have_applied = () if refused else ((part.sid, pid),)
                self._resend(ts, req, part, part.orig + may_have_applied, ring)
            if req.parts and not req.waiting and ts in self._pending:
                self._complete(ts, req)
        self._routed_rv = ring.version

    def _resend(self, ts: int, req: _Request, part: _Part, orig: tuple, ring) -> None:
        """Re-split one unanswered part with ``ring`` and send it again. ``orig`` names every
        (server, part id) that may have applied it: those servers, and the replicas they forwarded
        it to, recognise the resend as a duplicate."""
        if req.kind in ("declare", "range"):
            if req.kind == "range":  # answers were filtered by the old ring: ask everyone again
                req.ranges.clear()
                for pid in list(req.waiting):
                    req.waiting.discard(pid)
                for sid in self._all_servers():
                    self._send_part(ts, req, sid, None)
            elif part.sid in ring.servers:
                self._send_part(ts, req, part.sid, None)
            return
        idx = np.arange(len(req.keys))[part.sel]
        targets = dict(ring.split(req.keys[idx]))
        if req.rnd is not None:
            # a synchronous round resent: every server that took over the failed master's ranges
            # must hear from every worker, with an empty push if need be
            old = self._rings.get(part.rv)
            heirs = old.heirs(part.sid, ring) if old is not None else ring.servers
            for sid in heirs:
                targets.setdefault(sid, slice(0, 0))
        for sid, sel in targets.items():
            self._send_part(ts, req, sid, idx[sel], orig)

    def _check_usable(self) -> None:
        if self._closed:
            raise PServerError("this KVWorker is closed")
        if self.membership.scheduler_lost.is_set():
            raise SchedulerUnreachableError("lost contact with the scheduler; the cluster is gone")

    # -- routing --------------------------------------------------------------------------------
    def _split(self, keys: np.ndarray) -> dict[int, object]:
        """Split keys by server with the current ring, which then stamps the parts (the view may
        change under us at any moment: parts must name the ring they were split with)."""
        ring = self.membership.view.ring
        if ring.version != self._routed_rv and self._pending:
            self._reroute()
        self._ring = ring
        return dict(ring.split(keys))

    def _all_servers(self) -> list[int]:
        """Every server of the current ring (also makes it the ring that stamps the parts)."""
        self._ring = self.membership.view.ring
        return list(self._ring.servers)

    def _send_part(self, ts: int, req: _Request, sid: int, sel, orig: tuple = ()) -> None:
        """Send the part of request ``ts`` for server ``sid`` (keys ``sel``) and track it."""
        ring = self._ring
        self._rings.setdefault(ring.version, ring)
        pid = len(req.parts)
        req.parts[pid] = _Part(sid, sel, ring.version, orig)
        req.waiting.add(pid)
        spec = self._tables.get(req.table) if req.kind in ("push", "pull") else None
        if spec is not None and (spec.push_filters if req.kind == "push" else spec.pull_filters):
            vals = req.vals[sel] if req.kind == "push" else None  # the chain packs keys and values
            meta, arrays = self.filters.encode(sid, (ts, pid), spec, req.kind, req.keys[sel], vals)
            if req.rnd is not None:
                meta["rnd"] = req.rnd
        elif req.kind in ("push", "pull", "pushpull"):
            meta, arrays = keyfmt.pack_keys(req.keys[sel])
            if req.kind != "pull":
                arrays.append(req.vals[sel])
                if req.rnd is not None:
                    meta["rnd"] = req.rnd
                if req.kind == "pushpull":
                    meta["pp"] = 1  # reply with the values, not an acknowledgement
        else:
            meta, arrays = dict(req.meta), []
        if req.kind in ("push", "pull", "pushpull") and req.meta:
            meta.update(req.meta)  # span / as_of / vc
        meta["p"] = pid
        meta["rv"] = ring.version
        if orig:
            meta["orig"] = [list(o) for o in orig]
        op = _OPS.get(req.kind, req.kind)
        try:
            self._send(sid, Message(op, ts, req.table if req.kind != "declare" else "", meta, arrays))
        except ServerDeadError:
            self._reroute_flag = True  # stays waiting: re-routed once the ring drops that server

    def _send(self, sid: int, msg: Message) -> None:
        sock = self._socks.get(sid)
        if sock is None:
            node = self.membership.view.nodes.get(sid)
            if node is None or not node.alive:
                raise ServerDeadError(f"server {sid} is not alive")
            sock = self.transport.connect_dealer(node.host, node.port, "server", self._identity)
            self._socks[sid] = sock
            self._sock_server[sock] = sid
            self._poller.register(sock, zmq.POLLIN)
        self.transport.send(sock, msg)

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

    def close(self) -> None:
        """Wait briefly for outstanding requests, leave the cluster and release sockets."""
        if self._closed:
            return
        try:
            self.wait_all(timeout=10)
        except PServerError as e:
            log.warning("closing with a failed request: %s", e)
        self._closed = True
        self.membership.leave()
        self.membership.close()
        self.transport.close()
        atexit.unregister(self.close)

    def __enter__(self) -> KVWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_keys(keys) -> np.ndarray:
    if not isinstance(keys, np.ndarray):
        raise DTypeError(f"keys must be a numpy uint64 array, got {type(keys).__name__}; use "
                         f"np.asarray(keys, dtype=np.uint64)")
    if keys.dtype != np.uint64:
        raise DTypeError(f"keys must be uint64, got {keys.dtype}; use keys.astype(np.uint64)")
    if keys.ndim != 1:
        raise InvalidKeysError(f"keys must be 1-D, got shape {keys.shape}")
    if not keyfmt.sorted_unique(keys):
        raise InvalidKeysError("keys must be sorted and unique; use np.unique(keys), which sorts "
                               "and removes duplicates (and reorder the values the same way)")
    return np.ascontiguousarray(keys)


def _check_vals(vals, n: int, cols: int, dtype: str, what: str) -> np.ndarray:
    if not isinstance(vals, np.ndarray):
        raise DTypeError(f"{what} must be a numpy array, got {type(vals).__name__}")
    if vals.dtype != np.dtype(dtype):
        raise DTypeError(f"{what} have dtype {vals.dtype} but the table stores {dtype}; use "
                         f"{what}.astype(np.{dtype})")
    if vals.size != n * cols:
        raise ValueShapeError(f"{what} hold {vals.size} entries but {n} keys x {cols} columns = "
                              f"{n * cols} are needed")
    return np.ascontiguousarray(vals).reshape(n, cols)


def _check_out(out, n: int, spec: TableSpec) -> np.ndarray:
    """The result buffer of a read of n keys: ``out`` checked, or a new one ((n,) for dim 1)."""
    if out is None:
        return np.empty((n,) if spec.dim == 1 else (n, spec.dim), dtype=spec.dtype)
    if not isinstance(out, np.ndarray) or out.dtype != np.dtype(spec.dtype):
        raise DTypeError(f"out has dtype {getattr(out, 'dtype', type(out).__name__)}, table "
                         f"{spec.name!r} stores {spec.dtype}")
    if out.size != n * spec.dim or not out.flags.c_contiguous:
        raise ValueShapeError(f"out must be a C-contiguous array of {n}x{spec.dim} entries, got "
                              f"shape {out.shape}")
    return out


def _check_range(lo: int, hi: int) -> None:
    if not (isinstance(lo, int | np.integer) and isinstance(hi, int | np.integer)
            and 0 <= lo <= hi <= 1 << 64):
        raise InvalidKeysError(f"a key range needs integers 0 <= lo <= hi <= 2**64, got "
                               f"[{lo}, {hi})")


def _check_span(span, keys: np.ndarray) -> list[int]:
    try:
        lo, hi = (int(x) for x in span)
    except (TypeError, ValueError):
        raise InvalidKeysError(f"span must be a pair (lo, hi) of integers, got {span!r}") from None
    if not 0 <= lo < hi <= 1 << 64 or (len(keys) and not lo <= int(keys[0]) <= int(keys[-1]) < hi):
        raise InvalidKeysError(f"span [{lo}, {hi}) must be a key range within [0, 2**64) that "
                               "contains every pushed key")
    return [lo, hi]


def _merge_clock(have: dict[int, int] | None, vc) -> dict[int, int]:
    """Combine the range clocks of a pull's parts: the values reflect a worker only as far as
    every part does (a worker missing from a part: -1 there)."""
    part = {int(k): int(v) for k, v in vc.items()} if isinstance(vc, dict) else {}
    if have is None:
        return part
    return {n: min(have.get(n, -1), part.get(n, -1)) for n in have.keys() | part.keys()}
