"""Significantly-modified filter (paper: "significantly-modified"): send only entries whose change
since they were last sent exceeds a threshold; hold the rest back, accumulated, until they do.

For additive payloads: the sender adds each message's values to a residual per (peer, direction,
table, key) - ``significant:abs:X`` sends when max_col |change| > X, ``significant:rel:X`` when
it exceeds X * |w_k|. Nothing is lost, only delayed: a flush (``FilterChain.flush``, or
``ctx.flush``) sends every residual; beyond ``max_keys`` residuals the largest are sent early.
Residuals are sorted arrays merged vectorised. The receiver does nothing. docs/filters.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DTypeError, ValueShapeError
from .base import SELECT, Filter, FilterContext, Payload

__all__ = ["SignificantlyModified"]


def _fmt(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


@dataclass
class _Residuals:
    keys: np.ndarray    # sorted unique uint64
    values: np.ndarray  # (m,) or (m, cols)


def _magnitude(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    return a if a.ndim == 1 else a.max(axis=1, initial=0.0)


def _merge(ka: np.ndarray, va: np.ndarray, kb: np.ndarray, vb: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Union of two disjoint sorted key sets with their rows, sorted by key."""
    if kb.shape[0] == 0:
        return ka, va
    if ka.shape[0] == 0:
        return kb, vb
    keys = np.concatenate([ka, kb])
    order = np.argsort(keys, kind="stable")
    return keys[order], np.concatenate([va, vb])[order]


class SignificantlyModified(Filter):
    """Hold back entries until their accumulated change exceeds a threshold.

    mode:      "abs" or "rel" (see the module docstring).
    threshold: X >= 0, in value units (abs) or as a fraction of |w_k| (rel).
    max_keys:  bound on held-back entries per (peer, direction, table); beyond it the largest
               residuals are sent early.
    """

    kind = "significant"
    stage = SELECT

    def __init__(self, mode: str = "abs", threshold: float = 0.0, max_keys: int = 1 << 22) -> None:
        if mode not in ("abs", "rel"):
            raise ConfigError(f"significant mode must be 'abs' or 'rel', not {mode!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ConfigError(
                f"significant threshold must be a finite number >= 0, not {threshold}")
        if max_keys < 0:
            raise ConfigError("significant max_keys must be >= 0")
        self.mode, self.threshold, self.max_keys = mode, float(threshold), int(max_keys)
        self.name = f"significant:{mode}:{_fmt(self.threshold)}"

    @classmethod
    def from_args(cls, args: list[str]) -> SignificantlyModified:
        """``significant:abs:X`` or ``significant:rel:X``."""
        if len(args) != 2:
            raise ConfigError("significant spec is significant:abs:X or significant:rel:X")
        try:
            return cls(args[0], float(args[1]))
        except ValueError:
            raise ConfigError(f"significant threshold must be a number, not {args[1]!r}") from None

    @staticmethod
    def _slot(ctx: FilterContext) -> tuple[str, str, str]:
        return ("significant", ctx.direction, ctx.table)

    def pending(self, ctx: FilterContext) -> int:
        """Number of entries held back for ``ctx.peer`` / ``ctx.direction`` / ``ctx.table``."""
        res = ctx.state.get(self._slot(ctx))
        return 0 if res is None else int(res.keys.shape[0])

    def held_back(self, ctx: FilterContext) -> Payload | None:
        res = ctx.state.get(self._slot(ctx))
        if res is None or res.keys.shape[0] == 0:
            return None
        return Payload(res.keys[:0], res.values[:0], {}, [])

    def flush(self, ctx: FilterContext) -> Payload | None:
        """Remove and return every held-back entry as a raw payload (None if there is none).
        Prefer ``FilterChain.flush(ctx)``, which also runs the rest of the chain."""
        res = ctx.state.pop(self._slot(ctx), None)
        if res is None or res.keys.shape[0] == 0:
            return None
        return Payload(res.keys, res.values, {}, [])

    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        if p.values is None:
            return p
        if p.keys is None:
            raise ConfigError(f"{self.name} needs the keys; put it before key_cache and compress")
        v = p.values
        if v.dtype.kind != "f":
            raise DTypeError(f"{self.name} accumulates float values, not {v.dtype}")
        slot = self._slot(ctx)
        res: _Residuals | None = ctx.state.get(slot)
        keys = p.keys
        if res is not None and res.keys.shape[0]:
            if res.values.shape[1:] != v.shape[1:]:
                raise ValueShapeError(f"{self.name}: values of shape {v.shape[1:]} per key, but "
                                      f"earlier messages of table {ctx.table!r} had "
                                      f"{res.values.shape[1:]}")
            dtype = np.result_type(v.dtype, res.values.dtype)
            idx = np.searchsorted(res.keys, keys)
            idx_c = np.minimum(idx, res.keys.shape[0] - 1)
            found = res.keys[idx_c] == keys
            total = v.astype(dtype, copy=True)
            total[found] += res.values[idx_c[found]]
            others = np.ones(res.keys.shape[0], dtype=bool)
            others[idx_c[found]] = False
            old_k, old_v = res.keys[others], res.values[others].astype(dtype, copy=False)
        else:
            total = v
            old_k, old_v = keys[:0], v[:0]
        mag = _magnitude(total)
        if ctx.flush:
            send = np.ones(keys.shape[0], dtype=bool)
        else:
            if self.mode == "abs":
                send = mag > self.threshold
            else:
                send = mag > self.threshold * np.abs(ctx.weights_for(keys, self.name))
        hold = ~send
        # Exact zeros need no residual: nothing is owed.
        hold &= mag > 0
        held_k, held_v = _merge(old_k, old_v, keys[hold], total[hold])
        out_k, out_v = keys[send], total[send]
        if ctx.flush:
            out_k, out_v = _merge(out_k, out_v, held_k, held_v)
            held_k, held_v = held_k[:0], held_v[:0]
        elif held_k.shape[0] > self.max_keys:
            # Over the bound: send the largest residuals now instead of dropping anything.
            excess = held_k.shape[0] - self.max_keys
            early = np.zeros(held_k.shape[0], dtype=bool)
            early[np.argpartition(_magnitude(held_v), -excess)[-excess:]] = True
            out_k, out_v = _merge(out_k, out_v, held_k[early], held_v[early])
            held_k, held_v = held_k[~early], held_v[~early]
            ctx.counters.incr("significant.sent_early", excess)
        if held_k.shape[0]:
            ctx.state[slot] = _Residuals(held_k, held_v)
        else:
            ctx.state.pop(slot, None)
        ctx.counters.incr("significant.held", int(np.count_nonzero(hold)))
        return Payload(out_k, out_v, p.meta, p.frames)

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        return p
