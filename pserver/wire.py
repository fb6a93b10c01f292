"""The wire format: one codec, one place.

A message is a JSON header (op, timestamp, table, op fields, array descriptors) plus numpy arrays:
zero-copy frames for large messages, inline after the header for small ones. Nothing received is
unpickled or evaluated: dtypes come from a whitelist and every declared length is checked against
its frame before any array is built, so a lying header cannot make the receiver allocate.
A batch carries several single-frame messages of one sender in one frame (request coalescing).
The frame layout and its trade-offs: docs/design.md, "Wire format"; batches: docs/performance.md."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from .errors import LimitError, ProtocolError
from .protocol import PART

MAGIC = b"PS1"
_HLEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _HLEN.size
INLINE_BYTES = 32 * 1024  # below this, copying arrays into one frame beats sending several frames
_ZEROS = bytes(8)
# Headers are parsed and built with orjson (5-15x faster than the json module on our small headers,
# a measurable share of a 1,000-key request). orjson handles integers of at most 64 bits and parses
# larger ones as floats, so a header holding one (a key bound of 2**64) is built by the json module
# and flagged in the top bit of its length word; the receiver then parses it with the json module too.
_json_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_WIDE_INTS = 1 << 31


def _dumps(header: dict) -> tuple[bytes, int]:
    """(JSON bytes, flag for the length word)."""
    try:
        return orjson.dumps(header), 0
    except TypeError:  # an integer beyond 64 bits, or a value only the json module converts
        return _json_encode(header).encode(), _WIDE_INTS


# dtype code on the wire -> numpy dtype. Little-endian only; anything else is rejected.
DTYPES: dict[str, np.dtype] = {
    code: np.dtype(code)
    for code in ("<u8", "<i8", "<f4", "<f8", "<f2", "<u4", "<i4", "<u2", "|u1", "|i1")
}
_CODE_OF = {dt: code for code, dt in DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced on every received message before allocation.

    max_message_bytes: total payload bytes of all array frames.
    max_keys: entries in any one array (keys per request).
    max_dim: columns of a 2-D array (value dimension).
    max_header_bytes: size of the JSON header frame.
    max_arrays: arrays of one message. max_batch: messages of one batch.
    """

    max_message_bytes: int = 1 << 31
    max_keys: int = 1 << 28
    max_dim: int = 1 << 24
    max_header_bytes: int = 1 << 16
    max_arrays: int = 64
    max_batch: int = 1024


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message. ``meta`` holds small op-specific fields (JSON values only)."""

    op: str
    ts: int = 0
    table: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)


def _code(arr: np.ndarray) -> str:
    try:
        return _CODE_OF[arr.dtype]
    except KeyError:
        raise ProtocolError(f"dtype {arr.dtype} cannot be sent; use one of {sorted(DTYPES)}") from None


def encode(msg: Message) -> list:
    """Frames for ``msg``.

    Small messages (arrays totalling at most INLINE_BYTES) travel as ONE frame: the header followed by
    the arrays, each 8-byte aligned - one send instead of several is the cheapest thing on the per-message
    path. Larger arrays travel as their own frames, without a copy.
    """
    header: dict[str, Any] = {"op": msg.op, "ts": msg.ts}
    if msg.table:
        header["t"] = msg.table
    if msg.meta:
        header["m"] = msg.meta
    if not msg.arrays:
        head, flag = _dumps(header)
        return [MAGIC + _HLEN.pack(len(head) | flag) + head]
    # one pass over the arrays (this runs for every request and reply): contiguous copies where
    # needed, their specs and their total size
    arrays, specs, total = [], [], 0
    for a in msg.arrays:
        if type(a) is not np.ndarray or not a.ndim or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)  # as before: also makes 0-d values 1-d
        arrays.append(a)
        specs.append([_code(a), list(a.shape)])
        total += a.nbytes
    header["a"] = specs
    inline = total <= INLINE_BYTES
    if inline:
        header["i"] = 1
    head, flag = _dumps(header)
    prefix = MAGIC + _HLEN.pack(len(head) | flag) + head
    if not inline:
        return [prefix, *arrays]
    parts: list = [prefix, _ZEROS[: -len(prefix) & 7]]
    for a in arrays:
        parts.append(a)
        parts.append(_ZEROS[: -a.nbytes & 7])
    return [b"".join(parts)]


def encode_push(ts: int, table: str, meta: dict, keys: np.ndarray, vals: np.ndarray) -> list | None:
    """The frames ``encode`` makes of a push of explicit ``keys`` (1-D uint64, contiguous) and
    ``vals`` (2-D, contiguous, a wire dtype) - byte for byte - in one pass without a Message; None
    when they do not travel inline (the caller then encodes a Message). Raises nothing. The
    worker's hot path."""
    n, cols = vals.shape
    total = keys.nbytes + vals.nbytes
    if total > INLINE_BYTES or not (keys.flags.c_contiguous and vals.flags.c_contiguous):
        return None
    code = _CODE_OF.get(vals.dtype)
    if code is None:
        return None
    try:
        head = orjson.dumps({"op": "push", "ts": ts, "t": table, "m": meta,
                             "a": [["<u8", [n]], [code, [n, cols]]], "i": 1})
    except TypeError:  # a value only the json module converts: the general path
        return None
    prefix = MAGIC + _HLEN.pack(len(head)) + head
    return [b"".join((prefix, _ZEROS[: -len(prefix) & 7], keys, vals, _ZEROS[: -vals.nbytes & 7]))]


