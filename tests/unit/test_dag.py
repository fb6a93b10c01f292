"""Task DAG and consistency models (plus the idle-time accounting that measures their cost)."""

import random
import threading
import time

import pytest

from pserver.consistency import (
    BoundedDelay,
    Eventual,
    IdleTimer,
    Sequential,
    TaskDAG,
    parse_model,
    staleness_ok,
)
from pserver.errors import ConfigError, TaskError
from pserver.testing import FakeClock


def ready_set(dag: TaskDAG, ids) -> set[int]:
    return {t for t in ids if dag.ready(t)}


# -- models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expect", [
    ("sequential", Sequential()), ("eventual", Eventual()), (" Eventual ", Eventual()),
    ("bounded_delay:4", BoundedDelay(4)), ("bounded_delay(4)", BoundedDelay(4)),
    ("bounded_delay( 0 )", BoundedDelay(0)), ("BOUNDED_DELAY: 16", BoundedDelay(16)),
])
def test_parse_model(text, expect):
    model = parse_model(text)
    assert model == expect and type(model) is type(expect)
    assert parse_model(str(model)) == model


@pytest.mark.parametrize("text", ["", "bsp", "bounded_delay", "bounded_delay:-1",
                                  "bounded_delay:x", "bounded_delay(3"])
def test_parse_model_rejects(text):
    with pytest.raises(ConfigError, match="bounded_delay:TAU"):
        parse_model(text)


def test_tau_validation():
    with pytest.raises(ConfigError):
        BoundedDelay(-1)
    m = BoundedDelay(2)
    with pytest.raises(ConfigError):
        m.tau = 1.5
    assert m.tau == 2


def test_dag_shapes():
    issued = list(range(10))
    assert Sequential().deps(7, issued) == [6]
    assert Sequential().deps(0, issued) == []
    assert Eventual().deps(7, issued) == []
    assert BoundedDelay(0).deps(7, issued) == Sequential().deps(7, issued) == [6]
    # tau = 2: task 9 waits for tasks <= 6; edges to 4, 5, 6 (3 is implied through 6 -> 3).
    assert BoundedDelay(2).deps(9, issued) == [4, 5, 6]
    assert BoundedDelay(2).deps(2, issued) == []
    assert BoundedDelay(2).deps(3, issued) == [0]
    # Steps count issue order: with gaps in the timestamps, "tau steps earlier" still holds.
    assert Sequential().deps(30, [3, 10, 20, 30, 40]) == [20]
    assert BoundedDelay(1).deps(40, [3, 10, 20, 30, 40]) == [10, 20]


@pytest.mark.parametrize("tau", [0, 1, 2, 3, 7])
def test_deps_closure_is_every_task_tau_steps_back(tau):
    model = BoundedDelay(tau)
    issued = list(range(40))
    edges = {t: model.deps(t, issued) for t in issued}
    for t in issued:
        closure, stack = set(), list(edges[t])
        while stack:
            s = stack.pop()
            if s not in closure:
                closure.add(s)
                stack.extend(edges[s])
        assert closure == set(range(t - tau))  # every task <= t - tau - 1


def test_staleness_ok():
    assert staleness_ok(read_clock=5, t=10, tau=4)  # needs updates of tasks <= 5
    assert not staleness_ok(read_clock=4, t=10, tau=4)
    assert staleness_ok(read_clock=-1, t=3, tau=3)  # nothing required yet
    assert not staleness_ok(read_clock=8, t=10, tau=0)  # BSP needs task 9
    with pytest.raises(ConfigError):
        staleness_ok(0, 1, -1)


# -- TaskDAG: models -------------------------------------------------------------------------
def test_sequential_dag():
    dag = TaskDAG("sequential")
    ids = [dag.issue() for _ in range(4)]
    assert ids == [0, 1, 2, 3]
    assert ready_set(dag, ids) == {0}
    dag.finish(0)
    assert ready_set(dag, ids) == {0, 1}
    dag.finish(1)
    dag.finish(2)
    assert ready_set(dag, ids) == {0, 1, 2, 3}


