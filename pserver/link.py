"""Links: the one seam between a node's loops and its sockets.

A :class:`Link` is one endpoint - routed (a ROUTER: it receives from and replies to many peers, named
by identity) or not (a DEALER: one peer). Every poll loop sends, receives and polls through links and
a :class:`Poller`, so a loop runs unchanged over ZeroMQ (:class:`ZmqLink`) or in memory
(:class:`MemoryHub`, for tests without sockets). Decoding stays in ``Transport.decode_body``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import zmq

from . import wire
from .errors import PServerError


class LinkError(PServerError):
    """A send that could not go out: a routed link's peer is gone, or a peer did not take the
    message within the link's send timeout. Nothing of the message was sent."""


class LinkTimeout(LinkError):
    """A send that timed out: the link's only peer did not take the message within the send
    timeout (a DEALER whose connection never completed, e.g. wrong keys). Nothing was sent."""


class Link:
    """One endpoint. Subclasses implement the five methods; all are called from the owner thread.

    routed: True if ``recv`` names the sender and ``send`` must name the peer (``to``).
    """

    routed: bool = False

    def send(self, msg: wire.Message, to: bytes | None = None) -> None:
        """Send ``msg`` (to peer ``to`` on a routed link). Raises LinkError; nothing was sent then."""
        self.send_frames(wire.encode(msg), msg.op, to)

    def send_frames(self, frames: list, op: str, to: bytes | None = None) -> None:
        """Send frames made by ``wire.encode`` (``op`` names them in the traffic counters).
        Raises LinkError; nothing was sent then."""
        raise NotImplementedError

    def send_batch(self, frames: list, ops: list[str], to: bytes | None = None) -> None:
        """Send several messages, each the single frame ``wire.encode`` made, as ONE batch message
        (``ops`` name them in the traffic counters). Raises LinkError; nothing was sent then."""
        self.send_frames([wire.encode_batch(frames)], wire.BATCH_OP, to)

    def recv(self) -> tuple[bytes | None, list] | None:
        """The next waiting message as (sender identity or None, frames), or None if none waits.
        Never blocks."""
        raise NotImplementedError

    def poll(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) for a message; True if one waits."""
        raise NotImplementedError

    def close(self, linger: float = 0.0) -> None:
        """Release the endpoint, letting queued messages out for up to ``linger`` seconds (what
        is still queued then is dropped); later sends raise LinkError. Idempotent."""
        raise NotImplementedError


# Flags as plain ints: pyzmq's are IntFlag members, whose arithmetic and conversion cost about a
# microsecond per use on every message (docs/performance.md, "Where a small request's time goes").
_SNDMORE, _EVENTS, _POLLIN, _NOBLOCK = (int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN),
                                        int(zmq.NOBLOCK))


def _nbytes(frame) -> int:
    return frame.nbytes if type(frame) is np.ndarray else len(frame)


class ZmqLink(Link):
    """A ZeroMQ socket (ROUTER: routed) of a ``Transport``, whose traffic counters it feeds."""

    __slots__ = ("counters", "routed", "sock")

    def __init__(self, sock: zmq.Socket, counters=None):
        self.sock = sock
        self.routed = sock.type == zmq.ROUTER
        self.counters = counters

    def send_frames(self, frames: list, op: str, to: bytes | None = None) -> None:
        # Socket.send per frame instead of send_multipart, whose per-call checks cost more than a
        # small message's send itself (wire.encode's frames are bytes or numpy arrays).
        sock, nbytes = self.sock, 0
        try:
            if to is not None:
                sock.send(to, _SNDMORE)
                nbytes = len(to)
            last = frames[-1]
            for f in frames[:-1]:
                sock.send(f, _SNDMORE, copy=False)
                nbytes += _nbytes(f)
            sock.send(last, 0, copy=False)
        except zmq.Again as e:  # a DEALER's sndtimeo ran out (only the first frame can block)
            raise LinkTimeout(f"cannot send {op!r}: no peer took it in time") from e
        except zmq.ZMQError as e:
            raise LinkError(f"cannot send {op!r}: {e}") from e
        if self.counters is not None:
            self.counters.count(self.counters.sent, op, nbytes + _nbytes(last))

    def send_batch(self, frames: list, ops: list[str], to: bytes | None = None) -> None:
        sock = self.sock
        try:
            if to is not None:
                sock.send(to, _SNDMORE)
            sock.send(wire.encode_batch(frames), 0, copy=False)
        except zmq.Again as e:
            raise LinkTimeout(f"cannot send a batch of {len(ops)}: no peer took it in time") from e
        except zmq.ZMQError as e:
            raise LinkError(f"cannot send a batch of {len(ops)}: {e}") from e
        if self.counters is not None:  # counted per message, under each one's op
            self.counters.count_each(self.counters.sent, ops, [len(f) for f in frames])

    def recv(self) -> tuple[bytes | None, list] | None:
        frames = recv_frames(self.sock)
        if frames is None:
            return None
        if self.routed:
            return frames[0].bytes, frames[1:]
        return None, frames

    def poll(self, timeout: float | None) -> bool:
        return bool(self.sock.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def close(self, linger: float = 0.0) -> None:
        if not self.sock.closed:
            self.sock.close(linger=int(linger * 1000))


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame] | None:
    """The frames of the next message waiting on ``sock`` (zero-copy), or None if there is none.
    Reads frame by frame, following each frame's more flag: ``recv_multipart(NOBLOCK, copy=False)``
    at half its per-message cost (it asks the socket for RCVMORE after every frame). Asks ZMQ_EVENTS
    first rather than letting a receive fail: the zmq.Again a failed receive raises costs several
    times the question, once per burst on both ends (docs/performance.md)."""
    if not sock.getsockopt(_EVENTS) & _POLLIN:
        return None
    try:
        frame = sock.recv(_NOBLOCK, copy=False)
    except zmq.Again:  # not expected after EVENTS said a message waits; harmless if it happens
        return None
    frames = [frame]
    while frame.more:  # the rest of a message is there once its first frame is
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


class Poller:
    """Waits on several links at once: ZeroMQ links, or in-memory ones; other links (scripted test
    doubles) are asked without waiting."""

    def __init__(self) -> None:
        self._zmq = zmq.Poller()
        self._links: dict[object, Link] = {}  # socket (or the link itself) -> link
        self._memory: list[MemoryLink] = []
        self._other: list[Link] = []

    def register(self, link: Link) -> None:
        key = getattr(link, "sock", link)
        if key in self._links:
            return
        self._links[key] = link
        if isinstance(link, ZmqLink):
            self._zmq.register(link.sock, zmq.POLLIN)
        else:
            (self._memory if isinstance(link, MemoryLink) else self._other).append(link)

    def unregister(self, link: Link) -> None:
        key = getattr(link, "sock", link)
        if self._links.pop(key, None) is None:
            return
        if isinstance(link, ZmqLink):
            self._zmq.unregister(link.sock)
        else:
            (self._memory if isinstance(link, MemoryLink) else self._other).remove(link)

    def __contains__(self, link: Link) -> bool:
        return getattr(link, "sock", link) in self._links

    def links(self) -> list[Link]:
        return list(self._links.values())

    def poll(self, timeout: float | None) -> list[Link]:
        """The registered links with a message waiting, after at most ``timeout`` seconds."""
        if self._other:
            return [link for link in self._other if link.poll(0)]
        if self._memory:
            return _poll_memory(self._memory, timeout)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        return [self._links[s] for s, _ in self._zmq.poll(ms)]


# -- in memory --------------------------------------------------------------------------------------
class MemoryHub:
    """In-process endpoints that behave like ROUTER/DEALER pairs: messages are encoded and copied to
    bytes as on the wire, per-sender FIFO holds, and a routed send to an unknown peer raises."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.routers: dict[str, MemoryLink] = {}

    def router(self, name: str) -> MemoryLink:
        link = self.routers[name] = MemoryLink(self, routed=True, name=name)
        return link

    def dealer(self, router: str, identity: bytes) -> MemoryLink:
        """A DEALER named ``identity`` connected to the router named ``router``."""
        link = MemoryLink(self, routed=False, name=router, identity=identity)
        return link


