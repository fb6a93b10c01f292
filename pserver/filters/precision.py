"""Precision (paper: "precision"): send values with fewer bits.

Three filters: ``fp16`` and ``bf16`` (round to nearest even; out-of-range values clipped and
counted) and ``fixed:B:LO:HI`` (B-byte fixed point over [LO, HI] with stochastic, unbiased
rounding; zeros stay zeros when LO <= 0 <= HI). Decoding casts back to the sender's dtype. Error
bounds per mode: docs/filters.md ("Precision").
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ..errors import ConfigError, DTypeError, ProtocolError
from .base import PRECISION, Filter, FilterContext, Payload, header_int, header_section, header_str

__all__ = ["BF16", "FP16", "FixedPoint", "Precision"]

_FLOATS = ("<f2", "<f4", "<f8")
_FP16_MAX = 65504.0
_BF16_MAX = float(np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0])


def _fmt(x: float) -> str:
    """Canonical short text of a float for filter names (exact: repr unless integral)."""
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Precision(Filter):
    """Base of the precision filters: checks dtypes and keeps the header section uniform."""

    stage = PRECISION
    wire_dtype: np.dtype = np.dtype("<f2")

    def _to_wire(self, v: np.ndarray, ctx: FilterContext) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def _from_wire(self, w: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        raise NotImplementedError

    def _wire_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        if p.values is None:
            return Payload(p.keys, None, {**p.meta, self.kind: {"dtype": None}}, p.frames)
        v = p.values
        if v.dtype.str not in _FLOATS:
            raise DTypeError(f"{self.name} needs float16/32/64 values, not {v.dtype}; use only "
                             "one precision filter per chain")
        w, clipped = self._to_wire(v, ctx)
        if clipped:
            ctx.counters.incr(f"{self.kind}.clipped", clipped)
        sec = {"dtype": v.dtype.str, "cols": v.shape[1] if v.ndim == 2 else -1,
               "clipped": clipped}
        return Payload(p.keys, w, {**p.meta, self.kind: sec}, p.frames)

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        who = self.kind
        meta, sec = header_section(p.meta, self.kind)
        if sec.get("dtype") is None:
            if p.values is not None:
                raise ProtocolError(f"{who}: header says no values but values came")
            return Payload(p.keys, None, meta, p.frames)
        dtype = np.dtype(header_str(sec, "dtype", _FLOATS, who))
        cols = header_int(sec, "cols", -1, 1 << 20, who)
        w = p.values
        if w is None or w.dtype != self.wire_dtype or cols == 0:
            raise ProtocolError(f"{who}: values must arrive as {self.wire_dtype}")
        shape = (w.shape[0],) if cols == -1 else (w.shape[0], cols)
        if w.shape != self._wire_shape(shape):
            raise ProtocolError(f"{who}: values have shape {w.shape}, expected "
                                f"{self._wire_shape(shape)}")
        if int(np.prod(shape)) * dtype.itemsize > ctx.max_bytes:
            raise ProtocolError(f"{who}: decoded values would exceed {ctx.max_bytes} bytes")
        return Payload(p.keys, self._from_wire(w, shape, dtype), meta, p.frames)


def _clip(v: np.ndarray, limit: float) -> tuple[np.ndarray, int]:
    """Values clipped to [-limit, limit] (a copy only when needed) and how many were clipped."""
    clipped = int(np.count_nonzero(np.abs(v) > limit))
    return (np.clip(v, -limit, limit) if clipped else v), clipped


class FP16(Precision):
    """IEEE half precision (``fp16``)."""

    kind = "fp16"
    name = "fp16"
    wire_dtype = np.dtype("<f2")

    def _to_wire(self, v: np.ndarray, ctx: FilterContext) -> tuple[np.ndarray, int]:
        v, clipped = _clip(v, _FP16_MAX)
        return v.astype("<f2"), clipped

    def _from_wire(self, w: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return w.astype(dtype)


class BF16(Precision):
    """bfloat16 (``bf16``), carried as uint16."""

    kind = "bf16"
    name = "bf16"
    wire_dtype = np.dtype("<u2")

    def _to_wire(self, v: np.ndarray, ctx: FilterContext) -> tuple[np.ndarray, int]:
        v, clipped = _clip(v, _BF16_MAX)
        u = np.ascontiguousarray(v, dtype="<f4").view("<u4")
        # Round to nearest even on the 16 bits dropped; NaN is handled apart because adding the
        # rounding bias could carry a NaN payload into the exponent (-> inf).
        r = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype("<u2")
        nan = np.isnan(v)
        if nan.any():
            r[nan] = 0x7FC0
        return r, clipped

    def _from_wire(self, w: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return (w.astype("<u4") << np.uint32(16)).view("<f4").astype(dtype)


class FixedPoint(Precision):
    """B-byte fixed point over [lo, hi] with unbiased stochastic rounding (``fixed:B:LO:HI``)."""

    kind = "fixed"
    wire_dtype = np.dtype("|u1")

    def __init__(self, nbytes: int = 3, lo: float = -1.0, hi: float = 1.0,
                 seed: int | None = None) -> None:
        if not 1 <= nbytes <= 4:
            raise ConfigError(f"fixed point width must be 1..4 bytes, not {nbytes}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"fixed point range [{lo}, {hi}] must be finite with lo < hi")
        self.nbytes, self.lo, self.hi = int(nbytes), float(lo), float(hi)
        self.name = f"fixed:{self.nbytes}:{_fmt(self.lo)}:{_fmt(self.hi)}"
        levels = 1 << (8 * self.nbytes)
        self.step = (self.hi - self.lo) / (levels - 3)
        self.anchor = 0.0 if self.lo <= 0.0 <= self.hi else self.lo
        # Snap ratios that are integers up to rounding, so the code range is as documented.
        self.kmin = math.floor(round((self.lo - self.anchor) / self.step, 6))
        self.kmax = math.ceil(round((self.hi - self.anchor) / self.step, 6))
        self._levels = levels
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    @classmethod
    def from_args(cls, args: list[str]) -> FixedPoint:
        """``fixed:B:LO:HI`` (e.g. ``fixed:3:-1:1``)."""
        if len(args) != 3:
            raise ConfigError("fixed point spec is fixed:BYTES:LO:HI, e.g. fixed:3:-1:1")
        try:
            return cls(int(args[0]), float(args[1]), float(args[2]))
        except ValueError:
            raise ConfigError(f"bad fixed point spec fixed:{':'.join(args)}; BYTES is an integer "
                              "1..4, LO and HI are numbers") from None

    def _wire_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], self.nbytes * (shape[1] if len(shape) == 2 else 1))

    def _to_wire(self, v: np.ndarray, ctx: FilterContext) -> tuple[np.ndarray, int]:
        x = np.asarray(v, dtype=np.float64)
        outside = ~((x >= self.lo) & (x <= self.hi))  # NaN is outside too
        clipped = int(np.count_nonzero(outside))
        if clipped:
            x = np.where(np.isnan(x), self.anchor, np.clip(x, self.lo, self.hi))
        t = (x - self.anchor) / self.step
        k = np.floor(t)
        with self._lock:
            u = self._rng.random(t.shape)
        k += u < (t - k)
        k = np.clip(k, self.kmin, self.kmax).astype(np.int64)
        codes = (k & (self._levels - 1)).astype("<u4")
        b = codes.reshape(-1, 1).view(np.uint8)[:, : self.nbytes]
        return np.ascontiguousarray(b).reshape(self._wire_shape(v.shape)), clipped

    def _from_wire(self, w: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buf = np.zeros((w.size // self.nbytes, 4), dtype=np.uint8)
        buf[:, : self.nbytes] = w.reshape(-1, self.nbytes)
        u = buf.view("<u4").reshape(-1).astype(np.int64)
        k = np.where(u <= self.kmax, u, u - self._levels)
        if k.size and int(k.min()) < self.kmin:
            raise ProtocolError(f"{self.name}: a value code lies outside the declared range")
        return (self.anchor + k * self.step).astype(dtype).reshape(shape)
