"""Deterministic initial values of parameters (the ``TableSpec.init`` strings).

The initial value of (key, column) is a pure function of (key, column, seed) - splitmix64 hashes -
so a key never written reads its initial value without being stored, and replicas, restarts and
migration targets agree without shipping it. Plain vectorised numpy, cheap for workers to import.

    "zeros" | "constant:<c>" | "uniform:<a>" (U[-a, a)) | "normal:<std>" (Box-Muller)

Formulas: docs/store.md, "Deterministic initialization"."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import TableError

if TYPE_CHECKING:
    from .spec import TableSpec

INIT_KINDS = ("zeros", "constant", "uniform", "normal")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STREAM_GAMMA = np.uint64(0xD1B54A32D192ED03)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_M53 = 2.0 ** -53
# Bounds the temporaries of one vectorised step (elements of an (rows, streams) block).
_BLOCK_ELEMENTS = 1 << 20


def parse_init(init: str) -> tuple[str, float]:
    """Parse an init string into (kind, parameter).

    Raises TableError when the kind is unknown or the parameter is missing, not a finite number,
    or negative for uniform/normal.
    """
    if not isinstance(init, str):
        raise TableError(f"init must be a string such as 'zeros' or 'normal:0.01', got {init!r}")
    kind, sep, arg = init.partition(":")
    if kind == "zeros":
        if sep:
            raise TableError(f"init 'zeros' takes no parameter, got {init!r}")
        return kind, 0.0
    if kind not in INIT_KINDS:
        raise TableError(f"unknown init {init!r}; use one of 'zeros', 'constant:<c>', "
                         "'uniform:<a>', 'normal:<std>'")
    try:
        value = float(arg)
    except ValueError:
        raise TableError(f"init {init!r} needs a number after ':', e.g. '{kind}:0.01'") from None
    if not math.isfinite(value):
        raise TableError(f"init {init!r}: the parameter must be finite")
    if kind in ("uniform", "normal") and value < 0:
        raise TableError(f"init {init!r}: the parameter (a scale) must be >= 0")
    return kind, value


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element of a uint64 array (returns a new array, wraps mod 2^64)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _stream_hashes(keys: np.ndarray, seed: int, n_streams: int) -> np.ndarray:
    """(len(keys), n_streams) independent 64-bit hashes of (key, stream, seed)."""
    seed_h = mix64(np.array([seed], dtype=np.uint64))
    key_h = mix64(keys ^ seed_h)
    # splitmix64 streams: stream s of a key is its hash advanced s+1 steps of an odd gamma.
    # (Hashing the stream index with mix64 too would make (key a, stream c) and (key b,
    # stream d) collide whenever a ^ seed_h and c + seed_h coincide.)
    step = (np.arange(1, n_streams + 1, dtype=np.uint64) * _STREAM_GAMMA)
    return mix64(key_h[:, None] + step[None, :])


def _unit(h: np.ndarray) -> np.ndarray:
    """Map 64-bit hashes to float64 in [0, 1) using their top 53 bits."""
    return (h >> _S11).astype(np.float64) * _TWO_M53


def initial_values(spec: TableSpec, keys: np.ndarray) -> np.ndarray:
    """Initial rows of ``keys`` for a table: an (n, spec.dim) array of dtype spec.dtype.

    keys: 1-D uint64 (any order). The result depends only on (key, column, spec.seed, spec.init):
    bit-identical across tables, processes and restarts on one platform (normal uses libm log/cos,
    which may differ in the last bit between platforms).
    """
    kind, arg = parse_init(spec.init)
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    n, dim = keys.size, spec.dim
    if kind == "zeros":
        return np.zeros((n, dim), dtype=spec.dtype)
    if kind == "constant":
        return np.full((n, dim), arg, dtype=spec.dtype)
    out = np.empty((n, dim), dtype=spec.dtype)
    streams = dim if kind == "uniform" else 2 * dim
    step = max(1, _BLOCK_ELEMENTS // streams)
    for lo in range(0, n, step):
        h = _stream_hashes(keys[lo:lo + step], spec.seed, streams)
        if kind == "uniform":
            out[lo:lo + step] = (2.0 * _unit(h) - 1.0) * arg
        else:
            # Box-Muller: u1 in (0, 1] so log(u1) is finite.
            u1 = _unit(h[:, :dim]) + _TWO_M53
            u2 = _unit(h[:, dim:])
            out[lo:lo + step] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2) * arg
    return out
