"""Range vector clocks (paper: "Range vector clocks").

Conceptually every (key, value) pair carries a vector clock: for each node i, the timestamp of the
last message from i that covered the key. Messages update whole key ranges at once, so the clock is
stored per range: vc_i(R) = t. A `RangeMap` is one node's clock over the key space [0, 2**64), a
piecewise-constant function kept as sorted range starts; a `RangeClock` is the vector of them.

Setting a sub-range splits at most one stored range and equal neighbours merge: the size is
O(distinct ranges), not O(keys). No I/O, no locks: a server owns its clock from its event loop.
"""

from __future__ import annotations

import json
import operator
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from itertools import pairwise
from typing import Any

import numpy as np

from pserver.errors import DTypeError, InvalidKeysError, ProtocolError

__all__ = ["KEY_SPACE_END", "NEVER", "RangeClock", "RangeMap"]

#: Exclusive upper end of the key space: keys are unsigned 64-bit integers.
KEY_SPACE_END = 2**64

#: Time of a node a `RangeClock` has never heard from; makes timestamp 0 a valid first message.
NEVER = -1

# Largest integer a JSON reader using IEEE doubles (JavaScript, many tools) keeps exactly.
_JSON_SAFE_INT = 2**53
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_JSON_FORMAT = "pserver.RangeClock/1"


def _check_range(lo: int, hi: int) -> tuple[int, int]:
    try:
        lo, hi = operator.index(lo), operator.index(hi)
    except TypeError:
        raise InvalidKeysError(
            f"key range bounds must be integers, got {type(lo).__name__}, {type(hi).__name__}"
        ) from None
    if not 0 <= lo < hi <= KEY_SPACE_END:
        raise InvalidKeysError(
            f"key range [{lo}, {hi}) is empty or outside the key space; "
            "pass 0 <= lo < hi <= 2**64 (hi is exclusive)"
        )
    return lo, hi


def _check_time(t: int) -> int:
    try:
        t = operator.index(t)
    except TypeError:
        raise DTypeError(f"a clock time must be an integer, got {type(t).__name__}") from None
    if not _INT64_MIN <= t <= _INT64_MAX:
        raise DTypeError(f"clock time {t} does not fit in int64")
    return t


