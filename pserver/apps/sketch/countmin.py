"""CountMinSketch: a d x w CountMin sketch held by the servers, written and read by workers.

Tables (float64): NAME (sum; key row * w + column, then N), NAME_hh (assign; heavy-hitter
candidates by item hash) and NAME_meta (assign; key 0 = depth, width, seed, conservative,
candidate share). Writers aggregate a batch locally and push the increments of the cells it
touched; readers pull an item's d cells and take the minimum. docs/sketch.md has the details.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from ...errors import ConfigError, DTypeError, TableError
from . import candidates, kernels
from .shape import SketchShape
from .text import split

if TYPE_CHECKING:
    from ... import KVWorker

PUSH_TOKENS = 1 << 20   # counts a writer aggregates before it pushes
WINDOW = 4              # pushes in flight per writer before push() waits for the oldest
ITEM_BATCH = 1 << 20    # items taken at once from an iterator
_META_KEY = np.zeros(1, dtype=np.uint64)


class CountMinSketch:
    """One worker's handle on the sketch ``name``.

    With ``shape``, creates the sketch (or joins it if it exists with the same shape); without,
    opens an existing one. conservative: this writer applies conservative update to its own
    sub-stream (see docs/sketch.md: safe under concurrent writers). share: the candidate share
    (heavy_hitters finds every item above it). read_only: open the sketch only to query it (its
    tables are declared with pushes=False, as a read-only worker group must; needs no shape).

    Raises:
        ConfigError: share is not strictly between 0 and 1; nothing is declared.
        TableError: opening a sketch that does not exist, creating one that exists with another
            shape, update mode or share, or a table of these names declared otherwise; the
            tables may be declared then, but no value is written.
        PServerError: what KVWorker.declare_table / pull / push raise.
    """

    def __init__(self, kv: KVWorker, name: str = "sketch", shape: SketchShape | None = None,
                 conservative: bool = False, share: float = 1e-3, read_only: bool = False) -> None:
        if not 0 < share < 1:
            raise ConfigError(f"the candidate share must lie strictly between 0 and 1, got {share}")
        self.kv, self.name = kv, name
        self.hh_table, self.meta_table = f"{name}_hh", f"{name}_meta"
        if read_only and shape is not None:
            raise ConfigError("a read-only sketch handle opens an existing sketch: pass no shape")
        writes = not read_only
        kv.declare_table(name, dtype="float64", pushes=writes)
        kv.declare_table(self.hh_table, dim=candidates.DIM, dtype="float64", updater="assign",
                         pushes=writes)
        kv.declare_table(self.meta_table, dim=5, dtype="float64", updater="assign", pushes=writes)
        meta = kv.pull(_META_KEY, table=self.meta_table)[0]
        if shape is not None:
            want = np.array([shape.depth, shape.width, shape.seed, float(conservative), share])
            if meta[0] and not np.array_equal(meta, want):
                raise TableError(f"sketch {name!r} exists with depth, width, seed, conservative, "
                                 f"share = {meta.tolist()}: open it without a shape or pick "
                                 "another name")
            if not meta[0]:
                kv.wait(kv.push(_META_KEY, want, table=self.meta_table))
            meta = want
        elif not meta[0]:
            raise TableError(f"no sketch named {name!r} on this cluster: create it by passing "
                             "shape=SketchShape(...) (or run `pserver sketch count`)")
        self.shape, self.conservative, self.share = _parse_meta(name, meta)
        self._salts = kernels.row_salts(np.uint64(self.shape.seed), self.shape.depth)
        self._pending: np.ndarray | None = None   # increments not pushed yet (cells + N)
        self._local: np.ndarray | None = None     # this writer's own sketch (conservative)
        self._pending_total = 0.0
        self._published: set[int] = set()         # candidate hashes this writer has pushed
        self._inflight: deque[int] = deque()
        self.inserted = 0.0                       # counts this writer inserted

    # -- writing ------------------------------------------------------------------------------
    def insert_text(self, data: bytes | np.ndarray) -> int:
        """Count every token of ``data`` (bytes or a 1-D uint8 array), in batches of about
        text.CHUNK_BYTES; returns the number of tokens. The counts are pushed once PUSH_TOKENS
        have accumulated.

        Raises:
            DTypeError: data is not bytes or a 1-D uint8 array; nothing is counted.
            PServerError: what KVWorker.push / wait raise, for this push or an earlier one still
                in flight; the batch is counted locally and the failed push may or may not have
                been applied.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            buf = np.frombuffer(data, dtype=np.uint8)
        elif isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
            buf = data
        else:
            raise DTypeError(f"insert_text takes bytes or a 1-D uint8 array, got "
                             f"{type(data).__name__}: encode text first (s.encode())")
        n = 0
        for chunk in split(buf):  # the kernels' scratch memory is a dozen times the bytes
            hashes, starts, ends = kernels.tokenize_hash(chunk, kernels.FOLD)
            uniq, counts, first = kernels.aggregate(hashes)
            picked = candidates.select(counts, hashes.size, self.share)
            texts = [bytes(chunk[starts[first[j]]:ends[first[j]]]).lower() for j in picked]
            self._add(uniq, counts, uniq[picked], texts, hashes.size)
            n += hashes.size
        return n

    def insert(self, items: Iterable[str | bytes]) -> int:
        """Count every item (str, taken as UTF-8, or bytes; not lower-cased) once; an iterator
        is consumed in batches of ITEM_BATCH. Returns the number of items.

        Raises:
            DTypeError: an item is neither str nor bytes; earlier batches stay counted, the
                batch holding it is not.
            PServerError: as insert_text.
        """
        it = iter(items)
        n = 0
        while batch := list(itertools.islice(it, ITEM_BATCH)):
            encoded, hashes = _encode(batch)
            uniq, counts, first = kernels.aggregate(hashes)
            picked = candidates.select(counts, len(encoded), self.share)
            self._add(uniq, counts, uniq[picked], [encoded[first[j]] for j in picked],
                      len(encoded))
            n += len(encoded)
        return n

    def _add(self, uniq, counts, cand_hashes, cand_texts, total: float) -> None:
        if self._pending is None:
            self._pending = np.zeros(self.shape.cells, dtype=np.float64)
            if self.conservative:
                self._local = np.zeros(self.shape.cells, dtype=np.float64)
        if self.conservative:
            kernels.add_conservative(uniq, counts, self._salts, self.shape.width, self._local,
                                     self._pending)
        else:
            kernels.add_counts(uniq, counts, self._salts, self.shape.width, self._pending)
        self._pending_total += total
        self.inserted += total
        new = [j for j, h in enumerate(cand_hashes.tolist()) if h not in self._published]
        if new:
            # candidates first: a reader that sees these counts will mostly see their items too
            keys = cand_hashes[new]
            order = np.argsort(keys)
            rows = candidates.encode([cand_texts[j] for j in new])
            self._send(keys[order], rows[order], self.hh_table)
            self._published.update(keys.tolist())
        if self._pending_total >= PUSH_TOKENS:
            self._push_pending()

    def _push_pending(self) -> None:
        if not self._pending_total:
            return
        cells = np.flatnonzero(self._pending)
        keys = np.append(cells.astype(np.uint64), np.uint64(self.shape.total_key))
        vals = np.append(self._pending[cells], self._pending_total)
        self._pending[cells] = 0.0
        self._pending_total = 0.0
        self._send(keys, vals, self.name)

    def _send(self, keys: np.ndarray, vals: np.ndarray, table: str) -> None:
        # the worker keeps vals until acknowledged: they are fresh arrays, never reused
        self._inflight.append(self.kv.push(keys, vals, table=table))
        while len(self._inflight) > WINDOW:
            self.kv.wait(self._inflight.popleft())

    def flush(self) -> None:
        """Push what is aggregated and wait until the servers applied all of this writer's
        pushes.

        Raises:
            PServerError: what KVWorker.push / wait raise; the pushes not acknowledged may or
                may not have been applied, and are not retried.
        """
        self._push_pending()
        while self._inflight:
            self.kv.wait(self._inflight.popleft())

    # -- reading ------------------------------------------------------------------------------
    def estimate_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """Estimated counts (float64) of items given by their hashes (item_hashes).

        Raises:
            PServerError: what KVWorker.pull raises; nothing changes.
        """
        hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        if hashes.size == 0:
            return np.zeros(0)
        cells = kernels.cells(hashes, self._salts, self.shape.width)
        keys, inverse = np.unique(cells.ravel(), return_inverse=True)
        vals = self.kv.pull(keys.astype(np.uint64), table=self.name)
        return vals[inverse].reshape(cells.shape).min(axis=1)

    def estimate(self, items: Iterable[str | bytes]) -> np.ndarray:
        """Estimated count of each item (as inserted: text tokens are lower-case), read now
        from the servers: never below the count inserted and acknowledged so far.

        Raises:
            DTypeError: an item is neither str nor bytes.
            PServerError: what KVWorker.pull raises; nothing changes.
        """
        return self.estimate_hashes(item_hashes(items))

    def total(self) -> float:
        """N: the sum of all counts the servers have applied.

        Raises:
            PServerError: what KVWorker.pull raises; nothing changes.
        """
        key = np.array([self.shape.total_key], dtype=np.uint64)
        return float(self.kv.pull(key, table=self.name)[0])

    def heavy_hitters(self, phi: float) -> list[tuple[bytes, float]]:
        """Items whose estimate is at least phi * N, largest first, as (item, estimate). Every
        item with a true count >= phi * N is among them once its writer flushed; an item below
        (phi - eps) * N is among them with probability <= delta.

        Raises:
            ConfigError: phi is not in [share, 1) (items below the share are not tracked).
            PServerError: what KVWorker.pull / pull_range raise; nothing changes.
        """
        if not self.share <= phi < 1:
            raise ConfigError(f"phi must lie in [{self.share:g}, 1): this sketch tracks "
                              f"candidates above a share of {self.share:g} of each batch")
        keys, rows = self.kv.pull_range(table=self.hh_table)
        n = self.total()
        if keys.size == 0:
            return []
        est = self.estimate_hashes(keys)
        keep = np.flatnonzero(est >= phi * n)
        texts = candidates.decode(rows[keep])
        return sorted(zip(texts, est[keep].tolist(), strict=True), key=lambda t: (-t[1], t[0]))


