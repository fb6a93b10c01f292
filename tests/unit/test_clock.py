"""Range vector clocks: RangeMap against a per-key reference, RangeClock duplicate filtering."""

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pserver.consistency.clock import KEY_SPACE_END, NEVER, RangeClock, RangeMap
from pserver.errors import DTypeError, InvalidKeysError, ProtocolError

TOP = KEY_SPACE_END


def expand(m: RangeMap, n: int) -> list[int]:
    """Per-key times of m over the small key space [0, n) (all ranges must start below n)."""
    return [m.get(k) for k in range(n)]


def assert_canonical(m: RangeMap) -> None:
    starts, times = m.to_arrays()
    assert starts[0] == 0
    assert np.all(np.diff(starts.astype(object)) > 0)
    assert np.all(times[1:] != times[:-1]), "equal neighbours must be merged"


# -- RangeMap ---------------------------------------------------------------------------------
def test_fresh_map_is_one_range_at_default():
    m = RangeMap()
    assert len(m) == 1 and m.get(0) == 0 and m.get(TOP - 1) == 0
    assert list(m.items()) == [(0, TOP, 0)]


def test_set_inside_one_range_splits_into_three():
    m = RangeMap()
    m.set(10, 20, 5)
    assert len(m) == 3
    assert list(m.items()) == [(0, 10, 0), (10, 20, 5), (20, TOP, 0)]
    assert (m.get(9), m.get(10), m.get(19), m.get(20)) == (0, 5, 5, 0)


def test_set_at_either_end_splits_into_two():
    m = RangeMap()
    m.set(0, 100, 1)
    assert list(m.items()) == [(0, 100, 1), (100, TOP, 0)]
    m.set(TOP - 5, TOP, 2)
    assert list(m.items()) == [(0, 100, 1), (100, TOP - 5, 0), (TOP - 5, TOP, 2)]
    assert m.get(TOP - 1) == 2


def test_set_whole_key_space_collapses_to_one_range():
    m = RangeMap()
    for i in range(50):
        m.set(i * 7, i * 7 + 3, i + 1)
    assert len(m) == 100
    m.set(0, TOP, 9)
    assert list(m.items()) == [(0, TOP, 9)]


def test_equal_neighbours_merge():
    m = RangeMap()
    m.set(10, 20, 5)
    m.set(30, 40, 5)
    assert len(m) == 5
    m.set(20, 30, 5)  # fills the gap: [10, 40) is one range
    assert list(m.items()) == [(0, 10, 0), (10, 40, 5), (40, TOP, 0)]
    m.set(10, 40, 0)  # back to default everywhere
    assert len(m) == 1


def test_set_spanning_several_ranges_keeps_outer_remainders():
    m = RangeMap()
    m.set(10, 20, 1)
    m.set(20, 30, 2)
    m.set(30, 40, 3)
    m.set(15, 35, 7)
    assert list(m.items()) == [(0, 10, 0), (10, 15, 1), (15, 35, 7), (35, 40, 3), (40, TOP, 0)]


def test_min_max_over_ranges():
    m = RangeMap()
    m.set(10, 20, 5)
    m.set(20, 30, 8)
    assert m.min(10, 30) == 5 and m.max(10, 30) == 8
    assert m.min(0, 11) == 0 and m.max(0, 11) == 5
    assert m.min(25, 26) == 8
    assert m.min(0, TOP) == 0 and m.max(0, TOP) == 8


def test_raise_to_never_moves_backwards():
    m = RangeMap()
    m.set(10, 20, 9)
    m.raise_to(0, 30, 4)
    assert list(m.items()) == [(0, 10, 4), (10, 20, 9), (20, 30, 4), (30, TOP, 0)]


@pytest.mark.parametrize("lo,hi", [(5, 5), (6, 5), (-1, 3), (0, TOP + 1)])
def test_bad_ranges_raise(lo, hi):
    with pytest.raises(InvalidKeysError):
        RangeMap().set(lo, hi, 1)
    with pytest.raises(InvalidKeysError):
        RangeMap().min(lo, hi)


def test_bad_key_and_time_raise():
    with pytest.raises(InvalidKeysError):
        RangeMap().get(TOP)
    with pytest.raises(DTypeError):
        RangeMap().set(0, 1, 1.5)
    with pytest.raises(DTypeError):
        RangeMap().set(0, 1, 2**63)


def test_numpy_integers_accepted():
    m = RangeMap()
    m.set(np.uint64(3), np.uint64(2**64 - 1), np.int64(4))
    assert m.get(np.uint64(2**64 - 2)) == 4 and m.get(TOP - 1) == 0


