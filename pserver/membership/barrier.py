"""Barriers of the scheduler, free of I/O: who arrived at which named barrier, and which barriers
every live member of their group has reached (paper: the worker group's synchronisation points)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from .view import ClusterView

GROUPS = ("worker", "server", "all")


@dataclass
class _Barrier:
    group: str
    arrived: dict[int, Hashable] = field(default_factory=dict)  # node id -> its waiter


def members(view: ClusterView, group: str) -> set[int]:
    """Ids of the live nodes a barrier of ``group`` waits for ("all": servers and workers)."""
    return {n.id for n in view.nodes.values() if n.alive
            and ((group == "all" and n.role != "scheduler") or n.role == group)}


class Barriers:
    """Named barriers in progress. A waiter is whatever the caller needs to release a node (the
    scheduler: its routing identity and request ts); a barrier completes once every live member
    of its group arrived, and then it is forgotten (the name can be used again)."""

    def __init__(self) -> None:
        self.waiting: dict[str, _Barrier] = {}

    def arrive(self, name: str, group: str, node: int, waiter: Hashable,
               view: ClusterView) -> list[Hashable]:
        """Node ``node`` reached barrier ``name`` of ``group``. Returns the waiters to release (all
        who arrived, this one included) if that completed it, else []. A barrier keeps the group
        of its first arrival. Raises ValueError for an unknown group (nothing changes then)."""
        if group not in GROUPS:
            raise ValueError(f"unknown barrier group {group!r}: use one of {', '.join(GROUPS)}")
        b = self.waiting.setdefault(name, _Barrier(group))
        b.arrived[node] = waiter
        return self._complete(name, b, view)

    def recheck(self, view: ClusterView) -> list[Hashable]:
        """After a node died or left: the waiters of every barrier that no longer waits for
        anyone. Returns [] if none completed."""
        released: list[Hashable] = []
        for name, b in list(self.waiting.items()):
            released += self._complete(name, b, view)
        return released

    def _complete(self, name: str, b: _Barrier, view: ClusterView) -> list[Hashable]:
        if not members(view, b.group) <= b.arrived.keys():
            return []
        del self.waiting[name]
        return list(b.arrived.values())
