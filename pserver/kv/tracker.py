"""The worker's request tracker (ps-lite's Customer): parts, completion and re-route decisions.

Pure bookkeeping, no sockets: :class:`KVWorker` slices, encodes and sends; this records each
request's parts, applies the replies to them, completes requests (merging range pulls, running
callbacks) and decides which parts a ring change or a refusal makes resend. Walkthrough of one
request: docs/design.md ("one push, function by function").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..errors import DataLostError, LimitError, ReadOnlyGroupError, RemoteError, TableError
from ..protocol import CLOCK, ERROR, KIND, NEXT, PUSH_FACTOR, RING_VERSION, ROUND
from ..wire import Message

log = logging.getLogger(__name__)

_ERRORS = {"TableError": TableError, "DataLostError": DataLostError,
           "ReadOnlyGroupError": ReadOnlyGroupError}
RETRY_AFTER = 0.01  # seconds before resending a part a server refused as not its own


class Part:
    """One message of a request: the keys ``sel`` of the request sent to server ``sid`` (for a
    range pull, ``sel`` is the sub-range (lo, hi) asked of that server)."""

    __slots__ = ("orig", "refused_at", "refused_rv", "rv", "sel", "sid")

    def __init__(self, sid: int, sel, rv: int, orig: tuple = ()):
        self.sid = sid
        self.sel = sel                 # slice or index array into the request's keys
        self.rv = rv                   # ring version it was split with
        self.orig = orig               # resends: ((server, part id), ...) that may have applied it
        self.refused_at = 0.0          # WrongOwner: when, and the server's ring version
        self.refused_rv = -1


class Request:
    """One push, pull, range pull or table declaration, until every part is answered. Plain
    slots: one is built per call on the hot path."""

    __slots__ = ("callback", "clock", "error", "keys", "kind", "meta", "out", "parts", "ranges",
                 "result", "rnd", "started", "table", "vals", "waiting")

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
        self.parts: dict[int, Part] = {}
        self.waiting: set[int] = set()  # part ids not answered yet
        self.ranges: list[tuple[np.ndarray, np.ndarray]] = []
        self.callback = callback
        self.error: Exception | None = None
        self.result = result
        self.started = started
        self.clock: dict[int, int] | None = None  # pull with clock=True: node -> time reflected

    def add_part(self, sid: int, sel, rv: int, orig: tuple = ()) -> int:
        """Record a part about to be sent to ``sid``; returns its part id."""
        pid = len(self.parts)
        self.parts[pid] = Part(sid, sel, rv, orig)
        self.waiting.add(pid)
        return pid


class RequestTracker:
    """Outstanding and finished requests of one worker, by timestamp. Not thread-safe: the
    KVWorker calls it under its lock.

    A request is tracked from :meth:`register` (after its parts were encoded) until it completed
    and, if it carries a result or an error nobody received yet, until :meth:`collect` hands it
    out. A request with a callback delivers its result to the callback and is forgotten then
    (unless it failed), so a callback-only loop keeps nothing.
    """

    def __init__(self) -> None:
        self.pending: dict[int, Request] = {}
        self.finished: dict[int, Request] = {}   # completed, result or error not yet collected
        self.last_ts = 0
        self.refused = False  # a part was refused since the last reroute_plan: re-route soon
        # observer(ts, request) of each completion (latency metrics, traces); None: no cost
        self.on_complete: Callable[[int, Request], None] | None = None

    def next_ts(self) -> int:
        self.last_ts += 1
        return self.last_ts

    def __len__(self) -> int:
        """Requests held: pending plus finished and not yet collected."""
        return len(self.pending) + len(self.finished)

    def register(self, ts: int, req: Request) -> None:
        """Track ``req`` (its parts recorded) under ``ts``; completes it at once if no part
        waits (e.g. a pull of no keys)."""
        self.pending[ts] = req
        if not req.waiting:
            self.complete(ts, req)

    # -- replies ---------------------------------------------------------------------------------
    def ack(self, sid: int, ts: int, pid) -> bool:
        """One acknowledged part of a push (the common reply, kept short); stale acks (a part
        answered already, re-routed to another server, or of a forgotten request) are ignored.
        Returns False, changing nothing, if ``ts`` is not a push: the caller then treats the ack
        as any reply (:meth:`on_reply`), which fails a request it does not fit."""
        req = self.pending.get(ts)
        if req is None or pid not in req.waiting or req.parts[pid].sid != sid:
            return True
        if req.kind != "push":
            return False
        req.waiting.discard(pid)
        if not req.waiting:
            self.complete(ts, req)
        return True

    def waiting_part(self, sid: int, ts: int, pid) -> Request | None:
        """The request whose part ``pid`` waits for server ``sid``'s reply, or None if stale."""
        req = self.pending.get(ts)
        if req is None or pid not in req.waiting or req.parts[pid].sid != sid:
            return None
        return req

    def on_reply(self, sid: int, ts: int, req: Request, pid: int, msg: Message) -> list[int]:
        """Apply ``msg``, server ``sid``'s reply to part ``pid`` of request ``ts``. Returns the
        ids of parts added to send next: the next page of a range pull. A refusal
        (WrongOwnerError) leaves the part waiting and marked for :meth:`reroute_plan`."""
        part = req.parts[pid]
        follow: list[int] = []
        try:
            if msg.op == "error":
                kind = msg.meta.get(KIND)
                if kind == "WrongOwnerError":
                    part.refused_at = -1.0  # reroute_plan stamps the time (no clock in here)
                    part.refused_rv = int(msg.meta.get(RING_VERSION, -1))
                    self.refused = True
                    return follow
                err = _ERRORS.get(kind, RemoteError)
                req.error = err(f"server {sid}: {msg.meta.get(ERROR)}")
            elif req.kind == "pull" or (req.kind == "pushpull" and msg.op == "vals"):
                req.out[part.sel] = msg.arrays[0]
                if CLOCK in msg.meta:
                    req.clock = merge_clock(req.clock, msg.meta[CLOCK])
            elif req.kind == "pushpull":  # always answered with its values, never a bare ack
                raise ValueError(f"a push_pull was answered with {msg.op!r}, not its values")
            elif req.kind == "range":
                req.ranges.append((msg.arrays[0], msg.arrays[1]))
                nxt = msg.meta.get(NEXT)
                if type(nxt) is int and part.sel[0] < nxt < part.sel[1]:  # a paging server
                    follow.append(req.add_part(sid, (nxt, part.sel[1]), part.rv))
            elif req.kind == "declare":  # result: {"push_factor": f, "round": max over servers}
                if PUSH_FACTOR in msg.meta:
                    req.result["push_factor"] = int(msg.meta[PUSH_FACTOR])
                rnd = msg.meta.get(ROUND)
                if type(rnd) is int:
                    req.result["round"] = max(rnd, req.result.get("round", 0))
        except (IndexError, ValueError, TypeError) as e:
            req.error = RemoteError(f"server {sid} sent a reply that does not fit the request: {e}")
        self.answered(ts, req, pid)
        return follow

    def on_oversized(self, sid: int, ts: int, pid, err: Exception) -> list[int]:
        """Server ``sid``'s reply to part ``pid`` of ``ts`` could not be accepted (over this
        worker's limits). A range pull asks for the two halves of the part's sub-range instead
        (returns the ids of the two parts added, to send); any other request fails with a
        LimitError naming the remedy. Stale parts are ignored."""
        req = self.waiting_part(sid, ts, pid)
        if req is None:
            return []
        follow: list[int] = []
        part = req.parts[pid]
        lo, hi = part.sel if req.kind == "range" else (0, 0)
        if hi - lo > 1:
            mid = lo + (hi - lo) // 2
            follow = [req.add_part(sid, (lo, mid), part.rv), req.add_part(sid, (mid, hi), part.rv)]
        elif req.error is None:
            req.error = LimitError(
                f"the reply of server {sid} to request {ts} ({req.kind}) exceeds this worker's "
                f"limits ({err}); request fewer keys at a time or raise PSERVER_MAX_MESSAGE_BYTES "
                f"/ PSERVER_MAX_KEYS of the worker")
        self.answered(ts, req, pid)
        return follow

    def on_unreadable(self, sid: int, ts: int, pid, err: Exception) -> None:
        """Server ``sid``'s reply to part ``pid`` of ``ts`` came but could not be read (a sealed
        reply whose chunks did not open): the request fails with ``err``. Stale parts are ignored."""
        req = self.waiting_part(sid, ts, pid)
        if req is None:
            return
        if req.error is None:
            req.error = err
        self.answered(ts, req, pid)

    def answered(self, ts: int, req: Request, pid: int) -> None:
        req.waiting.discard(pid)
        if not req.waiting and ts in self.pending:
            self.complete(ts, req)

    def fail(self, ts: int, err: Exception) -> None:
        """Complete pending request ``ts`` with ``err`` (raised at its wait)."""
        req = self.pending.get(ts)
        if req is not None:
            req.error = err
            req.waiting.clear()
            self.complete(ts, req)

    def complete(self, ts: int, req: Request) -> None:
        """Move ``req`` out of pending: build its result, run its callback, keep it for
        :meth:`collect` if it has a result or error nobody received."""
        del self.pending[ts]
        if self.on_complete is not None:
            self.on_complete(ts, req)
        if req.error is None:
            if req.kind == "range":
                req.result = merge_ranges(req.ranges)
            elif req.kind == "pull" and CLOCK in req.meta:
                req.result = (req.result, req.clock or {})
            if req.callback is not None:
                try:
                    req.callback(req.result) if req.kind in ("pull", "pushpull") else req.callback()
                except Exception:
                    log.exception("callback of request %d raised", ts)
                return  # delivered: nothing left to collect
            if req.kind == "push":
                return
        elif req.callback is not None:
            log.error("request %d with a callback failed: %s", ts, req.error)
        self.finished[ts] = req

    def collect(self, ts: int) -> Request | None:
        """The finished request ``ts`` (forgotten now), or None if it is still pending or was
        completed and forgotten already. Raises KeyError for a timestamp never issued."""
        req = self.finished.pop(ts, None)
        if req is None and ts not in self.pending and not 0 < ts <= self.last_ts:
            raise KeyError(ts)
        return req

    def oldest(self) -> int | None:
        """The oldest timestamp still pending or finished uncollected, None if there is none."""
        return min(self.pending, default=None) or min(self.finished, default=None)

    # -- re-routing ------------------------------------------------------------------------------
    def reroute_plan(self, servers, lost, ring_version: int, now: float
                     ) -> tuple[list[tuple[int, Request, int, tuple]], bool]:
        """Which unanswered parts to resend after a ring change or a refusal, in timestamp order
        (per-sender FIFO at the new owners): [(ts, request, part id, orig)], with ``orig`` every
        (server, part id) that may have applied the part. Each listed part stops waiting (the
        caller re-splits and sends it as new parts). A part whose server is in ``lost`` (dead with
        no replica) fails its request with DataLostError, raised at that request's wait. Returns
        also whether a refused part is still within its retry delay (re-route again soon)."""
        plan, retry, failed = [], False, []
        self.refused = False
        for ts in sorted(self.pending):
            req = self.pending[ts]
            for pid in sorted(req.waiting):
                part = req.parts[pid]
                if part.refused_at < 0:
                    part.refused_at = now
                gone = part.sid not in servers
                refused = part.refused_at and now - part.refused_at > RETRY_AFTER and \
                    ring_version >= part.refused_rv
                if part.refused_at and not refused:
                    retry = True
                if not gone and not refused:
                    if part.sid in lost:
                        req.error = DataLostError(
                            f"server {part.sid} died and no replica holds its keys (servers lost: "
                            f"{sorted(lost)}); restore the cluster from the last checkpoint with "
                            f"`pserver scheduler --restore DIR`")
                        failed.append(ts)
                        break
                    continue
                # a refused part was not applied; one whose server left may have been (and forwarded)
                plan.append((ts, req, pid, part.orig + (() if refused else ((part.sid, pid),))))
        for ts in failed:
            self.fail(ts, self.pending[ts].error)
        plan = [p for p in plan if p[0] not in failed]
        for _ts, req, pid, _ in plan:
            req.waiting.discard(pid)
        return plan, retry

    def settle(self, ts: int) -> None:
        """Complete ``ts`` if re-routing left none of its parts waiting (e.g. a declaration to a
        server that left)."""
        req = self.pending.get(ts)
        if req is not None and req.parts and not req.waiting:
            self.complete(ts, req)


def merge_ranges(ranges: list[tuple[np.ndarray, np.ndarray]]):
    """(keys, values) of a range pull's answers, sorted by key; values (n,) for one column."""
    if not ranges:
        return np.empty(0, np.uint64), np.empty(0)
    keys = np.concatenate([k for k, _ in ranges])
    vals = np.concatenate([v for _, v in ranges])
    order = np.argsort(keys, kind="stable")
    vals = vals[order]
    return keys[order], (vals[:, 0] if vals.ndim == 2 and vals.shape[1] == 1 else vals)


def merge_clock(have: dict[int, int] | None, vc) -> dict[int, int]:
    """Combine the range clocks of a pull's parts: the values reflect a worker only as far as
    every part does (a worker missing from a part: -1 there)."""
    part = {int(k): int(v) for k, v in vc.items()} if isinstance(vc, dict) else {}
    if have is None:
        return part
    return {n: min(have.get(n, -1), part.get(n, -1)) for n in have.keys() | part.keys()}
