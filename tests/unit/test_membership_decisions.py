"""The scheduler's registration and barrier decisions, without sockets or a scheduler."""

import pytest

from pserver.errors import AuthError
from pserver.membership.barrier import Barriers, members
from pserver.membership.liveness import Liveness
from pserver.membership.registration import Pending, Request, pick_rank
from pserver.membership.ring_keeper import RingKeeper
from pserver.testing import FakeClock, view_of


def _req(role: str, rank: int = -1) -> Request:
    return Request(role, "h", 1, 2, rank)


def test_pick_rank_keeps_a_free_requested_rank_else_the_lowest_free():
    assert pick_rank(3, [0, 1]) == 3
    assert pick_rank(1, [0, 1]) == 2
    assert pick_rank(-1, [0, 2]) == 1
    assert pick_rank(-1, []) == 0


def test_pending_starts_when_every_expected_node_came_and_orders_servers_first():
    p = Pending(num_servers=1, num_workers=2)
    assert not p.add("w-any", _req("worker"))
    assert not p.add("w-rank0", _req("worker", 0))
    assert (p.count("server"), p.count("worker")) == (0, 2)
    assert p.add("s", _req("server"))
    assert [w for w, _ in p.admission_order()] == ["s", "w-rank0", "w-any"]
    assert p.requests == []  # admitted: the queue is emptied


def test_request_parse_checks_role_and_credentials():
    meta = {"role": "worker", "host": "h", "port": "7", "pid": 9}
    assert Request.parse(meta, None) == Request("worker", "h", 7, 9, -1)
    assert Request.parse(meta, "worker").port == 7
    with pytest.raises(AuthError, match="credentials of a server"):
        Request.parse(meta, "server")
    with pytest.raises(ValueError, match="cannot register role"):
        Request.parse({**meta, "role": "scheduler"}, None)
    with pytest.raises(KeyError):
        Request.parse({"role": "worker"}, None)


def test_barrier_releases_everyone_once_all_live_members_arrived():
    view = view_of(servers=1, workers=2)           # ids: server 1, workers 2 and 3
    b = Barriers()
    assert members(view, "worker") == {2, 3} and members(view, "all") == {1, 2, 3}
    assert b.arrive("x", "worker", 2, "a", view) == []
    assert b.arrive("x", "worker", 3, "b", view) == ["a", "b"]
    assert b.waiting == {}                         # forgotten: the name can be used again
    assert b.arrive("x", "worker", 2, "c", view) == []


def test_barrier_completes_when_the_missing_member_dies():
    view = view_of(workers=3)
    b = Barriers()
    b.arrive("x", "worker", 1, "a", view)
    b.arrive("x", "worker", 2, "b", view)
    assert b.recheck(view) == []
    view.nodes[3].alive = False
    assert b.recheck(view) == ["a", "b"] and b.waiting == {}


def test_barrier_of_an_unknown_group_is_refused_not_passed():
    # a typo ("workers") once made a barrier with no members, which every node passed at once
    b = Barriers()
    with pytest.raises(ValueError, match="unknown barrier group 'workers'"):
        b.arrive("x", "workers", 1, "a", view_of(workers=2))
    assert b.waiting == {}


def test_liveness_declares_a_node_dead_after_the_timeout_of_silence():
    clock = FakeClock()
    live = Liveness(interval=0.1, timeout=0.6, clock=clock)
    live.seen(1)
    live.seen(2)
    for _ in range(5):                              # the loop turns every 0.1 s; node 1 beats
        clock.now += 0.1
        live.seen(1)
        assert live.expired([1, 2]) == []
    assert live.silence(2) == pytest.approx(0.5)
    clock.now += 0.15
    assert live.expired([1, 2]) == [2] and live.silence(2) == pytest.approx(0.65)
    assert live.expired([1]) == []                  # only nodes still alive are judged


def test_liveness_blames_a_starved_loop_not_the_nodes():
    clock = FakeClock()
    live = Liveness(interval=0.1, timeout=0.6, clock=clock)
    live.seen(1)
    clock.now += 5.0                                # the scheduler's loop did not run for 5 s
    assert live.expired([1]) == []
    assert live.silence(1) == pytest.approx(0.1)    # a fresh interval
    clock.now += 0.1
    assert live.expired([1]) == []
    for _ in range(6):                              # still silent while the loop runs normally
        clock.now += 0.1
        dead = live.expired([1])
    assert dead == [1]


