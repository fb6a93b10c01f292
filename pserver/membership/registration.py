"""Registration decisions of the scheduler, free of I/O: which requests are valid, when the
expected nodes have all come (the cluster starts), in which order they are admitted and which
rank each gets."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from ..errors import AuthError
from ..protocol import HOST, PID, PORT, RANK, ROLE

ROLES = ("server", "worker")


@dataclass(frozen=True)
class Request:
    """A node's registration: where it listens and the rank it asked for (-1: any)."""

    role: str
    host: str
    port: int
    pid: int
    rank: int = -1

    @classmethod
    def parse(cls, meta: dict, authenticated_role: str | None) -> Request:
        """The request in a "register" message. Raises ValueError, KeyError or TypeError for a
        malformed one and AuthError if the sender's credentials are of another role."""
        role = meta[ROLE]
        if role not in ROLES:
            raise ValueError(f"cannot register role {role!r}")
        if authenticated_role is not None and authenticated_role != role:
            raise AuthError(f"credentials of a {authenticated_role} cannot register as a {role}")
        return cls(role, str(meta[HOST]), int(meta[PORT]), int(meta[PID]),
                   int(meta.get(RANK, -1)))


def pick_rank(requested: int, taken: Iterable[int]) -> int:
    """The requested rank if it is free, else the lowest free rank."""
    taken = set(taken)
    if requested >= 0 and requested not in taken:
        return requested
    return next(r for r in range(len(taken) + 1) if r not in taken)


class Pending:
    """Registrations that wait for the cluster to start. A waiter is whatever the caller needs to
    answer the node later (the scheduler: routing identity and request ts)."""

    def __init__(self, num_servers: int, num_workers: int) -> None:
        self.expected = {"server": num_servers, "worker": num_workers}
        self.requests: list[tuple[Hashable, Request]] = []

    def add(self, waiter: Hashable, req: Request) -> bool:
        """Queue a registration; True once every expected server and worker has registered."""
        self.requests.append((waiter, req))
        return all(self.count(role) >= n for role, n in self.expected.items())

    def count(self, role: str) -> int:
        return sum(1 for _, r in self.requests if r.role == role)

    def admission_order(self) -> list[tuple[Hashable, Request]]:
        """The queued registrations in admission order, and the queue emptied: servers first,
        then by requested rank (any rank last), then by arrival - ids and ranks are deterministic."""
        order = sorted(self.requests, key=lambda p: (p[1].role != "server",
                                                     p[1].rank if p[1].rank >= 0 else 1 << 30))
        self.requests = []
        return order
