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
# The constant feature's key (bias=True): str_key("bias", 0), a literal so that importing this
# module loads no compiled code (tests check it against the hash).
BIAS_KEY = np.uint64(12827368172262128139)
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


def _line_chunks(rng: ByteRange, chunk_bytes: int):
    """Yield (bytes of whole lines, newlines before them within the range, range's first byte)
    for the lines whose first byte lies in [rng.start, rng.end)."""
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
            newlines = data.count(b"\n")
            yield data, newlines, lines_done, begin
            lines_done += newlines


class _Entries:
    """Row-major parsed examples in growable buffers that the parsers write into directly
    (no per-chunk arrays to concatenate afterwards)."""

    def __init__(self, lines: int, entries: int):
        self.labels, self.row_nnz = np.empty(lines), np.empty(lines, np.int64)
        self.keys, self.vals = np.empty(entries, np.uint64), np.empty(entries, np.float32)
        self.rows = self.n = self.skipped = 0

    def reserve(self, lines: int, entries: int) -> None:
        def grow(a: np.ndarray, used: int, need: int) -> np.ndarray:
            if need <= a.size:
                return a
            b = np.empty(max(need, 2 * a.size), a.dtype)
            b[:used] = a[:used]
            return b
        self.labels = grow(self.labels, self.rows, self.rows + lines)
        self.row_nnz = grow(self.row_nnz, self.rows, self.rows + lines)
        self.keys = grow(self.keys, self.n, self.n + entries)
        self.vals = grow(self.vals, self.n, self.n + entries)


