"""Live change of the key ring (a server joins or leaves gracefully), driven by the scheduler, in two
phases as in the paper: *prepare* (every server pre-copies the keys it masters to their holders under
the new ring - values, state, replication and range clocks - and forwards later updates to them too,
then answers ready) and *commit* (every server switches to the new ring at once). Requests are served
throughout; a server dying during a migration aborts it, and it is started again after the failover.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..link import Link, LinkError
from ..progress import bar
from ..protocol import KEY_COUNT, RING, RING_VERSION, SERVERS
from ..ring import KeyRing
from ..transport import Transport
from ..wire import Message

log = logging.getLogger(__name__)


@dataclass
class _Migration:
    ring: KeyRing
    reason: str
    waiting: set[int]
    started: float
    make_ring: Callable[[], KeyRing | None]
    done: Callable[[], None] | None = None


class MigrationCoordinator:
    """The scheduler's side: one migration at a time; ``tick()`` on every turn of its loop."""

    def __init__(self, transport: Transport, address: Callable[[int], tuple[str, int]],
                 alive: Callable[[int], bool], commit: Callable[[KeyRing], None],
                 timeout: float = 600.0):
        self.transport = transport
        self.address = address
        self.alive = alive
        self.commit_ring = commit
        self.timeout = timeout
        self.links: dict[int, Link] = {}  # server id -> link to it
        self.current: _Migration | None = None
        self.queue: list[tuple[Callable[[], KeyRing | None], str, Callable[[], None] | None]] = []
        self._ts = 0
        self.completed = 0
        self._shown = None  # the current migration's progress bar (servers pre-copied)

    def _link(self, sid: int) -> Link:
        link = self.links.get(sid)
        if link is None:
            host, port = self.address(sid)
            link = self.links[sid] = self.transport.dealer_link(host, port, "server")
        return link

    def _send(self, sid: int, op: str, meta: dict) -> None:
        try:
            self._link(sid).send(Message(op, self._ts, meta=meta))
        except LinkError as e:
            log.warning("cannot reach server %d for %s: %s", sid, op, e)

    def request(self, make_ring: Callable[[], KeyRing | None], reason: str,
                done: Callable[[], None] | None = None) -> None:
        """Queue a ring change; ``make_ring`` is called when it starts (so it sees the ring of the
        time), ``done`` after the commit."""
        self.queue.append((make_ring, reason, done))

    def busy(self) -> bool:
        return self.current is not None

    def tick(self, old_ring: KeyRing | None) -> None:
        if self.current is None:
            if self.queue and old_ring is not None:
                make_ring, reason, done = self.queue.pop(0)
                ring = make_ring()
                if ring is None or ring.servers_sorted() == old_ring.servers_sorted():
                    if done:
                        done()
                    return
                self._start(old_ring, ring, reason, make_ring, done)
            return
        self._read()
        m = self.current
        if m is None:
            return
        dead = [s for s in set(m.waiting) | set(m.ring.servers) if not self.alive(s)]
        if dead:
            self.abort(f"server(s) {dead} died during the migration")
            return
        if time.monotonic() - m.started > self.timeout:
            self.abort("the migration timed out")
            return
        if not m.waiting:
            self._commit()

    def _start(self, old: KeyRing, ring: KeyRing, reason: str, make_ring, done) -> None:
        self._ts += 1
        participants = sorted(s for s in set(old.servers) | set(ring.servers) if self.alive(s))
        self.current = _Migration(ring, reason, set(old.servers) & set(participants),
                                  time.monotonic(), make_ring, done)
        log.warning("migration to key ring v%d (%s): pre-copying to servers %s", ring.version,
                    reason, sorted(set(ring.servers) - set(old.servers)) or "-")
        self._shown = bar(len(self.current.waiting), f"migration to ring v{ring.version}", "server")
        # servers may not have the joiner in their view yet: tell them where everyone is
        where = {str(s): list(self.address(s)) for s in participants}
        for sid in participants:
            self._send(sid, "migrate_prepare", {RING: ring.to_json(), SERVERS: where,
                                                RING_VERSION: old.version})

    def _read(self) -> None:
        for sid, link in list(self.links.items()):
            for msg in self.transport.messages(link, f"server {sid}"):
                if self.current is not None and msg.ts == self._ts and msg.op == "migrate_ready":
                    if sid in self.current.waiting:
                        self._shown.update(1)
                    self.current.waiting.discard(sid)
                    log.info("server %d pre-copied %s keys", sid, msg.meta.get(KEY_COUNT, "?"))

    def _commit(self) -> None:
        m = self.current
        self.current = None
        self._shown.close()
        for sid in sorted(set(m.ring.servers) | set(self.links)):
            if self.alive(sid):
                self._send(sid, "migrate_commit", {RING: m.ring.to_json()})
        self.commit_ring(m.ring)
        self.completed += 1
        log.warning("key ring v%d committed (%s) after %.2f s", m.ring.version, m.reason,
                    time.monotonic() - m.started)
        if m.done is not None:
            m.done()

    def abort(self, why: str) -> None:
        m = self.current
        if m is None:
            return
        self.current = None
        self._shown.close()
        log.error("migration to ring v%d aborted: %s; it will be retried", m.ring.version, why)
        for sid in self.links:
            if self.alive(sid):
                self._send(sid, "migrate_abort", {})
        # retried with the servers of the time: make_ring recomputes the ring from the new view
        self.queue.insert(0, (m.make_ring, m.reason, m.done))

    def forget(self, sid: int) -> None:
        link = self.links.pop(sid, None)
        if link is not None:
            link.close()
