"""Where a worker's time goes: computing, waiting on dependencies, waiting on the network.

The paper's headline "idle time" result (workers of the parameter server wait < 2% of the time;
bounded delay tau = 0 idles 50%, tau = 16 idles 1.7%) is measured with this timer: the worker wraps
its gradient computation in `computing()`, its `TaskDAG.wait_ready` in `waiting_deps()` and its
blocking on replies in `waiting_net()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

__all__ = ["CATEGORIES", "IdleTimer"]

#: The activities a worker's time is split into.
CATEGORIES = ("computing", "waiting_deps", "waiting_net")


class IdleTimer:
    """Accumulates seconds per category for one worker.

    Spans nest: while an inner span is open the outer one is paused, so every instant is counted
    once, for the innermost activity (a `waiting_net()` inside `computing()` is network time, not
    both). Each thread keeps its own nesting stack; spans of different threads add up
    (thread-seconds), so shares are meaningful when one thread drives the worker loop.
    Thread-safe. `clock` (seconds, monotonic) is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero all totals and restart the wall clock. Call with no span open."""
        with self._lock:
            self._totals = dict.fromkeys(CATEGORIES, 0.0)
            # thread id -> stack of [category, start of the part still uncounted]
            self._stacks: dict[int, list[list]] = {}
            self._started = self._clock()

    @contextmanager
    def _span(self, category: str) -> Iterator[None]:
        tid = threading.get_ident()
        with self._lock:
            now = self._clock()
            stack = self._stacks.setdefault(tid, [])
            if stack:
                outer = stack[-1]
                self._totals[outer[0]] += now - outer[1]
            stack.append([category, now])
        try:
            yield
        finally:
            with self._lock:
                now = self._clock()
                stack = self._stacks.get(tid)
                if stack:  # reset() inside a span drops it
                    cat, start = stack.pop()
                    self._totals[cat] += now - start
                    if stack:
                        stack[-1][1] = now
                    else:
                        del self._stacks[tid]

    def computing(self) -> AbstractContextManager[None]:
        """Context manager: time spent on the worker's own computation."""
        return self._span("computing")

    def waiting_deps(self) -> AbstractContextManager[None]:
        """Context manager: time blocked because a task's dependencies have not finished."""
        return self._span("waiting_deps")

    def waiting_net(self) -> AbstractContextManager[None]:
        """Context manager: time blocked on replies from servers."""
        return self._span("waiting_net")

    def snapshot(self) -> dict[str, float]:
        """Totals so far, open spans included up to now.

        Keys: `<category>_s` (seconds) and `<category>_share` (fraction of tracked time) for each
        of computing, waiting_deps, waiting_net; `tracked_s` (their sum), `idle_share`
        ((waiting_deps + waiting_net) / tracked, 0.0 before anything was tracked) and `wall_s`
        (seconds since creation or reset).
        """
        with self._lock:
            now = self._clock()
            totals = dict(self._totals)
            for stack in self._stacks.values():
                if stack:
                    cat, start = stack[-1]
                    totals[cat] += now - start
            wall = now - self._started
        tracked = sum(totals.values())
        out: dict[str, float] = {f"{c}_s": totals[c] for c in CATEGORIES}
        for c in CATEGORIES:
            out[f"{c}_share"] = totals[c] / tracked if tracked > 0 else 0.0
        out["tracked_s"] = tracked
        idle = totals["waiting_deps"] + totals["waiting_net"]
        out["idle_share"] = idle / tracked if tracked > 0 else 0.0
        out["wall_s"] = wall
        return out
