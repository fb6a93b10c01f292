"""KKT filter (paper: "KKT filter", for L1-regularised models such as sparse logistic regression).

Worker side, :class:`KKTFilter`: skip coordinate k when ``w_k == 0 and |g_k| <= lambda - delta``
(the proximal update would leave it at 0), with w from ``FilterContext.weights`` and g from the
values (column ``grad_col`` of 2-D values; whole rows are dropped). Server side,
:class:`ActiveSet`: the coordinates the aggregated KKT conditions show to be inactive, reset on
convergence for one checking pass. The condition, the choice of delta and the measured savings:
docs/filters.md ("kkt").
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, DTypeError, ValueShapeError
from .base import SELECT, Filter, FilterContext, Payload

__all__ = ["ActiveSet", "KKTFilter", "kkt_mask"]


def _fmt(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def kkt_mask(w: np.ndarray, g: np.ndarray, l1: float, delta: float = 0.0) -> np.ndarray:
    """True where coordinate k must be sent: not (w_k == 0 and |g_k| <= l1 - delta).

    w, g: 1-D arrays of the same length (any float dtype). NaN gradients are always sent.
    Raises ValueShapeError on a length mismatch.
    """
    w = np.asarray(w)
    g = np.asarray(g)
    if w.shape != g.shape or w.ndim != 1:
        raise ValueShapeError(f"kkt_mask needs 1-D w and g of one length, got {w.shape} and "
                              f"{g.shape}")
    return ~((w == 0) & (np.abs(g) <= l1 - delta))


class KKTFilter(Filter):
    """Drop gradient coordinates the L1 proximal step would leave at zero (worker side).

    l1: the L1 regularisation strength lambda (>= 0); delta: safety margin (>= 0);
    grad_col: which column of 2-D values holds the gradient.
    """

    kind = "kkt"
    stage = SELECT

    def __init__(self, l1: float, delta: float = 0.0, grad_col: int = 0) -> None:
        if not (math.isfinite(l1) and l1 >= 0 and math.isfinite(delta) and delta >= 0):
            raise ConfigError(f"kkt needs finite l1 >= 0 and delta >= 0, got {l1}, {delta}")
        self.l1, self.delta, self.grad_col = float(l1), float(delta), int(grad_col)
        self.name = f"kkt:{_fmt(self.l1)}:{_fmt(self.delta)}"

    @classmethod
    def from_args(cls, args: list[str]) -> KKTFilter:
        """``kkt:L1[:DELTA]``."""
        if not 1 <= len(args) <= 2:
            raise ConfigError("kkt spec is kkt:L1 or kkt:L1:DELTA, e.g. kkt:1:0.1")
        try:
            return cls(*(float(a) for a in args))
        except ValueError:
            raise ConfigError(f"kkt L1 and DELTA must be numbers, not {args!r}") from None

    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        if p.values is None or ctx.flush:
            return p
        if p.keys is None:
            raise ConfigError(f"{self.name} needs the keys; put it before key_cache and compress")
        v = p.values
        if v.dtype.kind != "f":
            raise DTypeError(f"{self.name} needs float gradients, not {v.dtype}")
        if v.ndim == 2 and not 0 <= self.grad_col < v.shape[1]:
            raise ValueShapeError(f"{self.name}: gradient column {self.grad_col} does not exist "
                                  f"in values with {v.shape[1]} columns")
        g = v if v.ndim == 1 else v[:, self.grad_col]
        keep = kkt_mask(ctx.weights_for(p.keys, self.name), g, self.l1, self.delta)
        dropped = int(keep.shape[0] - np.count_nonzero(keep))
        if not dropped:
            return p
        ctx.counters.incr("kkt.dropped", dropped)
        return Payload(p.keys[keep], v[keep], p.meta, p.frames)

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        return p


class ActiveSet:
    """Server-side set of KKT-inactive coordinates (a sorted uint64 key array).

    ``update`` is called with the aggregated gradient after an update step: coordinates with
    w_k == 0 and |g_k| <= l1 - delta become inactive, every other given coordinate active again.
    """

    def __init__(self) -> None:
        self._inactive = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return int(self._inactive.shape[0])

    @property
    def n_inactive(self) -> int:
        """Number of inactive coordinates."""
        return len(self)

    def inactive_keys(self) -> np.ndarray:
        """The inactive keys, sorted (a copy)."""
        return self._inactive.copy()

    def active_mask(self, keys: np.ndarray) -> np.ndarray:
        """True for each of ``keys`` (uint64, any order) that is active."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not self._inactive.shape[0]:
            return np.ones(keys.shape[0], dtype=bool)
        idx = np.minimum(np.searchsorted(self._inactive, keys), self._inactive.shape[0] - 1)
        return self._inactive[idx] != keys

    def mark_inactive(self, keys: np.ndarray) -> None:
        """Add ``keys`` to the inactive set."""
        self._inactive = np.union1d(self._inactive, np.asarray(keys, dtype=np.uint64))

    def mark_active(self, keys: np.ndarray) -> None:
        """Remove ``keys`` from the inactive set."""
        keys = np.asarray(keys, dtype=np.uint64)
        if self._inactive.shape[0] and keys.shape[0]:
            self._inactive = self._inactive[~np.isin(self._inactive, keys)]

    def update(self, keys: np.ndarray, w: np.ndarray, g: np.ndarray, l1: float,
               delta: float = 0.0) -> int:
        """Apply the KKT rule to ``keys`` with weights ``w`` and aggregated gradient ``g`` (1-D,
        aligned with keys); return how many coordinates are inactive afterwards."""
        keys = np.asarray(keys, dtype=np.uint64)
        keep = kkt_mask(w, g, l1, delta)
        if keys.shape != keep.shape:
            raise ValueShapeError(f"{keys.shape[0]} keys for {keep.shape[0]} weights")
        self.mark_active(keys[keep])
        self.mark_inactive(keys[~keep])
        return len(self)

    def reset(self) -> int:
        """Mark every coordinate active again; return how many were inactive."""
        n = len(self)
        self._inactive = np.empty(0, dtype=np.uint64)
        return n

    def on_converged(self) -> bool:
        """Call when the solver converged on the active coordinates. Returns True when it has
        truly converged (no coordinate was inactive); otherwise resets the set and returns False,
        so the next pass covers every coordinate and re-checks the KKT conditions."""
        return self.reset() == 0
