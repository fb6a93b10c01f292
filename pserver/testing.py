"""Test doubles shipped once: links, transports, a cluster, views, clocks and a kv, all in memory.

Every fake here opens no socket and starts no process, so ``tests/unit`` can drive the real loops
(scheduler, membership, executor channel, checkpoint rounds) with them. Library code never imports
this module.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from typing import Any

from . import security, wire
from .config import Config
from .errors import ConfigError
from .link import Link, LinkError, MemoryHub, MemoryLink
from .membership.node import Membership
from .membership.scheduler import Scheduler
from .membership.view import ClusterView, NodeInfo
from .ring import KeyRing
from .transport import _TOKEN_LEN, _TOKEN_TAG, TrafficCounters, Transport

__all__ = ["FakeClock", "MemoryCluster", "MemoryTransport", "RecordingLink", "RecordingTransport",
           "ScriptedKV", "view_of"]


class RecordingLink(Link):
    """A link whose incoming messages are scripted and whose sends are recorded, decoded.

    ``push(msg, sender)`` queues a message for ``recv``; ``sent`` lists (to, Message) in order;
    ``events`` logs ("recv",) and ("send", to, Message) in one sequence, to check what a loop
    sent before or after reading what. ``fail_to`` names peers whose sends raise LinkError (a
    vanished peer of a ROUTER).
    """

    def __init__(self, routed: bool = True) -> None:
        self.routed = routed
        self.inbox: deque[tuple[bytes | None, list]] = deque()
        self.sent: list[tuple[bytes | None, wire.Message]] = []
        self.events: list[tuple] = []
        self.fail_to: set[bytes] = set()
        self.closed = False

    def push(self, msg: wire.Message | list, sender: bytes | None = None) -> None:
        """Queue ``msg`` (a Message, or raw frames for malformed input) as sent by ``sender``."""
        frames = msg if isinstance(msg, list) else wire.encode(msg)
        self.inbox.append((sender if self.routed else None,
                           [bytes(f.data if hasattr(f, "dtype") else f) for f in frames]))

    def send_frames(self, frames: list, op: str, to: bytes | None = None) -> None:
        if self.closed or to in self.fail_to:
            raise LinkError(f"cannot send {op!r}: no peer {to!r}")
        msg = wire.decode([bytes(f.data if hasattr(f, "dtype") else f) for f in frames])
        self.sent.append((to, msg))
        self.events.append(("send", to, msg))

    def recv(self) -> tuple[bytes | None, list] | None:
        if not self.inbox:
            return None
        self.events.append(("recv",))
        return self.inbox.popleft()

    def poll(self, timeout: float | None) -> bool:
        return bool(self.inbox)  # scripted: waiting would never bring more

    def close(self, linger: float = 0.0) -> None:
        self.closed = True


class RecordingTransport:
    """Stands in for a Transport whose DEALER links are :class:`RecordingLink` s: ``sent`` lists
    (peer port, Message) over all of them in send order; sends to a port in ``refuse`` raise
    LinkError (nothing recorded). ``links`` maps port -> the latest link to it."""

    def __init__(self, limits: wire.Limits | None = None) -> None:
        self.limits = limits if limits is not None else wire.Limits()
        self.sent: list[tuple[int, wire.Message]] = []
        self.links: dict[int, RecordingLink] = {}
        self.refuse: set[int] = set()

    def dealer_link(self, host: str, port: int, peer_role: str,
                    identity: bytes | None = None) -> RecordingLink:
        link = self.links[port] = _PeerLink(self, port)
        return link


class _PeerLink(RecordingLink):
    """A RecordingLink of a :class:`RecordingTransport`, to the peer at ``port``."""

    def __init__(self, transport: RecordingTransport, port: int) -> None:
        super().__init__(routed=False)
        self.transport, self.port = transport, port

    def send_frames(self, frames: list, op: str, to: bytes | None = None) -> None:
        if self.port in self.transport.refuse:
            raise LinkError(f"cannot send {op!r}: port {self.port} refused")
        super().send_frames(frames, op, to)
        self.transport.sent.append((self.port, self.sent[-1][1]))


class MemoryTransport(Transport):
    """A :class:`Transport` whose links live in a :class:`MemoryHub` (insecure, no ZeroMQ).

    A router bound at host:port is named "host:port" in the hub (port 0: the first free one from
    49152); dealers to the scheduler get token identities as over ZeroMQ, so the scheduler's
    node-id binding works.
    """

    def __init__(self, hub: MemoryHub, cfg: Config, role: str) -> None:
        self.hub, self.cfg, self.role, self.limits = hub, cfg, role, cfg.limits
        self.creds = security.Credentials.insecure()
        self.counters = TrafficCounters()
        self._token = _TOKEN_TAG + os.urandom(_TOKEN_LEN - 1)
        self._dealer_ids = itertools.count()
        self._links: list[MemoryLink] = []
        self._lock = threading.Lock()  # links are made by several threads (heartbeats)

    def router_link(self, host: str, port: int = 0, handover: bool = False) -> tuple[Link, int]:
        with self.hub.cond:
            if not port:
                port = next(p for p in itertools.count(49152) if f"{host}:{p}" not in self.hub.routers)
            if f"{host}:{port}" in self.hub.routers:
                raise ConfigError(f"cannot bind {host}:{port}: taken in this MemoryHub")
            link = self.hub.router(f"{host}:{port}")
        with self._lock:
            self._links.append(link)
        return link, port

    def dealer_link(self, host: str, port: int, peer_role: str,
                    identity: bytes | None = None) -> Link:
        identity = self.dealer_identity(peer_role, identity) or os.urandom(8)
        link = self.hub.dealer(f"{host}:{port}", identity)
        with self._lock:
            self._links.append(link)
        return link

    def close(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()


def memory_config(**overrides: Any) -> Config:
    """A Config for an in-memory cluster: scheduler "sched:7000", insecure, short timeouts."""
    settings: dict[str, Any] = {"scheduler": "sched:7000", "host": "sched", "insecure": True,
                                "num_servers": 1, "num_workers": 1, "connect_timeout": 10.0,
                                "barrier_timeout": 10.0}
    settings.update(overrides)
    return Config.from_env({}, **settings)


class MemoryCluster:
    """The real :class:`Scheduler` loop (in a thread) and real :class:`Membership` objects of
    servers and workers, talking over one MemoryHub. ``join(role)`` registers a node (blocking
    until the cluster started, so join the expected nodes from threads: :meth:`join_all`).
    Use as a context manager; :meth:`close` stops nodes and the scheduler loop. Not yet in memory:
    a server joining or leaving a running cluster (its migration, ft/migration.py, uses sockets).
    """

    def __init__(self, num_servers: int = 1, num_workers: int = 1, **cfg: Any) -> None:
        self.hub = MemoryHub()
        self.cfg = memory_config(num_servers=num_servers, num_workers=num_workers, **cfg)
        self.scheduler = Scheduler(self.cfg, transport=MemoryTransport(self.hub, self.cfg,
                                                                       "scheduler"))
        self.nodes: list[Membership] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set() and not self.scheduler.step():
                pass
        finally:
            self.scheduler.transport.close()

    def join(self, role: str, rank: int = -1, host: str = "node", **settings: Any) -> Membership:
        """Register a new node of ``role`` (``settings``: Config fields of its own, e.g.
        group="train"); returns its Membership once admitted."""
        cfg = self.cfg.with_(**settings) if settings else self.cfg
        transport = MemoryTransport(self.hub, cfg, role)
        node = Membership(cfg, transport, role, host, 7100 + len(self.nodes))
        self.nodes.append(node)
        node.register(rank)
        return node

    def join_all(self, roles: list[str]) -> list[Membership]:
        """Register one node per entry of ``roles`` concurrently; returns them in that order.
        Raises what a registration raised."""
        out: list[Any] = [None] * len(roles)

        def one(i: int) -> None:
            try:
                out[i] = self.join(roles[i])
            except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
                out[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(roles))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out

    def close(self) -> None:
        for node in self.nodes:
            node.close()
            node.transport.close()
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> MemoryCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def view_of(servers: int = 0, workers: int = 0, dead: tuple[int, ...] = (),
            ring: bool = True) -> ClusterView:
    """A ClusterView of ``servers`` servers (ids 1..) then ``workers`` workers, ranks from 0;
    ids in ``dead`` are marked dead; with ``ring``, a key ring over the live servers."""
    nodes = {}
    for i, role in enumerate(["server"] * servers + ["worker"] * workers, start=1):
        rank = i - 1 if role == "server" else i - 1 - servers
        alive = i not in dead
        nodes[i] = NodeInfo(i, role, rank, "127.0.0.1", 7000 + i, 100 + i, alive=alive,
                            state="up" if alive else "dead")
    live = [i for i, n in nodes.items() if n.role == "server" and n.alive]
    return ClusterView(version=1, nodes=nodes,
                       ring=KeyRing(live, version=1) if ring and live else None)


class FakeClock:
    """A monotonic clock that moves only when told: ``clock.now += 2``; call it for the time."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedKV:
    """A kv for the executor: push/pull return timestamps at once; ``wait(ts)`` "receives" the
    reply and logs the order in ``waited``. A pull's value is ("w", ts)."""

    def __init__(self) -> None:
        self.ts = 0
        self.waited: list[int] = []
        self.values: dict[int, object] = {}
        self.idle_timer = None

    def _next(self, value: object = None) -> int:
        self.ts += 1
        self.values[self.ts] = value
        return self.ts

    def push(self, keys: Any, vals: Any, table: str | None = None, **kw: Any) -> int:
        return self._next()

    def pull(self, keys: Any, table: str | None = None, wait: bool = True, **kw: Any) -> int:
        return self._next(("w", self.ts + 1))

    def push_pull(self, keys: Any, vals: Any, table: str | None = None, wait: bool = True,
                  **kw: Any) -> int:
        return self._next(("w", self.ts + 1))

    def wait(self, ts: int) -> object:
        self.waited.append(ts)
        return self.values.pop(ts)


