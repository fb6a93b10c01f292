"""The in-memory link: the seam's test double behaves like a ROUTER/DEALER pair."""

import threading

import numpy as np
import pytest
import zmq

from pserver import wire
from pserver.link import LinkError, LinkTimeout, MemoryHub, Poller, ZmqLink
from pserver.testing import MemoryTransport, RecordingLink, memory_config


def test_dealer_to_router_and_back_in_order():
    hub = MemoryHub()
    router = hub.router("server")
    a, b = hub.dealer("server", b"a"), hub.dealer("server", b"b")
    for i in range(3):
        a.send(wire.Message("push", i, arrays=[np.arange(4, dtype=np.uint64)]))
    b.send(wire.Message("pull", 9))
    got = []
    while (item := router.recv()) is not None:
        ident, frames = item
        got.append((ident, wire.decode(frames).ts))
    assert got == [(b"a", 0), (b"a", 1), (b"a", 2), (b"b", 9)]
    router.send(wire.Message("ack", 2), to=b"a")
    ident, frames = a.recv()
    assert ident is None and wire.decode(frames).op == "ack"
    assert b.recv() is None


def test_routed_send_to_an_unknown_or_closed_peer_raises():
    hub = MemoryHub()
    router = hub.router("server")
    with pytest.raises(LinkError, match="no peer"):
        router.send(wire.Message("ack", 1), to=b"nobody")
    d = hub.dealer("server", b"d")
    d.send(wire.Message("ping", 1))
    d.close()
    with pytest.raises(LinkError):
        router.send(wire.Message("pong", 1), to=b"d")
    with pytest.raises(LinkError, match="nothing listens"):
        hub.dealer("elsewhere", b"x").send(wire.Message("ping", 1))


def test_poller_wakes_on_a_send_from_another_thread():
    hub = MemoryHub()
    router = hub.router("server")
    d = hub.dealer("server", b"d")
    poller = Poller()
    poller.register(router)
    assert poller.poll(0) == []
    t = threading.Timer(0.05, lambda: d.send(wire.Message("ping", 1)))
    t.start()
    assert poller.poll(5) == [router]
    t.join()


class _RefusingSocket:
    """Stands in for a zmq socket whose send fails with ``error`` (no real socket is opened)."""

    def __init__(self, error: zmq.ZMQError, kind: int = zmq.DEALER):
        self.type, self.error = kind, error

    def send(self, *_a, **_k):
        raise self.error


def test_zmq_link_maps_a_send_timeout_to_link_timeout_and_other_errors_to_link_error():
    with pytest.raises(LinkTimeout, match="no peer took it in time"):
        ZmqLink(_RefusingSocket(zmq.Again())).send(wire.Message("register", 1))
    with pytest.raises(LinkError) as e:
        ZmqLink(_RefusingSocket(zmq.ZMQError(zmq.EHOSTUNREACH), zmq.ROUTER)).send(
            wire.Message("ack", 1), to=b"gone")
    assert not isinstance(e.value, LinkTimeout)


def test_poller_asks_scripted_links_and_unregisters():
    a, b = RecordingLink(), RecordingLink()
    poller = Poller()
    for link in (a, b, a):
        poller.register(link)
    assert poller.links() == [a, b] and poller.poll(5) == []
    b.push(wire.Message("ping", 1), b"x")
    assert poller.poll(5) == [b]
    poller.unregister(b)
    assert b not in poller and poller.poll(0) == []


def test_transport_messages_skip_a_malformed_one_and_count_the_rest(caplog):
    hub = MemoryHub()
    tr = MemoryTransport(hub, memory_config(), "worker")
    router, port = tr.router_link("h")
    dealer = tr.dealer_link("h", port, "server", identity=b"d")
    dealer.send(wire.Message("hello", 1))
    ident, _ = router.recv()
    router.send_frames([b"junk"], "junk", to=ident)
    router.send(wire.Message("ok", 2), to=ident)
    assert [m.op for m in tr.messages(dealer, "the router")] == ["ok"]
    assert "malformed message from the router dropped" in caplog.text
    assert tr.counters.to_json()["messages_received"] == 1
    tr.close()
    with pytest.raises(LinkError):
        dealer.send(wire.Message("late", 3))
