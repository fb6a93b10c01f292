"""Compression (paper: "compression"): send only non-zero values, then compress the frames.

Encode drops bitwise-zero value rows (positions as a bitmap or delta-coded index list), narrows
float values that are small integers, delta-encodes the keys, byte-shuffles every frame and
compresses it with lz4 or zstd (a frame that does not shrink is sent raw). Decode checks every
declared size against the others and ``ctx.max_bytes`` before decompressing anything (bounded
output) and raises ProtocolError on any mismatch. The steps, the header section
``meta["compress"]`` and measurements: docs/filters.md ("compress").
"""

from __future__ import annotations

import threading
from typing import Any

import lz4.block
import numpy as np
import zstandard

from ..errors import ConfigError, ProtocolError
from .base import (
    PACK,
    WIRE_DTYPES,
    Filter,
    FilterContext,
    Payload,
    header_int,
    header_section,
    header_str,
)

__all__ = ["CODECS", "DEFAULT_CODEC", "DEFAULT_ZSTD_LEVEL", "Compression"]

CODECS = ("lz4", "zstd")
# Chosen from measurements (docs/filters.md, pserver/filters/codec_bench.py).
DEFAULT_CODEC = "zstd"
DEFAULT_ZSTD_LEVEL = 1
# Frames smaller than this are not worth a codec call.
_MIN_COMPRESS = 64
# A compressed frame must be at most this fraction of the raw one to be sent compressed.
_PAYS = 0.97
_MAX_COLS = 1 << 20
# Integer wire forms of float values (smallest first) and the range each holds.
_NARROW = {"|u1": (0, 255), "|i1": (-128, 127), "<u2": (0, 65535), "<i2": (-32768, 32767)}


def _row_nonzero(v: np.ndarray) -> np.ndarray:
    """Bool mask of rows with any non-zero bit (so -0.0 and NaN count as non-zero)."""
    bits = v.view(np.dtype(f"<u{v.dtype.itemsize}")) if v.dtype.itemsize in (1, 2, 4, 8) else v
    nz = bits != 0
    return nz if nz.ndim == 1 else nz.any(axis=1)


def _narrow(v: np.ndarray) -> str | None:
    """The smallest integer wire dtype holding the float array v bitwise exactly (so -0.0, NaN
    and fractions rule it out), or None."""
    if v.dtype.kind != "f" or not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())   # NaN compares false below
    for code, (a, b) in _NARROW.items():
        it = np.dtype(code)
        if it.itemsize < v.dtype.itemsize and a <= lo and hi <= b:
            back = v.astype(it).astype(v.dtype)
            bits = np.dtype(f"<u{v.dtype.itemsize}")
            return code if np.array_equal(back.view(bits), v.view(bits)) else None
    return None


def _shuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize <= 1:
        return raw
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)


def _unshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize <= 1:
        return data
    return np.ascontiguousarray(data.reshape(itemsize, -1).T).reshape(-1)