class RangeMap:
    """One node's clock over the key space: a piecewise-constant time per key, `default` everywhere
    at first.

    Stored as parallel lists `starts` (strictly increasing, starts[0] == 0) and `times`; range i is
    [starts[i], starts[i+1]) and the last range ends at 2**64. Adjacent ranges always have different
    times (canonical form), so two maps are equal iff their lists are.
    """

    __slots__ = ("_starts", "_times")

    def __init__(self, default: int = 0) -> None:
        self._starts: list[int] = [0]
        self._times: list[int] = [_check_time(default)]

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of stored ranges (>= 1)."""
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeMap):
            return NotImplemented
        return self._starts == other._starts and self._times == other._times

    def __repr__(self) -> str:
        parts = ", ".join(f"[{lo}, {hi}): {t}" for lo, hi, t in self.items())
        return f"RangeMap({parts})"

    def _end(self, i: int) -> int:
        return self._starts[i + 1] if i + 1 < len(self._starts) else KEY_SPACE_END

    def _span(self, lo: int, hi: int) -> tuple[int, int]:
        """Indices (i, j) of the first and last stored range meeting [lo, hi)."""
        return bisect_right(self._starts, lo) - 1, bisect_left(self._starts, hi) - 1

    def get(self, key: int) -> int:
        """Time of one key. Raises InvalidKeysError if key is outside [0, 2**64)."""
        key = operator.index(key)
        if not 0 <= key < KEY_SPACE_END:
            raise InvalidKeysError(f"key {key} is outside the key space [0, 2**64)")
        return self._times[bisect_right(self._starts, key) - 1]

    def min(self, lo: int, hi: int) -> int:
        """Smallest time over [lo, hi): the time as of which the whole range is known."""
        lo, hi = _check_range(lo, hi)
        i, j = self._span(lo, hi)
        return min(self._times[i : j + 1])

    def max(self, lo: int, hi: int) -> int:
        """Largest time over [lo, hi)."""
        lo, hi = _check_range(lo, hi)
        i, j = self._span(lo, hi)
        return max(self._times[i : j + 1])

    def items(self, lo: int = 0, hi: int = KEY_SPACE_END) -> Iterator[tuple[int, int, int]]:
        """Yield (start, end, time) of the stored ranges, clipped to [lo, hi)."""
        lo, hi = _check_range(lo, hi)
        i, j = self._span(lo, hi)
        for k in range(i, j + 1):
            yield max(self._starts[k], lo), min(self._end(k), hi), self._times[k]

    def fresh_mask(self, lo: int, hi: int, t: int, keys: np.ndarray) -> np.ndarray:
        """Boolean mask over `keys`: True where the key lies in [lo, hi) and its time is < t, i.e.
        a message stamped t brings news for it. Vectorised (one searchsorted).

        `keys` must be a 1-d unsigned (or non-negative signed) integer array; raises DTypeError or
        InvalidKeysError otherwise.
        """
        lo, hi = _check_range(lo, hi)
        t = _check_time(t)
        keys = _as_uint64_keys(keys)
        i, j = self._span(lo, hi)
        starts = np.array(self._starts[i : j + 1], dtype=np.uint64)
        fresh = np.array(self._times[i : j + 1], dtype=np.int64) < t
        idx = np.searchsorted(starts, keys, side="right").astype(np.int64) - 1
        mask = keys >= np.uint64(lo)
        if hi < KEY_SPACE_END:
            mask &= keys < np.uint64(hi)
        # Keys below starts[0] are below lo and already masked out; clip keeps indexing legal.
        mask &= fresh[np.maximum(idx, 0)]
        return mask

    # -- updates -----------------------------------------------------------------------------
    def set(self, lo: int, hi: int, t: int) -> None:
        """Set the time of every key in [lo, hi) to t (may move time backwards; see raise_to)."""
        lo, hi = _check_range(lo, hi)
        self._update(lo, hi, _check_time(t), only_raise=False)

    def raise_to(self, lo: int, hi: int, t: int) -> None:
        """Set the time of every key in [lo, hi) to max(old, t): clocks of messages only advance."""
        lo, hi = _check_range(lo, hi)
        self._update(lo, hi, _check_time(t), only_raise=True)

    def _advance(self, lo: int, hi: int, t: int) -> bool:
        """raise_to on checked arguments, unless every key of [lo, hi) is at >= t already (then
        False). Runs for every push a server applies, so the steady state - a sender updating
        exactly the range it updated last time - is one comparison and one store."""
        starts, times = self._starts, self._times
        i, j = self._span(lo, hi)
        if i == j:
            if times[i] >= t:
                return False
            if (starts[i] == lo and self._end(i) == hi and (i == 0 or times[i - 1] != t)
                    and (i + 1 == len(times) or times[i + 1] != t)):
                times[i] = t
                return True
        elif min(times[i : j + 1]) >= t:
            return False
        self._update(lo, hi, t, only_raise=True)
        return True

    def _update(self, lo: int, hi: int, t: int, only_raise: bool) -> None:
        starts, times = self._starts, self._times
        i, j = self._span(lo, hi)
        # Rebuild a window of the touched ranges plus one untouched neighbour on each side, so
        # merging equal neighbours never has to look further: outside the window the lists are
        # already canonical and the window's outermost pieces keep their old times.
        a, b = max(i - 1, 0), min(j + 2, len(starts))
        new_starts: list[int] = []
        new_times: list[int] = []

        def emit(start: int, time: int) -> None:
            if not new_times or new_times[-1] != time:
                new_starts.append(start)
                new_times.append(time)

        for k in range(a, b):
            ks, ke, kt = starts[k], self._end(k), times[k]
            if ks < lo:
                emit(ks, kt)
            if max(ks, lo) < min(ke, hi):
                emit(max(ks, lo), max(kt, t) if only_raise else t)
            if ke > hi:
                emit(max(ks, hi), kt)
        starts[a:b] = new_starts
        times[a:b] = new_times

    # -- arrays ------------------------------------------------------------------------------
    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts uint64, times int64), one entry per stored range. Every start is < 2**64, so
        uint64 holds them; the end of the last range is implicitly 2**64."""
        return np.array(self._starts, dtype=np.uint64), np.array(self._times, dtype=np.int64)

    @classmethod
    def from_arrays(cls, starts: Any, times: Any) -> RangeMap:
        """Inverse of to_arrays. Accepts any integer sequences (also Python ints, e.g. from JSON).

        Raises ProtocolError if starts do not begin at 0, are not strictly increasing, leave the key
        space, or the lengths differ (the input usually comes from a peer or a checkpoint).
        """
        s, ts = _int_list(starts), _int_list(times)
        if not s or len(s) != len(ts):
            raise ProtocolError(
                f"range clock needs as many starts as times (>= 1), got {len(s)} and {len(ts)}"
            )
        if s[0] != 0 or s[-1] >= KEY_SPACE_END or any(x >= y for x, y in pairwise(s)):
            raise ProtocolError(
                "range clock starts must begin at 0, increase strictly and stay below 2**64"
            )
        if any(not _INT64_MIN <= x <= _INT64_MAX for x in ts):
            raise ProtocolError("range clock times must fit in int64")
        m = cls.__new__(cls)
        m._starts, m._times = [], []
        for start, time in zip(s, ts):
            if not m._times or m._times[-1] != time:
                m._starts.append(start)
                m._times.append(time)
        return m

    def copy(self) -> RangeMap:
        """An independent copy."""
        m = RangeMap.__new__(RangeMap)
        m._starts, m._times = list(self._starts), list(self._times)
        return m


