"""Synchronous aggregation rounds of a server (no I/O): the k-th push of every worker that pushes a
sync table is summed and applied once. A round waits for the live workers that DECLARED the table as
pushers here, from the round the declaration's reply named (docs/design.md, "Synchronous rounds")."""

from __future__ import annotations

import numpy as np

from ..errors import ProtocolError


class Round:
    """One round of a table: the parts pushed so far, who pushed them (worker -> (request ts, part
    id)) and the worker acks waiting for it (tokens; none for a replica's copy of a round)."""

    __slots__ = ("parts", "senders", "waiting")

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.senders: dict[int, tuple] = {}
        self.waiting: list[tuple] = []


class SyncRounds:
    """Open rounds per table, keyed by (round number, origin). Origin None: this server's own
    rounds; a server id: a replica's copy of that master's rounds, or parts resent after a failover."""

    def __init__(self) -> None:
        self.open: dict[str, dict[tuple, Round]] = {}
        self.done: dict[tuple, int] = {}                # (table, origin) -> last round applied
        self.pushers: dict[str, dict[int, int]] = {}    # table -> worker -> its first round here
        self._pushed: dict[str, set[int]] = {}          # table -> workers that pushed it here

    def next_round(self, table: str) -> int:
        """The first round of ``table`` that has not begun here."""
        last = self.done.get((table, None), -1)
        for rnd, origin in self.open.get(table, ()):
            if origin is None and rnd > last:
                last = rnd
        return last + 1

    def declare(self, table: str, worker: int, pushes: bool = True) -> int:
        """Worker ``worker`` declared ``table``: from the returned round on (the next one not begun
        here) every round waits for its push, unless ``pushes`` is False (it only reads)."""
        rnd = self.next_round(table)
        mine = self.pushers.setdefault(table, {})
        if not pushes:
            mine.pop(worker, None)
        elif worker not in mine:
            mine[worker] = rnd
        return rnd

    def is_done(self, table: str, origin: int | None, rnd: int) -> bool:
        return rnd <= self.done.get((table, origin), -1)

    def add(self, table: str, key: tuple, sender: int, stamp: tuple, keys: np.ndarray | None,
            vals: np.ndarray, resend: bool = False) -> Round:
        """Add ``sender``'s part to round ``key`` = (round, origin). Raises ProtocolError for a
        second push of one round by one sender (unless ``resend``: after a failover); nothing is
        added then. A declared pusher whose first push here is past the round it was told to
        start from is not waited for in the rounds it skipped."""
        r = self.open.setdefault(table, {}).setdefault(key, Round())
        if sender in r.senders and not resend:
            raise ProtocolError(f"duplicate push for round {key[0]} of table {table!r}")
        pushed = self._pushed.setdefault(table, set())
        if sender not in pushed:
            pushed.add(sender)
            declared = self.pushers.get(table)
            if declared is not None and declared.get(sender, key[0]) < key[0]:
                declared[sender] = key[0]
        r.senders[sender] = stamp
        if keys is not None:
            r.parts.append((keys, vals))
        return r

    def _complete(self, table: str, rnd: int, r: Round, live: set[int]) -> bool:
        declared = self.pushers.get(table)
        if not declared:  # nobody declared it here (older workers): every live worker pushes
            return live <= r.senders.keys()
        return all(w in r.senders for w, first in declared.items() if first <= rnd and w in live)

    def pop_ready(self, table: str, live: set[int]) -> list[tuple[tuple, Round]]:
        """The rounds of ``table`` that are now complete, removed and in order: per origin, an
        incomplete round blocks the later ones."""
        rounds = self.open.get(table)
        if not rounds:
            return []
        out = []
        for origin in {k[1] for k in rounds}:
            while True:
                mine = [k for k in rounds if k[1] == origin]
                if not mine:
                    break
                key = min(mine)
                if not self._complete(table, key[0], rounds[key], live):
                    break
                out.append((key, rounds.pop(key)))
                done = self.done.get((table, origin), -1)
                self.done[(table, origin)] = max(done, key[0])
        return out

    def tables(self) -> list[str]:
        return [name for name, rounds in self.open.items() if rounds]

    def pending_ts(self, table: str, node: int) -> int | None:
        """The oldest request timestamp of ``node`` waiting in an open round of ``table``."""
        out = None
        for r in self.open.get(table, {}).values():
            stamp = r.senders.get(node)
            if stamp is not None and (out is None or stamp[0] < out):
                out = stamp[0]
        return out

    def senders(self, table: str) -> set[int]:
        out: set[int] = set()
        for r in self.open.get(table, {}).values():
            out.update(r.senders)
        return out
