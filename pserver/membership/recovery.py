"""A restarted scheduler's view, rebuilt from the nodes' rejoin requests, free of I/O.

Every node caches the cluster view; a node that finds the scheduler does not know it (a restart
with ``--recover``) sends its id, role, rank, address and its cached view. The newest view any node
sent is the cluster's state: same ids, ranks, ring, replication and settings. Recovery ends when
every live node of that view rejoined, or ``window`` seconds after the first rejoin; nodes that did
not rejoin are then left to the failure detector."""

from __future__ import annotations

from collections.abc import Callable

from ..protocol import GROUP, HOST, ID, PID, PORT, RANK, ROLE, VIEW
from .view import ClusterView

# the node facts a rejoin must match in the view (a different process claiming an id is refused)
_CLAIMS = (ROLE, RANK, HOST, PORT, PID, GROUP)


class ViewRecovery:
    """Collects rejoins until the view is complete. ``clock``: monotonic seconds (injectable)."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        self.window, self.clock = window, clock
        self.best: ClusterView | None = None
        self.claims: dict[int, dict] = {}     # node id -> what it said of itself
        self.first: float | None = None

    def rejoin(self, meta: dict, authenticated_role: str | None) -> bool:
        """Record a node's rejoin. Returns True if it is (so far) a live member of the newest view,
        False if that view has it dead, left, or as another process (it must not come back).

        Raises: KeyError, ValueError or TypeError for a malformed request; PermissionError if the
        sender's credentials are of another role than the one it claims."""
        nid = int(meta[ID])
        claim = {k: meta[k] for k in _CLAIMS if k in meta}
        if authenticated_role is not None and claim.get(ROLE) != authenticated_role:
            raise PermissionError(f"credentials of a {authenticated_role} cannot rejoin as "
                                  f"{claim.get(ROLE)!r}")
        view = ClusterView.from_json(meta[VIEW])
        if self.best is None or view.version > self.best.version:
            self.best = view
        if self.first is None:
            self.first = self.clock()
        self.claims[nid] = claim
        return self.member(nid)

    def member(self, nid: int) -> bool:
        """Whether node ``nid`` rejoined and is a live node of the newest view, as itself."""
        node = self.best.nodes.get(nid) if self.best is not None else None
        claim = self.claims.get(nid)
        if node is None or claim is None or not node.alive:
            return False
        return all(claim.get(k, getattr(node, k)) == getattr(node, k) for k in _CLAIMS)

    def done(self) -> bool:
        """Every live node of the newest view rejoined, or the window since the first is over."""
        if self.best is None:
            return False
        if all(self.member(nid) for nid, n in self.best.nodes.items() if n.alive):
            return True
        return self.clock() - self.first > self.window

    def result(self) -> ClusterView:
        """The recovered view (call once :meth:`done`): the newest one, one version later so every
        node adopts it. Live nodes that did not rejoin stay alive: the failure detector judges
        them from now on."""
        view = self.best
        view.version += 1
        return view
