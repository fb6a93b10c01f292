"""The foundation on a real cluster: scheduler, servers and workers as OS processes over ZeroMQ on
loopback."""

from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np
import pytest
import zmq

import pserver
from pserver.errors import (
    BarrierTimeoutError,
    DataLostError,
    DTypeError,
    InvalidKeysError,
    RemoteError,
    SchedulerUnreachableError,
    TableError,
    ValueShapeError,
)
from pserver.membership.client import scheduler_request
from pserver.wire import Message, encode

from .conftest import run_program


def _results(path, n):
    return [json.loads((path / f"rank{r}.json").read_text()) for r in range(n)]


def test_exact_sums_four_workers_two_servers(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 4)
    rounds, nkeys = 30, 20000
    assert run_program(cluster, "count_worker", str(tmp_path), str(rounds), str(nkeys)) == 0
    expected_vec = sum(r + 1 for r in range(4)) * rounds
    for res in _results(tmp_path, 4):
        assert res["num_workers"] == 4 and res["num_servers"] == 2
        assert res["dense"] == [4 * rounds, 4 * rounds]          # dense ids 0..N
        assert res["hashed"] == [4 * rounds, 4 * rounds]         # hashed 64-bit keys
        assert res["vec"] == [expected_vec, expected_vec]        # dim-8 vector values
        assert res["vec_shape"] == [nkeys, 8]
        assert res["range_n"] == nkeys and res["range_keys_ok"]  # range pull
        assert res["range_vals"] == [4 * rounds, 4 * rounds]
        assert len(res["owners"]) == 2                           # dense ids spread over both servers


def test_fifo_push_then_pull_without_waiting(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 2)
    assert run_program(cluster, "fifo_worker", str(tmp_path), "200") == 0
    for res in _results(tmp_path, 2):
        assert res["count"] == 0, res["violations"]


def test_synchronous_aggregation(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 3)
    rounds = 5
    assert run_program(cluster, "sync_worker", str(tmp_path), str(rounds)) == 0
    for res in _results(tmp_path, 3):
        for r, seen in enumerate(res["seen"]):
            # keys[0], keys[2]: ranks 0 and 2 push 1 + 3; keys[1], keys[3]: ranks 1 and 2 push 2 + 3
            want = [-0.5 * 4 * (r + 1), -0.5 * 5 * (r + 1)] * 2
            assert seen == pytest.approx(want), (r, seen)


@pytest.fixture
def one_worker(cluster_factory):
    cluster = cluster_factory(2, 1)
    kv = pserver.KVWorker(cluster.config(0))
    yield cluster, kv
    kv.close()


def test_bad_input_raises_before_sending(one_worker):
    _, kv = one_worker
    def requests_sent():  # heartbeats go out meanwhile, from the membership thread
        return {op: v["messages"] for op, v in kv.stats()["sent_by_op"].items() if op != "heartbeat"}

    sent = requests_sent()
    keys = np.arange(10, dtype=np.uint64)
    with pytest.raises(DTypeError, match="uint64"):
        kv.push(np.arange(10), np.ones(10, np.float32))
    with pytest.raises(DTypeError, match="float32"):
        kv.push(keys, np.ones(10))
    with pytest.raises(InvalidKeysError, match="sorted and unique"):
        kv.push(keys[::-1].copy(), np.ones(10, np.float32))
    with pytest.raises(InvalidKeysError, match="sorted and unique"):
        kv.pull(np.array([1, 2, 2], dtype=np.uint64))
    with pytest.raises(ValueShapeError, match="10 keys"):
        kv.push(keys, np.ones(9, np.float32))
    with pytest.raises(InvalidKeysError, match="1-D"):
        kv.pull(keys.reshape(2, 5))
    with pytest.raises(TableError, match="declare_table"):
        kv.pull(keys, table="nope")
    with pytest.raises(DTypeError):
        kv.pull(keys, out=np.empty(10, np.float64))
    assert requests_sent() == sent  # nothing went out


