"""ZmqLink and the Transport's links over real ZeroMQ sockets on loopback: round trip, counters,
a routed send to an unknown peer, and what a tool sees when no scheduler answers. (A DEALER's send
timeout, LinkTimeout, is exercised by test_security_cluster's node without keys.)"""

from __future__ import annotations

import pytest

from pserver.config import Config
from pserver.errors import SchedulerUnreachableError
from pserver.launch import free_port
from pserver.link import LinkError, Poller
from pserver.membership.client import scheduler_request
from pserver.transport import Transport
from pserver.wire import Message


@pytest.fixture
def transport():
    port = free_port()
    cfg = Config.from_env({}, scheduler=f"127.0.0.1:{port}", insecure=True, connect_timeout=0.3)
    tr = Transport(cfg, "worker")
    yield tr
    tr.close()


def test_router_and_dealer_links_round_trip_and_count(transport):
    router, port = transport.router_link("127.0.0.1")
    dealer = transport.dealer_link("127.0.0.1", port, "server", identity=b"d1")
    poller = Poller()
    poller.register(router)
    dealer.send(Message("ping", 7, meta={"x": 1}))
    assert poller.poll(5) == [router]
    ident, body = router.recv()
    msg, role = transport.decode_body(body)
    assert (ident, msg.op, msg.ts, msg.meta, role) == (b"d1", "ping", 7, {"x": 1}, None)
    router.send(Message("pong", 7), to=ident)
    assert dealer.poll(5)
    assert [m.op for m in transport.messages(dealer, "router")] == ["pong"]
    with pytest.raises(LinkError, match="cannot send"):   # ROUTER_MANDATORY: unknown peer
        router.send(Message("pong", 8), to=b"nobody")
    counts = transport.counters.to_json()
    assert counts["messages_sent"] == 2 and counts["messages_received"] == 2


def test_scheduler_request_without_a_scheduler_says_so():
    cfg = Config.from_env({}, scheduler=f"127.0.0.1:{free_port()}", insecure=True,
                          connect_timeout=0.3)
    with pytest.raises(SchedulerUnreachableError, match="no answer from the scheduler"):
        scheduler_request(cfg, "status", role="worker", timeout=0.3)
