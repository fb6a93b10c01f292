"""pserver.security: keys, CURVE over real ZeroMQ sockets on loopback, and the authorisation table."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

import pserver.kv.dispatch  # noqa: F401 (hands the server's ops to the authorisation table)
from pserver import security
from pserver.errors import AuthError
from pserver.security import Credentials, authorise, keygen

SILENCE_MS = 500  # a rejected peer's message must not arrive within this


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keygen(tmp_path_factory.mktemp("k") / "cluster")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keygen(tmp_path_factory.mktemp("k") / "other")


class Net:
    """Sockets of one test in one context, closed (then the credentials, then the context)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []
        self.creds: list[Credentials] = []

    def router(self, creds: Credentials) -> tuple[zmq.Socket, int]:
        sock = self._track(self.ctx.socket(zmq.ROUTER), creds)
        creds.configure_server(sock)
        return sock, sock.bind_to_random_port("tcp://127.0.0.1")

    def dealer(self, creds: Credentials | None, port: int, server_role: str = "server",
               ctx: zmq.Context | None = None) -> zmq.Socket:
        sock = self._track((ctx or self.ctx).socket(zmq.DEALER), creds)
        if creds is not None:
            creds.configure_client(sock, server_role)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def _track(self, sock: zmq.Socket, creds: Credentials | None) -> zmq.Socket:
        sock.linger = 0
        self.socks.append(sock)
        if creds is not None and creds not in self.creds:
            self.creds.append(creds)
        return sock

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        for creds in self.creds:
            creds.close()
        self.ctx.term()


@pytest.fixture
def net():
    n = Net()
    yield n
    n.close()


def recv_or_none(sock: zmq.Socket, timeout_ms: int = 2000) -> list[zmq.Frame] | None:
    if sock.poll(timeout_ms, zmq.POLLIN):
        return sock.recv_multipart(copy=False)
    return None


def wait_for_log(caplog: pytest.LogCaptureFixture, needle: str, timeout_s: float = 2.0) -> list:
    """Records containing needle; the security thread logs asynchronously, so wait a little."""
    deadline = time.monotonic() + timeout_s
    while True:
        hits = [r for r in caplog.records if needle in r.getMessage()]
        if hits or time.monotonic() > deadline:
            return hits
        time.sleep(0.02)


# ------------------------------------------------------------------------------ CURVE on sockets
def test_worker_reaches_server_and_is_identified(keys, net):
    server = Credentials.load(keys, "server")
    router, port = net.router(server)
    dealer = net.dealer(Credentials.load(keys, "worker"), port)
    keys_u64 = np.arange(1000, dtype=np.uint64) * 7
    dealer.send_multipart([b"push", keys_u64])
    frames = recv_or_none(router)
    assert frames is not None, "an authorised worker could not deliver a message"
    assert [server.peer_role(f) for f in frames] == ["worker"] * 3
    np.testing.assert_array_equal(np.frombuffer(frames[2].buffer, np.uint64), keys_u64)
    router.send_multipart([frames[0].bytes, b"ok"])  # and the encrypted reply path works
    assert dealer.poll(2000) and dealer.recv() == b"ok"


@pytest.mark.parametrize("client_role, server_role", [("scheduler", "server"),
                                                      ("server", "server"),
                                                      ("server", "scheduler"),
                                                      ("worker", "scheduler")])
def test_every_role_is_identified(keys, net, client_role, server_role):
    server = Credentials.load(keys, server_role)
    router, port = net.router(server)
    net.dealer(Credentials.load(keys, client_role), port, server_role).send(b"hello")
    frames = recv_or_none(router)
    assert frames is not None and server.peer_role(frames[1]) == client_role


def test_worker_pretending_to_be_scheduler_is_a_worker(keys, net):
    scheduler = Credentials.load(keys, "scheduler")
    router, port = net.router(scheduler)
    net.dealer(Credentials.load(keys, "worker"), port, "scheduler").send(b"shutdown")
    frames = recv_or_none(router)
    assert frames is not None
    role = scheduler.peer_role(frames[1])
    assert role == "worker"
    assert not authorise("shutdown", role, secure=True)