def _parse_range(rng: ByteRange, fmt: str, out: _Entries, *, skip_bad: bool = False,
                 raw_keys: bool = False, int_bins: str = "log",
                 chunk_bytes: int = CHUNK_BYTES) -> None:
    """Parse the lines of one byte range into `out`, a chunk of whole lines at a time. Raises
    DataFormatError naming file:line for a bad line (unless skip_bad), ConfigError."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    if int_bins not in ("log", "raw"):
        raise ConfigError(f"int_bins must be 'log' or 'raw', got {int_bins!r}")
    for data, newlines, lines_before, begin in _line_chunks(rng, chunk_bytes):
        buf = np.frombuffer(data, dtype=np.uint8)
        cap = data.count(b":") if fmt == "libsvm" else 39 * (newlines + 1)
        out.reserve(newlines + 1, cap)
        args = (skip_bad, out.labels[out.rows:], out.row_nnz[out.rows:], out.keys[out.n:],
                out.vals[out.n:])
        if fmt == "libsvm":
            nr, ne, nbad, code, err_line, err_off = parse_libsvm(buf, raw_keys, *args)
        else:
            nr, ne, nbad, code, err_line, err_off = parse_criteo(buf, int_bins == "log", *args)
        if code:
            line_no = _lines_before(rng.path, begin) + lines_before + err_line + 1
            end = data.find(b"\n", err_off)
            text = data[err_off: end if end >= 0 else len(data)][:120]
            raise DataFormatError(
                f"{rng.path}:{line_no}: {REASONS[code]}: {text.decode('utf-8', 'replace')!r}"
                " (fix the line, or pass --skip-bad / skip_bad=True to skip bad lines)")
        out.rows += nr
        out.n += ne
        out.skipped += nbad


RADIX_BITS = 11
RADIX_PASSES = 3


@numba.njit(cache=True, nogil=True)
def _radix_sort_entries(keys, vals, row_nnz):
    """Stable sort of the row-major entries by key, carrying each entry's row and value along
    (so no gather afterwards). Returns (keys, rows, vals); keys and vals are used as scratch.

    Radix sort on the top RADIX_PASSES * RADIX_BITS bits of the keys' bit-length only (all bits
    of small raw keys): one scatter by the top digit over the whole array (rows numbered on the
    way), then each of the 2**RADIX_BITS buckets - small enough to stay in cache - is sorted by
    the lower digits, LSD, a digit shared by the whole bucket skipped. Values that are all 1
    (binary features) are not carried. Distinct keys sharing those top bits (rare for hashed
    keys) end up in one run, which is then merge-sorted by the full key."""
    n = keys.size
    nb = 1 << RADIX_BITS
    mask = np.uint64(nb - 1)
    top = np.uint64(0)
    ones = True
    for i in range(n):
        top |= keys[i]
        ones &= vals[i] == 1.0
    length = 0
    while length < 64 and (top >> np.uint64(length)) != 0:
        length += 1
    lo = max(length - RADIX_PASSES * RADIX_BITS, 0)
    msd = np.uint64(lo + RADIX_BITS * (RADIX_PASSES - 1))
    start = np.zeros(nb + 1, np.int64)
    for i in range(n):
        start[((keys[i] >> msd) & mask) + 1] += 1
    for d in range(nb):
        start[d + 1] += start[d]
    out_k, out_r = np.empty_like(keys), np.empty(n, np.int32)
    out_v = np.ones(n, np.float32) if ones else np.empty_like(vals)
    fill = start[:nb].copy()
    i = 0
    for r in range(row_nnz.size):
        for _ in range(row_nnz[r]):
            d = (keys[i] >> msd) & mask
            q = fill[d]
            out_k[q] = keys[i]
            out_r[q] = r
            if not ones:
                out_v[q] = vals[i]
            fill[d] = q + 1
            i += 1
    # Per bucket, LSD over the lower digits through small scratch arrays (cache-resident).
    big = 0
    for d in range(nb):
        big = max(big, start[d + 1] - start[d])
    tk, tr, tv = np.empty(big, np.uint64), np.empty(big, np.int32), np.empty(big, np.float32)
    cnt = np.empty(nb, np.int64)
    for d in range(nb):
        a, b = start[d], start[d + 1]
        if b - a < 2:
            continue
        for p in range(RADIX_PASSES - 1):
            shift = np.uint64(lo + RADIX_BITS * p)
            cnt[:] = 0
            for j in range(a, b):
                cnt[(out_k[j] >> shift) & mask] += 1
            if cnt.max() == b - a:
                continue
            acc = 0
            for c in range(nb):
                acc, cnt[c] = acc + cnt[c], acc
            for j in range(a, b):
                c = (out_k[j] >> shift) & mask
                q = cnt[c]
                tk[q] = out_k[j]
                tr[q] = out_r[j]
                if not ones:
                    tv[q] = out_v[j]
                cnt[c] = q + 1
            out_k[a:b] = tk[:b - a]
            out_r[a:b] = tr[:b - a]
            if not ones:
                out_v[a:b] = tv[:b - a]
    if lo > 0:
        shift = np.uint64(lo)
        i = 0
        while i < n:
            j = i + 1
            mixed = False
            while j < n and (out_k[j] >> shift) == (out_k[i] >> shift):
                mixed |= out_k[j] != out_k[i]
                j += 1
            if mixed:
                order = np.argsort(out_k[i:j], kind="mergesort")
                out_k[i:j] = out_k[i:j][order]
                out_r[i:j] = out_r[i:j][order]
                out_v[i:j] = out_v[i:j][order]
            i = j
    return out_k, out_r, out_v


@numba.njit(cache=True, nogil=True)
def _columns(ks, rows):
    """(distinct keys, indptr, whether some row repeats a key) of key-sorted entries."""
    n = ks.size
    distinct = 1 if n else 0
    for i in range(1, n):
        distinct += ks[i] != ks[i - 1]
    uniq = np.empty(distinct, np.uint64)
    indptr = np.empty(distinct + 1, np.int64)
    repeat = False
    c = 0
    for i in range(n):
        if i == 0 or ks[i] != ks[i - 1]:
            uniq[c] = ks[i]
            indptr[c] = i
            c += 1
        else:
            repeat |= rows[i] == rows[i - 1]
    indptr[distinct] = n
    return uniq, indptr, repeat


def csc_by_key(keys: np.ndarray, vals: np.ndarray, row_nnz: np.ndarray
               ) -> tuple[sp.csc_matrix, np.ndarray]:
    """CSC matrix of the row-major entries (keys, vals; row i has row_nnz[i] of them) whose
    column j is the j-th smallest distinct key. Returns (X, distinct keys). One radix sort: the
    sorted entries are already in CSC order, rows ascending within a column. keys and vals are
    overwritten (used as sort buffers)."""
    ks, rows, v = _radix_sort_entries(keys, vals, row_nnz)
    uniq, indptr, repeat = _columns(ks, rows)
    X = sp.csc_matrix((v, rows, indptr), shape=(row_nnz.size, uniq.size))
    if repeat:
        X.sum_duplicates()  # a repeated idx in one line (or a hash collision) adds up
    return X, uniq


def warm_up() -> None:
    """Load the compiled reader kernels (numba's cached machine code, ~0.2 s on first use), e.g.
    in a thread while the process does something else."""
    buf = np.frombuffer(b"1 1:1\n", np.uint8)
    out = (np.empty(2), np.empty(2, np.int64), np.empty(2, np.uint64), np.empty(2, np.float32))
    parse_libsvm(buf, False, False, *out)
    ks, rows, _ = _radix_sort_entries(np.array([2, 1], np.uint64), np.ones(2, np.float32),
                                      np.array([2]))
    _columns(ks, rows)


def add_bias(shard: Shard) -> Shard:
    """The shard with a constant feature (key BIAS_KEY, value 1) in every example: an intercept
    that the model learns (and regularises) like any other weight."""
    pos = int(np.searchsorted(shard.keys, BIAS_KEY))
    if pos < shard.keys.size and shard.keys[pos] == BIAS_KEY:
        return shard
    ones = sp.csc_matrix(np.ones((shard.num_examples, 1), np.float32))
    X = sp.hstack([shard.X[:, :pos], ones, shard.X[:, pos:]], format="csc")
    keys = np.insert(shard.keys, pos, BIAS_KEY)
    return Shard(X=X, y=shard.y, keys=keys, skipped=shard.skipped, ranges=shard.ranges)


def read_ranges(ranges: list[ByteRange], fmt: str = "libsvm", bias: bool = False,
                **opts) -> Shard:
    """Read byte ranges into a Shard (keys are mapped to columns once, by one radix sort);
    bias=True adds the constant feature BIAS_KEY to every example. opts: see _parse_range."""
    total = sum(r.end - r.start for r in ranges)
    out = _Entries(total // 64 + 16, total // 8 + 16)   # grown if the guess is short
    for r in ranges:
        _parse_range(r, fmt, out, **opts)
    nnz = out.row_nnz[:out.rows]
    X, uniq = csc_by_key(out.keys[:out.n], out.vals[:out.n], nnz)
    if out.skipped:
        log.warning("skipped %d malformed lines in %s", out.skipped, [r.path for r in ranges])
    shard = Shard(X=X, y=out.labels[:out.rows].copy(), keys=uniq, skipped=out.skipped,
                  ranges=list(ranges))
    return add_bias(shard) if bias else shard


def read_shard(paths: str | list[str], fmt: str = "libsvm", rank: int = 0, num_workers: int = 1,
               split: str = "bytes", **opts) -> Shard:
    """Read worker `rank`'s share (of num_workers) of the files. opts: bias (read_ranges),
    skip_bad, raw_keys, int_bins, chunk_bytes (see _parse_range). Raises ConfigError,
    DataFormatError."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not 0 <= rank < num_workers:
        raise ConfigError(f"rank {rank} is not in [0, {num_workers})")
    return read_ranges(plan_shards(paths, num_workers, split)[rank], fmt, **opts)
