"""The compiled (numba) kernels of DBPG over one worker's CSC shard (see dbpg.py): the block's
gradient and curvature, the margin updates, the curvature scale, the per-key counts of the set-up.

Per example the kernels keep the margin m_i (float64) and qs_i = y_i * exp(-m_i) as float32
(|qs_i| capped at QS_CAP; a zero keeps the label in its sign): the gradient kernel then reads one
4-byte number per non-zero at random - 2 MB for 500 k examples, cache-resident - instead of a label
and an exp(-m) of 8 bytes each. Float32 suffices: p_i = 1 / (1 + |qs_i|) enters float32
gradients, and qs is recomputed exactly from m once a pass.
"""

from __future__ import annotations

import math

import numba
import numpy as np

QS_CAP = 1e38


@numba.njit(cache=True, nogil=True)
def refresh_qs(m, y, qs):
    """qs_i = y_i * min(exp(-m_i), QS_CAP) (as float32)."""
    for i in range(m.size):
        qs[i] = math.copysign(min(np.exp(-m[i]), QS_CAP), y[i])


@numba.njit(cache=True, nogil=True)
def row_terms(qs, hessian, rd):
    """rd[i] = [dloss/dm_i, c_i] = [p_i - [y_i = 1], p_i (1 - p_i) or 1]; p_i = sigmoid(m_i)
    = 1 / (1 + |qs_i|), y_i the sign of qs_i."""
    for i in range(qs.size):
        v = qs[i]
        p = 1.0 / (1.0 + abs(np.float64(v)))
        rd[i, 0] = p - (1.0 if math.copysign(1.0, v) > 0 else 0.0)
        rd[i, 1] = p * (1.0 - p) if hessian else 1.0


@numba.njit(cache=True, nogil=True)
def block_grad_curv(indptr, indices, data, scale, cols, rd, out):
    """out[q] = [sum x r, sum scale c] over column cols[q]."""
    for q in range(cols.size):
        j = cols[q]
        gs = 0.0
        us = 0.0
        for p in range(indptr[j], indptr[j + 1]):
            i = indices[p]
            gs += data[p] * rd[i, 0]
            us += scale[p] * rd[i, 1]
        out[q, 0] = gs
        out[q, 1] = us


@numba.njit(cache=True, nogil=True)
def block_grad_curv_lazy(indptr, indices, data, scale, cols, qs, hessian, binary, out):
    """block_grad_curv computing each entry's row terms on the spot from qs: cheaper than
    refreshing all rows when a block touches few of them (many blocks). binary: every x is 1
    (data is not read)."""
    for c in range(cols.size):
        j = cols[c]
        gs = 0.0
        us = 0.0
        for p in range(indptr[j], indptr[j + 1]):
            v = qs[indices[p]]
            s = 1.0 / (1.0 + abs(np.float64(v)))
            r = s - (1.0 if math.copysign(1.0, v) > 0 else 0.0)
            gs += r if binary else data[p] * r
            us += scale[p] * (s * (1.0 - s) if hessian else 1.0)
        out[c, 0] = gs
        out[c, 1] = us


@numba.njit(cache=True, nogil=True)
def add_block_margins(indptr, indices, data, cols, delta, binary, m, qs):
    """m += X[:, cols] @ delta (skipping unchanged coordinates), and qs with it. For a binary
    feature |qs_i| *= exp(-delta_j), one exp per column instead of one per non-zero (the caller
    refreshes qs from m exactly once a pass)."""
    for c in range(cols.size):
        dj = delta[c]
        if dj != 0.0:
            j = cols[c]
            factor = np.exp(-dj)
            for p in range(indptr[j], indptr[j + 1]):
                i = indices[p]
                x = 1.0 if binary else np.float64(data[p])
                mi = m[i] + x * dj
                m[i] = mi
                v = qs[i]
                a = abs(np.float64(v)) * factor if x == 1.0 else np.exp(-mi)
                qs[i] = math.copysign(min(a, QS_CAP), v)


def curvature_scale(indptr, indices, data, bounds, active, n_rows: int) -> np.ndarray:
    """scale[p] = x_p^2 * n_ib: the active non-zeros of x_p's row inside x_p's block (0 for
    inactive columns); bounds: the blocks' first columns, then the number of columns."""
    scale = np.empty(data.size, np.float32)
    fill_curvature_scale(indptr, indices, data, bounds, active, np.zeros(n_rows, np.int32), scale)
    return scale


@numba.njit(cache=True, nogil=True)
def fill_curvature_scale(indptr, indices, data, bounds, active, count, scale):
    """curvature_scale into scale; count: n_rows zeros (scratch, zeros again on return)."""
    for b in range(bounds.size - 1):
        for j in range(bounds[b], bounds[b + 1]):
            if active[j]:
                for p in range(indptr[j], indptr[j + 1]):
                    count[indices[p]] += 1
            else:
                scale[indptr[j]:indptr[j + 1]] = 0.0
        for j in range(bounds[b], bounds[b + 1]):
            if active[j]:
                for p in range(indptr[j], indptr[j + 1]):
                    scale[p] = data[p] * data[p] * count[indices[p]]
        for j in range(bounds[b], bounds[b + 1]):   # clear only what was counted
            if active[j]:
                for p in range(indptr[j], indptr[j + 1]):
                    count[indices[p]] = 0


@numba.njit(cache=True, nogil=True)
def key_counts(indptr, data, cap, out):
    """out[j] = [1, min(sum_p |data_p| over column j, cap)]: what a worker adds up per key."""
    for j in range(out.shape[0]):
        a = 0.0
        for p in range(indptr[j], indptr[j + 1]):
            a += abs(data[p])
        out[j, 0] = 1.0
        out[j, 1] = min(a, cap)


@numba.njit(cache=True, nogil=True)
def all_ones(data) -> bool:
    for p in range(data.size):  # noqa: SIM110 - numba compiles the loop, not a generator
        if data[p] != 1.0:
            return False
    return True


def warm_up() -> None:
    """Call every kernel once on tiny inputs (loading numba's cached machine code)."""
    ptr, idx, one = np.array([0, 1]), np.zeros(1, np.int32), np.ones(1, np.float32)
    cols, m, y, out = np.zeros(1, np.int64), np.zeros(1), np.ones(1), np.empty((1, 2), np.float32)
    rd = np.empty((1, 2))
    refresh_qs(m, y, one)
    row_terms(one, True, rd)
    block_grad_curv(ptr, idx, one, one, cols, rd, out)
    block_grad_curv_lazy(ptr, idx, one, one, cols, one, True, True, out)
    add_block_margins(ptr, idx, one, cols, np.zeros(1), True, m, one)
    curvature_scale(ptr, idx, one, np.array([0, 1]), np.ones(1, np.bool_), 1)
    key_counts(ptr, one, 1.0, np.empty((1, 2), np.float32))
    all_ones(one)
