"""The scheduler's task service (pserver.membership.tasks.TaskService) when a worker leaves: its
tasks go back to the others, and a request it sent before leaving takes none of them."""

from __future__ import annotations

import pytest

from pserver.errors import TaskError
from pserver.membership.tasks import TaskService
from pserver.membership.view import ClusterView, NodeInfo
from pserver.wire import Message


def _service() -> tuple[TaskService, ClusterView, list]:
    view = ClusterView(version=1, nodes={
        nid: NodeInfo(nid, "worker", rank, "h", 0, 0) for rank, nid in enumerate((2, 3))})
    sent: list[tuple[bytes, Message]] = []
    svc = TaskService(lambda identity, msg: sent.append((identity, msg)), lambda: view,
                      lambda: None)
    svc.handle(b"a", Message("task_plan", 1, meta={"app": "shards", "count": 8, "kind": "any",
                                                   "id": 2}))
    return svc, view, sent


def _ask(svc: TaskService, identity: bytes, node: int, ts: int) -> None:
    svc.handle(identity, Message("task_done", ts, meta={"app": "shards", "id": node, "ids": [],
                                                        "max": 16}))


def test_a_request_a_departed_worker_sent_before_leaving_takes_none_of_its_requeued_tasks():
    svc, view, sent = _service()
    _ask(svc, b"a", 2, 2)
    assert [t for t, _ in sent[-1][1].meta["tasks"]] == list(range(8))   # worker 2 holds all
    view.nodes[2].alive = False                                          # it leaves ...
    svc.node_gone(2)
    with pytest.raises(TaskError, match="worker 2 is not a live worker"):
        _ask(svc, b"a", 2, 3)                         # ... and its last ask arrives after that
    _ask(svc, b"b", 3, 2)
    assert sent[-1][0] == b"b" and [t for t, _ in sent[-1][1].meta["tasks"]] == list(range(8))


def test_a_live_workers_request_held_while_others_hold_the_tasks_is_served_when_they_leave():
    svc, view, sent = _service()
    _ask(svc, b"a", 2, 2)
    _ask(svc, b"b", 3, 2)                                                # nothing left: held
    assert sent[-1][0] == b"a"
    view.nodes[2].alive = False
    svc.node_gone(2)
    assert sent[-1][0] == b"b" and [t for t, _ in sent[-1][1].meta["tasks"]] == list(range(8))
