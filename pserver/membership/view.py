"""The cluster view: who is in the cluster, where, alive or not, and the key ring. The scheduler owns it
and versions it; every node caches the latest copy it was sent."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..ring import KeyRing

ROLES = ("scheduler", "server", "worker")


@dataclass
class NodeInfo:
    id: int
    role: str
    rank: int
    host: str
    port: int
    pid: int
    alive: bool = True
    state: str = "up"          # up | dead | left
    group: str = "default"     # a worker's group (ranks are per group); servers: "default"
    last_heartbeat: float = 0.0  # seconds since the scheduler last heard from it (filled for status)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> NodeInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class ClusterView:
    version: int = 0
    nodes: dict[int, NodeInfo] = field(default_factory=dict)
    ring: KeyRing | None = None
    settings: dict = field(default_factory=dict)   # cluster-wide settings (e.g. consistency)

    def role_nodes(self, role: str, alive_only: bool = True) -> list[NodeInfo]:
        out = [n for n in self.nodes.values() if n.role == role and (n.alive or not alive_only)]
        return sorted(out, key=lambda n: n.rank)

    def group_nodes(self, group: str, alive_only: bool = True) -> list[NodeInfo]:
        """The workers of ``group``, by rank."""
        return [n for n in self.role_nodes("worker", alive_only) if n.group == group]

    def groups(self) -> list[str]:
        """Names of the worker groups that ever had a member, sorted."""
        return sorted({n.group for n in self.nodes.values() if n.role == "worker"})

    @property
    def read_only_groups(self) -> frozenset[str]:
        """Groups whose members may not change stored values (see pserver.groups)."""
        return frozenset(self.settings.get("read_only_groups", ()))

    @property
    def num_workers(self) -> int:
        """Live workers of every group."""
        return len(self.role_nodes("worker"))

    @property
    def num_servers(self) -> int:
        return len(self.role_nodes("server"))

    def alive(self, node_id: int) -> bool:
        n = self.nodes.get(node_id)
        return bool(n and n.alive)

    def to_json(self) -> dict:
        return {"version": self.version, "nodes": [n.to_json() for n in self.nodes.values()],
                "ring": self.ring.to_json() if self.ring else None, "settings": self.settings}

    @classmethod
    def from_json(cls, d: dict) -> ClusterView:
        nodes = {int(n["id"]): NodeInfo.from_json(n) for n in d.get("nodes", [])}
        ring = KeyRing.from_json(d["ring"]) if d.get("ring") else None
        return cls(version=int(d.get("version", 0)), nodes=nodes, ring=ring,
                   settings=dict(d.get("settings", {})))
