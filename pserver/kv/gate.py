"""A server's worker-group gate, without I/O: from each cluster view it learns every worker's group,
the live members of each group and the members of read-only groups. It refuses what a read-only
member may not send (the policy is pserver.groups') and, while some group is read-only, holds the
data requests of workers newer than the view until a view names them. Semantics: docs/groups.md."""

from __future__ import annotations

from collections import deque
from collections.abc import Set as AbstractSet

from .. import groups
from ..errors import ProtocolError, ReadOnlyGroupError
from ..membership.view import ClusterView
from ..wire import Message
from . import keys as keyfmt
from .dispatch import SERVER_OPS

_WORKER_OPS = frozenset(op for op, e in SERVER_OPS.items() if e.roles == {"worker"})
_MAX_NEWCOMER_HELD = 10_000  # requests kept for a sender the view does not name yet
_NOBODY: frozenset[int] = frozenset()


class GroupGate:
    """The group state of one server. ``held``: the server's per-sender queues of held requests
    (a newcomer's requests wait in its queue, so whatever it sends next queues behind them).

    ``known`` (identities the view names) and ``read_only_ids`` (worker ids of read-only groups)
    are updated in place, never rebound: the core may keep them for its per-request checks."""

    def __init__(self, held: dict[bytes, deque]) -> None:
        self.held = held
        self.known: set[bytes] = set()
        self.read_only_ids: set[int] = set()
        self._group_of: dict[int, str] = {}
        self._live_by_group: dict[str, set[int]] = {}
        self._read_only: frozenset[str] = frozenset()
        self._newest_id = -1
        self._newcomers: set[bytes] = set()  # senders held until a view names them
        self._declared: dict[int, str] = {}  # the group a worker named in its declare_table

    def learn(self, view: ClusterView) -> list[bytes]:
        """Take each worker's group and the read-only members from a new view. Returns the held
        newcomers the view now names (or that no read-only group makes wait any longer): the
        caller serves their held requests, in order. Raises nothing."""
        ro = self._read_only = view.read_only_groups
        self._group_of = {n.id: n.group for n in view.nodes.values() if n.role == "worker"}
        live: dict[str, set[int]] = {}
        for n in view.role_nodes("worker"):
            live.setdefault(n.group, set()).add(n.id)
        self._live_by_group = live
        self.read_only_ids.clear()
        self.read_only_ids.update(nid for nid, g in self._group_of.items() if g in ro)
        self.known.clear()
        self.known.update(b"n%d" % nid for nid in view.nodes)
        self._newest_id = max(view.nodes, default=-1)
        released = [i for i in self._newcomers if not self.is_newcomer(i, None)]
        self._newcomers.difference_update(released)
        return released

    def group(self, worker: int) -> str:
        """A worker's group: the view's, else the one it declared (the view may lag behind)."""
        group = self._group_of.get(worker)
        return group if group is not None else self._declared.get(worker, groups.DEFAULT)

    def live(self, group: str) -> AbstractSet[int]:
        """Ids of the live workers of ``group`` in the latest view (do not modify)."""
        return self._live_by_group.get(group, _NOBODY)

    def declare(self, worker: int, group: object) -> None:
        """Note the group ``worker`` named in a declare_table, used until a view names one.
        Raises ConfigError (nothing noted) if ``group`` is not a valid group name."""
        self._declared[worker] = groups.check_name(group)

    def is_newcomer(self, identity: bytes, msg: Message | None) -> bool:
        """Whether ``identity`` is a worker newer than the view while some group is read-only:
        its rights are not known yet, so its data requests (``msg`` None: any) wait for the next
        views (a read-only member must not slip a push through before the view names it)."""
        if self._newest_id < 0 or not self._read_only or (
                msg is not None and msg.op not in _WORKER_OPS):
            return False
        try:
            return keyfmt.sender_id(identity) > self._newest_id
        except ProtocolError:
            return False

    def hold(self, identity: bytes, msg: Message) -> None:
        """Queue ``msg`` of newcomer ``identity`` until a view names it (see ``learn``).
        Raises ProtocolError (nothing queued) if it already has too many requests held."""
        queue = self.held.setdefault(identity, deque())
        if len(queue) >= _MAX_NEWCOMER_HELD:
            raise ProtocolError(f"too many requests from node {identity[1:].decode()}, which "
                                f"this server's cluster view does not name (is it registered?)")
        queue.append(msg)
        self._newcomers.add(identity)

    def check(self, identity: bytes, msg: Message) -> None:
        """Raises ReadOnlyGroupError if the sender's group may not send ``msg`` (pserver.groups),
        ProtocolError if ``identity`` is not a node id; changes nothing."""
        sender = keyfmt.sender_id(identity)
        if sender in self.read_only_ids:
            why = groups.refusal(msg.op, msg.meta, self._group_of[sender], self._read_only)
            if why is not None:
                raise ReadOnlyGroupError(why)
