"""Request coalescing decisions (kv/outbox.py): what leaves now, what waits to leave with the next
batch, and that per-server order holds whatever the decision."""

from __future__ import annotations

from pserver.kv.outbox import BATCHABLE_BYTES, Outbox


def _flat(sends) -> list[tuple[int, list[str]]]:
    return [(sid, ops) for sid, _, ops in sends]


def test_messages_go_at_once_until_a_server_has_enough_unanswered():
    box = Outbox(hold_at=2)
    assert _flat(box.add(1, 1, [b"a"], "push")) == [(1, ["push"])]
    assert _flat(box.add(1, 2, [b"b"], "push")) == [(1, ["push"])]
    assert box.add(1, 3, [b"c"], "push") == []  # two unanswered: it waits
    assert _flat(box.add(2, 4, [b"d"], "push")) == [(2, ["push"])]  # another server: at once
    assert box.holds(3) and box.holds(9) and not box.holds(2)


def test_once_one_waits_the_next_wait_too_even_after_an_answer_and_leave_in_order():
    box = Outbox(hold_at=1)
    box.add(1, 1, [b"a"], "push")
    assert box.add(1, 2, [b"b"], "push") == []
    box.answered(1)  # room again, but b waits: c may not overtake it
    assert box.add(1, 3, [b"c"], "pull") == []
    (sent,) = box.take_all()
    assert sent == (1, [b"b", b"c"], ["push", "pull"])
    assert box.in_flight[1] == 2 and not box.held and not box.holds(2)


def test_a_large_or_multi_frame_message_flushes_what_waits_before_it():
    box = Outbox(hold_at=0)
    assert box.add(1, 1, [b"a"], "push") == []
    big = [b"h", b"k" * 10, b"v" * 10]
    assert _flat(box.add(1, 2, big, "push")) == [(1, ["push"]), (1, ["push"])]
    assert box.add(1, 3, [b"x" * (BATCHABLE_BYTES + 1)], "push")[0][2] == ["push"]
    assert box.in_flight[1] == 3 and not box.held


def test_a_full_outbox_leaves_as_one_batch():
    box = Outbox(hold_at=0, max_batch=3)
    assert box.add(1, 1, [b"a"], "push") == [] and box.add(1, 2, [b"b"], "push") == []
    assert _flat(box.add(1, 3, [b"c"], "push")) == [(1, ["push"] * 3)]
    box = Outbox(hold_at=0, max_bytes=10)
    assert box.add(1, 1, [b"a" * 6], "push") == []
    assert _flat(box.add(1, 2, [b"b" * 6], "push")) == [(1, ["push", "push"])]


def test_answers_never_count_below_zero_and_are_forgotten_when_nothing_is_pending():
    box = Outbox(hold_at=1)
    box.add(1, 1, [b"a"], "push")
    box.answered(1, 5)
    assert box.in_flight[1] == 0
    box.add(1, 2, [b"a"], "push")
    box.forget_in_flight()  # e.g. the server died with it: new requests must not wait for it
    assert _flat(box.add(1, 3, [b"b"], "push")) == [(1, ["push"])]


def test_what_waits_through_a_whole_tick_without_an_outbox_emptied_is_stale():
    box = Outbox(hold_at=0)
    takes = box.takes
    assert not box.stale(takes)  # nothing waits
    box.add(1, 1, [b"a"], "push")
    assert box.stale(takes)
    box.take_all()
    box.add(1, 2, [b"b"], "push")
    assert not box.stale(takes)  # an outbox was emptied meanwhile: b is younger than the tick
    assert box.stale(box.takes)


def test_coalescing_from_two_unanswered_messages_in_batches_of_eight_by_default():
    """PSERVER_COALESCE 2 (the default): a message waits once two of the worker's messages to that
    server are unanswered - a push and the pull after it both leave at once - and at most 8 wait
    together (measured: docs/performance.md); 0 turns coalescing off."""
    import sys

    from pserver.config import Config

    assert Config().coalesce == 2
    box = Outbox(hold_at=Config().coalesce)
    assert box.add(1, 0, [b"a"], "push") == [(1, [b"a"], ["push"])]
    assert box.add(1, 1, [b"b"], "pull") == [(1, [b"b"], ["pull"])]
    for ts in range(2, 9):
        assert box.add(1, ts, [b"x"], "push") == []
    (sid, frames, ops), = box.add(1, 9, [b"y"], "push")  # the eighth waiting: the batch leaves
    assert sid == 1 and len(ops) == 8 and frames[-1] == b"y"
    off = Outbox(hold_at=Config(coalesce=0).coalesce or sys.maxsize)
    for ts in range(100):
        assert off.add(1, ts, [b"x"], "push") == [(1, [b"x"], ["push"])]
