"""Failure detection of the scheduler, free of I/O: when each node was last heard from, and which
live nodes have been silent for longer than the heartbeat timeout."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class Liveness:
    """Heartbeat bookkeeping. ``interval`` and ``timeout`` in seconds; ``clock`` is monotonic
    (injectable for tests). A turn of the caller's loop that came more than two intervals after
    the previous one means the caller itself was starved: the silence it measured is its own, so
    that turn declares nobody dead and gives every node a fresh interval instead."""

    def __init__(self, interval: float, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.timeout, self.clock = interval, timeout, clock
        self.last_seen: dict[int, float] = {}   # node id -> clock() of its last heartbeat
        self._last_check = clock()

    def seen(self, node: int) -> None:
        """Node ``node`` was heard from now (a heartbeat, or its admission)."""
        self.last_seen[node] = self.clock()

    def silence(self, node: int) -> float:
        """Seconds since ``node`` was last heard from (0 for a node never seen)."""
        now = self.clock()
        return now - self.last_seen.get(node, now)

    def expired(self, alive: Iterable[int]) -> list[int]:
        """Of the ``alive`` node ids, those silent for longer than the timeout; call once per turn
        of the loop. Returns [] for a starved turn (see the class docstring)."""
        now = self.clock()
        stalled = now - self._last_check > 2 * self.interval
        self._last_check = now
        if stalled:
            floor = now - self.interval
            for node, t in self.last_seen.items():
                self.last_seen[node] = max(t, floor)
            return []
        return [n for n in alive if now - self.last_seen.get(n, now) > self.timeout]
