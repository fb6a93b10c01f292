"""The scheduler's task scheduler (paper: a worker group's scheduler "assigns tasks (data ranges) to
workers, tracks progress and reschedules unfinished work when workers join or leave").

An application has a plan of ``count`` tasks: ``each`` (every live worker runs every task, in id
order) or ``any`` (one worker per task; a dead worker's unfinished tasks are requeued or dropped).
Workers pull work ("task_next") and report completions with metrics ("task_done"); an app's
consistency model lives in ``view.settings["consistency"]``. `TaskScheduler` is the decision logic,
free of I/O; `TaskService` binds it to the scheduler's loop. Ops and rationale: docs/consistency.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import groups, security
from ..consistency.dag import parse_model
from ..errors import ConfigError, ProtocolError, TaskError
from ..protocol import (
    APP,
    APP_METRICS,
    CONSISTENCY,
    COUNT,
    CREATED,
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
from ..wire import Message

log = logging.getLogger(__name__)

__all__ = ["KINDS", "TaskScheduler", "TaskService"]

KINDS = ("each", "any")
MAX_TASKS = 10_000_000      # largest plan accepted (ids are kept in compact per-worker sets)
MAX_BATCH = 1024            # most task ids handed out or reported in one message
_MAX_METRICS = 32           # metric entries kept per report (they travel in the status reply)

# Workers run the application's tasks; the scheduler alone changes an application's consistency.
for _op in ("task_plan", "task_next", "task_done"):
    security.allow_op(_op, "worker")


class _Done:
    """Task ids reported done by one worker: a watermark plus the ids above it (tasks finish
    almost in order, so the set stays small)."""

    __slots__ = ("below", "above")

    def __init__(self) -> None:
        self.below = 0              # every id < below is done
        self.above: set[int] = set()

    def add(self, t: int) -> bool:
        if t < self.below or t in self.above:
            return False
        self.above.add(t)
        while self.below in self.above:
            self.above.discard(self.below)
            self.below += 1
        return True

    def __contains__(self, t: int) -> bool:
        return t < self.below or t in self.above

    def __len__(self) -> int:
        return self.below + len(self.above)


@dataclass
class _Worker:
    given: int = 0                                   # each: ids < given were handed out
    assigned: set[int] = field(default_factory=set)  # any: handed out, not yet done
    done: _Done = field(default_factory=_Done)
    last_done: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    updated: float = 0.0


@dataclass
class _App:
    name: str
    kind: str
    count: int
    payloads: list | None
    generation: int
    workers: dict[int, _Worker] = field(default_factory=dict)
    queue: deque[int] = field(default_factory=deque)  # any: ids not handed out
    owner: dict[int, int] = field(default_factory=dict)  # any: id -> node running it
    complete: _Done = field(default_factory=_Done)    # ids finished (by all / by their owner)
    stopped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)  # latest application-level metrics
    started: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    on_failure: str = "requeue"                       # any: a dead worker's tasks: requeue | drop
    dropped: list[int] = field(default_factory=list)  # any, drop: tasks given up with their worker


class TaskScheduler:
    """Task queues of the applications of one worker group, and their progress.

    Pure logic: callers pass the set of live worker ids where completion depends on it. Errors a
    worker can cause (unknown application, a conflicting plan, bad ids) raise TaskError or
    ConfigError with a message saying what to do.
    """

    def __init__(self) -> None:
        self.apps: dict[str, _App] = {}
        self._generation = 0

    # -- plans -----------------------------------------------------------------------------
    def plan(self, app: str, count: int, kind: str = "each", payloads: list | None = None,
             on_failure: str = "requeue") -> bool:
        """Create the task plan of `app` (idempotent: every worker may send the same plan).

        Returns True if a new plan was made. An identical plan of a running application is
        accepted as is; a different one raises TaskError unless the application finished (then
        the new plan replaces it: a new job under the same name).
        """
        if not isinstance(app, str) or not app or len(app) > 128:
            raise ConfigError(f"an application name must be 1..128 characters, got {app!r}")
        if kind not in KINDS:
            raise ConfigError(f"task kind must be one of {KINDS}, got {kind!r}")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TASKS:
            raise ConfigError(f"a plan needs 0 <= count <= {MAX_TASKS} tasks, got {count!r}")
        if on_failure not in ("requeue", "drop"):
            raise ConfigError(f"on_failure must be 'requeue' or 'drop', got {on_failure!r}")
        if payloads is not None and (not isinstance(payloads, list) or len(payloads) != count):
            raise ConfigError("payloads must be a list with one entry per task")
        have = self.apps.get(app)
        if have is not None and not self._finished(have):
            if (have.kind, have.count, have.payloads) == (kind, count, payloads):
                return False
            raise TaskError(f"application {app!r} is running with another plan ({have.count} "
                            f"{have.kind} tasks); use another application name or wait until it "
                            "finished")
        self._generation += 1
        a = _App(app, kind, count, payloads, self._generation, on_failure=on_failure)
        if kind == "any":
            a.queue.extend(range(count))
        self.apps[app] = a
        log.info("application %s: plan of %d %s tasks", app, count, kind)
        return True

    def _app(self, app: str) -> _App:
        a = self.apps.get(app)
        if a is None:
            raise TaskError(f"application {app!r} has no task plan; send task_plan first")
        return a

    def _finished(self, a: _App) -> bool:
        return a.stopped or len(a.complete) >= a.count

    def finished(self, app: str) -> bool:
        """True once every task of `app` is complete, or the application was stopped."""
        return self._finished(self._app(app))

    def stop(self, app: str) -> None:
        """No more tasks of `app` are handed out (the job ended early, e.g. it converged)."""
        a = self._app(app)
        if not a.stopped:
            a.stopped = True
            a.finished_at = a.finished_at or time.monotonic()
            a.queue.clear()

    # -- handing out -----------------------------------------------------------------------
    def next(self, app: str, node: int, max_tasks: int = 1) -> tuple[list[list], bool]:
        """Up to `max_tasks` tasks for worker `node`: ([[id, payload], ...], finished).

        `finished` True means this worker will never get another task of `app`. An empty list
        with finished False means "ask again later" (an `any` queue is empty while other workers
        still hold tasks that may be requeued).
        """
        a = self._app(app)
        max_tasks = max(1, min(int(max_tasks), MAX_BATCH))
        w = a.workers.setdefault(node, _Worker())
        if a.stopped:
            return [], True
        if a.kind == "each":
            ids = list(range(w.given, min(a.count, w.given + max_tasks)))
            w.given += len(ids)
            return [[t, self._payload(a, t)] for t in ids], w.given >= a.count
        ids = []
        while a.queue and len(ids) < max_tasks:
            t = a.queue.popleft()
            a.owner[t] = node
            w.assigned.add(t)
            ids.append(t)
        return [[t, self._payload(a, t)] for t in ids], not ids and len(a.complete) >= a.count

    @staticmethod
    def _payload(a: _App, t: int) -> Any:
        return a.payloads[t] if a.payloads is not None else None

    # -- completion ------------------------------------------------------------------------
    def done(self, app: str, node: int, ids: Iterable[int], live: Iterable[int],
             metrics: dict | None = None, app_metrics: dict | None = None) -> list[int]:
        """Worker `node` finished tasks `ids`; returns the ids that became complete.

        `live` are the live worker ids (an `each` task is complete once all of them did it).
        `metrics` (numbers, e.g. computing_s, waiting_deps_s) replace the worker's last report;
        `app_metrics` (e.g. objective) update the application's. Raises TaskError for an id
        outside the plan or an `any` task that was never handed to `node`.
        """
        a = self._app(app)
        w = a.workers.setdefault(node, _Worker())
        newly: list[int] = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < a.count:
                raise TaskError(f"task {t!r} is not part of application {app!r} (0..{a.count - 1})")
            if a.kind == "any":
                if a.owner.get(t) != node and t not in a.complete:
                    raise TaskError(f"task {t} of {app!r} is not assigned to worker {node}")
                w.assigned.discard(t)
                a.owner.pop(t, None)
            elif t >= w.given:
                raise TaskError(f"task {t} of {app!r} was never handed to worker {node}")
            if w.done.add(t):
                w.last_done = max(w.last_done, t)
                if a.kind == "any" and a.complete.add(t):
                    newly.append(t)
        if a.kind == "each":
            newly = self._complete_each(a, set(live))
        if metrics:
            w.metrics = _numbers(metrics)
            w.updated = time.monotonic()
        if app_metrics:
            a.metrics.update(_numbers(app_metrics))
        if self._finished(a) and a.finished_at is None:
            a.finished_at = time.monotonic()
        return newly

    def _complete_each(self, a: _App, live: set[int]) -> list[int]:
        members = [w for n, w in a.workers.items() if n in live]
        if not members:
            return []
        newly = []
        while len(a.complete) < a.count and all(a.complete.below in w.done for w in members):
            newly.append(a.complete.below)
            a.complete.add(a.complete.below)
        return newly

    def requeue_node(self, node: int, live: Iterable[int] = ()) -> list[tuple[str, int]]:
        """Worker `node` died or left: its unfinished `any` tasks go back to the front of their
        queues (in id order) and `each` tasks stop waiting for it. Returns the (app, id) pairs
        requeued. `live`: the remaining live workers."""
        out: list[tuple[str, int]] = []
        live = set(live)
        for a in self.apps.values():
            w = a.workers.pop(node, None)
            if w is None:
                continue
            if a.kind == "any" and not a.stopped:
                back = sorted(t for t in w.assigned if t not in a.complete)
                for t in back:
                    a.owner.pop(t, None)
                if a.on_failure == "drop":  # ML tolerates a lost shard: finish without it
                    a.dropped.extend(back)
                    for t in back:
                        a.complete.add(t)
                    if back:
                        log.warning("worker %d is gone: task(s) %s of %s dropped", node, back, a.name)
                    continue
                a.queue.extendleft(reversed(back))
                out.extend((a.name, t) for t in back)
            else:
                self._complete_each(a, live)
        if out:
            log.warning("worker %d is gone: %d unfinished task(s) requeued", node, len(out))
        return out

    # -- progress --------------------------------------------------------------------------
    def progress(self, models: dict | None = None) -> dict[str, dict]:
        """JSON-ready progress of every application (for `pserver status` and the dashboard)."""
        now = time.monotonic()
        out = {}
        for name, a in self.apps.items():
            end = a.finished_at or now
            workers = {}
            for nid, w in sorted(a.workers.items()):
                m = dict(w.metrics)
                tracked = sum(m.get(k, 0.0) for k in ("computing_s", "waiting_deps_s",
                                                      "waiting_net_s"))
                if tracked > 0:
                    m["idle_share"] = (m.get("waiting_deps_s", 0.0) + m.get("waiting_net_s", 0.0)) \
                        / tracked
                workers[str(nid)] = {"done": len(w.done), "last_done": w.last_done,
                                     "outstanding": len(w.assigned) if a.kind == "any"
                                     else max(w.given - len(w.done), 0), **m}
            out[name] = {"kind": a.kind, "tasks": a.count, "complete": len(a.complete),
                         "stopped": a.stopped, "finished": self._finished(a),
                         "seconds": round(end - a.started, 3), "queued": len(a.queue),
                         "model": (models or {}).get(name), "metrics": dict(a.metrics),
                         "on_failure": a.on_failure, "dropped": sorted(a.dropped),
                         "workers": workers}
        return out


def _numbers(d: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (it comes from the network), at most 32."""
    if not isinstance(d, dict):
        raise ProtocolError("task metrics must be a JSON object of numbers")
    out = {}
    for k, v in list(d.items())[:_MAX_METRICS]:
        if isinstance(k, str) and len(k) <= 64 and isinstance(v, int | float) \
                and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class TaskService:
    """Binds a TaskScheduler to the scheduler process: answers the task ops, holds task_next
    requests that must wait, keeps `view.settings["consistency"]` and re-queues the work of
    workers that leave or die.

    `send(identity, msg)` replies on the scheduler's socket; `view()` returns its ClusterView and
    `bump()` publishes a changed view (the consistency setting) to every node.
    """

    OPS = ("task_plan", "task_next", "task_done", "set_consistency")

    def __init__(self, send: Callable[[bytes, Message], None], view: Callable[[], Any],
                 bump: Callable[[], None]) -> None:
        self.tasks = TaskScheduler()
        self._send, self._view, self._bump = send, view, bump
        self._held: list[tuple[bytes, Message]] = []   # task_next requests waiting for work

    def _live(self) -> set[int]:
        return {n.id for n in self._view().role_nodes("worker")}

    def _app_of(self, meta: dict) -> str:
        """The sender's application, scoped by its worker group (groups.scoped). ProtocolError
        if the message names none."""
        app = meta.get(APP)
        if not isinstance(app, str):
            raise ProtocolError("a task op needs the application name in meta 'app'")
        node = self._view().nodes.get(meta.get(ID)) if type(meta.get(ID)) is int else None
        return groups.scoped(app, node.group if node is not None else groups.DEFAULT)

    def models(self) -> dict[str, str]:
        """Application -> consistency model, as published in the cluster view."""
        return dict(self._view().settings.get("consistency", {}))

    def handle(self, identity: bytes, msg: Message) -> None:
        """Serve one task op. Errors a worker can cause raise ValueError / PServerError (the
        scheduler answers them with an error reply)."""
        m, op = msg.meta, msg.op
        if op == "set_consistency":
            self.set_consistency(str(m.get(APP, "")), m.get(MODEL))
            self._send(identity, Message("ok", msg.ts, meta={CONSISTENCY: self.models()}))
            return
        app = self._app_of(m)
        if op == "task_plan":
            created = self.tasks.plan(app, m.get(COUNT), m.get(KIND, "each"), m.get(PAYLOADS),
                                      m.get(ON_FAILURE, "requeue"))
            model = m.get(MODEL)
            if model is not None and (created or app not in self.models()):
                self.set_consistency(app, model, announce=False)  # a new plan brings its model
            self._send(identity, Message("ok", msg.ts, meta={
                CREATED: created, MODEL: self.models().get(app)}))
            if created:
                self._retry_held()
            return
        node = int(m[ID])
        if node not in self._live():
            # sent before the worker left, on another socket than its leave, it may come after:
            # it must not take the tasks that the departure just requeued for the others
            raise TaskError(f"worker {node} is not a live worker of this cluster (it left or was "
                            f"declared dead): its task requests are refused; a worker that should go on "
                            f"must join the cluster again (a new KVWorker)")
        if op == "task_done":
            ids = m.get(TASK_IDS, [])
            if not isinstance(ids, list) or len(ids) > MAX_BATCH:
                raise ProtocolError(f"task_done carries a list of at most {MAX_BATCH} task ids")
            self.tasks.done(app, node, ids, self._live(), m.get(METRICS), m.get(APP_METRICS))
            if m.get(STOP):
                self.tasks.stop(app)
            if self._held and self.tasks.finished(app):  # waiting workers learn there is no more
                self._retry_held()
            if MAX in m:  # a done report that also asks for more work
                self._next(identity, msg, app, node)
            return
        if op == "task_next":
            self._next(identity, msg, app, node)
            return
        raise ProtocolError(f"unknown task op {op!r}")

    def _next(self, identity: bytes, msg: Message, app: str, node: int) -> bool:
        tasks, finished = self.tasks.next(app, node, int(msg.meta.get(MAX, 1)))
        if not tasks and not finished:
            self._held.append((identity, msg))
            return False
        self._send(identity, Message("tasks", msg.ts, meta={APP: msg.meta[APP], TASKS: tasks,
                                                             FINISHED: finished}))
        return True

    def _retry_held(self) -> None:
        held, self._held = self._held, []
        for identity, msg in held:
            try:
                self._next(identity, msg, self._app_of(msg.meta), int(msg.meta[ID]))
            except (TaskError, ConfigError) as e:
                self._send(identity, Message("error", msg.ts, meta={ERROR: str(e)[:500]}))

    def set_consistency(self, app: str, model: Any, announce: bool = True) -> None:
        """Publish `app`'s consistency model (e.g. "bounded_delay:4") in the cluster view; workers
        apply it to the tasks they issue after they see it. Raises ConfigError if it does not
        parse. `announce`: log the change as a warning (a run-time change by an operator)."""
        if not app:
            raise ConfigError("set_consistency needs an application name (e.g. --app lr)")
        text = str(parse_model(model))
        settings = self._view().settings
        current = dict(settings.get("consistency", {}))
        if current.get(app) == text:
            return
        current[app] = text
        settings["consistency"] = current
        self._bump()
        (log.warning if announce else log.info)("consistency of application %s set to %s", app, text)

    def node_gone(self, node: int) -> None:
        """A worker died or left: requeue its `any` tasks and serve waiting requests."""
        self._held = [(i, m) for i, m in self._held if int(m.meta.get(ID, -1)) != node]
        self.tasks.requeue_node(node, self._live())
        if self._held:  # requeued tasks to hand out, or (dropped) an application now finished
            self._retry_held()

    def progress(self) -> dict[str, dict]:
        return self.tasks.progress(self.models())
