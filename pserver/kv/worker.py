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
from dataclasses import dataclass, field

import numpy as np
import zmq

from .. import security
from ..config import Config
from ..errors import (
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
from ..transport import Transport
from ..wire import Message
from . import keys as keyfmt

log = logging.getLogger(__name__)

_ERRORS = {"TableError": TableError}


@dataclass
class _Request:
    kind: str                          # push | pull | range | declare
    waiting: set[int]                  # server ids that have not answered yet
    out: np.ndarray | None = None      # pull: (n, dim) result buffer
    parts: dict[int, object] = field(default_factory=dict)   # server id -> selector into out
    ranges: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    callback: Callable | None = None
    error: Exception | None = None
    result: object = None
    started: float = 0.0


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
        self._closed = False
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
                      sync: bool = False) -> TableSpec:
        """Declare a table on every server (idempotent for an identical spec; TableError if the
        table exists with another spec). Returns the spec."""
        spec = TableSpec.from_json(TableSpec(name=name, dim=dim, dtype=dtype, init=init, seed=seed,
                                             updater=updater, updater_args=updater_args or {},
                                             sync=sync).to_json())
        with self._lock:
            ts = self._next_ts()
            servers = self._all_servers()
            for sid in servers:
                self._send(sid, Message("declare_table", ts, meta={"spec": spec.to_json()}))
            self._pending[ts] = _Request("declare", set(servers), started=time.monotonic())
        self.wait(ts)
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
             callback: Callable[[], None] | None = None) -> int:
        """Send ``vals`` for ``keys`` to the servers; returns a timestamp at once.

        keys: 1-D uint64, sorted, unique. vals: the table's dtype, n*cols entries (flat, (n,) or
        (n, cols)), cols = dim (or 2*dim for curvature-carrying updaters such as l1_prox).
        """
        spec = self._spec(table)
        keys = _check_keys(keys)
        vals = _check_vals(vals, len(keys), spec.push_cols, spec.dtype, "vals")
        with self._lock:
            self._check_usable()
            ts = self._next_ts()
            parts = self._split(keys)
            if spec.sync:  # every server takes part in every round, with an empty push if need be
                rnd = self._rounds.get(spec.name, 0)
                self._rounds[spec.name] = rnd + 1
                for sid in self._all_servers():
                    parts.setdefault(sid, slice(0, 0))
            req = _Request("push", set(parts), callback=callback, started=time.monotonic())
            self._pending[ts] = req
            for sid, sel in parts.items():
                meta, arrays = keyfmt.pack_keys(keys[sel])
                if spec.sync:
                    meta["rnd"] = rnd
                arrays.append(vals[sel])
                self._send(sid, Message("push", ts, spec.name, meta, arrays))
        return ts

    def pull(self, keys: np.ndarray, table: str | None = None, out: np.ndarray | None = None,
             wait: bool = True, callback: Callable[[np.ndarray], None] | None = None):
        """Read the values of ``keys`` (never-written keys read as the table's initial value).

        Blocking form returns the values, shaped (n,) for dim 1 and (n, dim) otherwise. With
        ``wait=False`` returns a timestamp; ``wait(ts)`` then returns the values (also written into
        ``out`` when given).
        """
        spec = self._spec(table)
        keys = _check_keys(keys)
        n = len(keys)
        shape = (n,) if spec.dim == 1 else (n, spec.dim)
        if out is None:
            out = np.empty(shape, dtype=spec.dtype)
        else:
            if out.dtype != np.dtype(spec.dtype):
                raise DTypeError(f"out has dtype {out.dtype}, table {spec.name!r} stores "
                                 f"{spec.dtype}")
            if out.size != n * spec.dim or not out.flags.c_contiguous:
                raise ValueShapeError(f"out must be a C-contiguous array of {n}x{spec.dim} "
                                      f"entries, got shape {out.shape}")
        with self._lock:
            self._check_usable()
            ts = self._next_ts()
            parts = self._split(keys)
            req = _Request("pull", set(parts), out=out.reshape(n, spec.dim), parts=parts,
                           callback=callback, result=out, started=time.monotonic())
            self._pending[ts] = req
            for sid, sel in parts.items():
                meta, arrays = keyfmt.pack_keys(keys[sel])
                self._send(sid, Message("pull", ts, spec.name, meta, arrays))
            if not parts:
                self._complete(ts, req)
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
            servers = self._all_servers()
            req = _Request("range", set(servers), started=time.monotonic())
            self._pending[ts] = req
            for sid in servers:
                self._send(sid, Message("pull_range", ts, spec.name, {"lo": lo, "hi": hi}))
        return self.wait(ts) if wait else ts

    # -- completion -----------------------------------------------------------------------------
    def wait(self, ts: int, timeout: float | None = None):
        """Block until request ``ts`` completed; return its result (pulled values, (keys, values)
        for a range pull, None for a push). Raises the request's error, ServerDeadError when a server
        it waits on died, RequestTimeoutError after ``timeout`` (default PSERVER_REQUEST_TIMEOUT)."""
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
                if ts in self._pending:
                    self._check_alive(ts, pending)
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeoutError(f"request {ts} got no reply within {timeout:g} s from "
                                          f"servers {sorted(pending.waiting)}")

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
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_reply(self._sock_server[sock], frames)

    def _on_reply(self, sid: int, frames: list) -> None:
        try:
            _, msg, _ = self.transport.decode(frames, routed=False)
        except PServerError as e:
            log.error("malformed reply from server %d dropped: %s", sid, e)
            return
        req = self._pending.get(msg.ts)
        if req is None or sid not in req.waiting:
            return
        req.waiting.discard(sid)
        try:
            if msg.op == "error":
                err = _ERRORS.get(msg.meta.get("kind"), RemoteError)
                req.error = err(f"server {sid}: {msg.meta.get('error')}")
            elif req.kind == "pull":
                vals = msg.arrays[0]
                sel = req.parts[sid]
                if len(req.parts) == 1 and req.out is not None and vals.shape == req.out.shape:
                    req.out[...] = vals
                else:
                    req.out[sel] = vals
            elif req.kind == "range":
                req.ranges.append((msg.arrays[0], msg.arrays[1]))
        except (IndexError, ValueError) as e:
            req.error = RemoteError(f"server {sid} sent a reply that does not fit the request: {e}")
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
        if req.callback is not None and req.error is None:
            try:
                req.callback(req.result) if req.kind == "pull" else req.callback()
            except Exception:
                log.exception("callback of request %d raised", ts)
        if req.kind != "push" or req.error is not None:
            self._finished[ts] = req

    def _check_alive(self, ts: int, req: _Request) -> None:
        view = self.membership.view
        dead = [sid for sid in req.waiting if not view.alive(sid)]
        if dead:
            del self._pending[ts]
            raise ServerDeadError(f"server(s) {dead} died before answering request {ts}")
        if self.membership.scheduler_lost.is_set():
            raise SchedulerUnreachableError("lost contact with the scheduler")

    def _check_usable(self) -> None:
        if self._closed:
            raise PServerError("this KVWorker is closed")
        if self.membership.scheduler_lost.is_set():
            raise SchedulerUnreachableError("lost contact with the scheduler; the cluster is gone")

    # -- routing --------------------------------------------------------------------------------
    def _split(self, keys: np.ndarray) -> dict[int, object]:
        ring = self.membership.view.ring
        return dict(ring.split(keys))

    def _all_servers(self) -> list[int]:
        return [n.id for n in self.membership.view.role_nodes("server")]

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

    # -- misc -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Traffic of this worker: bytes and messages sent/received, in total and per op."""
        return self.transport.counters.to_json()

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
    if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
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


def _check_range(lo: int, hi: int) -> None:
    if not (isinstance(lo, int | np.integer) and isinstance(hi, int | np.integer)
            and 0 <= lo <= hi <= 1 << 64):
        raise InvalidKeysError(f"a key range needs integers 0 <= lo <= hi <= 2**64, got "
                               f"[{lo}, {hi})")