def _buffer(frame) -> memoryview:
    # zmq.Frame (copy=False receive) exposes .buffer; bytes/bytearray/memoryview are used as they are.
    buf = getattr(frame, "buffer", frame)
    return buf if type(buf) is memoryview else memoryview(buf)


def _header(first: memoryview, size: int, limits: Limits) -> tuple:
    """(op, ts, table, meta, header object, end offset) of a frame starting with MAGIC, each
    checked. Raises ProtocolError / LimitError."""
    (hlen,) = _HLEN.unpack_from(first, 3)
    wide, hlen = hlen & _WIDE_INTS, hlen & (_WIDE_INTS - 1)
    if hlen > limits.max_header_bytes:
        raise LimitError(f"header of {hlen} bytes exceeds the limit of {limits.max_header_bytes}")
    end = _PREFIX + hlen
    if end > size:
        raise ProtocolError(f"header length {hlen} runs past the end of the frame")
    try:
        raw = first[_PREFIX:end]  # orjson reads the memoryview without a copy
        header = json.loads(raw.tobytes()) if wide else orjson.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # deep nesting: RecursionError
        raise ProtocolError(f"header is not valid JSON: {e}") from None
    if type(header) is not dict:
        raise ProtocolError("header is not a JSON object")
    get = header.get
    op, ts, table, meta = get("op"), get("ts", 0), get("t", ""), get("m", {})
    if type(op) is not str or not op:
        raise ProtocolError("header has no op")
    if type(ts) is not int or not -(1 << 62) < ts < (1 << 62):
        raise ProtocolError("header ts is not an integer")
    if type(table) is not str or len(table) > 256:
        raise ProtocolError("header table name is not a short string")
    if type(meta) is not dict:
        raise ProtocolError("header meta is not an object")
    return op, ts, table, meta, header, end


