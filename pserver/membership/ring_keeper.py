"""The scheduler's key ring changes, free of I/O: the first ring, rings with a server added or
removed (for migrations), failover when a server is gone, and the last *safe* ring - the newest one
whose replicas are known to be complete, against which data loss is judged."""

from __future__ import annotations

import logging

from ..ft.loss import DataLoss, find_data_loss
from ..ring import KeyRing
from .view import ClusterView

log = logging.getLogger(__name__)


class RingKeeper:
    """Changes ``view.ring`` (the caller bumps the view's version) and tracks the safe ring.

    rebuilt: server id -> the ring version it reported (on its heartbeats) having finished
    re-replicating for.
    """

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.safe: KeyRing | None = None
        self.rebuilt: dict[int, int] = {}

    def start(self, servers: list[int], virtual: int) -> KeyRing:
        """The cluster's first ring (version 1) over ``servers``: current and safe."""
        self.view.ring = self.safe = KeyRing(servers, virtual=virtual, version=1)
        return self.view.ring

    def with_server(self, add: int | None = None, remove: int | None = None) -> KeyRing | None:
        """The current ring with one live server added or one removed (dead ones dropped), as the
        next version; None if no server would be left. The view is not changed."""
        ring, alive = self.view.ring, self.view.alive
        servers = [s for s in ring.servers if s != remove and alive(s)]
        if add is not None and alive(add) and add not in servers:
            servers.append(add)
        if not servers:
            return None
        return KeyRing(servers, virtual=ring.virtual, block_bits=ring.block_bits,
                       version=ring.version + 1)

    def commit(self, ring: KeyRing) -> None:
        """A migration committed ``ring``: every copy was acknowledged, so it is safe too."""
        self.view.ring = self.safe = ring

    def settle(self) -> None:
        """After a failover the ring is safe once every live server of it reported having
        finished re-replicating for its version."""
        ring = self.view.ring
        if ring is None or ring is self.safe:
            return
        if all(self.rebuilt.get(s, -1) >= ring.version or not self.view.alive(s)
               for s in ring.servers):
            self.safe = ring

    def server_gone(self, sid: int) -> DataLoss | None:
        """Failover: take dead servers off the ring (their segments fall to their first replicas)
        and return None - or, if every holder of some segment is gone (judged against the safe
        ring, so servers dying faster than re-replication count together), leave the ring as it
        is, record the loss in ``view.settings`` ("lost", "data_loss") and return it. Nothing
        changes for a server not in the ring."""
        ring = self.view.ring
        if ring is None or sid not in ring.servers:
            return None
        k = int(self.view.settings.get("replication", 0))
        safe = self.safe or ring
        loss = find_data_loss(safe, [s for s in safe.servers if not self.view.alive(s)], k)
        if loss is not None:
            self.view.settings["lost"] = loss.masters
            self.view.settings["data_loss"] = loss.to_json()
            log.error("%s", loss.message())
            return loss
        gone = {s for s in ring.servers if not self.view.alive(s)}
        self.view.ring = KeyRing([s for s in ring.servers if s not in gone],
                                 virtual=ring.virtual, block_bits=ring.block_bits,
                                 version=ring.version + 1)
        log.warning("key ring v%d: server(s) %s removed, their ranges fail over to their replicas",
                    self.view.ring.version, sorted(gone))
        return None
