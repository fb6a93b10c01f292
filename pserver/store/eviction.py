"""Eviction of rows (TableSpec.ttl_steps / ttl_seconds, the server's --max-table-bytes): which
stored rows a master drops. Pure decisions over per-slot usage arrays; the master removes the rows
and forwards their keys to its replicas (pserver.kv.core), so every copy evicts the same rows.
docs/torch.md, "Eviction"."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

INDEX_BYTES_PER_ROW = 64   # hash index: 16-byte buckets at load 0.25..0.5 (the worst case)
USAGE_BYTES_PER_ROW = 16   # Usage: last step and push count
SWEEP_EVERY = 64           # pushes to a table between two of its sweeps
HIGH_WATER = 0.9           # a master keeps its own rows under this share of its part of the budget
LOW_WATER = 0.9            # ... evicting down to this share of that limit
RECHECK = 0.05             # a sweep that freed nothing: the next when the rows grew by this share


class Usage:
    """Per slot: the table step of its last push and its number of pushes (for LFU)."""

    def __init__(self, capacity: int) -> None:
        self.last = np.zeros(capacity, np.int64)
        self.hits = np.zeros(capacity, np.int64)

    def grow(self, capacity: int, used: int) -> None:
        """Room for ``capacity`` slots, keeping the first ``used``."""
        for name in ("last", "hits"):
            new = np.zeros(capacity, np.int64)
            new[:used] = getattr(self, name)[:used]
            setattr(self, name, new)

    def reset(self, slots: np.ndarray, step: int) -> None:
        """New rows in ``slots`` (maybe reused): used now, never pushed."""
        self.last[slots] = step
        self.hits[slots] = 0

    def touch(self, slots: np.ndarray, step: int) -> None:
        """Rows ``slots`` (unique) were pushed at ``step``."""
        self.last[slots] = step
        self.hits[slots] += 1


class StepClock:
    """(time, step) samples, so that an age in seconds becomes a table step: rows last pushed at
    or before ``step_at(t)`` were last pushed at or before time t."""

    def __init__(self, horizon: float) -> None:
        self.horizon = horizon
        self._samples: deque[tuple[float, int]] = deque()

    def note(self, now: float, step: int) -> None:
        self._samples.append((now, step))
        # keep one sample older than the horizon: it answers step_at(now - horizon)
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.horizon:
            self._samples.popleft()

    def step_at(self, t: float) -> int:
        """The last step noted at or before time ``t`` (0 if none)."""
        step = 0
        for when, s in self._samples:
            if when > t:
                break
            step = s
        return step


class EvictionPolicy:
    """A table's eviction rules. ``max_bytes``: the server's budget for the table (0 = none),
    counted as rows x row_cost (values, optimizer state, index and usage bytes per row)."""

    def __init__(self, ttl_steps: int, ttl_seconds: float, max_bytes: int, value_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_steps, self.max_bytes = int(ttl_steps), int(max_bytes)
        self.row_cost = value_bytes + INDEX_BYTES_PER_ROW + USAGE_BYTES_PER_ROW
        self.clock = clock
        self.seconds = StepClock(ttl_seconds) if ttl_seconds > 0 else None
        self.next_sweep = SWEEP_EVERY
        self.hold_rows = 0     # no budget sweep before the table holds this many rows

    @property
    def ttl(self) -> bool:
        return self.ttl_steps > 0 or self.seconds is not None

    def max_rows(self, copies: int = 1) -> int | None:
        """Rows one master may keep of its own (None: no budget): HIGH_WATER of its part of the
        budget, which the ``copies`` (1 + replicas) of every key range a server holds share.
        Its sweeps keep the rows of every server under the budget: each master's own rows stay
        under its part (they grow by at most RECHECK of it between two sweeps)."""
        if not self.max_bytes:
            return None
        return max(1, int(self.max_bytes // self.row_cost // max(1, copies) * HIGH_WATER))

    def slot_bound(self) -> int | None:
        """Value slots worth allocating under the budget (as many as its rows: the masters keep
        HIGH_WATER of them, the rest is room for what a push adds before its sweep); None
        without a budget."""
        if not self.max_bytes:
            return None
        return max(16, self.max_bytes // self.row_cost)

    def pushed(self, step: int) -> None:
        if self.seconds is not None:
            self.seconds.note(self.clock(), step)

    def due(self, step: int, rows: int, copies: int = 1) -> bool:
        """Whether a sweep is due after push ``step`` with ``rows`` stored (own and replicas'):
        every SWEEP_EVERY pushes, and when the rows exceed what the master may keep."""
        limit = self.max_rows(copies)
        return step >= self.next_sweep or (limit is not None and rows > limit
                                           and rows >= self.hold_rows)

    def expire_before(self, step: int) -> int:
        """Rows last pushed at or before this step have expired (-1: none)."""
        cut = step - self.ttl_steps if self.ttl_steps > 0 else -1
        if self.seconds is not None:
            cut = max(cut, self.seconds.step_at(self.clock() - self.seconds.horizon))
        return cut

    def victims(self, last: np.ndarray, hits: np.ndarray, step: int, copies: int = 1,
                rows: int = 0) -> np.ndarray:
        """Indices (into ``last``/``hits``, the usage of a master's own rows) of the rows to
        evict after push ``step``: the expired ones, then - while more rows remain than
        max_rows(copies) - the least frequently pushed (the oldest first among equals), down to
        LOW_WATER of that. ``rows``: all the rows stored (own and replicas')."""
        self.next_sweep = step + SWEEP_EVERY
        limit = self.max_rows(copies)
        out = choose_victims(last, hits, self.expire_before(step), limit)
        # nothing to free (the rows over the limit are replicas', their masters' to evict):
        # look again once the rows grew by RECHECK of the limit
        self.hold_rows = 0 if out.size or limit is None else rows + max(1, int(RECHECK * limit))
        return out


def choose_victims(last: np.ndarray, hits: np.ndarray, expire_before: int,
                   max_rows: int | None) -> np.ndarray:
    """Indices of the rows to evict, sorted: last <= expire_before, then LFU beyond max_rows."""
    expired = last <= expire_before
    out = np.flatnonzero(expired)
    if max_rows is not None:
        alive = np.flatnonzero(~expired)
        if alive.size > max_rows:
            drop = alive.size - int(max_rows * LOW_WATER)
            order = np.lexsort((last[alive], hits[alive]))   # fewest pushes, then oldest
            out = np.sort(np.concatenate([out, alive[order[:drop]]]))
    return out
