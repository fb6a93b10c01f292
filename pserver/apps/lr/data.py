"""Reading a worker's shard of the training data into a sparse matrix.

Formats
- libsvm/svmlight: `label idx:val idx:val ... [# comment]`, label in {-1, 0, +1, 1} (0 and -1 are
  the negative class). idx is a non-negative integer; by default its key is int_key(idx, 0) (a
  bijective mix, so no collisions, keys spread over the key space); raw_keys=True uses idx itself.
- criteo: TSV `label I1..I13 C1..C26`, label 0/1, empty field = missing. Integer column c (1..13):
  key int_key(bin(v), c) with bin(v) = v for v <= 2, else 3 + floor(ln(v)**2) (int_bins="log"),
  or bin(v) = v (int_bins="raw"). Categorical column c (14..39): key str_key(s, c). Values are 1.

Sharding: every example is read by exactly one worker. split="bytes" cuts the concatenation of
all files into num_workers equal byte ranges; a line belongs to the range holding its first byte.
split="file" hands whole files out (largest first, to the least loaded worker).

The shard is held as a CSC matrix whose columns are the shard's distinct keys in increasing order,
so the features of a key range (a DBPG block) are a contiguous column range.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.sparse as sp

from ...errors import ConfigError, DataFormatError
from .parsers import REASONS, parse_criteo, parse_libsvm

log = logging.getLogger(__name__)

FORMATS = ("libsvm", "criteo")
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class ByteRange:
    """Lines of `path` whose first byte lies in [start, end)."""

    path: str
    start: int
    end: int


@dataclass
class Shard:
    """One worker's examples: X[i, j] is feature keys[j] of example i, y[i] in {-1, +1}."""

    X: sp.csc_matrix
    y: np.ndarray
    keys: np.ndarray
    skipped: int = 0
    ranges: list[ByteRange] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return self.X.shape[0]

    def columns_in(self, lo: int, hi: int | None) -> tuple[int, int]:
        """Column range [c0, c1) of the keys with lo <= key < hi (hi None = no upper bound)."""
        c0 = int(np.searchsorted(self.keys, np.uint64(lo), side="left"))
        c1 = self.keys.size if hi is None else int(
            np.searchsorted(self.keys, np.uint64(hi), side="left"))
        return c0, c1


