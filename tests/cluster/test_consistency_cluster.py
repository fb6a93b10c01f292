"""Tasks and flexible consistency: the scheduler's task queues, the worker's executor, "as of" pulls
and the sparse-LR job under sequential and bounded-delay consistency.

The decision logic (TaskScheduler, Executor over a scripted kv) is driven directly; everything else
runs on real LocalClusters: scheduler, servers and workers as OS processes (or KVWorkers in this
process) over loopback sockets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pserver
from pserver.consistency.executor import Executor
from pserver.errors import ConfigError, TaskError
from pserver.membership.client import scheduler_request
from pserver.membership.tasks import TaskScheduler
from pserver.testing import ScriptedKV


# -- the task scheduler's decisions ------------------------------------------------------------
def test_each_tasks_complete_when_every_live_worker_did_them():
    ts = TaskScheduler()
    assert ts.plan("lr", 5) is True
    assert ts.plan("lr", 5) is False                      # every worker may send the same plan
    with pytest.raises(TaskError, match="another plan"):
        ts.plan("lr", 6)
    with pytest.raises(ConfigError):
        ts.plan("x", -1)
    got, fin = ts.next("lr", 1, 3)
    assert [t for t, _ in got] == [0, 1, 2] and not fin
    got, fin = ts.next("lr", 1, 3)
    assert [t for t, _ in got] == [3, 4] and fin          # nothing more for worker 1
    assert [t for t, _ in ts.next("lr", 2, 10)[0]] == [0, 1, 2, 3, 4]
    assert ts.done("lr", 1, [0, 1], live={1, 2}) == []    # worker 2 has not done them yet
    assert ts.done("lr", 2, [1], live={1, 2}) == []       # 0 is still missing on worker 2
    assert ts.done("lr", 2, [0], live={1, 2}, metrics={"computing_s": 3.0, "waiting_deps_s": 1.0,
                                                       "bogus": "x"}) == [0, 1]
    with pytest.raises(TaskError, match="not part"):
        ts.done("lr", 2, [7], live={1, 2})
    # worker 2 dies: completion no longer waits for it
    ts.done("lr", 1, [2, 3], live={1, 2})
    assert ts.requeue_node(2, live={1}) == []
    p = ts.progress({"lr": "bounded_delay:2"})["lr"]
    assert p["complete"] == 4 and p["model"] == "bounded_delay:2" and not p["finished"]
    assert set(p["workers"]) == {"1"}
    ts.done("lr", 1, [4], live={1})
    assert ts.finished("lr")
    assert ts.plan("lr", 6) is True                       # a finished app may be planned anew


def test_any_tasks_are_shared_and_a_dead_workers_tasks_are_requeued():
    ts = TaskScheduler()
    ts.plan("shards", 6, kind="any", payloads=[{"file": f"part{i}"} for i in range(6)])
    a, _ = ts.next("shards", 1, 2)
    b, _ = ts.next("shards", 2, 3)
    assert [t for t, _ in a] == [0, 1] and [t for t, _ in b] == [2, 3, 4]
    assert b[0][1] == {"file": "part2"}
    with pytest.raises(TaskError, match="not assigned"):
        ts.done("shards", 1, [2], live={1, 2})
    assert ts.done("shards", 2, [2], live={1, 2}) == [2]
    # worker 2 dies holding 3 and 4: they go back to the front of the queue, in order
    assert ts.requeue_node(2, live={1}) == [("shards", 3), ("shards", 4)]
    got, fin = ts.next("shards", 1, 10)
    assert [t for t, _ in got] == [3, 4, 5] and not fin
    ts.done("shards", 1, [0, 1, 3, 4, 5], live={1})
    assert ts.next("shards", 1, 1) == ([], True) and ts.finished("shards")
    ts.plan("s2", 2, kind="any")
    ts.next("s2", 1, 2)
    assert ts.next("s2", 3, 1) == ([], False)            # empty for now: the scheduler holds it
    ts.stop("s2")
    assert ts.next("s2", 3, 1) == ([], True)


# -- the executor over a scripted kv ------------------------------------------------------------
@pytest.mark.parametrize("tau", [0, 1, 3])
def test_executor_starts_a_task_only_after_tasks_older_than_tau_finished(tau):
    kv = ScriptedKV()
    ex = Executor(kv, f"bounded_delay:{tau}")
    assert kv.idle_timer is ex.timer
    ex.plan(12)
    push_of, applied, lags = {}, [], []

    def step(t):
        # every task t' <= t - tau - 1 must have finished (its pull applied) before t runs
        assert all(a in applied for a in range(t - tau)), (t, applied)
        lags.append(ex.lag)
        push_of[t] = ex.push(None, None)
        ex.pull(None, then=lambda v, t=t: applied.append(t))

    for t, _ in ex.assigned():
        ex.run(t, step)
    assert max(lags) == tau and lags[:tau + 1] == list(range(tau + 1))
    assert kv.waited == sorted(kv.waited)                 # replies collected in issue order
    ex.drain()
    assert applied == list(range(12)) and ex.finished_tasks == 12
    s = ex.stats()
    assert s["tracked_s"] > 0 and s["waiting_net_s"] == 0.0 and s["model"] == f"bounded_delay:{tau}"


def test_executor_model_change_applies_to_tasks_issued_after_it():
    kv = ScriptedKV()
    ex = Executor(kv, "bounded_delay:4")
    lags = []
    for t in range(6):
        if t == 3:
            ex.set_model("sequential")
        ex.run(t, lambda t: (lags.append(ex.lag), ex.pull(None)))
    # tasks 0..2 ran with tau 4 (nothing waited), task 3 (sequential) waited for everything
    assert lags == [0, 1, 2, 0, 0, 0]
    assert ex.tau == 0
    t = ex.issue(100)
    with pytest.raises(TaskError):
        ex.issue(100)                                     # an open task cannot be issued again
    ex.finish(t)


# -- on a real cluster: scheduler, servers and workers ----------------------------------------
def _workers(cluster, n):
    """n KVWorkers in this process (registration blocks until the cluster starts: threads)."""
    kvs: list = [None] * n
    threads = [threading.Thread(target=lambda r=r: kvs.__setitem__(r, pserver.KVWorker(
        cluster.config(r)))) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert all(kvs)
    return kvs


def test_scheduler_assigns_iterations_tracks_progress_and_changes_tau(cluster_factory):
    cluster = cluster_factory(1, 2)
    kvs = _workers(cluster, 2)
    keys = np.arange(64, dtype=np.uint64)
    for kv in kvs:
        kv.declare_table("it", dim=1)
    seen: dict[int, list] = {0: [], 1: []}
    errors: list = []
    changed = threading.Event()

    def run(r, kv):
        try:
            ex = kv.tasks(app="demo", model="bounded_delay:3")
            ex.plan(40)
            for t, _ in ex.assigned():
                if t == 20 and r == 0:
                    scheduler_request(cluster.config(), "set_consistency",
                                      {"app": "demo", "model": "sequential"}, role="scheduler")
                    changed.set()
                if t == 20:
                    changed.wait(10)
                    deadline = time.monotonic() + 10      # the view arrives with a heartbeat
                    while str(ex.model) != "sequential" and time.monotonic() < deadline:
                        time.sleep(0.01)
                ex.run(t, lambda t: ex.pull(keys, "it", then=lambda v: None))
                seen[r].append((t, ex.lag, str(ex.model)))
                time.sleep(0.002)
            ex.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r, kv)) for r, kv in enumerate(kvs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    for r in (0, 1):
        ts = [t for t, _, _ in seen[r]]
        assert ts == list(range(40))                      # every worker ran every iteration
        early = [lag for t, lag, _ in seen[r] if t < 20]
        late = [(lag, m) for t, lag, m in seen[r] if t >= 21]
        assert max(early) <= 3
        assert all(m == "sequential" and lag == 0 for lag, m in late), late
    # the last reports travel on the executors' own sockets: the status request may overtake them
    deadline = time.monotonic() + 10
    while True:
        p = scheduler_request(cluster.config(), "status", role="worker").meta["tasks"]["demo"]
        if p["complete"] == 40 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert p["complete"] == 40 and p["finished"] and p["model"] == "sequential"
    assert {w["done"] for w in p["workers"].values()} == {40}
    for w in p["workers"].values():
        assert w["computing_s"] > 0 and 0 <= w["idle_share"] <= 1
    # the admin command shows the progress and refuses a model that does not parse
    env = cluster.env()
    out = subprocess.run([sys.executable, "-m", "pserver", "consistency", "--insecure"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "demo: sequential, 40/40 each tasks complete" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pserver", "consistency", "--app", "demo",
                          "bounded_delay:x", "--insecure"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 1 and "unknown consistency model" in bad.stderr
    for kv in kvs:
        kv.close()


def test_a_leaving_workers_shard_tasks_are_requeued(cluster_factory):
    cluster = cluster_factory(1, 2)
    a, b = _workers(cluster, 2)
    ea, eb = a.tasks(app="shards"), b.tasks(app="shards")
    ea.plan(8, kind="any")
    eb.plan(8, kind="any")
    ga = ea.assigned()
    first = next(ga)[0]                                   # a holds a batch of tasks ...
    ea.run(first, lambda t: None)
    ea._channel.close()                                   # ... and vanishes without reporting
    a.close()
    done = [t for t, _ in eb.assigned() if eb.run(t, lambda t: None) is None]
    eb.close()
    assert sorted(done) == list(range(8))                 # b ran all of them, a's included
    p = scheduler_request(cluster.config(), "status", role="worker").meta["tasks"]["shards"]
    assert p["complete"] == 8 and p["finished"]
    b.close()


def test_pull_as_of_waits_for_the_clock_and_reports_it(cluster_factory):
    cluster = cluster_factory(2, 2)
    a, b = _workers(cluster, 2)
    for kv in (a, b):
        kv.declare_table("t", dim=1)
    keys = np.arange(0, 50_000, 7, dtype=np.uint64)     # spread over both servers
    nb = b.membership.node_id
    first = b.push(keys, np.ones(keys.size, np.float32), "t", span=(0, 1 << 20))
    b.wait(first)
    nxt = b._tracker.last_ts + 1                          # b's next request timestamp
    ts = a.pull(keys, "t", wait=False, as_of={nb: nxt}, clock=True)
    before = a.pull(keys, "t", wait=False)                # per-sender FIFO: held behind it
    time.sleep(0.3)
    assert ts in a._tracker.pending and before in a._tracker.pending  # the clock is behind
    t_push = time.monotonic()
    second = b.push(keys, np.full(keys.size, 2, np.float32), "t", span=(0, 1 << 20))
    assert second == nxt
    vals, vc = a.wait(ts)
    assert time.monotonic() >= t_push
    assert np.all(vals == 3.0) and vc[nb] == nxt          # both pushes are in, and say so
    assert np.all(a.wait(before) == 3.0)
    # an as-of time already covered is answered at once; the clock covers the declared span
    vals, vc = a.pull(np.array([5, 1 << 19], np.uint64), "t", as_of={nb: nxt}, clock=True)
    assert list(vals) == [0.0, 0.0] and vc[nb] == nxt     # keys b never sent, inside its span
    with pytest.raises(pserver.errors.InvalidKeysError):
        b.push(keys, np.ones(keys.size, np.float32), "t", span=(0, 10))
    for kv in (a, b):
        kv.close()


def test_a_live_worker_that_never_pushes_a_sync_table_does_not_block_its_rounds(cluster_factory):
    """A round of a sync table waits for the live workers that declared it, not for every live
    worker: an evaluation client (or another application) that never declares it blocks nothing."""
    cluster = cluster_factory(2, 2)
    a, b = _workers(cluster, 2)
    a.declare_table("s", sync=True)  # b never declares "s"
    keys = np.arange(0, 50_000, 7, dtype=np.uint64)  # spread over both servers
    try:
        for _ in range(3):
            a.wait(a.push(keys, np.ones(keys.size, np.float32), "s"), timeout=20)
        assert np.all(a.wait(a.pull(keys, "s", wait=False), timeout=20) == 3.0)
    finally:
        for kv in (a, b):
            kv.close()


def test_an_as_of_pull_is_answered_after_its_range_moved_to_a_joining_server(cluster_factory):
    """The pre-copy of a migration carries the range clock of the keys it copies, so an "as of"
    pull at their new holder does not wait for ever for a push applied before the move."""
    cluster = cluster_factory(1, 1)
    (kv,) = _workers(cluster, 1)
    kv.declare_table("t")
    keys = np.unique(np.random.default_rng(7).integers(0, 2**64 - 1, 2000, dtype=np.uint64))
    try:
        ts = kv.push(keys, np.ones(keys.size, np.float32), "t")
        kv.wait(ts)
        cluster.add_server()
        deadline = time.monotonic() + 90
        while len(kv.membership.view.ring.servers) < 2:
            assert time.monotonic() < deadline, "the joining server never received key ranges"
            time.sleep(0.1)
        vals = kv.wait(kv.pull(keys, "t", wait=False, as_of={kv.membership.node_id: ts}),
                       timeout=20)
        assert np.all(vals == 1.0)
    finally:
        kv.close()


def test_task_ops_are_for_workers_and_changing_consistency_for_the_scheduler():
    from pserver.security import authorise

    for op in ("task_plan", "task_next", "task_done"):
        assert authorise(op, "worker", True) and not authorise(op, "server", True)
    assert authorise("set_consistency", "scheduler", True)
    assert not authorise("set_consistency", "worker", True)


# -- the sparse-LR job (DBPG) under sequential and bounded-delay consistency --------------------
@pytest.fixture(scope="module")
def lr_data(tmp_path_factory):
    from pserver.apps.lr import gen

    d = tmp_path_factory.mktemp("lr_delay")
    gen.generate(str(d), 6000, features=3000, nnz=20, noise=0.05, seed=3, test_examples=100)
    return str(d / "train.libsvm")


def _train(data, workers, out_dir, *extra):
    """`python -m pserver.apps.lr.worker` on a fresh cluster; (summary, {key: weight})."""
    from pserver.apps.lr.model import load_model
    from pserver.launch import LocalCluster

    summary, model = out_dir / f"summary{workers}.json", out_dir / f"model{workers}"
    argv = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", data, "--l1", "2",
            "--epochs", "4", "--blocks", "8", "--model-out", str(model),
            "--summary-json", str(summary), *extra]
    with LocalCluster(2, workers, insecure=True, heartbeat_timeout=10.0) as cluster:
        assert cluster.run_workers(argv, timeout=120) == 0
    m = load_model(str(model))
    return json.loads(summary.read_text()), dict(zip(m.keys.tolist(), m.weights.tolist()))


def test_sequential_on_four_workers_matches_one_worker(lr_data, tmp_path):
    one, w1 = _train(lr_data, 1, tmp_path)
    four, w4 = _train(lr_data, 4, tmp_path, "--tau", "0")
    objs1 = [h["objective"] for h in one["history"]]
    objs4 = [h["objective"] for h in four["history"]]
    assert len(objs1) == len(objs4) == 4 and objs1[-1] < objs1[0]
    # the same iterations in the same order: only the summation order of the gradients differs
    assert objs4 == pytest.approx(objs1, rel=1e-6)
    keys = sorted(set(w1) | set(w4))                       # the models keep non-zeros only
    assert len(w1) > 50
    a, b = np.array([w1.get(k, 0.0) for k in keys]), np.array([w4.get(k, 0.0) for k in keys])
    assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a)
    assert four["max_lag"] == 0


def test_bounded_delay_never_reads_weights_older_than_tau(lr_data, tmp_path):
    tau, blocks = 2, 8
    clocks = tmp_path / "clocks"
    s, _ = _train(lr_data, 4, tmp_path, "--tau", str(tau), "--straggler", "3:3:0.5",
                  "--clock-log", str(clocks))
    logs = [json.loads((clocks / f"rank{r}.json").read_text()) for r in range(4)]
    push_ts = {log["node"]: {int(t): ts for t, ts in log["push_ts"].items()} for log in logs}
    lags = []
    for log in logs:
        pulls = log["pulls"]                               # [t, vc] in the order applied
        assert [t for t, _ in pulls] == sorted(t for t, _ in pulls)
        for t, vc in pulls:                                # a pull reads exactly its own round
            assert {int(n): v for n, v in vc.items()} == {n: p[t] for n, p in push_ts.items()}
        for t, applied, lag in log["starts"]:
            lags.append(lag)
            assert applied >= t - tau - 1 and lag <= tau
            # the copy of every block this iteration reads is no older than the block's last
            # iteration <= t - tau - 1, for every worker's push: checked with the servers' clocks
            for b in range(blocks):
                need = max((x for x in range(t - tau) if x % blocks == b), default=None)
                if need is None:
                    continue
                have = max(x for x, _ in pulls if x % blocks == b and x <= applied)
                vc = dict(pulls)[have]
                for node, p in push_ts.items():
                    assert vc[str(node)] >= p[need], (t, b, node)
    assert max(lags) == tau == s["max_lag"]                # the delay was used, never exceeded
    objs = [h["objective"] for h in s["history"]]
    assert all(np.isfinite(objs)) and objs[-1] < objs[0] < 6000 * np.log(2)  # F(0) = n log 2


def test_straggler_is_slower_at_all_of_its_iterations_work(tmp_path, monkeypatch):
    """--straggler RANK:FACTOR: on a slowed iteration the worker sleeps FACTOR - 1 times the CPU
    time of the iteration's work - gradient, sending its push and pull, applying the reply - not
    only the gradient (which left the benchmark's "2x straggler" about 1.1x slower)."""
    from pserver.apps.lr import dbpg, gen
    from pserver.apps.lr.data import read_shard
    from tests.cluster.test_lr_train import run_fake

    gen.generate(str(tmp_path), 4000, features=3000, nnz=20, noise=0.05, seed=3, test_examples=10)
    shard = read_shard(str(tmp_path / "train.libsvm"))
    slept: list[float] = []
    work = {"cpu": 0.0}

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                work["cpu"] += time.thread_time() - t0
        return wrapper

    # the iteration (gradient + push + pull, without the sleep) and the reply's application
    monkeypatch.setattr(dbpg.time, "sleep", slept.append)
    monkeypatch.setattr(dbpg.DBPG, "_iteration", timed(dbpg.DBPG._iteration))
    monkeypatch.setattr(dbpg.DBPG, "_apply", timed(dbpg.DBPG._apply))
    cfg = dbpg.DBPGConfig(l1=1.0, epochs=6, blocks=4, slowdown=3.0, slowdown_share=1.0)
    run_fake([shard], cfg)
    assert len(slept) == 6 * 4
    # the last iteration's dispatch and apply stand in for the current one's: equal in total up
    # to the first and last iteration
    assert sum(slept) == pytest.approx(2.0 * work["cpu"], rel=0.25)
