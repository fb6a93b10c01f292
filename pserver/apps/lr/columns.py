"""The shard's CSC matrix from parsed row-major entries: one column per distinct key, in increasing
key order (so a key range is a contiguous column range), rows ascending within a column.

One radix sort fed chunk by chunk while the shard is parsed: the first (MSD) digit scatters each
chunk into 256 regions (an overflow list catches what does not fit), then each region is sorted by
LSD digits in a cache-sized scratch buffer and written back as final columns. An entry costs 12
bytes while sorting (a plain sort of one key array takes 20, and paging in fresh memory costs more
than the sort on a VM). Design and measurements: docs/lr.md, "Data formats" and "Measured results"."""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

MSD_BITS = 8        # 256 regions: a scatter whose write streams stay in cache
LSD_BITS = 13       # then LSD_PASSES digits of LSD_BITS per region, in a scratch buffer
LSD_PASSES = 2
SLACK = 0.06        # regions get this much more room than the first chunk's histogram predicts
MIN_ROOM = 256      # entries of room every region gets beyond its estimate


@numba.njit(cache=True, nogil=True)
def _bit_length(x) -> int:
    n = 0
    while n < 64 and (x >> np.uint64(n)) != 0:
        n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _histogram(keys, shift, out):
    """out[d] = entries whose digit min(key >> shift, 255) is d; returns the OR of the keys."""
    top = np.uint64(0)
    for i in range(keys.size):
        out[min(keys[i] >> shift, np.uint64(255))] += 1
        top |= keys[i]
    return top


@numba.njit(cache=True, nogil=True)
def _scatter_chunk(keys, vals, ones, row_nnz, row0, shift, rstart, fill, ak, ar, av,
                   ov_k, ov_r, ov_v, ov_d, n_ov):
    """Entries of one chunk (rows row0, row0 + 1, ...; row r has row_nnz[r] of them) into their
    regions, or to the overflow (whose arrays have room for all of them). Returns the new
    overflow count. The digit min(key >> shift, 255) never decreases with the key."""
    i = 0
    for r in range(row_nnz.size):
        row = row0 + r
        for _ in range(row_nnz[r]):
            k = keys[i]
            d = min(k >> shift, np.uint64(255))
            q = fill[d]
            if q < rstart[d + 1]:
                ak[q] = k
                ar[q] = row
                if not ones:
                    av[q] = vals[i]
                fill[d] = q + 1
            else:
                ov_k[n_ov] = k
                ov_r[n_ov] = row
                if not ones:
                    ov_v[n_ov] = vals[i]
                ov_d[n_ov] = d
                n_ov += 1
            i += 1
    return n_ov