def test_table_conflict_and_updaters(one_worker):
    _, kv = one_worker
    kv.declare_table("emb", dim=4, init="normal:0.1", seed=3)
    kv.declare_table("emb", dim=4, init="normal:0.1", seed=3)  # idempotent
    with pytest.raises(TableError, match="already exists"):
        kv.declare_table("emb", dim=5)
    keys = np.array([1, 5, 2**63 + 7], dtype=np.uint64)
    first = kv.pull(keys, table="emb")
    assert first.shape == (3, 4) and 0.0 < np.abs(first).mean() < 0.5
    assert np.array_equal(first, kv.pull(keys, table="emb"))  # deterministic initial values
    kv.declare_table("sgd", updater="sgd", updater_args={"lr": 0.1})
    kv.wait(kv.push(keys, np.array([1, 2, 3], np.float32), table="sgd"))
    assert kv.pull(keys, table="sgd") == pytest.approx([-0.1, -0.2, -0.3])


def test_malformed_messages_rejected_values_unchanged(one_worker):
    _, kv = one_worker
    keys = np.arange(100, dtype=np.uint64)
    kv.wait(kv.push(keys, np.full(100, 2, np.float32)))
    server = next(n for n in kv.membership.view.nodes.values() if n.role == "server")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.identity = b"n999"
    sock.connect(f"tcp://{server.host}:{server.port}")
    bad = [
        [b"garbage"],
        [b"PS1\x09\x00\x00\x00{not json"],
        encode(Message("push", 1, "default", {"kf": "k"},
                       [keys, np.ones(50, np.float32)])),            # length mismatch
        [b'PS1\x2e\x00\x00\x00{"op":"push","ts":2,"a":[["<u8",[100000000]]]}', b"x" * 16],
        encode(Message("push", 3, "default", {"kf": "k"}, [keys[::-1].copy(),
                                                           np.ones(100, np.float32)])),
        encode(Message("push", 4, "default", {"kf": "k"}, [keys, np.ones(100, np.float64)])),
        encode(Message("frobnicate", 5)),
        encode(Message("pull_range", 6, "default", {"lo": -1, "hi": "x"})),
    ]
    for frames in bad:
        sock.send_multipart(frames)
    replies = []
    while sock.poll(2000) and len(replies) < len(bad):
        replies.append(sock.recv_multipart())
    sock.close(0)
    ctx.term()
    assert len(replies) == len(bad)
    assert all(b'"op":"error"' in r[0] for r in replies)
    assert (kv.pull(keys) == 2).all()  # stored values unchanged, server alive


def test_killed_server_noticed_within_one_second(cluster_factory):
    # no replicas: the dead server's keys are lost; the default heartbeat timeout
    cluster = cluster_factory(2, 1, replication=0, heartbeat_timeout=0.6)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        keys = np.arange(50000, dtype=np.uint64)
        kv.wait(kv.push(keys, np.ones(len(keys), np.float32)))
        cluster.kill("server 1", signal.SIGKILL)
        killed = time.monotonic()
        cfg = cluster.config()
        while True:
            view = scheduler_request(cfg, "status", role="worker").meta
            states = {n["rank"]: n["state"] for n in view["nodes"] if n["role"] == "server"}
            if states[1] == "dead":
                break
            assert time.monotonic() - killed < 1.0, "dead server not noticed within 1 s"
            time.sleep(0.02)
        with pytest.raises(DataLostError, match="restore the cluster from the last checkpoint"):
            kv.pull(keys)
    finally:
        kv.close()


def test_scheduler_unreachable_clear_error():
    from pserver.launch import free_port

    start = time.monotonic()
    with pytest.raises(SchedulerUnreachableError, match="PSERVER_SCHEDULER"):
        pserver.KVWorker(scheduler=f"127.0.0.1:{free_port()}", insecure=True, connect_timeout=0.5)
    assert time.monotonic() - start < 5


def test_cluster_that_never_completes_gives_a_clear_error(cluster_factory):
    cluster = cluster_factory(1, 2)
    cluster.wait_scheduler()
    cfg = cluster.config(0).with_(connect_timeout=2.0)
    with pytest.raises(SchedulerUnreachableError, match="did not start"):
        pserver.KVWorker(cfg)  # only one of the two workers comes: the cluster never starts


