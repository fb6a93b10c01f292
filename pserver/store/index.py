"""The compiled core of the store: a hash index from 64-bit keys to value slots, and the row
gather/update loops that run over the slots it returns.

Open addressing with linear probing in one uint64 array of (key, slot + 1) pairs, load factor at
most 0.5, deletion by backward shift (no tombstones), prefetching ahead in every loop. Everything is
``numba.njit(cache=True)``: a new process loads machine code instead of compiling. Layout,
measurements and alternatives: docs/store.md, "Hash index"."""

from __future__ import annotations

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .updaters import (
    KERNEL_ADAGRAD,
    KERNEL_ADAM,
    KERNEL_ASSIGN,
    KERNEL_FTRL,
    KERNEL_L1_PROX,
    KERNEL_SGD,
    KERNEL_SUM,
)

MAX_LOAD = 0.5
PREFETCH = 16                       # iterations of look-ahead; ~ misses the core can overlap
_MIN_BUCKETS = 16

_C1 = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 fmix64 constants
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_ONE = np.uint64(1)
_EMPTY = np.uint64(0)

# Typed pointers were removed in LLVM 17; the intrinsic's mangled name follows the pointer type.
_PREFETCH_NAME = ("llvm.prefetch.p0" if llvmlite.binding.llvm_version_info[0] >= 17
                  else "llvm.prefetch.p0i8")


@intrinsic
def _prefetch(typingctx, arr, flat_index):
    """Hint the CPU to load element ``flat_index`` of C-contiguous ``arr`` (no bounds check:
    prefetching a bad address is harmless)."""
    sig = types.void(arr, flat_index)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH_NAME)
        # (address, rw=read, locality=keep in all levels, cache=data)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _home(key, mask):
    k = key ^ (key >> _S33)
    k *= _C1
    k ^= k >> _S33
    k *= _C2
    k ^= k >> _S33
    return np.int64(k & mask)


@numba.njit(cache=True, nogil=True)
def _lookup(buckets, mask, keys, out):
    """out[i] = slot of keys[i], or -1 if absent. Returns the number of absent keys."""
    m = np.int64(mask)
    n = keys.size
    missing = 0
    for i in range(min(PREFETCH, n)):
        _prefetch(buckets, 2 * _home(keys[i], mask))
    for i in range(n):
        if i + PREFETCH < n:
            _prefetch(buckets, 2 * _home(keys[i + PREFETCH], mask))
        k = keys[i]
        b = _home(k, mask)
        while True:
            s = buckets[2 * b + 1]
            if s == _EMPTY:
                out[i] = -1
                missing += 1
                break
            if buckets[2 * b] == k:
                out[i] = np.int64(s) - 1
                break
            b = (b + 1) & m
    return missing


@numba.njit(cache=True, nogil=True)
def _insert(buckets, mask, keys, slots):
    """Insert keys (which must be absent) with their slots."""
    m = np.int64(mask)
    n = keys.size
    for i in range(n):
        if i + PREFETCH < n:
            _prefetch(buckets, 2 * _home(keys[i + PREFETCH], mask))
        b = _home(keys[i], mask)
        while buckets[2 * b + 1] != _EMPTY:
            b = (b + 1) & m
        buckets[2 * b] = keys[i]
        buckets[2 * b + 1] = np.uint64(slots[i] + 1)


@numba.njit(cache=True, nogil=True)
def _rehash(old, new, mask):
    """Move every entry of bucket array ``old`` into the empty bucket array ``new``."""
    m = np.int64(mask)
    nb_old = old.size // 2
    for i in range(nb_old):
        j = i + PREFETCH
        if j < nb_old and old[2 * j + 1] != _EMPTY:
            _prefetch(new, 2 * _home(old[2 * j], mask))
        s = old[2 * i + 1]
        if s == _EMPTY:
            continue
        k = old[2 * i]
        b = _home(k, mask)
        while new[2 * b + 1] != _EMPTY:
            b = (b + 1) & m
        new[2 * b] = k
        new[2 * b + 1] = s


