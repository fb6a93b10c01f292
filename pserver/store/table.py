"""Table: one named sparse map from uint64 keys to fixed-length value rows (plus optimizer state).

Rows are dense arrays indexed by the slot the HashIndex maps a key to; freed slots are reused, the
arrays grow by doubling. Runs of >= RUN_MIN new consecutive keys get contiguous slots (RunRegistry),
so dense ids cost a slice; repeated key lists skip the index through the SlotCache (cleared when a
key is removed). Keys are validated by the caller. Details: docs/store.md, "Table"."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..config import SLOT_CACHE_DEFAULT, parse_size
from ..errors import TableError, ValueShapeError
from .admission import Admission
from .eviction import EvictionPolicy, Usage
from .index import HashIndex, gather_rows, update_rows
from .init import initial_values
from .slot_cache import SlotCache
from .spec import TableSpec
from .updaters import Updater, kernel_of, make_updater

log = logging.getLogger(__name__)

_NO_KEYS = np.empty(0, np.uint64)
_NO_KEYS.flags.writeable = False
RUN_MIN = 64        # shortest consecutive group that gets contiguous slots and a registry entry
SLICE_MIN = 1024    # covered runs at least this long are applied as slices, shorter ones gathered
_INITIAL_BYTES = 1 << 28
SLOT_CACHE_BYTES = parse_size(SLOT_CACHE_DEFAULT)  # default bound of a table's slot cache


def _ranges(first: np.ndarray, lengths: np.ndarray, dtype) -> np.ndarray:
    """Concatenation of first[i] + arange(lengths[i]) for every i (vectorised; wraps mod 2^64
    for uint64, which is exact because the final values fit)."""
    total = int(lengths.sum())
    out = np.arange(total, dtype=dtype)
    if total:
        begin = np.zeros(lengths.size, dtype=dtype)
        np.cumsum(lengths[:-1], out=begin[1:], dtype=dtype)
        out += np.repeat(first.astype(dtype) - begin, lengths)
    return out


class RunRegistry:
    """Sorted, disjoint key runs [lo, last] whose slots are first_slot .. first_slot+last-lo."""

    def __init__(self) -> None:
        self.lo = np.empty(0, dtype=np.uint64)
        self.last = np.empty(0, dtype=np.uint64)
        self.first = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.lo.size

    def nbytes(self) -> int:
        return self.lo.nbytes + self.last.nbytes + self.first.nbytes

    def clear(self) -> None:
        self.__init__()

    def cover(self, starts: np.ndarray, lasts: np.ndarray) -> np.ndarray:
        """First slot of every run [starts[i], lasts[i]] lying inside one registered run, else -1."""
        out = np.full(starts.size, -1, dtype=np.int64)
        if not self.lo.size:
            return out
        j = np.searchsorted(self.lo, starts, side="right") - 1
        ok = j >= 0
        jj = np.where(ok, j, 0)
        ok &= lasts <= self.last[jj]
        out[ok] = self.first[jj[ok]] + (starts[ok] - self.lo[jj[ok]]).astype(np.int64)
        return out

    def add(self, lo: np.ndarray, last: np.ndarray, first: np.ndarray) -> None:
        """Register new runs (disjoint from the registered ones); runs adjacent in both keys and
        slots are merged, so dense ids pushed in chunks become one slice."""
        lo = np.concatenate([self.lo, lo.astype(np.uint64)])
        last = np.concatenate([self.last, last.astype(np.uint64)])
        first = np.concatenate([self.first, first.astype(np.int64)])
        order = np.argsort(lo, kind="stable")
        lo, last, first = lo[order], last[order], first[order]
        length = (last - lo).astype(np.int64) + 1
        joins = np.zeros(lo.size, dtype=bool)
        joins[1:] = (last[:-1] + np.uint64(1) == lo[1:]) & (first[:-1] + length[:-1] == first[1:])
        heads = np.flatnonzero(~joins)
        tails = np.append(heads[1:] - 1, lo.size - 1)
        self.lo, self.last, self.first = lo[heads], last[tails], first[heads]

    def drop_overlapping(self, keys: np.ndarray) -> None:
        """Forget every run containing one of the sorted ``keys``."""
        if not self.lo.size or not keys.size:
            return
        i = np.searchsorted(keys, self.lo, side="left")
        hit = i < keys.size
        hit[hit] = keys[i[hit]] <= self.last[hit]
        keep = ~hit
        self.lo, self.last, self.first = self.lo[keep], self.last[keep], self.first[keep]


class Table:
    """A named table: pull/push of key lists or key runs, bulk load/remove for checkpoints and
    range migration. Not thread-safe (owned by one server loop).

    capacity: initial number of keys to size arrays for (they grow as needed).
    updater: overrides the spec's registered updater (e.g. a FunctionUpdater for a user handle).
    slot_cache: bytes the slot cache may hold (0 = no slot cache).
    max_bytes: this server's budget for the table (0 = none; see set_budget).
    Admission (spec.admit_after / admit_prob) happens in push; eviction is the master's decision
    (eviction_due, then evict), replicas only evict what they are told.
    """

    def __init__(self, spec: TableSpec, capacity: int = 1024,
                 updater: Updater | None = None, slot_cache: int = SLOT_CACHE_BYTES,
                 max_bytes: int = 0) -> None:
        if not isinstance(spec, TableSpec):
            raise TypeError(f"spec must be a TableSpec, got {type(spec).__name__}")
        self.spec = spec
        self.dim = spec.dim
        self.dtype = np.dtype(spec.dtype)
        self.updater = updater if updater is not None else make_updater(spec.updater,
                                                                        spec.updater_args)
        self.push_cols = self.dim * self.updater.push_factor
        self.state_cols = self.dim * self.updater.state_factor
        self._kernel = kernel_of(self.updater)
        self._index = HashIndex(max(16, int(capacity)))
        # The value arrays start at most _INITIAL_BYTES large (rows may be huge) and double.
        row_bytes = self.dim * self.dtype.itemsize * (1 + self.updater.state_factor)
        cap = max(1, min(max(16, int(capacity)), _INITIAL_BYTES // row_bytes))
        self._values = np.empty((cap, self.dim), dtype=self.dtype)
        # Shape (cap, 0) would still be indexable; (1, 0) keeps one compiled kernel signature.
        self._state = np.zeros((cap, self.state_cols) if self.state_cols else (1, 0), self.dtype)
        self._n_slots = 0                       # high-water mark of used slots
        self._free = np.empty(0, dtype=np.int64)
        self.runs = RunRegistry()
        self.slot_cache = SlotCache(slot_cache)
        self.admission = Admission.from_spec(spec)
        self.eviction: EvictionPolicy | None = None
        self.usage: Usage | None = None
        self.steps = 0                          # pushes applied (counted while usage is tracked)
        self.rows_admitted = self.rows_evicted = 0
        self.set_budget(max_bytes)

    def set_budget(self, max_bytes: int, clock: Callable[[], float] | None = None) -> None:
        """Track row usage and evict under this server's budget ``max_bytes`` for the table
        (0 = none) and the spec's TTLs; without either nothing is tracked (no per-push cost)."""
        spec = self.spec
        if not (max_bytes or spec.ttl_steps or spec.ttl_seconds):
            self.eviction = self.usage = None
            return
        value_bytes = self.dim * self.dtype.itemsize * (1 + self.updater.state_factor)
        kw = {} if clock is None else {"clock": clock}
        self.eviction = EvictionPolicy(spec.ttl_steps, spec.ttl_seconds, max_bytes, value_bytes,
                                       **kw)
        if self.usage is None:
            self.usage = Usage(self._values.shape[0])
            self.usage.reset(self._index.scan(0, (1 << 64) - 1)[1], self.steps)

    def __len__(self) -> int:
        return len(self._index)

    def nbytes(self) -> int:
        """Bytes held: index buckets + value/state arrays (incl. unused capacity) + bookkeeping."""
        return (self._index.nbytes() + self._values.nbytes + self._state.nbytes
                + self._free.nbytes + self.runs.nbytes() + self.slot_cache.nbytes
                + (0 if self.usage is None else self.usage.last.nbytes + self.usage.hits.nbytes)
                + (0 if self.admission is None else self.admission.nbytes()))

    # ---- key lists -------------------------------------------------------------------------

    def pull(self, keys: np.ndarray) -> np.ndarray:
        """Rows (n, dim) of ``keys``; missing keys read as their initial values (not inserted)."""
        keys = self._keys(keys)
        fp, slots = self.slot_cache.get(keys)
        missing = 0
        if slots is None:
            slots, missing = self._index.lookup(keys)
            if fp is not None and not missing:
                self.slot_cache.offer(fp, keys, slots)
        out = np.empty((keys.size, self.dim), dtype=self.dtype)
        gather_rows(self._values, slots, out)
        if missing:
            miss = np.flatnonzero(slots < 0)
            out[miss] = initial_values(self.spec, keys[miss])
        return out

    def push(self, keys: np.ndarray, pushed: np.ndarray) -> None:
        """Apply the updater to the rows of ``keys`` with ``pushed`` (n, push_cols); missing keys
        are first inserted with their initial values - if admitted (the others' rows are
        dropped). Raises ValueShapeError on a wrong shape."""
        keys = self._keys(keys)
        pushed = self._pushed(pushed, keys.size)
        if self.admission is not None and keys.size:
            keys, pushed = self._admitted(keys, pushed)
        if keys.size:
            slots = self._slots_inserting(keys)
            self._apply(slots, pushed)
            if self.usage is not None:
                self._used(slots)

    def _admitted(self, keys: np.ndarray, pushed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The keys (and their pushed rows) stored or admitted now."""
        slots, missing = self._index.lookup(keys)
        if not missing:
            return keys, pushed
        new = slots < 0
        ok = self.admission.admit(keys[new])
        if ok.all():
            return keys, pushed
        keep = ~new
        keep[new] = ok
        return keys[keep], pushed[keep]

    def _used(self, slots: np.ndarray) -> None:
        self.steps += 1
        self.usage.touch(slots, self.steps)
        self.eviction.pushed(self.steps)

    # ---- eviction --------------------------------------------------------------------------

    def eviction_due(self, mastered: Callable[[np.ndarray], np.ndarray], copies: int = 1
                     ) -> np.ndarray:
        """Sorted keys the master of some of this table's rows should evict now (empty when no
        sweep is due). ``mastered(keys)`` -> bool mask of the keys this server masters (only
        those are its to evict); ``copies``: 1 + replicas per key range. Changes nothing."""
        pol = self.eviction
        if pol is None or not pol.due(self.steps, len(self), copies):
            return _NO_KEYS
        keys, slots = self._index.scan(0, (1 << 64) - 1)
        own = mastered(keys)
        keys, slots = keys[own], slots[own]
        idx = pol.victims(self.usage.last[slots], self.usage.hits[slots], self.steps, copies,
                          len(self))
        return np.sort(keys[idx])

    def evict(self, keys: np.ndarray) -> int:
        """Remove the rows of ``keys`` (sorted uint64; absent ones ignored), counted in
        rows_evicted; returns how many were stored. They read their initial values again."""
        n = self.remove(keys)
        self.rows_evicted += n
        return n

    def pushed_within(self, keys: np.ndarray, steps: int) -> np.ndarray:
        """Bool mask of the stored ``keys`` pushed during the table's last ``steps`` pushes.
        Raises TableError if the table tracks no usage (neither a TTL nor a budget)."""
        if self.usage is None:
            raise TableError(f"table {self.spec.name!r} does not track when rows were pushed: "
                             f"declare it with ttl_steps/ttl_seconds or start the servers with "
                             f"--max-table-bytes to export only recent rows")
        slots, _ = self._index.lookup(np.ascontiguousarray(keys, np.uint64))
        return (slots >= 0) & (self.usage.last[np.maximum(slots, 0)] > self.steps - steps)

    def churn_stats(self) -> dict:
        """Counters of admission and eviction, and the bytes the budget counts."""
        out = {"rows_admitted": self.rows_admitted, "rows_evicted": self.rows_evicted,
               "pushes_dropped": self.admission.dropped if self.admission is not None else 0}
        if self.eviction is not None:
            out["budget_bytes"] = len(self) * self.eviction.row_cost
        return out

    # ---- key runs --------------------------------------------------------------------------

    def pull_runs(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Rows of the keys starts[i] .. starts[i]+lengths[i]-1, runs concatenated in order."""
        starts, lengths, offsets, first = self._runs_split(starts, lengths)
        out = np.empty((int(offsets[-1]), self.dim), dtype=self.dtype)
        big, small, rest = self._runs_classify(lengths, first)
        for r in big:
            s, o, n = first[r], offsets[r], lengths[r]
            out[o:o + n] = self._values[s:s + n]
        if small.size:
            pos = _ranges(offsets[small], lengths[small], np.int64)
            slots = _ranges(first[small], lengths[small], np.int64)
            out[pos] = self._values[slots]
        if rest.size:
            pos = _ranges(offsets[rest], lengths[rest], np.int64)
            out[pos] = self.pull(_ranges(starts[rest], lengths[rest], np.uint64))
        return out

    def push_runs(self, starts: np.ndarray, lengths: np.ndarray, pushed: np.ndarray) -> None:
        """push() for the keys given as runs (see pull_runs); pushed rows in the same order."""
        starts, lengths, offsets, first = self._runs_split(starts, lengths)
        pushed = self._pushed(pushed, int(offsets[-1]))
        big, small, rest = self._runs_classify(lengths, first)
        # Uncovered runs first: inserting may reallocate the arrays the slices below point into.
        if rest.size:
            pos = _ranges(offsets[rest], lengths[rest], np.int64)
            self.push(_ranges(starts[rest], lengths[rest], np.uint64), pushed[pos])
        if small.size:
            pos = _ranges(offsets[small], lengths[small], np.int64)
            self._apply(_ranges(first[small], lengths[small], np.int64), pushed[pos])
        for r in big:
            s, o, n = first[r], offsets[r], lengths[r]
            state = self._state[s:s + n] if self.state_cols else None
            self.updater.apply(self._values[s:s + n], state, pushed[o:o + n])
        if self.usage is not None and (small.size or big):
            covered = np.concatenate([small, np.asarray(big, np.int64)]).astype(np.int64)
            self._used(_ranges(first[covered], lengths[covered], np.int64))

    # ---- bulk operations -------------------------------------------------------------------

    def range_items(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of the stored keys with lo <= key < hi, sorted by key (hi may be 2^64)."""
        lo, hi = max(int(lo), 0), min(int(hi), 1 << 64)
        if hi <= lo:
            return np.empty(0, np.uint64), np.empty((0, self.dim), self.dtype)
        keys, slots = self._index.scan(lo, hi - 1)
        order = np.argsort(keys)
        return keys[order], self._values[slots[order]]

    def rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, state or None) of ``keys`` as stored now (absent keys: initial values, zero
        state) - a fresh copy of part of the table, e.g. for re-replication in chunks."""
        keys = self._keys(keys)
        values = self.pull(keys)
        if not self.state_cols:
            return values, None
        slots, _ = self._index.lookup(keys)
        state = np.zeros((len(keys), self.state_cols), self.dtype)
        have = slots >= 0
        state[have] = self._state[slots[have]]
        return values, state

    def keys_sorted(self) -> np.ndarray:
        """Every stored key, sorted (no values gathered: cheaper than items())."""
        keys, _ = self._index.scan(0, (1 << 64) - 1)
        keys.sort()
        return keys

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(keys sorted, values, state or None) of every stored key, for checkpoints."""
        keys, slots = self._index.scan(0, (1 << 64) - 1)
        order = np.argsort(keys)
        keys, slots = keys[order], slots[order]
        state = self._state[slots] if self.state_cols else None
        return keys, self._values[slots], state

    def load(self, keys: np.ndarray, values: np.ndarray,
             state: np.ndarray | None = None) -> None:
        """Insert or overwrite ``keys`` with ``values`` (n, dim) and ``state`` (n, state_cols);
        state None resets the optimizer state of these keys to zero (restore, migration)."""
        keys = self._keys(keys)
        values = np.asarray(values, dtype=self.dtype)
        if values.shape != (keys.size, self.dim):
            raise ValueShapeError(f"load: values have shape {values.shape}, expected "
                                  f"({keys.size}, {self.dim}) for table {self.spec.name!r}")
        if state is not None:
            state = np.asarray(state, dtype=self.dtype)
            if self.state_cols == 0 and state.size == 0:
                state = None
            elif state.shape != (keys.size, self.state_cols):
                raise ValueShapeError(f"load: state has shape {state.shape}, expected "
                                      f"({keys.size}, {self.state_cols})")
        slots = self._slots_inserting(keys, fill=False)
        self._values[slots] = values
        if self.state_cols:
            self._state[slots] = 0 if state is None else state
        if self.usage is not None:   # loaded rows (restore, copies) count as used now
            self.usage.reset(slots, self.steps)

    def remove(self, keys: np.ndarray) -> int:
        """Delete ``keys`` (absent ones ignored); returns how many were stored."""
        keys = self._keys(keys)
        freed = self._index.remove(keys)
        self.runs.drop_overlapping(keys)
        if freed.size:  # their slots may be reused: cached slots of lists holding them are wrong
            self.slot_cache.clear()
            self._free = np.concatenate([self._free, freed])
        if not len(self._index):   # an empty table starts over with compact slots
            self._n_slots, self._free = 0, np.empty(0, dtype=np.int64)
            self.runs.clear()
        return int(freed.size)

    # ---- internals -------------------------------------------------------------------------

    @staticmethod
    def _keys(keys: np.ndarray) -> np.ndarray:
        assert keys.ndim == 1 and keys.dtype == np.uint64, "keys must be 1-D uint64"
        return np.ascontiguousarray(keys)

    def _pushed(self, pushed: np.ndarray, n: int) -> np.ndarray:
        pushed = np.ascontiguousarray(pushed, dtype=self.dtype)
        if pushed.shape != (n, self.push_cols):
            raise ValueShapeError(f"pushed values have shape {pushed.shape}, expected "
                                  f"({n}, {self.push_cols}) for table {self.spec.name!r} "
                                  f"(dim {self.dim} x push factor {self.updater.push_factor})")
        return pushed

    def _apply(self, slots: np.ndarray, pushed: np.ndarray) -> None:
        """Run the updater on rows ``slots`` (unique, present)."""
        if self._kernel is not None:
            kind, params = self._kernel
            update_rows(kind, params, self._values, self._state, slots, pushed)
            return
        w = self._values[slots]
        state = self._state[slots] if self.state_cols else None
        self.updater.apply(w, state, pushed)
        self._values[slots] = w
        if state is not None:
            self._state[slots] = state

    def _slots_inserting(self, keys: np.ndarray, fill: bool = True) -> np.ndarray:
        """Slots of ``keys`` (sorted, unique), inserting the missing ones (with initial values
        and zero state when ``fill``). Not to be changed: they may be the slot cache's."""
        fp, slots = self.slot_cache.get(keys)
        if slots is not None:
            return slots
        if not len(self._index):  # a first push: every key is new, no lookups needed
            slots, missing = np.full(keys.size, -1, np.int64), keys.size
        else:
            slots, missing = self._index.lookup(keys)
        if missing:
            miss = np.flatnonzero(slots < 0) if missing < keys.size else np.arange(keys.size)
            new_keys = keys[miss]
            new_slots = self._allocate(new_keys)
            self._index.insert(new_keys, new_slots)
            if fill:
                self._values[new_slots] = initial_values(self.spec, new_keys)
                if self.state_cols:
                    self._state[new_slots] = 0
                self.rows_admitted += new_keys.size
                if self.usage is not None:
                    self.usage.reset(new_slots, self.steps)
            slots[miss] = new_slots
        if fp is not None:
            self.slot_cache.offer(fp, keys, slots)
        return slots

    def _allocate(self, keys: np.ndarray) -> np.ndarray:
        """Slots for new sorted keys: consecutive groups >= RUN_MIN get contiguous slots at the
        end and a registry entry; the other keys reuse freed slots first."""
        n = keys.size
        brk = np.flatnonzero(keys[1:] - keys[:-1] != np.uint64(1)) + 1
        g_start = np.concatenate(([0], brk))
        g_len = np.diff(np.append(g_start, n))
        long_g = g_len >= RUN_MIN
        slots = np.empty(n, dtype=np.int64)
        is_long = np.repeat(long_g, g_len)
        n_long = int(g_len[long_g].sum())
        n_short = n - n_long
        reuse = min(n_short, self._free.size)
        self._reserve_slots(n - reuse)
        base = self._n_slots
        if n_long:
            slots[is_long] = np.arange(base, base + n_long)
            first = base + np.concatenate(([0], np.cumsum(g_len[long_g])[:-1]))
            lo = keys[g_start[long_g]]
            self.runs.add(lo, lo + (g_len[long_g] - 1).astype(np.uint64), first)
        if n_short:
            fresh = np.arange(base + n_long, base + n_long + n_short - reuse)
            taken = self._free[self._free.size - reuse:]
            self._free = self._free[:self._free.size - reuse]
            slots[~is_long] = np.concatenate([taken, fresh])
        self._n_slots = base + n - reuse
        return slots

    def _reserve_slots(self, extra: int) -> None:
        """Grow the value/state arrays (doubling) to hold ``extra`` more slots."""
        need = self._n_slots + extra
        cap = self._values.shape[0]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        bound = self.eviction.slot_bound() if self.eviction is not None else None
        if bound is not None:  # doubling past the budget would allocate what it never uses
            cap = max(need, min(cap, bound))
        values = np.empty((cap, self.dim), dtype=self.dtype)
        values[:self._n_slots] = self._values[:self._n_slots]
        self._values = values
        if self.state_cols:
            state = np.zeros((cap, self.state_cols), dtype=self.dtype)
            state[:self._n_slots] = self._state[:self._n_slots]
            self._state = state
        if self.usage is not None:
            self.usage.grow(cap, self._n_slots)

    def _runs_split(self, starts, lengths):
        """Validated-by-shape runs plus their output offsets and registry cover (first slot)."""
        starts = np.ascontiguousarray(starts, dtype=np.uint64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        assert starts.ndim == 1 and starts.shape == lengths.shape, "starts/lengths: same 1-D shape"
        assert not lengths.size or lengths.min() >= 0, "run lengths must be >= 0"
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        lasts = starts + (lengths - 1).astype(np.uint64)
        first = self.runs.cover(starts, lasts)
        first[lengths == 0] = 0                  # empty runs are trivially covered
        return starts, lengths, offsets, first

    @staticmethod
    def _runs_classify(lengths, first):
        """Indices of covered runs applied as slices, covered runs gathered, uncovered runs."""
        covered = first >= 0
        big = np.flatnonzero(covered & (lengths >= SLICE_MIN))
        small = np.flatnonzero(covered & (lengths < SLICE_MIN) & (lengths > 0))
        rest = np.flatnonzero(~covered)
        return big.tolist(), small, rest