def test_barrier_timeout(cluster_factory):
    cluster = cluster_factory(1, 2)
    sleeper = cluster.spawn_worker([sys.executable, "-c",
                                    "import pserver, time; kv = pserver.KVWorker(); "
                                    "time.sleep(8); kv.close()"], rank=1)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        start = time.monotonic()
        with pytest.raises(BarrierTimeoutError, match=r"did not complete within 0\.5 s"):
            kv.barrier("b1", timeout=0.5)
        assert time.monotonic() - start < 3
    finally:
        kv.close()
        sleeper.kill()


def test_remote_error_for_unknown_table_on_server(one_worker):
    _, kv = one_worker
    kv._tables["ghost"] = pserver.TableSpec(name="ghost")  # simulate a table the servers lack
    with pytest.raises(TableError, match="not declared on this server"):
        kv.pull(np.arange(3, dtype=np.uint64), table="ghost")
    assert isinstance(TableError("x"), pserver.errors.PServerError)
    assert RemoteError is pserver.errors.RemoteError


def test_busy_polling_servers_and_worker_serve_and_stop(cluster_factory):
    cluster = cluster_factory(2, 1, env={"PSERVER_BUSY_POLL": "0.002"})
    with pserver.KVWorker(cluster.config(0).with_(worker_busy_poll=0.001)) as kv:
        keys = np.unique(np.random.default_rng(3).integers(0, 2**64 - 1, 2000, dtype=np.uint64))
        ts = [kv.push(keys, np.ones(len(keys), np.float32)) for _ in range(20)]
        for t in ts:
            kv.wait(t)
        assert (kv.pull(keys) == 20).all()
    cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs.values())  # nobody left spinning


@pytest.mark.parametrize("size", ["64M", "0"])
def test_servers_serve_repeated_key_lists_from_their_slot_cache(cluster_factory, size):
    from .test_filters_cluster import _server_stats
    cluster = cluster_factory(1, 1, env={"PSERVER_SLOT_CACHE": size})
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.unique(np.random.default_rng(4).integers(0, 2**64 - 1, 3000, dtype=np.uint64))
        for i in range(5):
            kv.wait(kv.push(keys, np.full(len(keys), i, np.float32)))
            np.testing.assert_array_equal(kv.pull(keys), np.full(len(keys), sum(range(i + 1))))
        cache = _server_stats(kv)[0]["tables"]["default"]["slot_cache"]
    if size == "0":
        assert cache == {"lists": 0, "bytes": 0, "hits": 0, "misses": 0}
    else:  # stored on the second sighting, then every push and pull of it is a hit
        assert cache["lists"] == 1 and cache["hits"] == 8 and cache["misses"] == 2


@pytest.mark.parametrize("size", ["8M", "0"])
def test_masters_forward_a_repeated_key_list_once_per_replica(cluster_factory, size):
    from .test_filters_cluster import _server_stats
    cluster = cluster_factory(2, 1, replication=1, env={"PSERVER_REPLICA_KEY_CACHE": size})
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.unique(np.random.default_rng(5).integers(0, 2**64 - 1, 20000, dtype=np.uint64))
        for i in range(6):
            kv.wait(kv.push(keys, np.full(len(keys), i, np.float32)))
        np.testing.assert_array_equal(kv.pull(keys), np.full(len(keys), sum(range(6))))
        stats = _server_stats(kv)
    repl = [s["replication"] for s in stats]
    held = sum(n for r in repl for n in r["key_lists_held"].values())
    keys_and_values = sum(r["bytes_forwarded"] for r in repl)
    assert all(r["key_list_misses"] == 0 for r in repl)
    if size == "0":
        assert held == 0 and keys_and_values == 6 * len(keys) * 12
    else:  # the master caches the list at its second push, which stores each part at its replica;
        # from the third on the parts travel by name: keys twice, values six times
        assert held == 2 and keys_and_values == 6 * len(keys) * 4 + 2 * len(keys) * 8
