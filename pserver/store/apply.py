"""Applying requests to a table: pushes and pulls in either key form, and the sum of the parts of
a synchronous round (the aggregated update)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np

if TYPE_CHECKING:  # only the shape of a request's keys: the store sits below kv
    from ..kv.keys import KeySet


def apply_push(table, keys: KeySet, vals: np.ndarray) -> None:
    if keys.keys is not None:
        table.push(keys.keys, vals)
    else:
        table.push_runs(keys.starts, keys.lengths, vals)


def apply_pull(table, keys: KeySet) -> np.ndarray:
    if keys.keys is not None:
        return table.pull(keys.keys)
    return table.pull_runs(keys.starts, keys.lengths)


@numba.njit(cache=True, nogil=True)
def _merge_sum(k1, v1, k2, v2):
    """Union of two sorted unique key arrays, with the rows of keys in both added: one pass."""
    n1, n2, cols = k1.size, k2.size, v1.shape[1]
    keys = np.empty(n1 + n2, k1.dtype)
    vals = np.empty((n1 + n2, cols), v1.dtype)
    i = j = n = 0
    while i < n1 or j < n2:
        if j == n2 or (i < n1 and k1[i] < k2[j]):
            keys[n] = k1[i]
            for c in range(cols):
                vals[n, c] = v1[i, c]
            i += 1
        elif i == n1 or k2[j] < k1[i]:
            keys[n] = k2[j]
            for c in range(cols):
                vals[n, c] = v2[j, c]
            j += 1
        else:
            keys[n] = k1[i]
            for c in range(cols):
                vals[n, c] = v1[i, c] + v2[j, c]
            i += 1
            j += 1
        n += 1
    return keys[:n], vals[:n]


def sum_parts(parts: list[tuple[np.ndarray, np.ndarray]], cols: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Sum several (keys, values) pushes into one: the aggregated update of a synchronous round.
    Each part's keys are sorted and unique (checked on receipt), so parts merge pairwise in linear
    time - no concatenation and sort of every key."""
    if len(parts) == 1:
        return parts[0]
    k0 = parts[0][0]
    if all(len(k) == len(k0) and np.array_equal(k, k0) for k, _ in parts[1:]):
        total = parts[0][1].astype(parts[0][1].dtype, copy=True)
        for _, v in parts[1:]:
            total += v
        return k0, total
    merged = [(np.ascontiguousarray(k), np.ascontiguousarray(v).reshape(len(k), cols))
              for k, v in parts]
    while len(merged) > 1:  # a balanced tree of pairwise merges
        merged = [_merge_sum(*merged[i], *merged[i + 1]) if i + 1 < len(merged) else merged[i]
                  for i in range(0, len(merged), 2)]
    return merged[0]
