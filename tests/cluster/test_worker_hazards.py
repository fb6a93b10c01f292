"""Worker-side hazards on a real cluster: requests that could hang, grow or lose values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pserver
from pserver.errors import DTypeError, LimitError


def test_callback_only_requests_are_not_kept(cluster_factory):
    cluster = cluster_factory(2, 1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.arange(0, 64, dtype=np.uint64)
        seen = []
        for _ in range(200):
            kv.pull(keys, wait=False, callback=lambda v: seen.append(v.shape))
            kv.push(keys, np.ones(64, np.float32), callback=lambda: None)
        kv.wait(kv.push(keys, np.ones(64, np.float32)))  # FIFO: every request before it is done
        kv.wait_all()
        assert len(seen) == 200
        assert kv.tracked() == 0


def test_replies_over_the_workers_limits_fail_or_are_paged(cluster_factory):
    cluster = cluster_factory(2, 1)
    n = 30_000
    keys = np.arange(n, dtype=np.uint64) * 7
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.wait(kv.push(keys, np.arange(n, dtype=np.float32)))
    # 30,000 keys x 12 bytes: every server's range reply is several times this worker's limit
    small = dataclasses.replace(cluster.config(0), max_message_bytes=32 << 10)
    with pserver.KVWorker(small) as kv:
        got_keys, got_vals = kv.wait(kv.pull_range(wait=False), timeout=60)
        assert got_keys.tolist() == keys.tolist()
        assert got_vals.tolist() == np.arange(n, dtype=np.float32).tolist()
        with pytest.raises(LimitError, match="PSERVER_MAX_MESSAGE_BYTES"):
            kv.wait(kv.pull(keys, wait=False), timeout=60)
        assert (kv.pull(keys[:100]) == np.arange(100)).all()  # the worker goes on


def test_close_flushes_what_the_significant_filter_holds_back(cluster_factory):
    cluster = cluster_factory(2, 1)
    keys = np.arange(0, 1000, 3, dtype=np.uint64)
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("sig", push_filters="significant:abs:10")
        kv.wait(kv.push(keys, np.ones(len(keys), np.float32), table="sig"))
        assert (kv.pull(keys, table="sig") == 0).all()  # held back so far
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("sig", push_filters="significant:abs:10")
        assert (kv.pull(keys, table="sig") == 1).all()


def test_a_push_whose_filter_raises_leaves_nothing_pending(cluster_factory):
    cluster = cluster_factory(2, 1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("ints", dtype="int32", push_filters="significant:abs:1")
        keys = np.arange(10, dtype=np.uint64)
        with pytest.raises(DTypeError):
            kv.push(keys, np.ones(10, np.int32), table="ints")
        kv.wait_all(timeout=10)
        assert kv.tracked() == 0
        kv.wait(kv.push(keys, np.ones(10, np.float32)))
