"""Reading a worker's shard of the training data into a sparse matrix.

Formats: libsvm/svmlight (`label idx:val ...`; keys int_key(idx, 0), or idx itself with raw_keys)
and Criteo TSV (integer columns binned, int_bins "log" or "raw"; categorical columns hashed).
Sharding: every example is read by exactly one worker; split="bytes" cuts all files into equal
byte ranges (a line belongs to the range holding its first byte), split="file" hands whole files
out. Files are memory-mapped and parsed in place; columns.ColumnBuilder sorts the entries into a
CSC matrix whose columns are the shard's keys in increasing order. Details: docs/lr.md, "Data formats"."""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ...errors import ConfigError, DataFormatError
from ...progress import bar
from . import columns
from .columns import ColumnBuilder, csc_by_key  # noqa: F401 - csc_by_key: part of this API
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


def _line_start(mm: mmap.mmap, pos: int) -> int:
    """Offset of the first line starting at or after pos (a line starts at 0 or after a \\n)."""
    if pos <= 0:
        return 0
    k = mm.find(b"\n", pos - 1)
    return len(mm) if k < 0 else k + 1


CHUNK_ENTRIES = 1 << 20   # features parsed between two hand-overs to the ColumnBuilder
CHUNK_ROWS = 1 << 17


class _Parsed:
    """What the parsers produce: labels of every row so far (growable), and a reused chunk of
    row-major entries that goes to the ColumnBuilder after every parser call."""

    def __init__(self, expected_bytes: int):
        self.labels = np.empty(max(expected_bytes // 64, CHUNK_ROWS))
        self.row_nnz = np.empty(CHUNK_ROWS, np.int64)
        self.keys = np.empty(CHUNK_ENTRIES, np.uint64)
        self.vals = np.empty(CHUNK_ENTRIES, np.float32)
        self.ones = np.ones(1, np.uint8)   # the chunk's values are all 1 (and not stored)
        self.rows = self.skipped = 0
        self.expected_bytes, self.parsed_bytes = max(expected_bytes, 1), 0
        self.columns = ColumnBuilder()

    def room(self) -> tuple[np.ndarray, ...]:
        """The parser's output arrays for its next call (labels grown when short)."""
        if self.labels.size < self.rows + CHUNK_ROWS:
            labels = np.empty(max(2 * self.labels.size, self.rows + CHUNK_ROWS))
            labels[:self.rows] = self.labels[:self.rows]
            self.labels = labels
        self.ones[0] = 1
        return (self.labels[self.rows:self.rows + CHUNK_ROWS], self.row_nnz, self.keys,
                self.vals, self.ones)

    def take(self, rows: int, entries: int, bad: int, nbytes: int) -> None:
        """Hand the chunk the parser just filled over to the column builder."""
        self.parsed_bytes += nbytes
        # the regions are sized at the first chunk from its share of the bytes
        expected = int(entries * self.expected_bytes / max(self.parsed_bytes, 1))
        self.columns.add(self.keys[:entries], None if self.ones[0] else self.vals[:entries],
                         self.row_nnz[:rows], self.rows, expected)
        self.rows += rows
        self.skipped += bad

    def grow_chunk(self) -> None:
        """A line holds more features than the chunk: make it twice as big."""
        self.keys = np.empty(2 * self.keys.size, np.uint64)
        self.vals = np.empty(2 * self.vals.size, np.float32)


def _parse_range(rng: ByteRange, fmt: str, out: _Parsed, *, skip_bad: bool = False,
                 raw_keys: bool = False, int_bins: str = "log",
                 chunk_bytes: int = CHUNK_BYTES) -> None:
    """Parse the lines of one byte range into `out`, a window of at most chunk_bytes of whole
    lines at a time. The file is memory-mapped and parsed in place: no copy of its bytes and no
    pass over them besides the parser's. Raises DataFormatError naming file:line for a bad line
    (unless skip_bad), ConfigError."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    if int_bins not in ("log", "raw"):
        raise ConfigError(f"int_bins must be 'log' or 'raw', got {int_bins!r}")
    parser, flag = (parse_libsvm, raw_keys) if fmt == "libsvm" else (parse_criteo,
                                                                      int_bins == "log")
    with open(rng.path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return   # mmap refuses empty files
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_SEQUENTIAL)   # larger read-ahead for a file not cached yet
        # the lines whose first byte lies in [start, end)
        begin, stop = _line_start(mm, rng.start), _line_start(mm, rng.end)
        buf = np.frombuffer(mm, np.uint8)
        error = _parse_lines(buf, begin, stop, rng, parser, flag, skip_bad, out, chunk_bytes, mm)
        del buf
    finally:
        try:
            mm.close()
        except BufferError:   # an exception in flight still holds a view: closed when collected
            pass
    if error:
        raise DataFormatError(error)


def _parse_lines(buf: np.ndarray, begin: int, stop: int, rng: ByteRange, parser, flag: bool,
                 skip_bad: bool, out: _Parsed, chunk_bytes: int, mm: mmap.mmap) -> str | None:
    """_parse_range's loop over buf[begin:stop] (whole lines), a chunk of entries at a time.
    Returns the message for a bad line (raised once the map is closed), else None."""
    pos, lines_done = begin, 0
    while pos < stop:
        end = min(stop, pos + max(chunk_bytes, 1))
        if end < stop:   # cut after the window's last newline (or read on through a long line)
            k = mm.rfind(b"\n", pos, end)
            end = k + 1 if k >= 0 else _line_start(mm, end)
        while pos < end:
            nr, ne, nbad, code, line, off = parser(buf[pos:end], flag, skip_bad, *out.room())
            if code:
                line_no = _lines_before(rng.path, begin) + lines_done + line + 1
                k = mm.find(b"\n", pos + off, end)
                text = mm[pos + off: k if k >= 0 else end][:120]
                return (f"{rng.path}:{line_no}: {REASONS[code]}: "
                        f"{text.decode('utf-8', 'replace')!r} (fix the line, or pass --skip-bad / "
                        "skip_bad=True to skip bad lines)")
            out.take(nr, ne, nbad, off)
            lines_done += line
            pos += off
            if off == 0:   # not even one line fitted
                out.grow_chunk()
    return None


def prefer_small_pages() -> None:
    """Stop numpy from asking for transparent huge pages for big arrays (this process only).

    A shard's buffers are written once, front to back, so huge pages buy few TLB misses, while on
    a virtual machine that backs guest memory lazily a first-touched 2 MB page costs several times
    its 512 small pages (measured here: 225 MB first touched in 0.35 s with huge pages, 0.08 s
    without; reading a 500 k-line shard 1.3-2.2 s -> 1.0 s). Does nothing if numpy lacks the
    switch."""
    try:
        from numpy._core import multiarray
    except ImportError:   # numpy < 2
        from numpy.core import multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def warm_up() -> None:
    """Load the compiled reader kernels (numba's cached machine code, ~0.2 s on first use), e.g.
    in a thread while the process does something else."""
    buf = np.frombuffer(b"1 1:1\n", np.uint8)
    out = (np.empty(2), np.empty(2, np.int64), np.empty(2, np.uint64), np.empty(2, np.float32))
    parse_libsvm(buf, False, False, *out, np.ones(1, np.uint8))
    columns.warm_up()


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
    """Read byte ranges into a Shard (keys are mapped to columns once, by one radix sort fed
    while parsing: columns.py);
    bias=True adds the constant feature BIAS_KEY to every example. opts: see _parse_range."""
    out = _Parsed(sum(r.end - r.start for r in ranges))
    with bar(sum(r.end - r.start for r in ranges), "reading", "B", scale=True) as shown:
        for r in ranges:
            _parse_range(r, fmt, out, **opts)
            shown.update(r.end - r.start)
    y, skipped = out.labels[:out.rows].copy(), out.skipped
    X, uniq = out.columns.finish(out.rows)
    if skipped:
        log.warning("skipped %d malformed lines in %s", skipped, [r.path for r in ranges])
    shard = Shard(X=X, y=y, keys=uniq, skipped=skipped, ranges=list(ranges))
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
