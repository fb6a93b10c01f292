"""The sealed bulk channel: large arrays beside CURVE, sealed with AES-256-GCM by the application.

libzmq's CURVE encrypts a connection's bytes on one I/O thread (~0.5 GB/s here); AES-GCM with AES-NI
seals ~10 GB/s per core. On a secure cluster a DEALER link to a server and the server's ROUTER link
carry a message's arrays, when they hold at least ``seal_min`` bytes, in sealed chunks over a second,
plain TCP connection, and the header with a reference (sequence number, sizes) over CURVE. The key
travels inside CURVE; nonces come from each end's own counters and the CURVE-borne reference, so a
forged, replayed or reordered chunk fails its tag and is never used. Protocol: docs/sealed-bulk.md.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import time
from collections.abc import Iterator

import numpy as np
import zmq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .config import zmq_endpoint
from .errors import ConfigError, ProtocolError
from .link import _NOBLOCK, _SNDMORE, LinkError, LinkTimeout, ZmqLink, recv_frames
from .protocol import PART
from .wire import Limits, RequestsRefused, decode_header

log = logging.getLogger(__name__)

HELLO, WELCOME, REF = b"PSX1", b"PSX2", b"PSX3"  # control frames over CURVE (never reach the loops)
_PSX = b"PSX"
KEY_BYTES, TOKEN_BYTES, TAG = 32, 16, 16
CHUNK = 1 << 20        # bytes of plaintext per sealed chunk: the receiver opens one while the next travels
CHUNK_MIN, CHUNK_MAX = 64 << 10, 16 << 20  # chunk sizes a reference may name
WAIT = 5.0             # s a reference waits for the next chunk of its message before refusing it
STASH_CHUNKS = 512     # chunks read ahead of their reference, at most (oldest dropped beyond)
BULK_HWM = 8           # chunks one bulk connection may have waiting unread (then TCP backpressure)
POOL_BYTES = 64 << 20  # reusable buffers a link keeps, at most (docs/sealed-bulk.md: page faults)
_TO_SERVER, _TO_CLIENT = 1, 2
_NONCE = struct.Struct("<BBHQ")  # direction, frame, chunk, sequence number: 12 bytes
_CHUNK_HEAD = struct.Struct("<QII")  # sequence number, frame, chunk
_REF = struct.Struct("<4sQII")       # REF, sequence number, chunk size, frame count; frame sizes (u64)
_WELCOME = struct.Struct("<4sH")     # WELCOME, bulk port (0: the server does not seal)


class SealError(ProtocolError):
    """A sealed message that cannot be opened: a malformed or replayed reference, a chunk that is
    not authentic, or chunks missing after the wait. Nothing of it was used."""


class _Aegis128x2:
    """AEGIS-128X2 (the optional `aeg` package): the cryptography AEAD interface, 16-byte key."""

    def __init__(self, key: bytes):
        from aeg import aegis128x2
        self.cipher, self.key = aegis128x2, key[:16]

    def encrypt_into(self, nonce: bytes, data, ad, out) -> None:
        self.cipher.encrypt(self.key, nonce + bytes(4), data, ad, into=out)

    def decrypt_into(self, nonce: bytes, sealed, ad, out) -> None:
        try:
            self.cipher.decrypt(self.key, nonce + bytes(4), sealed, ad, into=out)
        except ValueError:  # its tag failed
            raise InvalidTag() from None


# cipher name -> (code in a HELLO, factory of an AEAD with encrypt_into / decrypt_into)
CIPHERS = {"aes-256-gcm": (1, AESGCM), "aegis-128x2": (2, _Aegis128x2)}
_BY_CODE = {code: factory for code, factory in CIPHERS.values()}


def available(name: str) -> bool:
    """Whether this process can seal with cipher ``name`` (its library imports)."""
    try:
        CIPHERS[name][1](bytes(KEY_BYTES))
    except (ImportError, KeyError):
        return False
    return True


def chunk_layout(sizes: list[int], chunk: int = CHUNK) -> list[tuple[int, int, int, int]]:
    """(frame, chunk, offset, length) of every chunk of frames of ``sizes`` bytes, in send order."""
    out = []
    for f, size in enumerate(sizes):
        for c, off in enumerate(range(0, size, chunk)):
            out.append((f, c, off, min(chunk, size - off)))
    return out


def encode_ref(seq: int, sizes: list[int], chunk: int = CHUNK) -> bytes:
    return _REF.pack(REF, seq, chunk, len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)


def decode_ref(buf, limits: Limits) -> tuple[int, list[int], int]:
    """(sequence number, frame sizes, chunk size) of a reference; SealError if malformed or over
    ``limits``."""
    if len(buf) < _REF.size:
        raise SealError("sealed reference shorter than its header")
    _, seq, chunk, count = _REF.unpack_from(buf)
    if not CHUNK_MIN <= chunk <= CHUNK_MAX:
        raise SealError(f"sealed reference names chunks of {chunk} bytes")
    if not 0 < count <= min(limits.max_arrays, 255) or len(buf) != _REF.size + 8 * count:
        raise SealError(f"sealed reference of {count} frames in {len(buf)} bytes is malformed")
    sizes = list(struct.unpack_from(f"<{count}Q", buf, _REF.size))
    if sum(sizes) > limits.max_message_bytes or sum(-(-n // chunk) for n in sizes) > 1 << 16:
        raise SealError(f"sealed message of {sum(sizes)} bytes exceeds the size limit of "
                        f"{limits.max_message_bytes}, or has over 65,536 chunks")
    return seq, sizes, chunk


class BufferPool:
    """Byte buffers handed out again once nothing else refers to them (their reference count says
    so: no array built on one, and no send still holding one, can see it change). Fresh memory costs
    a page fault per 4 KB page on this VM, about 2 ms per 4 MB message: as much as sealing it."""

    def __init__(self, limit: int = POOL_BYTES):
        self.limit, self.held, self.buffers = limit, 0, []

    def get(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of ``nbytes`` (its contents undefined) that nothing else refers to."""
        for buf in self.buffers:
            if buf.nbytes == nbytes and sys.getrefcount(buf) <= 3:  # the list, buf, the argument
                return buf
        buf = np.empty(nbytes, np.uint8)
        if nbytes <= self.limit // 4:
            while self.buffers and self.held + nbytes > self.limit:
                self.held -= self.buffers.pop(0).nbytes
            self.buffers.append(buf)
            self.held += nbytes
        return buf


