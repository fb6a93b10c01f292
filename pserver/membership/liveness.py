"""Failure detection of the scheduler, free of I/O: when each node was last heard from, and which
live nodes have been silent for too long - an accrual detector (Hayashibara et al., "The phi accrual
failure detector") that adapts each node's timeout to the heartbeat delays it has shown, never
below the configured heartbeat timeout. Rationale and numbers: docs/fault-tolerance.md."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable

PHI_THRESHOLD = 8.0   # suspicion at which a node is dead: P(a gap this long | live) = 1e-8
WINDOW = 200          # heartbeat gaps remembered per node
MIN_SAMPLES = 20      # gaps needed before the node's own distribution is trusted
CAP = 10.0            # the adaptive timeout never exceeds this many heartbeat timeouts


class Liveness:
    """Heartbeat bookkeeping. ``interval`` and ``timeout`` in seconds; ``clock`` is monotonic
    (injectable for tests). A node is dead once silent for longer than its :meth:`deadline`: the
    heartbeat timeout while its heartbeats are regular, longer when they came with delays (a
    loaded machine), at most ``CAP`` timeouts. A turn of the caller's loop that came more than two
    intervals after the previous one means the caller itself was starved: the silence it measured
    is its own, so that turn declares nobody dead and gives every node a fresh interval instead."""

    def __init__(self, interval: float, timeout: float,
                 clock: Callable[[], float] = time.monotonic, phi_threshold: float = PHI_THRESHOLD
                 ) -> None:
        self.interval, self.timeout, self.clock = interval, timeout, clock
        self.phi_threshold = phi_threshold
        self.last_seen: dict[int, float] = {}   # node id -> clock() of its last heartbeat
        self.gaps: dict[int, deque[float]] = {}  # node id -> its last WINDOW heartbeat gaps
        self._last_check = clock()

    def seen(self, node: int) -> None:
        """Node ``node`` was heard from now (a heartbeat, or its admission)."""
        now = self.clock()
        before = self.last_seen.get(node)
        if before is not None:
            self.gaps.setdefault(node, deque(maxlen=WINDOW)).append(now - before)
        self.last_seen[node] = now

    def forget(self, node: int) -> None:
        """Drop what is known of ``node`` (it left or was declared dead)."""
        self.last_seen.pop(node, None)
        self.gaps.pop(node, None)

    def silence(self, node: int) -> float:
        """Seconds since ``node`` was last heard from (0 for a node never seen)."""
        now = self.clock()
        return now - self.last_seen.get(node, now)

    def phi(self, node: int, silence: float) -> float:
        """Suspicion that ``node`` is dead after ``silence`` seconds: -log10 of the probability
        that a live node's gap is that long, gaps taken as normal with the node's mean and
        standard deviation (at least a quarter interval). 0 while fewer than MIN_SAMPLES gaps."""
        gaps = self.gaps.get(node)
        if gaps is None or len(gaps) < MIN_SAMPLES:
            return 0.0
        mean = sum(gaps) / len(gaps)
        std = max(math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)), self.interval / 4)
        tail = 0.5 * math.erfc((silence - mean) / (std * math.sqrt(2.0)))
        return math.inf if tail <= 0.0 else -math.log10(tail)

    def deadline(self, node: int) -> float:
        """Seconds of silence after which ``node`` is dead (see the class docstring)."""
        gaps = self.gaps.get(node)
        if gaps is None or len(gaps) < MIN_SAMPLES:
            return self.timeout
        lo, hi = self.timeout, CAP * self.timeout
        if self.phi(node, lo) >= self.phi_threshold:
            return lo
        for _ in range(30):   # phi grows with the silence: bisect for the threshold
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.phi(node, mid) >= self.phi_threshold else (mid, hi)
        return hi

    def expired(self, alive: Iterable[int]) -> list[int]:
        """Of the ``alive`` node ids, those silent for longer than their deadline; call once per
        turn of the loop. Returns [] for a starved turn (see the class docstring)."""
        now = self.clock()
        stalled = now - self._last_check > 2 * self.interval
        self._last_check = now
        if stalled:
            floor = now - self.interval
            for node, t in self.last_seen.items():
                self.last_seen[node] = max(t, floor)
            return []
        out = []
        for n in alive:
            silent = now - self.last_seen.get(n, now)
            if silent > self.timeout and (silent > CAP * self.timeout
                                          or self.phi(n, silent) >= self.phi_threshold
                                          or len(self.gaps.get(n, ())) < MIN_SAMPLES):
                out.append(n)
        return out
