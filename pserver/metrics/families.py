"""A node's counters as Prometheus metric families, built at scrape time (no I/O here).

Each function reads what the node already counts - ``KVWorker.stats()``, ``KVServer.stats()``, the
scheduler's status - so nothing is added to the request path. Labels stay bounded: op, table,
filter stage, message kind, reason, group, application, node id (never a key).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


def traffic(role: str, report: dict[str, Any]) -> Iterator[Metric]:
    """Messages and bytes per op, sent and received (a TrafficCounters.to_json() report)."""
    for side, key in (("sent", "sent_by_op"), ("received", "received_by_op")):
        msgs = CounterMetricFamily(f"pserver_{role}_messages_{side}_total",
                                   f"messages {side} by this node, per op", labels=["op"])
        nbytes = CounterMetricFamily(f"pserver_{role}_{side}_bytes_total",
                                     f"bytes {side} by this node, per op", labels=["op"])
        for op, c in sorted(report.get(key, {}).items()):
            msgs.add_metric([op], c.get("messages", 0))
            nbytes.add_metric([op], c.get("bytes", 0))
        yield msgs
        yield nbytes


def filters(role: str, report: dict[str, Any]) -> Iterator[Metric]:
    """Bytes and pairs before/after each filter stage ("raw" first, "on_wire" last) per message
    kind, and the filters' event counters (a filters.Counters.to_json() report)."""
    labels = ["kind", "filter", "direction"]
    nbytes = CounterMetricFamily(f"pserver_{role}_filter_bytes_total",
                                 "bytes of messages after each filter stage", labels=labels)
    pairs = CounterMetricFamily(f"pserver_{role}_filter_pairs_total",
                                "(key, value) pairs after each filter stage", labels=labels)
    for kind, stages in sorted(report.get("stages", {}).items()):
        for stage, c in stages.items():
            for side in ("sent", "received"):
                nbytes.add_metric([kind, stage, side], c.get(f"bytes_{side}", 0))
                pairs.add_metric([kind, stage, side], c.get(f"pairs_{side}", 0))
    events = CounterMetricFamily(f"pserver_{role}_filter_events_total",
                                 "filter events (e.g. values clipped, key-cache misses)",
                                 labels=["event"])
    for name, n in sorted(report.get("events", {}).items()):
        events.add_metric([name], n)
    yield from (nbytes, pairs, events)


def latency(role: str, snapshot: dict[str, tuple[list[tuple[str, int]], float]]) -> Metric:
    """A LatencyHistograms snapshot as one histogram family, labelled by op."""
    h = HistogramMetricFamily(f"pserver_{role}_request_seconds",
                              "time from issuing a request to its last reply", labels=["op"])
    for op, (buckets, total) in sorted(snapshot.items()):
        h.add_metric([op], buckets, total)
    return h


def info(role: str, labels: dict[str, Any]) -> Metric:
    """``pserver_<role>_info{...} 1``: who this node is (id, rank, ...)."""
    g = GaugeMetricFamily(f"pserver_{role}_info", "this node's identity", labels=sorted(labels))
    g.add_metric([str(labels[k]) for k in sorted(labels)], 1)
    return g


def _counter(name: str, doc: str, value: float) -> Metric:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _gauge(name: str, doc: str, value: float) -> Metric:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def worker(stats: dict[str, Any], latencies: dict | None, tracked: int,
           idle: dict[str, float] | None = None) -> Iterator[Metric]:
    """A worker's families: traffic, filters, request latency, requests held, time shares."""
    yield from traffic("worker", stats)
    yield from filters("worker", stats.get("filters", {}))
    if latencies is not None:
        yield latency("worker", latencies)
    yield _gauge("pserver_worker_requests_tracked", "requests pending or finished but not waited "
                                                    "for", tracked)
    if idle:
        g = CounterMetricFamily("pserver_worker_time_seconds", "seconds this worker spent per "
                                "activity (its IdleTimer)", labels=["activity"])
        for activity, seconds in sorted(idle.items()):
            g.add_metric([activity], seconds)
        yield g