def _int_list(xs: Any) -> list[int]:
    # tolist() turns numpy scalars into Python ints, which do not overflow at 2**63.
    if isinstance(xs, np.ndarray):
        if xs.ndim != 1 or xs.dtype.kind not in "ui":
            raise ProtocolError(f"range clock arrays must be 1-d integer arrays, got {xs.dtype}")
        return xs.tolist()
    try:
        return [operator.index(x) for x in xs]
    except TypeError as exc:
        raise ProtocolError(f"range clock arrays must hold integers: {exc}") from None


def _as_uint64_keys(keys: Any) -> np.ndarray:
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.dtype.kind not in "ui":
        raise DTypeError(
            f"keys must be a 1-d integer array (uint64 preferred), got {keys.dtype} "
            f"with shape {keys.shape}"
        )
    if keys.dtype.kind == "i":
        if keys.size and keys.min() < 0:
            raise InvalidKeysError("keys must be non-negative; use uint64 keys")
        keys = keys.astype(np.uint64)
    return keys


def _json_int(x: int) -> int | str:
    return x if -_JSON_SAFE_INT <= x <= _JSON_SAFE_INT else str(x)


def _from_json_int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise ProtocolError(f"range clock JSON holds {x!r} where an integer was expected")
    try:
        return int(x)
    except ValueError:
        raise ProtocolError(f"range clock JSON holds {x!r} where an integer was expected") from None


