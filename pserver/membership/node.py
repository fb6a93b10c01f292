"""A node's side of membership: registration with the scheduler, the heartbeat thread, the cached
cluster view, barriers and leaving.

Two links talk to the scheduler: a control link used by the node's main thread (register, barrier,
status, leave) and a heartbeat link owned by the heartbeat thread, so that heartbeats never stall
behind a long update or a blocking barrier.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

from .. import logs
from ..config import Config
from ..errors import (
    BarrierTimeoutError,
    PServerError,
    RemoteError,
    SchedulerUnreachableError,
    WorkerDeclaredDeadError,
)
from ..link import Link, LinkError, LinkTimeout
from ..protocol import (
    DEAD,
    ERROR,
    GROUP,
    HOST,
    ID,
    PID,
    PORT,
    RANK,
    READ_ONLY,
    REJOIN,
    ROLE,
    SHUTDOWN,
    TRAFFIC,
    VIEW,
    VIEW_VERSION,
)
from ..transport import Transport
from ..wire import Message
from .view import ClusterView

log = logging.getLogger(__name__)


class Membership:
    """Registration, heartbeats and the cached :class:`ClusterView` of one server or worker."""

    def __init__(self, cfg: Config, transport: Transport, role: str, host: str, port: int):
        self.cfg = cfg
        self.transport = transport
        self.role = role
        self.host, self.port = host, port
        self.sched_host, self.sched_port = cfg.require_scheduler()
        self.control: Link = transport.dealer_link(self.sched_host, self.sched_port, "scheduler")
        self._ts = itertools.count(1)
        self._lock = threading.Lock()
        self._view = ClusterView()
        self.node_id = -1
        self.rank = -1
        self.shutdown_requested = threading.Event()
        self.scheduler_lost = threading.Event()
        self.declared_dead = threading.Event()
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._listeners: list[Callable[[ClusterView], None]] = []
        # views adopted after a rejoin: a request in flight then is sent again (a restarted
        # scheduler dropped it while it rebuilt the view)
        self.epoch = 0
        self._rejoined_at = 0.0   # monotonic time of the last rejoin sent (0: none pending)
        # the node's traffic counters (a dict; must not raise), sent on a heartbeat every second
        self.traffic: Callable[[], dict] | None = None
        # small facts the node reports on every heartbeat (a server: the ring it finished re-replicating)
        self.report: dict[str, int] = {}

    # -- view ---------------------------------------------------------------------------------
    @property
    def view(self) -> ClusterView:
        with self._lock:
            return self._view

    def on_view_change(self, fn: Callable[[ClusterView], None]) -> None:
        self._listeners.append(fn)

    def _set_view(self, d: dict) -> None:
        view = ClusterView.from_json(d)
        with self._lock:
            if view.version <= self._view.version:
                return
            old, self._view = self._view, view
        for node in view.nodes.values():
            before = old.nodes.get(node.id)
            if before is not None and before.alive and not node.alive:
                (log.error if node.state == "dead" else log.info)(
                    "%s %d (rank %d) is %s", node.role, node.id, node.rank, node.state)
        for fn in self._listeners:
            fn(view)

    # -- control requests ----------------------------------------------------------------------
    def request(self, op: str, meta: dict, timeout: float, expect: str) -> Message:
        """Send ``op`` on the control link and wait for the reply ``expect`` with the same ts
        (other replies are dropped).

        Raises: TimeoutError if no such reply came within ``timeout`` seconds (the scheduler may
        or may not have acted on it); RemoteError if the scheduler refused; ProtocolError for a
        malformed reply; LinkTimeout if no connection to the scheduler could be made."""
        ts, epoch = self.send_request(op, meta), self.epoch
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next_reply(min(deadline, time.monotonic() + 0.25))
            if msg is None:
                if time.monotonic() >= deadline:
                    raise TimeoutError(op)
                if self.epoch != epoch:  # the scheduler was replaced: ask the new one
                    ts, epoch = self.send_request(op, meta), self.epoch
                continue
            if msg.op == "error":
                raise RemoteError(f"scheduler refused {op}: {msg.meta.get(ERROR)}")
            if msg.ts == ts and msg.op == expect:
                return msg

    def send_request(self, op: str, meta: dict) -> int:
        """Send ``op`` on the control link without waiting (see :meth:`read_reply`); returns its
        ts. Raises LinkTimeout if no connection to the scheduler could be made (nothing sent)."""
        ts = next(self._ts)
        self.control.send(Message(op, ts, meta=meta))
        return ts

    def read_reply(self) -> Message | None:
        """A reply waiting on the control link, or None (never blocks). Raises ProtocolError for
        a malformed one (it is consumed)."""
        item = self.control.recv()
        return None if item is None else self.transport.decode_body(item[1])[0]

    def _next_reply(self, deadline: float) -> Message | None:
        """The next reply on the control link, waiting until ``deadline`` (monotonic); None then."""
        while True:
            msg = self.read_reply()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0 or not self.control.poll(left):
                return None

    def register(self, requested_rank: int = -1) -> None:
        """Register and block until the scheduler admits this node into a started cluster, then
        start the heartbeat thread.

        Raises: SchedulerUnreachableError if the scheduler did not answer, or the cluster did not
        start, within the connect timeout; RemoteError if the scheduler refused. The node is not
        a member then (node_id stays -1)."""
        meta = {ROLE: self.role, HOST: self.host, PORT: self.port, PID: os.getpid(),
                RANK: requested_rank}
        if self.role == "worker":
            meta[GROUP] = self.cfg.group
            if self.cfg.read_only:
                meta[READ_ONLY] = True
        timeout = self.cfg.connect_timeout
        where = f"{self.sched_host}:{self.sched_port}"
        unreachable = (f"no answer from the scheduler at {where} within {timeout:g} s: is it running "
                       f"and reachable from here, and does this node have the cluster's keys? "
                       f"(PSERVER_SCHEDULER, PSERVER_KEYS, PSERVER_CONNECT_TIMEOUT)")
        try:
            self.send_request("register", meta)
        except LinkError:  # no connection could be made (see Transport.dealer_link)
            raise SchedulerUnreachableError(unreachable) from None
        deadline = time.monotonic() + timeout
        acknowledged = False
        while True:
            msg = self._next_reply(deadline)
            if msg is None:
                if not acknowledged:
                    raise SchedulerUnreachableError(unreachable)
                raise SchedulerUnreachableError(
                    f"the scheduler at {where} accepted this {self.role} but the cluster did not "
                    f"start within {timeout:g} s: fewer servers/workers came than it waits for "
                    f"(PSERVER_NUM_SERVERS, PSERVER_NUM_WORKERS)")
            if msg.op == "error":
                raise RemoteError(f"the scheduler refused registration: {msg.meta.get(ERROR)}")
            if msg.op == "registered":
                acknowledged = True
                deadline = time.monotonic() + timeout  # now wait for the rest of the cluster
            elif msg.op == "welcome":
                self.node_id = int(msg.meta[ID])
                self.rank = int(msg.meta[RANK])
                logs.set_node(self.role, self.rank)
                self._set_view(msg.meta[VIEW])
                break
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="pserver-heartbeat",
                                           daemon=True)
        self._hb_thread.start()

    def barrier(self, name: str = "", group: str = "worker", timeout: float | None = None) -> None:
        """Block until every live node of ``group`` ("worker", "server" or "all") reached the
        barrier ``name``.

        Raises: BarrierTimeoutError after ``timeout`` seconds (default: the config's barrier
        timeout; this node still counts as arrived at the scheduler); WorkerDeclaredDeadError if
        the scheduler declared this node dead (the live members go on without it); RemoteError if
        the scheduler refused (e.g. an unknown group)."""
        if self.declared_dead.is_set():
            raise WorkerDeclaredDeadError(
                f"the scheduler declared this {self.role} dead (missed heartbeats) and the cluster "
                f"goes on without it: restart it (it joins as a new node); on a loaded machine or "
                f"a lossy network raise PSERVER_HEARTBEAT_TIMEOUT")
        timeout = self.cfg.barrier_timeout if timeout is None else timeout
        try:
            done = self.request("barrier", {"id": self.node_id, "name": name, "group": group},
                                timeout, "barrier_done")
        except TimeoutError:
            mine = group == "worker" and self.role == "worker"  # its own worker group's barrier
            nodes = self.view.group_nodes(self.cfg.group) if mine else self.view.role_nodes(group)
            whose = f"{group}s of group {self.cfg.group!r}" if mine else f"{group}s"
            raise BarrierTimeoutError(
                f"barrier {name!r} of the {whose} did not complete within {timeout:g} s "
                f"(live ranks: {[n.rank for n in nodes]}); a {group} may be stuck or slow - "
                f"raise PSERVER_BARRIER_TIMEOUT if that is expected") from None
        if isinstance(done.meta.get(VIEW), dict):  # at least the members the barrier counted
            self._set_view(done.meta[VIEW])

    def status(self, timeout: float = 5.0) -> dict:
        """The scheduler's status report. Raises SchedulerUnreachableError without an answer
        within ``timeout`` seconds."""
        try:
            return self.request("status", {}, timeout, "status").meta
        except TimeoutError:
            raise SchedulerUnreachableError("the scheduler did not answer a status request") from None

    def leave(self) -> None:
        """Tell the scheduler this node is leaving on purpose (not a failure). Best effort."""
        if self.node_id < 0 or self.scheduler_lost.is_set():
            return
        try:
            self.request("leave", {"id": self.node_id}, 2.0, "ok")
        except (TimeoutError, PServerError):
            log.debug("leave was not acknowledged")

    # -- heartbeats ----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        link = self.transport.dealer_link(self.sched_host, self.sched_port, "scheduler")
        interval = self.cfg.heartbeat_interval
        # without the scheduler the node serves on with its last view (data-plane traffic does
        # not need it) and keeps beating; it gives up only after the grace period
        lost_after = self.cfg.scheduler_grace
        last_reply = time.monotonic()
        next_beat = next_report = 0.0
        warned = False
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    meta = {ID: self.node_id, VIEW_VERSION: self.view.version, **self.report}
                    if self.traffic is not None and now >= next_report:
                        meta[TRAFFIC] = self.traffic()
                        next_report = now + 1.0
                    try:
                        link.send(Message("heartbeat", meta=meta))
                    except LinkTimeout:  # no connection to the scheduler: judged by lost_after
                        pass
                    next_beat = now + interval
                if link.poll(max(0.0, next_beat - time.monotonic())):
                    for msg in self.transport.messages(link, "the scheduler (heartbeat reply)"):
                        last_reply = time.monotonic()
                        self._on_heartbeat_reply(msg, link)
                else:
                    silent = time.monotonic() - last_reply
                    if silent > lost_after and not self.scheduler_lost.is_set():
                        log.error("lost the scheduler: no heartbeat reply for %.1f s "
                                  "(PSERVER_SCHEDULER_GRACE)", lost_after)
                        self.scheduler_lost.set()
                    elif silent > 10 * self.cfg.heartbeat_timeout and not warned:
                        log.warning("no heartbeat reply from the scheduler for %.1f s: serving "
                                    "on with view v%d, still trying", silent, self.view.version)
                        warned = True
                if time.monotonic() - last_reply < interval * 2:
                    warned = False
        finally:
            link.close()

    def _on_heartbeat_reply(self, msg: Message, link: Link) -> None:
        if msg.op != "hb":
            return
        if msg.meta.get(REJOIN):
            self._rejoin(link)
            return
        if VIEW in msg.meta:
            before = self.view.version
            self._set_view(msg.meta[VIEW])
            if self._rejoined_at and self.view.version > before:
                self._rejoined_at = 0.0
                self.epoch += 1
        if msg.meta.get(SHUTDOWN):
            self.shutdown_requested.set()
        if msg.meta.get(DEAD):
            self.declared_dead.set()

    def _rejoin(self, link: Link) -> None:
        """The scheduler does not know this node (it was restarted with ``--recover``): tell it
        who this node is and the view it holds, at most twice a second."""
        now = time.monotonic()
        if now - self._rejoined_at < 0.5:
            return
        self._rejoined_at = now
        group = self.cfg.group if self.role == "worker" else "default"
        log.warning("the scheduler does not know this %s: rejoining with view v%d", self.role,
                    self.view.version)
        meta = {ID: self.node_id, ROLE: self.role, RANK: self.rank, HOST: self.host,
                PORT: self.port, PID: os.getpid(), GROUP: group, VIEW: self.view.to_json()}
        try:
            link.send(Message("rejoin", meta=meta))
        except LinkTimeout:
            self._rejoined_at = 0.0

    def close(self) -> None:
        self._stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