@numba.njit(cache=True, nogil=True)
def _remove(buckets, mask, keys, freed):
    """Delete keys; absent ones are skipped. Writes the freed slots to ``freed`` and returns
    their number. Backward-shift deletion keeps every probe chain unbroken."""
    m = np.int64(mask)
    count = 0
    for i in range(keys.size):
        k = keys[i]
        b = _home(k, mask)
        while True:
            s = buckets[2 * b + 1]
            if s == _EMPTY:
                break
            if buckets[2 * b] == k:
                freed[count] = np.int64(s) - 1
                count += 1
                hole = b
                j = b
                while True:
                    j = (j + 1) & m
                    if buckets[2 * j + 1] == _EMPTY:
                        break
                    h = _home(buckets[2 * j], mask)
                    # The entry at j may fill the hole only if its home is not cyclically
                    # within (hole, j]: otherwise moving it would put it before its home.
                    if hole <= j:
                        stays = hole < h <= j
                    else:
                        stays = h > hole or h <= j
                    if not stays:
                        buckets[2 * hole] = buckets[2 * j]
                        buckets[2 * hole + 1] = buckets[2 * j + 1]
                        hole = j
                buckets[2 * hole] = _EMPTY
                buckets[2 * hole + 1] = _EMPTY
                break
            b = (b + 1) & m
    return count