def test_eventual_dag_everything_ready():
    dag = TaskDAG(Eventual())
    ids = [dag.issue() for _ in range(5)]
    assert ready_set(dag, ids) == set(ids)


def test_bounded_delay_dag_with_out_of_order_finishes():
    dag = TaskDAG(BoundedDelay(2))
    ids = [dag.issue() for _ in range(7)]
    assert ready_set(dag, ids) == {0, 1, 2}
    dag.finish(1)  # task 3 still needs task 0
    assert ready_set(dag, ids) == {0, 1, 2}
    dag.finish(0)  # now tasks <= 1 are done: 3 and 4 may run
    assert ready_set(dag, ids) == {0, 1, 2, 3, 4}
    dag.finish(3)  # 5 needs task 2 too
    assert ready_set(dag, ids) == {0, 1, 2, 3, 4}
    dag.finish(2)
    assert ready_set(dag, ids) == {0, 1, 2, 3, 4, 5, 6}


def test_bounded_delay_matches_definition_randomly():
    rng = random.Random(5)
    for tau in (0, 1, 3):
        dag = TaskDAG(BoundedDelay(tau))
        ids = [dag.issue() for _ in range(30)]
        done: set[int] = set()
        for t in rng.sample(ids, len(ids)):
            for u in ids:
                expect = u in done or all(s in done for s in range(u - tau))
                assert dag.ready(u) == expect, (tau, u, done)
            dag.finish(t)
            done.add(t)


def test_lowering_tau_affects_only_later_tasks():
    model = BoundedDelay(4)
    dag = TaskDAG(model)
    ids = [dag.issue() for _ in range(6)]  # 5 waits only for 0
    model.tau = 0
    late = dag.issue()  # 6 waits for everything <= 5
    dag.finish(0)
    assert dag.ready(5) and not dag.ready(late)
    for t in ids[1:]:
        assert not dag.ready(late)
        dag.finish(t)
    assert dag.ready(late)


def test_raising_tau_affects_only_later_tasks():
    model = BoundedDelay(0)
    dag = TaskDAG(model)
    dag.issue()
    dag.issue()  # 1 waits for 0
    model.tau = 3
    dag.issue()  # 2 waits for nothing (2 - 3 - 1 < 0)
    dag.issue()
    assert ready_set(dag, range(4)) == {0, 2, 3}
    dag.finish(0)
    assert dag.ready(1)


def test_set_model_while_running():
    dag = TaskDAG("sequential")
    dag.issue()
    dag.issue()
    dag.set_model("eventual")
    assert str(dag.model) == "eventual"
    dag.issue()
    assert ready_set(dag, range(3)) == {0, 2}
    dag.set_model(BoundedDelay(1))
    dag.issue()  # 3 waits for <= 1
    assert not dag.ready(3)
    dag.finish(0)
    dag.finish(1)
    assert dag.ready(3)


def test_explicit_after_deps():
    dag = TaskDAG("eventual")
    a = dag.issue()
    b = dag.issue()
    c = dag.issue(after=[a, b])
    assert dag.ready(a) and dag.ready(b) and not dag.ready(c)
    dag.finish(b)
    assert not dag.ready(c)
    dag.finish(a)
    assert dag.ready(c)


def test_explicit_ids_and_errors():
    dag = TaskDAG()
    assert dag.issue(10) == 10
    assert dag.issue() == 11
    with pytest.raises(TaskError, match="increase"):
        dag.issue(11)
    with pytest.raises(TaskError):
        dag.issue(-5)
    with pytest.raises(TaskError, match="never issued"):
        dag.issue(20, after=[15])
    with pytest.raises(TaskError, match="older"):
        dag.issue(21, after=[21])
    with pytest.raises(TaskError):
        dag.finish(99)
    with pytest.raises(TaskError):
        dag.ready(99)
    assert dag.last_issued() == 11