class Channel:
    """The sealing state of one link (one DEALER and the server's view of it): the AEAD, the bulk
    connection's routing token and both directions' sequence numbers. No I/O."""

    def __init__(self, aead, token: bytes, outgoing: int, pool: BufferPool):
        self.aead, self.token, self.pool = aead, token, pool
        self.out_dir = outgoing
        self.in_dir = _TO_SERVER + _TO_CLIENT - outgoing
        self.chunk = CHUNK  # plaintext bytes per chunk this end seals (named in each reference)
        self.sent = 0      # last sequence number used for sending (each used once, sent or not)
        self.received = 0  # last sequence number opened: a reference must name a later one

    def seal(self, arrays: list) -> tuple[int, list[int], Iterator]:
        """(sequence number, sizes, generator of (chunk head, sealed chunk)) for ``arrays``; each
        chunk is sealed as the generator reaches it, so sealing overlaps the sending of the last."""
        self.sent += 1
        seq = self.sent
        flat = [a.reshape(-1).view(np.uint8) if type(a) is np.ndarray
                else np.frombuffer(a, np.uint8) for a in arrays]
        sizes = [f.nbytes for f in flat]

        def chunks():
            for f, c, off, n in chunk_layout(sizes, self.chunk):
                out = self.pool.get(n + TAG)
                self.aead.encrypt_into(_NONCE.pack(self.out_dir, f, c, seq), flat[f][off:off + n],
                                       None, out)
                yield _CHUNK_HEAD.pack(seq, f, c), out
        return seq, sizes, iter(chunks())

    def opener(self, seq: int, sizes: list[int], chunk: int = CHUNK) -> Opening:
        """An :class:`Opening` of the message ``seq`` (SealError if ``seq`` is not new)."""
        if seq <= self.received:
            raise SealError(f"sealed reference {seq} is not newer than {self.received}: replayed")
        self.received = seq
        return Opening(self, seq, sizes, chunk)


