"""Routing on the worker: split requests with the current key ring, re-route after it changes.

Every part names the ring version it was split with. After a ring change or a refusal, the
re-routing pass resends the waiting parts the tracker's plan names (RequestTracker.reroute_plan),
re-split with the new ring, in timestamp order so per-sender FIFO holds at the new owners; the
servers drop duplicates by the parts' origins. Failover walkthrough: docs/design.md, step 19.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import SchedulerUnreachableError
from ..membership.node import Membership
from ..protocol import HI, LO
from ..ring import KeyRing
from .filtering import WorkerFilters
from .messages import PartEncoder
from .sending import Sender
from .tracker import Request, RequestTracker

REROUTE_EVERY = 0.05  # s: a waiting worker re-routes at least this often (a safety net)


class Router:
    """The ring requests are split with (``ring``; ``rings`` by version, to find a failed
    server's heirs) and the re-routing pass. Not thread-safe: callers hold the worker's lock."""

    def __init__(self, membership: Membership, tracker: RequestTracker, filters: WorkerFilters,
                 sender: Sender, parts: PartEncoder):
        self.membership, self.tracker, self.filters, self.sender = (membership, tracker, filters,
                                                                    sender)
        self._send, self._message, self._encode_part = sender.send, parts.message, parts.encode_part
        self.ring: KeyRing = membership.view.ring  # the ring requests are being split with
        self.rings: dict[int, KeyRing] = {self.ring.version: self.ring}
        self.routed_rv = -1        # ring version of the last re-routing pass
        self.routed_view = -1      # view version of the last re-routing pass
        self.due = 0.0             # monotonic time of the next safety-net re-routing pass
        self.retry = False         # a refused part waits out its retry delay: re-route soon

    def split(self, keys: np.ndarray) -> dict[int, object]:
        """Split keys by server with the current ring, which then stamps the parts (the view may
        change under us at any moment: parts must name the ring they were split with). Re-routes
        the pending requests first if the ring changed (their failures go to their own wait).

        Raises: SchedulerUnreachableError (from the re-routing pass) if the scheduler is lost."""
        ring = self.membership.view.ring
        if ring.version != self.routed_rv and self.tracker.pending:
            self.reroute()
        if ring is not self.ring:
            self.ring = self.rings.setdefault(ring.version, ring)
        return dict(ring.split(keys))

    def all_servers(self) -> list[int]:
        """Every server of the current ring (also makes it the ring that stamps the parts)."""
        ring = self.membership.view.ring
        if ring is not self.ring:
            self.ring = self.rings.setdefault(ring.version, ring)
        return list(ring.servers)

    def needed(self) -> bool:
        """Whether a re-routing pass may find work: the view changed since the last one, a part
        was refused or could not be sent, or - as a safety net - REROUTE_EVERY went by."""
        return (self.retry or self.sender.unsent or self.tracker.refused
                or self.membership.view.version != self.routed_view
                or time.monotonic() >= self.due)

    def reroute(self) -> None:
        """Failover on the worker side: resend the parts the tracker's plan names (their server
        left the ring or refused the keys), re-split with the current ring, in timestamp order so
        per-sender FIFO holds at the new owners. Servers drop the duplicates.

        Raises: SchedulerUnreachableError if the scheduler is lost (held messages were sent,
        nothing re-routed). A part on a server lost with no replica fails its own request
        (DataLostError at its wait)."""
        self.sender.flush_held()  # as if sent at once: the plan below sees every part as sent
        view = self.membership.view
        ring = self.ring = self.rings.setdefault(view.ring.version, view.ring)
        if self.membership.scheduler_lost.is_set():
            raise SchedulerUnreachableError("lost contact with the scheduler")
        lost = set(view.settings.get("lost", []))
        now = time.monotonic()
        self.routed_view, self.due = view.version, now + REROUTE_EVERY
        plan, self.retry = self.tracker.reroute_plan(set(ring.servers), lost, ring.version, now)
        self.sender.unsent = False  # a part not sent is planned once the ring drops its server
        ranges_resent: set[int] = set()
        for ts, req, pid, orig in plan:
            if req.kind == "range":
                if ts not in ranges_resent:  # answers were filtered by the old ring: ask anew
                    ranges_resent.add(ts)
                    req.ranges.clear()
                    req.waiting.clear()
                    for sid in self.all_servers():
                        self._send(*self._encode_part(ts, req, sid, (req.meta[LO], req.meta[HI]),
                                                      self.ring.version))
            else:
                self.resend(ts, req, pid, orig, ring)
        for ts in {p[0] for p in plan}:
            self.tracker.settle(ts)
        self.routed_rv = ring.version

    def resend(self, ts: int, req: Request, pid: int, orig: tuple, ring: KeyRing) -> None:
        """Re-split one unanswered part with ``ring`` and send it again. ``orig`` names every
        (server, part id) that may have applied it: those servers, and the replicas they forwarded
        it to, recognise the resend as a duplicate. A filtered push resends exactly the entries
        the part carried (never what its filters held back, which stays held back once).
        Raises what a filter's encode raises."""
        part = req.parts[pid]
        if req.kind == "declare":
            if part.sid in ring.servers:
                self._send(*self._encode_part(ts, req, part.sid, None, self.ring.version, orig))
            return
        sent = self.filters.take_sent((ts, pid)) if self.filters.sent else None
        heirs = ()
        if req.rnd is not None:
            # a synchronous round resent: every server that took over the failed master's ranges
            # must hear from every worker, with an empty push if need be
            old = self.rings.get(part.rv)
            heirs = old.heirs(part.sid, ring) if old is not None else ring.servers
        if sent is not None and sent.op == "push":
            keys = sent.chain.selected_keys(sent.encoded)
            keys = np.empty(0, np.uint64) if keys is None else keys
            targets = dict(ring.split(keys))
            for sid in heirs:
                targets.setdefault(sid, slice(0, 0))
            for sid, sel in targets.items():
                rows = np.arange(len(keys))[sel]
                npid = req.add_part(sid, np.searchsorted(req.keys, keys[rows]), ring.version, orig)
                encoded = self.filters.encode_rows(sid, (ts, npid), sent, rows)
                self._send(sid, self._message(ts, req, npid, encoded))
            return
        idx = np.arange(len(req.keys))[part.sel]
        targets = dict(ring.split(req.keys[idx]))
        for sid in heirs:
            targets.setdefault(sid, slice(0, 0))
        for sid, sel in targets.items():
            self._send(*self._encode_part(ts, req, sid, idx[sel], self.ring.version, orig))
