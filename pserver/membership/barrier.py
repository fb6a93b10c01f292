"""Barriers of the scheduler, free of I/O: who arrived at which named barrier, and which barriers
every live member of their group has reached (paper: a worker group's synchronisation points). A
"worker" barrier is its worker group's own: the name is scoped by the group (docs/groups.md)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from .view import ClusterView

GROUPS = ("worker", "server", "all")


@dataclass
class _Barrier:
    group: str
    worker_group: str | None = None  # a "worker" barrier: the worker group it belongs to
    arrived: dict[int, Hashable] = field(default_factory=dict)  # node id -> its waiter


def members(view: ClusterView, group: str, worker_group: str | None = None) -> set[int]:
    """Ids of the live nodes a barrier of ``group`` waits for ("all": servers and workers;
    "worker" with ``worker_group``: the live workers of that group only)."""
    return {n.id for n in view.nodes.values() if n.alive
            and ((group == "all" and n.role != "scheduler") or n.role == group)
            and (worker_group is None or n.group == worker_group)}


class Barriers:
    """Named barriers in progress. A waiter is whatever the caller needs to release a node (the
    scheduler: its routing identity and request ts); a barrier completes once every live member
    of its group arrived, and then it is forgotten (the name can be used again).

    sizes: {worker group: N}: that group's barriers also wait until N of its workers ever joined
    (a job started with N workers does not pass its first barrier with the early ones alone)."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.waiting: dict[tuple[str, str | None], _Barrier] = {}
        self.sizes = dict(sizes or {})

    def arrive(self, name: str, group: str, node: int, waiter: Hashable,
               view: ClusterView, worker_group: str | None = None) -> list[Hashable]:
        """Node ``node`` reached barrier ``name`` of ``group``; ``worker_group``: the arriving
        worker's group, which scopes a "worker" barrier. Returns the waiters to release (all
        who arrived, this one included) if that completed it, else []. A barrier keeps the group
        of its first arrival. Raises ValueError for an unknown group (nothing changes then)."""
        if group not in GROUPS:
            raise ValueError(f"unknown barrier group {group!r}: use one of {', '.join(GROUPS)}")
        scope = worker_group if group == "worker" else None
        key = (name, scope)
        b = self.waiting.setdefault(key, _Barrier(group, scope))
        b.arrived[node] = waiter
        return self._complete(key, b, view)

    def recheck(self, view: ClusterView) -> list[Hashable]:
        """After a node died or left: the waiters of every barrier that no longer waits for
        anyone. Returns [] if none completed."""
        released: list[Hashable] = []
        for name, b in list(self.waiting.items()):
            released += self._complete(name, b, view)
        return released

    def _complete(self, key: tuple, b: _Barrier, view: ClusterView) -> list[Hashable]:
        if not members(view, b.group, b.worker_group) <= b.arrived.keys():
            return []
        size = self.sizes.get(b.worker_group) if b.worker_group is not None else None
        if size and len(view.group_nodes(b.worker_group, alive_only=False)) < size:
            return []  # the group has not all joined yet
        del self.waiting[key]
        return list(b.arrived.values())