def test_scheduler_public_key_without_its_secret_cannot_connect(keys, net, caplog):
    """A worker claiming the scheduler's public key cannot finish the handshake: CURVE makes the
    client prove it holds the secret of the key it presents."""
    scheduler = Credentials.load(keys, "scheduler")
    worker = Credentials.load(keys, "worker")
    router, port = net.router(scheduler)
    forger = Credentials("worker", True, scheduler._role_keys["scheduler"], worker._secret,
                         worker._role_keys)
    net.dealer(forger, port, "scheduler").send(b"shutdown")
    assert recv_or_none(router, SILENCE_MS) is None


def test_foreign_key_is_rejected_and_logged(keys, other_keys, net, caplog):
    """An intruder who knows the server's public key (it is public) but not a cluster key pair."""
    caplog.set_level(logging.WARNING, logger="pserver.security")
    router, port = net.router(Credentials.load(keys, "server"))
    stranger = Credentials.load(other_keys, "worker")
    intruder = Credentials("worker", True, stranger._public, stranger._secret,
                           {**stranger._role_keys, "server": Credentials.load(
                               keys, "server")._role_keys["server"]})
    net.dealer(intruder, port).send(b"push")
    assert recv_or_none(router, SILENCE_MS) is None
    hits = wait_for_log(caplog, "rejected a CURVE connection from 127.0.0.1")
    assert len(hits) == 1 and stranger._public.decode() in hits[0].getMessage()
    assert hits[0].levelno == logging.WARNING
    # the refused client is told too, so its operator can fix the keys
    assert wait_for_log(caplog, "the server refused this node's key")


def test_other_clusters_keys_are_rejected_and_logged_once(keys, other_keys, net, caplog):
    caplog.set_level(logging.WARNING, logger="pserver.security")
    router, port = net.router(Credentials.load(keys, "server"))
    other_ctx = zmq.Context()  # another cluster's node: its own process, its own context
    try:
        net.dealer(Credentials.load(other_keys, "worker"), port, ctx=other_ctx).send(b"push")
        assert recv_or_none(router, SILENCE_MS) is None
        # it retries every ~100 ms; the server reports it once per interval, not per attempt
        server_side = [r for r in wait_for_log(caplog, "did not decrypt")
                       if r.getMessage().startswith("[server]")]
        assert len(server_side) == 1
    finally:
        for sock in net.socks[1:]:
            sock.close(linger=0)
        other_ctx.term()


def test_plain_text_client_is_rejected_and_logged(keys, net, caplog):
    caplog.set_level(logging.WARNING, logger="pserver.security")
    router, port = net.router(Credentials.load(keys, "server"))
    net.dealer(None, port).send(b"shutdown")
    assert recv_or_none(router, SILENCE_MS) is None
    assert wait_for_log(caplog, "does not use CURVE")


def _relay(listener: socket.socket, target: int, seen: bytearray) -> None:
    """One-connection TCP relay recording the client -> server bytes."""
    client, _ = listener.accept()
    server = socket.create_connection(("127.0.0.1", target))
    for s in (client, server):
        s.settimeout(0.05)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            if src is client:
                seen += data
            dst.sendall(data)


@pytest.mark.parametrize("secure", [True, False])
def test_payload_is_encrypted_on_the_wire(keys, net, secure):
    marker = b"pserver-plaintext-marker-0123456789"
    server = Credentials.load(keys, "server") if secure else Credentials.insecure()
    router, port = net.router(server)
    listener = socket.create_server(("127.0.0.1", 0))
    seen = bytearray()
    relay = threading.Thread(target=_relay, args=(listener, port, seen), daemon=True)
    relay.start()
    client = Credentials.load(keys, "worker") if secure else Credentials.insecure()
    net.dealer(client, listener.getsockname()[1]).send(marker)
    frames = recv_or_none(router)
    assert frames is not None and frames[1].bytes == marker
    listener.close()
    assert len(seen) > len(marker)
    assert (marker in seen) is (not secure)


