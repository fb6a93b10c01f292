"""Pure units: the wire codec, key formats and the key ring (no sockets)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pserver.errors import ProtocolError
from pserver.kv import keys as keyfmt
from pserver.ring import KeyRing
from pserver.store.apply import sum_parts
from pserver.wire import Limits, Message, decode, encode


def _hdr(text: str) -> bytes:
    """A raw frame 0 with the given JSON header text (for malformed-input tests)."""
    raw = text.encode()
    return b"PS1" + struct.pack("<I", len(raw)) + raw


def _frames(msg):
    return [bytes(f) if isinstance(f, bytes) else f.tobytes() for f in encode(msg)]


def test_round_trip_arrays_and_meta():
    k = np.arange(5, dtype=np.uint64)
    v = np.arange(10, dtype=np.float32).reshape(5, 2)
    msg = decode(_frames(Message("push", 42, "emb", {"kf": "k", "x": [1, 2]}, [k, v])))
    assert (msg.op, msg.ts, msg.table, msg.meta) == ("push", 42, "emb", {"kf": "k", "x": [1, 2]})
    assert np.array_equal(msg.arrays[0], k) and np.array_equal(msg.arrays[1], v)
    assert msg.arrays[1].dtype == np.float32 and msg.arrays[1].shape == (5, 2)


@pytest.mark.parametrize("frames,match", [
    ([], "empty"),
    ([b"XX1{}"], "magic"),
    ([b"PS1\xff\xff\x00\x00{}"], "header length"),
    ([_hdr('{"op":"x","a":[["<u8",[1]]],"i":1}')], "past the end"),
    ([_hdr('{"op":"x"}') + b"junk"], "trailing"),
    ([_hdr("[1]")], "object"),
    ([_hdr('{"ts":1}')], "no op"),
    ([_hdr('{"op":"x","ts":"1"}')], "ts"),
    ([_hdr('{"op":"x","a":[["<u8",[2]]]}')], "declares 1 arrays but 0"),
    ([_hdr('{"op":"x","a":[["<u8",[2]]]}'), b"1234567"], "declares 16"),
    ([_hdr('{"op":"x","a":[["O",[2]]]}'), b"12345678"], "not allowed"),
    ([_hdr('{"op":"x","a":[["<u8",[-2]]]}'), b""], "bad array spec"),
    ([_hdr('{"op":"x","a":[["<u8",[1,2,3]]]}'), b""], "bad array spec"),
])
def test_malformed_frames_rejected(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_limits_enforced_before_allocation():
    lim = Limits(max_message_bytes=1000, max_keys=100, max_dim=4)
    with pytest.raises(ProtocolError, match="exceeds the limit of 100 keys"):
        decode([_hdr('{"op":"x","a":[["<u8",[101]]]}'), b""], lim)
    with pytest.raises(ProtocolError, match="dimension"):
        decode([_hdr('{"op":"x","a":[["<f4",[1,5]]]}'), b""], lim)
    with pytest.raises(ProtocolError, match="size limit"):
        decode([_hdr('{"op":"x","a":[["<f8",[100,2]]]}'), b""], lim)
    with pytest.raises(ProtocolError, match="header"):
        decode([_hdr(" " * 70000)], Limits())


def test_pack_keys_chooses_runs_for_dense_ids():
    meta, arrays = keyfmt.pack_keys(np.arange(10, 1_000_010, dtype=np.uint64))
    assert meta["kf"] == "r" and arrays[0].tolist() == [10] and arrays[1].tolist() == [1_000_000]
    gaps = np.concatenate([np.arange(0, 100), np.arange(200, 300)]).astype(np.uint64)
    meta, arrays = keyfmt.pack_keys(gaps)
    assert meta["kf"] == "r" and arrays[0].tolist() == [0, 200] and arrays[1].tolist() == [100, 100]
    sparse = np.array([1, 5, 9, 200], dtype=np.uint64)
    assert keyfmt.pack_keys(sparse)[0]["kf"] == "k"
    back = keyfmt.runs_to_keys(arrays[0], arrays[1])
    assert np.array_equal(back, gaps)


@pytest.mark.parametrize("starts,lengths", [
    ([5, 3], [1, 1]),                 # unsorted
    ([0, 5], [10, 1]),                # overlapping
    ([2**64 - 2], [5]),               # wraps past the key space
    ([0], [0]),                       # empty run
])
def test_bad_runs_rejected(starts, lengths):
    msg = Message("pull", 1, meta={"kf": "r"}, arrays=[np.array(starts, np.uint64),
                                                       np.array(lengths, np.uint64)])
    with pytest.raises(ProtocolError):
        keyfmt.unpack_keys(msg)


def test_run_to_the_top_of_the_key_space_is_valid():
    msg = Message("pull", 1, meta={"kf": "r"}, arrays=[np.array([2**64 - 3], np.uint64),
                                                       np.array([3], np.uint64)])
    assert keyfmt.unpack_keys(msg).n == 3


def test_ring_balances_dense_and_hashed_keys():
    ring = KeyRing([1, 2], virtual=32)
    dense = np.arange(2_000_000, dtype=np.uint64)
    hashed = np.sort(np.random.default_rng(1).integers(0, 2**64 - 1, 200_000, dtype=np.uint64))
    for keys in (dense, hashed):
        owners = ring.owner_of(keys)
        share = (owners == 1).mean()
        assert 0.3 < share < 0.7, share
    assert sum(ring.share().values()) == pytest.approx(1.0)


def test_ring_split_covers_every_key_once_and_keeps_order():
    ring = KeyRing([3, 7, 11], virtual=16, block_bits=4)
    keys = np.unique(np.random.default_rng(2).integers(0, 5000, 3000).astype(np.uint64))
    parts = ring.split(keys)
    seen = np.concatenate([np.arange(len(keys))[sel] for _, sel in parts])
    assert np.array_equal(np.sort(seen), np.arange(len(keys)))
    for sid, sel in parts:
        sub = keys[sel]
        assert (np.diff(sub.astype(np.int64)) > 0).all()
        assert (ring.owner_of(sub) == sid).all()


def test_ring_is_stable_under_membership_change():
    """Consistent hashing: adding a server moves only about 1/n of the blocks."""
    blocks = np.arange(100_000, dtype=np.uint64)
    before = KeyRing([1, 2, 3], virtual=64).owner_of_blocks(blocks)
    after = KeyRing([1, 2, 3, 4], virtual=64).owner_of_blocks(blocks)
    moved = before != after
    assert (after[moved] == 4).all()
    assert 0.15 < moved.mean() < 0.35


@pytest.mark.parametrize("parts_n", [2, 3, 5])
def test_sum_parts_merges_sorted_parts_like_a_sort_and_reduce(parts_n):
    rng = np.random.default_rng(parts_n)
    parts = []
    for i in range(parts_n):
        k = np.unique(rng.integers(0, 3000, 800 + 100 * i).astype(np.uint64))
        parts.append((k, rng.random((len(k), 2)).astype(np.float32)))
    parts.append((np.empty(0, np.uint64), np.empty((0, 2), np.float32)))  # an empty push
    keys, vals = sum_parts(parts, 2)
    want_keys = np.unique(np.concatenate([k for k, _ in parts]))
    want = np.zeros((len(want_keys), 2))
    for k, v in parts:
        want[np.searchsorted(want_keys, k)] += v
    assert np.array_equal(keys, want_keys)
    assert np.allclose(vals, want, rtol=1e-6)
