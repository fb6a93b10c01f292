"""Security of a real cluster: CURVE keys, role authorisation, node-id binding, message limits,
error replies and rejection counters, and the --insecure mode.

Every cluster here is made of real processes on loopback (LocalCluster or the `pserver` CLI);
the attackers are real ZeroMQ sockets in this process. A cluster's process output is collected
(the launcher copies it to sys.stdout, which the tests point at a Sink) so that the tests can
check what each node logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from zmq.auth import load_certificate

import pserver
from pserver import wire
from pserver.config import Config
from pserver.errors import RemoteError, SchedulerUnreachableError
from pserver.kv import keys as keyfmt
from pserver.launch import LocalCluster, free_port
from pserver.membership.client import scheduler_request
from pserver.security import Credentials, keygen
from pserver.wire import Message

SILENCE_MS = 1000  # a refused peer's request must get no answer within this
REPLY_MS = 5000


class Sink:
    """Collects the lines LocalCluster copies from its processes (thread-safe)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def mark(self) -> int:
        with self._lock:
            return len(self.lines)

    def wait_for(self, node: str, needle: str, since: int = 0, timeout: float = 5.0) -> list[str]:
        """Lines of process ``node`` (e.g. "scheduler", "server 0") after ``since`` containing
        ``needle``; waits up to ``timeout`` s for the first one."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                hits = [ln for ln in self.lines[since:]
                        if ln.startswith(f"[{node}] ") and needle in ln]
            if hits or time.monotonic() > deadline:
                return hits
            time.sleep(0.02)


def start(cluster: LocalCluster, sink: Sink) -> LocalCluster:
    try:
        with contextlib.redirect_stdout(sink):  # the launcher's copier threads keep this sink
            cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


class Peer:
    """Raw DEALER sockets of an attacker or a tool in this process (own context)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.creds: list[Credentials] = []
        self.socks: list[zmq.Socket] = []

    def dealer(self, addr: str, creds: Credentials | None, server_role: str,
               identity: bytes | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        if identity is not None:
            sock.identity = identity
        if creds is not None:
            creds.configure_client(sock, server_role)
            if creds not in self.creds:
                self.creds.append(creds)
        sock.connect(f"tcp://{addr}")
        self.socks.append(sock)
        return sock

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        for c in self.creds:
            c.close()
        self.ctx.term()


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


def ask(sock: zmq.Socket, frames: list, timeout_ms: int = REPLY_MS) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), f"no reply to {frames!r:.200}"
    return wire.decode(sock.recv_multipart())


def raw(header: dict, *frames: bytes) -> list[bytes]:
    head = json.dumps(header).encode()
    return [wire.MAGIC + struct.pack("<I", len(head)) + head, *frames]


def server_addr(kv: pserver.KVWorker) -> str:
    (node,) = kv.membership.view.role_nodes("server")
    return f"{node.host}:{node.port}"


def server_stats(peer: Peer, kv: pserver.KVWorker, keys_dir: str) -> dict:
    sock = peer.dealer(server_addr(kv), Credentials.load(keys_dir, "worker"), "server")
    reply = ask(sock, wire.encode(Message("stats", 1)))
    assert reply.op == "stats", reply
    return reply.meta


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# ------------------------------------------------------------------------------ a secure cluster
@pytest.fixture(scope="module")
def secure():
    """A secure LocalCluster (ephemeral keys): 1 server, 1 worker (this process), its output."""
    sink = Sink()
    cluster = start(LocalCluster(1, 1), sink)
    kv = None
    try:
        kv = pserver.KVWorker(cluster.config(0))
        yield cluster, kv, sink
    finally:
        if kv is not None:
            kv.close()
        cluster.stop()


