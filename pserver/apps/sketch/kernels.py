"""Compiled CountMin kernels: tokenise and hash text, aggregate a batch, add it to a sketch.

An item's hash is mix64(fnv1a64(bytes)); its column in row i is mix64(hash ^ salt(seed, i)) % w,
and its key on the servers is i * w + column. Text tokens are maximal runs of ASCII letters,
digits and bytes >= 0x80 (UTF-8), ASCII letters lower-cased. Spec and rationale: docs/sketch.md.
"""

from __future__ import annotations

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _fold_table() -> np.ndarray:
    """byte -> its lower-cased token byte, or 0 for a separator."""
    t = np.zeros(256, dtype=np.uint8)
    for b in b"abcdefghijklmnopqrstuvwxyz0123456789":
        t[b] = b
    for b in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        t[b] = b + 32
    t[0x80:] = np.arange(0x80, 0x100, dtype=np.uint8)
    return t


FOLD = _fold_table()


@numba.njit(cache=True, nogil=True, inline="always")
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64 finaliser (a bijection of uint64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def row_salts(seed: np.uint64, depth: np.int64) -> np.ndarray:
    """salt(seed, i) = mix64(mix64(seed) ^ (i + 1) * GOLDEN) of each row i."""
    out = np.empty(depth, dtype=np.uint64)
    s = mix64(seed)
    for i in range(depth):
        out[i] = mix64(s ^ (np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15)))
    return out


@numba.njit(cache=True, nogil=True)
def tokenize_hash(buf: np.ndarray, fold: np.ndarray):
    """Hashes, start and end offsets of the tokens of ``buf`` (uint8), in order."""
    cap = buf.size // 2 + 1  # a token and its separator take at least two bytes
    hashes = np.empty(cap, dtype=np.uint64)
    starts = np.empty(cap, dtype=np.int64)
    ends = np.empty(cap, dtype=np.int64)
    n = 0
    i = 0
    size = buf.size
    while i < size:
        c = fold[buf[i]]
        if c == 0:
            i += 1
            continue
        start = i
        h = np.uint64(0xCBF29CE484222325)
        while c != 0:
            h = (h ^ np.uint64(c)) * np.uint64(0x100000001B3)
            i += 1
            if i == size:
                break
            c = fold[buf[i]]
        hashes[n] = mix64(h)
        starts[n] = start
        ends[n] = i
        n += 1
    return hashes[:n], starts[:n], ends[:n]


@numba.njit(cache=True, nogil=True)
def hash_spans(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Hash of each item buf[offsets[j]:offsets[j + 1]] as given (no folding)."""
    out = np.empty(offsets.size - 1, dtype=np.uint64)
    for j in range(out.size):
        h = np.uint64(0xCBF29CE484222325)
        for i in range(offsets[j], offsets[j + 1]):
            h = (h ^ np.uint64(buf[i])) * np.uint64(0x100000001B3)
        out[j] = mix64(h)
    return out


@numba.njit(cache=True, nogil=True)
def aggregate(hashes: np.ndarray):
    """Distinct hashes of a batch (in order of first occurrence), their counts and the index of
    their first occurrence: an open-addressing table sized to at least twice the batch."""
    cap = 16
    while cap < 2 * hashes.size:
        cap *= 2
    mask = np.uint64(cap - 1)
    slot_of = np.full(cap, -1, dtype=np.int64)
    uniq = np.empty(hashes.size, dtype=np.uint64)
    counts = np.zeros(hashes.size, dtype=np.float64)
    first = np.empty(hashes.size, dtype=np.int64)
    n = 0
    for j in range(hashes.size):
        h = hashes[j]
        s = np.int64(h & mask)  # the hash is already mixed: its low bits are uniform
        while True:
            k = slot_of[s]
            if k < 0:
                slot_of[s] = n
                uniq[n] = h
                counts[n] = 1.0
                first[n] = j
                n += 1
                break
            if uniq[k] == h:
                counts[k] += 1.0
                break
            s = (s + 1) & (cap - 1)
    return uniq[:n], counts[:n], first[:n]


@numba.njit(cache=True, nogil=True, inline="always")
def _cell(h: np.uint64, salt: np.uint64, row: np.int64, width: np.int64) -> np.int64:
    return row * width + np.int64(mix64(h ^ salt) % np.uint64(width))


@numba.njit(cache=True, nogil=True)
def cells(hashes: np.ndarray, salts: np.ndarray, width: np.int64) -> np.ndarray:
    """(n, depth) cell index row * width + column of each hash in each row."""
    out = np.empty((hashes.size, salts.size), dtype=np.int64)
    for j in range(hashes.size):
        for i in range(salts.size):
            out[j, i] = _cell(hashes[j], salts[i], i, width)
    return out


@numba.njit(cache=True, nogil=True)
def add_counts(hashes: np.ndarray, counts: np.ndarray, salts: np.ndarray, width: np.int64,
               pending: np.ndarray) -> None:
    """CountMin update: every cell of each item grows by its count."""
    for j in range(hashes.size):
        for i in range(salts.size):
            pending[_cell(hashes[j], salts[i], i, width)] += counts[j]


@numba.njit(cache=True, nogil=True)
def add_conservative(hashes: np.ndarray, counts: np.ndarray, salts: np.ndarray,
                     width: np.int64, local: np.ndarray, pending: np.ndarray) -> None:
    """Conservative update of this writer's own sketch ``local``: an item's cells rise only to
    min(its cells) + count; each rise is added to ``pending`` (what the servers have not seen)."""
    depth = salts.size
    idx = np.empty(depth, dtype=np.int64)
    for j in range(hashes.size):
        low = np.inf
        for i in range(depth):
            idx[i] = _cell(hashes[j], salts[i], i, width)
            low = min(low, local[idx[i]])
        target = low + counts[j]
        for i in range(depth):
            v = local[idx[i]]
            if v < target:
                pending[idx[i]] += target - v
                local[idx[i]] = target


def warm_up() -> None:
    """Load every kernel (from numba's on-disk cache, or compile it) on tiny inputs, so that a
    worker pays for it while it waits to join the cluster rather than after."""
    salts = row_salts(np.uint64(0), 2)
    hashes, _, _ = tokenize_hash(np.frombuffer(b"a b a", dtype=np.uint8), FOLD)
    hash_spans(np.zeros(1, dtype=np.uint8), np.zeros(2, dtype=np.int64))
    uniq, counts, _ = aggregate(hashes)
    cells(uniq, salts, 4)
    add_counts(uniq, counts, salts, 4, np.zeros(8))
    add_conservative(uniq, counts, salts, 4, np.zeros(8), np.zeros(8))
