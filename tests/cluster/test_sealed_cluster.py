"""The sealed bulk channel on real clusters (separate processes, CURVE, loopback): large values
travel sealed beside CURVE and arrive exact, both ways and between servers; a tampered chunk refuses
its request and changes nothing; junk on the bulk port is dropped; a server that does not seal
gets everything over CURVE. The protocol: docs/sealed-bulk.md; without sockets:
tests/unit/test_sealed.py."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import zmq

import pserver
from pserver import sealed
from pserver.errors import PServerError
from pserver.sealed import SealedDealer
from pserver.wire import Message

N = 1_000_000  # 4 MB of float32: four sealed chunks


def _link(kv: pserver.KVWorker) -> SealedDealer:
    (link,) = kv._sender.links.values()
    assert isinstance(link, SealedDealer)
    return link


def _warm(kv: pserver.KVWorker, keys: np.ndarray, vals: np.ndarray) -> None:
    """A first push and pull: the server's WELCOME is read, the bulk connection made."""
    kv.wait(kv.push(keys[:10], vals[:10]))
    kv.pull(keys[:10])


@pytest.mark.parametrize("cipher", [c for c in sealed.CIPHERS if sealed.available(c)])
def test_large_values_travel_sealed_and_arrive_exact(cluster_factory, cipher):
    cluster = cluster_factory(1, 1, insecure=False, settings={"seal_cipher": cipher})
    kv = pserver.KVWorker(cluster.config(0))
    try:
        keys = np.arange(N, dtype=np.uint64)
        vals = np.random.default_rng(1).random(N).astype(np.float32)
        _warm(kv, keys, np.zeros(N, np.float32))
        link = _link(kv)
        assert link.bulk is not None
        sent, received = link.channel.sent, link.channel.received
        kv.wait(kv.push(keys, vals))
        kv.wait(kv.push(keys, vals))
        out = kv.pull(keys)
        np.testing.assert_array_equal(out, 2 * vals)
        assert link.channel.sent == sent + 2 and link.channel.received == received + 1
        # a tensor of 300,000 columns in one row: one frame, two chunks
        kv.declare_table("t", dim=300_000)
        one = np.array([3], np.uint64)
        row = vals[:300_000].reshape(1, -1)
        kv.wait(kv.push(one, row, table="t"))
        np.testing.assert_array_equal(kv.pull(one, table="t"), row)
        # small requests are not sealed: the CURVE connection carries them
        before = link.channel.sent
        kv.wait(kv.push(keys[:1000], vals[:1000]))
        assert link.channel.sent == before
        assert kv.stats()["sent_by_op"]["push"]["bytes"] > 2 * N * 4  # counted at full size
    finally:
        kv.close()


