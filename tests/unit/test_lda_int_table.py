"""The int64 table dtype LDA's counts live in: exact sums, and only rules and inits that stay exact."""

import numpy as np
import pytest

from pserver.errors import TableError
from pserver.store.spec import TableSpec
from pserver.store.table import Table


def test_int64_sum_is_exact_beyond_float_precision():
    t = Table(TableSpec(name="c", dim=2, dtype="int64"))
    keys = np.array([3, 7], np.uint64)
    big = 1 << 60                     # float64 would round big + 1 to big
    t.push(keys, np.array([[big, -1], [0, 5]], np.int64))
    t.push(keys, np.array([[1, 1], [-2, 0]], np.int64))
    out = t.pull(keys)
    assert out.dtype == np.int64
    assert out.tolist() == [[big + 1, 0], [-2, 5]]
    assert t.pull(np.array([9], np.uint64)).tolist() == [[0, 0]]   # absent: initial zeros


def test_int64_constant_init_and_assign():
    t = Table(TableSpec(name="c", dtype="int64", init="constant:4", updater="assign"))
    keys = np.array([1, 2], np.uint64)
    assert t.pull(keys).tolist() == [[4], [4]]
    t.push(keys[:1], np.array([[-9]], np.int64))
    assert t.pull(keys).tolist() == [[-9], [4]]


@pytest.mark.parametrize("kwargs", [
    dict(updater="sgd", updater_args={"lr": 0.1}),
    dict(updater="adagrad", updater_args={"lr": 0.1}),
    dict(init="normal:0.01"),
    dict(init="uniform:1"),
    dict(init="constant:1.5"),
])
def test_int64_refuses_rules_and_inits_that_round(kwargs):
    with pytest.raises(TableError, match="int64 table"):
        TableSpec(name="c", dtype="int64", **kwargs)


def test_int64_spec_round_trips_as_json():
    spec = TableSpec(name="c", dim=4, dtype="int64")
    assert TableSpec.from_json(spec.to_json()) == spec
    with pytest.raises(TableError, match="dtype"):
        TableSpec(name="c", dtype="int32")
