"""Checkpoints on a real cluster: the CLI, a server killed half-way through a checkpoint, periodic
checkpoints, losing k+1 servers, and restoring into a cluster with another number of servers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import pserver
from pserver.errors import DataLostError, RemoteError
from pserver.ft import checkpoint as ck
from pserver.membership.client import scheduler_request
from pserver.ring import mix64
from pserver.store.spec import TableSpec
from pserver.store.table import Table

from .conftest import pserver_cli

EMB = {"dim": 4, "updater": "adagrad", "updater_args": {"lr": 0.5}}
KEYS = np.unique(np.concatenate([np.arange(20_000, dtype=np.uint64),                # dense ids
                                 mix64(np.arange(3_000, dtype=np.uint64) + np.uint64(5))]))


def _grads(salt: float) -> np.ndarray:
    return ((KEYS % np.uint64(97)).astype(np.float32)[:, None] + np.arange(4, dtype=np.float32)
            + salt)


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_checkpoint_killed_half_way_leaves_the_previous_one(cluster_factory, tmp_path):
    d = tmp_path / "ckpt"
    # secure: the scheduler's credentials start checkpoints; each server sleeps 1 s mid-shard
    cluster = cluster_factory(2, 1, insecure=False, checkpoint_dir=str(d),
                              env={ck.DELAY_ENV: "1.0"})
    kv = pserver.KVWorker(cluster.config(0))
    try:
        kv.declare_table("emb", **EMB)
        kv.wait(kv.push(KEYS, _grads(0), table="emb"))
        v1 = kv.pull(KEYS, table="emb")
        done = pserver_cli("checkpoint", env=cluster.env(), timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"checkpoint ckpt-000001 written to {d}/ckpt-000001: "
                                      f"{len(KEYS):,} keys in 2 tables from 2 servers")
        kv.wait(kv.push(KEYS, _grads(1), table="emb"))   # newer than checkpoint 1
        with pytest.raises(RemoteError, match="a worker may not send 'checkpoint'"):
            scheduler_request(cluster.config(0), "checkpoint", role="worker")

        proc = subprocess.Popen([sys.executable, "-m", "pserver", "checkpoint"], env=cluster.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        partial = d / "ckpt-000002.partial"
        _wait_for(partial.is_dir, 20, "checkpoint 2 to begin")
        time.sleep(0.3)                                 # the servers are inside write_shard now
        cluster.kill("server 0")                        # SIGKILL half-way through its shard
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, out
        assert "checkpoint ckpt-000002 aborted: server(s) [1] died while writing their shards" in err
        assert "the last complete checkpoint is still ckpt-000001" in err
        assert ck.latest(str(d)) == "ckpt-000001" and partial.is_dir()
        assert not (partial / "manifest.json").exists()
        _, restored = ck.load(str(d), lambda keys: np.ones(len(keys), bool))
        assert np.array_equal(restored["emb"].keys, KEYS)
        assert np.array_equal(restored["emb"].values, v1)  # checkpoint 1 exactly, not the newer push
    finally:
        kv.close()


def _adagrad_reference(*grads: np.ndarray) -> np.ndarray:
    t = Table(TableSpec("emb", **EMB))
    for g in grads:
        t.push(KEYS, g)
    return t.pull(KEYS)


def test_restore_into_a_different_number_of_servers(cluster_factory, tmp_path):
    d = tmp_path / "ckpt"
    c1 = cluster_factory(3, 1, checkpoint_dir=str(d))
    kv = pserver.KVWorker(c1.config(0))
    kv.declare_table("emb", **EMB)
    kv.wait(kv.push(KEYS, _grads(0), table="emb"))
    kv.wait(kv.push(KEYS, np.arange(len(KEYS), dtype=np.float32)))        # the default table
    v1 = kv.pull(KEYS, table="emb")
    assert np.array_equal(v1, _adagrad_reference(_grads(0)))
    done = c1.checkpoint()
    assert (done["name"], done["servers"], done["keys"]) == ("ckpt-000001", 3, 2 * len(KEYS))
    kv.wait(kv.push(KEYS, _grads(5), table="emb"))      # lost with the cluster: after the checkpoint
    old_ids = set(kv.membership.view.nodes)
    c1.kill("server 0")
    c1.kill("server 1")                                 # k+1 = 2 of 3 servers: some ranges are gone
    kv.close()
    c1.stop()

    c2 = cluster_factory(2, 1, restore=str(d))          # 2 servers restore what 3 wrote
    kv = pserver.KVWorker(c2.config(0))
    try:
        assert kv.num_servers == 2
        assert min(kv.membership.view.nodes) > max(old_ids)  # no node id of the old cluster reused
        kv.declare_table("emb", **EMB)                  # the same spec: accepted
        assert np.array_equal(kv.pull(KEYS, table="emb"), v1)
        assert np.array_equal(kv.pull(KEYS), np.arange(len(KEYS), dtype=np.float32))
        rk, _ = kv.pull_range(table="emb")
        assert np.array_equal(rk, KEYS)                 # every key once, none invented
        # the optimizer state came back too: adagrad continues as if never interrupted
        kv.wait(kv.push(KEYS, _grads(2), table="emb"))
        assert np.allclose(kv.pull(KEYS, table="emb"), _adagrad_reference(_grads(0), _grads(2)),
                           rtol=1e-6, atol=1e-6)
        status = scheduler_request(c2.config(), "status", role="worker").meta
        assert status["scheduler"]["checkpoints"]["dir"] == str(d)   # checkpoints continue there
        assert c2.checkpoint()["name"] == "ckpt-000002"
    finally:
        kv.close()


def test_periodic_checkpoints_keep_the_last_three(cluster_factory, tmp_path):
    d = tmp_path / "ckpt"
    cluster = cluster_factory(1, 1, checkpoint_dir=str(d), checkpoint_every=0.2)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        kv.wait(kv.push(KEYS, np.ones(len(KEYS), np.float32)))
        pushed_at = time.time()
        _wait_for(lambda: (ck.latest(str(d)) or "ckpt-0") >= "ckpt-000005", 20, "5 checkpoints")
        done = sorted(e for e in os.listdir(d) if e.startswith("ckpt-") and "." not in e)
        assert 3 <= len(done) <= 4 and done[-1] >= "ckpt-000005"   # the 4th while one is deleted
        m, restored = ck.load(str(d), lambda keys: np.ones(len(keys), bool))
        assert m["time"] > pushed_at and np.array_equal(restored["default"].keys, KEYS)
        assert (restored["default"].values == 1).all()
    finally:
        kv.close()


def test_losing_k_plus_one_servers_of_a_range_is_a_clear_error(cluster_factory):
    cluster = cluster_factory(3, 1, replication=1)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        kv.wait(kv.push(KEYS, np.ones(len(KEYS), np.float32)))
        cluster.kill("server 0")
        cluster.kill("server 1")
        _wait_for(lambda: kv.membership.view.num_servers == 1, 10, "the deaths to be noticed")
        time.sleep(0.3)
        with pytest.raises(DataLostError, match="scheduler --restore DIR"):
            kv.pull(KEYS)
    finally:
        kv.close()
