"""The worker's links to servers: each message goes out now, or waits to leave in a batch.

One DEALER link per server, made on first use and registered with the poller the replies are read
through (kv/replies.py). What to coalesce is the Outbox's decision (kv/outbox.py); this sends it,
and a flush thread bounds how long a message waits when the caller stops calling in. Not
thread-safe: callers hold the worker's lock, which the flush thread takes too.
"""

from __future__ import annotations

import sys
import threading
import time

from .. import wire
from ..errors import ServerDeadError
from ..link import LinkError, Poller, ZmqLink
from ..membership.node import Membership
from ..transport import Transport
from ..wire import Message
from .outbox import FLUSH_AFTER, Outbox


class Sender:
    """Sends a worker's messages to servers, at once or coalesced.

    ``links`` (server id -> link) and ``link_server`` (link -> server id) name every link made,
    ``poller`` polls them all; ``unsent`` is set when a message could not go out (its part stays
    waiting, and the next re-routing pass - kv/routing.py - clears it).
    """

    def __init__(self, membership: Membership, transport: Transport, identity: bytes,
                 lock: threading.RLock, coalesce: int = 0):
        self.membership, self.transport, self.identity, self.lock = (membership, transport,
                                                                     identity, lock)
        # request coalescing (PSERVER_COALESCE, 2 by default): what waits to leave in a batch
        self.outbox = Outbox(hold_at=coalesce or sys.maxsize)
        self.links: dict[int, ZmqLink] = {}
        self.link_server: dict[ZmqLink, int] = {}
        self.poller = Poller()
        self.unsent = False
        self.closed = False
        self._flusher: threading.Event | None = None  # wakes the thread that bounds the wait

    def send(self, sid: int, msg: Message) -> None:
        """Send ``msg`` to server ``sid`` - now, or coalesced with the next ones if that server has
        requests of this worker unanswered. A server that is dead or unreachable raises nothing:
        the message is dropped and ``unsent`` set (its part is re-routed once the ring drops that
        server).

        Raises: ProtocolError (from ``wire.encode``) for an array of a dtype the wire does not
        carry; nothing was sent or queued then."""
        self.send_frames(sid, msg.ts, wire.encode(msg), msg.op)

    def send_frames(self, sid: int, ts: int, frames: list, op: str) -> None:
        """:meth:`send` of a message already encoded (``frames``, of request ``ts``, op ``op``).
        Never raises."""
        link = self.links.get(sid)
        try:
            if link is None:
                node = self.membership.view.nodes.get(sid)
                if node is None or not node.alive:
                    raise ServerDeadError(f"server {sid} is not alive")
                link = self.transport.dealer_link(node.host, node.port, "server", self.identity)
                self.links[sid] = link
                self.link_server[link] = sid
                self.poller.register(link)
        except (ServerDeadError, LinkError):
            self.unsent = True
            return
        sends = self.outbox.add(sid, ts, frames, op)
        if not sends:  # it waits: for a reply, a wait, or at most ~2 FLUSH_AFTER
            if self._flusher is None:
                self._start_flusher()
            elif not self._flusher.is_set():
                self._flusher.set()
        for out in sends:
            self.send_now(*out)

    def flush_held(self) -> None:
        """Send every message waiting in an outbox (one batch per server); none waits afterwards.
        Never raises (a failed send sets ``unsent``)."""
        for out in self.outbox.take_all():
            self.send_now(*out)

    def send_now(self, sid: int, frames: list, ops: list[str]) -> None:
        """Send ``frames`` to ``sid``: one message if ``ops`` names one, else a batch of as many.
        A failed send sets ``unsent`` (never raises)."""
        link = self.links[sid]
        try:
            if len(ops) == 1:
                link.send_frames(frames, ops[0])
            else:
                link.send_batch(frames, ops)
        except LinkError:
            self.unsent = True

    def close(self) -> None:
        """Stop the flush thread (call under the lock: it sends nothing afterwards). The links
        close with the transport."""
        self.closed = True

    def _start_flusher(self) -> None:
        """A daemon thread bounding how long a coalesced message waits when the caller stops
        calling in (e.g. computes after a push): it sleeps while nothing waits, and otherwise
        sends what waited through a whole FLUSH_AFTER without an outbox being emptied."""
        wake = self._flusher = threading.Event()
        wake.set()

        def run() -> None:
            while not self.closed:
                if not wake.wait(1.0):
                    continue
                with self.lock:
                    takes = self.outbox.takes
                time.sleep(FLUSH_AFTER)
                with self.lock:
                    if self.closed:
                        return
                    if self.outbox.stale(takes):
                        self.flush_held()
                    if not self.outbox.held:
                        wake.clear()

        threading.Thread(target=run, name="pserver-flush", daemon=True).start()