# -- subtasks --------------------------------------------------------------------------------
def test_parent_finishes_when_all_children_finished():
    dag = TaskDAG("sequential")
    it0 = dag.issue()
    push = dag.add_subtask(it0)
    pull = dag.add_subtask(it0)
    it1 = dag.issue()
    assert dag.ready(push) and dag.ready(pull)  # subtasks do not wait for the model
    dag.finish(it0)  # the iteration's own work is done, replies are outstanding
    assert not dag.finished(it0) and not dag.ready(it1)
    dag.finish(push)
    assert not dag.finished(it0)
    dag.finish(pull)
    assert dag.finished(it0) and dag.ready(it1)


def test_children_finishing_first_and_nesting():
    dag = TaskDAG("sequential")
    p = dag.issue()
    c = dag.add_subtask(p)
    g = dag.add_subtask(c)  # grandchild
    dag.finish(g)
    dag.finish(c)
    assert dag.finished(c) and not dag.finished(p)
    dag.finish(p)
    assert dag.finished(p)


def test_subtasks_do_not_count_as_steps():
    dag = TaskDAG(BoundedDelay(1))
    t0 = dag.issue()
    for _ in range(5):
        dag.add_subtask(t0)
    t1 = dag.issue()
    t2 = dag.issue()  # one step after t1 -> waits for t0 only
    assert (t0, t1, t2) == (0, 6, 7)
    assert dag.ready(t1) and not dag.ready(t2)


def test_linking_existing_tasks_and_cycles():
    dag = TaskDAG("eventual")
    a, b = dag.issue(), dag.issue()
    assert dag.add_subtask(a, b) == b
    dag.finish(a)
    assert not dag.finished(a)
    with pytest.raises(TaskError, match="cycle"):
        dag.add_subtask(b, a)
    with pytest.raises(TaskError, match="cycle"):
        dag.add_subtask(b, b)
    dag.finish(b)
    assert dag.finished(a)
    with pytest.raises(TaskError, match="finished"):
        dag.add_subtask(a)
    c = dag.issue()
    assert dag.add_subtask(c, b) == b  # b already finished: nothing to wait for
    dag.finish(c)
    assert dag.finished(c)


def test_subtask_with_own_deps():
    dag = TaskDAG("eventual")
    p = dag.issue()
    x = dag.issue()
    c = dag.add_subtask(p, after=[x])
    assert not dag.ready(c)
    dag.finish(x)
    assert dag.ready(c)


def test_finish_is_idempotent():
    dag = TaskDAG("sequential")
    dag.issue()
    dag.issue()
    dag.finish(0)
    dag.finish(0)  # duplicate reply after a resend
    dag.finish(1)
    dag.finish(0)  # compacted by now
    assert dag.oldest_unfinished() is None


# -- compaction -------------------------------------------------------------------------------
def test_compaction_keeps_memory_bounded():
    # Steps finish their own work but their subtasks never reply: nothing is finished, all held.
    dag = TaskDAG(BoundedDelay(8))
    children = []
    for _ in range(500):
        tid = dag.issue()
        children.append(dag.add_subtask(tid))
        dag.finish(tid)
    assert len(dag) == 1000 and dag.oldest_unfinished() == 0
    for c in children:  # replies arrive: everything finishes and is compacted away
        dag.finish(c)
    assert len(dag) == 0 and dag.finished(998)
    dag2 = TaskDAG(BoundedDelay(8))
    for _ in range(5000):
        tid = dag2.issue()
        child = dag2.add_subtask(tid)
        dag2.finish(tid)
        dag2.finish(child)
        assert len(dag2) == 0
    assert dag2.oldest_unfinished() is None and dag2.finished(0) and dag2.finished(9999)


