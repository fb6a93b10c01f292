"""What the dashboard shows, computed from successive scheduler status reports without I/O: the
nodes, the key ring as arcs (owner and replicas), rates over time (data bytes per worker, bytes
after each filter stage), idle share and tasks done (the clock) per worker, and events (nodes
joining or dying, ring changes)."""

from __future__ import annotations

from collections import deque
from typing import Any

from ..kv.traffic import data_bytes
from ..ring import KeyRing

HISTORY = 300   # points kept for the charts (5 minutes at one status a second)
EVENTS = 50     # events kept
WINDOW = 5.0    # seconds a rate is averaged over: nodes report traffic once a second, in steps


def ring_arcs(ring: dict[str, Any] | None, replication: int) -> list[dict[str, Any]]:
    """The ring's segments as arcs of [0, 1): ``{"start", "end", "owner", "replicas"}``; a segment
    ends at its virtual server's position and starts after the previous one (the last wraps)."""
    if not ring:
        return []
    r = KeyRing.from_json(ring)
    pos = (r.positions.astype(float) / float(1 << 64)).tolist()
    replicas = r.replica_table(replication).tolist() if replication > 0 else [[]] * len(pos)
    arcs = []
    for i, end in enumerate(pos):
        start = pos[i - 1] if i else pos[-1] - 1.0  # the first segment wraps past zero
        arcs.append({"start": round(start % 1.0, 6), "end": round(end, 6),
                     "owner": int(r.owners[i]), "replicas": [s for s in replicas[i] if s >= 0]})
    return arcs


class DashboardState:
    """The page's data, updated with each status report (``update``) and read as JSON (``to_json``).
    Not thread-safe: the app updates and reads it under its lock."""

    def __init__(self, history: int = HISTORY) -> None:
        self.status: dict[str, Any] = {}
        self.error: str | None = None
        self.points: deque = deque(maxlen=history)
        self.events: deque = deque(maxlen=EVENTS)
        self._recent: deque = deque()  # (time, counters) of the reports of the last WINDOW s
        self._states: dict[int, str] = {}
        self._ring_version: int | None = None
        self._arcs: list[dict[str, Any]] = []

    def failed(self, error: str) -> None:
        """The scheduler did not answer: keep the last report, show why."""
        self.error = error

    def update(self, status: dict[str, Any], now: float) -> None:
        """Take one status report of the scheduler received at ``now`` (seconds, wall clock)."""
        self.error = None
        self._events(status, now)
        counters = _counters(status)
        recent = self._recent
        while len(recent) > 1 and recent[1][0] <= now - WINDOW:
            recent.popleft()
        if recent and now > recent[0][0]:
            then, before = recent[0]
            rates = {k: round(max(0.0, (v - before.get(k, 0.0)) / (now - then)), 1)
                     for k, v in counters.items()}
            self.points.append({"t": round(now, 3), "rates": rates, "idle": _idle(status),
                                "done": _done(status)})
        recent.append((now, counters))
        self.status = status

    def _events(self, status: dict[str, Any], now: float) -> None:
        for n in status.get("nodes", []):
            before = self._states.get(n["id"])
            if before != n["state"]:
                what = "joined" if before is None else f"{before} -> {n['state']}"
                self.events.append({"t": now, "kind": "node", "text": f"{n['role']} {n['id']} "
                                                                      f"(rank {n['rank']}) {what}"})
                self._states[n["id"]] = n["state"]
        ring = status.get("ring") or None
        version = ring.get("version") if ring else None
        if version != self._ring_version:
            if self._ring_version is not None:
                self.events.append({"t": now, "kind": "ring", "text": f"key ring v{self._ring_version}"
                                    f" -> v{version}: servers {ring['servers'] if ring else []}"})
            self._ring_version = version
            self._arcs = ring_arcs(ring, int(status.get("settings", {}).get("replication", 0)))

    def to_json(self) -> dict[str, Any]:
        """What /api/state sends: nodes (with their data bytes/s), the ring's arcs, the points of
        the charts, events newest first, groups, and the last polling error (None if fine)."""
        s = self.status
        nodes = []
        last = self.points[-1]["rates"] if self.points else {}
        for n in sorted(s.get("nodes", []), key=lambda n: (n["role"], n["rank"], n["id"])):
            nodes.append({k: n.get(k) for k in ("id", "role", "rank", "state", "host", "port",
                                                "group", "last_heartbeat", "ring_share")}
                         | {"sent_rate": last.get(f"node/{n['id']}/sent", 0.0)})
        return {"error": self.error, "view_version": s.get("version"),
                "ring": {"version": self._ring_version, "arcs": self._arcs,
                         "replication": s.get("settings", {}).get("replication", 0)},
                "nodes": nodes, "points": list(self.points), "events": list(self.events)[::-1],
                "groups": s.get("groups", {})}


def _counters(status: dict[str, Any]) -> dict[str, float]:
    """Monotonic counters of one report: each node's data bytes sent and the bytes after each
    filter stage summed over nodes ("stage/<kind>/<stage>")."""
    out: dict[str, float] = {}
    for n in status.get("nodes", []):
        t = n.get("traffic") or {}
        if not t:
            continue
        sent, _ = data_bytes(t) if n["role"] == "worker" else (t.get("bytes_sent", 0), 0)
        out[f"node/{n['id']}/sent"] = float(sent)
        if n["role"] == "worker":
            out["workers/sent"] = out.get("workers/sent", 0.0) + sent
        for kind, stages in (t.get("filters") or {}).get("stages", {}).items():
            for stage, c in stages.items():
                key = f"stage/{kind}/{stage}"
                out[key] = out.get(key, 0.0) + c.get("bytes_sent", 0)
    return out


def _idle(status: dict[str, Any]) -> dict[str, float]:
    """Idle share per worker node id, from the task scheduler's progress (last app wins)."""
    out = {}
    for p in status.get("tasks", {}).values():
        for nid, w in p.get("workers", {}).items():
            if "idle_share" in w:
                out[nid] = round(w["idle_share"], 4)
    return out


def _done(status: dict[str, Any]) -> dict[str, int]:
    """Tasks done per worker node id (its clock, in a bounded-delay job), summed over apps."""
    out: dict[str, int] = {}
    for p in status.get("tasks", {}).values():
        for nid, w in p.get("workers", {}).items():
            out[nid] = out.get(nid, 0) + int(w.get("done", 0))
    return out
