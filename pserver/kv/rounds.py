"""Synchronous aggregation rounds of a server (no I/O): the k-th push of every worker that pushes a
sync table is summed and applied once. A round waits for the live workers that DECLARED the table as
pushers here, from the round the declaration's reply named (docs/design.md, "Synchronous rounds").
Rounds are per (table, worker group): groups pushing one table count their rounds apart
(docs/groups.md)."""

from __future__ import annotations

import numpy as np

from ..errors import ProtocolError
from ..groups import DEFAULT


class Round:
    """One round of a table: the parts pushed so far, who pushed them (worker -> (request ts, part
    id)) and the worker acks waiting for it (tokens; none for a replica's copy of a round)."""

    __slots__ = ("parts", "senders", "waiting")

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.senders: dict[int, tuple] = {}
        self.waiting: list[tuple] = []


class SyncRounds:
    """Open rounds per scope (table, worker group), keyed by (round number, origin). Origin None:
    this server's own rounds; a server id: a replica's copy of that master's rounds, or parts
    resent after a failover. Every method's ``group`` is the pushing (declaring) worker's."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, str], dict[tuple, Round]] = {}
        self.done: dict[tuple, int] = {}       # ((table, group), origin) -> last round applied
        self.pushers: dict[tuple[str, str], dict[int, int]] = {}  # scope -> worker -> first round
        self._pushed: dict[tuple[str, str], set[int]] = {}  # scope -> workers that pushed here

    def next_round(self, table: str, group: str = DEFAULT) -> int:
        """The first round of ``table`` in ``group`` that has not begun here."""
        scope = (table, group)
        last = self.done.get((scope, None), -1)
        for rnd, origin in self.open.get(scope, ()):
            if origin is None and rnd > last:
                last = rnd
        return last + 1

    def declare(self, table: str, worker: int, pushes: bool = True, group: str = DEFAULT) -> int:
        """Worker ``worker`` of ``group`` declared ``table``: from the returned round on (the next
        one of its group not begun here) every round of the group waits for its push, unless
        ``pushes`` is False (it only reads)."""
        rnd = self.next_round(table, group)
        mine = self.pushers.setdefault((table, group), {})
        if not pushes:
            mine.pop(worker, None)
        elif worker not in mine:
            mine[worker] = rnd
        return rnd

    def is_done(self, table: str, origin: int | None, rnd: int, group: str = DEFAULT) -> bool:
        return rnd <= self.done.get(((table, group), origin), -1)

    def add(self, table: str, key: tuple, sender: int, stamp: tuple, keys: np.ndarray | None,
            vals: np.ndarray, resend: bool = False, group: str = DEFAULT) -> Round:
        """Add ``sender``'s part to round ``key`` = (round, origin). Raises ProtocolError for a
        second push of one round by one sender (unless ``resend``: after a failover); nothing is
        added then. A declared pusher whose first push here is past the round it was told to
        start from is not waited for in the rounds it skipped."""
        scope = (table, group)
        r = self.open.setdefault(scope, {}).setdefault(key, Round())
        if sender in r.senders and not resend:
            raise ProtocolError(f"duplicate push for round {key[0]} of table {table!r}")
        pushed = self._pushed.setdefault(scope, set())
        if sender not in pushed:
            pushed.add(sender)
            declared = self.pushers.get(scope)
            if declared is not None and declared.get(sender, key[0]) < key[0]:
                declared[sender] = key[0]
        r.senders[sender] = stamp
        if keys is not None:
            r.parts.append((keys, vals))
        return r

    def _complete(self, scope: tuple, rnd: int, r: Round, live: set[int]) -> bool:
        declared = self.pushers.get(scope)
        if not declared:  # nobody declared it here (older workers): every live member pushes
            return live <= r.senders.keys()
        return all(w in r.senders for w, first in declared.items() if first <= rnd and w in live)

    def pop_ready(self, table: str, live: set[int], group: str = DEFAULT
                  ) -> list[tuple[tuple, Round]]:
        """The rounds of ``table`` in ``group`` that are now complete, removed and in order: per
        origin, an incomplete round blocks the later ones. ``live``: the group's live workers."""
        scope = (table, group)
        rounds = self.open.get(scope)
        if not rounds:
            return []
        out = []
        for origin in {k[1] for k in rounds}:
            while True:
                mine = [k for k in rounds if k[1] == origin]
                if not mine:
                    break
                key = min(mine)
                if not self._complete(scope, key[0], rounds[key], live):
                    break
                out.append((key, rounds.pop(key)))
                done = self.done.get((scope, origin), -1)
                self.done[(scope, origin)] = max(done, key[0])
        return out

    def tables(self) -> list[tuple[str, str]]:
        """The (table, group) scopes with open rounds."""
        return [scope for scope, rounds in self.open.items() if rounds]

    def _open_rounds(self, table: str):
        for (name, _), rounds in self.open.items():
            if name == table:
                yield from rounds.values()

    def pending_ts(self, table: str, node: int) -> int | None:
        """The oldest request timestamp of ``node`` waiting in an open round of ``table``."""
        out = None
        for r in self._open_rounds(table):
            stamp = r.senders.get(node)
            if stamp is not None and (out is None or stamp[0] < out):
                out = stamp[0]
        return out

    def senders(self, table: str) -> set[int]:
        """Workers with a push waiting in an open round of ``table`` (any group)."""
        out: set[int] = set()
        for r in self._open_rounds(table):
            out.update(r.senders)
        return out
