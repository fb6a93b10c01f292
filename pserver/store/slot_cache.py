"""SlotCache: the value slots of key lists a table has seen before, so a repeated list skips the
hash index.

A fingerprint (length, first, middle, last key) finds a candidate, used only if its keys equal the
list's exactly (a collision is a miss, never a wrong slot). A list is admitted on its second sighting
within a cache's worth of lists seen once; entries are LRU within ``max_bytes``; :meth:`clear` runs
whenever a key is removed. :meth:`memo` keeps facts derived from a list (a master's split by
replica); :meth:`own_copy` hands out the entry's key array (for pserver.ft.list_refs; read-only).
Why and measurements: docs/store.md, "Slot cache"."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MIN_KEYS = 256        # shorter lists are cheap to look up; caching them would not pay
_SEEN_MAX = 65536     # fingerprints remembered from first sightings, at most
_ENTRY_OVERHEAD = 256  # bytes counted per entry besides its arrays (bounds the entry count)
_BYTES_COMPARE_MAX = 16384  # keys: up to here comparing two copies' bytes beats np.array_equal


class SlotCache:
    """key list -> slots of its keys in one table; see the module docstring."""

    __slots__ = ("max_bytes", "entries", "seen", "seen_bytes", "nbytes", "hits", "misses",
                 "_last")

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("a slot cache's size is a number of bytes >= 0 (0 = off)")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, dict]] = OrderedDict()
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # seen once: fingerprint -> cost
        self.seen_bytes = 0
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        # (keys object, memo of its entry, the entry's own copy of the keys)
        self._last: tuple[np.ndarray, dict, np.ndarray] | None = None

    def get(self, keys: np.ndarray) -> tuple[tuple | None, np.ndarray | None]:
        """(fingerprint, cached slots) of ``keys`` (1-D uint64). The slots are None on a miss; the
        fingerprint is None when the list is not cacheable (too short, or the cache is off).
        Cached slots are shared by every later hit: callers must not change them (the compiled
        kernels take them as they are; a read-only flag would compile a second signature)."""
        n = keys.size
        self._last = None
        if n < MIN_KEYS or not self.max_bytes:
            return None, None
        fp = (n, int(keys[0]), int(keys[n >> 1]), int(keys[-1]))
        entry = self.entries.get(fp)
        if entry is not None:
            if entry[0] is keys or _equal(entry[0], keys):
                self.entries.move_to_end(fp)
                self.hits += 1
                self._last = (keys, entry[2], entry[0])
                return fp, entry[1]
            self._drop(fp)  # a collision: the list seen now takes the fingerprint over
        self.misses += 1
        return fp, None

    def offer(self, fp: tuple, keys: np.ndarray, slots: np.ndarray) -> None:
        """The slots of ``keys`` (fingerprint ``fp`` from :meth:`get`), every key present: stored
        if this is the list's second sighting (see the module docstring). ``slots`` must not be
        changed afterwards."""
        cost = self.seen.pop(fp, None)
        if cost is not None:
            self.seen_bytes -= cost
            self._store(fp, keys, slots)
            return
        cost = keys.nbytes + slots.nbytes + _ENTRY_OVERHEAD
        self.seen[fp] = cost
        self.seen_bytes += cost
        while self.seen_bytes > self.max_bytes or len(self.seen) > _SEEN_MAX:
            self.seen_bytes -= self.seen.popitem(last=False)[1]

    def memo(self, keys: np.ndarray) -> dict | None:
        """The memo of the cached list ``keys`` if ``keys`` is the array object the last
        get/offer found or stored (else None): facts derived from the list alone."""
        last = self._last
        return last[1] if last is not None and last[0] is keys else None

    def own_copy(self, keys: np.ndarray) -> np.ndarray | None:
        """The cache's own copy of the list ``keys`` if ``keys`` is the array object the last
        get/offer found or stored (else None). Passing that very copy to a later lookup finds the
        entry without comparing the keys; it must never be changed."""
        last = self._last
        return last[2] if last is not None and last[0] is keys else None

    def clear(self) -> None:
        self._last = None
        self.entries.clear()
        self.seen.clear()
        self.seen_bytes = 0
        self.nbytes = 0

    def stats(self) -> dict:
        return {"lists": len(self.entries), "bytes": self.nbytes, "hits": self.hits,
                "misses": self.misses}

    def _store(self, fp: tuple, keys: np.ndarray, slots: np.ndarray) -> None:
        cost = keys.nbytes + slots.nbytes + _ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        while self.nbytes + cost > self.max_bytes:
            self._drop(next(iter(self.entries)))
        memo: dict = {}
        own = keys.copy()
        self.entries[fp] = (own, slots, memo)
        self.nbytes += cost
        self._last = (keys, memo, own)

    def _drop(self, fp: tuple) -> None:
        keys, slots, _ = self.entries.pop(fp)
        self.nbytes -= keys.nbytes + slots.nbytes + _ENTRY_OVERHEAD


def _equal(cached: np.ndarray, keys: np.ndarray) -> bool:
    """Whether two uint64 key lists of the same length are equal. Below _BYTES_COMPARE_MAX keys
    their bytes are compared (1,000 keys: 0.6 us against np.array_equal's 2.9 us, which a hit
    pays on every repeated push); above, the copies would cost more than array_equal."""
    if keys.size <= _BYTES_COMPARE_MAX:
        return cached.tobytes() == keys.tobytes()
    return bool(np.array_equal(cached, keys))
