"""The key ring: which server owns which key (consistent hashing with virtual servers).

Keys are grouped into aligned blocks of ``2**block_bits`` keys; a block sits at a mixing hash of its
number on the 64-bit ring and belongs to the first virtual server at or after it. Blocks keep dense
ids in runs while spreading small ids over every server (docs/design.md, "Key ring"). Every decision
here is a pure function of the ring; the scheduler owns and versions it, every node caches a copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


@dataclass
class KeyRing:
    """Ownership of the key space by servers.

    servers: node ids of the servers on the ring (any order; placement depends only on the ids).
    virtual: virtual servers per physical server (more = better balance, larger ring).
    version: bumped by the scheduler on every change of ownership.
    """

    servers: list[int]
    virtual: int = 32
    block_bits: int = 12
    version: int = 0

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("a key ring needs at least one server")
        ids = np.repeat(np.asarray(sorted(self.servers), dtype=np.uint64), self.virtual)
        vnum = np.tile(np.arange(self.virtual, dtype=np.uint64), len(self.servers))
        pos = mix64(mix64(ids) ^ vnum)
        order = np.argsort(pos, kind="stable")
        self.positions = pos[order]
        self.owners = ids[order].astype(np.int64)
        self._single = len(self.servers) == 1
        self._replicas: dict[int, np.ndarray] = {}
        # top-16-bit bucket of a ring position -> its virtual server, or -1 where one starts inside
        nxt = (np.arange(1, 1 << 16, dtype=np.uint64) << np.uint64(48))
        lut = np.searchsorted(self.positions, nxt, side="left")
        lut = np.append(lut, len(self.positions))       # the last bucket wraps around to the first
        lut[lut == len(self.positions)] = 0
        lut = lut.astype(np.intp)
        lut[(self.positions >> np.uint64(48)).astype(np.intp)] = -1
        self._lut = lut

    # -- lookups --------------------------------------------------------------------------------
    def _vnode_of_positions(self, pos: np.ndarray) -> np.ndarray:
        """Index of the virtual server owning each ring position: a table lookup on the top 16
        bits, with a binary search only for the few buckets a virtual server splits."""
        idx = self._lut[(pos >> np.uint64(48)).astype(np.intp)]
        split = idx < 0
        if split.any():
            found = np.searchsorted(self.positions, pos[split], side="left")
            found[found == len(self.positions)] = 0
            idx[split] = found
        return idx

    def owner_of_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """Server id owning each block number."""
        return self.owners[self._vnode_of_positions(mix64(blocks))]

    def vnode_of(self, keys: np.ndarray) -> np.ndarray:
        """Index (into positions/owners) of the virtual server owning each key. One pass in
        numba that hashes each block once per run of keys in it (sorted keys of one block are
        adjacent), instead of a hash per key."""
        from .ring_hash import vnodes_of_keys  # numba, imported when first needed: the scheduler
        # rarely hashes keys and starts faster without it
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        return vnodes_of_keys(keys, np.uint64(self.block_bits), self._lut, self.positions)

    def replica_table(self, k: int) -> np.ndarray:
        """(virtual servers, k) array: for each virtual server, the next k distinct physical
        servers clockwise that are not its owner (-1 where the ring has too few servers).

        Placing replicas this way makes failover free of data movement: when a server leaves the
        ring, each of its segments falls to the next virtual server clockwise whose owner is
        another server - the segment's first replica, which already holds the data.
        """
        cached = self._replicas.get(k)
        if cached is not None:
            return cached
        n = len(self.owners)
        table = np.full((n, k), -1, dtype=np.int64)
        owners = self.owners.tolist()
        for i in range(n):
            found: list[int] = []
            j = i
            while len(found) < k and len(found) < len(self.servers) - 1:
                j = (j + 1) % n
                o = owners[j]
                if o != owners[i] and o not in found:
                    found.append(o)
            table[i, :len(found)] = found
        self._replicas[k] = table
        return table

    def holders(self, keys: np.ndarray, k: int) -> np.ndarray:
        """(n, k+1) server ids holding each key: its master, then its k replicas (-1 = none)."""
        idx = self.vnode_of(keys)
        return np.column_stack([self.owners[idx], self.replica_table(k)[idx]])

    def heirs(self, server: int, new: KeyRing) -> list[int]:
        """Servers of ring ``new`` that master the segments ``server`` mastered on this ring."""
        pos = self.positions[self.owners == server]
        if not len(pos):
            return []
        idx = np.searchsorted(new.positions, pos, side="left")
        idx[idx == len(new.positions)] = 0
        return sorted({int(o) for o in new.owners[idx]})

    def owner_of(self, keys: np.ndarray) -> np.ndarray:
        """Server id owning each key."""
        if self._single:
            return np.full(len(keys), self.owners[0], dtype=np.int64)
        return self.owner_of_blocks(np.asarray(keys, dtype=np.uint64) >> np.uint64(self.block_bits))

    def split(self, keys: np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
        """Split sorted keys by owner: [(server id, selector)], selector a slice when the server's keys
        are contiguous in ``keys`` (no copy needed), else an index array. Servers with no keys are absent.
        """
        n = len(keys)
        if self._single or n == 0:
            return [(int(self.owners[0]), slice(0, n))] if n else []
        blocks = keys >> np.uint64(self.block_bits)
        starts = np.flatnonzero(blocks[1:] != blocks[:-1]) + 1
        if len(starts) > n // 8:  # hashed keys: nearly one block per key, split key by key
            owners = self.owner_of_blocks(blocks)
            out = []
            for sid in self.servers:  # np.unique would sort all n owners
                idx = np.flatnonzero(owners == sid)
                if not len(idx):
                    continue
                contiguous = idx[-1] - idx[0] + 1 == len(idx)
                out.append((int(sid), slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx))
            return out
        starts = np.concatenate(([0], starts))
        owners = self.owner_of_blocks(blocks[starts])
        if (owners == owners[0]).all():
            return [(int(owners[0]), slice(0, n))]
        # merge consecutive blocks with the same owner into segments
        change = np.flatnonzero(owners[1:] != owners[:-1]) + 1
        seg_start = starts[np.concatenate(([0], change))]
        seg_owner = owners[np.concatenate(([0], change))]
        seg_end = np.append(seg_start[1:], n)
        out = []
        for sid in np.unique(seg_owner):
            mine = np.flatnonzero(seg_owner == sid)
            if len(mine) == 1:
                out.append((int(sid), slice(int(seg_start[mine[0]]), int(seg_end[mine[0]]))))
            else:
                lens = seg_end[mine] - seg_start[mine]
                out.append((int(sid), _ranges_to_index(seg_start[mine], lens)))
        return out

    def servers_sorted(self) -> list[int]:
        return sorted(self.servers)

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"servers": sorted(self.servers), "virtual": self.virtual,
                "block_bits": self.block_bits, "version": self.version}

    @classmethod
    def from_json(cls, d: dict) -> KeyRing:
        return cls(servers=[int(s) for s in d["servers"]], virtual=int(d["virtual"]),
                   block_bits=int(d["block_bits"]), version=int(d["version"]))

    def share(self) -> dict[int, float]:
        """Fraction of the ring (hence of hashed blocks) each server owns - a balance check."""
        gaps = np.diff(np.append(self.positions, self.positions[0]).astype(object))
        gaps = np.array([(int(g) % (1 << 64)) for g in gaps], dtype=float) / float(1 << 64)
        # the segment ending at position i belongs to owner i (blocks map to the first position >= them)
        shares: dict[int, float] = {}
        owners_next = np.roll(self.owners, -1)
        for o, g in zip(owners_next, gaps):
            shares[int(o)] = shares.get(int(o), 0.0) + g
        return shares


def _ranges_to_index(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), vectorised."""
    total = int(lens.sum())
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
    return np.arange(total, dtype=np.int64) + offsets