def _keeper(servers: int, k: int) -> RingKeeper:
    view = view_of(servers=servers, ring=False)
    view.settings["replication"] = k
    keeper = RingKeeper(view)
    keeper.start(list(view.nodes), virtual=16)
    return keeper


def test_failover_takes_a_dead_server_off_the_ring_when_its_replicas_survive():
    keeper = _keeper(3, k=1)
    keeper.view.nodes[2].alive = False
    assert keeper.server_gone(2) is None
    assert keeper.view.ring.servers == [1, 3] and keeper.view.ring.version == 2
    assert keeper.safe.version == 1                   # replicas of v2 not rebuilt yet
    assert keeper.server_gone(2) is None and keeper.view.ring.version == 2  # not in the ring now


def test_servers_dying_faster_than_re_replication_count_together():
    keeper = _keeper(3, k=1)
    keeper.view.nodes[2].alive = False
    keeper.server_gone(2)
    keeper.view.nodes[3].alive = False
    loss = keeper.server_gone(3)                      # judged against v1: 2 and 3 held segments alone
    assert loss is not None and keeper.view.settings["lost"] == loss.masters
    assert keeper.view.ring.version == 2              # the ring is left as it is


def test_a_rebuilt_ring_becomes_safe_and_a_later_failure_is_survived():
    keeper = _keeper(3, k=1)
    keeper.view.nodes[2].alive = False
    keeper.server_gone(2)
    keeper.rebuilt[1] = 2
    keeper.settle()
    assert keeper.safe.version == 1                   # server 3 has not reported yet
    keeper.rebuilt[3] = 2
    keeper.settle()
    assert keeper.safe is keeper.view.ring
    keeper.view.nodes[3].alive = False
    assert keeper.server_gone(3) is None and keeper.view.ring.servers == [1]


def test_ring_with_a_server_added_or_removed():
    keeper = _keeper(2, k=0)
    ring = keeper.with_server(remove=2)
    assert ring.servers == [1] and ring.version == 2 and keeper.view.ring.version == 1
    assert keeper.with_server(add=1).servers == [1, 2]   # already there: unchanged servers
    keeper.view.nodes[1].alive = keeper.view.nodes[2].alive = False
    assert keeper.with_server(remove=1) is None
    keeper.commit(ring)
    assert keeper.view.ring is ring and keeper.safe is ring


def _beats(live, clock, node, gaps):
    for g in gaps:
        clock.now += g
        live.seen(node)
        live._last_check = clock.now   # the loop turned with each beat (not starved)


def test_liveness_keeps_the_configured_timeout_for_regular_heartbeats():
    clock = FakeClock()
    live = Liveness(interval=0.1, timeout=0.6, clock=clock)
    live.seen(1)
    _beats(live, clock, 1, [0.1] * 50)
    assert live.deadline(1) == pytest.approx(0.6)
    clock.now += 0.05
    assert live.expired([1]) == []
    for _ in range(6):
        clock.now += 0.1
        dead = live.expired([1])
    assert dead == [1]                              # 0.65 s of silence: dead, as before


def test_liveness_adapts_to_a_node_whose_heartbeats_come_late_under_load():
    clock = FakeClock()
    live = Liveness(interval=0.1, timeout=0.6, clock=clock)
    live.seen(1)
    _beats(live, clock, 1, [0.1, 0.1, 0.1, 0.7] * 15)   # a busy machine delays some beats
    deadline = live.deadline(1)
    assert 0.9 < deadline < 6.0
    for _ in range(int(0.85 / 0.05)):               # a gap longer than any seen: still alive
        clock.now += 0.05
        assert live.expired([1]) == []
    while clock.now - live.last_seen[1] <= deadline:
        clock.now += 0.05
        dead = live.expired([1])
    assert dead == [1]                              # declared at its own deadline
    assert live.phi(1, deadline + 0.1) > live.phi(1, 0.85) > 0


def test_liveness_adaptive_timeout_is_capped():
    clock = FakeClock()
    live = Liveness(interval=0.1, timeout=0.6, clock=clock)
    live.seen(1)
    _beats(live, clock, 1, [0.1, 5.0] * 20)          # wildly irregular
    assert live.deadline(1) == pytest.approx(6.0)
