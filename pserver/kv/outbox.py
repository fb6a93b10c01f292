"""Request coalescing on the worker (no I/O): which messages go out now, which wait to leave together.

A message to a server that already has ``hold_at`` unanswered messages of this worker waits in that
server's outbox; the worker sends the outbox as ONE batch message when a reply arrives, when a
request in it is waited for, or when it is full. Per-server FIFO order is kept: once something
waits, everything after it waits too. Why and how much it saves: docs/performance.md.
"""

from __future__ import annotations

HOLD_AT = 1            # unanswered messages to a server before new ones wait to be coalesced
MAX_BATCH = 8          # messages per batch at most: two or more batches in flight keep both ends busy
FLUSH_AFTER = 0.002    # s: what waits longer than one to two of these leaves without a reply
MAX_BATCH_BYTES = 1 << 20
BATCHABLE_BYTES = 64 * 1024  # only single-frame messages up to this size are coalesced


class Outbox:
    """Per-server outboxes and counts of unanswered messages. Not thread-safe (the KVWorker's lock).

    :meth:`add` and :meth:`take_all` return the sends to make now, in order, as
    ``(server id, frames, ops)``: one op = one message of those frames; several ops = a batch of
    as many single-frame messages.
    """

    __slots__ = ("held", "hold_at", "in_flight", "max_batch", "max_bytes", "oldest_ts", "takes")

    def __init__(self, hold_at: int = HOLD_AT, max_batch: int = MAX_BATCH,
                 max_bytes: int = MAX_BATCH_BYTES):
        self.hold_at, self.max_batch, self.max_bytes = hold_at, max_batch, max_bytes
        self.in_flight: dict[int, int] = {}
        # server -> [frames, ops, bytes]: the messages waiting for it
        self.held: dict[int, list] = {}
        self.oldest_ts: int | None = None  # smallest request timestamp held anywhere
        self.takes = 0  # outboxes emptied so far: unchanged over a while = something waits too long

    def add(self, sid: int, ts: int, frames: list, op: str) -> list[tuple[int, list, list[str]]]:
        """Offer the message ``frames`` (of request ``ts``, op ``op``) for server ``sid``; returns
        what to send now (nothing if it waits)."""
        box = self.held.get(sid)
        small = len(frames) == 1 and len(frames[0]) <= BATCHABLE_BYTES
        if box is None:
            if not small or self.in_flight.get(sid, 0) < self.hold_at:
                self.in_flight[sid] = self.in_flight.get(sid, 0) + 1
                return [(sid, frames, [op])]
            self.held[sid] = [[frames[0]], [op], len(frames[0])]
            if self.oldest_ts is None or ts < self.oldest_ts:
                self.oldest_ts = ts
            return []
        if not small:  # the waiting ones first, then this one alone
            self.in_flight[sid] = self.in_flight.get(sid, 0) + 1
            return [self._take(sid), (sid, frames, [op])]
        box[0].append(frames[0])
        box[1].append(op)
        box[2] += len(frames[0])
        if len(box[1]) >= self.max_batch or box[2] >= self.max_bytes:
            return [self._take(sid)]
        return []

    def holds(self, ts: int) -> bool:
        """Whether request ``ts`` may have a message waiting in an outbox."""
        return self.oldest_ts is not None and ts >= self.oldest_ts

    def take_all(self) -> list[tuple[int, list, list[str]]]:
        """Every outbox's messages, one send per server; nothing waits afterwards."""
        out = [self._take(sid) for sid in list(self.held)]
        self.oldest_ts = None
        return out

    def answered(self, sid: int, count: int = 1) -> None:
        """``count`` messages to ``sid`` were answered."""
        left = self.in_flight.get(sid, 0) - count
        self.in_flight[sid] = left if left > 0 else 0

    def forget_in_flight(self) -> None:
        """No request is pending: whatever was not answered never will be (a server died)."""
        self.in_flight.clear()

    def stale(self, takes: int) -> bool:
        """Whether messages wait and no outbox was emptied since :attr:`takes` was ``takes``."""
        return bool(self.held) and self.takes == takes

    def _take(self, sid: int) -> tuple[int, list, list[str]]:
        self.takes += 1
        frames, ops, _ = self.held.pop(sid)
        if not self.held:
            self.oldest_ts = None
        self.in_flight[sid] = self.in_flight.get(sid, 0) + len(ops)
        return sid, frames, ops
