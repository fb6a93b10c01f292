"""A worker's task executor: runs an application's tasks under a consistency model and accounts
where the worker's time goes (paper: "Tasks and consistency", the idle-time figures).

    ex = kv.tasks(app="lr", model="bounded_delay:2")     # or Executor(kv, ...)
    ex.plan(count=100)                                   # every worker may send the same plan
    for t, payload in ex.assigned():                     # tasks the scheduler hands this worker
        ex.run(t, step)                                  # step(t) computes, then ex.push / ex.pull

Pushes and pulls of a task are its subtasks, collected in issue order. One thread drives it.
Semantics, time accounting and the scheduler channel: docs/consistency.md.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pserver.consistency.dag import BoundedDelay, ConsistencyModel, Eventual, TaskDAG, parse_model
from pserver.consistency.timing import IdleTimer
from pserver.errors import ConfigError, RemoteError, SchedulerUnreachableError, TaskError
from pserver.groups import DEFAULT, scoped
from pserver.wire import Message

from ..protocol import (
    APP,
    APP_METRICS,
    COUNT,
    ERROR,
    FINISHED,
    ID,
    KIND,
    MAX,
    METRICS,
    MODEL,
    ON_FAILURE,
    PAYLOADS,
    STOP,
    TASK_IDS,
    TASKS,
)

__all__ = ["Executor"]

log = logging.getLogger(__name__)

_LOOKAHEAD = 16     # tasks asked for at once; a new batch is asked for when half are left
_REPORT_EVERY = 32  # finished tasks reported at least this often (also piggybacked on requests)


@dataclass(slots=True)
class _Sub:
    id: int                                 # TaskDAG id of the subtask
    ts: int                                 # kv request timestamp
    parent: int                             # application task id
    then: Callable[[Any], None] | None


class Executor:
    """Runs one worker's tasks under a consistency model (see the module docstring).

    kv: a KVWorker (or any object with push/pull(wait=False)/wait). model: the default model
    (a ConsistencyModel or "sequential", "eventual", "bounded_delay:TAU"); the scheduler's setting
    for `app` overrides it. timer: the IdleTimer to account into (default: a new one; it is also
    installed as ``kv.idle_timer`` so KVWorker.wait records network waits).
    Raises ConfigError for a model that does not parse.
    """

    def __init__(self, kv: Any, model: ConsistencyModel | str | None = None, *,
                 app: str | None = None, timer: IdleTimer | None = None,
                 lookahead: int = _LOOKAHEAD) -> None:
        self.kv = kv
        self.app = app
        # the scheduler's name of the app: scoped by this worker's group
        self._scoped_app = scoped(app, getattr(kv, "group", DEFAULT)) if app is not None else None
        self.timer = timer or IdleTimer()
        if hasattr(kv, "idle_timer"):
            kv.idle_timer = self.timer
        self.dag = TaskDAG(model if model is not None else "sequential")
        self.lookahead = max(1, int(lookahead))
        self._ids: dict[int, int] = {}          # application task id -> TaskDAG id (unfinished)
        self._open: deque[int] = deque()        # application ids issued and not yet reported
        self._subs: deque[_Sub] = deque()       # outstanding subtasks, in issue order
        self._count: int | None = None          # local plan (no scheduler)
        self._done: list[int] = []              # finished, not yet reported to the scheduler
        self._metrics: dict[str, float] = {}    # application metrics for the next report
        self._last: int | None = None           # last task issued
        self.lag = 0                            # unfinished earlier tasks when the last one started
        self.finished_tasks = 0
        self._active = True
        self._channel = _Channel(kv, app) if app is not None and hasattr(kv, "membership") else None
        if self._channel is not None:
            kv.membership.on_view_change(self._on_view)
            self._on_view(kv.membership.view)

    # -- the model ----------------------------------------------------------------------------
    @property
    def model(self) -> ConsistencyModel:
        """The model applied to tasks issued from now on."""
        return self.dag.model

    def set_model(self, model: ConsistencyModel | str) -> None:
        """Change consistency while running; tasks already issued keep theirs."""
        self.dag.set_model(model)

    @property
    def tau(self) -> float:
        """Maximal delay of the current model in tasks: 0 sequential, inf eventual."""
        m = self.dag.model
        if isinstance(m, BoundedDelay):
            return m.tau
        return float("inf") if isinstance(m, Eventual) else 0

    def _on_view(self, view: Any) -> None:
        """Adopt the application's model from a new cluster view (heartbeat thread: must not
        raise, or the heartbeats would stop)."""
        text = view.settings.get("consistency", {}).get(self._scoped_app)
        if self._active and text and text != str(self.dag.model):
            try:
                self.dag.set_model(parse_model(text))
            except ConfigError as e:
                log.error("ignoring the consistency model %r of %s from the scheduler: %s", text,
                          self.app, e)

    # -- tasks --------------------------------------------------------------------------------
    def issue(self, t: int | None = None) -> int:
        """Register task `t` (default: the last one + 1) under the current model; returns t.
        The DAG orders tasks by issue, so application ids may come in any order (a dead worker's
        requeued shards arrive late); TaskError for an id that is still open."""
        if t is None:
            t = 0 if self._last is None else self._last + 1
        if t in self._ids:
            raise TaskError(f"task {t} is already issued and not finished")
        self._ids[t] = self.dag.issue()
        self._open.append(t)
        self._last = t if self._last is None else max(self._last, t)
        return t

    def start(self, t: int) -> int:
        """Block until the model lets task t start, collecting replies of earlier tasks (their
        `then` callbacks run here). Returns how many earlier tasks are still unfinished (the
        staleness the task runs with: <= tau under bounded delay)."""
        dag_id = self._id(t)
        with self.timer.waiting_deps():
            while not self.dag.ready(dag_id):
                if not self._subs:
                    raise TaskError(f"task {t} waits for earlier tasks that have no outstanding "
                                    "requests and were never finished: call finish() (or use "
                                    "run()) for every task")
                self._complete_next()
        self.lag = sum(1 for o in self._open if o != t and not self.dag.finished(self._ids[o]))
        return self.lag

    def finish(self, t: int) -> None:
        """The task's own work is done; it finishes once its subtasks have too."""
        self.dag.finish(self._id(t))
        self._collect_finished()

    def run(self, t: int | None, fn: Callable[[int], Any]) -> Any:
        """issue(t), start(t), fn(t) timed as computing, finish(t); returns fn's result. fn may
        issue subtasks with push/pull(task=t)."""
        t = self.issue(t)
        self.start(t)
        try:
            with self.timer.computing():
                return fn(t)
        finally:
            self.finish(t)

    def push(self, keys: Any, vals: Any, table: str | None = None, *, task: int | None = None,
             then: Callable[[Any], None] | None = None, **kw: Any) -> int:
        """kv.push as a subtask of `task` (default: the last issued); returns the timestamp."""
        return self._sub(task, then, self.kv.push(keys, vals, table, **kw))

    def pull(self, keys: Any, table: str | None = None, *, task: int | None = None,
             then: Callable[[Any], None] | None = None, **kw: Any) -> int:
        """kv.pull(wait=False) as a subtask of `task`; `then(values)` runs when the reply is
        collected (in issue order, in the thread that drives the executor)."""
        return self._sub(task, then, self.kv.pull(keys, table, wait=False, **kw))

    def push_pull(self, keys: Any, vals: Any, table: str | None = None, *, task: int | None = None,
                  then: Callable[[Any], None] | None = None, **kw: Any) -> int:
        """kv.push_pull(wait=False) as a subtask of `task`: one request per server whose reply
        carries the keys' values after the push; `then(values)` runs as for :meth:`pull`."""
        return self._sub(task, then, self.kv.push_pull(keys, vals, table, wait=False, **kw))

    def _sub(self, task: int | None, then: Callable | None, ts: int) -> int:
        parent = self._last if task is None else task
        sub = self.dag.add_subtask(self._id(parent))
        self._subs.append(_Sub(sub, ts, parent, then))
        return ts

    def _id(self, t: int | None) -> int:
        dag_id = self._ids.get(t) if t is not None else None
        if dag_id is None:
            raise TaskError(f"task {t} was not issued (or already finished) by this executor")
        return dag_id

    def _complete_next(self) -> None:
        s = self._subs.popleft()
        with self._unaccounted():
            result = self.kv.wait(s.ts)
        if s.then is not None:
            with self.timer.computing():
                s.then(result)
        self.dag.finish(s.id)
        self._collect_finished()

    @contextmanager
    def _unaccounted(self) -> Iterator[None]:
        """KVWorker.wait counts as waiting_net; collecting a dependency's reply is waiting_deps,
        so the kv's timer is detached meanwhile (one thread drives both)."""
        had = getattr(self.kv, "idle_timer", None)
        if had is not None:
            self.kv.idle_timer = None
        try:
            yield
        finally:
            if had is not None:
                self.kv.idle_timer = had

    def _collect_finished(self) -> None:
        while self._open and self.dag.finished(self._ids[self._open[0]]):
            t = self._open.popleft()
            del self._ids[t]
            self._done.append(t)
            self.finished_tasks += 1
        if self._channel is not None and len(self._done) >= _REPORT_EVERY:
            self._report()

    def wait(self, t: int) -> None:
        """Block until task t and the tasks before it have collected their replies (their
        `then` callbacks ran), counted as waiting_deps. Returns at once for finished tasks."""
        with self.timer.waiting_deps():
            while self._subs and self._subs[0].parent <= t:
                self._complete_next()

    def drain(self) -> None:
        """Wait until every issued task finished (waiting_deps), then report to the scheduler."""
        with self.timer.waiting_deps():
            while self._subs:
                self._complete_next()
        if self._open:
            raise TaskError(f"tasks {list(self._open)[:5]} were never finished: call finish()")
        if self._channel is not None:
            self._report()

    # -- the scheduler's task queue ------------------------------------------------------------
    def plan(self, count: int, kind: str = "each", payloads: list | None = None,
             on_failure: str = "requeue") -> None:
        """Declare the application's tasks 0 .. count-1 (idempotent across workers). With the
        scheduler, its consistency setting for the app (set by the first plan) is adopted.
        on_failure ("any" tasks): what happens to the unfinished tasks of a worker that dies -
        "requeue" (default: another worker runs them) or "drop" (the job finishes without them;
        `pserver status` lists them under "dropped").
        Raises RemoteError if the scheduler refuses (e.g. a conflicting running plan)."""
        if self._channel is None:
            self._count = int(count)
            return
        meta = {APP: self.app, COUNT: int(count), KIND: kind, MODEL: str(self.dag.model),
                ON_FAILURE: on_failure}
        if payloads is not None:
            meta[PAYLOADS] = payloads
        reply = self._channel.request("task_plan", meta, "ok")
        text = reply.meta.get(MODEL)
        if text and text != str(self.dag.model):  # the application's model at the scheduler wins
            self.dag.set_model(parse_model(text))

    def assigned(self) -> Iterator[tuple[int, Any]]:
        """Yield (task id, payload) of the tasks this worker should run, asking the scheduler
        ahead so that its answer is normally in hand before it is needed (blocking on it counts
        as waiting_deps). Without a scheduler: the local plan."""
        if self._channel is None:
            if self._count is None:
                raise TaskError("call plan(count) before assigned()")
            for t in range(self._count):
                yield t, None
            return
        ch, queue = self._channel, deque()
        asked = finished = False
        while True:
            if not asked and not finished and len(queue) <= self.lookahead // 2:
                self._report(ask=self.lookahead)
                asked = True
            for msg in ch.poll(0):
                asked = asked and not self._take(msg, queue)
                finished = finished or bool(msg.meta.get(FINISHED))
            if queue:
                yield queue.popleft()
                continue
            if finished:
                return
            if self._done:  # the answer may wait for these (an `any` plan ends when all are in)
                self._report()
            with self.timer.waiting_deps():
                for msg in ch.poll(None):
                    asked = asked and not self._take(msg, queue)
                    finished = finished or bool(msg.meta.get(FINISHED))

    def _take(self, msg: Any, queue: deque) -> bool:
        """Queue the tasks of a reply; True if it answered our request."""
        if msg.op == "error":
            raise RemoteError(f"the scheduler refused a task request: {msg.meta.get(ERROR)}")
        if msg.op != "tasks":
            return False
        queue.extend((int(t), p) for t, p in msg.meta.get(TASKS, []))
        return True

    def report(self, **app_metrics: float) -> None:
        """Attach application metrics (e.g. objective=...) to the next report to the scheduler."""
        self._metrics.update(app_metrics)

    def _report(self, ask: int | None = None, stop: bool = False) -> None:
        snap = self.timer.snapshot()
        meta = {APP: self.app, TASK_IDS: self._done[:], METRICS: {
            k: round(snap[k], 6) for k in ("computing_s", "waiting_deps_s", "waiting_net_s")}}
        if self._metrics:
            meta[APP_METRICS] = dict(self._metrics)
            self._metrics.clear()
        if ask is not None:
            meta[MAX] = ask
        if stop:
            meta[STOP] = True
        self._done.clear()
        self._channel.send("task_done", meta)

    def stop(self) -> None:
        """Tell the scheduler the application ends here (no more tasks for anyone)."""
        if self._channel is not None:
            self._report(stop=True)

    def stats(self) -> dict[str, float]:
        """The IdleTimer snapshot plus tasks finished and the current model."""
        return {**self.timer.snapshot(), "tasks_finished": self.finished_tasks,
                "model": str(self.dag.model)}

    def close(self) -> None:
        """Finish outstanding tasks, send the last report and release the scheduler socket."""
        if not self._active:
            return
        try:
            self.drain()
        finally:
            self._active = False
            if self._channel is not None:
                self._channel.close()
            if getattr(self.kv, "idle_timer", None) is self.timer:
                self.kv.idle_timer = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Channel:
    """A link of this worker to the scheduler for task ops, owned by the executor's thread
    (the membership's control link stays free for barriers)."""

    def __init__(self, kv: Any, app: str) -> None:
        self.transport = kv.transport
        self.node = kv.membership.node_id
        self.app = app
        self.lost = kv.membership.scheduler_lost
        m = kv.membership
        self.link = self.transport.dealer_link(m.sched_host, m.sched_port, "scheduler")
        self._ts = itertools.count(1)
        self.timeout = max(float(getattr(kv.cfg, "connect_timeout", 30.0)), 5.0)

    def send(self, op: str, meta: dict) -> int:
        ts = next(self._ts)
        self.link.send(Message(op, ts, meta={**meta, ID: self.node}))
        return ts

    def request(self, op: str, meta: dict, expect: str) -> Any:
        """Send and wait for the reply `expect` (replies to other requests are dropped)."""
        ts = self.send(op, meta)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for msg in self.poll(0.1):
                if msg.op == "error":
                    raise RemoteError(f"the scheduler refused {op}: {msg.meta.get(ERROR)}")
                if msg.ts == ts and msg.op == expect:
                    return msg
        raise SchedulerUnreachableError(f"the scheduler did not answer {op} within "
                                        f"{self.timeout:g} s")

    def poll(self, timeout: float | None) -> list:
        """Messages from the scheduler: those already here (timeout 0), or wait up to `timeout`
        seconds (None: until one arrives; SchedulerUnreachableError if the scheduler is lost)."""
        out = []
        step = 0.5 if timeout is None else timeout
        link, decode = self.link, self.transport.decode_body
        while True:
            if link.poll(step):
                while (item := link.recv()) is not None:
                    out.append(decode(item[1])[0])
            if out or timeout is not None:
                return out
            if self.lost.is_set():
                raise SchedulerUnreachableError("lost contact with the scheduler")

    def close(self) -> None:
        self.link.close(linger=1.0)  # let the last report go out