class TableKV:
    """One process's stand-in for a KVWorker over real store tables (the servers' update rules,
    no network): declare_table / push / pull / wait / wait_all. Pushes apply at once; ``pushes``
    logs (table, keys, values) in order."""

    def __init__(self) -> None:
        from .store.spec import TableSpec
        from .store.table import Table

        self._spec, self._table = TableSpec, Table
        self.tables: dict[str, Any] = {}
        self.pushes: list[tuple] = []
        self._results: dict[int, Any] = {}
        self._ts = itertools.count(1)
        self.rank, self.num_workers = 0, 1

    def declare_table(self, name: str, **kw: Any) -> Any:
        spec = self._spec(name=name, **kw)
        self.tables.setdefault(name, self._table(spec))
        return spec

    def push(self, keys: Any, vals: Any, table: str | None = None, **_: Any) -> int:
        t = self.tables[table or "default"]
        vals = vals.reshape(len(keys), -1)
        self.pushes.append((table, keys.copy(), vals.copy()))
        t.push(keys, vals)
        ts = next(self._ts)
        self._results[ts] = None
        return ts

    def pull(self, keys: Any, table: str | None = None, wait: bool = True, **_: Any) -> Any:
        out = self.tables[table or "default"].pull(keys)
        ts = next(self._ts)
        self._results[ts] = out
        return self.wait(ts) if wait else ts

    def push_pull(self, keys: Any, vals: Any, table: str | None = None, **_: Any) -> Any:
        self.wait(self.push(keys, vals, table))
        return self.pull(keys, table)

    def barrier(self, name: str = "") -> None:
        return None

    def wait(self, ts: int, timeout: float | None = None) -> Any:
        return self._results.pop(ts)

    def wait_all(self) -> None:
        self._results.clear()
