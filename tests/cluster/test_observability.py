"""Observability on a real cluster: /metrics of every role scraped during a job and parsed with the
Prometheus text parser (its counters match the worker's own stats), the endpoint's bearer token on
a secure cluster, and a timeline file with a span for every request the worker made."""

from __future__ import annotations

import itertools
import json
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pserver
from pserver.bearer import cluster_token
from pserver.errors import ConfigError
from pserver.launch import free_port
from pserver.membership.client import scheduler_request
from pserver.trace import load

from .conftest import pserver_cli

SCAN = 8  # ports from the base one on: every node of a small cluster on this host takes one


def scrape_all(base: int, headers: dict | None = None) -> dict[str, list[dict]]:
    """{role: [metrics of each node of that role]} from the endpoints on base..base+SCAN;
    each node's metrics as {(name, labels as a sorted tuple): value}."""
    found: dict[str, list[dict]] = {}
    for port in range(base, base + SCAN):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10)
        except httpx.TransportError:
            continue
        assert r.status_code == 200, r.text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(r.text) for s in fam.samples}
        role = next(n.split("_")[1] for n, _ in samples if n.endswith("_info"))
        found.setdefault(role, []).append(samples)
    return found


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_metrics_of_every_role_match_the_nodes_counters(cluster_factory):
    base = free_port()
    cluster = cluster_factory(2, 1, settings={"metrics_port": base})
    keys = np.arange(0, 20_000, 3, dtype=np.uint64)
    with pserver.KVWorker(cluster.config(0)) as kv:
        for _ in range(5):
            kv.wait(kv.push(keys, np.ones(len(keys), np.float32)))
        for _ in range(3):
            kv.pull(keys)
        kv.push_pull(keys[:100], np.ones(100, np.float32))
        stats = kv.stats()
        nodes = wait_for(lambda: (lambda f: f if len(f.get("server", [])) == 2
                                  and "scheduler" in f else None)(scrape_all(base)))
        assert sorted(nodes) == ["scheduler", "server", "worker"], nodes.keys()
        (w,) = nodes["worker"]
        for op in ("push", "pull"):  # the data plane is quiet now: exact equality
            assert value(w, "pserver_worker_messages_sent_total", op=op) == \
                stats["sent_by_op"][op]["messages"] > 0
            assert value(w, "pserver_worker_sent_bytes_total", op=op) == \
                stats["sent_by_op"][op]["bytes"]
        assert value(w, "pserver_worker_received_bytes_total", op="vals") == \
            stats["received_by_op"]["vals"]["bytes"]
        # one latency observation per request, by kind
        assert value(w, "pserver_worker_request_seconds_count", op="push") == 5
        assert value(w, "pserver_worker_request_seconds_count", op="pull") == 3
        assert value(w, "pserver_worker_request_seconds_count", op="pushpull") == 1
        assert value(w, "pserver_worker_request_seconds_bucket", op="pull", le="+Inf") == 3
        assert value(w, "pserver_worker_requests_tracked") == 0
        # the servers received what the worker sent, and store every key
        servers = nodes["server"]
        assert sum(value(s, "pserver_server_messages_received_total", op="push")
                   for s in servers) == stats["sent_by_op"]["push"]["messages"]
        assert sum(value(s, "pserver_server_table_keys", table="default")
                   for s in servers) == 2 * len(keys)  # master and replica (replication 1)
        assert all(value(s, "process_resident_memory_bytes") > 0 for s in servers)
        (sch,) = nodes["scheduler"]
        assert value(sch, "pserver_scheduler_nodes", role="server", state="up") == 2
        assert value(sch, "pserver_scheduler_nodes", role="worker", state="up") == 1
        shares = [v for (n, _), v in sch.items() if n == "pserver_scheduler_ring_share"]
        assert len(shares) == 2 and abs(sum(shares) - 1) < 1e-3
        assert value(sch, "pserver_scheduler_ring_version") >= 1