class Opening:
    """The chunks of one sealed message being opened into place. No I/O."""

    def __init__(self, channel: Channel, seq: int, sizes: list[int], chunk: int = CHUNK):
        self.channel, self.seq = channel, seq
        self.frames = [channel.pool.get(n) for n in sizes]
        self.missing = {(f, c): (off, n) for f, c, off, n in chunk_layout(sizes, chunk)}
        self.forged = 0

    def add(self, frame: int, chunk: int, sealed) -> bool:
        """Open one chunk into place; False if it is not one this message is missing, or if it is
        not authentic (then ``forged`` counts it, and none of the message may be used)."""
        where = self.missing.get((frame, chunk))
        if where is None:
            return False
        off, n = where
        if len(sealed) != n + TAG:
            self.forged += 1
            return False
        try:
            self.channel.aead.decrypt_into(
                _NONCE.pack(self.channel.in_dir, frame, chunk, self.seq), sealed, None,
                self.frames[frame][off:off + n])
        except InvalidTag:
            self.forged += 1
            return False
        del self.missing[(frame, chunk)]
        return True


class BulkReader:
    """Reads a bulk socket: chunks of the awaited message are opened; chunks of peers that sent a
    HELLO (``known`` routing ids), ahead of their reference, are kept (at most STASH_CHUNKS);
    anything else is dropped unread."""

    def __init__(self, sock: zmq.Socket, routed: bool, known: dict | None = None):
        self.sock, self.routed, self.known = sock, routed, known
        self.stash: dict[tuple[bytes, int], list] = {}  # (routing id, seq) -> [(frame, chunk, data)]
        self.stashed = 0

    def collect(self, opening: Opening, rid: bytes) -> list:
        """The opened frames of ``opening`` (rid: the bulk connection's routing id; b"" unrouted).
        Raises SealError at the first chunk of it that is not authentic (only its peer's bulk
        connection can carry its routing id), or if its chunks are not all there within the wait."""
        for frame, chunk, data in self.stash.pop((rid, opening.seq), ()):
            self.stashed -= 1
            opening.add(frame, chunk, data)
        self._drop_older(rid, opening.seq)
        if opening.forged:
            raise SealError(f"sealed message {opening.seq}: a chunk is not authentic")
        deadline = time.monotonic() + WAIT
        sock = self.sock
        while opening.missing:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SealError(f"sealed message {opening.seq}: {len(opening.missing)} chunks "
                                f"missing after {WAIT:g} s without one")
            if not sock.poll(int(left * 1000) + 1):
                continue
            while (frames := recv_frames(sock)) is not None:
                if self._take(frames, opening, rid):
                    deadline = time.monotonic() + WAIT  # the message progresses: wait on
                if opening.forged:
                    raise SealError(f"sealed message {opening.seq}: a chunk is not authentic")
                if not opening.missing:
                    break
        return opening.frames

    def _take(self, frames: list, opening: Opening, rid: bytes) -> bool:
        """Open, keep or drop one message of the bulk socket; True if it opened a chunk of
        ``opening``."""
        if self.routed:
            who, frames = frames[0].bytes, frames[1:]
        else:
            who = b""
        if len(frames) != 2 or len(frames[0]) != _CHUNK_HEAD.size:
            return False  # not a chunk: dropped
        seq, frame, chunk = _CHUNK_HEAD.unpack(frames[0].buffer)
        if who == rid and seq == opening.seq:
            return opening.add(frame, chunk, frames[1].buffer)
        if (who != rid and (self.known is None or who in self.known)) or (
                who == rid and seq > opening.seq):  # ahead of its reference, or another peer's
            if self.stashed >= STASH_CHUNKS:
                self._drop_oldest()
            self.stash.setdefault((who, seq), []).append((frame, chunk, frames[1].buffer))
            self.stashed += 1
        return False

    def _drop_older(self, rid: bytes, seq: int) -> None:
        for key in [k for k in self.stash if k[0] == rid and k[1] < seq]:
            self.stashed -= len(self.stash.pop(key))

    def _drop_oldest(self) -> None:
        key = next(iter(self.stash))
        self.stashed -= len(self.stash.pop(key))
        log.warning("sealed chunks read ahead of their reference exceed %d: dropped the oldest",
                    STASH_CHUNKS)

    def forget(self, rid: bytes) -> None:
        for key in [k for k in self.stash if k[0] == rid]:
            self.stashed -= len(self.stash.pop(key))