def test_start_authenticator_is_idempotent_and_refuses_a_second_cluster(keys, other_keys, net):
    server = Credentials.load(keys, "server")
    server.start_authenticator(net.ctx)
    server.start_authenticator(net.ctx)
    Credentials.load(keys, "scheduler").start_authenticator(net.ctx)  # same key set: fine
    other = Credentials.load(other_keys, "server")
    net.creds += [server, other]
    with pytest.raises(AuthError, match="another key set"):
        other.start_authenticator(net.ctx)


def test_closed_authenticator_fails_closed(keys, net, caplog):
    caplog.set_level(logging.WARNING, logger="pserver.security")
    server = Credentials.load(keys, "server")
    router, port = net.router(server)
    server.close()
    assert wait_for_log(caplog, "server socket(s) open")
    net.dealer(Credentials.load(keys, "worker"), port).send(b"push")
    assert recv_or_none(router, SILENCE_MS) is None


def test_context_term_releases_security_sockets(keys):
    ctx = zmq.Context()
    server = Credentials.load(keys, "server")
    router = ctx.socket(zmq.ROUTER)
    server.configure_server(router)
    router.bind_to_random_port("tcp://127.0.0.1")
    router.close(linger=0)
    terminator = threading.Thread(target=ctx.term, daemon=True)  # without server.close()
    terminator.start()
    terminator.join(timeout=5)
    assert not terminator.is_alive(), "ctx.term() hangs on the security thread's sockets"


# ------------------------------------------------------------------------------ insecure mode
def test_insecure_warns_once_per_process(monkeypatch, caplog, net):
    monkeypatch.setattr(security, "_insecure_warned", False)
    with caplog.at_level(logging.WARNING, logger="pserver.security"):
        creds = Credentials.insecure()
        Credentials.insecure()
    assert [r.levelno for r in caplog.records if "WITHOUT" in r.getMessage()] == [logging.WARNING]
    assert creds.secure is False
    router, port = net.router(creds)
    net.dealer(creds, port).send(b"x")
    frames = recv_or_none(router)
    assert frames is not None and creds.peer_role(frames[1]) is None
    assert router.mechanism == zmq.NULL


# ------------------------------------------------------------------------------ authorisation
@pytest.fixture
def restore_table():
    saved = dict(security._op_roles)
    yield
    security._op_roles.clear()
    security._op_roles.update(saved)
    security._resolved.clear()


QUERIES = ["status", "stats", "ping"]
ALLOWED = {
    "scheduler": ["view", "shutdown", "ring", "set_consistency", "migrate_range", "migrate_data",
                  *QUERIES],
    "worker": ["push", "pull", "pull_range", "push_range", "declare_table", "barrier",
               "register", "heartbeat", "report", "leave", *QUERIES],
    "server": ["replicate", "register", "heartbeat", "migrate_data", "leave", *QUERIES],
}
ALL_OPS = sorted({op for ops in ALLOWED.values() for op in ops} | {"migrate_begin"})


@pytest.mark.parametrize("role", security.ROLES)
@pytest.mark.parametrize("op", ALL_OPS)
def test_authorisation_table(role, op):
    expected = op in ALLOWED[role] or (role == "scheduler" and op.startswith("migrate_"))
    assert authorise(op, role, secure=True) is expected


def test_unknown_ops_and_roles_are_denied_when_secure():
    assert not authorise("format_disk", "scheduler", secure=True)
    assert not authorise("push", None, secure=True)
    assert not authorise("push", "insecure", secure=True)


def test_insecure_mode_allows_everything():
    assert authorise("shutdown", None, secure=False)
    assert authorise("format_disk", "worker", secure=False)


def test_allow_op_extends_the_table(restore_table):
    assert not authorise("example_op", "scheduler", secure=True)  # also fills the cache
    security.allow_op("example_op", "scheduler", "server")
    assert authorise("example_op", "server", secure=True)
    assert not authorise("example_op", "worker", secure=True)
    security.allow_op("sketch_*", "worker")
    assert authorise("sketch_merge", "worker", secure=True)
    with pytest.raises(ValueError):
        security.allow_op("x", "admin")
    with pytest.raises(TypeError):
        security.OP_ROLES["y"] = frozenset({"worker"})  # type: ignore[index]
