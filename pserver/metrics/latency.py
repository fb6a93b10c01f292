"""Request latencies in fixed buckets: one bisect and two additions per request, bounded memory
(a list of ints per op), exported as Prometheus histograms at scrape time."""

from __future__ import annotations

from bisect import bisect_left

# upper bounds in seconds (Prometheus "le"): 100 us to 10 s, about 2.5x apart
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                              0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistograms:
    """Per-op latency histograms. ``observe`` is called by one thread at a time (the worker's
    lock); ``snapshot`` may run in another thread and then sees each count at most one request old.
    """

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bucket bounds must be increasing and not empty")
        self.bounds = bounds
        self._ops: dict[str, list] = {}  # op -> [counts per bucket (last: +Inf), sum of seconds]

    def observe(self, op: str, seconds: float) -> None:
        """Count one request of ``op`` that took ``seconds``."""
        cell = self._ops.get(op)
        if cell is None:
            cell = self._ops[op] = [[0] * (len(self.bounds) + 1), 0.0]
        cell[0][bisect_left(self.bounds, seconds)] += 1
        cell[1] += seconds

    def snapshot(self) -> dict[str, tuple[list[tuple[str, int]], float]]:
        """{op: ([(le, cumulative count), ..., ("+Inf", total)], sum of seconds)}."""
        out = {}
        for op, (counts, total) in list(self._ops.items()):
            cumulative, running = [], 0
            for le, n in zip((*map(repr, self.bounds), "+Inf"), list(counts)):
                running += n
                cumulative.append((le, running))
            out[op] = (cumulative, total)
        return out