class Unopened(list):
    """The frames of a sealed message that could not be opened: its header alone, and ``error``.
    ``Transport.decode_body`` refuses it as :meth:`refusal` says."""

    def __init__(self, frames: list, error: SealError):
        super().__init__(frames)
        self.error = error

    def refusal(self, limits: Limits) -> ProtocolError:
        """The error to answer it with: RequestsRefused naming its request when its header (which
        came over CURVE) can be read, else the SealError itself."""
        if not self:  # a reference without a header
            return self.error
        try:
            msg = decode_header(self[0], limits)
        except ProtocolError:
            return self.error
        return RequestsRefused(f"sealed {msg.op} could not be opened: {self.error}",
                               [(msg.ts, msg.meta.get(PART))])


def _open(channel: Channel | None, reader: BulkReader | None, body: list, limits: Limits) -> list:
    """[header, arrays...] of a sealed message ``body`` ([reference, header]), or an
    :class:`Unopened` (its header alone, refused in order, naming the request) if it cannot be
    opened."""
    try:
        if channel is None or reader is None or len(body) != 2:
            raise SealError("sealed message without a HELLO, a bulk connection or a header")
        seq, sizes, chunk = decode_ref(body[0].buffer, limits)
        rid = channel.token if reader.routed else b""
        return [body[1], *reader.collect(channel.opener(seq, sizes, chunk), rid)]
    except SealError as e:
        return Unopened(body[1:2], e)


def _is_control(frame) -> bool:
    buf = frame.buffer if type(frame) is zmq.Frame else frame
    return len(buf) >= 4 and buf[:3] == _PSX


def _sizes_of(frames: list) -> int:
    return sum(f.nbytes if type(f) is np.ndarray else len(f) for f in frames[1:])


def _send_sealed(link: ZmqLink, channel: Channel, send_chunk, frames: list, op: str,
                 to: bytes | None) -> None:
    """Send ``frames`` sealed with ``channel``: the first chunk on the bulk connection (through
    ``send_chunk``), then the reference and header over CURVE (the receiver starts opening while
    the rest is sealed and carried), then the other chunks. If the first chunk cannot go (no bulk
    connection yet, or any more), the whole message goes over CURVE instead. Raises LinkError as
    :meth:`Link.send_frames`."""
    seq, sizes, chunks = channel.seal(frames[1:])
    chunk = channel.chunk
    try:
        send_chunk(*next(chunks))
    except zmq.ZMQError:
        return ZmqLink.send_frames(link, frames, op, to)
    _send_ref(link, encode_ref(seq, sizes, chunk), sum(sizes), frames[0], op, to)
    try:
        for head, data in chunks:
            send_chunk(head, data)
    except zmq.ZMQError as e:  # the bulk connection broke: the receiver refuses it after its wait
        log.warning("sealed %r lost its bulk connection mid-message: %s", op, e)