def test_matches_per_key_reference_under_random_updates():
    rng = random.Random(1)
    n = 64
    m, ref = RangeMap(), [0] * n
    for _ in range(3000):
        lo = rng.randrange(n)
        hi = rng.randrange(lo + 1, n + 1)
        t = rng.randrange(6)
        if rng.random() < 0.5:
            m.set(lo, hi, t)
            ref[lo:hi] = [t] * (hi - lo)
        else:
            m.raise_to(lo, hi, t)
            ref[lo:hi] = [max(x, t) for x in ref[lo:hi]]
        assert expand(m, n) == ref
        # Size is exactly the number of maximal constant runs (+1 for the tail [n, 2**64)).
        runs = 1 + sum(ref[i] != ref[i - 1] for i in range(1, n)) + (ref[-1] != 0)
        assert len(m) == runs
        assert m.min(lo, hi) == min(ref[lo:hi]) and m.max(lo, hi) == max(ref[lo:hi])
    assert_canonical(m)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 31), st.integers(1, 32), st.integers(0, 3),
                          st.booleans()), max_size=40))
def test_hypothesis_against_reference(ops):
    n = 32
    m, ref = RangeMap(), [0] * n
    for a, b, t, raise_only in ops:
        lo, hi = min(a, b - 1), max(a + 1, b)
        if raise_only:
            m.raise_to(lo, hi, t)
            ref[lo:hi] = [max(x, t) for x in ref[lo:hi]]
        else:
            m.set(lo, hi, t)
            ref[lo:hi] = [t] * (hi - lo)
    assert expand(m, n) == ref
    assert_canonical(m)


def test_size_stays_bounded_by_distinct_ranges():
    # Many updates but only 8 distinct range boundaries: the map never grows past 9 ranges.
    rng = random.Random(2)
    cuts = [0, 2**10, 2**20, 2**30, 2**40, 2**50, 2**60, 2**63, TOP]
    m = RangeMap()
    for _ in range(20000):
        i = rng.randrange(8)
        j = rng.randrange(i + 1, 9)
        m.set(cuts[i], cuts[j], rng.randrange(1000))
        assert len(m) <= 8
    # Monotone timestamps on one range (the common case: one worker pushing its range).
    m = RangeMap()
    for t in range(1, 10000):
        m.raise_to(100, 200, t)
    assert len(m) == 3


def test_fresh_mask_is_vectorised_and_exact():
    m = RangeMap(NEVER)
    m.set(100, 200, 5)
    m.set(300, TOP, 9)
    keys = np.array([0, 99, 100, 150, 199, 200, 250, 300, 2**64 - 1], dtype=np.uint64)
    mask = m.fresh_mask(50, TOP, 6, keys)
    # In range and time < 6: [50, 100) at -1, [200, 300) at -1; [100, 200) is at 5 < 6 too.
    assert mask.tolist() == [False, True, True, True, True, True, True, False, False]
    mask = m.fresh_mask(150, 260, 5, keys)
    assert mask.tolist() == [False, False, False, False, False, True, True, False, False]
    with pytest.raises(DTypeError):
        m.fresh_mask(0, 10, 1, np.array([1.0]))
    with pytest.raises(InvalidKeysError):
        m.fresh_mask(0, 10, 1, np.array([-1, 2]))


def test_arrays_round_trip_and_validation():
    m = RangeMap()
    m.set(5, 10, 3)
    m.set(TOP - 1, TOP, -7)
    starts, times = m.to_arrays()
    assert starts.dtype == np.uint64 and times.dtype == np.int64
    assert starts.tolist() == [0, 5, 10, TOP - 1] and times.tolist() == [0, 3, 0, -7]
    assert RangeMap.from_arrays(starts, times) == m
    # Non-canonical input is merged.
    assert len(RangeMap.from_arrays([0, 5, 10], [1, 1, 2])) == 2
    for bad in [([1, 5], [0, 0]), ([0, 5, 5], [0, 1, 2]), ([0], [0, 1]), ([0, TOP], [0, 1]),
                ([], [])]:
        with pytest.raises(ProtocolError):
            RangeMap.from_arrays(*bad)


# -- RangeClock -------------------------------------------------------------------------------
def test_advance_rejects_duplicates_and_stale_messages():
    c = RangeClock()
    assert c.time(1, 0, 100) == NEVER
    assert c.advance(1, 0, 100, 0)  # timestamp 0 is a valid first message
    assert not c.advance(1, 0, 100, 0)  # exact duplicate (failover resend)
    assert c.advance(1, 0, 100, 3)
    assert not c.advance(1, 10, 20, 2)  # stale: sub-range already at 3
    assert not c.advance(1, 10, 20, 3)
    assert c.time(1, 0, 100) == 3
    # Other nodes have their own clocks.
    assert c.advance(2, 10, 20, 1)
    assert c.time(2, 10, 20) == 1 and c.time(2, 0, 100) == NEVER


