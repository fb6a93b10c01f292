"""The scheduler's side of a checkpoint: one round at a time, driven by the scheduler's single loop.

A round: create ``DIR/<name>.partial`` (:func:`checkpoint.begin`), send every live server of the key
ring ``checkpoint_write`` over a link to its ROUTER, collect the shard reports, then
:func:`checkpoint.commit`. A server that dies or refuses, a change of the ring's servers or the
timeout aborts the round: the ``.partial`` directory stays (collected after the next commit) and
LATEST keeps naming the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..link import Link, Poller
from ..protocol import DIR, ERROR, KIND, RING, SERVER
from ..ring import KeyRing
from ..wire import Message
from .checkpoint import begin, commit, latest, read_manifest, resolve

if TYPE_CHECKING:
    from ..membership.view import ClusterView
    from ..transport import Transport

log = logging.getLogger(__name__)


@dataclass
class _Round:
    ts: int
    directory: str
    name: str
    ring: KeyRing
    servers: list[dict]
    waiting: set[int]
    started: float
    requesters: list[tuple[bytes, int]] = field(default_factory=list)
    reports: dict[int, dict] = field(default_factory=dict)


class CheckpointCoordinator:
    """Checkpoint rounds, driven by the scheduler's loop: :meth:`request` on the "checkpoint" op,
    :meth:`tick` on every turn of the loop (reads the servers' replies, aborts on a dead server,
    starts periodic checkpoints). One round at a time; a request during a round joins it.

    directory: default DIR of checkpoints (None: each request must name one).
    every: seconds between periodic checkpoints (0 = on demand only). keep: complete checkpoints
    kept (older ones and stale ``.partial`` directories are deleted after each commit).
    timeout: seconds a round may take before it is aborted.
    """

    def __init__(self, transport: Transport, view: Callable[[], ClusterView],
                 reply: Callable[[bytes, Message], None], next_id: Callable[[], int], *,
                 directory: str | None = None, every: float = 0.0, keep: int = 3,
                 timeout: float = 3600.0) -> None:
        self.transport, self.view, self.reply, self.next_id = transport, view, reply, next_id
        self.directory = os.path.abspath(directory) if directory else None
        self.every, self.keep, self.timeout = every, keep, timeout
        self.round: _Round | None = None
        self.last: dict | None = None            # summary of the last committed checkpoint
        self._next_due = time.monotonic() + every if every > 0 else float("inf")
        self._ts = 0
        self._start_error = ""
        self._links: dict[int, Link] = {}  # server id -> link to its ROUTER, kept across rounds
        self._poller = Poller()

    def prepare_restore(self, directory: str, view: ClusterView) -> int:
        """Validate the latest checkpoint of DIR (or the one named by DIR/ckpt-NNNNNN) and put it in
        ``view.settings["restore"]`` (the scheduler adds the starting servers' ids); returns the first
        node id the restored cluster may use. Raises CheckpointError (the scheduler should not
        start) if it is unusable."""
        directory, name = resolve(directory)
        m = read_manifest(directory, name)
        view.settings["restore"] = {"dir": directory, "name": m["name"], "servers": []}
        self.directory = self.directory or directory
        log.warning("restoring checkpoint %s of %s (%s keys, %d tables, written %s by %d servers)",
                    m["name"], directory, m.get("keys"), len(m["tables"]), m.get("time_utc"),
                    len(m["shards"]))
        return int(m["next_id"])

    # -- requests ----------------------------------------------------------------------------
    def request(self, identity: bytes, msg: Message) -> None:
        """The "checkpoint" op (meta "dir" optional): start a round, or join the running one; the
        reply ("checkpoint_done" with a summary, or "error") is sent when the round ends."""
        directory = msg.meta.get(DIR) or self.directory
        if not directory:
            self.reply(identity, Message("error", msg.ts, meta={
                ERROR: "no checkpoint directory: start the scheduler with --checkpoint-dir DIR "
                       "or pass --dir DIR", KIND: "CheckpointError"}))
            return
        directory = os.path.abspath(str(directory))
        if self.round is not None and self.round.directory != directory:
            self.reply(identity, Message("error", msg.ts, meta={
                ERROR: f"a checkpoint to {self.round.directory} is in progress; retry when it is "
                       f"done", KIND: "CheckpointError"}))
            return
        if self.round is None:
            self._start(directory)
        if self.round is not None:
            self.round.requesters.append((identity, msg.ts))
        else:
            self.reply(identity, Message("error", msg.ts, meta={
                ERROR: self._start_error, KIND: "CheckpointError"}))

    def _start(self, directory: str) -> None:
        self._start_error = ""
        view = self.view()
        servers = view.role_nodes("server")
        for sid in [s for s in self._links if not view.alive(s)]:
            self._drop_link(sid)
        if view.ring is None or not servers:
            self._start_error = "the cluster has not started: no servers to checkpoint yet"
            return
        dead = sorted(set(view.ring.servers) - {n.id for n in servers})
        if dead:  # their keys would be missing: wait for failover to move their ranges
            self._start_error = (f"server(s) {dead} of the key ring are down (failover in progress, "
                                 f"or their data is lost): not checkpointing an incomplete state")
            log.error("%s", self._start_error)
            return
        try:
            name, partial = begin(directory)
        except OSError as e:
            self._start_error = f"cannot create a checkpoint in {directory}: {e}"
            log.error("%s", self._start_error)
            return
        self._ts += 1
        ring = KeyRing.from_json(view.ring.to_json())
        self.round = _Round(self._ts, directory, name, ring,
                            [{"id": n.id, "rank": n.rank, "host": n.host, "port": n.port}
                             for n in servers], {n.id for n in servers}, time.monotonic())
        meta = {DIR: partial, RING: ring.to_json()}
        for node in servers:
            link = self._links.get(node.id)
            if link is None:
                link = self.transport.dealer_link(node.host, node.port, "server")
                self._links[node.id] = link
                self._poller.register(link)
            link.send(Message("checkpoint_write", self._ts, meta=meta))
        log.info("checkpoint %s started: %d servers writing to %s", name, len(servers), partial)

    # -- progress ----------------------------------------------------------------------------
    def tick(self, active: bool = True) -> None:
        """Read replies, commit or abort the running round, start a periodic one when due
        (only while ``active``: the cluster started and is not shutting down)."""
        if self.round is not None:
            self._read_replies()
        if self.round is not None:
            self._check_round()
        now = time.monotonic()
        if self.every > 0 and now >= self._next_due:
            self._next_due = now + self.every
            if active and self.round is None and self.directory:
                self._start(self.directory)

    def _read_replies(self) -> None:
        for link in self._poller.poll(0):
            sid = next((s for s, k in self._links.items() if k is link), -1)
            for msg in self.transport.messages(link, f"server {sid}"):
                rnd = self.round
                if rnd is None or msg.ts != rnd.ts or sid not in rnd.waiting:
                    continue  # a late reply of an aborted round
                if msg.op == "error":
                    self._abort(f"server {sid} could not write its shard: {msg.meta.get(ERROR)}")
                    return
                try:
                    rep = msg.meta
                    if int(rep[SERVER]) != sid:
                        raise ValueError(f"report of server {rep[SERVER]}")
                    rnd.reports[sid] = rep
                    rnd.waiting.discard(sid)
                except (KeyError, TypeError, ValueError) as e:
                    self._abort(f"server {sid} sent a malformed shard report: {e}")
                    return

    def _check_round(self) -> None:
        rnd = self.round
        assert rnd is not None
        view = self.view()
        dead = sorted(sid for sid in rnd.waiting if not view.alive(sid))
        if dead:
            self._abort(f"server(s) {dead} died while writing their shards")
            for sid in dead:
                self._drop_link(sid)
        elif view.ring is None or sorted(view.ring.servers) != sorted(rnd.ring.servers):
            self._abort("the key ring changed during the checkpoint")
        elif time.monotonic() - rnd.started > self.timeout:
            self._abort(f"servers {sorted(rnd.waiting)} did not finish within {self.timeout:g} s")
        elif not rnd.waiting:
            self._commit()

    def _commit(self) -> None:
        rnd = self.round
        assert rnd is not None
        try:
            m = commit(rnd.directory, rnd.name, list(rnd.reports.values()), rnd.ring,
                       servers=rnd.servers, next_id=self.next_id(), keep=self.keep)
        except (CheckpointError, OSError) as e:
            self._abort(f"commit failed: {e}")
            return
        seconds = time.monotonic() - rnd.started
        self.last = {"name": rnd.name, "dir": rnd.directory, "path": os.path.join(rnd.directory,
                     rnd.name), "servers": len(rnd.reports), "keys": m["keys"], "bytes": m["bytes"],
                     "tables": sorted(m["tables"]), "seconds": round(seconds, 3), "time": m["time"]}
        log.warning("checkpoint %s written: %d keys, %d bytes from %d servers in %.2f s",
                    rnd.name, m["keys"], m["bytes"], len(rnd.reports), seconds)
        self.round = None
        for ident, ts in rnd.requesters:
            self.reply(ident, Message("checkpoint_done", ts, meta=self.last))

    def _abort(self, why: str) -> None:
        rnd = self.round
        assert rnd is not None
        self.round = None
        before = latest(rnd.directory) if os.path.isdir(rnd.directory) else None
        text = (f"checkpoint {rnd.name} aborted: {why}; the last complete checkpoint is still "
                f"{before or '(none)'} in {rnd.directory}")
        log.error("%s", text)
        for ident, ts in rnd.requesters:
            self.reply(ident, Message("error", ts, meta={ERROR: text, KIND: "CheckpointError"}))

    def _drop_link(self, sid: int) -> None:
        link = self._links.pop(sid, None)
        if link is not None:
            self._poller.unregister(link)
            link.close()

    def status(self) -> dict[str, Any]:
        """For the scheduler's status: the directory, the running round and the last checkpoint."""
        return {"dir": self.directory, "every": self.every, "last": self.last,
                "running": self.round.name if self.round else None}