def test_node_without_keys_cannot_register_and_is_logged(secure):
    cluster, kv, sink = secure
    mark = sink.mark()
    cfg = cluster.config(1).with_(insecure=True, keys="", connect_timeout=1.5)
    with pytest.raises(SchedulerUnreachableError, match="cluster's keys"):
        pserver.KVWorker(cfg)
    # libzmq reports either side's view of the failed handshake, whichever comes first
    logged = sink.wait_for("scheduler", "rejected a connection", mark)
    assert logged and any(why in logged[0] for why in ("does not use CURVE", "a plain-text node,")), logged
    workers = kv.membership.status()["nodes"]
    assert [(n["role"], n["id"]) for n in workers if n["role"] == "worker"] == \
        [("worker", kv.membership.node_id)]  # nobody else joined


def test_other_clusters_keys_cannot_register_push_or_pull(secure, tmp_path, peer, caplog):
    cluster, kv, sink = secure
    keys = np.arange(50, dtype=np.uint64)
    kv.wait(kv.push(keys, np.full(50, 3, np.float32)))
    stored = kv.pull(keys)
    other = keygen(tmp_path / "other")
    mark = sink.mark()

    # registration with another cluster's keys: refused by the scheduler, logged on both sides
    with caplog.at_level(logging.WARNING, logger="pserver.security"), \
            pytest.raises(SchedulerUnreachableError):
        pserver.KVWorker(cluster.config(1).with_(keys=str(other), connect_timeout=1.5))
    assert any("handshake with the scheduler" in r.getMessage()
               for r in caplog.records if r.name == "pserver.security")
    assert sink.wait_for("scheduler", "rejected a connection", mark)

    # push and pull straight at the server, (a) with the other cluster's full key set, (b) with
    # a stranger's key that knows this cluster's (public) server key: no answer, logged
    addr = server_addr(kv)
    foreign = peer.dealer(addr, Credentials.load(other, "worker"), "server", identity=b"n4242")
    stranger = peer.ctx.socket(zmq.DEALER)
    peer.socks.append(stranger)
    stranger.linger = 0
    stranger.identity = b"n4243"
    stranger.curve_serverkey = load_certificate(Path(cluster.keys) / "public" / "server.key")[0]
    stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
    stranger.connect(f"tcp://{addr}")
    meta, arrays = keyfmt.pack_keys(keys)
    for sock in (foreign, stranger):
        # once its handshake has failed, a DEALER has no peer and refuses to queue (zmq.Again)
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(wire.encode(Message("push", 1, "", meta, [
                *arrays, np.full(50, 100, np.float32)])), zmq.NOBLOCK)
            time.sleep(0.2)
            sock.send_multipart(wire.encode(Message("pull", 2, "", meta, arrays)), zmq.NOBLOCK)
        assert not sock.poll(SILENCE_MS), "a node with foreign keys got an answer"
    assert sink.wait_for("server 0", "the handshake did not decrypt", mark)
    assert sink.wait_for("server 0", "is not one of this cluster's keys", mark)
    assert np.array_equal(kv.pull(keys), stored)


def test_worker_cannot_send_scheduler_only_commands(secure, peer):
    cluster, kv, sink = secure
    mark = sink.mark()
    before = kv.membership.status()["scheduler"]["rejected_by_reason"]
    control = ("shutdown", "ring", "set_consistency", "view", "migrate_range")
    for op in control:
        with pytest.raises(RemoteError, match=f"a worker may not send '{op}'"):
            scheduler_request(cluster.config(), op, role="worker", timeout=5.0)
    for op in control:
        assert sink.wait_for("scheduler", f"AuthError: a worker may not send '{op}'", mark)
    after = kv.membership.status()["scheduler"]["rejected_by_reason"]
    assert delta(after, before) == {"AuthError": len(control)}

    # nor may it send the servers' and the scheduler's ops to a server
    stats0 = server_stats(peer, kv, cluster.keys)
    sock = peer.dealer(server_addr(kv), Credentials.load(cluster.keys, "worker"), "server",
                       identity=b"n4244")
    for op in ("replicate", "repl_batch", "migrate_data", "checkpoint_write", "view", "shutdown"):
        reply = ask(sock, wire.encode(Message(op, 3, "", {"src": 1})))
        assert (reply.op, reply.meta["kind"]) == ("error", "AuthError"), reply
        assert f"a worker may not send '{op}'" in reply.meta["error"]
    assert delta(server_stats(peer, kv, cluster.keys)["rejected"], stats0["rejected"]) == \
        {"AuthError": 6}

    # and the cluster carries on
    time.sleep(5 * kv.cfg.heartbeat_interval)
    assert not kv.membership.shutdown_requested.is_set()
    assert cluster.procs["scheduler"].poll() is None
    keys = np.array([10_007, 10_008], np.uint64)  # not written by any other test
    kv.wait(kv.push(keys, np.ones(2, np.float32)))
    assert kv.pull(keys).tolist() == [1.0, 1.0]


