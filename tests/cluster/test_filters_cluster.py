"""The filter chain on a real cluster: filtered pushes and pulls, traffic accounting on both
sides, mixed settings refused, hostile compressed frames refused, key-cache misses resent."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq

import pserver
from pserver.cli import format_status
from pserver.errors import ConfigError, RemoteError, TableError
from pserver.filters import FilterContext, Payload, parse_filters
from pserver.kv.filtering import _message_parts
from pserver.kv.traffic import WIRE_STAGE, format_traffic
from pserver.launch import LocalCluster
from pserver.membership.client import scheduler_request
from pserver.wire import Message, decode, encode

# These tests are about filters, not failover: a loaded machine must not get nodes declared dead.
HB_TIMEOUT = 10.0


def _servers(kv):
    return sorted((n for n in kv.membership.view.nodes.values() if n.role == "server"),
                  key=lambda n: n.id)


class RawPeer:
    """A DEALER that talks to one server directly, like a worker with hand-made messages."""

    def __init__(self, node, identity: bytes = b"n999"):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.identity = identity
        self.sock.connect(f"tcp://{node.host}:{node.port}")

    def ask(self, frames: list, timeout: float = 5.0) -> Message:
        self.sock.send_multipart(frames)
        assert self.sock.poll(timeout * 1000), "the server did not answer"
        return decode(self.sock.recv_multipart())

    def stats(self) -> dict:
        return self.ask(encode(Message("stats", 1))).meta

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _server_stats(kv) -> list[dict]:
    out = []
    for node in _servers(kv):
        peer = RawPeer(node)
        try:
            out.append(peer.stats())
        finally:
            peer.close()
    return out


def _cell(report: dict, kind: str, stage: str) -> dict:
    return report["stages"].get(kind, {}).get(stage, {})


@pytest.fixture(scope="module")
def kv2():
    """One in-process worker on 2 servers, shared by the tests of this module that need no other
    setting (each uses its own tables; the cluster ends when the worker leaves)."""
    cluster = LocalCluster(2, 1, insecure=True, prefix_output=True,
                           heartbeat_timeout=HB_TIMEOUT).start()
    try:
        kv = pserver.KVWorker(cluster.config(0))
        yield cluster, kv
        kv.close()
    finally:
        cluster.stop()


def test_filtered_push_pull_exact_and_counted_on_both_sides(kv2):
    cluster, kv = kv2
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(0, 2**64, 20_000, dtype=np.uint64))
    kv.declare_table("w", dim=3, push_filters="key_cache,compress:lz4",
                     pull_filters="key_cache,compress")
    kv.declare_table("h", dim=1, push_filters="fp16", pull_filters="bf16")
    vals = rng.normal(size=(keys.size, 3)).astype(np.float32)
    vals[rng.random(keys.size) < 0.7] = 0  # mostly zero rows: compression drops them
    for _ in range(4):
        kv.wait(kv.push(keys, vals, table="w"))
    np.testing.assert_array_equal(kv.pull(keys, table="w"), 4 * vals)   # lossless chains
    np.testing.assert_array_equal(kv.pull(keys, table="w"), 4 * vals)   # keys by signature now
    small = np.linspace(-3, 3, keys.size).astype(np.float32)
    kv.wait(kv.push(keys, small, table="h"))
    got = kv.pull(keys, table="h")
    np.testing.assert_allclose(got, small, rtol=2**-7, atol=1e-6)       # fp16 then bf16 rounding
    assert not np.array_equal(got, small)
    plain = np.arange(10, dtype=np.uint64)                              # the unfiltered path
    kv.wait(kv.push(plain, np.ones(10, np.float32)))
    assert (kv.pull(plain) == 1).all()

    mine = kv.stats()["filters"]
    push_raw, push_wire = _cell(mine, "push", "raw"), _cell(mine, "push", WIRE_STAGE)
    assert push_raw["pairs_sent"] == 5 * keys.size                      # 4 pushes of w, 1 of h
    assert push_wire["bytes_sent"] < 0.4 * push_raw["bytes_sent"]       # zeros dropped, keys cached
    assert mine["events"]["key_cache.sig_sent"] >= 2 * 3 + 2            # pushes 2-4, pull 2
    # Every byte and pair the worker sent through the chain is counted by the servers.
    servers = [s["filters"] for s in _server_stats(kv)]
    for kind in ("push", "pull"):
        got_wire = sum(_cell(s, kind, WIRE_STAGE).get("bytes_received", 0) for s in servers)
        assert got_wire == _cell(mine, kind, WIRE_STAGE)["bytes_sent"]
        sent_back = sum(_cell(s, kind, WIRE_STAGE).get("bytes_sent", 0) for s in servers)
        assert sent_back == _cell(mine, kind, WIRE_STAGE).get("bytes_received", 0)
    assert sum(_cell(s, "push", "raw")["pairs_received"] for s in servers) == 5 * keys.size
    assert sum(s["events"].get("key_cache.hit", 0) for s in servers) == \
        mine["events"]["key_cache.sig_sent"]

    # The scheduler collects every node's counters from heartbeats: `pserver status` shows them.
    deadline = time.monotonic() + 5
    while True:
        view = scheduler_request(cluster.config(), "status", role="worker").meta
        reports = {n["role"]: n.get("traffic") for n in view["nodes"] if n.get("traffic")}
        worker = reports.get("worker") or {}
        if _cell(worker.get("filters", {"stages": {}}), "push", WIRE_STAGE).get("bytes_sent") \
                == push_wire["bytes_sent"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _cell(worker["filters"], "push", WIRE_STAGE)["bytes_sent"] == push_wire["bytes_sent"]
    assert "server" in reports
    text = format_status(view)                                          # `pserver status`
    assert "traffic (from heartbeats)" in text
    assert "push out" in text and "push in" in text and "pull in" in text
    assert format_traffic(view) in text


def test_mixed_filter_settings_fail_loudly(kv2):
    _, kv = kv2
    keys = np.arange(0, 2000, 7, dtype=np.uint64)
    dkeys = keys + np.uint64(10**6)  # in the default table, which has no filters
    kv.declare_table("mix", push_filters="key_cache,compress")
    kv.wait(kv.push(keys, np.ones(keys.size, np.float32), table="mix"))
    # Another node declaring the table with other filters is refused at declare time...
    with pytest.raises(TableError, match="already exists with spec"):
        kv.declare_table("mix", push_filters="compress")
    # ...and a node that never declared (a stale or misconfigured spec) is refused per message.
    good = kv._tables["mix"]
    try:
        for other in ("compress", "", "key_cache:1M,compress"):
            kv._tables["mix"] = pserver.TableSpec(name="mix", push_filters=other)
            with pytest.raises(RemoteError, match="filter"):
                kv.wait(kv.push(keys, np.full(keys.size, 5, np.float32), table="mix"))
        kv._tables["default"] = pserver.TableSpec(name="default", push_filters="compress",
                                                  pull_filters="compress")
        with pytest.raises(RemoteError, match=r"encoded with filters \['compress"):
            kv.wait(kv.push(dkeys, np.ones(keys.size, np.float32)))
        with pytest.raises(RemoteError, match="encoded with filters"):
            kv.pull(dkeys)
    finally:
        kv._tables["mix"] = good
        kv._tables["default"] = pserver.TableSpec(name="default")
    assert (kv.pull(keys, table="mix") == 1).all()    # nothing mismatched was applied
    assert (kv.pull(dkeys) == 0).all()
    with pytest.raises(TableError, match="pull_filters"):
        kv.declare_table("bad", pull_filters="kkt:1")
    with pytest.raises(TableError, match="Use the order"):
        kv.declare_table("bad", push_filters="compress,key_cache")


def test_malformed_compressed_frames_rejected_server_survives(kv2):
    _, kv = kv2
    spec = kv.declare_table("c", dim=2, push_filters="compress")
    keys = np.arange(5000, dtype=np.uint64) * np.uint64(3)
    kv.wait(kv.push(keys, np.ones((keys.size, 2), np.float32), table="c"))
    node = _servers(kv)[0]
    mine = keys[kv.membership.view.ring.owner_of(keys) == node.id]
    vals = np.random.default_rng(2).normal(size=(mine.size, 2)).astype(np.float32)
    chain = parse_filters(spec.push_filters)
    enc = chain.encode(Payload(mine, vals), FilterContext(peer="s", direction="push"))
    meta, arrays = _message_parts(enc)
    assert len(arrays) == 2 and all(a.dtype == np.uint8 for a in arrays)

    def variant(fn) -> list:
        m = {"fc": {k: (dict(v) if isinstance(v, dict) else v) for k, v in meta["fc"].items()},
             "fl": meta["fl"]}
        m["fc"]["compress"] = {**m["fc"]["compress"], "f": [list(d) for d in
                                                          m["fc"]["compress"]["f"]]}
        a = [x.copy() for x in arrays]
        fn(m, a)
        return encode(Message("push", 7, "c", m, a))

    def flip(m, a):
        a[1][len(a[1]) // 2:len(a[1]) // 2 + 16] ^= 0xFF      # corrupt the compressed values

    def truncate(m, a):
        a[0] = a[0][:-5]

    def huge(m, a):
        m["fc"]["compress"]["n"] = 1 << 40                    # a lie about the size

    def wrong_size(m, a):
        m["fc"]["compress"]["f"][1][0] += 8                   # raw size inconsistent with n

    def garbage_codec(m, a):
        m["fc"]["compress"]["codec"] = "snappy"

    def not_object(m, a):
        m["fc"]["compress"] = [1, 2, 3]

    def extra_frame(m, a):
        a.append(np.zeros(3, np.uint8))

    def bad_layout(m, a):
        m["fl"] = "kvkv"

    peer = RawPeer(node)
    try:
        for fn in (flip, truncate, huge, wrong_size, garbage_codec, not_object, extra_frame,
                   bad_layout):
            reply = peer.ask(variant(fn))
            assert reply.op == "error", fn.__name__
            assert reply.meta["kind"] in ("ProtocolError", "LimitError"), (fn.__name__, reply.meta)
        assert peer.ask(variant(lambda m, a: None)).op == "ack"  # the untouched message is fine
        errors = peer.stats()["errors"]
    finally:
        peer.close()
    assert errors >= 8
    got = kv.pull(keys, table="c")                             # the server is alive and the
    expect = np.ones((keys.size, 2), np.float32)              # bad pushes changed nothing
    expect[np.searchsorted(keys, mine)] += vals
    np.testing.assert_array_equal(got, expect)


def test_significantly_modified_holds_back_then_flush_delivers_everything(kv2):
    _, kv = kv2
    keys = np.arange(0, 300_000, 100, dtype=np.uint64)
    kv.declare_table("s", push_filters="significant:abs:1,compress")
    deltas = [np.random.default_rng(i).uniform(-0.6, 0.6, keys.size).astype(np.float32)
              for i in range(5)]
    for d in deltas:
        kv.wait(kv.push(keys, d, table="s"))
    total = np.sum(deltas, axis=0, dtype=np.float64)
    partial = kv.pull(keys, table="s")
    assert not np.allclose(partial, total, atol=1e-4)          # some entries are held back
    held = kv.stats()["filters"]["events"]["significant.held"]
    assert held > 0
    ts = kv.flush("s")
    assert ts is not None
    kv.wait(ts)
    np.testing.assert_allclose(kv.pull(keys, table="s"), total, atol=1e-5)
    assert kv.flush("s") is None                        # nothing left


def test_key_cache_miss_resent_with_keys_in_order(cluster_factory):
    # Servers may cache at most 1 KiB of key lists per worker: most lists the worker believes
    # cached are gone, so it has to resend them - pipelined, with pulls right behind the pushes.
    cluster = cluster_factory(2, 1, env={"PSERVER_KEY_CACHE_LIMIT": "1k"},
                              heartbeat_timeout=HB_TIMEOUT)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        rng = np.random.default_rng(3)
        lists = [np.unique(rng.integers(0, 2**64, 120, dtype=np.uint64)) for _ in range(4)]
        pulls = []
        for table, sync in (("k", False), ("ks", True)):     # sync: rounds wait for resends
            kv.declare_table(table, sync=sync, push_filters="key_cache",
                             pull_filters="key_cache,compress")
        for table in ("k", "ks"):
            total = {i: np.zeros(k.size, np.float32) for i, k in enumerate(lists)}
            for r in range(6):
                for i, k in enumerate(lists):
                    v = np.full(k.size, r + 1 + i, np.float32)
                    kv.push(k, v, table=table)                 # no wait: FIFO must hold anyway
                    total[i] = total[i] + v
                    pulls.append((kv.pull(k, table=table, wait=False), total[i].copy()))
        for ts, want in pulls:
            np.testing.assert_array_equal(kv.wait(ts, timeout=30), want)
        resent = kv.stats()["filters"]["events"].get("key_cache.resent", 0)
        missed = sum(s["filters"]["events"].get("key_cache.miss", 0) for s in _server_stats(kv))
        assert resent > 20
        assert missed == resent
    finally:
        kv._tracker.pending.clear()  # after a failure: do not wait for what will never come
        kv.close()


def _run_workers(cluster, n: int, fn) -> list:
    """Run fn(kv) in n threads, one in-process worker each (ranks 0..n-1); return the results."""
    results: list = [None] * n
    errors: list = []

    def run(rank: int) -> None:
        try:
            kv = pserver.KVWorker(cluster.config(rank))
            try:
                results[kv.rank] = fn(kv)
            finally:
                kv.close()
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_kkt_filter_on_a_synchronous_table_two_workers(cluster_factory):
    cluster = cluster_factory(2, 2, heartbeat_timeout=HB_TIMEOUT)
    keys = np.arange(1, 4001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    keys = np.unique(keys)
    l1 = 0.5

    def grads(rank: int, rnd: int) -> np.ndarray:
        return np.random.default_rng(100 * rank + rnd).normal(0, 0.5, keys.size).astype(np.float32)

    def work(kv):
        kv.declare_table("g", sync=True, push_filters=f"kkt:{l1},key_cache,compress")
        with pytest.raises(ConfigError, match="set_weights"):
            kv.push(keys, grads(kv.rank, 0), table="g")
        w = np.zeros(keys.size)
        w[::10] = 1.0                                          # w != 0: always sent
        kv.filters.set_weights("g", lambda k: w[np.searchsorted(keys, k)])
        for rnd in range(3):
            kv.filters.select_all("g", rnd == 2)               # round 2: the active set is reset
            kv.wait(kv.push(keys, grads(kv.rank, rnd), table="g"))
        kv.barrier("pushed")
        return kv.pull(keys, table="g"), kv.stats()["filters"]

    (got, st0), (_, st1) = _run_workers(cluster, 2, work)
    w = np.zeros(keys.size)
    w[::10] = 1.0
    want = np.zeros(keys.size)
    for rank in (0, 1):
        for rnd in range(3):
            g = grads(rank, rnd).astype(np.float64)
            keep = (w != 0) | (np.abs(g) > l1) | (rnd == 2)
            want += np.where(keep, g, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dropped = st0["events"]["kkt.dropped"] + st1["events"]["kkt.dropped"]
    expected = sum(int(np.count_nonzero((w == 0) & (np.abs(grads(r, n)) <= l1)))
                   for r in (0, 1) for n in (0, 1))
    assert dropped == expected > keys.size


# -- the integration's pure parts, without sockets ------------------------------------------------
def test_spec_carries_canonical_filter_chains():
    a = pserver.TableSpec(name="t", push_filters="kkt:1, key_cache ,compress",
                          pull_filters="fp16,compress:zstd")
    assert a.push_filters == "kkt:1:0,key_cache:64M,compress:zstd:1"
    assert a.pull_filters == "fp16,compress:zstd:1"
    assert pserver.TableSpec.from_json(a.to_json()) == a
    assert a != pserver.TableSpec(name="t", push_filters="kkt:1,key_cache,compress:lz4",
                                  pull_filters="fp16,compress")
    assert pserver.TableSpec.from_json({"name": "t"}).push_filters == ""   # old peers: no field
    for bad in ({"push_filters": "nope"}, {"push_filters": 3}, {"pull_filters": "random_skip:0.5"},
                {"push_filters": "compress,kkt:1"}):
        with pytest.raises(TableError):
            pserver.TableSpec(name="t", **bad)


def test_message_layout_and_traffic_helpers():
    from pserver.errors import ProtocolError
    from pserver.kv.filtering import _payload_of, lossless_part
    from pserver.kv.traffic import traffic_row, traffic_summary

    keys = np.arange(40, dtype=np.uint64)
    enc = parse_filters("key_cache,compress").encode(Payload(keys, np.ones(40, np.float32)),
                                                     FilterContext(peer="p", direction="push"))
    meta, arrays = _message_parts(enc)
    assert meta["fl"] == "" and len(arrays) == 2                 # compress packed both away
    back = _payload_of(Message("push", 1, "t", meta, arrays))
    assert back.keys is None and back.values is None and len(back.frames) == 2
    for m, a in (({"fl": "kvk"}, []), ({"fl": "kv"}, [keys])):
        with pytest.raises(ProtocolError):
            _payload_of(Message("push", 1, "t", m, a))
    assert lossless_part("kkt:1,fp16,key_cache:1M,compress:lz4") == "key_cache:1M,compress:lz4"
    assert lossless_part("significant:abs:1") == ""
    report = {"sent_by_op": {"push": {"bytes": 100}, "pull": {"bytes": 20},
                             "heartbeat": {"bytes": 999}},
              "received_by_op": {"vals": {"bytes": 30}, "ack": {"bytes": 5}, "hb": {"bytes": 7}},
              "filters": {"stages": {"push": {"raw": {"pairs_sent": 50},
                                              WIRE_STAGE: {"pairs_sent": 8}}}}}
    assert traffic_row(report) == [120.0, 35.0, 50.0, 8.0]
    assert traffic_summary([120.0, 35.0, 50.0, 8.0])["servers_sent_bytes"] == 35


@pytest.mark.slow  # two small LR jobs: about 8 s on a quiet machine, 20 s on a loaded one
def test_lr_job_with_filters_same_objective_less_traffic(tmp_path):
    from pserver.apps.lr.gen import generate

    from .conftest import pserver_cli

    generate(str(tmp_path), 6000, features=1 << 14, nnz=20, noise=0.02, seed=3)
    common = ["train", "lr", "--data", str(tmp_path / "train.libsvm"), "--l1", "2",
              "--epochs", "6", "--blocks", "4", "--insecure"]
    runs = {}
    for name, extra in (("none", []), ("all", ["--kkt", "--filters", "key_cache,compress",
                                               "--pull-filters", "key_cache,compress"])):
        out = tmp_path / f"{name}.json"
        proc = pserver_cli(*common, "--summary-json", str(out), *extra, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[name] = json.loads(out.read_text())
    none, full = runs["none"], runs["all"]
    assert "data traffic: workers sent" in proc.stdout                   # the summary shows it
    assert full["train_objective"] == pytest.approx(none["train_objective"], rel=0.01)
    t0, t1 = none["traffic"], full["traffic"]
    assert t1["workers_sent_bytes"] < t0["workers_sent_bytes"] / 2
    assert t1["servers_sent_bytes"] < t0["servers_sent_bytes"] / 2
    assert 0 < t1["filtered_push_pairs_sent"] < t1["filtered_push_pairs_raw"]  # kkt dropped some
