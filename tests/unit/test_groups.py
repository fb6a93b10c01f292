"""Worker groups without sockets: names and the read-only policy, ranks per group, barriers per
group, synchronous rounds per (table, group), task queues per group, the servers' refusals."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pserver import groups
from pserver.errors import ConfigError, RemoteError
from pserver.ft.replication import Replicator
from pserver.kv.core import ServerCore
from pserver.kv.rounds import SyncRounds
from pserver.membership.barrier import Barriers
from pserver.membership.registration import Pending, Request, rank_for
from pserver.membership.tasks import TaskService
from pserver.membership.view import ClusterView, NodeInfo
from pserver.testing import MemoryCluster
from pserver.wire import Message

KEYS = np.arange(10, 40, 3, dtype=np.uint64)


# -- names, sizes and the policy --------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "lr", "count-2", "a.b_c", "9" * 64])
def test_valid_group_names(name):
    assert groups.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, None, 3])
def test_invalid_group_names_say_what_is_allowed(name):
    with pytest.raises(ConfigError, match="letters, digits"):
        groups.check_name(name)


def test_group_sizes_parse_or_say_the_form():
    assert groups.parse_sizes(["count=2", "lr=10"]) == {"count": 2, "lr": 10}
    for bad in ("count", "count=0", "count=x", "=3"):
        with pytest.raises(ConfigError):
            groups.parse_sizes([bad])


@pytest.mark.parametrize("op, meta, refused", [
    ("push", {}, True),
    ("push", {"pp": 1}, True),                     # push_pull
    ("declare_table", {}, True),                   # as a pusher
    ("declare_table", {"pushes": False}, False),
    ("pull", {}, False),
    ("pull_range", {}, False),
    ("ping", {}, False),
])
def test_read_only_policy(op, meta, refused):
    why = groups.refusal(op, meta, "serve", {"serve"})
    assert (why is not None) == refused
    if refused:
        assert "group 'serve' is read-only" in why
    assert groups.refusal(op, meta, "train", {"serve"}) is None  # other groups may


def test_a_worker_may_restrict_only_a_group_without_writers():
    groups.join_read_only("q", (), live_members=0)
    groups.join_read_only("serve", ("serve",), live_members=3)  # already read-only
    with pytest.raises(ConfigError, match="writing member"):
        groups.join_read_only("train", (), live_members=1)


def test_application_names_are_scoped_by_group():
    assert groups.scoped("lr", "default") == "lr"
    assert groups.scoped("lr", "count") == "count/lr"
    assert groups.app_group("count/lr") == ("count", "lr")
    assert groups.app_group("lr") == ("default", "lr")


# -- registration ----------------------------------------------------------------------------
def _req(group="default", rank=-1, role="worker"):
    return Request(role, "h", 1, 1, rank, group)


def _node(nid, rank, group="default", role="worker", alive=True):
    return NodeInfo(nid, role, rank, "h", 0, 0, alive=alive, state="up" if alive else "dead",
                    group=group)


def test_ranks_are_given_per_group():
    nodes = [_node(1, 0, role="server"), _node(2, 0), _node(3, 1), _node(4, 0, "count")]
    assert rank_for(_req("count"), nodes) == 1
    assert rank_for(_req("default"), nodes) == 2
    assert rank_for(_req("new"), nodes) == 0
    assert rank_for(_req("count", rank=0), nodes) == 1  # taken in its group: the lowest free
    assert rank_for(_req("new", rank=3), nodes) == 3
    assert rank_for(_req(role="server"), nodes) == 1


def test_registration_parses_the_group_and_a_read_only_request():
    meta = {"role": "worker", "host": "h", "port": 1, "pid": 2, "group": "serve", "ro": True}
    req = Request.parse(meta, None)
    assert (req.group, req.read_only) == ("serve", True)
    assert Request.parse({**meta, "role": "server"}, None).group == "default"
    with pytest.raises(ConfigError):
        Request.parse({**meta, "group": "no good"}, None)


def test_the_start_waits_for_servers_and_default_workers_only():
    p = Pending(num_servers=1, num_workers=1)
    assert not p.add("a", _req("count"))
    assert not p.add("b", _req(role="server"))
    assert p.add("c", _req("default"))
    order = [w for w, _ in p.admission_order()]
    assert order[0] == "b" and set(order) == {"a", "b", "c"}


# -- barriers -------------------------------------------------------------------------------
def _view(*nodes):
    return ClusterView(version=1, nodes={n.id: n for n in nodes})


def test_a_worker_barrier_counts_its_own_groups_live_members():
    view = _view(_node(1, 0), _node(2, 1), _node(3, 0, "count"), _node(4, 1, "count"))
    b = Barriers()
    assert b.arrive("x", "worker", 1, "w1", view, "default") == []
    assert b.arrive("x", "worker", 3, "w3", view, "count") == []  # same name, other group
    assert b.arrive("x", "worker", 2, "w2", view, "default") == ["w1", "w2"]
    view.nodes[4].alive = False  # a dead member is dropped from its group's count
    assert b.recheck(view) == ["w3"]


def test_a_group_size_holds_a_barrier_until_the_group_joined():
    view = _view(_node(1, 0, "job"))
    b = Barriers({"job": 2})
    assert b.arrive("start", "worker", 1, "w1", view, "job") == []
    view.nodes[2] = _node(2, 1, "job")
    assert b.arrive("start", "worker", 2, "w2", view, "job") == ["w1", "w2"]
    view.nodes[2].alive = False  # later barriers: N joined once, the live ones count
    assert b.arrive("next", "worker", 1, "w1", view, "job") == ["w1"]


# -- synchronous rounds ----------------------------------------------------------------------
def _part(r: SyncRounds, worker: int, rnd: int, group: str, value: float = 1.0):
    return r.add("t", (rnd, None), worker, (rnd, 0), KEYS, np.full((len(KEYS), 1), value),
                 group=group)


def test_two_groups_pushing_one_table_have_separate_round_sequences():
    r = SyncRounds()
    for w in (1, 2):
        assert r.declare("t", w, group="a") == 0
    assert r.declare("t", 3, group="b") == 0
    _part(r, 1, 0, "a")
    _part(r, 3, 0, "b")
    assert [k for k, _ in r.pop_ready("t", {3}, "b")] == [(0, None)]  # b does not wait for a
    _part(r, 3, 1, "b")
    assert [k for k, _ in r.pop_ready("t", {3}, "b")] == [(1, None)]
    assert r.pop_ready("t", {1, 2}, "a") == []                        # a waits for worker 2
    _part(r, 2, 0, "a")
    assert [k for k, _ in r.pop_ready("t", {1, 2}, "a")] == [(0, None)]
    assert r.next_round("t", "a") == 1 and r.next_round("t", "b") == 2
    assert r.declare("t", 4, group="b") == 2  # a joiner of b starts at b's current round
    assert sorted(r.tables()) == []


def test_a_declared_pusher_of_another_group_never_blocks_a_round():
    r = SyncRounds()
    r.declare("t", 1, group="job")
    r.declare("t", 9, group="idle")  # live, declared as a pusher, never pushes
    _part(r, 1, 0, "job")
    assert len(r.pop_ready("t", {1}, "job")) == 1


# -- task queues ----------------------------------------------------------------------------
def test_task_queues_are_per_group():
    view = _view(_node(1, 0), _node(2, 0, "count"))
    sent = []
    svc = TaskService(lambda i, m: sent.append(m), lambda: view, lambda: None)
    for nid, count in ((1, 3), (2, 5)):
        svc.handle(b"x", Message("task_plan", 1, meta={"app": "lr", "count": count, "id": nid}))
    assert {a: p["tasks"] for a, p in svc.progress().items()} == {"lr": 3, "count/lr": 5}
    svc.handle(b"x", Message("task_next", 2, meta={"app": "lr", "id": 2, "max": 10}))
    assert sent[-1].meta["app"] == "lr" and len(sent[-1].meta["tasks"]) == 5


# -- the server's refusals and groups ------------------------------------------------------------
def _core(read_only=("serve",)) -> ServerCore:
    core = ServerCore(Replicator(None, 1, None))
    view = _view(_node(4, 0), _node(5, 0, "serve"), _node(6, 1))
    view.settings["read_only_groups"] = list(read_only)
    core.on_view(view)
    return core


def _push(ts, table="w", **meta):
    return Message("push", ts, table, {"kf": "k", "p": 0, **meta},
                   [KEYS, np.full((len(KEYS), 1), 2.0, np.float32)])


def _declare(ts, sync=False, **meta):
    spec = {"name": "w", "dim": 1, "dtype": "float32", "sync": sync}
    return Message("declare_table", ts, "", {"spec": spec, "p": 0, **meta})


def test_a_read_only_groups_push_is_refused_and_nothing_changes():
    core = _core()
    core.handle(b"n4", _declare(1))
    core.handle(b"n4", _push(2))
    core.out.clear()
    core.acks.take()
    for msg in (_push(3), _push(4, pp=1), _declare(5)):
        core.handle(b"n5", msg)
        err = core.out.pop()[1]
        assert (err.op, err.meta["kind"]) == ("error", "ReadOnlyGroupError")
        assert "group 'serve' is read-only" in err.meta["error"]
    core.handle(b"n5", _declare(6, pushes=False))
    core.handle(b"n5", Message("pull", 7, "w", {"kf": "k", "p": 0}, [KEYS]))
    replies = [m for _, m in core.out]
    assert [m.op for m in replies] == ["ok", "vals"]
    np.testing.assert_array_equal(replies[1].arrays[0], 2.0)  # the refused pushes left no trace
    assert core.rejections["ReadOnlyGroupError"] == 3


def test_a_sender_newer_than_the_view_waits_while_a_group_is_read_only():
    core = _core()
    core.handle(b"n4", _declare(1))
    core.out.clear()
    core.handle(b"n7", _push(2))  # n7 registered after this server's view
    core.handle(b"n7", Message("pull", 3, "w", {"kf": "k", "p": 0}, [KEYS]))
    assert core.out == [] and core.acks.take() == []
    view = _view(_node(4, 0), _node(5, 0, "serve"), _node(6, 1), _node(7, 1, "serve"))
    view.version = 2
    view.settings["read_only_groups"] = ["serve"]
    core.on_view(view)
    replies = [m for _, m in core.out]
    assert [m.meta.get("kind") for m in replies] == ["ReadOnlyGroupError", None]
    np.testing.assert_array_equal(replies[1].arrays[0], 0.0)


def test_without_read_only_groups_a_newer_sender_is_served_at_once():
    core = _core(read_only=())
    core.handle(b"n4", _declare(1))
    core.out.clear()
    core.handle(b"n7", _push(2))
    assert len(core.acks.take()) == 1


def test_sync_rounds_of_a_table_are_kept_per_group_on_the_server():
    core = _core(read_only=())
    view = _view(_node(4, 0), _node(6, 1), _node(8, 0, "count"))
    view.version = 2
    core.on_view(view)
    for ident in (b"n4", b"n6", b"n8"):
        core.handle(ident, _declare(1, sync=True))
    assert [m.meta["round"] for _, m in core.out] == [0, 0, 0]
    core.out.clear()
    core.handle(b"n8", _push(2, rnd=0))   # count's round 0 is complete alone
    core.handle(b"n4", _push(2, rnd=0))   # default's waits for worker 6
    np.testing.assert_array_equal(core.tables["w"].pull(KEYS), 2.0)  # count's round only
    core.handle(b"n6", _push(2, rnd=0))
    np.testing.assert_array_equal(core.tables["w"].pull(KEYS), 6.0)


# -- through the real scheduler, in memory -------------------------------------------------------
def test_the_scheduler_ranks_and_barriers_per_group_in_memory():
    with MemoryCluster(num_servers=1, num_workers=1) as c:
        c.join_all(["server", "worker"])
        a = [c.join("worker", group="count") for _ in range(2)]
        assert sorted(n.rank for n in a) == [0, 1]
        done = []
        t = threading.Thread(target=lambda: (a[0].barrier("x", timeout=10), done.append(1)))
        t.start()
        a[1].barrier("x", timeout=10)  # the default group's worker never arrives: not counted
        t.join(10)
        assert done == [1]
        status = c.scheduler.status()["groups"]
        assert status["count"]["live"] == 2 and status["default"]["live"] == 1
        with pytest.raises(RemoteError, match="writing member"):
            c.join("worker", group="count", read_only=True)
        c.join("worker", group="q", read_only=True)
        assert c.scheduler.view.read_only_groups == {"q"}


def test_status_has_a_section_per_group():
    from pserver.cli import format_groups

    nodes = [{"id": 1, "role": "server", "rank": 0, "state": "up"},
             {"id": 2, "role": "worker", "rank": 0, "state": "up", "group": "default"},
             {"id": 3, "role": "worker", "rank": 1, "state": "dead", "group": "count"},
             {"id": 4, "role": "worker", "rank": 0, "state": "up", "group": "count"}]
    progress = {"count/lr": {"complete": 3, "tasks": 8, "finished": False,
                             "workers": {"4": {"idle_share": 0.25}, "3": {}}}}
    g = groups.summary(nodes, ["serve"], {"count": 2}, progress)
    assert list(g) == ["count", "default", "serve"]
    assert g["count"]["live"] == 1 and g["count"]["size"] == 2
    assert [m["id"] for m in g["count"]["members"]] == [4, 3]
    assert g["count"]["apps"]["lr"] == {"complete": 3, "tasks": 8, "finished": False,
                                        "idle_share": 0.25}
    assert g["serve"]["read_only"] and not g["default"]["read_only"]
    text = "\n".join(format_groups(g))
    assert "group count: 1 live of 2 expected; members rank:id 0:4, 1:3 dead" in text
    assert "  app lr: 3/8 tasks complete, idle 25.0%" in text
    assert "group serve (read-only): 0 live" in text
