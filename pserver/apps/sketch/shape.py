"""The shape of a CountMin sketch (depth d, width w, hash seed) and its error guarantee.

With w = ceil(e / eps) and d = ceil(ln(1 / delta)), an estimate exceeds the true count by more
than eps * N (N: the total of all counts inserted) with probability at most delta, and is never
below it (Cormode and Muthukrishnan, 2005). Keys on the servers: row * w + column, then N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import ConfigError

MAX_CELLS = 1 << 32  # far beyond any useful sketch; keeps row * w + column exact in float64 too


@dataclass(frozen=True)
class SketchShape:
    """depth: hash rows d >= 1; width: columns w >= 1; seed: of the row hashes."""

    depth: int
    width: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("depth", "width", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1):
                raise ConfigError(f"sketch {name} must be an integer >= "
                                  f"{0 if name == 'seed' else 1}, got {v!r}")
        if self.seed >= 1 << 53:
            raise ConfigError(f"sketch seed must be below 2**53, got {self.seed}")
        if self.depth * self.width > MAX_CELLS:
            raise ConfigError(f"a {self.depth} x {self.width} sketch has more than 2**32 cells: "
                              "raise eps or delta")

    @classmethod
    def for_error(cls, eps: float, delta: float, seed: int = 0) -> SketchShape:
        """The smallest shape guaranteeing error <= eps * N with probability >= 1 - delta.

        Raises ConfigError unless 0 < eps < 1 and 0 < delta < 1."""
        if not (0 < eps < 1 and 0 < delta < 1):
            raise ConfigError(f"eps and delta must lie strictly between 0 and 1, got eps={eps}, "
                              f"delta={delta}")
        return cls(max(1, math.ceil(math.log(1 / delta))), math.ceil(math.e / eps), seed)

    @property
    def cells(self) -> int:
        return self.depth * self.width

    @property
    def total_key(self) -> int:
        """The key holding N, the sum of all counts inserted (just after the last cell)."""
        return self.cells

    @property
    def eps(self) -> float:
        """Relative error e / w of this shape."""
        return math.e / self.width

    @property
    def delta(self) -> float:
        """Failure probability exp(-d) of this shape."""
        return math.exp(-self.depth)

    def bound(self, total: float) -> str:
        """The guarantee for a stream of ``total`` counts, in words."""
        return (f"true <= estimate <= true + {self.eps * total:,.1f} (eps*N, eps={self.eps:.3g}, "
                f"N={total:,.0f}) with probability >= {1 - self.delta:.4f} per item")
