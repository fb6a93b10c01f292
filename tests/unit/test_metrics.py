"""Metrics without sockets: latency buckets, the families built from a node's stats (checked through
the Prometheus text format and parser), and who may read the endpoint."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pserver.bearer import cluster_token
from pserver.config import Config
from pserver.errors import ConfigError
from pserver.metrics import LatencyHistograms, families
from pserver.metrics.exporter import LOCALHOST, _Collector, access
from pserver.security import keygen


def exposition(metrics) -> dict:
    """The samples of ``metrics`` as Prometheus would read them: {(name, labels): value}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: metrics))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_latency_buckets_are_cumulative_and_inclusive():
    h = LatencyHistograms((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.5):
        h.observe("pull", seconds)
    h.observe("push", 0.02)
    buckets, total = h.snapshot()["pull"]
    assert buckets == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]  # le is inclusive: 0.001 <= 0.001
    assert total == pytest.approx(0.5035)
    got = exposition([families.latency("worker", h.snapshot())])
    assert got[("pserver_worker_request_seconds_count", (("op", "pull"),))] == 4
    assert got[("pserver_worker_request_seconds_bucket", (("le", "0.01"), ("op", "push")))] == 0
    assert got[("pserver_worker_request_seconds_bucket", (("le", "+Inf"), ("op", "push")))] == 1
    with pytest.raises(ValueError):
        LatencyHistograms((0.1, 0.01))


WORKER_STATS = {
    "sent_by_op": {"push": {"messages": 7, "bytes": 700}, "heartbeat": {"messages": 2, "bytes": 20}},
    "received_by_op": {"ack": {"messages": 7, "bytes": 70}},
    "filters": {"stages": {"push": {"raw": {"bytes_sent": 1000, "pairs_sent": 10},
                                    "on_wire": {"bytes_sent": 300, "pairs_sent": 4}}},
                "events": {"fixed.clipped": 3}}}


def test_worker_families_carry_its_stats_with_bounded_labels():
    got = exposition(list(families.worker(WORKER_STATS, None, 2, {"computing": 1.5})))
    assert got[("pserver_worker_messages_sent_total", (("op", "push"),))] == 7
    assert got[("pserver_worker_sent_bytes_total", (("op", "heartbeat"),))] == 20
    assert got[("pserver_worker_received_bytes_total", (("op", "ack"),))] == 70
    stage = (("direction", "sent"), ("filter", "on_wire"), ("kind", "push"))
    assert got[("pserver_worker_filter_bytes_total", stage)] == 300
    assert got[("pserver_worker_filter_pairs_total", stage)] == 4
    assert got[("pserver_worker_filter_events_total", (("event", "fixed.clipped"),))] == 3
    assert got[("pserver_worker_requests_tracked", ())] == 2
    assert got[("pserver_worker_time_seconds_total", (("activity", "computing"),))] == 1.5
    labels = {k for _, ls in got for k, _ in ls}
    assert labels <= {"op", "kind", "filter", "direction", "event", "activity", "le"}


def test_server_families():
    stats = {"errors": 1, "rejected": {"AuthError": 2}, "duplicates": 3,
             "replication": {"forwards": 4, "bytes_forwarded": 400, "replica_apply_errors": 0},
             "tables": {"w": {"keys": 10, "bytes": 80, "slot_cache": {"hits": 5, "misses": 6}}},
             "traffic": {"received_by_op": {"push": {"messages": 9, "bytes": 90}}}, "filters": {}}
    got = exposition(list(families.server(stats, held=2, deferred=1)))
    assert got[("pserver_server_errors_total", ())] == 1
    assert got[("pserver_server_rejected_total", (("reason", "AuthError"),))] == 2
    assert got[("pserver_server_replication_forwarded_bytes_total", ())] == 400
    assert got[("pserver_server_held_requests", ())] == 2
    assert got[("pserver_server_replica_deferred_forwards", ())] == 1
    assert got[("pserver_server_table_keys", (("table", "w"),))] == 10
    assert got[("pserver_server_slot_cache_misses_total", (("table", "w"),))] == 6
    assert got[("pserver_server_messages_received_total", (("op", "push"),))] == 9