def decode_header(frame, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The header of a message's first frame alone, without its arrays (to answer a request whose
    arrays could not be read). Raises ProtocolError / LimitError if the header is malformed."""
    first = _buffer(frame)
    if len(first) < _PREFIX or first[:3] != MAGIC:
        raise ProtocolError("not a pserver message (bad magic or protocol version)")
    op, ts, table, meta, _, _ = _header(first, len(first), limits)
    return Message(op, ts, table, meta, [])


def decode(frames: list, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse frames into a :class:`Message`; raise :class:`ProtocolError` on anything malformed.

    Array data is not copied: each array is a view on the buffer of the frame that carried it.
    """
    if not frames:
        raise ProtocolError("empty message")
    first = _buffer(frames[0])
    size = len(first)
    if size < _PREFIX or first[:3] != MAGIC:
        if first[:4] == BATCH_MAGIC and len(frames) == 1:
            return decode_batch(first, limits)
        raise ProtocolError("not a pserver message (bad magic or protocol version)")
    op, ts, table, meta, header, end = _header(first, size, limits)
    get = header.get
    specs = get("a")
    if specs is None and "i" not in header:  # no arrays: the common reply
        if len(frames) != 1:
            raise ProtocolError(f"header declares 0 arrays but {len(frames) - 1} frames came")
        if size != end:
            raise ProtocolError("trailing bytes after the header")
        return Message(op, ts, table, meta, [])
    if specs is None:
        specs = []
    if type(specs) is not list or len(specs) > limits.max_arrays:
        raise ProtocolError("header array list is malformed or too long")
    inline = get("i") == 1
    if inline:
        if len(frames) != 1:
            raise ProtocolError("an inline message must be a single frame")
        offset = end + (-end & 7)
    elif len(specs) != len(frames) - 1:
        raise ProtocolError(f"header declares {len(specs)} arrays but {len(frames) - 1} frames came")
    elif size != end:
        raise ProtocolError("trailing bytes after the header")
    arrays = []
    total = 0
    max_bytes = limits.max_message_bytes
    for i, spec in enumerate(specs):
        dtype, shape, nbytes = _check_spec(spec, limits)
        total += nbytes
        if total > max_bytes:
            raise LimitError(f"message exceeds the size limit of {max_bytes} bytes")
        # np.ndarray over the buffer: a view like np.frombuffer's, built ~4x faster
        if inline:
            if offset + nbytes > size:
                raise ProtocolError("inline arrays run past the end of the frame")
            arrays.append(np.ndarray(shape, dtype, first, offset))
            offset += nbytes + (-nbytes & 7)
        else:
            buf = _buffer(frames[i + 1])
            if len(buf) != nbytes:
                raise ProtocolError(f"frame has {len(buf)} bytes but its header declares {nbytes}")
            arrays.append(np.ndarray(shape, dtype, buf))
    if inline and offset != size:
        raise ProtocolError(f"frame has {size} bytes but its header accounts for {offset}")
    return Message(op, ts, table, meta, arrays)


