"""SlotCache: the value slots of key lists a table has seen before, so a repeated list skips the
hash index.

Iterative algorithms push and pull the same key lists round after round (a worker's block of
features; the aggregated update of a synchronous round; the part of it a master forwards to one
replica). The hash lookup of such a list is the largest per-key cost of a push into a large table:
every key is a cache miss in the index. A table's key -> slot mapping only changes when a key is
removed (its slot may then be reused), so the slots of a list found once stay right until then.

Lookup: a fingerprint (length, first, middle and last key) finds the candidate entry; the candidate
is used only if its keys equal the list's exactly (one vectorised compare, under 1 ns a key), so a
fingerprint collision is a miss, never a wrong slot. Admission: a list is stored on its second
sighting, and only if it came back before a cache's worth (``max_bytes``) of other lists seen once
went by: the first sighting only records the fingerprint, in a window of the lists seen once,
bounded by the bytes their entries would take. A list that comes back later than that would be
evicted by LRU before its next use anyway; not admitting it keeps a stream of lists that never
repeat, or repeat in too long a cycle, at a fingerprint each - no copies, no evictions. Entries
hold a copy of the keys and the slots (16 bytes a key), least recently used first, within
``max_bytes``. :meth:`clear` forgets everything; the table calls
it whenever a key is removed.

Memo: each entry also carries a dict for other facts derived from its list alone (a master's split
of the list by replica, with the ring version it was made for). :meth:`memo` hands it out for the
very array object the last :meth:`get` or :meth:`offer` saw, so the caller needs no second
comparison of the keys.

Identity: a lookup of the very array an entry holds is a hit without comparing the keys.
:meth:`own_copy` hands that array out (a replica keeps it for a list its master names instead of
sending, pserver.ft.list_refs); nobody may change it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MIN_KEYS = 256        # shorter lists are cheap to look up; caching them would not pay
_SEEN_MAX = 65536     # fingerprints remembered from first sightings, at most
_ENTRY_OVERHEAD = 256  # bytes counted per entry besides its arrays (bounds the entry count)


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
            if entry[0] is keys or np.array_equal(entry[0], keys):
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
