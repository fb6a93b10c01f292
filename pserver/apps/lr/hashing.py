"""The feature hash: how a raw feature (a libsvm index, a Criteo integer bin or category string)
becomes a 64-bit parameter-server key.

The spec is fixed (tests pin known values): int_key(v, c) = mix64(uint64(v) ^ salt(c)) and
str_key(s, c) = mix64(fnv1a64(utf8(s)) ^ salt(c)), with mix64 splitmix64's finaliser (a bijection,
so libsvm indices never collide) and salt(c) = mix64((c + 1) * GOLDEN) for column c. All arithmetic
wraps mod 2**64. The full spec: docs/lr.md, "Hash spec (pserver-lr-hash-v1)"."""

from __future__ import annotations

from collections.abc import Iterable

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
HASH_SPEC = "pserver-lr-hash-v1: key = mix64(x ^ salt(column)), x = uint64(int) or fnv1a64(utf8)"


@numba.njit(cache=True, nogil=True, inline="always")
def mix64_scalar(z: np.uint64) -> np.uint64:
    """splitmix64 finaliser of one uint64 (numba; callers must pass np.uint64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True, inline="always")
def salt_scalar(column: np.int64) -> np.uint64:
    """salt(c) for one column (numba)."""
    return mix64_scalar(np.uint64(column + 1) * np.uint64(0x9E3779B97F4A7C15))


@numba.njit(cache=True, nogil=True, inline="always")
def fnv1a64_bytes(buf: np.ndarray, start: np.int64, end: np.int64) -> np.uint64:
    """FNV-1a-64 of buf[start:end] (numba; buf is a uint8 array)."""
    h = np.uint64(0xCBF29CE484222325)
    for i in range(start, end):
        h = (h ^ np.uint64(buf[i])) * np.uint64(0x100000001B3)
    return h


@numba.njit(cache=True, nogil=True)
def _str_keys(buf: np.ndarray, offsets: np.ndarray, salt: np.uint64) -> np.ndarray:
    out = np.empty(offsets.size - 1, dtype=np.uint64)
    for j in range(out.size):
        out[j] = mix64_scalar(fnv1a64_bytes(buf, offsets[j], offsets[j + 1]) ^ salt)
    return out


def mix64(z: np.ndarray | int) -> np.ndarray:
    """Vectorised splitmix64 finaliser; accepts any integer array (reinterpreted as uint64)."""
    z = np.asarray(z)
    # Signed input is reinterpreted (two's complement), never value-converted.
    z = z.astype(np.int64).view(np.uint64) if z.dtype.kind == "i" else z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def column_salt(column: int) -> np.uint64:
    """salt(c) = mix64((c + 1) * GOLDEN): the per-column salt; column 0 is libsvm's."""
    with np.errstate(over="ignore"):
        return np.uint64(mix64(np.uint64(column + 1) * GOLDEN)[()])


def int_keys(values: np.ndarray | Iterable[int], column: int = 0) -> np.ndarray:
    """Keys of integer feature values in one column: mix64(uint64(v) ^ salt(column)).

    `values` are int64 (negative values use two's complement). Returns a uint64 array of the same
    length. libsvm feature indices are keyed with column 0.
    """
    v = np.asarray(values, dtype=np.int64).view(np.uint64)
    return mix64(v ^ column_salt(column))


def str_keys(values: Iterable[str], column: int) -> np.ndarray:
    """Keys of categorical strings in one column: mix64(fnv1a64(utf8(s)) ^ salt(column)).

    The strings are joined into one byte buffer and hashed by one compiled loop (no per-string
    Python hashing). Returns a uint64 array, one key per string.
    """
    encoded = [s.encode("utf-8") for s in values]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    if buf.size == 0:
        buf = np.zeros(1, dtype=np.uint8)
    return _str_keys(buf, offsets, column_salt(column))