def _parse_meta(name: str, meta: np.ndarray) -> tuple[SketchShape, bool, float]:
    """Shape, conservative flag and share from the meta row (TableError if it is not one that
    CountMinSketch writes: anyone may push to the table)."""
    whole = np.isfinite(meta).all() and np.array_equal(meta[:4], np.floor(meta[:4]))
    try:
        if not whole or meta[3] not in (0, 1) or not 0 < meta[4] < 1:
            raise ConfigError("not a sketch's meta row")
        return SketchShape(int(meta[0]), int(meta[1]), int(meta[2])), bool(meta[3]), float(meta[4])
    except ConfigError as e:
        raise TableError(f"the table {name}_meta does not describe a sketch ({meta.tolist()}): "
                         "it was written by something else; use another sketch name") from e


def _as_bytes(item: str | bytes) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytes):
        return item
    raise DTypeError(f"sketch items are str or bytes, got {type(item).__name__}: convert them "
                     "first (e.g. str(x))")


def _encode(items: Iterable[str | bytes]) -> tuple[list[bytes], np.ndarray]:
    encoded = [_as_bytes(x) for x in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return encoded, kernels.hash_spans(np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8),
                                       offsets)


def item_hashes(items: Iterable[str | bytes]) -> np.ndarray:
    """The hash of each item as given (str as UTF-8). Raises DTypeError for another type."""
    return _encode(items)[1]
