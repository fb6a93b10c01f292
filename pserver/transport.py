"""ZeroMQ sockets of one node: creation (with the cluster's credentials) as sockets or as
:class:`~pserver.link.Link` s, decoding of received :class:`~pserver.wire.Message` s, and traffic
counters. Nothing else.

Every node that serves requests binds one ROUTER; every node that makes requests connects one DEALER
per peer (one TCP stream read by one loop: per-sender FIFO order). A socket is used by one thread only.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Iterator

import zmq

from . import security, wire
from .config import Config, zmq_endpoint
from .errors import ConfigError, PServerError
from .link import Link, ZmqLink
from .sealed import SealedDealer, SealedRouter, Unopened

log = logging.getLogger(__name__)

# DEALERs to the scheduler get the routing identity b"p" + a random per-Transport token + a counter:
# unguessable (identities travel only inside CURVE boxes) and stable across reconnects, so the scheduler
# can bind a node id to the node that registered it (node_token) instead of trusting ids in messages.
_TOKEN_TAG = b"p"
_TOKEN_LEN = 1 + 8


def node_token(identity: bytes) -> bytes:
    """The part of a routing identity shared by all DEALERs one node opened to the scheduler (the
    whole identity if it is not of that form, e.g. a DEALER with an explicit identity)."""
    if identity[:1] == _TOKEN_TAG and len(identity) > _TOKEN_LEN:
        return identity[:_TOKEN_LEN]
    return identity


class TrafficCounters:
    """Bytes and messages sent/received per message op (thread-safe enough: += under a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # op -> [messages, bytes]
        self.received: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def count(self, table: dict, op: str, nbytes: int) -> None:
        with self._lock:
            entry = table[op]
            entry[0] += 1
            entry[1] += nbytes

    def count_each(self, table: dict, ops: list[str], sizes: list[int]) -> None:
        """Count several messages (a batch's) at once: one per op of ``ops``, of ``sizes`` bytes."""
        with self._lock:
            for op, nbytes in zip(ops, sizes):
                entry = table[op]
                entry[0] += 1
                entry[1] += nbytes

    def to_json(self) -> dict:
        with self._lock:
            return {
                "bytes_sent": sum(v[1] for v in self.sent.values()),
                "bytes_received": sum(v[1] for v in self.received.values()),
                "messages_sent": sum(v[0] for v in self.sent.values()),
                "messages_received": sum(v[0] for v in self.received.values()),
                "sent_by_op": {k: {"messages": v[0], "bytes": v[1]} for k, v in self.sent.items()},
                "received_by_op": {k: {"messages": v[0], "bytes": v[1]}
                                   for k, v in self.received.items()},
            }


def load_credentials(cfg: Config, role: str) -> security.Credentials:
    """The node's credentials: CURVE keys from PSERVER_KEYS, or plain text with PSERVER_INSECURE=1."""
    if cfg.insecure:
        return security.Credentials.insecure()
    if not cfg.keys:
        raise ConfigError(
            "no cluster keys: run `pserver keygen DIR` and set PSERVER_KEYS=DIR (or --keys DIR) on "
            "every node, or pass --insecure / PSERVER_INSECURE=1 for an unauthenticated cluster")
    return security.Credentials.load(cfg.keys, role)


class Transport:
    """The sockets of one node, sharing one ZeroMQ context and one set of credentials."""

    def __init__(self, cfg: Config, role: str, credentials: security.Credentials | None = None):
        self.cfg = cfg
        self.role = role
        self.limits = cfg.limits
        self.ctx = zmq.Context()
        self.creds = credentials if credentials is not None else load_credentials(cfg, role)
        if self.creds.secure:
            self.creds.start_authenticator(self.ctx)
        self.counters = TrafficCounters()
        self._sockets: list[zmq.Socket] = []
        self._token = _TOKEN_TAG + os.urandom(_TOKEN_LEN - 1)
        self._dealer_ids = itertools.count()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm = 0  # no silent drops and no blocking on bursts of in-flight requests
        sock.rcvhwm = 0
        self._sockets.append(sock)
        return sock

    def _bind_router(self, host: str, port: int = 0) -> tuple[zmq.Socket, int]:
        """A ROUTER bound on host:port (port 0 = any free port). Returns the socket and its port."""
        sock = self._socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer raises, never drops
        # libzmq drops a frame larger than any valid message (and the connection) before allocating
        # it; wire.decode enforces the exact limits on what gets through. The slack covers the header,
        # the 8-byte padding of inline arrays and CURVE's box overhead.
        lim = self.limits
        sock.maxmsgsize = lim.max_message_bytes + lim.max_header_bytes + 8 * lim.max_arrays + 1024
        if self.role == "server":  # bounded memory: a peer faster than we apply waits in TCP
            sock.rcvhwm = self.cfg.recv_queue
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        self.creds.configure_server(sock)
        try:
            if port:
                sock.bind(zmq_endpoint(host, port))
            else:
                port = sock.bind_to_random_port(zmq_endpoint(host, "").rsplit(":", 1)[0])
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind {host}:{port}: {e} (check PSERVER_HOST / the port)") from None
        return sock, port

    def _connect_dealer(self, host: str, port: int, peer_role: str,
                        identity: bytes | None = None) -> zmq.Socket:
        """A DEALER connected to the ROUTER of a peer of role ``peer_role``."""
        sock = self._socket(zmq.DEALER)
        if peer_role == "scheduler":
            # A DEALER whose only connection failed its handshake (wrong or no keys) has no peer and
            # would block on send for ever: give up after the connect timeout instead (zmq.Again).
            sock.sndtimeo = max(1, int(self.cfg.connect_timeout * 1000))
        identity = self.dealer_identity(peer_role, identity)
        if identity is not None:
            sock.identity = identity
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        self.creds.configure_client(sock, peer_role)
        sock.connect(zmq_endpoint(host, port))
        return sock

    def dealer_identity(self, peer_role: str, identity: bytes | None = None) -> bytes | None:
        """The routing identity of a new DEALER to a ``peer_role``: ``identity`` if given, else a
        token-based one for the scheduler (see :func:`node_token`), else None (ZeroMQ picks)."""
        if identity is None and peer_role == "scheduler":
            identity = self._token + b"%d" % next(self._dealer_ids)
        return identity

    def router_link(self, host: str, port: int = 0, handover: bool = False) -> tuple[Link, int]:
        """A ROUTER bound on host:port (port 0: any free port) as a routed Link, and its port.
        handover: a peer reconnecting with the identity of a live connection takes it over
        (ROUTER_HANDOVER). A secure server's is a :class:`~pserver.sealed.SealedRouter`, with its
        bulk ROUTER bound beside it on a free port. Raises ConfigError if it cannot bind."""
        sock, port = self._bind_router(host, port)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.role == "server" and self.creds.secure:  # answers HELLOs; seals unless seal_min 0
            return SealedRouter(sock, self.counters, self._socket, host, self.limits,
                                self.cfg.seal_min_bytes), port
        return ZmqLink(sock, self.counters), port

    def dealer_link(self, host: str, port: int, peer_role: str,
                    identity: bytes | None = None) -> Link:
        """A DEALER connected to the ROUTER of a peer of role ``peer_role``, as a Link. Its sends
        to the scheduler raise LinkTimeout after the connect timeout when no connection could be
        made; other sends raise LinkError as :meth:`Link.send` says. On a secure transport a link
        to a server is a :class:`~pserver.sealed.SealedDealer` (unless PSERVER_SEAL_MIN is 0).
        Raises ConfigError if PSERVER_SEAL_CIPHER names a cipher whose package is missing."""
        sock = self._connect_dealer(host, port, peer_role, identity)
        if peer_role == "server" and self.creds.secure and self.cfg.seal_min_bytes:
            try:
                return SealedDealer(sock, self.counters, self._socket, host, self.limits,
                                    self.cfg.seal_min_bytes, self.cfg.seal_cipher)
            except ImportError:
                sock.close(linger=0)
                raise ConfigError(f"PSERVER_SEAL_CIPHER {self.cfg.seal_cipher} needs the `aeg` "
                                  "package: pip install 'pserver[aegis]', or use aes-256-gcm") from None
        return ZmqLink(sock, self.counters)

    def decode_body(self, body: list) -> tuple[wire.Message, str | None]:
        """Decode the frames a :meth:`Link.recv` returned -> (message, authenticated peer role or
        None). A batch is a :class:`wire.Batch`, its messages counted one by one. Raises
        ProtocolError (or LimitError, RequestsRefused) for malformed input; nothing is counted
        then."""
        if type(body) is Unopened:  # a sealed message whose chunks did not open
            raise body.refusal(self.limits)
        role = self.creds.peer_role(body[0]) if self.creds.secure and body else None
        msg = wire.decode(body, self.limits)
        if type(msg) is wire.Batch:
            self.counters.count_each(self.counters.received, [m.op for m in msg.messages],
                                     msg.sizes)
        else:
            self.counters.count(self.counters.received, msg.op, sum(map(len, body)))
        return msg, role

    def messages(self, link: Link, peer: str) -> Iterator[wire.Message]:
        """Every message waiting on an unrouted ``link``, decoded, without blocking. A malformed one
        is logged (naming ``peer``) and skipped: nothing received may stop the caller's loop."""
        while (item := link.recv()) is not None:
            try:
                msg, _ = self.decode_body(item[1])
            except PServerError as e:
                log.warning("malformed message from %s dropped: %s", peer, e)
                continue
            yield msg

    def close(self) -> None:
        for sock in self._sockets:
            try:
                sock.close(linger=0)
            except zmq.ZMQError:
                pass
        self._sockets.clear()
        self.creds.close()
        self.ctx.term()
