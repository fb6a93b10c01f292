"""The compiled ring lookups agree with their definitions: the virtual server of a key is the first
ring position at or after the hash of its block (wrapping), and a master forwards each key to exactly
the replicas of its virtual server."""

import numpy as np
import pytest

from pserver.ft.replication import Replicator
from pserver.ring import KeyRing, mix64


def _vnode_by_definition(ring: KeyRing, keys: np.ndarray) -> np.ndarray:
    pos = mix64(keys >> np.uint64(ring.block_bits))
    idx = np.searchsorted(ring.positions, pos, side="left")
    idx[idx == len(ring.positions)] = 0
    return idx


@pytest.mark.parametrize("servers,virtual", [([1], 1), ([1, 2], 3), ([3, 7, 9, 12], 32), (list(range(20)), 8)])
def test_vnode_of_matches_the_definition(servers, virtual):
    ring = KeyRing(servers, virtual=virtual)
    rng = np.random.default_rng(len(servers))
    cases = [np.sort(rng.choice(10**6, 5000, replace=False)).astype(np.uint64),    # dense ids
             rng.integers(0, np.iinfo(np.uint64).max, 5000, dtype=np.uint64),     # hashed ids
             np.array([0, 1, 4095, 4096, 2**63, 2**64 - 1], np.uint64),           # edges
             np.empty(0, np.uint64)]
    for keys in cases:
        got = ring.vnode_of(keys)
        assert got.dtype == np.intp
        assert (got == _vnode_by_definition(ring, keys)).all()
        assert (ring.owner_of(keys) == ring.owners[_vnode_by_definition(ring, keys)]).all()


def test_replica_groups_send_each_key_to_exactly_its_replicas():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(2, 8))
        servers = sorted(rng.choice(100, n, replace=False).tolist())
        ring = KeyRing(servers, virtual=int(rng.integers(1, 40)), version=trial)
        k = int(rng.integers(1, n))
        me = servers[int(rng.integers(n))]
        repl = Replicator(None, me, None)
        repl.ring, repl.k = ring, k
        keys = np.unique(rng.integers(0, 2 ** int(rng.integers(12, 64)), int(rng.integers(1, 3000)),
                                      dtype=np.uint64))
        keys = keys[ring.owner_of(keys) == me]
        expected = {s: set() for s in servers if s != me}
        if n - 1 <= k:
            for s in expected:
                expected[s] = set(range(len(keys)))
        else:
            table = ring.replica_table(k)[ring.vnode_of(keys)]
            for i, row in enumerate(table):
                for s in row:
                    expected[int(s)].add(i)
        got = {s: set() for s in expected}
        for sid, sel in repl.replica_groups(keys):
            positions = np.arange(len(keys))[sel]
            assert (np.diff(positions) > 0).all()      # in key order, each once
            got[sid] |= set(positions.tolist())
        assert got == expected, trial
