"""The seal/open helpers of benchmarks/cipher_floor.py: nonces, chunking, and refusal of a tampered,
replayed or reordered chunk (the sealing tests need `cryptography`, a benchmark-only import)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cipher_floor.py"
_spec = importlib.util.spec_from_file_location("cipher_floor", _PATH)
cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cf)


def test_nonce_layout_is_direction_part_counter():
    assert cf.nonce(1, 2, 3) == bytes([1, 2, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0])
    fields = [(d, p, c) for d in (0, 1) for p in (0, 1, 255, 256) for c in (0, 1, 2**63)]
    assert len({cf.nonce(*f) for f in fields}) == len(fields)


@pytest.mark.parametrize("fields", [(256, 0, 0), (0, 1 << 24, 0), (0, 0, 1 << 64), (-1, 0, 0)])
def test_nonce_refuses_fields_that_do_not_fit(fields):
    with pytest.raises(ValueError, match="out of range"):
        cf.nonce(*fields)


@pytest.mark.parametrize(("nbytes", "chunks"), [(10, 1), (10, 3), (4_000_000, 16), (5, 5)])
def test_chunk_bounds_cover_the_buffer_contiguously(nbytes, chunks):
    bounds = cf.chunk_bounds(nbytes, chunks)
    assert len(bounds) == chunks
    assert bounds[0][0] == 0 and bounds[-1][1] == nbytes
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("chunks", [0, 11])
def test_chunk_bounds_refuse_impossible_splits(chunks):
    with pytest.raises(ValueError, match="cannot split"):
        cf.chunk_bounds(10, chunks)


@pytest.fixture
def pair():
    pytest.importorskip("cryptography")
    aead = cf.aes_gcm(bytes(range(32)))
    data = memoryview(np.arange(1000, dtype=np.float32)).cast("B")
    return cf.ChunkSealer(aead, len(data), 4), cf.ChunkOpener(aead, len(data), 4), data


def _push(sealer, data):
    return [sealer.begin(cf.HEADER)] + [bytes(sealer.seal(i, data)) for i in range(4)]


def test_pushes_round_trip_and_ack(pair):
    sealer, opener, data = pair
    for _ in range(3):
        parts = _push(sealer, data)
        assert opener.open_header(parts[0]) == cf.HEADER
        assert [opener.open_chunk(p) for p in parts[1:]] == [False, False, False, True]
        assert opener.buf == data
        sealer.check_ack(opener.ack())


def test_tampered_chunk_is_refused_and_abandons_the_push(pair):
    from cryptography.exceptions import InvalidTag
    sealer, opener, data = pair
    parts = _push(sealer, data)
    opener.open_header(parts[0])
    opener.open_chunk(parts[1])
    tampered = bytearray(parts[2])
    tampered[-1] ^= 1                          # the tag
    with pytest.raises(InvalidTag):
        opener.open_chunk(bytes(tampered))
    with pytest.raises(ValueError, match="outside a push"):
        opener.open_chunk(parts[3])            # genuine, but its push was refused
    parts = _push(sealer, data)                # the next push is served again
    opener.open_header(parts[0])
    assert [opener.open_chunk(p) for p in parts[1:]][-1] is True
    assert opener.buf == data


def test_replayed_or_reordered_chunk_is_refused(pair):
    from cryptography.exceptions import InvalidTag
    sealer, opener, data = pair
    first = _push(sealer, data)
    opener.open_header(first[0])
    for p in first[1:]:
        opener.open_chunk(p)
    second = _push(sealer, data)
    opener.open_header(second[0])
    with pytest.raises(InvalidTag):
        opener.open_chunk(first[1])            # the same chunk of the previous push
    third = _push(sealer, data)
    with pytest.raises(InvalidTag):
        opener.open_header(second[0])          # a replayed header
    opener.open_header(third[0])
    with pytest.raises(InvalidTag):
        opener.open_chunk(third[2])            # chunk 2 where chunk 1 belongs


def test_wrong_length_chunk_and_forged_ack_are_refused(pair):
    from cryptography.exceptions import InvalidTag
    sealer, opener, data = pair
    parts = _push(sealer, data)
    opener.open_header(parts[0])
    with pytest.raises(ValueError, match="expected"):
        opener.open_chunk(parts[1][:-1])
    with pytest.raises(InvalidTag):
        sealer.check_ack(b"x" * (len(cf.ACK) + cf.TAG))
    with pytest.raises(RuntimeError, match="refused"):
        sealer.check_ack(cf.REFUSED)


def test_self_check_passes():
    pytest.importorskip("cryptography")
    cf.self_check()
