"""The worker's one-pass push encoding (``wire.encode_push``): the same bytes as the general
``wire.encode`` of the same Message, or None where the general path must encode it."""

from __future__ import annotations

import numpy as np
import pytest

from pserver import wire
from pserver.wire import Message


def _keys(n: int) -> np.ndarray:
    return np.unique(np.random.default_rng(n).integers(0, 2**64 - 1, n, dtype=np.uint64))


@pytest.mark.parametrize("n", [0, 1, 3, 1000])
@pytest.mark.parametrize("dtype,cols", [("float32", 1), ("float64", 3), ("float16", 5),
                                        ("int64", 2), ("int8", 7)])
@pytest.mark.parametrize("table", ["default", 'w"eird\\ \u00e9 name'])
def test_the_same_bytes_as_the_general_encoding(n, dtype, cols, table):
    keys = _keys(n)
    vals = np.arange(len(keys) * cols).astype(dtype).reshape(len(keys), cols)
    meta = {"kf": "k", "p": 2, "rv": 17}
    fast = wire.encode_push(123456789, table, dict(meta), keys, vals)
    assert fast is not None
    assert fast == wire.encode(Message("push", 123456789, table, meta, [keys, vals]))
    back = wire.decode(fast)
    assert (back.op, back.ts, back.table, back.meta) == ("push", 123456789, table, meta)
    np.testing.assert_array_equal(back.arrays[0], keys)
    np.testing.assert_array_equal(back.arrays[1], vals)


def test_what_does_not_travel_inline_is_left_to_the_general_path():
    big = _keys(3000)  # 24 KB of keys + 12 KB of values: over INLINE_BYTES
    assert wire.encode_push(1, "t", {}, big, np.ones((len(big), 1), np.float32)) is None
    keys = _keys(10)
    strided = np.ones((len(keys), 2), np.float32)[:, :1]  # not contiguous
    assert wire.encode_push(1, "t", {}, keys, strided) is None
    # a dtype the wire does not carry
    assert wire.encode_push(1, "t", {}, keys, np.ones((10, 1), np.complex64)) is None


def test_an_integer_only_the_json_module_writes_goes_the_general_way():
    keys = _keys(4)
    assert wire.encode_push(1, "t", {"x": 1 << 70}, keys, np.ones((4, 1), np.float32)) is None