@numba.njit(cache=True, nogil=True)
def _sort_regions(ak, ar, av, ones, rstart, fill, ov_k, ov_r, ov_v, ov_start, out_r, out_v,
                  uniq, indptr):
    """Sort every region (then its overflow entries ov_*[ov_start[d]:ov_start[d + 1]]) by key and
    write the columns: rows and values to out_r/out_v from position 0 on (out_r may be ar when no
    region's output reaches past its own start into an unsorted region: see ColumnBuilder),
    distinct keys to uniq and column starts to indptr. Returns (number of columns, whether some
    row repeats a key)."""
    nb = fill.size
    big = 0
    for d in range(nb):
        big = max(big, fill[d] - rstart[d] + ov_start[d + 1] - ov_start[d])
    tk, tr = np.empty(big, np.uint64), np.empty(big, np.int32)
    sk, sr = np.empty(big, np.uint64), np.empty(big, np.int32)
    tv = np.empty(0 if ones else big, np.float32)
    sv = np.empty(0 if ones else big, np.float32)
    nl = 1 << LSD_BITS
    lmask = np.uint64(nl - 1)
    cnt = np.empty(nl, np.int64)
    pos = 0
    nc = 0
    repeat = False
    for d in range(nb):
        a, b = rstart[d], fill[d]
        m = b - a
        tk[:m] = ak[a:b]
        tr[:m] = ar[a:b]
        if not ones:
            tv[:m] = av[a:b]
        oa, ob = ov_start[d], ov_start[d + 1]
        tk[m:m + ob - oa] = ov_k[oa:ob]
        tr[m:m + ob - oa] = ov_r[oa:ob]
        if not ones:
            tv[m:m + ob - oa] = ov_v[oa:ob]
        m += ob - oa
        if m == 0:
            continue
        diff = np.uint64(0)
        for j in range(1, m):
            diff |= tk[j] ^ tk[0]
        lo = max(_bit_length(diff) - LSD_PASSES * LSD_BITS, 0)
        for p in range(LSD_PASSES):   # (tk, tr, tv) -> (sk, sr, sv), then swap the names
            shift = np.uint64(lo + LSD_BITS * p)
            cnt[:] = 0
            for j in range(m):
                cnt[(tk[j] >> shift) & lmask] += 1
            if cnt.max() == m:
                continue
            acc = 0
            for c in range(nl):
                acc, cnt[c] = acc + cnt[c], acc
            for j in range(m):
                c = (tk[j] >> shift) & lmask
                q = cnt[c]
                sk[q] = tk[j]
                sr[q] = tr[j]
                if not ones:
                    sv[q] = tv[j]
                cnt[c] = q + 1
            tk, sk = sk, tk
            tr, sr = sr, tr
            tv, sv = sv, tv
        low = np.uint64(lo)
        j = 0
        while j < m:   # runs of equal sorted bits: order mixed ones, then emit their columns
            e = j + 1
            mixed = False
            kj = tk[j]
            while e < m and (tk[e] >> low) == (kj >> low):
                mixed |= tk[e] != kj
                e += 1
            if mixed:
                order = np.argsort(tk[j:e], kind="mergesort")
                tk[j:e] = tk[j:e][order]
                tr[j:e] = tr[j:e][order]
                if not ones:
                    tv[j:e] = tv[j:e][order]
            for t in range(j, e):
                if t == 0 or tk[t] != tk[t - 1]:
                    uniq[nc] = tk[t]
                    indptr[nc] = pos + t
                    nc += 1
                else:
                    repeat |= tr[t] == tr[t - 1]
            j = e
        out_r[pos:pos + m] = tr[:m]
        if not ones:
            out_v[pos:pos + m] = tv[:m]
        pos += m
    indptr[nc] = pos
    return nc, repeat


