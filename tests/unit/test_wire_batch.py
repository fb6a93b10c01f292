"""Batches on the wire (request coalescing): several single-frame messages in one frame, decoded
and validated as strictly as single messages - a malformed batch is refused whole, nothing of it
is handed on, and the requests it holds are named for their error replies."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pserver import wire
from pserver.errors import LimitError, ProtocolError, PServerError
from pserver.link import MemoryHub
from pserver.testing import MemoryTransport, memory_config
from pserver.wire import Batch, BatchError, Message


def _push(ts: int, n: int = 5) -> Message:
    keys = np.arange(n, dtype=np.uint64) * 7
    return Message("push", ts, "default", {"kf": "k", "p": 0},
                   [keys, np.full((n, 1), ts, np.float32)])


def _frame(msg: Message) -> bytes:
    frames = wire.encode(msg)
    assert len(frames) == 1
    return frames[0]


def test_a_batch_decodes_to_its_messages_in_order_with_aligned_zero_copy_arrays():
    msgs = [_push(1, 3), Message("ack", 2, meta={"p": 1}), _push(3, 1000), Message("pull", 4)]
    frame = wire.encode_batch([_frame(m) for m in msgs])
    got = wire.decode([frame])
    assert type(got) is Batch and got.op == wire.BATCH_OP
    assert [(m.op, m.ts, m.meta) for m in got.messages] == [(m.op, m.ts, m.meta) for m in msgs]
    for sent, back in zip(msgs, got.messages):
        assert len(sent.arrays) == len(back.arrays)
        for a, b in zip(sent.arrays, back.arrays):
            np.testing.assert_array_equal(a, b)
            assert b.ctypes.data % 8 == 0 and not b.flags.owndata  # a view on the frame
    assert got.sizes == [len(_frame(m)) for m in msgs]


def _valid() -> bytes:
    return wire.encode_batch([_frame(_push(1)), _frame(_push(2))])


@pytest.mark.parametrize("mutate", [
    lambda b: b[:7],                                     # shorter than the envelope
    lambda b: b[:4] + struct.pack("<I", 0),              # empty
    lambda b: b[:4] + struct.pack("<I", 3) + b[8:],      # more entries than the frame holds
    lambda b: b[:4] + struct.pack("<I", 1) + b[8:],      # fewer: trailing bytes
    lambda b: b + bytes(8),                              # trailing bytes
    lambda b: b[:8] + struct.pack("<II", 1 << 30, 0) + b[16:],  # an entry past the end
    lambda b: b[:8] + struct.pack("<II", len(b) - 16, 7) + b[16:],  # reserved word not zero
    lambda b: b[:-1],                                    # truncated
], ids=["short", "empty", "count_high", "count_low", "trailing", "entry_long", "reserved", "cut"])
def test_a_malformed_envelope_is_refused(mutate):
    with pytest.raises(ProtocolError):
        wire.decode([mutate(_valid())])


def test_a_batch_over_the_message_count_limit_or_nested_is_refused():
    frame = wire.encode_batch([_frame(_push(t)) for t in range(5)])
    with pytest.raises(LimitError, match="batch of 5"):
        wire.decode([frame], wire.Limits(max_batch=4))
    nested = wire.encode_batch([_frame(_push(1)), _valid()])
    with pytest.raises(BatchError, match="inside a batch") as e:
        wire.decode([nested])
    assert e.value.requests == [(1, 0)]  # the readable one is named, the nested one cannot be
    with pytest.raises(ProtocolError, match="not a pserver message"):
        wire.decode([_valid(), b"more"])  # a batch is one frame; a second one makes it no message


def test_a_message_over_the_limits_refuses_the_whole_batch_and_names_every_request():
    frames = [_frame(_push(1, 3)), _frame(_push(2, 50)), _frame(_push(3, 3))]
    with pytest.raises(BatchError, match="exceeds the limit") as e:
        wire.decode([wire.encode_batch(frames)], wire.Limits(max_keys=10))
    assert e.value.requests == [(1, 0), (2, 0), (3, 0)]
    garbled = [frames[0], b"PS1" + bytes(20)]
    with pytest.raises(BatchError) as e:
        wire.decode([wire.encode_batch(garbled)])
    assert e.value.requests == [(1, 0)]


def test_random_corruption_of_a_batch_never_escapes_as_another_exception():
    rng = np.random.default_rng(3)
    base = bytearray(wire.encode_batch([_frame(_push(t, 20)) for t in range(4)]))
    for _ in range(3000):
        b = bytearray(base)
        for i in rng.integers(0, len(b), rng.integers(1, 4)):
            b[i] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(b) // 2, len(b) + 1))
        try:
            got = wire.decode([bytes(b[:cut])])
        except PServerError:
            continue
        assert type(got) is Batch and 1 <= len(got.messages) <= 4


def test_a_link_sends_a_batch_as_one_message_counted_per_request():
    hub = MemoryHub()
    tr = MemoryTransport(hub, memory_config(), "server")
    router, port = tr.router_link("h")
    dealer = tr.dealer_link("h", port, "server", identity=b"n4")
    msgs = [_push(1), Message("pull", 2, "default", {"kf": "k", "p": 0}, [np.arange(3, dtype=np.uint64)])]
    dealer.send_batch([_frame(m) for m in msgs], [m.op for m in msgs])
    ident, frames = router.recv()
    assert ident == b"n4" and len(frames) == 1 and router.recv() is None
    got, _ = tr.decode_body(frames)
    assert [m.ts for m in got.messages] == [1, 2]
    received = tr.counters.to_json()["received_by_op"]
    assert received == {"push": {"messages": 1, "bytes": len(_frame(msgs[0]))},
                        "pull": {"messages": 1, "bytes": len(_frame(msgs[1]))}}
    tr.close()