def test_a_tampered_chunk_refuses_its_push_and_changes_nothing(cluster_factory):
    cluster = cluster_factory(1, 1, insecure=False)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        keys = np.arange(N, dtype=np.uint64)
        ones = np.ones(N, np.float32)
        _warm(kv, keys, ones)
        kv.wait(kv.push(keys, ones))
        before = kv.pull(keys)
        link = _link(kv)
        aead = link.channel.aead

        class Tamper:  # flips one bit of the second chunk it seals, then seals faithfully
            calls = 0

            def encrypt_into(self, nonce, data, ad, out):
                aead.encrypt_into(nonce, data, ad, out)
                Tamper.calls += 1
                if Tamper.calls == 2:
                    out[len(out) // 2] ^= 1

            def decrypt_into(self, *a):
                return aead.decrypt_into(*a)

        link.channel.aead = Tamper()
        t = time.monotonic()
        with pytest.raises(PServerError, match="not authentic"):  # refused at once, by its ts
            kv.wait(kv.push(keys, ones), timeout=30)
        assert time.monotonic() - t < sealed.WAIT
        link.channel.aead = aead
        np.testing.assert_array_equal(kv.pull(keys), before)
        kv.wait(kv.push(keys, ones))  # the channel goes on: later messages are opened
        np.testing.assert_array_equal(kv.pull(keys), before + 1)

        class Refuse(Tamper):  # a reply whose chunk fails its tag here: the pull fails at once
            def decrypt_into(self, nonce, data, ad, out):
                from cryptography.exceptions import InvalidTag
                raise InvalidTag()

        link.channel.aead = Refuse()
        with pytest.raises(PServerError, match="not authentic"):
            kv.pull(keys)
        link.channel.aead = aead
        np.testing.assert_array_equal(kv.pull(keys), before + 1)
    finally:
        kv.close()


def test_junk_on_the_bulk_port_is_dropped(cluster_factory):
    cluster = cluster_factory(1, 1, insecure=False)
    kv = pserver.KVWorker(cluster.config(0))
    ctx = zmq.Context()
    try:
        keys = np.arange(N, dtype=np.uint64)
        vals = np.random.default_rng(2).random(N).astype(np.float32)
        _warm(kv, keys, np.zeros(N, np.float32))
        link = _link(kv)
        endpoint = link.bulk.getsockopt(zmq.LAST_ENDPOINT).decode()
        nxt = link.channel.sent + 1
        attackers = []
        for identity in (b"attacker", link.channel.token, None):  # the token's is taken: refused
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if identity is not None:
                sock.identity = identity
            sock.connect(endpoint)
            attackers.append(sock)
        for sock in attackers:
            for f in range(4):  # chunks that claim the worker's next message
                sock.send_multipart([sealed._CHUNK_HEAD.pack(nxt, 0, f),
                                     np.zeros(sealed.CHUNK + sealed.TAG, np.uint8)])
            sock.send_multipart([b"not a chunk"])
            sock.send_multipart([b"x" * 16, b"y", b"z"])
            sock.send(np.zeros(sealed.CHUNK + 4096, np.uint8))  # over the bulk socket's maxmsgsize
        kv.wait(kv.push(keys, vals))
        np.testing.assert_array_equal(kv.pull(keys), vals)
        assert link.channel.received >= 1
    finally:
        for s in attackers:
            s.close()
        ctx.term()
        kv.close()


def test_a_server_that_does_not_seal_gets_everything_over_curve(cluster_factory):
    cluster = cluster_factory(1, 1, insecure=False, env={"PSERVER_SEAL_MIN": "0"})
    kv = pserver.KVWorker(cluster.config(0).with_(seal_min="256k"))
    try:
        keys = np.arange(N, dtype=np.uint64)
        vals = np.random.default_rng(3).random(N).astype(np.float32)
        _warm(kv, keys, np.zeros(N, np.float32))
        link = _link(kv)
        kv.wait(kv.push(keys, vals))
        np.testing.assert_array_equal(kv.pull(keys), vals)
        assert link.bulk is None and link.channel.sent == 0
    finally:
        kv.close()


@pytest.mark.slow
def test_replicas_hold_large_pushes_forwarded_sealed(cluster_factory):
    """Each server forwards its half of a 4 MB push to the other (over a sealed link between
    servers); after one is killed the survivor answers the whole pull with the same values."""
    cluster = cluster_factory(2, 1, insecure=False, replication=1, heartbeat_timeout=0.6)
    kv = pserver.KVWorker(cluster.config(0).with_(request_timeout=60))
    try:
        keys = np.arange(N, dtype=np.uint64)
        vals = np.random.default_rng(4).random(N).astype(np.float32)
        kv.wait(kv.push(keys, vals))
        kv.wait(kv.push(keys, vals))
        np.testing.assert_array_equal(kv.pull(keys), 2 * vals)
        assert any(isinstance(link, SealedDealer) and link.channel.sent
                   for link in kv._sender.links.values())
        cluster.kill("server 1", signal.SIGKILL)
        np.testing.assert_array_equal(kv.pull(keys), 2 * vals)
    finally:
        kv.close()


def test_poll_then_recv_on_a_new_link_skips_the_welcome(cluster_factory):
    """A new link's first reply is the server's WELCOME, which the link handles itself: poll()
    says True only when recv() then returns a message (as `pserver export` relies on)."""
    cluster = cluster_factory(1, 1, insecure=False)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        (node,) = kv.membership.view.role_nodes("server")
        link = kv.transport.dealer_link(node.host, node.port, "server")
        try:
            link.send(Message("stats", 1))
            assert link.poll(10)
            item = link.recv()
            assert item is not None
            assert kv.transport.decode_body(item[1])[0].meta["id"] == node.id
            assert link.bulk is not None  # the WELCOME was read on the way
        finally:
            link.close()
    finally:
        kv.close()


def test_a_hello_naming_a_token_in_use_stays_on_curve():
    """A second link whose HELLO names another link's bulk token gets port 0 (CURVE only): it
    cannot have that link's sealed replies routed to it. A reference without a header is refused."""
    from pserver.sealed import _WELCOME, HELLO, KEY_BYTES, WELCOME, SealedRouter, Unopened
    from pserver.wire import Limits

    ctx = zmq.Context()
    socks = []

    def make(kind):
        s = ctx.socket(kind)
        s.linger = 0
        socks.append(s)
        return s

    try:
        router = make(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        link = SealedRouter(router, None, make, "127.0.0.1", Limits(), 256 << 10)
        token = b"t" * sealed.TOKEN_BYTES
        ports = []
        for name in (b"first", b"second"):
            d = make(zmq.DEALER)
            d.identity = name
            d.connect(f"tcp://127.0.0.1:{port}")
            d.send(HELLO + bytes((1,)) + bytes(KEY_BYTES) + token)
            deadline = time.monotonic() + 10
            while not d.poll(10):  # the router answers the HELLO inside its recv()
                assert link.recv() is None
                assert time.monotonic() < deadline
            kind, got = _WELCOME.unpack(d.recv())
            assert kind == WELCOME
            ports.append(got)
        assert ports[0] == link.bulk_port and ports[1] == 0
        assert set(link.channels) == {b"first"}
        refusal = Unopened([], sealed.SealError("a reference without a header")).refusal(Limits())
        assert isinstance(refusal, sealed.SealError)
    finally:
        for s in socks:
            s.close()
        ctx.term()