class RangeClock:
    """Range vector clock: node id -> RangeMap, every node at NEVER (-1) until heard from.

    A server keeps one per table. `advance` is the duplicate/stale filter for incoming messages,
    `covered` answers "does my copy of [lo, hi) reflect every listed node's updates up to t".
    Not thread-safe: owned by one event loop.
    """

    __slots__ = ("_maps",)

    def __init__(self) -> None:
        self._maps: dict[int, RangeMap] = {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeClock):
            return NotImplemented
        trivial = RangeMap(NEVER)
        mine = {n: m for n, m in self._maps.items() if m != trivial}
        theirs = {n: m for n, m in other._maps.items() if m != trivial}
        return mine == theirs

    def __repr__(self) -> str:
        return f"RangeClock({self._maps!r})"

    def nodes(self) -> list[int]:
        """Ids of the nodes this clock has heard from, sorted."""
        return sorted(self._maps)

    def map(self, node: int) -> RangeMap:
        """A copy of one node's RangeMap (all NEVER if unknown)."""
        m = self._maps.get(operator.index(node))
        return m.copy() if m is not None else RangeMap(NEVER)

    def advance(self, node: int, lo: int, hi: int, t: int) -> bool:
        """Accept a message from `node` covering [lo, hi) stamped t.

        Rule for partial overlap: the message is rejected (returns False, nothing changes) only if
        *every* key of [lo, hi) is already at time >= t -- a duplicate or stale resend. Otherwise it
        is accepted (returns True) and each key's time becomes max(old, t), so a clock never moves
        backwards. A caller that must apply a partially-seen message exactly once per key filters
        its keys with `fresh_mask` *before* calling advance.

        Raises InvalidKeysError for a bad range, DTypeError for a non-integer t.
        """
        node = operator.index(node)
        lo, hi = _check_range(lo, hi)
        t = _check_time(t)
        m = self._maps.get(node)
        if m is None:
            if t <= NEVER:
                return False
            m = self._maps[node] = RangeMap(NEVER)
        return m._advance(lo, hi, t)

    def admit(self, node: int, lo: int, hi: int, t: int, keys: Callable[[], np.ndarray]
              ) -> np.ndarray | bool:
        """The server's exactly-once filter for one update message, in one call.

        Returns True when every key of [lo, hi) is new for `node` at time t (apply all: the common
        case, decided without looking at keys), False when every key was already applied (a
        duplicate or stale resend: apply nothing), else a bool mask over ``keys()`` of the keys to
        apply. The clock is advanced to max(old, t) on [lo, hi) in the first and last cases.
        """
        m = self._maps.get(node)
        if m is None:
            m = self._maps[node] = RangeMap(NEVER)
        if m.max(lo, hi) < t:
            m.raise_to(lo, hi, t)
            return True
        if m.min(lo, hi) >= t:
            return False
        mask = m.fresh_mask(lo, hi, t, keys())
        m.raise_to(lo, hi, t)
        return mask

    def fresh_mask(self, node: int, lo: int, hi: int, t: int, keys: np.ndarray) -> np.ndarray:
        """Mask of `keys` in [lo, hi) whose time for `node` is still < t: the keys a message from
        `node` stamped t must be applied to. All False means advance() would reject it."""
        m = self._maps.get(operator.index(node))
        if m is None:
            m = RangeMap(NEVER)
        return m.fresh_mask(lo, hi, t, keys)

    def time(self, node: int, lo: int, hi: int) -> int:
        """Time as of which [lo, hi) reflects `node`: min over the range (NEVER if unknown)."""
        m = self._maps.get(operator.index(node))
        if m is None:
            _check_range(lo, hi)
            return NEVER
        return m.min(lo, hi)

    def covered(self, lo: int, hi: int, t: int, nodes: Iterable[int]) -> bool:
        """True if every listed node has reached >= t on all of [lo, hi) ("pull as of at least
        time t"). Vacuously True for no nodes."""
        lo, hi = _check_range(lo, hi)
        t = _check_time(t)
        return all(self.time(n, lo, hi) >= t for n in nodes)

    def set(self, node: int, lo: int, hi: int, t: int) -> None:
        """Force node's time on [lo, hi) to t, even backwards (recovery, tests)."""
        node = operator.index(node)
        lo, hi = _check_range(lo, hi)
        t = _check_time(t)
        m = self._maps.get(node)
        if m is None:
            m = self._maps[node] = RangeMap(NEVER)
        m.set(lo, hi, t)

    def drop(self, lo: int, hi: int) -> None:
        """Forget [lo, hi) for every node (back to NEVER): used when a server stops owning it."""
        lo, hi = _check_range(lo, hi)
        for m in self._maps.values():
            m.set(lo, hi, NEVER)

    def restrict(self, lo: int, hi: int) -> RangeClock:
        """A new clock equal to this one on [lo, hi) and NEVER elsewhere (range migration ships
        the clock of the moved range together with its data)."""
        lo, hi = _check_range(lo, hi)
        out = RangeClock()
        for node, m in self._maps.items():
            for start, end, t in m.items(lo, hi):
                if t != NEVER:
                    out.set(node, start, end, t)
        return out

    def merge(self, other: RangeClock) -> None:
        """Raise every node's time to the max of both clocks, key by key."""
        for node, m in other._maps.items():
            mine = self._maps.get(node)
            if mine is None:
                mine = self._maps[node] = RangeMap(NEVER)
            for start, end, t in m.items():
                if t != NEVER:
                    mine.raise_to(start, end, t)

    def num_ranges(self) -> int:
        """Total stored ranges over all nodes (memory is proportional to this)."""
        return sum(len(m) for m in self._maps.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (for checkpoints and control messages): integers beyond 2**53 are
        decimal strings so readers using doubles do not round them."""
        nodes = {}
        for node in sorted(self._maps):
            m = self._maps[node]
            nodes[str(node)] = {
                "starts": [_json_int(x) for x in m._starts],
                "times": [_json_int(x) for x in m._times],
            }
        return {"format": _JSON_FORMAT, "nodes": nodes}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str | bytes) -> RangeClock:
        """Inverse of to_json; also accepts the JSON text. Raises ProtocolError if malformed."""
        if isinstance(obj, (str, bytes)):
            try:
                obj = json.loads(obj)
            except ValueError as exc:
                raise ProtocolError(f"range clock JSON does not parse: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != _JSON_FORMAT:
            raise ProtocolError(f"not a range clock: expected an object with format "
                                f"{_JSON_FORMAT!r}")
        nodes = obj.get("nodes")
        if not isinstance(nodes, dict):
            raise ProtocolError("range clock JSON needs a 'nodes' object")
        clock = cls()
        for key, entry in nodes.items():
            node = _from_json_int(key)
            if not isinstance(entry, dict) or not isinstance(entry.get("starts"), list) \
                    or not isinstance(entry.get("times"), list):
                raise ProtocolError(f"range clock node {key!r} needs 'starts' and 'times' lists")
            clock._maps[node] = RangeMap.from_arrays(
                [_from_json_int(x) for x in entry["starts"]],
                [_from_json_int(x) for x in entry["times"]],
            )
        return clock