def _send_ref(link: ZmqLink, ref: bytes, nbytes: int, header, op: str, to: bytes | None) -> None:
    """Send a sealed message's reference and header over CURVE, counted at the message's size."""
    sock = link.sock
    try:
        if to is not None:
            sock.send(to, _SNDMORE)
        sock.send(ref, _SNDMORE)
        sock.send(header, 0, copy=False)
    except zmq.Again as e:
        raise LinkTimeout(f"cannot send {op!r}: no peer took it in time") from e
    except zmq.ZMQError as e:
        raise LinkError(f"cannot send {op!r}: {e}") from e
    if link.counters is not None:
        link.counters.count(link.counters.sent, op, len(header) + nbytes)


class SealedDealer(ZmqLink):
    """A DEALER link to a server that seals arrays of at least ``seal_min`` bytes (see the module)."""

    def __init__(self, sock: zmq.Socket, counters, make_socket, host: str, limits: Limits,
                 seal_min: int, cipher: str = "aes-256-gcm"):
        super().__init__(sock, counters)
        self.make_socket, self.host, self.limits, self.seal_min = make_socket, host, limits, seal_min
        key, token = os.urandom(KEY_BYTES), os.urandom(TOKEN_BYTES)
        code, factory = CIPHERS[cipher]
        self.channel = Channel(factory(key), token, _TO_SERVER, BufferPool())
        self.bulk: zmq.Socket | None = None
        self.reader: BulkReader | None = None
        self._ready = None  # a message poll() read to skip a WELCOME, for the next recv()
        # first on the CURVE stream: the server knows the key before any reference
        sock.send(HELLO + bytes((code,)) + key + token)

    def send_frames(self, frames: list, op: str, to: bytes | None = None) -> None:
        if self.bulk is None or len(frames) < 2 or _sizes_of(frames) < self.seal_min:
            return super().send_frames(frames, op, to)
        bulk = self.bulk

        def send_chunk(head, data):
            bulk.send(head, _SNDMORE | _NOBLOCK)
            bulk.send(data, 0, copy=False)
        _send_sealed(self, self.channel, send_chunk, frames, op, to)

    def poll(self, timeout: float | None) -> bool:
        """As :meth:`Link.poll`; a control message (the WELCOME) that comes meanwhile is handled,
        not counted: True means :meth:`recv` returns a message."""
        if self._ready is not None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not super().poll(left):
                return False
            self._ready = self.recv()
            if self._ready is not None:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def recv(self) -> tuple[bytes | None, list] | None:
        if self._ready is not None:
            item, self._ready = self._ready, None
            return item
        while (frames := recv_frames(self.sock)) is not None:
            if not _is_control(frames[0]):
                return None, frames
            kind = frames[0].buffer[:4].tobytes()
            if kind == WELCOME:
                self._welcome(frames[0].buffer)
            elif kind == REF:
                return None, _open(self.channel, self.reader, frames, self.limits)
            else:
                log.warning("unknown control frame %r from a server dropped", kind)
        return None

    def _welcome(self, buf) -> None:
        if len(buf) != _WELCOME.size or self.bulk is not None:
            return
        _, port = _WELCOME.unpack(buf)
        if not port:
            return  # the server does not seal: everything goes over CURVE
        bulk = self.make_socket(zmq.DEALER)
        bulk.rcvhwm = BULK_HWM
        bulk.setsockopt(zmq.IMMEDIATE, 1)  # no connection: a send fails at once (then CURVE)
        bulk.identity = self.channel.token
        bulk.maxmsgsize = CHUNK_MAX + TAG + 64
        if ":" in self.host:
            bulk.setsockopt(zmq.IPV6, 1)
        bulk.connect(zmq_endpoint(self.host, port))
        self.bulk, self.reader = bulk, BulkReader(bulk, routed=False)

    def close(self, linger: float = 0.0) -> None:
        if self.bulk is not None and not self.bulk.closed:
            self.bulk.close(linger=int(linger * 1000))
        super().close(linger)


