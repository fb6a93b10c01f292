"""Key caching (paper: "key caching"): send a signature of a key list the receiver already holds.

The receiver keeps recently seen key lists per peer in an LRU bounded in bytes; the sender mirrors
it and sends a 16-byte blake2b signature instead of keys it believes the receiver holds. The mirror
is a belief: a receiver that does not hold a signature raises KeyCacheMiss before applying
anything, and the sender resends with the keys (``FilterChain.resend_with_keys``). A wrong or
forged signature is a miss, never a mis-application. Header section and savings:
docs/filters.md ("key_cache").
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict

import numpy as np

from ..config import parse_size
from ..errors import ConfigError, KeyCacheMiss, ProtocolError
from .base import KEYS, Filter, FilterContext, Payload, header_int, header_section, header_str

__all__ = ["KeyCaching", "format_size", "key_signature", "parse_size"]

_SIG_RE = re.compile(r"[0-9a-f]{32}")
# Counted per cached list on both sides, so the entry count stays bounded even for short lists.
_ENTRY_OVERHEAD = 64
_SENT = "key_cache.sent"
_RECV = "key_cache.recv"


def key_signature(keys: np.ndarray) -> str:
    """blake2b-128 of the keys' little-endian uint64 bytes, as 32 lowercase hex characters."""
    data = np.ascontiguousarray(keys, dtype="<u8")
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def format_size(nbytes: int) -> str:
    """Canonical text of a size for filter names: 64M, 512k, 1G or plain bytes."""
    for suffix, shift in (("G", 30), ("M", 20), ("k", 10)):
        if nbytes >= (1 << shift) and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{suffix}"
    return str(nbytes)


class _ByteLRU:
    """signature -> (cost, keys or None), least recently used first, total cost <= capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.total = 0
        self.entries: OrderedDict[str, tuple[int, np.ndarray | None]] = OrderedDict()

    def get(self, sig: str) -> np.ndarray | None:
        entry = self.entries.get(sig)
        if entry is None:
            return None
        self.entries.move_to_end(sig)
        return entry[1]

    def touch(self, sig: str) -> bool:
        if sig not in self.entries:
            return False
        self.entries.move_to_end(sig)
        return True

    def put(self, sig: str, cost: int, keys: np.ndarray | None) -> None:
        old = self.entries.pop(sig, None)
        if old is not None:
            self.total -= old[0]
        self.entries[sig] = (cost, keys)
        self.total += cost
        while self.total > self.capacity:
            _, (c, _) = self.entries.popitem(last=False)
            self.total -= c


class KeyCaching(Filter):
    """Replace a key list the receiver already caches by its signature.

    capacity_bytes: bytes of key lists the receiver caches per peer (each list costs 8 bytes per
                    key plus 64); sender and receiver must use the same value (it is in the name).
    min_keys:       shorter lists are always sent as they are (a signature plus its header field
                    is about 70 bytes, so caching tiny lists does not pay). Sender-side only.
    """

    kind = "key_cache"
    stage = KEYS

    def __init__(self, capacity_bytes: int = 64 << 20, min_keys: int = 16) -> None:
        if capacity_bytes <= 0 or min_keys < 1:
            raise ConfigError("key_cache capacity must be > 0 bytes and min_keys >= 1")
        self.capacity_bytes = int(capacity_bytes)
        self.min_keys = int(min_keys)
        self.name = f"key_cache:{format_size(self.capacity_bytes)}"

    @classmethod
    def from_args(cls, args: list[str]) -> KeyCaching:
        """``key_cache[:SIZE]``, SIZE in bytes with optional k/M/G suffix (default 64M)."""
        if len(args) > 1:
            raise ConfigError("key_cache takes at most one argument, the cache size (e.g. 64M)")
        return cls(parse_size(args[0])) if args else cls()

    def _lru(self, ctx: FilterContext, slot: str) -> _ByteLRU:
        lru = ctx.state.get(slot)
        if not isinstance(lru, _ByteLRU) or lru.capacity != self.capacity_bytes:
            lru = ctx.state[slot] = _ByteLRU(self.capacity_bytes)
        return lru

    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        keys = p.keys
        if keys is None:
            return Payload(None, p.values, {**p.meta, self.kind: {"mode": "none"}}, p.frames)
        n = int(keys.shape[0])
        cost = keys.nbytes + _ENTRY_OVERHEAD
        if n < self.min_keys or cost > self.capacity_bytes:
            return Payload(keys, p.values, {**p.meta, self.kind: {"mode": "plain", "n": n}},
                           p.frames)
        sig = key_signature(keys)
        mirror = self._lru(ctx, _SENT)
        if mirror.touch(sig):
            ctx.counters.incr("key_cache.sig_sent")
            return Payload(None, p.values, {**p.meta, self.kind: {"mode": "sig", "n": n,
                                                                   "sig": sig}}, p.frames)
        mirror.put(sig, cost, None)
        return Payload(keys, p.values, {**p.meta, self.kind: {"mode": "store", "n": n}}, p.frames)

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        who = "key_cache"
        meta, sec = header_section(p.meta, self.kind)
        mode = header_str(sec, "mode", ("none", "plain", "store", "sig"), who)
        if mode == "none":
            if p.keys is not None:
                raise ProtocolError("key_cache: mode 'none' but the message carries keys")
            return Payload(None, p.values, meta, p.frames)
        n = header_int(sec, "n", 0, ctx.max_bytes // 8, who)
        if p.values is not None and p.values.shape[0] != n:
            raise ProtocolError(f"key_cache: header says {n} keys but {p.values.shape[0]} value "
                                "rows came")
        if mode in ("plain", "store"):
            if p.keys is None or p.keys.shape[0] != n:
                raise ProtocolError(f"key_cache: mode {mode!r} needs {n} keys in the message")
            if mode == "store":
                self._store(p.keys, ctx)
            return Payload(p.keys, p.values, meta, p.frames)
        if p.keys is not None:
            raise ProtocolError("key_cache: mode 'sig' but the message carries keys as well")
        sig = header_str(sec, "sig", None, who)
        if not _SIG_RE.fullmatch(sig):
            raise ProtocolError("key_cache: signature is not 32 lowercase hex characters")
        keys = self._lru(ctx, _RECV).get(sig)
        if keys is None or keys.shape[0] != n:
            ctx.counters.incr("key_cache.miss")
            raise KeyCacheMiss(f"key list {sig} from {ctx.peer!r} is not cached here (evicted, "
                               "restarted or wrong signature); resend the message with its keys",
                               signature=sig)
        ctx.counters.incr("key_cache.hit")
        return Payload(keys, p.values, meta, p.frames)

    def _store(self, keys: np.ndarray, ctx: FilterContext) -> None:
        cost = keys.nbytes + _ENTRY_OVERHEAD
        if cost > self.capacity_bytes:
            return
        if keys.shape[0] > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise ProtocolError("key_cache: keys to cache are not sorted and unique")
        # Own copy: the received array may be a view on a network buffer; read-only so that no
        # caller can change a list that later messages refer to by signature.
        own = np.array(keys, dtype=np.uint64)
        own.flags.writeable = False
        self._lru(ctx, _RECV).put(key_signature(own), cost, own)

    def reset_peer(self, ctx: FilterContext) -> None:
        """Forget which lists ``ctx.peer`` holds: the next message to it carries its keys."""
        ctx.state.pop(_SENT, None)