def plan_shards(paths: list[str], num_workers: int, split: str = "bytes") -> list[list[ByteRange]]:
    """The byte ranges each of num_workers workers reads. Raises ConfigError on a bad split or a
    missing file."""
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    sizes = []
    for p in paths:
        if not os.path.isfile(p):
            raise ConfigError(f"data file {p!r} does not exist")
        sizes.append(os.path.getsize(p))
    plan: list[list[ByteRange]] = [[] for _ in range(num_workers)]
    if split == "file":
        load = [0] * num_workers
        for size, p in sorted(zip(sizes, paths), key=lambda t: -t[0]):
            w = load.index(min(load))
            plan[w].append(ByteRange(p, 0, size))
            load[w] += size
        return plan
    if split != "bytes":
        raise ConfigError(f"split must be 'bytes' or 'file', got {split!r}")
    total = sum(sizes)
    cuts = [total * w // num_workers for w in range(num_workers + 1)]
    base = 0
    for p, size in zip(paths, sizes):
        for w in range(num_workers):
            lo, hi = max(cuts[w], base), min(cuts[w + 1], base + size)
            if lo < hi:
                plan[w].append(ByteRange(p, lo - base, hi - base))
        base += size
    return plan


def _first_newline_at_or_after(f, pos: int) -> int:
    """Offset of the first b'\\n' at or after pos, or the file size when there is none."""
    f.seek(pos)
    while True:
        block = f.read(1 << 16)
        if not block:
            return f.tell()
        k = block.find(b"\n")
        if k >= 0:
            return pos + k
        pos += len(block)


def _lines_before(path: str, offset: int) -> int:
    """Number of newlines in path[0:offset] (only computed to name a bad line)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count


def iter_chunks(rng: ByteRange, fmt: str = "libsvm", *, skip_bad: bool = False,
                raw_keys: bool = False, int_bins: str = "log", chunk_bytes: int = CHUNK_BYTES):
    """Yield (labels, row_nnz, keys, vals, skipped) for the lines of one byte range, a chunk of
    whole lines at a time. Raises DataFormatError naming file:line for a bad line (unless
    skip_bad)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    if int_bins not in ("log", "raw"):
        raise ConfigError(f"int_bins must be 'log' or 'raw', got {int_bins!r}")
    size = os.path.getsize(rng.path)
    with open(rng.path, "rb") as f:
        begin = 0 if rng.start == 0 else _first_newline_at_or_after(f, rng.start - 1) + 1
        stop = 0 if rng.end == 0 else _first_newline_at_or_after(f, rng.end - 1) + 1
        begin, stop = min(begin, size), min(stop, size)
        f.seek(begin)
        pos = begin
        lines_done = 0
        carry = b""
        while pos < stop or carry:
            data = f.read(min(chunk_bytes, max(stop - pos, 0)))
            pos += len(data)
            data = carry + data
            if pos < stop:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data  # a line longer than a chunk: read on
                    continue
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            buf = np.frombuffer(data, dtype=np.uint8)
            newlines = data.count(b"\n")
            n_lines = newlines + 1
            cap = data.count(b":") if fmt == "libsvm" else 39 * n_lines
            labels = np.empty(n_lines, np.float64)
            row_nnz = np.empty(n_lines, np.int64)
            keys = np.empty(cap, np.uint64)
            vals = np.empty(cap, np.float32)
            if fmt == "libsvm":
                out = parse_libsvm(buf, raw_keys, skip_bad, labels, row_nnz, keys, vals)
            else:
                out = parse_criteo(buf, int_bins == "log", skip_bad, labels, row_nnz, keys, vals)
            nr, ne, nbad, code, err_line, err_off = out
            if code:
                line_no = _lines_before(rng.path, begin) + lines_done + err_line + 1
                end = data.find(b"\n", err_off)
                text = data[err_off: end if end >= 0 else len(data)][:120]
                raise DataFormatError(
                    f"{rng.path}:{line_no}: {REASONS[code]}: {text.decode('utf-8', 'replace')!r}"
                    " (fix the line, or pass --skip-bad / skip_bad=True to skip bad lines)")
            lines_done += newlines
            yield labels[:nr], row_nnz[:nr], keys[:ne], vals[:ne], nbad


RADIX_BITS = 11


@numba.njit(cache=True, nogil=True)
def _radix_sort_entries(keys, vals, row_nnz):
    """Stable LSD radix sort of the row-major entries by key, RADIX_BITS a pass, carrying each
    entry's row and value along (so no gather afterwards); a pass whose digit is the same for
    every key (e.g. the high bits of small raw keys) is skipped. Returns (keys, rows, vals)."""
    n = keys.size
    nb = 1 << RADIX_BITS
    npass = (64 + RADIX_BITS - 1) // RADIX_BITS
    mask = np.uint64(nb - 1)
    counts = np.zeros((npass, nb), np.int64)
    for i in range(n):
        k = keys[i]
        for p in range(npass):
            counts[p, (k >> np.uint64(RADIX_BITS * p)) & mask] += 1
    src_k, src_v = keys.copy(), vals.copy()
    src_r = np.empty(n, np.int32)
    pos = 0
    for r in range(row_nnz.size):
        for _ in range(row_nnz[r]):
            src_r[pos] = r
            pos += 1
    dst_k, dst_r, dst_v = np.empty_like(src_k), np.empty_like(src_r), np.empty_like(src_v)
    for p in range(npass):
        if counts[p].max() == n:
            continue
        start = np.zeros(nb, np.int64)
        start[1:] = np.cumsum(counts[p])[:-1]
        shift = np.uint64(RADIX_BITS * p)
        for i in range(n):
            d = (src_k[i] >> shift) & mask
            q = start[d]
            dst_k[q] = src_k[i]
            dst_r[q] = src_r[i]
            dst_v[q] = src_v[i]
            start[d] = q + 1
        src_k, dst_k = dst_k, src_k
        src_r, dst_r = dst_r, src_r
        src_v, dst_v = dst_v, src_v
    return src_k, src_r, src_v


def csc_by_key(keys: np.ndarray, vals: np.ndarray, row_nnz: np.ndarray
               ) -> tuple[sp.csc_matrix, np.ndarray]:
    """CSC matrix of the row-major entries (keys, vals; row i has row_nnz[i] of them) whose
    column j is the j-th smallest distinct key. Returns (X, distinct keys). One radix sort: the
    sorted entries are already in CSC order, rows ascending within a column."""
    ks, rows, v = _radix_sort_entries(keys, vals, row_nnz)
    first = np.ones(ks.size, dtype=bool)
    first[1:] = ks[1:] != ks[:-1]
    starts = np.flatnonzero(first)
    indptr = np.append(starts, ks.size).astype(np.int64)
    X = sp.csc_matrix((v, rows, indptr), shape=(row_nnz.size, starts.size))
    if ks.size and np.any(~first[1:] & (rows[1:] == rows[:-1])):
        X.sum_duplicates()  # a repeated idx in one line (or a hash collision) adds up
    return X, ks[starts]


def read_ranges(ranges: list[ByteRange], fmt: str = "libsvm", **opts) -> Shard:
    """Read byte ranges into a Shard (keys are mapped to columns once, by one radix sort)."""
    parts = [c for r in ranges for c in iter_chunks(r, fmt, **opts)]
    if parts:
        labels, row_nnz, keys, vals, nbad = (list(t) for t in zip(*parts))
        y = np.concatenate(labels)
        nnz = np.concatenate(row_nnz)
        keys_all = np.concatenate(keys)
        vals_all = np.concatenate(vals)
        skipped = int(sum(nbad))
    else:
        y, nnz = np.empty(0), np.empty(0, np.int64)
        keys_all, vals_all, skipped = np.empty(0, np.uint64), np.empty(0, np.float32), 0
    X, uniq = csc_by_key(keys_all, vals_all, nnz)
    if skipped:
        log.warning("skipped %d malformed lines in %s", skipped, [r.path for r in ranges])
    return Shard(X=X, y=y, keys=uniq, skipped=skipped, ranges=list(ranges))


def read_shard(paths: str | list[str], fmt: str = "libsvm", rank: int = 0, num_workers: int = 1,
               split: str = "bytes", **opts) -> Shard:
    """Read worker `rank`'s share (of num_workers) of the files. opts: skip_bad, raw_keys,
    int_bins, chunk_bytes (see iter_chunks). Raises ConfigError, DataFormatError."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not 0 <= rank < num_workers:
        raise ConfigError(f"rank {rank} is not in [0, {num_workers})")
    return read_ranges(plan_shards(paths, num_workers, split)[rank], fmt, **opts)
