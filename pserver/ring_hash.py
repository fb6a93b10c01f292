"""The key ring's hot lookup compiled with numba: the virtual server of each key (see
:meth:`pserver.ring.KeyRing.vnode_of`). Kept apart so that importing the ring does not import numba."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def vnodes_of_keys(keys: np.ndarray, bits: np.uint64, lut: np.ndarray,
                   positions: np.ndarray) -> np.ndarray:
    """KeyRing.vnode_of for every key: mix64 of its block, the top-16-bit table, a binary search
    for the buckets a virtual server splits; the previous key's answer when the block repeats."""
    n = len(keys)
    out = np.empty(n, np.intp)
    npos = len(positions)
    prev = np.uint64(0)
    v = 0
    for i in range(n):
        b = keys[i] >> bits
        if i == 0 or b != prev:
            prev = b
            z = b + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            v = lut[z >> np.uint64(48)]
            if v < 0:
                v = np.searchsorted(positions, z)
                if v == npos:
                    v = 0
        out[i] = v
    return out
