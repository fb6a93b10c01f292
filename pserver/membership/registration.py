"""Registration decisions of the scheduler, free of I/O: which requests are valid, when the
expected nodes have all come (the cluster starts), in which order they are admitted and which
rank each gets."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from .. import groups
from ..errors import AuthError
from ..protocol import GROUP, HOST, PID, PORT, RANK, READ_ONLY, ROLE

ROLES = ("server", "worker")


@dataclass(frozen=True)
class Request:
    """A node's registration: where it listens, the rank it asked for (-1: any), and for a
    worker its group and whether it makes that group read-only."""

    role: str
    host: str
    port: int
    pid: int
    rank: int = -1
    group: str = groups.DEFAULT
    read_only: bool = False

    @classmethod
    def parse(cls, meta: dict, authenticated_role: str | None) -> Request:
        """The request in a "register" message. Raises ValueError, KeyError or TypeError for a
        malformed one, ConfigError for an invalid group name and AuthError if the sender's
        credentials are of another role."""
        role = meta[ROLE]
        if role not in ROLES:
            raise ValueError(f"cannot register role {role!r}")
        if authenticated_role is not None and authenticated_role != role:
            raise AuthError(f"credentials of a {authenticated_role} cannot register as a {role}")
        group = groups.check_name(meta.get(GROUP, groups.DEFAULT)) if role == "worker" \
            else groups.DEFAULT
        return cls(role, str(meta[HOST]), int(meta[PORT]), int(meta[PID]),
                   int(meta.get(RANK, -1)), group, role == "worker" and meta.get(READ_ONLY) is True)

    @property
    def waits_for_start(self) -> bool:
        """Whether the cluster's start counts this node: servers and the default group's
        workers (other groups are open-ended; their members are admitted with the start)."""
        return self.role == "server" or self.group == groups.DEFAULT


def pick_rank(requested: int, taken: Iterable[int]) -> int:
    """The requested rank if it is free, else the lowest free rank."""
    taken = set(taken)
    if requested >= 0 and requested not in taken:
        return requested
    return next(r for r in range(len(taken) + 1) if r not in taken)


def rank_for(req: Request, nodes: Iterable) -> int:
    """The rank ``req`` gets among ``nodes`` (NodeInfo, alive or not): a worker's rank is its
    group's (0..n-1 within the group), a server's the servers'."""
    return pick_rank(req.rank, (n.rank for n in nodes if n.role == req.role
                                and (req.role != "worker" or n.group == req.group)))


class Pending:
    """Registrations that wait for the cluster to start. A waiter is whatever the caller needs to
    answer the node later (the scheduler: routing identity and request ts)."""

    def __init__(self, num_servers: int, num_workers: int) -> None:
        self.expected = {"server": num_servers, "worker": num_workers}
        self.requests: list[tuple[Hashable, Request]] = []

    def add(self, waiter: Hashable, req: Request) -> bool:
        """Queue a registration; True once every expected server and default-group worker has
        registered (workers of other groups never hold the start back)."""
        self.requests.append((waiter, req))
        return all(self.count(role) >= n for role, n in self.expected.items())

    def count(self, role: str) -> int:
        """Queued registrations that count for the start: servers, or default-group workers."""
        return sum(1 for _, r in self.requests if r.role == role and r.waits_for_start)

    def admission_order(self) -> list[tuple[Hashable, Request]]:
        """The queued registrations in admission order, and the queue emptied: servers first,
        then by requested rank (any rank last), then by arrival - ids and ranks are deterministic."""
        order = sorted(self.requests, key=lambda p: (p[1].role != "server", p[1].group,
                                                     p[1].rank if p[1].rank >= 0 else 1 << 30))
        self.requests = []
        return order