def test_a_node_cannot_speak_for_another(secure, peer):
    """All workers share one key; node ids in heartbeat/leave/barrier are bound to the
    connections of the node that registered with that id."""
    cluster, kv, sink = secure
    mark = sink.mark()
    me = kv.membership.node_id
    (server,) = kv.membership.view.role_nodes("server")
    before = kv.membership.status()["scheduler"]["rejected_by_reason"]
    sock = peer.dealer(cluster.scheduler, Credentials.load(cluster.keys, "worker"), "scheduler")
    forged = [("leave", {"id": me}), ("heartbeat", {"id": me, "v": 0}),
              ("barrier", {"id": me, "name": "b", "group": "worker"}), ("leave", {"id": server.id})]
    for op, meta in forged:
        reply = ask(sock, wire.encode(Message(op, 1, meta=meta)))
        assert (reply.op, reply.meta["kind"]) == ("error", "AuthError"), reply
        assert "came from another node's connection" in reply.meta["error"]
    assert sink.wait_for("scheduler", f"leave for node {me} came from another node's", mark)
    # the victims are untouched, and their own heartbeats keep them alive
    time.sleep(2 * kv.cfg.heartbeat_timeout)
    status = kv.membership.status()
    assert delta(status["scheduler"]["rejected_by_reason"], before) == {"AuthError": len(forged)}
    state = {n["id"]: (n["alive"], n["state"]) for n in status["nodes"]}
    assert state[me] == (True, "up") and state[server.id] == (True, "up")


def test_malformed_messages_to_the_scheduler_get_error_replies(secure, peer):
    cluster, kv, _ = secure
    before = kv.membership.status()["scheduler"]["rejected_by_reason"]
    sock = peer.dealer(cluster.scheduler, Credentials.load(cluster.keys, "worker"), "scheduler")
    deep = "[" * 30_000  # deeper than the JSON parser's recursion limit
    bad = {
        "ProtocolError": [[wire.MAGIC + struct.pack("<I", len(deep)) + deep.encode()],
                          [b"junk"], raw({"op": "status", "ts": 1.5}),
                          # Infinity and NaN are not JSON: refused by the header parser
                          raw({"op": "heartbeat", "ts": 1, "m": {"id": float("inf")}}),
                          raw({"op": "barrier", "ts": 1, "m": {"id": float("nan")}})],
        "ValueError": [raw({"op": "heartbeat", "ts": 1, "m": {"id": 10**6}})],
        "KeyError": [raw({"op": "leave", "ts": 1})],
        "TypeError": [raw({"op": "heartbeat", "ts": 1, "m": {"id": [1]}})],
    }
    for kind, messages in bad.items():
        for frames in messages:
            reply = ask(sock, frames)
            assert (reply.op, reply.meta.get("kind")) == ("error", kind), reply
    assert cluster.procs["scheduler"].poll() is None
    after = kv.membership.status()["scheduler"]["rejected_by_reason"]
    assert delta(after, before) == {k: len(v) for k, v in bad.items()}


# ------------------------------------------------------------------------------ limits
@pytest.mark.slow
def test_oversized_and_inconsistent_messages_are_rejected(peer):
    """Limits come from the server's flags (64 KiB, 1000 keys, dim 16); the scheduler and this
    worker get a smaller message limit from PSERVER_MAX_MESSAGE_BYTES, which the flags override."""
    sink = Sink()
    limits = ["--max-message-bytes", "65536", "--max-keys", "1000", "--max-dim", "16"]
    cluster = start(LocalCluster(1, 1, server_args=limits,
                                 env={"PSERVER_MAX_MESSAGE_BYTES": "32768"}), sink)
    try:
        kv = pserver.KVWorker(cluster.config(0))
        try:
            _check_limits(cluster, kv, peer, sink)
        finally:
            kv.close()
    finally:
        cluster.stop()


