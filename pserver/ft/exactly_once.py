"""Exactly-once after failover: every server keeps a *replication clock*, for each (master, worker)
pair the recent request parts (timestamp, part id) it received through that master, and the parts it
applied as master. A resent part names the server it first went to; it is a duplicate at the new
master exactly when that (timestamp, part) is in the window (docs/fault-tolerance.md, "Replication")."""

from __future__ import annotations

from collections import deque

import numpy as np

from ..errors import ProtocolError

WINDOW = 4096  # parts remembered per (master, worker): far more than are ever in flight


class _Window:
    """The last WINDOW timestamps seen, with O(1) insert and membership."""

    __slots__ = ("order", "seen")

    def __init__(self) -> None:
        self.order: deque[tuple] = deque()
        self.seen: set[tuple] = set()

    def add(self, ts: tuple) -> None:
        if ts in self.seen:
            return
        self.seen.add(ts)
        self.order.append(ts)
        if len(self.order) > WINDOW:
            self.seen.discard(self.order.popleft())


class ReplicationClock:
    """The windows of one server; ``me``: its node id (its own applied parts count as "seen"
    through itself)."""

    def __init__(self, me: int = -1) -> None:
        self.me = me
        self.clock: dict[tuple[int, int], _Window] = {}  # (master, worker) -> parts received through it
        self.applied: dict[int, _Window] = {}            # worker -> parts applied here as master

    def record(self, master: int, worker: int, ts: int, part) -> None:
        """Part ``part`` of request ``ts`` of ``worker`` reached this server through ``master``."""
        window = self.clock.get((master, worker))
        if window is None:
            window = self.clock[(master, worker)] = _Window()
        window.add((ts, part))

    def seen(self, master: int, worker: int, ts: int, part) -> bool:
        """True if part ``part`` of request ``ts`` of ``worker`` already reached this server
        through ``master`` (or was applied here, when ``master`` is this server)."""
        window = self.clock.get((master, worker))
        if window is not None and (ts, part) in window.seen:
            return True
        mine = self.applied.get(worker) if master == self.me else None
        return mine is not None and (ts, part) in mine.seen

    def note_applied(self, worker: int, ts: int, part) -> None:
        window = self.applied.get(worker)
        if window is None:
            window = self.applied[worker] = _Window()
        window.add((ts, part))

    def applied_array(self) -> np.ndarray:
        """The windows of applied parts as int64 rows (worker, ts, has part, part), oldest first
        per worker, to travel with a copy of this master's keys as an array frame (full windows
        of a few workers are hundreds of KB: more than a message header may hold)."""
        rows = [(w, ts, part is not None, part or 0)
                for w, win in self.applied.items() for ts, part in win.order]
        return np.array(rows, np.int64).reshape(-1, 4)

    def load(self, master: int, rows: list) -> None:
        """Record the applied parts that came with a copy of ``master``'s keys (the rows of
        :func:`applied_rows`)."""
        for worker, ts, has_part, part in rows:
            self.record(master, worker, ts, part if has_part else None)


def applied_rows(applied: np.ndarray) -> list:
    """The rows of a copy's ``applied_array``, checked. Raises ProtocolError if it is not (n, 4)
    int64 (a caller checks before it stores anything of the copy)."""
    if applied.dtype != np.int64 or applied.ndim != 2 or applied.shape[1] != 4:
        raise ProtocolError(f"a copy's applied parts must be (n, 4) int64 rows, not "
                            f"{applied.dtype} {applied.shape}")
    return applied.tolist()