class Compression(Filter):
    """Drop zero values, delta-encode keys, then lz4/zstd each frame when it pays.

    codec: "lz4" or "zstd"; level: zstd level (1..22, default 1; ignored by lz4).
    """

    kind = "compress"
    stage = PACK

    def __init__(self, codec: str = DEFAULT_CODEC, level: int = DEFAULT_ZSTD_LEVEL) -> None:
        if codec not in CODECS:
            raise ConfigError(f"compress codec must be one of {CODECS}, not {codec!r}")
        if codec == "zstd" and not 1 <= level <= 22:
            raise ConfigError(f"zstd level must be in 1..22, not {level}")
        self.codec = codec
        self.level = level if codec == "zstd" else 0
        self.name = f"compress:zstd:{level}" if codec == "zstd" else "compress:lz4"
        self._local = threading.local()  # zstd (de)compressor objects are not thread-safe

    @classmethod
    def from_args(cls, args: list[str]) -> Compression:
        """``compress[:lz4|:zstd[:LEVEL]]``."""
        if not args:
            return cls()
        if args[0] == "lz4" and len(args) == 1:
            return cls("lz4")
        if args[0] == "zstd" and len(args) <= 2:
            try:
                return cls("zstd", int(args[1]) if len(args) == 2 else DEFAULT_ZSTD_LEVEL)
            except ValueError:
                raise ConfigError(f"zstd level must be an integer, not {args[1]!r}") from None
        raise ConfigError(f"bad compress spec {':'.join(['compress', *args])!r}; use compress, "
                          "compress:lz4, compress:zstd or compress:zstd:LEVEL")

    # -- codec calls -------------------------------------------------------------------------
    def _compress(self, data: np.ndarray) -> bytes:
        if self.codec == "lz4":
            return lz4.block.compress(data, store_size=False)
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            # The checksum (4 bytes, xxhash) turns a corrupted frame into an error, not garbage.
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=True)
        return cctx.compress(data)

    def _decompress(self, codec: str, data: np.ndarray, raw: int) -> bytes:
        try:
            if codec == "lz4":
                out = lz4.block.decompress(data, uncompressed_size=raw)
            else:
                # zstd allocates what the frame header declares, whatever the bound: check first.
                if zstandard.frame_content_size(data) != raw:
                    raise ProtocolError("compress: zstd frame size differs from the header's")
                dctx = getattr(self._local, "dctx", None)
                if dctx is None:
                    dctx = self._local.dctx = zstandard.ZstdDecompressor()
                out = dctx.decompress(data, max_output_size=raw, allow_extra_data=False)
        except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
            raise ProtocolError(f"compress: corrupt {codec} frame: {e}") from None
        if len(out) != raw:
            raise ProtocolError(f"compress: frame decompressed to {len(out)} bytes, header says "
                                f"{raw}")
        return out

    def _pack(self, arr: np.ndarray) -> tuple[np.ndarray, list[int]]:
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        itemsize = arr.dtype.itemsize
        if raw.nbytes >= _MIN_COMPRESS:
            c = self._compress(_shuffle(raw, itemsize))
            if len(c) <= _PAYS * raw.nbytes:
                return np.frombuffer(c, dtype=np.uint8), [raw.nbytes, 1, itemsize]
        return raw, [raw.nbytes, 0, 0]

    def _unpack(self, codec: str, frame: np.ndarray, desc: list[int]) -> np.ndarray:
        raw, coded, itemsize = desc
        if not coded:
            if frame.nbytes != raw:
                raise ProtocolError(f"compress: raw frame has {frame.nbytes} bytes, header says "
                                    f"{raw}")
            return frame
        data = np.frombuffer(self._decompress(codec, frame, raw), dtype=np.uint8)
        return _unshuffle(data, itemsize)

    # -- filter ------------------------------------------------------------------------------
    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        sec: dict[str, Any] = {"codec": self.codec, "n": p.n_pairs(), "keys": p.keys is not None,
                               "vals": None, "f": []}
        frames = list(p.frames)

        def add(arr: np.ndarray) -> None:
            frame, desc = self._pack(arr)
            frames.append(frame)
            sec["f"].append(desc)

        if p.keys is not None:
            keys = np.ascontiguousarray(p.keys, dtype="<u8")
            add(np.diff(keys, prepend=np.uint64(0)))
        if p.values is not None:
            v = np.ascontiguousarray(p.values)
            n = v.shape[0]
            mask = _row_nonzero(v)
            nnz = int(np.count_nonzero(mask))
            idx_dtype = np.dtype("<u4") if n < (1 << 32) else np.dtype("<u8")
            if nnz == n:
                pos = "all"
            else:
                # Whichever position form is smaller once compressed: raw, a bitmap is smaller
                # above 1 non-zero in 32 rows, but byte-shuffled small gaps compress better.
                forms = [("bitmap", self._pack(np.packbits(mask))),
                         ("index", self._pack(np.diff(np.flatnonzero(mask).astype(idx_dtype),
                                                      prepend=idx_dtype.type(0))))]
                pos, (frame, desc) = min(forms, key=lambda f: f[1][0].nbytes)
                frames.append(frame)
                sec["f"].append(desc)
            sec["vals"] = {"dtype": v.dtype.str, "cols": v.shape[1] if v.ndim == 2 else -1,
                           "nnz": nnz, "pos": pos}
            # np.compress is several times faster than boolean indexing for random masks.
            nzv = v if pos == "all" else np.compress(mask, v, axis=0)
            code = _narrow(nzv)
            if code is not None:
                sec["vals"]["int"] = code
                nzv = nzv.astype(code)
            add(nzv)
        return Payload(None, None, {**p.meta, self.kind: sec}, frames)

    def pairs_after(self, p: Payload) -> int:
        sec = p.meta.get(self.kind)
        n = sec.get("n") if isinstance(sec, dict) else None
        return n if type(n) is int and n >= 0 else 0

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        who = "compress"
        meta, sec = header_section(p.meta, self.kind)
        codec = header_str(sec, "codec", CODECS, who)
        if p.keys is not None or p.values is not None:
            raise ProtocolError("compress: keys/values must travel inside the compressed frames")
        limit = ctx.max_bytes
        n = header_int(sec, "n", 0, limit, who)
        has_keys = sec.get("keys")
        if not isinstance(has_keys, bool):
            raise ProtocolError("compress: header field 'keys' is not a boolean")
        vals = sec.get("vals")
        if vals is not None and not isinstance(vals, dict):
            raise ProtocolError("compress: header field 'vals' is not an object")
        # Expected raw size of every frame, derived only from n and the value layout.
        expected: list[tuple[str, int]] = []
        if has_keys:
            expected.append(("keys", n * 8))
        if vals is not None:
            dtype_code = header_str(vals, "dtype", tuple(WIRE_DTYPES), who)
            dtype = WIRE_DTYPES[dtype_code]
            cols = header_int(vals, "cols", -1, _MAX_COLS, who)
            if cols == 0:
                raise ProtocolError("compress: a 2-D value array needs at least one column")
            nnz = header_int(vals, "nnz", 0, n, who)
            pos = header_str(vals, "pos", ("all", "bitmap", "index"), who)
            if pos == "all" and nnz != n:
                raise ProtocolError("compress: positions 'all' but nnz != n")
            idx_dtype = np.dtype("<u4") if n < (1 << 32) else np.dtype("<u8")
            row_bytes = dtype.itemsize * max(cols, 1)
            if n * row_bytes > limit:
                raise ProtocolError(f"compress: {n} rows of {row_bytes} bytes exceed the limit "
                                    f"of {limit} bytes")
            wire = dtype
            if "int" in vals:
                wire = np.dtype(header_str(vals, "int", tuple(_NARROW), who))
                if dtype.kind != "f" or wire.itemsize >= dtype.itemsize:
                    raise ProtocolError(f"compress: integer form {wire.str} of {dtype.str} values")
            if pos == "bitmap":
                expected.append(("bitmap", (n + 7) // 8))
            elif pos == "index":
                expected.append(("index", nnz * idx_dtype.itemsize))
            expected.append(("values", nnz * wire.itemsize * max(cols, 1)))
        elif not has_keys and n:
            raise ProtocolError("compress: header declares pairs but no keys or values")
        descs = sec.get("f")
        if not isinstance(descs, list) or len(descs) != len(expected):
            raise ProtocolError(f"compress: header describes {descs!r:.60} frames, expected "
                                f"{len(expected)}")
        if len(p.frames) < len(expected):
            raise ProtocolError(f"compress: {len(expected)} frames expected, {len(p.frames)} came")
        total = 0
        for (what, size), d in zip(expected, descs, strict=True):
            if not (isinstance(d, list) and len(d) == 3 and all(type(x) is int for x in d)
                    and d[0] == size and d[1] in (0, 1) and d[2] in (0, 1, 2, 4, 8)):
                raise ProtocolError(f"compress: bad descriptor {d!r:.60} for the {what} frame of "
                                    f"{size} bytes")
            if d[1] and d[2] > 1 and size % d[2]:
                raise ProtocolError(f"compress: {what} frame size is not a multiple of its shuffle")
            total += size
        if total > limit:
            raise ProtocolError(f"compress: message decompresses to {total} bytes, over the limit "
                                f"of {limit} bytes")
        mine = p.frames[len(p.frames) - len(expected):]
        rest = p.frames[:len(p.frames) - len(expected)]
        for fr in mine:
            if fr.dtype != np.uint8 or fr.ndim != 1:
                raise ProtocolError("compress: frames must be 1-D uint8 arrays")
        parts = {what: self._unpack(codec, fr, d)
                 for (what, _), fr, d in zip(expected, mine, descs, strict=True)}
        keys = None
        if has_keys:
            # cumsum wraps modulo 2**64 exactly like the encoder's diff did.
            keys = np.cumsum(parts["keys"].view("<u8"), dtype=np.uint64)
        values = None
        if vals is not None:
            if wire is not dtype:
                parts["values"] = parts["values"].view(wire).astype(dtype).view(np.uint8)
            values = self._scatter(parts, n, dtype, cols, nnz, pos, idx_dtype)
        return Payload(keys, values, meta, rest)

    @staticmethod
    def _scatter(parts: dict[str, np.ndarray], n: int, dtype: np.dtype, cols: int, nnz: int,
                 pos: str, idx_dtype: np.dtype) -> np.ndarray:
        shape = (n,) if cols == -1 else (n, cols)
        nzv = parts["values"].view(dtype).reshape((nnz, *shape[1:]))
        if pos == "all":
            return nzv
        if pos == "bitmap":
            bits = np.unpackbits(parts["bitmap"])
            if bits[n:].any():
                raise ProtocolError("compress: bitmap has bits set past the last row")
            where = np.flatnonzero(bits[:n].view(bool))  # nonzero on bool is ~4x faster
            if where.shape[0] != nnz:
                raise ProtocolError("compress: bitmap population differs from the header's nnz")
        else:
            where = np.cumsum(parts["index"].view(idx_dtype), dtype=np.uint64)
            if nnz and (where[-1] >= n or (nnz > 1 and not bool(np.all(where[1:] > where[:-1])))):
                raise ProtocolError("compress: row positions are out of range or not increasing")
        out = np.zeros(shape, dtype=dtype)
        out[where] = nzv
        return out