def test_straggler_holds_window_until_it_finishes():
    dag = TaskDAG("eventual")
    ids = [dag.issue() for _ in range(1000)]
    dag.finish(ids[0])
    for t in ids[2:]:
        dag.finish(t)
    assert dag.oldest_unfinished() == 1
    assert len(dag) == 999  # tasks 1..999 (0 is compacted)
    assert dag.finished(0) and dag.finished(500) and not dag.finished(1)
    dag.finish(1)
    assert len(dag) == 0 and dag.oldest_unfinished() is None
    assert dag.issue() == 1000 and len(dag) == 1


# -- threads ----------------------------------------------------------------------------------
def test_wait_ready_wakes_when_dependency_finishes():
    dag = TaskDAG("sequential")
    dag.issue()
    dag.issue()
    result = {}

    def waiter():
        t0 = time.monotonic()
        result["ok"] = dag.wait_ready(1, timeout=5)
        result["waited"] = time.monotonic() - t0

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    assert th.is_alive()  # really blocked
    dag.finish(0)
    th.join(2)
    assert result["ok"] and 0.04 <= result["waited"] < 2


def test_wait_ready_and_finished_time_out():
    dag = TaskDAG("sequential")
    dag.issue()
    dag.issue()
    t0 = time.monotonic()
    assert dag.wait_ready(1, timeout=0.05) is False
    assert dag.wait_finished(0, timeout=0.05) is False
    assert 0.09 <= time.monotonic() - t0 < 1
    assert dag.wait_ready(0, timeout=0) is True


def test_many_threads_bounded_delay_never_violated():
    tau = 2
    dag = TaskDAG(BoundedDelay(tau))
    n = 60
    started: dict[int, set[int]] = {}
    done: set[int] = set()
    lock = threading.Lock()
    ids = [dag.issue() for _ in range(n)]

    def run(t):
        assert dag.wait_ready(t, timeout=10)
        with lock:
            started[t] = set(done)
        time.sleep(random.random() * 0.002)
        with lock:
            done.add(t)
        dag.finish(t)

    threads = [threading.Thread(target=run, args=(t,)) for t in reversed(ids)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert done == set(ids)
    for t, seen in started.items():
        assert set(range(t - tau)) <= seen, t
    assert dag.wait_finished(n - 1, timeout=1) and len(dag) == 0


# -- idle timer -------------------------------------------------------------------------------
def test_idle_timer_accumulates_and_shares():
    clock = FakeClock()
    timer = IdleTimer(clock)
    with timer.computing():
        clock.now += 6
    with timer.waiting_deps():
        clock.now += 3
    with timer.waiting_net():
        clock.now += 1
    clock.now += 10  # untracked
    snap = timer.snapshot()
    assert snap["computing_s"] == 6 and snap["waiting_deps_s"] == 3 and snap["waiting_net_s"] == 1
    assert snap["tracked_s"] == 10 and snap["wall_s"] == 20
    assert snap["computing_share"] == pytest.approx(0.6)
    assert snap["idle_share"] == pytest.approx(0.4)


def test_idle_timer_nesting_does_not_double_count():
    clock = FakeClock()
    timer = IdleTimer(clock)
    with timer.computing():
        clock.now += 2
        with timer.waiting_net():
            clock.now += 5
            with timer.waiting_net():
                clock.now += 1
        clock.now += 2
        snap = timer.snapshot()  # open span counted up to now
        assert snap["computing_s"] == 4 and snap["waiting_net_s"] == 6
    snap = timer.snapshot()
    assert snap["tracked_s"] == 10 and snap["computing_s"] == 4 and snap["waiting_net_s"] == 6
    timer.reset()
    assert timer.snapshot()["tracked_s"] == 0 and timer.snapshot()["idle_share"] == 0.0


def test_idle_timer_counts_time_when_body_raises():
    clock = FakeClock()
    timer = IdleTimer(clock)
    with pytest.raises(RuntimeError), timer.waiting_deps():
        clock.now += 2
        raise RuntimeError
    assert timer.snapshot()["waiting_deps_s"] == 2
