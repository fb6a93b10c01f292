"""pserver.sealed without sockets: chunk layout, references, sealing and opening, forged, replayed
and misplaced chunks, and the buffer pool. The channel over real sockets:
tests/cluster/test_sealed_cluster.py."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from pserver import sealed
from pserver.sealed import CHUNK, TAG, BufferPool, Channel, SealError, chunk_layout, decode_ref, encode_ref
from pserver.wire import Limits

CIPHERS = [name for name in sealed.CIPHERS if sealed.available(name)]


def pair(cipher: str = "aes-256-gcm") -> tuple[Channel, Channel]:
    """A dealer's channel and the server's view of it, sharing one key."""
    key, token = os.urandom(sealed.KEY_BYTES), os.urandom(sealed.TOKEN_BYTES)
    factory = sealed.CIPHERS[cipher][1]
    return (Channel(factory(key), token, sealed._TO_SERVER, BufferPool()),
            Channel(factory(key), token, sealed._TO_CLIENT, BufferPool()))


def test_aes_256_gcm_is_always_available():
    assert sealed.available("aes-256-gcm")
    assert not sealed.available("rot13")


def test_chunk_layout_covers_every_byte_once():
    sizes = [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK - 5]
    layout = chunk_layout(sizes)
    for f, size in enumerate(sizes):
        parts = sorted((off, n) for g, _, off, n in layout if g == f)
        assert sum(n for _, n in parts) == size
        assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(parts))
        assert all(0 < n <= CHUNK for _, n in parts)
    assert [c for f, c, _, _ in layout if f == 3] == [0, 1]


def test_ref_round_trip_and_malformed_refs_are_refused():
    limits = Limits()
    assert decode_ref(encode_ref(7, [8, 4 << 20]), limits) == (7, [8, 4 << 20], CHUNK)
    assert decode_ref(encode_ref(7, [8], 1 << 17), limits)[2] == 1 << 17
    good = encode_ref(7, [8, 16])
    for bad in (good[:10], good[:-1], good + b"\0", encode_ref(7, []), encode_ref(7, [8], 100),
                encode_ref(7, [8], 1 << 30)):
        with pytest.raises(SealError):
            decode_ref(bad, limits)
    with pytest.raises(SealError, match="size limit"):
        decode_ref(encode_ref(1, [1 << 20, 1 << 20]), Limits(max_message_bytes=1 << 20))
    with pytest.raises(SealError, match="65,536 chunks"):  # a layout too long to build
        decode_ref(encode_ref(1, [(1 << 16) * (64 << 10) + 1], 64 << 10), limits)
    with pytest.raises(SealError):
        decode_ref(encode_ref(1, [1] * 65), limits)  # more frames than max_arrays


def _deliver(sender: Channel, receiver: Channel, arrays: list) -> list[np.ndarray]:
    seq, sizes, chunks = sender.seal(arrays)
    opening = receiver.opener(seq, sizes)
    for head, data in chunks:
        s, f, c = sealed._CHUNK_HEAD.unpack(head)
        assert s == seq
        assert opening.add(f, c, memoryview(data))
    assert not opening.missing and not opening.forged
    return opening.frames


@pytest.mark.parametrize("cipher", CIPHERS)
def test_sealed_arrays_open_to_the_same_bytes_both_ways(cipher):
    dealer, server = pair(cipher)
    keys = np.arange(5, dtype=np.uint64)
    vals = np.random.default_rng(0).random((3, CHUNK // 4 + 100)).astype(np.float32)  # 2 chunks
    frames = _deliver(dealer, server, [keys, vals])
    assert frames[0].tobytes() == keys.tobytes() and frames[1].tobytes() == vals.tobytes()
    back = _deliver(server, dealer, [vals[1]])
    assert back[0].tobytes() == vals[1].tobytes()


def test_a_tampered_chunk_is_not_authentic_and_is_not_taken():
    dealer, server = pair()
    seq, sizes, chunks = dealer.seal([np.ones(1000, np.float32)])
    opening = server.opener(seq, sizes)
    _head, data = next(chunks)
    forged = data.copy()
    forged[10] ^= 1
    assert not opening.add(0, 0, memoryview(forged))
    assert opening.forged == 1 and opening.missing


def test_chunks_of_another_message_direction_or_place_fail_their_tag():
    dealer, server = pair()
    v = np.ones(1000, np.float32)
    _, _, first = dealer.seal([v])
    _, first_chunk = next(first)
    seq2, sizes2, _ = dealer.seal([v])
    opening = server.opener(seq2, sizes2)
    assert not opening.add(0, 0, memoryview(first_chunk))  # same bytes, earlier sequence number
    # the server's own sealing reflected back at it: same key and sequence number, other direction
    dealer, server = pair()
    seq, sizes, own = server.seal([v])
    opening = server.opener(seq, sizes)
    assert not opening.add(0, 0, memoryview(next(own)[1]))
    # a chunk of frame 0 presented as frame 1
    dealer, server = pair()
    seq, sizes, chunks = dealer.seal([np.ones(10, np.float32), np.ones(10, np.float32)])
    opening = server.opener(seq, sizes)
    assert not opening.add(1, 0, memoryview(next(chunks)[1]))


def test_a_reference_must_name_a_newer_message():
    dealer, server = pair()
    seq, sizes, _ = dealer.seal([np.ones(4, np.float32)])
    server.opener(seq, sizes)
    with pytest.raises(SealError, match="replayed"):
        server.opener(seq, sizes)


def test_a_chunk_of_the_wrong_length_or_place_is_ignored():
    dealer, server = pair()
    seq, sizes, chunks = dealer.seal([np.ones(4, np.float32)])
    opening = server.opener(seq, sizes)
    _head, data = next(chunks)
    assert not opening.add(0, 0, memoryview(data[:-1]))
    assert not opening.add(0, 5, memoryview(data))  # no such chunk: not counted as forged
    assert opening.add(0, 0, memoryview(data))
    assert len(data) == 16 + TAG


def test_the_pool_reuses_a_buffer_only_once_nothing_refers_to_it():
    pool = BufferPool(limit=1 << 20)
    a = pool.get(1000)
    b = pool.get(1000)
    assert a is not b  # a is still referenced here
    view = np.ndarray((250,), np.float32, memoryview(b))
    first = id(a)
    del a
    c = pool.get(1000)
    assert id(c) == first  # nothing referred to a any more: handed out again
    d = pool.get(1000)
    assert d is not b and d is not c  # b is still named and viewed: a fresh buffer
    held, second = len(pool.buffers), id(b)
    del b, view
    e = pool.get(1000)
    assert id(e) == second and len(pool.buffers) == held  # b again, nothing allocated
    big = pool.get(1 << 20)  # over a quarter of the limit: not kept
    assert all(x is not big for x in pool.buffers)
    assert pool.held <= pool.limit
