"""The dashboard's data from successive status reports (no I/O): ring arcs, rates, events."""

from __future__ import annotations

import pytest

from pserver.dashboard.state import WINDOW, DashboardState, ring_arcs
from pserver.ring import KeyRing


def test_ring_arcs_cover_the_ring_once_with_owners_and_replicas():
    ring = KeyRing([1, 2, 3], virtual=8, version=4)
    arcs = ring_arcs(ring.to_json(), replication=1)
    assert len(arcs) == 24
    total = sum((a["end"] - a["start"]) % 1.0 for a in arcs)
    assert total == pytest.approx(1.0, abs=1e-4)
    share = ring.share()
    for sid in (1, 2, 3):
        mine = sum((a["end"] - a["start"]) % 1.0 for a in arcs if a["owner"] == sid)
        assert mine == pytest.approx(share[sid], abs=1e-4)
    assert all(len(a["replicas"]) == 1 and a["replicas"][0] != a["owner"] for a in arcs)
    assert all(a["replicas"] == [] for a in ring_arcs(ring.to_json(), 0))
    assert ring_arcs(None, 1) == []


def status(servers: dict[int, str], sent: int, ring_servers=(1, 2), version=1) -> dict:
    nodes = [{"id": i, "role": "server", "rank": i - 1, "state": st, "host": "h", "port": 1,
              "last_heartbeat": 0.1} for i, st in servers.items()]
    nodes.append({"id": 9, "role": "worker", "rank": 0, "state": "up", "host": "h", "port": 0,
                  "last_heartbeat": 0.0,
                  "traffic": {"sent_by_op": {"push": {"bytes": sent}, "heartbeat": {"bytes": 99}},
                              "filters": {"stages": {"push": {"raw": {"bytes_sent": 2 * sent}}}}}})
    return {"version": version, "nodes": nodes, "settings": {"replication": 1},
            "ring": KeyRing(list(ring_servers), virtual=4, version=version).to_json(),
            "tasks": {"lr": {"workers": {"9": {"idle_share": 0.25, "done": sent // 1000}}}}}


def test_rates_events_and_failover():
    st = DashboardState()
    st.update(status({1: "up", 2: "up"}, 0), now=100.0)
    st.update(status({1: "up", 2: "up"}, 1000), now=101.0)
    st.update(status({1: "up", 2: "up"}, 3000), now=102.0)
    page = st.to_json()
    assert page["points"][-1]["rates"]["workers/sent"] == 1500.0  # over the window, not one step
    assert page["points"][-1]["rates"]["stage/push/raw"] == 3000.0
    assert page["points"][-1]["idle"] == {"9": 0.25} and page["points"][-1]["done"] == {"9": 3}
    worker = next(n for n in page["nodes"] if n["role"] == "worker")
    assert worker["sent_rate"] == 1500.0  # data bytes only: heartbeats are not throughput
    assert {a["owner"] for a in page["ring"]["arcs"]} == {1, 2}
    assert [e["text"] for e in page["events"]] == [  # newest first
        "worker 9 (rank 0) joined", "server 2 (rank 1) joined", "server 1 (rank 0) joined"]
    # server 1 dies; the ring moves to server 2
    st.update(status({1: "dead", 2: "up"}, 5000, ring_servers=(2,), version=2), now=102.0 + WINDOW)
    page = st.to_json()
    texts = [e["text"] for e in page["events"]]
    assert texts[:2] == ["key ring v1 -> v2: servers [2]", "server 1 (rank 0) up -> dead"]
    assert {a["owner"] for a in page["ring"]["arcs"]} == {2}
    # the reports older than the window are dropped: the rate since the one at 102 s
    assert page["points"][-1]["rates"]["workers/sent"] == pytest.approx(2000 / WINDOW, abs=0.1)
    st.failed("no answer")
    assert st.to_json()["error"] == "no answer" and st.to_json()["nodes"]
