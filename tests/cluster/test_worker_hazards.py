"""Worker-side hazards on a real cluster: requests that could hang, grow or lose values."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import pserver
from pserver.errors import LimitError, ValueShapeError


def _workers(*cfgs) -> list[pserver.KVWorker]:
    """Workers joining together (the cluster starts once all of them registered)."""
    with ThreadPoolExecutor(len(cfgs)) as pool:
        return list(pool.map(pserver.KVWorker, cfgs))


def test_callback_only_requests_are_not_kept(cluster_factory):
    cluster = cluster_factory(2, 1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.arange(0, 64, dtype=np.uint64)
        seen = []
        for _ in range(200):
            kv.pull(keys, wait=False, callback=lambda v: seen.append(v.shape))
            kv.push(keys, np.ones(64, np.float32), callback=lambda: None)
        kv.wait(kv.push(keys, np.ones(64, np.float32)))  # FIFO: every request before it is done
        assert len(seen) == 200
        assert kv.tracked() == 0  # nobody waits for the pulls: nothing of them may stay


def test_replies_over_the_workers_limits_fail_or_are_paged(cluster_factory):
    cluster = cluster_factory(2, 2)
    n = 30_000
    keys = np.arange(n, dtype=np.uint64) * 7
    # 30,000 keys x 12 bytes: every server's range reply is several times the small worker's limit
    small_cfg = dataclasses.replace(cluster.config(1), max_message_bytes=32 << 10)
    kv, small = _workers(cluster.config(0), small_cfg)
    with kv, small:
        kv.wait(kv.push(keys, np.arange(n, dtype=np.float32)))
        got_keys, got_vals = small.wait(small.pull_range(wait=False), timeout=60)
        assert got_keys.tolist() == keys.tolist()
        assert got_vals.tolist() == np.arange(n, dtype=np.float32).tolist()
        with pytest.raises(LimitError, match="PSERVER_MAX_MESSAGE_BYTES"):
            small.wait(small.pull(keys, wait=False), timeout=60)
        assert (small.pull(keys[:100]) == np.arange(100)).all()  # the worker goes on


def test_close_flushes_what_the_significant_filter_holds_back(cluster_factory):
    cluster = cluster_factory(2, 2)
    keys = np.arange(0, 1000, 3, dtype=np.uint64)
    reader, kv = _workers(cluster.config(1), cluster.config(0))
    with reader:
        with kv:
            kv.declare_table("sig", push_filters="significant:abs:10")
            kv.wait(kv.push(keys, np.ones(len(keys), np.float32), table="sig"))
            assert (kv.pull(keys, table="sig") == 0).all()  # held back so far
        reader.declare_table("sig", push_filters="significant:abs:10")
        assert (reader.pull(keys, table="sig") == 1).all()


def test_a_push_whose_filter_raises_leaves_nothing_pending(cluster_factory):
    cluster = cluster_factory(2, 1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("rel", push_filters="significant:rel:0.1")
        kv.filters.set_weights("rel", lambda k: np.zeros(3))  # a wrong weight source
        keys = np.arange(0, 100_000, 10, dtype=np.uint64)
        with pytest.raises(ValueShapeError):
            kv.push(keys, np.ones(len(keys), np.float32), table="rel")
        kv.wait_all(timeout=10)
        assert kv.tracked() == 0
        kv.wait(kv.push(keys, np.ones(len(keys), np.float32)))
