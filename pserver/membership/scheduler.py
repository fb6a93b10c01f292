"""The scheduler: the paper's server manager (membership, liveness, key ring) plus the task scheduler of
the worker group (barriers, progress, shutdown). One single-threaded loop over one routed link,
dispatching each op to a handler; the decisions live apart from I/O in ``registration``,
``barrier``, ``liveness``, ``ring_keeper`` and ``tasks``."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable

from .. import groups, security
from ..config import Config, interface_address
from ..errors import AuthError, PServerError
from ..ft.checkpoint_round import CheckpointCoordinator
from ..ft.migration import MigrationCoordinator
from ..link import LinkError, Poller
from ..metrics import families as metric_families
from ..metrics import start_endpoint as start_metrics
from ..protocol import (
    DEAD,
    ERROR,
    GROUP,
    ID,
    KIND,
    NAME,
    RANK,
    REBUILT,
    REJOIN,
    REPLICA_APPLY_ERRORS,
    SHUTDOWN,
    TRAFFIC,
    VIEW,
    VIEW_VERSION,
)
from ..ring import KeyRing
from ..transport import Transport, node_token
from ..wire import Message
from .barrier import Barriers
from .liveness import Liveness
from .recovery import ViewRecovery
from .registration import Pending, Request, rank_for
from .ring_keeper import RingKeeper
from .tasks import TaskService
from .view import ClusterView, NodeInfo

log = logging.getLogger(__name__)

security.allow_op("drain", "server")
security.allow_op("rejoin", "server", "worker")

# what a recovering scheduler answers before its view is rebuilt (the rest is dropped: the nodes
# send it again once they have the recovered view)
_WHILE_RECOVERING = frozenset({"heartbeat", "rejoin", "status", "shutdown"})


class Scheduler:
    """Runs the cluster's control plane until shut down.

    exit_when_workers_done: shut the cluster down once every worker that joined has left (the normal
    end of a job); turn off for a long-lived cluster that workers come and go from.
    transport: the sockets to use (default: a new ZeroMQ Transport; ``pserver.testing`` has one in
    memory); the scheduler owns it and closes it when :meth:`run` ends.
    group_sizes: {group: N}: that group's barriers wait until N members joined (docs/groups.md).
    read_only_groups: groups whose members may only read (servers refuse their pushes).
    recover: this scheduler replaces one that died, on the same address: it rebuilds the view
    from the nodes' rejoins (``recovery.ViewRecovery``) instead of waiting for registrations.
    Raises ConfigError if it cannot bind or a group name is invalid, CheckpointError if
    ``restore`` is unusable.
    """

    def __init__(self, cfg: Config, credentials: security.Credentials | None = None,
                 exit_when_workers_done: bool = True, checkpoint_dir: str | None = None,
                 checkpoint_every: float = 0.0, checkpoint_keep: int = 3, restore: str | None = None,
                 transport: Transport | None = None, group_sizes: dict[str, int] | None = None,
                 read_only_groups: Iterable[str] = (), recover: bool = False):
        self.cfg = cfg
        read_only = sorted({groups.check_name(g) for g in read_only_groups})
        self.group_sizes = {groups.check_name(g): int(n) for g, n in (group_sizes or {}).items()}
        host, port = cfg.require_scheduler()
        self.transport = transport if transport is not None else \
            Transport(cfg, "scheduler", credentials)
        # a node's DEALER that reconnects keeps its secret identity (transport.node_token): let it in
        bind = cfg.host or (interface_address(cfg.interface) if cfg.interface else _bind_host(host))
        self.link, self.port = self.transport.router_link(bind, port,
                                                          handover=True)
        self._poller = Poller()
        self._poller.register(self.link)
        # op -> handler(identity, msg, authenticated role); who may send which op: security.py
        self._handlers = {
            "heartbeat": self._heartbeat, "register": self._register, "barrier": self._barrier,
            "status": self._status, "drain": self._drain_server, "leave": self._leave_op,
            "checkpoint": self._checkpoint, "shutdown": self._shutdown, "rejoin": self._rejoin,
            **dict.fromkeys(TaskService.OPS, self._task)}
        self._tick = min(0.05, cfg.heartbeat_interval / 2)
        self.view = ClusterView(settings={"read_only_groups": read_only})
        self.rings = RingKeeper(self.view)
        self.pending = Pending(cfg.num_servers, cfg.num_workers)  # waiting for the cluster to start
        self.identity_of: dict[int, bytes] = {}            # node id -> ROUTER identity (heartbeat sock)
        self._announce = False                              # the view changed: push it to the nodes
        self.liveness = Liveness(cfg.heartbeat_interval, cfg.heartbeat_timeout)
        self.traffic: dict[int, dict] = {}                  # node id -> traffic its heartbeats report
        self.replica_apply_errors: dict[int, int] = {}      # server id -> forwards it failed to apply
        self.started = False
        self.recovered = False  # this scheduler rebuilt the view of one that died
        self.barriers = Barriers(self.group_sizes)
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.exit_when_workers_done = exit_when_workers_done
        self.workers_ever = 0
        self._next_id = 1
        self.rejected = 0
        self.tasks = TaskService(self._send, lambda: self.view, self._bump)  # app task queues
        self.rejections: Counter[str] = Counter()  # reason (exception class) -> rejected messages
        self.node_view: dict[int, int] = {}     # node id -> view version its heartbeat reported
        self.migration = MigrationCoordinator(self.transport, self._server_address, self.view.alive,
                                              self._commit_ring)
        self.owner: dict[int, bytes] = {}  # node id -> node_token of the connection that registered it
        self.checkpoints = CheckpointCoordinator(
            self.transport, lambda: self.view, self._send, lambda: self._next_id,
            directory=checkpoint_dir or restore, every=checkpoint_every, keep=checkpoint_keep)
        # a recovering scheduler: no registration, the nodes rejoin with their view
        self.recovery = ViewRecovery(max(2.0, 3 * cfg.heartbeat_timeout), time.monotonic) \
            if recover else None
        if restore:  # new node ids start above the checkpoint's: restored clocks never mix them up
            try:
                self._next_id = self.checkpoints.prepare_restore(restore, self.view)
            except PServerError:
                self.transport.close()
                raise
        log.info("scheduler listening on %s:%d, waiting for %d servers and %d workers",
                 cfg.host or host, self.port, cfg.num_servers, cfg.num_workers)

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until the cluster has shut down; the transport is closed then (also on error)."""
        metrics = None
        try:
            metrics = start_metrics(self.cfg, "scheduler", self.transport.creds.secure,
                                    lambda: metric_families.of_scheduler(self))
            while not self.step():
                pass
        finally:
            log.info("scheduler exits")
            if metrics is not None:
                metrics.close()
            self.transport.close()

    def step(self) -> bool:
        """One turn of the loop: wait up to a tick for messages, handle them, check liveness,
        announce a changed view and advance checkpoints and migrations. True once the scheduler
        may exit (shut down and every node gone, or the shutdown grace period over)."""
        if self._poller.poll(self._tick):
            self._drain()
        if self.recovery is not None and self.recovery.done():
            self._recovered()
        self._check_liveness()
        if self._announce:
            self._announce_view()
        self.checkpoints.tick(self.started and not self.shutting_down)
        if self.started and not self.shutting_down:
            self.migration.tick(self.view.ring)
            self.rings.settle()
        return self.shutting_down and self._may_exit()

    def _drain(self) -> None:
        link, decode = self.link, self.transport.decode_body
        while (item := link.recv()) is not None:
            identity, body = item
            try:
                msg, role = decode(body)
                if self.transport.creds.secure and not security.authorise(msg.op, role, True):
                    raise AuthError(f"a {role} may not send {msg.op!r} to the scheduler")
                self._handle(identity, msg, role)
            except (PServerError, PermissionError, ValueError, KeyError, TypeError, OverflowError) as e:
                self._reject(identity, e)
            except Exception as e:  # nothing received may stop the control plane
                log.exception("unexpected error on a message")
                self._reject(identity, e)

    def _reject(self, identity: bytes, err: Exception) -> None:
        kind = type(err).__name__
        self.rejected += 1
        self.rejections[kind] += 1
        log.warning("rejected a message: %s: %s", kind, err)
        self._send(identity, Message("error", meta={ERROR: str(err)[:500], KIND: kind}))

    def _check_owner(self, nid: int, identity: bytes, op: str) -> None:
        """Refuse ``op`` for node ``nid`` unless it comes from the node that registered as ``nid``:
        all nodes of a role share one key, so an id in a message proves nothing by itself."""
        owner = self.owner.get(nid)
        if owner is None:
            raise ValueError(f"{op} for unknown node {nid}")
        if node_token(identity) != owner:
            raise AuthError(f"{op} for node {nid} came from another node's connection: a node may "
                            f"send {op} only for itself")

    def _send(self, identity: bytes, msg: Message) -> None:
        try:
            self.link.send(msg, identity)
        except LinkError as e:  # peer vanished (ROUTER_MANDATORY)
            log.debug("cannot reply to a vanished peer: %s", e)

    def _handle(self, identity: bytes, msg: Message, role: str | None) -> None:
        handler = self._handlers.get(msg.op)
        if handler is None:
            raise ValueError(f"unknown op {msg.op!r} for the scheduler")
        if self.recovery is not None and msg.op not in _WHILE_RECOVERING:
            # the view is not rebuilt yet: the node sends it again once it has the new view
            log.debug("recovering: %s dropped (the node resends it)", msg.op)
            return
        handler(identity, msg, role)

    def _heartbeat(self, identity: bytes, msg: Message, role: str | None) -> None:
        m = msg.meta
        nid = int(m[ID])
        node = self.view.nodes.get(nid)
        if self.recovery is not None:
            if self.owner.get(nid) == node_token(identity):  # rejoined: wait for the view
                self.liveness.seen(nid)
                self._send(identity, Message("hb", msg.ts, meta={VIEW_VERSION: -1}))
            else:
                self._send(identity, Message("hb", msg.ts, meta={REJOIN: True}))
            return
        if node is None:
            if self.recovered:  # a node of the old scheduler's cluster that was not in the view
                self._send(identity, Message("hb", msg.ts, meta={REJOIN: True}))
                return
            raise ValueError(f"heartbeat from unknown node {nid}")
        self._check_owner(nid, identity, msg.op)
        self.liveness.seen(nid)
        self.identity_of[nid] = identity
        self.node_view[nid] = int(m.get(VIEW_VERSION, -1))
        if REBUILT in m:
            self.rings.rebuilt[nid] = int(m[REBUILT])
        if isinstance(m.get(TRAFFIC), dict):
            self.traffic[nid] = m[TRAFFIC]
        if type(m.get(REPLICA_APPLY_ERRORS)) is int:
            self.replica_apply_errors[nid] = m[REPLICA_APPLY_ERRORS]
        reply = {"v": self.view.version, "shutdown": self.shutting_down}
        if int(m.get(VIEW_VERSION, -1)) != self.view.version:
            reply["view"] = self.view.to_json()
        if not node.alive and node.state == "dead":
            reply["dead"] = True  # it was declared dead: it must not come back silently
        self._send(identity, Message("hb", msg.ts, meta=reply))

    def _status(self, identity: bytes, msg: Message, role: str | None) -> None:
        self._send(identity, Message("status", msg.ts, meta=self.status()))

    def _drain_server(self, identity: bytes, msg: Message, role: str | None) -> None:
        """A server leaving gracefully: answered ("drained") once its ranges have moved."""
        nid = int(msg.meta[ID])
        self._check_owner(nid, identity, msg.op)
        self.migration.request(lambda: self.rings.with_server(remove=nid), f"server {nid} leaves",
                               lambda: self._send(identity, Message("drained", msg.ts)))

    def _leave_op(self, identity: bytes, msg: Message, role: str | None) -> None:
        nid = int(msg.meta[ID])
        self._check_owner(nid, identity, msg.op)
        self._leave(nid)
        self._send(identity, Message("ok", msg.ts))

    def _checkpoint(self, identity: bytes, msg: Message, role: str | None) -> None:
        self.checkpoints.request(identity, msg)  # answered when committed or aborted

    def _task(self, identity: bytes, msg: Message, role: str | None) -> None:
        """The task scheduler's ops: plans, work, progress, consistency."""
        if ID in msg.meta:
            self._check_owner(int(msg.meta[ID]), identity, msg.op)
        self.tasks.handle(identity, msg)

    def _shutdown(self, identity: bytes, msg: Message, role: str | None) -> None:
        log.warning("shutdown requested")
        self._begin_shutdown()
        self._send(identity, Message("ok", msg.ts))

    # -- recovery (a restarted scheduler) -------------------------------------------------------
    def _rejoin(self, identity: bytes, msg: Message, role: str | None) -> None:
        """A node of the cluster this scheduler replaces: during recovery its view counts; after,
        a live node of the recovered view is taken back, any other is told it is dead."""
        nid = int(msg.meta[ID])
        if self.recovery is not None:
            self.recovery.rejoin(msg.meta, role if self.transport.creds.secure else None)
            self.owner[nid] = node_token(identity)
            self.identity_of[nid] = identity
            self.liveness.seen(nid)
            log.info("node %d rejoined (%d so far)", nid, len(self.recovery.claims))
            return
        node = self.view.nodes.get(nid)
        if node is not None and node.alive and self.recovered and nid not in self.owner:
            self.owner[nid] = node_token(identity)
            self.identity_of[nid] = identity
            self.liveness.seen(nid)
            self._send(identity, Message("hb", msg.ts, meta={VIEW_VERSION: self.view.version,
                                                              VIEW: self.view.to_json()}))
            return
        self._send(identity, Message("hb", msg.ts, meta={DEAD: True}))

    def _recovered(self) -> None:
        """Every node rejoined (or the window is over): adopt the newest view and announce it."""
        recovery, self.recovery = self.recovery, None
        view = recovery.result()
        for nid in list(self.owner):
            if not recovery.member(nid):
                self.owner.pop(nid)     # dead, left or an impostor: told so on its next heartbeat
                self.identity_of.pop(nid, None)
        # the same object: the migration coordinator and the ring keeper hold it
        self.view.version, self.view.nodes = view.version - 1, view.nodes
        self.view.ring, self.view.settings = view.ring, view.settings
        self.rings = RingKeeper(self.view)  # safe again once the servers report re-replication
        self._next_id = max([self._next_id, *(n + 1 for n in view.nodes)])
        self.workers_ever = sum(1 for n in view.nodes.values() if n.role == "worker")
        for n in view.nodes.values():
            if n.alive:
                self.liveness.seen(n.id)
        self.started = self.recovered = True
        self._bump()
        log.warning("recovered the cluster view v%d from %d rejoined nodes: %d servers, %d "
                    "workers, ring v%s", self.view.version, len(recovery.claims),
                    self.view.num_servers, self.view.num_workers,
                    self.view.ring.version if self.view.ring else "-")

    # -- registration --------------------------------------------------------------------------
    def _register(self, identity: bytes, msg: Message, role: str | None) -> None:
        req = Request.parse(msg.meta, role)
        if self.shutting_down:
            raise ValueError("the cluster is shutting down")
        if req.read_only:
            self._make_read_only(req.group)
        self._send(identity, Message("registered", msg.ts))
        if self.started:
            # a late node: joins the running cluster at once (elastic membership); a server gets
            # its key ranges through a two-phase migration while the cluster keeps serving
            node = self._admit(req)
            self._bump()
            self._welcome(identity, msg.ts, node)
            if req.role == "server":
                self.migration.request(lambda nid=node.id: self.rings.with_server(add=nid),
                                       f"server {node.id} joins")
            return
        complete = self.pending.add((identity, msg.ts), req)
        log.info("registered a %s of group %s (%d/%d servers, %d/%d workers)", req.role, req.group,
                 self.pending.count("server"), self.cfg.num_servers,
                 self.pending.count("worker"), self.cfg.num_workers)
        if complete:
            self._start()

    def _make_read_only(self, group: str) -> None:
        """A registering worker makes its group read-only (ConfigError if it has writers)."""
        ro = self.view.settings["read_only_groups"]
        live = len(self.view.group_nodes(group)) + sum(
            1 for _, r in self.pending.requests if r.role == "worker" and r.group == group)
        groups.join_read_only(group, ro, live)
        if group not in ro:
            self.view.settings["read_only_groups"] = sorted({*ro, group})
            log.info("group %s is read-only (a member asked at registration)", group)

    def _admit(self, req: Request) -> NodeInfo:
        role = req.role
        rank = rank_for(req, self.view.nodes.values())
        node = NodeInfo(id=self._next_id, role=role, rank=rank, host=req.host,
                        port=req.port, pid=req.pid, group=req.group)
        self._next_id += 1
        self.view.nodes[node.id] = node
        self.liveness.seen(node.id)
        if role == "worker":
            self.workers_ever += 1
        return node

    def _start(self) -> None:
        admitted = [(ident, ts, self._admit(req))
                    for (ident, ts), req in self.pending.admission_order()]
        servers = [n.id for n in self.view.role_nodes("server")]
        self.rings.start(servers, self.cfg.virtual_servers)
        if "restore" in self.view.settings:  # these servers load the checkpoint before serving
            self.view.settings["restore"]["servers"] = servers
        self.view.settings.update({
            "replication": self.cfg.replication,
            "replicate_after_aggregation": self.cfg.replicate_after_aggregation,
            "replica_key_cache": self.cfg.replica_key_cache_bytes})
        self.view.version = 1
        self.started = True
        for ident, ts, node in admitted:
            self._welcome(ident, ts, node)
        log.info("cluster started: %d servers, %d workers", len(servers), self.view.num_workers)

    def _welcome(self, identity: bytes, ts: int, node: NodeInfo) -> None:
        self.owner[node.id] = node_token(identity)  # admitted: bind the id to this node's connections
        self._send(identity, Message("welcome", ts, meta={ID: node.id, RANK: node.rank,
                                                          VIEW: self.view.to_json()}))

    def _bump(self) -> None:
        self.view.version += 1
        self._announce = True

    def _announce_view(self) -> None:
        """Send a changed view to every live node's heartbeat socket at once (a failover must
        not wait for each node's next heartbeat to ask for it)."""
        self._announce = False
        meta = {VIEW_VERSION: self.view.version, SHUTDOWN: self.shutting_down, VIEW: self.view.to_json()}
        for nid, identity in list(self.identity_of.items()):
            if self.view.alive(nid):
                self._send(identity, Message("hb", 0, meta=meta))

    def _commit_ring(self, ring: KeyRing) -> None:
        self.rings.commit(ring)
        self._bump()

    def _server_address(self, sid: int) -> tuple[str, int]:
        node = self.view.nodes[sid]
        return node.host, node.port

    # -- liveness ----------------------------------------------------------------------------
    def _check_liveness(self) -> None:
        if not self.started:
            return
        for nid in self.liveness.expired([n.id for n in self.view.nodes.values() if n.alive]):
            node = self.view.nodes[nid]
            node.alive = False
            node.state = "dead"
            log.error("%s %d (rank %d, pid %d at %s:%d) missed heartbeats for %.2f s (its "
                      "timeout: %.2f s): marked dead", node.role, nid, node.rank, node.pid,
                      node.host, node.port, self.liveness.silence(nid), self.liveness.deadline(nid))
            if node.role == "server":
                self.rings.server_gone(nid)
            self._bump()
            self._recheck_barriers()
            self.tasks.node_gone(nid)
            self._maybe_finish()

    def _leave(self, nid: int) -> None:
        node = self.view.nodes.get(nid)
        if node is None or not node.alive:
            return
        node.alive = False
        node.state = "left"
        log.info("%s %d (rank %d) left", node.role, nid, node.rank)
        if node.role == "server" and not self.shutting_down:
            self.rings.server_gone(nid)
        self._bump()
        self._recheck_barriers()
        self.tasks.node_gone(nid)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if (self.exit_when_workers_done and self.workers_ever and not self.shutting_down
                and self.view.num_workers == 0):
            log.info("every worker has finished: shutting the cluster down")
            self._begin_shutdown()

    def _begin_shutdown(self) -> None:
        if not self.shutting_down:
            self.shutting_down = True
            self.shutdown_deadline = time.monotonic() + max(3.0, 5 * self.cfg.heartbeat_interval)
            # nodes waiting for a start that will not come are told so, instead of waiting out
            # their connect timeout
            for (identity, ts), _ in self.pending.admission_order():
                self._send(identity, Message("error", ts, meta={
                    ERROR: "the cluster was shut down before it started", KIND: "ShutdownError"}))

    def _may_exit(self) -> bool:
        others_up = [n for n in self.view.nodes.values() if n.alive]
        return not others_up or time.monotonic() > self.shutdown_deadline

    # -- barriers ---------------------------------------------------------------------------
    def _barrier(self, identity: bytes, msg: Message, role: str | None) -> None:
        name = str(msg.meta.get(NAME, ""))
        group = str(msg.meta.get(GROUP, "worker"))
        nid = int(msg.meta[ID])
        self._check_owner(nid, identity, "barrier")
        node = self.view.nodes.get(nid)
        if node is not None and not node.alive:
            # it would wait for ever: the live members passed this barrier without it
            raise ValueError(f"{node.role} {nid} was declared {node.state} (missed heartbeats) and "
                             f"is no longer a member: restart it (it joins as a new node); on a "
                             f"loaded machine or a lossy network raise PSERVER_HEARTBEAT_TIMEOUT")
        worker_group = node.group if node is not None and node.role == "worker" else None
        self._release(self.barriers.arrive(name, group, nid, (identity, msg.ts), self.view,
                                           worker_group))

    def _release(self, waiters: list) -> None:
        # the reply carries the view the barrier completed in: a member's own view (sent on
        # its heartbeat link) may not have the members who joined just before yet
        meta = {VIEW_VERSION: self.view.version, VIEW: self.view.to_json()} if waiters else {}
        for ident, ts in waiters:
            self._send(ident, Message("barrier_done", ts, meta=meta))

    def _recheck_barriers(self) -> None:
        self._release(self.barriers.recheck(self.view))

    # -- status --------------------------------------------------------------------------
    def status(self) -> dict:
        """The cluster's state for `pserver status`: the view with each node's silence, traffic
        and ring share, the scheduler's counters, checkpoints, task progress and a per worker
        group section (JSON-ready)."""
        view = self.view.to_json()
        for n in view["nodes"]:
            n["last_heartbeat"] = round(self.liveness.silence(n["id"]), 3)
            n["heartbeat_deadline"] = round(self.liveness.deadline(n["id"]), 3)
            if n["id"] in self.traffic:
                n["traffic"] = self.traffic[n["id"]]
            if self.replica_apply_errors.get(n["id"]):
                n["replica_apply_errors"] = self.replica_apply_errors[n["id"]]
        shares = self.view.ring.share() if self.view.ring else {}
        for n in view["nodes"]:
            if n["role"] == "server":
                n["ring_share"] = round(shares.get(n["id"], 0.0), 4)
        view["scheduler"] = {"pid": os.getpid(), "port": self.port, "started": self.started,
                             "expected_servers": self.cfg.num_servers,
                             "expected_workers": self.cfg.num_workers,
                             "rejected_messages": self.rejected,
                             "rejected_by_reason": dict(self.rejections),
                             "checkpoints": self.checkpoints.status(),
                             "traffic": self.transport.counters.to_json()}
        view["tasks"] = self.tasks.progress()
        view["groups"] = groups.summary(view["nodes"], self.view.read_only_groups,
                                        self.group_sizes, view["tasks"])
        return view


def _bind_host(host: str) -> str:
    """Bind the scheduler's advertised host when it is an address of this machine, else all
    interfaces of the same family (a DNS name such as a Kubernetes service resolves elsewhere)."""
    import socket

    try:
        addr = socket.getaddrinfo(host, None)[0][4][0]
    except OSError:
        return "0.0.0.0"
    try:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
            s.bind((addr, 0))
        return addr
    except OSError:
        return "::" if ":" in addr else "0.0.0.0"
