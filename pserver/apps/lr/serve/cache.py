"""A bounded cache of pulled weights with a freshness limit, without I/O: sorted key, weight and
pull-time arrays, looked up with one searchsorted per batch (no per-key Python)."""

from __future__ import annotations

import numpy as np


class WeightCache:
    """Weights pulled at most ``max_age`` seconds ago, at most ``max_entries`` of them (the oldest
    pulls are evicted first)."""

    def __init__(self, max_entries: int, max_age: float) -> None:
        if max_entries < 1 or max_age <= 0:
            raise ValueError("a weight cache needs max_entries >= 1 and max_age > 0")
        self.max_entries, self.max_age = max_entries, max_age
        self.keys = np.empty(0, np.uint64)
        self.weights = np.empty(0, np.float32)
        self.pulled_at = np.empty(0, np.float64)

    def __len__(self) -> int:
        return int(self.keys.size)

    def lookup(self, keys: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weights, pulled_at, hit) for sorted unique ``keys``: hit[i] is True where the cache
        holds keys[i] pulled within max_age of ``now``; weights and pulled_at are valid there."""
        n = self.keys.size
        if n == 0:
            return np.zeros(keys.size, np.float32), np.zeros(keys.size), np.zeros(keys.size, bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), n - 1)
        hit = (self.keys[pos] == keys) & (self.pulled_at[pos] >= now - self.max_age)
        return self.weights[pos], self.pulled_at[pos], hit

    def store(self, keys: np.ndarray, weights: np.ndarray, pulled_at: float) -> None:
        """Remember weights of sorted unique ``keys`` pulled at ``pulled_at`` (replacing older
        entries of the same keys), then evict the oldest entries beyond max_entries."""
        old = ~np.isin(self.keys, keys, assume_unique=True)
        k = np.concatenate([self.keys[old], keys])
        w = np.concatenate([self.weights[old], np.asarray(weights, np.float32)])
        t = np.concatenate([self.pulled_at[old], np.full(keys.size, pulled_at)])
        if k.size > self.max_entries:
            keep = np.argsort(t, kind="stable")[-self.max_entries:]
            k, w, t = k[keep], w[keep], t[keep]
        order = np.argsort(k)
        self.keys, self.weights, self.pulled_at = k[order], w[order], t[order]
