"""What a server's copy of a key range reflects (no I/O): a range vector clock per table, advanced by
every applied push, read by "as of" pulls and pulls that ask for the clock, and carried with copies
of key ranges (re-replication, migration pre-copies, re-copies after a failed replica apply)."""

from __future__ import annotations

from ..consistency.clock import KEY_SPACE_END, NEVER, RangeClock
from ..errors import ProtocolError, PServerError
from ..protocol import CLOCK
from .keys import KeySet
from .rounds import SyncRounds


class AppliedClocks:
    """Range clocks of the tables of one server; ``rounds``: its open synchronous rounds (a push
    waiting in one is not applied yet, though its clock advanced when it arrived)."""

    def __init__(self, rounds: SyncRounds) -> None:
        self.clocks: dict[str, RangeClock] = {}
        self.rounds = rounds

    def record(self, table: str, sender: int, keys: KeySet, ts: int, span=None) -> None:
        """Advance ``sender``'s clock over the request's key span, or over the range it declares
        (meta "span": keys of the range missing from a message get its timestamp too). Raises
        ProtocolError for a span that is not a range holding every key (nothing changes then)."""
        lo_hi = declared_span(span, keys) if span is not None else None
        if lo_hi is None and keys.n:
            lo_hi = keys.span()
        if lo_hi is not None:
            clock = self.clocks.get(table)
            if clock is None:
                clock = self.clocks[table] = RangeClock()
            clock.advance(sender, lo_hi[0], lo_hi[1], ts)

    def applied_time(self, table: str, node: int, lo: int, hi: int) -> int:
        """Newest t such that [lo, hi) reflects every push of ``node`` stamped <= t (NEVER: none)."""
        clock = self.clocks.get(table)
        t = clock.time(node, lo, hi) if clock is not None else NEVER
        pending = self.rounds.pending_ts(table, node)
        return t if pending is None else min(t, pending - 1)

    def behind(self, table: str, keys: KeySet, as_of, alive) -> bool:
        """True if, for a listed node still ``alive(node)``, ``keys`` do not yet reflect its
        pushes up to the time ``as_of`` ({node: t}) names. Raises ProtocolError if malformed."""
        try:
            wanted = [(int(n), int(t)) for n, t in as_of.items()]
        except (AttributeError, TypeError, ValueError):
            raise ProtocolError("as_of must map worker node ids to integer timestamps") from None
        if not keys.n:
            return False
        lo, hi = keys.span()
        return any(alive(node) and self.applied_time(table, node, lo, hi) < t for node, t in wanted)

    def meta(self, table: str, keys: KeySet) -> dict:
        """{"vc": {node: applied time over the keys' span}} for every node that pushed ``table``."""
        lo, hi = keys.span()
        clock = self.clocks.get(table)
        nodes = set(clock.nodes()) if clock is not None else set()
        nodes.update(self.rounds.senders(table))
        return {CLOCK: {str(n): self.applied_time(table, n, lo, hi) for n in sorted(nodes)}}

    def copy_json(self, table: str, lo: int, hi: int) -> dict | None:
        """The clock of [lo, hi) of ``table``, to travel with a copy of its keys (None: none)."""
        clock = self.clocks.get(table)
        return clock.restrict(lo, hi).to_json() if clock is not None else None

    def merge_json(self, table: str, data) -> None:
        """Merge a clock that came with a copy of keys. Raises ProtocolError if malformed; the
        clocks are unchanged then."""
        try:
            other = RangeClock.from_json(data)
        except ProtocolError:
            raise
        except (PServerError, ValueError, TypeError, OverflowError) as e:  # RangeMap's own checks
            raise ProtocolError(f"a copied range clock is malformed: {e}") from None
        self.clocks.setdefault(table, RangeClock()).merge(other)


def declared_span(span, keys: KeySet) -> tuple[int, int]:
    """The key range [lo, hi) a push declares (meta "span"); ProtocolError unless it is a valid
    range holding every key of the message."""
    try:
        lo, hi = (int(x) for x in span)
    except (TypeError, ValueError):
        raise ProtocolError("a push's span must be [lo, hi] with integer bounds") from None
    if not 0 <= lo < hi <= KEY_SPACE_END:
        raise ProtocolError(f"a push's span [{lo}, {hi}) is not a key range")
    if keys.n:
        first, end = keys.span()
        if first < lo or end > hi:
            raise ProtocolError(f"a push's keys [{first}, {end}) leave its span [{lo}, {hi})")
    return lo, hi