def server(stats: dict[str, Any], held: int, deferred: int) -> Iterator[Metric]:
    """A server's families: traffic, filters, errors and refusals, replication, tables."""
    yield from traffic("server", stats.get("traffic", {}))
    yield from filters("server", stats.get("filters", {}))
    yield _counter("pserver_server_errors_total", "requests answered with an error",
                   stats.get("errors", 0))
    rejected = CounterMetricFamily("pserver_server_rejected_total", "requests refused, per reason",
                                   labels=["reason"])
    for reason, n in sorted(stats.get("rejected", {}).items()):
        rejected.add_metric([reason], n)
    yield rejected
    yield _counter("pserver_server_duplicate_requests_total", "requests recognised as resent "
                   "duplicates (exactly-once)", stats.get("duplicates", 0))
    repl = stats.get("replication", {})
    for key, name, doc in (("forwards", "forwards", "updates forwarded to replicas"),
                           ("bytes_forwarded", "forwarded_bytes", "bytes forwarded to replicas"),
                           ("key_list_misses", "key_list_misses", "replica key-list cache misses"),
                           ("resyncs_requested", "resyncs_requested", "re-copies replicas asked"),
                           ("replica_apply_errors", "replica_apply_errors",
                            "forwards that failed to apply here as a replica")):
        yield _counter(f"pserver_server_replication_{name}_total", doc, repl.get(key, 0))
    yield _gauge("pserver_server_held_requests", "requests held (behind a sync round, a "
                 "migration or a missing view)", held)
    yield _gauge("pserver_server_replica_deferred_forwards", "forwards received as a replica, "
                 "queued to apply", deferred)
    keys = GaugeMetricFamily("pserver_server_table_keys", "keys stored", labels=["table"])
    nbytes = GaugeMetricFamily("pserver_server_table_bytes", "bytes of a table's store",
                               labels=["table"])
    hits = CounterMetricFamily("pserver_server_slot_cache_hits_total", "key lists whose slots "
                               "were cached", labels=["table"])
    misses = CounterMetricFamily("pserver_server_slot_cache_misses_total", "key lists looked up "
                                 "in the hash index", labels=["table"])
    for name, t in sorted(stats.get("tables", {}).items()):
        keys.add_metric([name], t.get("keys", 0))
        nbytes.add_metric([name], t.get("bytes", 0))
        cache = t.get("slot_cache") or {}
        hits.add_metric([name], cache.get("hits", 0))
        misses.add_metric([name], cache.get("misses", 0))
    yield from (keys, nbytes, hits, misses)


def _node_labels(n: dict[str, Any]) -> list[str]:
    return [n["role"], str(n["id"]), str(n["rank"])]


def scheduler(status: dict[str, Any]) -> Iterator[Metric]:
    """The cluster-wide view: nodes and states, heartbeat ages, ring version and shares, traffic
    per node and per filter stage, refusals, worker groups and task progress."""
    nodes = status.get("nodes", [])
    states = GaugeMetricFamily("pserver_scheduler_nodes", "nodes per role and state",
                               labels=["role", "state"])
    counts: dict[tuple[str, str], int] = {}
    for n in nodes:
        counts[(n["role"], n["state"])] = counts.get((n["role"], n["state"]), 0) + 1
    for (role, state), c in sorted(counts.items()):
        states.add_metric([role, state], c)
    yield states
    labels = ["role", "id", "rank"]
    up = GaugeMetricFamily("pserver_scheduler_node_up", "1 while the node is alive", labels=labels)
    age = GaugeMetricFamily("pserver_scheduler_node_heartbeat_age_seconds",
                            "seconds since the node's last heartbeat", labels=labels)
    sent = CounterMetricFamily("pserver_scheduler_node_sent_bytes_total",
                               "bytes the node sent, as its heartbeats report", labels=labels)
    received = CounterMetricFamily("pserver_scheduler_node_received_bytes_total",
                                   "bytes the node received, as its heartbeats report",
                                   labels=labels)
    share = GaugeMetricFamily("pserver_scheduler_ring_share", "fraction of the key ring a "
                              "server owns", labels=["id", "rank"])
    stage_bytes: dict[tuple[str, str], int] = {}
    for n in nodes:
        up.add_metric(_node_labels(n), 1 if n["state"] == "up" else 0)
        age.add_metric(_node_labels(n), n.get("last_heartbeat", 0.0))
        t = n.get("traffic") or {}
        if t:
            sent.add_metric(_node_labels(n), t.get("bytes_sent", 0))
            received.add_metric(_node_labels(n), t.get("bytes_received", 0))
        for kind, stages in (t.get("filters") or {}).get("stages", {}).items():
            for stage, c in stages.items():
                key = (kind, stage)
                stage_bytes[key] = stage_bytes.get(key, 0) + c.get("bytes_sent", 0)
        if "ring_share" in n:
            share.add_metric([str(n["id"]), str(n["rank"])], n["ring_share"])
    yield from (up, age, sent, received, share)
    fb = CounterMetricFamily("pserver_scheduler_filter_sent_bytes_total", "bytes sent after each "
                             "filter stage, summed over the nodes", labels=["kind", "filter"])
    for (kind, stage), b in sorted(stage_bytes.items()):
        fb.add_metric([kind, stage], b)
    yield fb
    yield _gauge("pserver_scheduler_view_version", "version of the cluster view",
                 status.get("version", 0))
    yield _gauge("pserver_scheduler_ring_version", "version of the key ring",
                 (status.get("ring") or {}).get("version", 0))
    s = status.get("scheduler", {})
    rejected = CounterMetricFamily("pserver_scheduler_rejected_total", "messages the scheduler "
                                   "refused, per reason (security refusals among them)",
                                   labels=["reason"])
    for reason, c in sorted(s.get("rejected_by_reason", {}).items()):
        rejected.add_metric([reason], c)
    yield rejected
    yield from _groups(status.get("groups", {}))
    yield from _clocks(status.get("tasks", {}))


