"""push_pull: one round trip that pushes and returns the values after the push (real processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pserver
from pserver.errors import DTypeError, ValueShapeError

from .conftest import run_program


def test_push_pull_returns_the_values_after_the_push(cluster_factory):
    cluster = cluster_factory(2, 1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.unique(np.random.default_rng(1).integers(0, 2**64 - 1, 3000, dtype=np.uint64))
        ones = np.ones(len(keys), np.float32)
        for i in range(1, 4):
            got = kv.push_pull(keys, ones)
            assert (got == i).all()
        # asynchronous form, several in flight, with an out buffer and a callback
        out = np.empty(len(keys), np.float32)
        seen = []
        ts = [kv.push_pull(keys, ones, wait=False, callback=lambda v: seen.append(float(v[0])))
              for _ in range(3)]
        ts.append(kv.push_pull(keys, ones, out=out, wait=False))
        results = [kv.wait(t) for t in ts]
        # a callback receives the values; the request is then forgotten (wait returns None)
        assert results[:3] == [None] * 3 and seen == [4.0, 5.0, 6.0]
        assert results[3] is out and (out == 7).all()
        assert kv.tracked() == 0
        assert (kv.pull(keys) == 7).all()
        # vector values, a table with its own updater
        kv.declare_table("emb", dim=3, updater="sgd", updater_args={"lr": 0.5})
        got = kv.push_pull(keys[:10], np.ones((10, 3), np.float32), table="emb")
        assert got.shape == (10, 3) and (got == -0.5).all()
        with pytest.raises(DTypeError):
            kv.push_pull(keys, ones.astype(np.float64))
        with pytest.raises(ValueShapeError):
            kv.push_pull(keys, ones, out=np.empty(3, np.float32))


def test_push_pull_with_filters_and_with_replicas(cluster_factory):
    cluster = cluster_factory(3, 1, replication=1)
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.arange(0, 50_000, 7, dtype=np.uint64)
        ones = np.ones(len(keys), np.float32)
        kv.declare_table("f", push_filters="compress", pull_filters="compress")  # two requests
        for i in range(1, 3):
            assert (kv.push_pull(keys, ones, table="f") == i).all()
            assert (kv.push_pull(keys, ones) == i).all()   # k=1: answered once replicas have it
        assert (kv.pull(keys) == 2).all()


def test_push_pull_on_a_synchronous_table_sees_the_whole_round(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 3)
    rounds = 5
    assert run_program(cluster, "pushpull_worker", str(tmp_path), str(rounds)) == 0
    for rank in range(3):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for r, seen in enumerate(res["seen"]):
            # key k gets -0.5 * (sum of the pushes of the ranks holding it) per round; rank 2
            # pushes every key with 3, ranks 0 and 1 alternate keys with 1 and 2
            want = [-0.5 * (3 + 1 + (k // 3) % 2) * (r + 1) for k in res["first_keys"]]
            assert seen == pytest.approx(want), (rank, r, seen)
