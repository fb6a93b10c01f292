"""Detection of lost key ranges: which parts of the key ring lost every copy when servers died (a
key's master and its k replicas all dead before failover re-replicated it). A pure function of
(ring, dead servers, k): the scheduler (``RingKeeper.server_gone``) records the loss in the view's
settings, workers fail requests to the lost servers with DataLostError
(``RequestTracker.reroute_plan``), and the way back is a checkpoint
(``pserver scheduler --restore DIR``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import DataLostError
from ..ring import KeyRing

RESTORE_HINT = "restore the cluster from the last checkpoint with `pserver scheduler --restore DIR`"


def holder_table(ring: KeyRing, k: int) -> np.ndarray:
    """(virtual servers, k+1) server ids holding each virtual server's segment of the ring: its
    owner, then its k replicas (-1 where the ring has fewer than k+1 servers)."""
    owners = ring.owners.reshape(-1, 1)
    if k <= 0:
        return owners
    return np.hstack([owners, ring.replica_table(k)])


@dataclass
class DataLoss:
    """The segments of ``ring`` whose k+1 holders are all among ``dead``.

    segments: bool mask over the ring's virtual servers (True = every copy lost).
    masters: servers that mastered a lost segment. holders: every server that held a lost copy.
    fraction: share of the ring (hence of hashed keys) lost, 0..1.
    """

    ring: KeyRing
    k: int
    dead: list[int]
    segments: np.ndarray
    masters: list[int]
    holders: list[int]
    fraction: float

    def lost_mask(self, keys: np.ndarray) -> np.ndarray:
        """Bool mask over uint64 ``keys``: True where the key's value was lost (vectorised)."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(keys):
            return np.zeros(0, dtype=bool)
        return self.segments[self.ring.vnode_of(keys)]

    def check(self, keys: np.ndarray) -> None:
        """Raise DataLostError if any of ``keys`` was lost (what a worker calls before a request)."""
        lost = self.lost_mask(keys)
        n = int(lost.sum())
        if n:
            first = int(np.asarray(keys, dtype=np.uint64)[np.argmax(lost)])
            raise DataLostError(f"{n} of the {len(keys)} keys of this request (e.g. key {first}) "
                                f"were lost: {self.message()}")

    def message(self) -> str:
        """What happened and what to do, for logs and DataLostError."""
        who = _names(self.holders)
        copies = "copy" if self.k == 0 else "copies"
        return (f"{who} held the only {copies} of {100 * self.fraction:.1f}% of the key ring "
                f"(ranges mastered by {_names(self.masters)}, replication k={self.k}) and "
                f"{'is' if len(self.holders) == 1 else 'are all'} dead; {RESTORE_HINT}")

    def to_json(self) -> dict:
        """Small JSON form (for the cluster view's settings): enough to rebuild the same loss."""
        return {"ring": self.ring.to_json(), "k": self.k, "dead": self.dead,
                "fraction": self.fraction, "message": self.message()}

    @classmethod
    def from_json(cls, d: dict) -> DataLoss:
        loss = find_data_loss(KeyRing.from_json(d["ring"]), d["dead"], int(d["k"]))
        if loss is None:
            raise ValueError("this data-loss record describes no loss")
        return loss


def find_data_loss(ring: KeyRing, dead: Iterable[int], k: int) -> DataLoss | None:
    """The part of ``ring`` whose master and k replicas are all in ``dead``, or None if every
    segment kept a copy. ``ring``: the ring in effect when they died; ``k``: replicas per key."""
    dead = sorted({int(d) for d in dead})
    if not dead:
        return None
    holders = holder_table(ring, k)
    lost = (np.isin(holders, dead) | (holders < 0)).all(axis=1)
    if not lost.any():
        return None
    n = len(ring.positions)
    if n == 1:
        fraction = 1.0
    else:
        gaps = ring.positions - np.roll(ring.positions, 1)  # uint64: wraps around 2**64 as it must
        fraction = float(gaps[lost].astype(np.float64).sum() / 2.0**64)
    masters = sorted({int(o) for o in ring.owners[lost]})
    held = holders[lost]
    return DataLoss(ring=ring, k=k, dead=dead, segments=lost, masters=masters,
                    holders=sorted({int(h) for h in held[held >= 0]}), fraction=fraction)


def _names(ids: list[int]) -> str:
    if len(ids) == 1:
        return f"server {ids[0]}"
    return "servers " + ", ".join(str(i) for i in ids[:-1]) + f" and {ids[-1]}"
