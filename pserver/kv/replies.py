"""Completion on the worker: read the servers' replies and hand them to the request tracker.

Replies are read by whichever thread waits (no receive thread: under the GIL a thread hand-off
costs more than the read). One "acks" message acknowledges several parts; a reply over this
worker's limits fails its request (or asks a range pull's halves again); a reply to a filtered
push may ask for a resend; stale and malformed replies are dropped, never raised.
"""

from __future__ import annotations

import logging
import time

from .. import wire
from ..config import Config
from ..errors import PServerError
from ..protocol import ACK_LIST, FILTER_META, PART
from ..transport import Transport
from ..wire import Message, RequestsRefused
from .filtering import WorkerFilters
from .messages import PartEncoder
from .sending import Sender
from .tracker import RequestTracker

log = logging.getLogger(__name__)

# Limits under which a reply this worker refused is read once more, only to learn which request it
# answers (its frames are in memory already: views on them allocate nothing).
_ATTRIBUTE = wire.Limits(max_message_bytes=1 << 62, max_keys=1 << 62, max_dim=1 << 62,
                         max_header_bytes=1 << 24, max_arrays=1 << 10)


class ReplyReader:
    """Reads the replies on a Sender's links. Not thread-safe: callers hold the worker's lock."""

    def __init__(self, cfg: Config, transport: Transport, tracker: RequestTracker,
                 filters: WorkerFilters, sender: Sender, parts: PartEncoder):
        self.cfg, self.transport, self.tracker, self.filters = cfg, transport, tracker, filters
        self._poller, self._link_server, self._outbox = (sender.poller, sender.link_server,
                                                         sender.outbox)
        self._flush_held, self._send, self._message = sender.flush_held, sender.send, parts.message

    def progress(self, timeout: float) -> None:
        """Read every reply that comes within ``timeout`` s (PSERVER_WORKER_BUSY_POLL: polling
        first without sleeping while at most one request is pending), then send what waited in
        the outboxes. Never raises for what a server sent (a callback that raises is logged by
        the tracker)."""
        ready = None
        # Poll without sleeping first: no wake-up when the reply comes soon. Only for a lone
        # request: with several in flight the replies come as a stream anyway, and on a machine
        # shared with the servers the spin would take the cycles they need (docs/performance.md).
        if self.cfg.worker_busy_poll and len(self.tracker.pending) <= 1:
            poll, clock = self._poller.poll, time.perf_counter
            end = clock() + self.cfg.worker_busy_poll
            while not (ready := poll(0)) and clock() < end:
                pass
        for link in ready or self._poller.poll(timeout):
            sid = self._link_server[link]
            while (got := link.recv()) is not None:
                self.on_reply(sid, got[1])
        # replies came (or the timeout passed): what waited for them leaves as one batch per server
        if self._outbox.held:
            self._flush_held()
        elif not self.tracker.pending:
            self._outbox.forget_in_flight()

    def on_reply(self, sid: int, frames: list) -> None:
        """Decode one reply of server ``sid`` (its frames) and apply it; never raises for what
        the server sent (malformed: logged and dropped)."""
        try:
            msg, _ = self.transport.decode_body(frames)
        except PServerError as e:
            self._outbox.answered(sid)
            self.on_undecodable(sid, frames, e)
            return
        if msg.op == "acks":  # several acknowledgements in one message
            acks = msg.meta.get(ACK_LIST)
            if not isinstance(acks, list):
                log.error("malformed acks from server %d dropped", sid)
                return
            self._outbox.answered(sid, len(acks))
            filtered, ack = self.filters.sent, self.tracker.ack
            for entry in acks:
                # a filtered push's reply may ask for a resend; an ack of no push is a misfit
                if type(entry) is list and len(entry) == 2 and type(entry[0]) is int and (
                        filtered or not ack(sid, entry[0], entry[1])):
                    self.on_message(sid, Message("ack", entry[0], meta={PART: entry[1]}))
            return
        self._outbox.answered(sid)
        if msg.op == "ack" and not self.filters.sent and FILTER_META not in msg.meta and \
                self.tracker.ack(sid, msg.ts, msg.meta.get(PART)):  # the common reply, kept short
            return
        self.on_message(sid, msg)

    def on_undecodable(self, sid: int, frames: list, err: PServerError) -> None:
        """A reply over this worker's limits fails its request (or, for a range pull, asks for the
        halves of the range); one that is malformed beyond attribution is logged and dropped. A
        sealed reply that did not open fails its request."""
        if isinstance(err, RequestsRefused):
            for ts, part in err.requests:
                log.warning("reply of server %d to request %d refused: %s", sid, ts, err)
                self.tracker.on_unreadable(sid, ts, part, err)
            return
        try:
            msg = wire.decode(frames, _ATTRIBUTE)
        except PServerError:
            log.error("malformed reply from server %d dropped: %s", sid, err)
            return
        log.warning("reply of server %d to request %d refused: %s", sid, msg.ts, err)
        req = self.tracker.pending.get(msg.ts)
        for pid in self.tracker.on_oversized(sid, msg.ts, msg.meta.get(PART), err):
            self._send(sid, self._message(msg.ts, req, pid))

    def on_message(self, sid: int, msg: Message) -> None:
        """Apply a decoded reply of server ``sid`` to the part it answers (a stale one is
        ignored); send what it asks next (a key-cache miss's resend, a range pull's next pages)."""
        pid = msg.meta.get(PART)
        req = self.tracker.waiting_part(sid, msg.ts, pid)
        if req is None:
            return
        if self.filters.sent or FILTER_META in msg.meta:
            msg = self.filters.on_reply((msg.ts, pid), sid, msg)
            if msg is None:  # a key-cache miss: the part was resent with its keys
                return
        for nxt in self.tracker.on_reply(sid, msg.ts, req, pid, msg):  # next pages
            self._send(sid, self._message(msg.ts, req, nxt))