def _check_limits(cluster: LocalCluster, kv: pserver.KVWorker, peer: Peer, sink: Sink) -> None:
    dense = np.arange(100, dtype=np.uint64)
    kv.wait(kv.push(dense, np.full(100, 2, np.float32)))
    kv.declare_table("wide", dim=16)
    kv.declare_table("wide64", dim=16, dtype="float64")
    with pytest.raises(RemoteError, match="PSERVER_MAX_DIM"):
        kv.declare_table("too_wide", dim=17)
    stats0 = server_stats(peer, kv, cluster.keys)
    sock = peer.dealer(server_addr(kv), Credentials.load(cluster.keys, "worker"), "server",
                       identity=b"n999")
    runs = {"kf": "r"}
    sparse = np.arange(1001, dtype=np.uint64) * 3
    hundred = np.full(100, 100, np.float32)
    expect = {
        "LimitError": [
            # 1,001 keys (limit 1,000)
            wire.encode(Message("push", 1, "", {"kf": "k"}, [sparse, np.ones(1001, np.float32)])),
            # 8 KB of keys + 64 KB of values > 64 KiB
            wire.encode(Message("push", 2, "wide", {"kf": "k"},
                                [sparse[:1000], np.ones((1000, 16), np.float32)])),
            # runs that declare 2^40 keys in 16 bytes
            wire.encode(Message("pull", 3, "", runs, [np.array([0], np.uint64),
                                                      np.array([2**40], np.uint64)])),
            # runs whose lengths would wrap around a uint64 sum to 0
            wire.encode(Message("pull", 4, "", runs, [np.array([0, 2**63], np.uint64),
                                                      np.array([2**63, 2**63], np.uint64)])),
            # 1,000 keys x 16 float64 = a 128 KB reply
            wire.encode(Message("pull", 5, "wide64", runs, [np.array([0], np.uint64),
                                                            np.array([1000], np.uint64)])),
            # a header that declares 10^8 keys, with a 16-byte frame
            raw({"op": "push", "ts": 6, "m": {"kf": "k"}, "a": [["<u8", [10**8]], ["<f4", [10**8]]]},
                bytes(16), bytes(16)),
            # a header length of 4 GiB
            [wire.MAGIC + struct.pack("<I", 2**32 - 1) + b"{}"],
        ],
        "ProtocolError": [
            # declared 100 keys and values, frames of 16 bytes
            raw({"op": "push", "ts": 7, "m": {"kf": "k"}, "a": [["<u8", [100]], ["<f4", [100]]]},
                bytes(16), bytes(16)),
            # one-frame layout whose arrays run past the frame
            [b"".join(raw({"op": "push", "ts": 8, "m": {"kf": "k"}, "i": 1,
                           "a": [["<u8", [100]], ["<f4", [100]]]})) + bytes(64)],
            # values that do not match the keys
            wire.encode(Message("push", 9, "", {"kf": "k"}, [dense, np.ones(99, np.float32)])),
            # unsorted keys
            wire.encode(Message("push", 10, "", {"kf": "k"}, [dense[::-1].copy(), hundred])),
            # float64 values for a float32 table
            wire.encode(Message("push", 11, "", {"kf": "k"}, [dense, hundred.astype(np.float64)])),
        ],
    }
    for kind, messages in expect.items():
        for frames in messages:
            reply = ask(sock, frames)
            assert (reply.op, reply.meta.get("kind")) == ("error", kind), (frames[0][:120], reply)
    # under the server's own limit (64 KiB, above the 32 KiB of the environment): accepted
    reply = ask(sock, wire.encode(Message("push", 12, "wide", runs, [
        np.array([0], np.uint64), np.array([1000], np.uint64), np.ones((1000, 16), np.float32)])))
    assert reply.op == "ack", reply

    # a frame larger than any valid message is dropped by libzmq before it is allocated, with the
    # connection; the peer reconnects and is served again
    sock.send_multipart([bytes(200_000)])
    assert not sock.poll(SILENCE_MS)
    assert ask(sock, wire.encode(Message("ping", 13))).op == "pong"

    # nothing was applied, everything was counted and logged
    assert kv.pull(dense).tolist() == [2.0] * 100
    # (a pull of all 1,000 rows would be a reply over this worker's own 32 KiB limit)
    assert np.array_equal(kv.pull(np.arange(0, 1000, 10, dtype=np.uint64), table="wide"),
                          np.ones((100, 16), np.float32))
    stats = server_stats(peer, kv, cluster.keys)
    assert delta(stats["rejected"], stats0["rejected"]) == {k: len(v) for k, v in expect.items()}
    assert stats["errors"] - stats0["errors"] == sum(len(v) for v in expect.values())
    assert sink.wait_for("server 0", "exceeds the limit of 1000 keys")

    # the scheduler enforces PSERVER_MAX_MESSAGE_BYTES (32 KiB) too
    sched = peer.dealer(cluster.scheduler, Credentials.load(cluster.keys, "worker"), "scheduler")
    reply = ask(sched, wire.encode(Message("status", 1, arrays=[np.zeros(5000, np.float64)])))
    assert (reply.op, reply.meta.get("kind")) == ("error", "LimitError"), reply
    assert ask(sched, wire.encode(Message("status", 2))).op == "status"