def test_scheduler_families_show_the_cluster():
    status = {"version": 7, "ring": {"version": 3},
              "nodes": [{"role": "server", "id": 1, "rank": 0, "state": "up", "last_heartbeat": 0.1,
                         "ring_share": 0.6, "traffic": {"bytes_sent": 50, "filters": {"stages": {
                             "push": {"raw": {"bytes_sent": 10}}}}}},
                        {"role": "server", "id": 2, "rank": 1, "state": "dead",
                         "last_heartbeat": 9.0, "ring_share": 0.4},
                        {"role": "worker", "id": 3, "rank": 0, "state": "up", "last_heartbeat": 0.0,
                         "traffic": {"filters": {"stages": {"push": {"raw": {"bytes_sent": 5}}}}}}],
              "scheduler": {"rejected_by_reason": {"AuthError": 4}},
              "tasks": {"lr": {"workers": {"3": {"done": 7, "idle_share": 0.5}, "4": {"done": 5}}}},
              "groups": {"default": {"live": 1, "apps": {"lr": {"tasks": 10, "complete": 4,
                                                                "idle_share": 0.25}}}}}
    got = exposition(list(families.scheduler(status)))
    assert got[("pserver_scheduler_nodes", (("role", "server"), ("state", "dead")))] == 1
    assert got[("pserver_scheduler_node_up", (("id", "2"), ("rank", "1"), ("role", "server")))] == 0
    assert got[("pserver_scheduler_node_heartbeat_age_seconds",
                (("id", "2"), ("rank", "1"), ("role", "server")))] == 9.0
    assert got[("pserver_scheduler_ring_share", (("id", "1"), ("rank", "0")))] == 0.6
    assert got[("pserver_scheduler_ring_version", ())] == 3
    assert got[("pserver_scheduler_filter_sent_bytes_total", (("filter", "raw"), ("kind", "push")))] \
        == 15
    assert got[("pserver_scheduler_rejected_total", (("reason", "AuthError"),))] == 4
    assert got[("pserver_scheduler_app_tasks_complete", (("app", "lr"), ("group", "default")))] == 4
    assert got[("pserver_scheduler_app_idle_share", (("app", "lr"), ("group", "default")))] == 0.25
    assert got[("pserver_scheduler_worker_tasks_done", (("app", "lr"), ("id", "4")))] == 5
    assert got[("pserver_scheduler_app_clock_spread", (("app", "lr"),))] == 2
    assert got[("pserver_scheduler_worker_idle_share", (("app", "lr"), ("id", "3")))] == 0.5


def test_a_failing_collection_yields_nothing_instead_of_raising():
    def broken():
        raise KeyError("x")

    assert _Collector(broken).collect() == []
    calls = []

    def changing():  # a dict of the node's loop changed while read: read again
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return [families.info("worker", {"id": 1})]

    assert len(_Collector(changing).collect()) == 1 and len(calls) == 2


def test_who_may_read_the_endpoint(tmp_path):
    assert access(Config(insecure=True), secure=False) == (LOCALHOST, None)
    keys = keygen(str(tmp_path / "keys"))
    host, token = access(Config(keys=str(keys), host="10.1.2.3"), secure=True)
    assert (host, token) == ("10.1.2.3", cluster_token(keys))
    # a node without the worker key cannot check tokens: it serves localhost only
    (keys / "private" / "worker.key_secret").unlink()
    assert access(Config(keys=str(keys), host="10.1.2.3"), secure=True) == (LOCALHOST, None)


def test_metrics_port_is_validated():
    assert Config.from_env({"PSERVER_METRICS_PORT": "9100"}).metrics_port == 9100
    with pytest.raises(ConfigError):
        Config.from_env({"PSERVER_METRICS_PORT": "70000"})
