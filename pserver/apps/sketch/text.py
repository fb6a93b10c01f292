"""Text input: a worker's shard of some files as memory-mapped chunks cut between tokens, and
the exact token counts of a file (collections.Counter) that checks estimates against.

Shard r of W holds the tokens that start in bytes [r*S/W, (r+1)*S/W) of each file of S bytes.
"""

from __future__ import annotations

import mmap
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from ...errors import ConfigError
from .kernels import FOLD

_IS_TOKEN = FOLD != 0
# the same tokens as kernels.tokenize_hash: runs of ASCII letters, digits and bytes >= 0x80
_TOKEN_RE = re.compile(rb"[A-Za-z0-9\x80-\xff]+")
CHUNK_BYTES = 1 << 22


def token_boundary(data: np.ndarray, p: int) -> int:
    """The first position >= p that does not split a token (a token belongs to the shard or chunk
    where it starts)."""
    n = data.size
    step = 64
    while 0 < p < n and _IS_TOKEN[data[p - 1]]:
        run = np.flatnonzero(~_IS_TOKEN[data[p:p + step]])
        if run.size:
            return p + int(run[0])
        p += step
        step *= 2
    return min(p, n)


def cuts(data: np.ndarray, chunk_bytes: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """[start, end) of pieces of data[lo:hi] of about chunk_bytes each, cut between tokens
    (lo and hi must not split a token)."""
    while lo < hi:
        cut = min(hi, token_boundary(data, lo + chunk_bytes))
        yield lo, cut
        lo = cut


def split(data: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Views of ``data`` of about chunk_bytes each, cut between tokens."""
    for lo, hi in cuts(data, chunk_bytes, 0, data.size):
        yield data[lo:hi]


def shard_chunks(paths: Iterable[str], rank: int = 0, num_shards: int = 1,
                 chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """uint8 arrays: shard ``rank`` of ``num_shards`` of every file, about chunk_bytes each.

    Raises ConfigError for a missing file or a rank outside 0 .. num_shards-1."""
    if not 0 <= rank < num_shards:
        raise ConfigError(f"shard {rank} of {num_shards} does not exist")
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"input file {path!r} does not exist")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                data = np.frombuffer(mm, dtype=np.uint8)
                try:
                    lo = token_boundary(data, size * rank // num_shards)
                    hi = token_boundary(data, size * (rank + 1) // num_shards)
                    for a, b in cuts(data, chunk_bytes, lo, hi):
                        yield data[a:b].copy()  # a view would keep the mmap from closing
                finally:
                    del data  # the mmap cannot close while a view exports its buffer


def tokens(data: bytes) -> list[bytes]:
    """The tokens of ``data``, lower-cased, by a regular expression (the reference)."""
    return _TOKEN_RE.findall(data.lower())


def exact_counts(paths: Iterable[str]) -> Counter:
    """Exact count of every token of the files (bytes -> int). Reads 1 MB at a time: one
    regular-expression call holds the GIL, and a long one would starve the heartbeat thread."""
    counts: Counter = Counter()
    for chunk in shard_chunks(paths, chunk_bytes=1 << 20):
        counts.update(tokens(chunk.tobytes()))
    return counts