def test_advance_partial_overlap_accepts_and_takes_max():
    c = RangeClock()
    c.advance(1, 0, 50, 5)
    # [0, 100) stamped 4: [50, 100) is news, [0, 50) is not -> accepted, nothing moves backwards.
    assert c.advance(1, 0, 100, 4)
    assert list(c.map(1).items(0, 200)) == [(0, 50, 5), (50, 100, 4), (100, 200, NEVER)]
    keys = np.arange(0, 120, 10, dtype=np.uint64)
    # The keys a resend of ([0,100), t=5) would still need to apply.
    assert c.fresh_mask(1, 0, 100, 5, keys).tolist() == [False] * 5 + [True] * 5 + [False] * 2
    assert c.advance(1, 0, 100, 5)
    assert not c.fresh_mask(1, 0, 100, 5, keys).any()
    assert not c.advance(1, 0, 100, 5)


def test_rejected_message_changes_nothing():
    c = RangeClock()
    c.advance(1, 0, 10, 3)
    before = c.to_json()
    assert not c.advance(1, 2, 8, 1)
    assert not c.advance(7, 2, 8, NEVER)
    assert c.to_json() == before and c.nodes() == [1]


def test_covered_means_pull_as_of_time_t():
    c = RangeClock()
    for node in (1, 2, 3):
        c.advance(node, 0, 1000, 4)
    c.advance(1, 0, 500, 6)
    c.advance(2, 0, 1000, 6)
    assert c.covered(0, 1000, 4, [1, 2, 3])
    assert not c.covered(0, 1000, 5, [1, 2, 3])
    assert c.covered(0, 500, 6, [1, 2])
    assert not c.covered(0, 501, 6, [1, 2])
    assert not c.covered(0, 10, 0, [9])  # never heard from node 9
    assert c.covered(0, 10, 100, [])


def test_drop_restrict_merge_for_migration():
    c = RangeClock()
    c.advance(1, 0, 100, 3)
    c.advance(2, 50, 150, 4)
    moved = c.restrict(40, 60)
    assert moved.time(1, 40, 60) == 3 and moved.time(2, 50, 60) == 4
    assert moved.time(1, 0, 40) == NEVER and moved.time(2, 40, 50) == NEVER
    c.drop(40, 60)
    assert c.time(1, 40, 41) == NEVER and c.time(1, 39, 40) == 3
    other = RangeClock()
    other.advance(1, 40, 60, 1)
    other.merge(moved)
    assert other.time(1, 40, 60) == 3 and other.time(2, 50, 60) == 4
    c.merge(moved)
    assert c.time(1, 0, 100) == 3 and c.time(2, 50, 150) == 4


def test_num_ranges_counts_every_node():
    c = RangeClock()
    assert c.num_ranges() == 0
    c.advance(1, 10, 20, 1)
    c.advance(2, 0, TOP, 1)
    assert c.num_ranges() == 3 + 1


def test_json_round_trip_with_top_of_key_space():
    c = RangeClock()
    c.advance(0, 0, TOP, 2)
    c.advance(5, TOP - 1, TOP, 2**62)
    c.advance(5, 2**53 + 1, 2**63, 9)
    text = json.dumps(c.to_json())
    obj = json.loads(text)
    for x in obj["nodes"]["5"]["starts"] + obj["nodes"]["5"]["times"]:
        assert isinstance(x, str) if abs(int(x)) > 2**53 else isinstance(x, int)
    back = RangeClock.from_json(text)
    assert back == c and back.to_json() == c.to_json()
    assert back.time(5, TOP - 1, TOP) == 2**62
    assert back.time(5, 2**53 + 1, 2**63) == 9
    assert back.time(0, 0, TOP) == 2


@pytest.mark.parametrize("bad", [
    "not json", "[]", {"format": "x", "nodes": {}}, {"format": "pserver.RangeClock/1"},
    {"format": "pserver.RangeClock/1", "nodes": {"a": {"starts": [0], "times": [0]}}},
    {"format": "pserver.RangeClock/1", "nodes": {"1": {"starts": [0], "times": [True]}}},
    {"format": "pserver.RangeClock/1", "nodes": {"1": {"starts": [3], "times": [0]}}},
])
def test_malformed_json_raises_protocol_error(bad):
    with pytest.raises(ProtocolError):
        RangeClock.from_json(bad)


def test_clock_against_reference_with_many_nodes():
    rng = random.Random(3)
    n = 48
    c = RangeClock()
    ref = {node: [NEVER] * n for node in range(3)}
    for _ in range(2000):
        node = rng.randrange(3)
        lo = rng.randrange(n)
        hi = rng.randrange(lo + 1, n + 1)
        t = rng.randrange(8)
        expect = any(x < t for x in ref[node][lo:hi])
        assert c.advance(node, lo, hi, t) == expect
        if expect:
            ref[node][lo:hi] = [max(x, t) for x in ref[node][lo:hi]]
        qlo = rng.randrange(n)
        qhi = rng.randrange(qlo + 1, n + 1)
        qt = rng.randrange(8)
        assert c.covered(qlo, qhi, qt, [0, 1, 2]) == all(
            min(ref[k][qlo:qhi]) >= qt for k in range(3))
    assert RangeClock.from_json(c.to_json()) == c
