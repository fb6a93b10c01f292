"""Random skip (paper: "random skip"): send each entry with probability p, scaled by 1/p.

The estimate stays unbiased: an entry v arrives as v/p with probability p and as nothing (0) with
probability 1 - p, so E[received] = v and Var[received] = v**2 * (1 - p) / p per entry (for a sum
of entries, the variances add). Expected traffic is p times the original. Entries are chosen
independently, so the number kept is Binomial(n, p). A flush (``ctx.flush``) sends every entry
unscaled. Put precision filters *after* this one and size a fixed-point range for the scaled
values (|v| / p).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ..errors import ConfigError, DTypeError
from .base import SELECT, Filter, FilterContext, Payload

__all__ = ["RandomSkip"]


class RandomSkip(Filter):
    """Keep each (key, value) pair with probability ``p`` (0 < p <= 1) and scale it by 1/p."""

    kind = "random_skip"
    stage = SELECT

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        if not (math.isfinite(p) and 0.0 < p <= 1.0):
            raise ConfigError(f"random_skip probability must be in (0, 1], not {p}")
        self.p = float(p)
        self.name = f"random_skip:{self.p!r}"
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # numpy Generators are not thread-safe

    @classmethod
    def from_args(cls, args: list[str]) -> RandomSkip:
        """``random_skip:P`` with P the probability of keeping an entry."""
        if len(args) != 1:
            raise ConfigError("random_skip spec is random_skip:P, e.g. random_skip:0.5")
        try:
            return cls(float(args[0]))
        except ValueError:
            raise ConfigError(
                f"random_skip probability must be a number, not {args[0]!r}") from None

    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        if p.values is None or ctx.flush or self.p == 1.0:
            return p
        v = p.values
        if v.dtype.kind != "f":
            raise DTypeError(f"{self.name} scales float values, not {v.dtype}")
        with self._lock:
            keep = self._rng.random(v.shape[0]) < self.p
        ctx.counters.incr("random_skip.dropped", int(v.shape[0] - np.count_nonzero(keep)))
        kept = v[keep] * v.dtype.type(1.0 / self.p)
        return Payload(None if p.keys is None else p.keys[keep], kept, p.meta, p.frames)

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        return p