class SealedRouter(ZmqLink):
    """A server's ROUTER link that answers HELLOs and seals large replies to the DEALERs that sent
    one (bulk ROUTER bound beside it when ``seal_min`` > 0; 0 answers every HELLO with port 0)."""

    def __init__(self, sock: zmq.Socket, counters, make_socket, host: str, limits: Limits,
                 seal_min: int):
        super().__init__(sock, counters)
        self.limits, self.seal_min = limits, seal_min
        self.channels: dict[bytes, Channel] = {}  # CURVE identity -> its channel
        self.tokens: dict[bytes, bytes] = {}      # bulk routing id -> CURVE identity
        self.pool = BufferPool()
        self.bulk, self.bulk_port, self.reader = None, 0, None
        if seal_min:
            bulk = make_socket(zmq.ROUTER)
            bulk.rcvhwm = BULK_HWM
            bulk.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a token not connected: the send fails
            bulk.maxmsgsize = CHUNK_MAX + TAG + 64    # no bigger frame is allocated
            if ":" in host:
                bulk.setsockopt(zmq.IPV6, 1)
            try:
                self.bulk_port = bulk.bind_to_random_port(zmq_endpoint(host, "").rsplit(":", 1)[0])
            except zmq.ZMQError as e:
                raise ConfigError(f"cannot bind the sealed bulk port on {host}: {e} (or set "
                                  "PSERVER_SEAL_MIN=0)") from None
            self.bulk, self.reader = bulk, BulkReader(bulk, routed=True, known=self.tokens)

    def recv(self) -> tuple[bytes | None, list] | None:
        while (frames := recv_frames(self.sock)) is not None:
            if len(frames) < 2 or not _is_control(frames[1]):
                return frames[0].bytes, frames[1:]
            identity, body = frames[0].bytes, frames[1:]
            kind = body[0].buffer[:4].tobytes()
            if kind == REF:
                opened = _open(self.channels.get(identity), self.reader, body, self.limits)
                if type(opened) is Unopened:
                    log.warning("sealed request from %r refused: %s", identity[:16], opened.error)
                return identity, opened
            if kind == HELLO and len(body) == 1:
                self._hello(identity, body[0].buffer)
            else:  # a malformed control frame: the loop answers it as malformed
                return identity, body
        return None

    def _hello(self, identity: bytes, buf) -> None:
        if len(buf) != 5 + KEY_BYTES + TOKEN_BYTES:
            return
        old = self.channels.pop(identity, None)
        if old is not None:
            self.tokens.pop(old.token, None)
            if self.reader is not None:
                self.reader.forget(old.token)
        factory, port = _BY_CODE.get(buf[4]), 0
        key, token = bytes(buf[5:5 + KEY_BYTES]), bytes(buf[5 + KEY_BYTES:])
        if token in self.tokens:  # another link's bulk routing id: this one stays on CURVE
            log.warning("a HELLO from %r named a bulk token in use: CURVE carries its messages",
                        identity[:16])
        elif self.bulk is not None and factory is not None:
            try:
                self.channels[identity] = Channel(factory(key), token, _TO_CLIENT, self.pool)
                self.tokens[token] = identity
                port = self.bulk_port
            except ImportError:  # a cipher whose library this server lacks: CURVE only
                log.warning("a peer asked to seal with a cipher this server cannot use "
                            "(`pip install aeg` for aegis-128x2): CURVE carries its messages")
        try:
            self.sock.send(identity, _SNDMORE)
            self.sock.send(_WELCOME.pack(WELCOME, port))
        except zmq.ZMQError as e:
            log.debug("cannot welcome %r: %s", identity[:16], e)

    def send_frames(self, frames: list, op: str, to: bytes | None = None) -> None:
        channel = self.channels.get(to) if len(frames) > 1 and self.bulk is not None else None
        if channel is None or _sizes_of(frames) < self.seal_min:
            return super().send_frames(frames, op, to)
        bulk, token = self.bulk, channel.token

        def send_chunk(head, data):
            bulk.send(token, _SNDMORE)
            bulk.send(head, _SNDMORE)
            bulk.send(data, 0, copy=False)
        _send_sealed(self, channel, send_chunk, frames, op, to)

    def close(self, linger: float = 0.0) -> None:
        if self.bulk is not None and not self.bulk.closed:
            self.bulk.close(linger=0)
        super().close(linger)