class MemoryLink(Link):
    """An endpoint of a :class:`MemoryHub`. ``sent`` keeps every (to, op) sent, for tests."""

    def __init__(self, hub: MemoryHub, routed: bool, name: str, identity: bytes | None = None):
        self.hub, self.routed, self.name, self.identity = hub, routed, name, identity
        self.inbox: deque = deque()
        self.peers: dict[bytes, MemoryLink] = {}  # routed: identity -> dealer, on first message
        self.sent: list[tuple[bytes | None, str]] = []
        self.closed = False

    def send_frames(self, frames: list, op: str, to: bytes | None = None) -> None:
        copied = [bytes(f.data if type(f) is np.ndarray else f) for f in frames]
        with self.hub.cond:
            if self.closed:
                raise LinkError(f"cannot send {op!r}: the link is closed")
            if self.routed:
                peer = self.peers.get(to)
                if peer is None or peer.closed:
                    raise LinkError(f"cannot send {op!r}: no peer {to!r}")
                peer.inbox.append((None, copied))
            else:
                router = self.hub.routers.get(self.name)
                if router is None or router.closed:
                    raise LinkError(f"cannot send {op!r}: nothing listens as {self.name!r}")
                router.peers[self.identity] = self
                router.inbox.append((self.identity, copied))
            self.sent.append((to, op))
            self.hub.cond.notify_all()

    def recv(self) -> tuple[bytes | None, list] | None:
        with self.hub.cond:
            return self.inbox.popleft() if self.inbox else None

    def poll(self, timeout: float | None) -> bool:
        return bool(_poll_memory([self], timeout))

    def close(self, linger: float = 0.0) -> None:  # sends are delivered at once: nothing lingers
        with self.hub.cond:
            self.closed = True
            if self.routed and self.hub.routers.get(self.name) is self:
                del self.hub.routers[self.name]
            self.hub.cond.notify_all()


def _poll_memory(links: list[MemoryLink], timeout: float | None) -> list[Link]:
    hub = links[0].hub
    deadline = None if timeout is None else time.monotonic() + timeout
    with hub.cond:
        while True:
            ready = [link for link in links if link.inbox]
            if ready:
                return ready
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            hub.cond.wait(left)