@numba.njit(cache=True, nogil=True)
def _scan(buckets, lo, last, keys_out, slots_out):
    """Collect the entries with lo <= key <= last (bucket order). Returns their number."""
    count = 0
    for b in range(buckets.size // 2):
        s = buckets[2 * b + 1]
        if s != _EMPTY:
            k = buckets[2 * b]
            if lo <= k <= last:
                keys_out[count] = k
                slots_out[count] = np.int64(s) - 1
                count += 1
    return count


@numba.njit(cache=True, nogil=True)
def gather_rows(values, slots, out):
    """out[i] = values[slots[i]] for every slots[i] >= 0 (rows with slot -1 are left alone)."""
    n = slots.size
    dim = values.shape[1]
    for i in range(n):
        if i + PREFETCH < n and slots[i + PREFETCH] >= 0:
            _prefetch(values, slots[i + PREFETCH] * dim)
        s = slots[i]
        if s >= 0:
            for j in range(dim):
                out[i, j] = values[s, j]


@numba.njit(cache=True, nogil=True)
def update_rows(kind, params, values, state, slots, pushed):
    """Apply built-in rule ``kind`` (updaters.KERNEL_*) with float64 ``params`` to the rows
    values[slots[i]] and pushed[i] (slots valid and unique; formulas in updaters.py).

    state: (capacity, state_cols) array, (1, 0) when the rule keeps none.
    """
    # Everything stays inline in one loop: a helper call per row (even for the prefetch) was
    # measured 13x slower than the row's arithmetic; the branch on kind is perfectly predicted.
    n = slots.size
    dim = values.shape[1]
    scols = state.shape[1]
    for i in range(n):
        if i + PREFETCH < n:
            t = slots[i + PREFETCH]
            _prefetch(values, t * dim)
            if scols > 0:
                _prefetch(state, t * scols)
        s = slots[i]
        if kind == KERNEL_SUM:
            for j in range(dim):
                values[s, j] += pushed[i, j]
        elif kind == KERNEL_ASSIGN:
            for j in range(dim):
                values[s, j] = pushed[i, j]
        elif kind == KERNEL_SGD:
            for j in range(dim):
                values[s, j] -= params[0] * pushed[i, j]
        elif kind == KERNEL_ADAGRAD:
            lr, eps = params[0], params[1]
            for j in range(dim):
                g = pushed[i, j]
                state[s, j] += g * g
                values[s, j] -= lr * g / np.sqrt(state[s, j] + eps)
        elif kind == KERNEL_FTRL:
            alpha, beta, l1, l2 = params[0], params[1], params[2], params[3]
            for j in range(dim):
                g = pushed[i, j]
                nn = state[s, dim + j]
                sigma = (np.sqrt(nn + g * g) - np.sqrt(nn)) / alpha
                state[s, j] += g - sigma * values[s, j]
                state[s, dim + j] = nn + g * g
                # re-read: the rule is defined on the stored (maybe float32) state
                z = state[s, j]
                nn = state[s, dim + j]
                if abs(z) <= l1:
                    values[s, j] = 0.0
                else:
                    values[s, j] = -(z - np.sign(z) * l1) / ((beta + np.sqrt(nn)) / alpha + l2)
        elif kind == KERNEL_ADAM:
            lr, b1, b2, eps = params[0], params[1], params[2], params[3]
            state[s, 2 * dim] += 1.0
            t = state[s, 2 * dim]
            c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
            for j in range(dim):
                g = pushed[i, j]
                state[s, j] = b1 * state[s, j] + (1.0 - b1) * g
                state[s, dim + j] = b2 * state[s, dim + j] + (1.0 - b2) * g * g
                # re-read: the rule is defined on the stored (maybe float32) state
                values[s, j] -= lr * (state[s, j] / c1) / (np.sqrt(state[s, dim + j] / c2) + eps)
        elif kind == KERNEL_L1_PROX:
            l1, l2, eta = params[0], params[1], params[2]
            for j in range(dim):
                u = pushed[i, dim + j] / eta
                denom = u + l2
                if denom > 0:
                    x = u * values[s, j] - pushed[i, j]
                    values[s, j] = np.sign(x) * max(abs(x) - l1, 0.0) / denom


def _pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


class HashIndex:
    """Open-addressing map from uint64 keys to int64 slots (see the module docstring).

    Keys passed in must be 1-D C-contiguous uint64 arrays without duplicates; insert() requires
    the keys to be absent. Not thread-safe: one server loop owns it.
    """

    def __init__(self, capacity: int = 1024) -> None:
        nb = _pow2_at_least(max(_MIN_BUCKETS, int(capacity / MAX_LOAD)))
        self._buckets = np.zeros(2 * nb, dtype=np.uint64)
        self._mask = np.uint64(nb - 1)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def n_buckets(self) -> int:
        return self._buckets.size // 2

    def nbytes(self) -> int:
        """Bytes held by the bucket array (16 per bucket)."""
        return self._buckets.nbytes

    def reserve(self, extra: int) -> None:
        """Grow (doubling, rehashing every entry) so ``extra`` more keys keep the load <= 0.5."""
        need = self._count + int(extra)
        if need <= MAX_LOAD * self.n_buckets:
            return
        nb = _pow2_at_least(int(need / MAX_LOAD) + 1)
        new = np.zeros(2 * nb, dtype=np.uint64)
        mask = np.uint64(nb - 1)
        _rehash(self._buckets, new, mask)
        self._buckets, self._mask = new, mask

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, int]:
        """(slots, n_missing): the int64 slot of every key, -1 where absent."""
        out = np.empty(keys.size, dtype=np.int64)
        missing = _lookup(self._buckets, self._mask, keys, out)
        return out, int(missing)

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Insert absent keys with their int64 slots (inserting a present key corrupts it)."""
        self.reserve(keys.size)
        _insert(self._buckets, self._mask, keys, np.ascontiguousarray(slots, dtype=np.int64))
        self._count += keys.size

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Delete keys (absent ones ignored); returns the freed slots."""
        freed = np.empty(keys.size, dtype=np.int64)
        n = _remove(self._buckets, self._mask, keys, freed)
        self._count -= int(n)
        return freed[:n]

    def scan(self, lo: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, slots) of every entry with lo <= key <= last, unsorted."""
        keys = np.empty(self._count, dtype=np.uint64)
        slots = np.empty(self._count, dtype=np.int64)
        n = _scan(self._buckets, np.uint64(lo), np.uint64(last), keys, slots)
        return keys[:n], slots[:n]


def warm_up(dtypes: tuple[str, ...] = ("float32", "float64", "int64")) -> None:
    """Load every kernel's cached machine code for tables of ``dtypes`` (compiling it on the
    first run after an install or an edit of this file).

    The first call into numba in a process also initialises its target context (which imports
    scipy.linalg when installed); together that is ~0.25 s, otherwise paid by the first
    push/pull. A server may call this from a background thread while it waits for the
    scheduler; numba serialises compilation, so that is safe.
    """
    index = HashIndex(4)
    keys = np.array([1, 2], dtype=np.uint64)
    slots, _ = index.lookup(keys)
    index.insert(keys, np.array([0, 1], dtype=np.int64))
    index.remove(keys[:1])
    index.scan(0, 3)
    index.reserve(64)
    for dtype in dtypes:
        values = np.zeros((2, 1), dtype=dtype)
        update_rows(KERNEL_SUM, np.zeros(4), values, values, slots[:0], values[:0])
        gather_rows(values, slots[:0], values[:0])
