"""Workers' acknowledgements in progress on a server (no I/O). A push is acknowledged once it is
applied here and, with replication, once every replica has it (the Replicator counts replica acks:
here it is one flag). Acks due are collected per worker, to leave as one message per burst."""

from __future__ import annotations

import numpy as np

from ..protocol import ACK_LIST, PART
from ..store.apply import apply_pull
from ..wire import Message


class _Ack:
    __slots__ = ("local", "replicas")

    def __init__(self, replicas: bool) -> None:
        self.local = False
        self.replicas = replicas


class AckBook:
    """Tokens are (worker identity, request ts, part id or None). ``out``: the server's outgoing
    replies, where a push_pull's values go instead of an ack."""

    __slots__ = ("pending", "reads", "due", "out")

    def __init__(self, out: list) -> None:
        self.pending: dict[tuple, _Ack] = {}
        # push_pull token -> (table, keys) to read, or the values read once the update applied
        self.reads: dict[tuple, tuple | np.ndarray] = {}
        self.due: dict[bytes, list] = {}
        self.out = out

    def expect(self, token: tuple, replicas: bool) -> None:
        """Hold ``token``'s ack until :meth:`local_done` (and :meth:`replicated` if ``replicas``)."""
        self.pending[token] = _Ack(replicas)

    def wait_replicas(self, token: tuple) -> None:
        ack = self.pending.get(token)
        if ack is not None:
            ack.replicas = True

    def local_done(self, token: tuple) -> None:
        """The update of ``token`` is applied here (a push_pull reads its keys now)."""
        ack = self.pending.get(token)
        if ack is None:
            return
        ack.local = True
        read = self.reads.get(token)
        if type(read) is tuple:  # the values just after this update, as a pull would read them
            self.reads[token] = apply_pull(*read)
        if not ack.replicas:
            del self.pending[token]
            self.send(*token)

    def replicated(self, token: tuple) -> None:
        """Every replica has the update of ``token``."""
        ack = self.pending.get(token)
        if ack is None:
            return
        ack.replicas = False
        if ack.local:
            del self.pending[token]
            self.send(*token)

    def send(self, identity: bytes, ts: int, part) -> None:
        """Part ``part`` of push ``ts`` is acknowledged: queue its ack (a push_pull is answered
        with its keys' values instead, at once)."""
        if self.reads:
            read = self.reads.pop((identity, ts, part), None)
            if read is not None:
                vals = apply_pull(*read) if type(read) is tuple else read
                self.out.append((identity, Message("vals", ts, meta={PART: part} if part is not None
                                                   else None, arrays=[vals])))
                return
        batch = self.due.get(identity)
        if batch is None:
            self.due[identity] = [(ts, part)]
        else:
            batch.append((ts, part))

    def take(self) -> list[tuple[bytes, Message]]:
        """The acks due, one message per worker; none are due afterwards."""
        due, self.due = self.due, {}
        return [(identity, ack_message(*acks[0]) if len(acks) == 1
                 else Message("acks", 0, meta={ACK_LIST: acks})) for identity, acks in due.items()]


def ack_message(ts: int, part) -> Message:
    """The acknowledgement of part ``part`` (None: an unsplit request) of request ``ts``."""
    return Message("ack", ts, meta={PART: part} if part is not None else None)
