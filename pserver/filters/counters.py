"""Traffic counters of the filter chain: bytes and (key, value) pairs per message kind and stage.

A *kind* is the message direction ("push" or "pull"); a *stage* is "raw" (the payload before any
filter) or the name of a filter (the payload right after that filter on the sender). The receiver
counts the same stages while decoding, so with lossless delivery the sender's "sent" numbers and
the receivers' "received" numbers match stage by stage. Filters may also count *events* (e.g.
values clipped by fixed point, entries dropped by the KKT filter).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_FIELDS = ("bytes_sent", "pairs_sent", "messages_sent",
           "bytes_received", "pairs_received", "messages_received")


@dataclass
class StageCount:
    """Totals of one (kind, stage) cell. Bytes are payload bytes: arrays, frames and header meta."""

    bytes_sent: int = 0
    pairs_sent: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    pairs_received: int = 0
    messages_received: int = 0

    def to_json(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in _FIELDS}


class Counters:
    """Thread-safe traffic counters, mergeable across nodes (``merge``) and JSON-serialisable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: dict[tuple[str, str], StageCount] = {}
        self._events: dict[str, int] = {}

    def add(self, kind: str, stage: str, side: str, nbytes: int, pairs: int) -> None:
        """Count one message of ``nbytes`` bytes and ``pairs`` pairs; ``side`` is "sent" or
        "received"."""
        if side not in ("sent", "received"):
            raise ValueError(f"side must be 'sent' or 'received', not {side!r}")
        with self._lock:
            cell = self._stages.setdefault((kind, stage), StageCount())
            setattr(cell, f"bytes_{side}", getattr(cell, f"bytes_{side}") + int(nbytes))
            setattr(cell, f"pairs_{side}", getattr(cell, f"pairs_{side}") + int(pairs))
            setattr(cell, f"messages_{side}", getattr(cell, f"messages_{side}") + 1)

    def incr(self, event: str, n: int = 1) -> None:
        """Add ``n`` to the named event counter (e.g. "fixed.clipped")."""
        with self._lock:
            self._events[event] = self._events.get(event, 0) + int(n)

    def get(self, kind: str, stage: str) -> StageCount:
        """A copy of the totals of one (kind, stage) cell (zeros if never counted)."""
        with self._lock:
            cell = self._stages.get((kind, stage), StageCount())
            return StageCount(**cell.to_json())

    def event(self, name: str) -> int:
        """The value of an event counter (0 if never counted)."""
        with self._lock:
            return self._events.get(name, 0)

    def stages(self) -> list[tuple[str, str]]:
        """The (kind, stage) cells counted so far, in first-seen order."""
        with self._lock:
            return list(self._stages)

    def to_json(self) -> dict[str, Any]:
        """``{"stages": {kind: {stage: {field: int}}}, "events": {name: int}}``."""
        with self._lock:
            stages: dict[str, dict[str, dict[str, int]]] = {}
            for (kind, stage), cell in self._stages.items():
                stages.setdefault(kind, {})[stage] = cell.to_json()
            return {"stages": stages, "events": dict(self._events)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Counters:
        """Inverse of :meth:`to_json` (e.g. counters reported by another node)."""
        out = cls()
        for kind, stages in data.get("stages", {}).items():
            for stage, cell in stages.items():
                out._stages[(kind, stage)] = StageCount(**{f: int(cell.get(f, 0)) for f in _FIELDS})
        out._events = {k: int(v) for k, v in data.get("events", {}).items()}
        return out

    def merge(self, other: Counters) -> Counters:
        """Add ``other``'s totals into this one (in place) and return ``self``."""
        snapshot = other.to_json()
        with self._lock:
            for kind, stages in snapshot["stages"].items():
                for stage, cell in stages.items():
                    mine = self._stages.setdefault((kind, stage), StageCount())
                    for f in _FIELDS:
                        setattr(mine, f, getattr(mine, f) + cell[f])
            for name, n in snapshot["events"].items():
                self._events[name] = self._events.get(name, 0) + n
        return self