def _check_spec(spec, limits: Limits) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, bytes) of one array spec [code, [n]] or [code, [n, d]]; ProtocolError or
    LimitError if malformed or too large. Unrolled for the one or two dimensions allowed: this
    runs for every array received."""
    if type(spec) is not list or len(spec) != 2 or type(spec[1]) is not list:
        raise ProtocolError(f"bad array spec {spec!r:.80}")
    code, dims = spec
    dtype = DTYPES.get(code) if type(code) is str else None
    if dtype is None:
        raise ProtocolError(f"dtype {code!r:.20} is not allowed")
    if len(dims) == 1:
        n = dims[0]
        if type(n) is not int or n < 0:
            raise ProtocolError(f"bad array spec {spec!r:.80}")
        shape: tuple[int, ...] = (n,)
        count = n
    elif len(dims) == 2:
        n, d = dims
        if type(n) is not int or type(d) is not int or n < 0 or d < 0:
            raise ProtocolError(f"bad array spec {spec!r:.80}")
        if d > limits.max_dim:
            raise LimitError(f"value dimension {d} exceeds the limit {limits.max_dim}")
        shape = (n, d)
        count = n * d
    else:
        raise ProtocolError(f"bad array spec {spec!r:.80}")
    if n > limits.max_keys:
        raise LimitError(f"array of {n} entries exceeds the limit of {limits.max_keys} keys")
    return dtype, shape, count * dtype.itemsize


# -- batches: several single-frame messages of one sender in one frame ------------------------------
# Layout: BATCH_MAGIC, u32 count, then per message a u32 length, 4 zero bytes and the message's frame,
# zero-padded to 8 bytes (every message starts 8-byte aligned, so its inline arrays stay aligned).
BATCH_MAGIC = b"PSB\0"
BATCH_OP = "batch"
_U32 = struct.Struct("<I")
_ENTRY = struct.Struct("<II")


@dataclass
class Batch(Message):
    """A decoded batch: ``messages`` in the order sent and the byte ``sizes`` of their frames (op
    is BATCH_OP, no arrays of its own)."""

    messages: list[Message] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


class RequestsRefused(ProtocolError):
    """Requests that could be attributed but not read whole: each is answered with the error and
    none is applied. ``requests`` names the (ts, part) of each."""

    def __init__(self, msg: str, requests: list[tuple[int, Any]]):
        super().__init__(msg)
        self.requests = requests


class BatchError(RequestsRefused):
    """A batch with a malformed or over-limit message: none of it may be applied. ``requests``
    names the (ts, part) of every message that could still be read, to answer each with the error."""


def encode_batch(frames: list) -> bytes:
    """One frame carrying ``frames`` (each the single frame ``encode`` made of a message)."""
    parts: list = [BATCH_MAGIC, _U32.pack(len(frames))]
    for f in frames:
        n = len(f)
        parts.append(_ENTRY.pack(n, 0))
        parts.append(f)
        parts.append(_ZEROS[: -n & 7])
    return b"".join(parts)


def _batch_entries(buf: memoryview, limits: Limits) -> list[memoryview]:
    """The frames of a batch's messages (views, no copy); ProtocolError / LimitError if the
    envelope is malformed."""
    size = len(buf)
    if size < 8:
        raise ProtocolError("batch shorter than its envelope")
    (count,) = _U32.unpack_from(buf, 4)
    if count > limits.max_batch:
        raise LimitError(f"batch of {count} messages exceeds the limit of {limits.max_batch}")
    if not count:
        raise ProtocolError("empty batch")
    entries, offset, unpack = [], 8, _ENTRY.unpack_from
    for _ in range(count):
        if offset + 8 > size:
            raise ProtocolError("batch entries run past the end of the frame")
        n, zero = unpack(buf, offset)
        start = offset + 8
        offset = start + n + (-n & 7)
        if zero or offset > size:
            raise ProtocolError("batch entry length runs past the end of the frame")
        entries.append(buf[start:start + n])
    if offset != size:
        raise ProtocolError(f"batch has {size} bytes but its entries account for {offset}")
    return entries


def decode_batch(buf: memoryview, limits: Limits = DEFAULT_LIMITS) -> Batch:
    """Decode a batch frame (starting with BATCH_MAGIC) and every message in it, all before any is
    used. Raises ProtocolError / LimitError for a malformed envelope, :class:`BatchError` (with the
    requests it could read) when a message in it is malformed or over the limits."""
    if len(buf) > limits.max_message_bytes + limits.max_batch * (limits.max_header_bytes + 512):
        raise LimitError(f"batch exceeds the size limit of {limits.max_message_bytes} bytes")
    entries = _batch_entries(buf, limits)
    messages, failed = [], None
    for entry in entries:
        try:
            if entry[:4] == BATCH_MAGIC:
                raise ProtocolError("a batch inside a batch")
            messages.append(decode([entry], limits))
        except ProtocolError as e:  # LimitError is one
            failed = e
            break
    if failed is None:
        return Batch(BATCH_OP, messages=messages, sizes=[len(e) for e in entries])
    requests = []
    for entry in entries:  # attribution only: each is answered with the error, none applied
        if entry[:4] == BATCH_MAGIC:
            continue
        try:
            m = decode([entry], _ATTRIBUTION)
        except ProtocolError:
            continue
        requests.append((m.ts, m.meta.get(PART)))
    raise BatchError(f"a message of the batch was refused: {failed}", requests)


_ATTRIBUTION = Limits(max_message_bytes=1 << 62, max_keys=1 << 62, max_dim=1 << 62,
                      max_header_bytes=1 << 24, max_arrays=1 << 10, max_batch=1 << 20)