def _clocks(tasks: dict[str, Any]) -> Iterable[Metric]:
    """Tasks done per worker and their spread per application: how far the workers' clocks
    drift apart (the paper's bounded-delay question)."""
    done = GaugeMetricFamily("pserver_scheduler_worker_tasks_done", "tasks a worker finished",
                             labels=["app", "id"])
    spread = GaugeMetricFamily("pserver_scheduler_app_clock_spread", "tasks done by the most "
                               "advanced worker minus the least advanced", labels=["app"])
    idle = GaugeMetricFamily("pserver_scheduler_worker_idle_share", "share of its time a worker "
                             "waited (dependencies or network)", labels=["app", "id"])
    for app, p in sorted(tasks.items()):
        counts = []
        for nid, w in sorted(p.get("workers", {}).items()):
            done.add_metric([app, str(nid)], w.get("done", 0))
            counts.append(w.get("done", 0))
            if "idle_share" in w:
                idle.add_metric([app, str(nid)], w["idle_share"])
        if counts:
            spread.add_metric([app], max(counts) - min(counts))
    return (done, spread, idle)


def _groups(groups: dict[str, Any]) -> Iterable[Metric]:
    live = GaugeMetricFamily("pserver_scheduler_group_live_workers", "live workers per group",
                             labels=["group"])
    tasks = GaugeMetricFamily("pserver_scheduler_app_tasks", "tasks of an application",
                              labels=["group", "app"])
    done = GaugeMetricFamily("pserver_scheduler_app_tasks_complete", "tasks complete",
                             labels=["group", "app"])
    idle = GaugeMetricFamily("pserver_scheduler_app_idle_share", "mean share of time the "
                             "application's workers wait", labels=["group", "app"])
    for name, g in sorted(groups.items()):
        live.add_metric([name], g.get("live", 0))
        for app, p in sorted(g.get("apps", {}).items()):
            tasks.add_metric([name, app], p.get("tasks") or 0)
            done.add_metric([name, app], p.get("complete") or 0)
            if p.get("idle_share") is not None:
                idle.add_metric([name, app], p["idle_share"])
    return (live, tasks, done, idle)


# -- one node's families, read duck-typed from the node object (this layer imports no kv) --------
def of_server(node: Any) -> list[Metric]:
    """Every family of a KVServer (called at scrape time, in the endpoint's thread)."""
    core, m = node.core, node.membership
    held = sum(len(q) for q in list(core.held.values()))
    return [info("server", {"id": m.node_id, "rank": m.rank}),
            *server(node.stats(), held, len(core.replica.deferred))]


def of_worker(node: Any) -> list[Metric]:
    """Every family of a KVWorker."""
    m = node.membership
    timer = node.idle_timer
    idle = None
    if timer is not None:  # IdleTimer.snapshot(): "<activity>_s" seconds, besides shares and sums
        idle = {k[:-2]: v for k, v in timer.snapshot().items()
                if k.endswith("_s") and k not in ("tracked_s", "wall_s")}
    return [info("worker", {"id": m.node_id, "rank": m.rank, "group": node.group}),
            *worker(node.stats(), node.latency.snapshot() if node.latency is not None else None,
                    node.tracked(), idle)]


def of_scheduler(node: Any) -> list[Metric]:
    """Every family of the Scheduler: the cluster-wide view."""
    status = node.status()
    return [info("scheduler", {"port": node.port}),
            *traffic("scheduler", status.get("scheduler", {}).get("traffic", {})),
            *scheduler(status)]
