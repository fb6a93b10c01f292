"""Admission and eviction on real server processes: the memory a table holds stays under
--max-table-bytes while the IDs pushed grow tenfold, and after a master's evictions its replica,
promoted by a failover (k = 1), serves the same values."""

from __future__ import annotations

import signal
import time

import numpy as np

import pserver
from pserver.apps.export import server_stats

DIM = 8
ROW_COST = DIM * 4 * 2 + 80   # float32 values + adagrad state, index and usage bytes per row


def _table_stats(kv, name: str) -> list[dict]:
    return [s["tables"][name] for s in server_stats(kv)]


def test_an_id_gets_a_row_on_its_nth_push_on_every_server(cluster_factory):
    cluster = cluster_factory(2, 1, replication=1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("a", dim=2, init="constant:1", updater="sum", admit_after=3)
        keys = np.unique(np.random.default_rng(2).integers(0, 2**63, 500, dtype=np.uint64))
        for _ in range(2):
            kv.wait(kv.push(keys, np.ones((keys.size, 2), np.float32), table="a"))
        assert (kv.pull(keys, table="a") == 1).all()       # the initializer: pushes dropped
        stats = _table_stats(kv, "a")
        assert sum(s["keys"] for s in stats) == 0
        assert sum(s["pushes_dropped"] for s in stats) == 2 * 2 * keys.size   # master + replica
        kv.wait(kv.push(keys, np.ones((keys.size, 2), np.float32), table="a"))
        assert (kv.pull(keys, table="a") == 2).all()
        # every key stored twice (master and replica): the replica admitted what the master did
        assert sum(s["keys"] for s in _table_stats(kv, "a")) == 2 * keys.size


def test_a_table_stays_under_its_budget_while_the_ids_grow_tenfold(cluster_factory):
    budget_rows = 4000
    cluster = cluster_factory(2, 1, replication=1,
                              settings={"max_table_bytes": str(budget_rows * ROW_COST)})
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("emb", dim=DIM, init="normal:0.01", updater="adagrad",
                         updater_args={"lr": 0.1})
        rng = np.random.default_rng(0)
        hot = np.unique(rng.integers(0, 2**63, 100, dtype=np.uint64))
        ids = rng.permutation(np.arange(1, 10 * budget_rows + 1, dtype=np.uint64))
        seen = {}
        for i in range(0, ids.size, 1000):       # 40,000 new IDs: 10x the budget
            keys = np.unique(np.concatenate([hot, pserver.ring.mix64(ids[i:i + 1000])]))
            kv.wait(kv.push(keys, np.ones((keys.size, DIM), np.float32), table="emb"))
            if i + 1000 in (3 * budget_rows, 10 * budget_rows):
                seen[i + 1000] = _table_stats(kv, "emb")
        for s in seen[10 * budget_rows]:
            assert s["budget_bytes"] <= budget_rows * ROW_COST, s
            assert s["keys"] <= budget_rows
            assert s["rows_evicted"] > 0
        # once the budget is reached, the memory held does not grow with the IDs (bookkeeping
        # such as the list of free slots varies by a few bytes)
        for late, early in zip(seen[10 * budget_rows], seen[3 * budget_rows], strict=True):
            assert late["bytes"] <= early["bytes"] * 1.02, (late, early)
            assert late["bytes"] <= budget_rows * ROW_COST     # allocated, not only counted
        assert (kv.pull(hot, table="emb") < -0.05).all()     # pushed every time: never evicted


def test_after_evictions_a_failover_reads_the_values_the_master_served(cluster_factory):
    cluster = cluster_factory(2, 1, replication=1, heartbeat_timeout=2.0)
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("e", dim=4, init="normal:0.1", updater="sgd", updater_args={"lr": 0.5},
                         ttl_steps=64)
        rng = np.random.default_rng(1)
        cold = np.unique(rng.integers(0, 2**63, 2000, dtype=np.uint64))
        hot = np.unique(rng.integers(0, 2**63, 200, dtype=np.uint64))
        keys = np.union1d(cold, hot)
        kv.wait(kv.push(cold, np.ones((cold.size, 4), np.float32), table="e"))
        for _ in range(200):
            kv.wait(kv.push(hot, np.ones((hot.size, 4), np.float32), table="e"))
        assert sum(s["rows_evicted"] for s in _table_stats(kv, "e")) >= cold.size  # master + replica
        before = kv.pull(keys, table="e")
        cluster.kill("server 1", signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(kv.membership.view.role_nodes("server")) > 1:
            assert time.monotonic() < deadline, "the failover was not noticed"
            time.sleep(0.1)
        after = kv.pull(keys, table="e")
        assert np.array_equal(after, before)