# ------------------------------------------------------------------------------ the CLI
def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSERVER_")}
    env.update(extra)
    return env


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pserver", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _finish(procs: list[subprocess.Popen], timeout: float = 15.0) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(-9)
    return codes


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keys", "insecure"])
def test_cli_roles_with_keys_flag_or_insecure(mode, tmp_path):
    """`pserver keygen DIR` + `--keys DIR` on every role, or `--insecure` (which warns)."""
    sched = f"127.0.0.1:{free_port()}"
    env = _clean_env()
    if mode == "keys":
        done = subprocess.run([sys.executable, "-m", "pserver", "keygen", str(tmp_path / "k")],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "k" / "private" / "worker.key_secret").is_file()
        flags = ["--keys", str(tmp_path / "k")]
    else:
        flags = ["--insecure"]
    common = ["--scheduler", sched, "--num-servers", "1", "--num-workers", "1", *flags]
    procs = [_spawn(["scheduler", *common], tmp_path / "scheduler.log", env),
             _spawn(["server", *common], tmp_path / "server.log", env)]
    try:
        status = subprocess.run([sys.executable, "-m", "pserver", "status", "--json", "--timeout", "20",
                                 "--scheduler", sched, *flags], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["scheduler"]["expected_servers"] == 1
        cfg = Config(scheduler=sched, num_workers=1, connect_timeout=20,
                     **({"keys": str(tmp_path / "k")} if mode == "keys" else {"insecure": True}))
        with pserver.KVWorker(cfg) as kv:
            keys = np.array([1, 2**40, 2**63], np.uint64)
            kv.wait(kv.push(keys, np.array([1.5, -2, 4], np.float32)))
            assert kv.pull(keys).tolist() == [1.5, -2.0, 4.0]
        assert _finish(procs) == [0, 0]  # the job ended when its worker left
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"{r}.log").read_text() for r in ("scheduler", "server")]
    warned = ["running WITHOUT authentication or encryption" in text for text in logs]
    assert warned == [mode == "insecure"] * 2, logs


@pytest.mark.slow
def test_a_role_without_keys_or_insecure_refuses_to_start():
    done = subprocess.run([sys.executable, "-m", "pserver", "server", "--scheduler", "127.0.0.1:9"],
                          env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no cluster keys" in done.stderr and "--insecure" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "pserver", "server", "--scheduler", "127.0.0.1:9",
                          "--insecure", "--max-keys", "0"],
                         env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "PSERVER_MAX_KEYS" in bad.stderr, bad.stderr