def test_off_by_default_a_worker_keeps_no_observer(cluster_factory):
    """Without PSERVER_METRICS_PORT and PSERVER_TRACE the request path's only cost is a None check."""
    cluster = cluster_factory(1, 1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.wait(kv.push(np.arange(3, dtype=np.uint64), np.ones(3, np.float32)))
        assert kv._tracker.on_complete is None and kv._metrics is None
        assert kv.latency is None and kv.trace is None


def test_an_unwritable_trace_path_is_a_config_error_and_the_cluster_goes_on(cluster_factory,
                                                                            tmp_path):
    cluster = cluster_factory(1, 1, settings={"metrics_port": free_port()},
                              scheduler_args=["--keep-alive"])  # its only worker fails and leaves
    with pytest.raises(ConfigError, match="trace file"):
        pserver.KVWorker(cluster.config(0), trace=str(tmp_path / "missing" / "run.json"))
    # it left the cluster at once: no heartbeating half-made worker stays behind
    status = scheduler_request(cluster.config(), "status", role="worker")
    assert [n["state"] for n in status.meta["nodes"] if n["role"] == "worker"] == ["left"]
    with pserver.KVWorker(cluster.config(0)) as kv:  # the failed one left the cluster
        kv.wait(kv.push(np.arange(3, dtype=np.uint64), np.ones(3, np.float32)))
        assert kv._metrics is not None


def test_metrics_of_a_secure_cluster_need_the_bearer_token(cluster_factory):
    base = free_port()
    cluster = cluster_factory(1, 1, insecure=False, settings={"metrics_port": base})
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.wait(kv.push(np.arange(5, dtype=np.uint64), np.ones(5, np.float32)))
        refused = wait_for(lambda: [p for p in range(base, base + SCAN) if _status(p) == 401])
        assert len(refused) == 3, refused  # scheduler, server, this worker: none answers without
        r = httpx.get(f"http://127.0.0.1:{refused[0]}/metrics",
                      headers={"Authorization": "Bearer 00"}, timeout=10)
        assert r.status_code == 401 and "invalid bearer token" in r.text
        token = cluster_token(cluster.keys)
        nodes = scrape_all(base, {"Authorization": f"Bearer {token}"})
        assert sorted(nodes) == ["scheduler", "server", "worker"]
        assert value(nodes["worker"][0], "pserver_worker_messages_sent_total", op="push") == \
            kv.stats()["sent_by_op"]["push"]["messages"]


def _status(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code
    except httpx.TransportError:
        return None


def test_trace_files_hold_a_span_for_every_request_and_merge(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 1, settings={"trace": str(tmp_path / "run.json")})
    path = tmp_path / "worker.json"
    keys = np.arange(0, 5_000, dtype=np.uint64)
    with pserver.KVWorker(cluster.config(0), trace=str(path)) as kv:
        pushes = [kv.push(keys, np.ones(len(keys), np.float32)) for _ in range(6)]
        for ts in pushes:
            kv.wait(ts)
        for _ in range(4):
            kv.pull(keys)
        kv.push_pull(keys, np.ones(len(keys), np.float32))
    data = json.loads(path.read_text())  # strict JSON, Chrome's object form
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    for e in spans:
        assert {"name", "pid", "tid", "ts", "dur"} <= e.keys() and e["dur"] >= 0
    names = [e["name"] for e in spans]
    assert names.count("push") == 6 and names.count("pull") == 4 and names.count("pushpull") == 1
    assert names.count("wait") == 6 + 4 + 1
    assert sorted(e["args"]["ts"] for e in spans if e["name"] != "wait") == \
        sorted(e["args"]["ts"] for e in spans if e["name"] == "wait")
    # overlapping requests never share a track
    by_tid: dict[int, list] = {}
    for e in spans:
        by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for intervals in by_tid.values():
        intervals.sort()
        assert all(b[0] >= a[1] - 1 for a, b in itertools.pairwise(intervals))
    cluster.stop()  # the servers close their (sampled) traces
    server_files = sorted(tmp_path.glob("run.server-*.json"))
    assert len(server_files) == 2
    assert sum(1 for f in server_files for e in load(str(f)) if e["ph"] == "X") >= 1
    out = tmp_path / "all.json"
    done = pserver_cli("trace", "merge", str(path), *map(str, server_files), "-o", str(out))
    assert done.returncode == 0, done.stderr
    merged = json.loads(out.read_text())["traceEvents"]
    assert len(merged) == len(data["traceEvents"]) + sum(len(load(str(f))) for f in server_files)
