"""A node's side of membership: registration with the scheduler, the heartbeat thread, the cached
cluster view, barriers and leaving.

Two sockets talk to the scheduler: a control DEALER used by the node's main thread (register, barrier,
status, leave) and a heartbeat DEALER owned by the heartbeat thread, so that heartbeats never stall
behind a long update or a blocking barrier.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

import zmq

from .. import logs
from ..config import Config
from ..errors import BarrierTimeoutError, PServerError, RemoteError, SchedulerUnreachableError
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
        self.control = transport.connect_dealer(self.sched_host, self.sched_port, "scheduler")
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
        """Send ``op`` on the control socket and wait for the reply ``expect`` with the same ts."""
        ts = next(self._ts)
        self.transport.send(self.control, Message(op, ts, meta=meta))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.control.poll(left * 1000):
                raise TimeoutError(op)
            _, msg, _ = self.transport.decode(self.control.recv_multipart(copy=False), routed=False)
            if msg.op == "error":
                raise RemoteError(f"scheduler refused {op}: {msg.meta.get('error')}")
            if msg.ts == ts and msg.op == expect:
                return msg

    def send_request(self, op: str, meta: dict) -> int:
        """Send ``op`` on the control socket without waiting; see :meth:`read_reply`."""
        ts = next(self._ts)
        self.transport.send(self.control, Message(op, ts, meta=meta))
        return ts

    def read_reply(self) -> Message | None:
        """A reply waiting on the control socket, or None (never blocks)."""
        if not self.control.poll(0):
            return None
        _, msg, _ = self.transport.decode(self.control.recv_multipart(copy=False), routed=False)
        return msg

    def register(self, requested_rank: int = -1) -> None:
        """Register and block until the scheduler admits this node into a started cluster."""
        meta = {"role": self.role, "host": self.host, "port": self.port, "pid": os.getpid(),
                "rank": requested_rank}
        timeout = self.cfg.connect_timeout
        ts = next(self._ts)
        where = f"{self.sched_host}:{self.sched_port}"
        unreachable = (f"no answer from the scheduler at {where} within {timeout:g} s: is it running "
                       f"and reachable from here, and does this node have the cluster's keys? "
                       f"(PSERVER_SCHEDULER, PSERVER_KEYS, PSERVER_CONNECT_TIMEOUT)")
        try:
            self.transport.send(self.control, Message("register", ts, meta=meta))
        except zmq.Again:  # no connection could be made (see Transport.connect_dealer)
            raise SchedulerUnreachableError(unreachable) from None
        deadline = time.monotonic() + timeout
        acknowledged = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.control.poll(left * 1000):
                if not acknowledged:
                    raise SchedulerUnreachableError(unreachable)
                raise SchedulerUnreachableError(
                    f"the scheduler at {where} accepted this {self.role} but the cluster did not "
                    f"start within {timeout:g} s: fewer servers/workers came than it waits for "
                    f"(PSERVER_NUM_SERVERS, PSERVER_NUM_WORKERS)")
            _, msg, _ = self.transport.decode(self.control.recv_multipart(copy=False), routed=False)
            if msg.op == "error":
                raise RemoteError(f"the scheduler refused registration: {msg.meta.get('error')}")
            if msg.op == "registered":
                acknowledged = True
                deadline = time.monotonic() + timeout  # now wait for the rest of the cluster
            elif msg.op == "welcome":
                self.node_id = int(msg.meta["id"])
                self.rank = int(msg.meta["rank"])
                logs.set_node(self.role, self.rank)
                self._set_view(msg.meta["view"])
                break
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="pserver-heartbeat",
                                           daemon=True)
        self._hb_thread.start()

    def barrier(self, name: str = "", group: str = "worker", timeout: float | None = None) -> None:
        timeout = self.cfg.barrier_timeout if timeout is None else timeout
        try:
            self.request("barrier", {"id": self.node_id, "name": name, "group": group},
                         timeout, "barrier_done")
        except TimeoutError:
            alive = [n.rank for n in self.view.role_nodes(group)]
            raise BarrierTimeoutError(
                f"barrier {name!r} of the {group}s did not complete within {timeout:g} s "
                f"(live {group} ranks: {alive}); a {group} may be stuck or slow - raise "
                f"PSERVER_BARRIER_TIMEOUT if that is expected") from None

    def status(self, timeout: float = 5.0) -> dict:
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
        sock = self.transport.connect_dealer(self.sched_host, self.sched_port, "scheduler")
        interval = self.cfg.heartbeat_interval
        lost_after = max(3.0, 10 * self.cfg.heartbeat_timeout)
        last_reply = time.monotonic()
        next_beat = next_report = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    meta = {"id": self.node_id, "v": self.view.version, **self.report}
                    if self.traffic is not None and now >= next_report:
                        meta["traffic"] = self.traffic()
                        next_report = now + 1.0
                    try:
                        self.transport.send(sock, Message("heartbeat", meta=meta))
                    except zmq.Again:  # no connection to the scheduler: judged by lost_after
                        pass
                    next_beat = now + interval
                if sock.poll(max(0.0, next_beat - time.monotonic()) * 1000):
                    for msg in self.transport.drain(sock, "the scheduler (heartbeat reply)"):
                        last_reply = time.monotonic()
                        self._on_heartbeat_reply(msg)
                elif time.monotonic() - last_reply > lost_after and not self.scheduler_lost.is_set():
                    log.error("lost the scheduler: no heartbeat reply for %.1f s", lost_after)
                    self.scheduler_lost.set()
        finally:
            sock.close(linger=0)

    def _on_heartbeat_reply(self, msg: Message) -> None:
        if msg.op != "hb":
            return
        if "view" in msg.meta:
            self._set_view(msg.meta["view"])
        if msg.meta.get("shutdown"):
            self.shutdown_requested.set()
        if msg.meta.get("dead"):
            self.declared_dead.set()

    def close(self) -> None:
        self._stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
