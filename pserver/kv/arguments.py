"""Checks of the arguments of KVWorker calls: keys, values, result buffers, key ranges and spans.

Each returns the argument in the form the worker sends (contiguous, reshaped) without copying
when it can, or raises the specific error from pserver.errors saying what to do.
"""

from __future__ import annotations

import numpy as np

from ..errors import DTypeError, InvalidKeysError, ValueShapeError
from ..store.spec import TableSpec
from . import keys as keyfmt


def check_keys(keys) -> np.ndarray:
    if not isinstance(keys, np.ndarray):
        raise DTypeError(f"keys must be a numpy uint64 array, got {type(keys).__name__}; use "
                         f"np.asarray(keys, dtype=np.uint64)")
    if keys.dtype != np.uint64:
        raise DTypeError(f"keys must be uint64, got {keys.dtype}; use keys.astype(np.uint64)")
    if keys.ndim != 1:
        raise InvalidKeysError(f"keys must be 1-D, got shape {keys.shape}")
    if not keyfmt.sorted_unique(keys):
        raise InvalidKeysError("keys must be sorted and unique; use np.unique(keys), which sorts "
                               "and removes duplicates (and reorder the values the same way)")
    return np.ascontiguousarray(keys)


def check_vals(vals, n: int, cols: int, dtype: str, what: str) -> np.ndarray:
    if not isinstance(vals, np.ndarray):
        raise DTypeError(f"{what} must be a numpy array, got {type(vals).__name__}")
    if vals.dtype != np.dtype(dtype):
        raise DTypeError(f"{what} have dtype {vals.dtype} but the table stores {dtype}; use "
                         f"{what}.astype(np.{dtype})")
    if vals.size != n * cols:
        raise ValueShapeError(f"{what} hold {vals.size} entries but {n} keys x {cols} columns = "
                              f"{n * cols} are needed")
    return np.ascontiguousarray(vals).reshape(n, cols)


def check_out(out, n: int, spec: TableSpec) -> np.ndarray:
    """The result buffer of a read of n keys: ``out`` checked, or a new one ((n,) for dim 1)."""
    if out is None:
        return np.empty((n,) if spec.dim == 1 else (n, spec.dim), dtype=spec.dtype)
    if not isinstance(out, np.ndarray) or out.dtype != np.dtype(spec.dtype):
        raise DTypeError(f"out has dtype {getattr(out, 'dtype', type(out).__name__)}, table "
                         f"{spec.name!r} stores {spec.dtype}")
    if out.size != n * spec.dim or not out.flags.c_contiguous:
        raise ValueShapeError(f"out must be a C-contiguous array of {n}x{spec.dim} entries, got "
                              f"shape {out.shape}")
    return out


def check_range(lo: int, hi: int) -> None:
    if not (isinstance(lo, int | np.integer) and isinstance(hi, int | np.integer)
            and 0 <= lo <= hi <= 1 << 64):
        raise InvalidKeysError(f"a key range needs integers 0 <= lo <= hi <= 2**64, got "
                               f"[{lo}, {hi})")


def check_span(span, keys: np.ndarray) -> list[int]:
    try:
        lo, hi = (int(x) for x in span)
    except (TypeError, ValueError):
        raise InvalidKeysError(f"span must be a pair (lo, hi) of integers, got {span!r}") from None
    if not 0 <= lo < hi <= 1 << 64 or (len(keys) and not lo <= int(keys[0]) <= int(keys[-1]) < hi):
        raise InvalidKeysError(f"span [{lo}, {hi}) must be a key range within [0, 2**64) that "
                               "contains every pushed key")
    return [lo, hi]