class ColumnBuilder:
    """Collects parsed entries chunk by chunk (add) and returns the CSC matrix (finish)."""

    def __init__(self) -> None:
        self.n = 0              # entries so far
        self.ak = None          # regions: keys, rows, values (None while every value is 1)
        self.ar = self.av = None
        self.ov = None          # overflow: keys, rows, values, regions; self.n_ov used
        self.n_ov = 0

    def add(self, keys: np.ndarray, vals: np.ndarray | None, row_nnz: np.ndarray, row0: int,
            expected_entries: int) -> None:
        """Entries of rows row0, row0 + 1, ... (row r has row_nnz[r] of them); vals None: all 1.
        expected_entries: the total expected (sizes the regions at the first non-empty chunk).
        The arrays are copied from: the caller may reuse them."""
        if keys.size == 0:
            return
        if self.ak is None:
            self._allocate(keys, expected_entries)
        if vals is not None and self.av is None:   # the first value other than 1
            self.av = np.ones(self.ak.size, np.float32)
            self.ov[2] = np.ones(self.ov[0].size, np.float32)
        if self.n_ov + keys.size > self.ov[0].size:
            self._grow_overflow(self.n_ov + keys.size)
        ones = self.av is None
        if vals is None and not ones:
            vals = np.ones(keys.size, np.float32)
        dummy = np.empty(0, np.float32)
        self.n_ov = _scatter_chunk(
            keys, dummy if ones else vals, ones, row_nnz, row0, self.shift, self.rstart,
            self.fill, self.ak, self.ar, dummy if ones else self.av, self.ov[0], self.ov[1],
            dummy if ones else self.ov[2], self.ov[3], self.n_ov)
        self.n += keys.size

    def _allocate(self, keys: np.ndarray, expected: int) -> None:
        nb = 1 << MSD_BITS
        hist = np.zeros(nb, np.int64)
        top = _histogram(keys, np.uint64(63), hist)   # only the OR is wanted here
        self.shift = np.uint64(max(int(top).bit_length() - MSD_BITS, 0))
        hist[:] = 0
        _histogram(keys, self.shift, hist)
        scale = max(expected, keys.size) / keys.size * (1 + SLACK)
        room = np.ceil(hist * scale).astype(np.int64) + MIN_ROOM
        self.rstart = np.zeros(nb + 1, np.int64)
        np.cumsum(room, out=self.rstart[1:])
        self.fill = self.rstart[:nb].copy()
        self.ak = np.empty(int(self.rstart[-1]), np.uint64)
        self.ar = np.empty(int(self.rstart[-1]), np.int32)
        self.ov = [np.empty(1024, np.uint64), np.empty(1024, np.int32),
                   np.empty(0, np.float32), np.empty(1024, np.int64)]

    def _grow_overflow(self, need: int) -> None:
        size = max(need, 2 * self.ov[0].size)
        for i, a in enumerate(self.ov):
            if i == 2 and self.av is None:
                continue
            b = np.empty(size, a.dtype)
            b[:self.n_ov] = a[:self.n_ov]
            self.ov[i] = b

    def finish(self, n_rows: int) -> tuple[sp.csc_matrix, np.ndarray]:
        """(X, distinct keys): X[i, j] is the value of key keys[j] in row i (summed if a row
        repeats a key). The builder is spent."""
        n, ones = self.n, self.av is None
        if self.ak is None:
            return sp.csc_matrix((n_rows, 0), dtype=np.float32), np.empty(0, np.uint64)
        ov_k, ov_r, ov_v, ov_d = (a[:self.n_ov] for a in self.ov)
        order = np.argsort(ov_d, kind="stable")   # overflow by region, row order kept
        ov_k, ov_r = ov_k[order], ov_r[order]
        ov_v = ov_v if ones else ov_v[order]
        nb = self.fill.size
        ov_start = np.zeros(nb + 1, np.int64)
        np.cumsum(np.bincount(ov_d, minlength=nb), out=ov_start[1:])
        sizes = self.fill - self.rstart[:nb] + np.diff(ov_start)
        # in place when region d's columns end before region d + 1 starts, for every d
        in_place = bool(np.all(np.cumsum(sizes) <= self.rstart[1:]))
        out_r = self.ar if in_place else np.empty(n, np.int32)
        out_v = np.empty(0, np.float32) if ones else (self.av if in_place else
                                                        np.empty(n, np.float32))
        uniq, indptr = np.empty(n, np.uint64), np.empty(n + 1, np.int64)
        nc, repeat = _sort_regions(self.ak, self.ar, np.empty(0, np.float32) if ones else
                                   self.av, ones, self.rstart, self.fill, ov_k, ov_r, ov_v,
                                   ov_start, out_r, out_v, uniq, indptr)
        self.ak = self.ar = self.av = self.ov = None   # the keys' memory is free again ...
        if ones:
            out_v = np.ones(n, np.float32)              # ... for the values of binary data
        X = sp.csc_matrix((out_v[:n], out_r[:n], indptr[:nc + 1]), shape=(n_rows, nc))
        if repeat:
            X.sum_duplicates()  # a repeated idx in one line (or a hash collision) adds up
        return X, uniq[:nc]


def csc_by_key(keys: np.ndarray, vals: np.ndarray | None, row_nnz: np.ndarray
               ) -> tuple[sp.csc_matrix, np.ndarray]:
    """CSC matrix of the row-major entries (keys, vals - None: all 1; row i has row_nnz[i] of
    them) whose column j is the j-th smallest distinct key. Returns (X, distinct keys)."""
    b = ColumnBuilder()
    b.add(keys, vals, row_nnz, 0, keys.size)
    return b.finish(row_nnz.size)


def warm_up() -> None:
    """Load the compiled kernels of this module (numba's cached machine code)."""
    csc_by_key(np.array([2, 1], np.uint64), None, np.array([2]))
    csc_by_key(np.array([2, 1], np.uint64), np.ones(2, np.float32), np.array([2]))
