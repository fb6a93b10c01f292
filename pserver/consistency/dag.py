"""Tasks, execute-after-finished dependencies and consistency models (paper: "Tasks and consistency").

A task (push, pull, "run iteration t") has an increasing timestamp from one caller; a consistency
model is a DAG shape: Sequential (after the previous task), Eventual (at once), BoundedDelay(tau)
(after every task issued more than tau steps earlier; tau may change while running). Subtasks are
not steps and do not wait for the model; their parent finishes once they all have. No I/O;
`TaskDAG` is thread-safe. Details: docs/consistency.md, "Tasks and consistency models"."""

from __future__ import annotations

import logging
import operator
import re
import threading
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pserver.errors import ConfigError, TaskError

__all__ = [
    "BoundedDelay",
    "ConsistencyModel",
    "Eventual",
    "Sequential",
    "TaskDAG",
    "parse_model",
    "staleness_ok",
]

log = logging.getLogger(__name__)


class ConsistencyModel(ABC):
    """A consistency model, i.e. the shape of the dependency DAG between a caller's tasks."""

    @abstractmethod
    def horizon(self, step: int) -> int:
        """The task at position `step` (0-based, in issue order) may start only once every task at
        position <= horizon has finished; -1 means it waits for nothing."""

    def deps(self, t: int, issued: Sequence[int]) -> list[int]:
        """The execute-after-finished edges of task t: which earlier tasks it waits for.

        `issued` holds the timestamps of the caller's tasks in issue (= increasing) order; entries
        >= t are ignored. The result is the transitive reduction: since every task starts only
        after its own edges finished, waiting for these implies waiting for all tasks up to
        horizon(position of t). (Sequential gives [previous task], BoundedDelay(tau) the tau + 1
        tasks at positions p-2tau-1 .. p-tau-1, Eventual [].)
        """
        p = bisect_left(issued, t)
        h = self.horizon(p)
        if h < 0:
            return []
        return list(issued[max(self.horizon(h) + 1, 0) : h + 1])

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class Sequential(ConsistencyModel):
    """Bulk synchronous: each task waits for the previous one (and so for all earlier ones)."""

    def horizon(self, step: int) -> int:
        return step - 1

    def __str__(self) -> str:
        return "sequential"

    def __repr__(self) -> str:
        return "Sequential()"


class Eventual(ConsistencyModel):
    """No waiting: all tasks may run at once."""

    def horizon(self, step: int) -> int:
        return -1

    def __str__(self) -> str:
        return "eventual"

    def __repr__(self) -> str:
        return "Eventual()"


class BoundedDelay(ConsistencyModel):
    """Task t waits for every task issued more than tau steps earlier (<= t - tau - 1).

    `tau` may be assigned while tasks run (one attribute write, safe from any thread); a TaskDAG
    reads it when a task is issued, so a change affects only tasks issued after it.
    """

    def __init__(self, tau: int) -> None:
        self.tau = tau

    @property
    def tau(self) -> int:
        """Maximal delay in steps (int >= 0)."""
        return self._tau

    @tau.setter
    def tau(self, value: int) -> None:
        try:
            value = operator.index(value)
        except TypeError:
            raise ConfigError(f"bounded delay tau must be an integer >= 0, got {value!r}") from None
        if value < 0:
            raise ConfigError(f"bounded delay tau must be >= 0, got {value}")
        self._tau = value

    def horizon(self, step: int) -> int:
        return step - self._tau - 1

    def __str__(self) -> str:
        return f"bounded_delay:{self._tau}"

    def __repr__(self) -> str:
        return f"BoundedDelay(tau={self._tau})"


_BOUNDED = re.compile(r"bounded_delay\s*(?::\s*(\d+)|\(\s*(\d+)\s*\))")


def parse_model(s: str) -> ConsistencyModel:
    """Parse "sequential", "eventual", "bounded_delay:4" or "bounded_delay(4)" (case and spaces
    ignored). Raises ConfigError naming the accepted forms otherwise."""
    if isinstance(s, ConsistencyModel):
        return s
    text = str(s).strip().lower()
    if text == "sequential":
        return Sequential()
    if text == "eventual":
        return Eventual()
    m = _BOUNDED.fullmatch(text)
    if m:
        return BoundedDelay(int(m.group(1) or m.group(2)))
    raise ConfigError(
        f"unknown consistency model {s!r}; use 'sequential', 'eventual' or 'bounded_delay:TAU' "
        "with an integer TAU >= 0"
    )


def staleness_ok(read_clock: int, t: int, tau: int) -> bool:
    """The bounded-delay guarantee for a read: the weights read by task t must reflect every update
    from tasks <= t - tau - 1.

    `read_clock` is the newest timestamp c such that the read reflects all updates from tasks
    <= c (for a pull, the min of the server's RangeClock over the range and the workers; -1 if it
    reflects none). True iff read_clock >= t - tau - 1; with tau = 0 that is the BSP read.
    """
    if tau < 0:
        raise ConfigError(f"bounded delay tau must be >= 0, got {tau}")
    return read_clock >= t - tau - 1


@dataclass(slots=True)
class _Task:
    id: int
    step: int | None  # position among model-ordered tasks; None for a subtask
    horizon: int  # steps <= horizon must have finished first (fixed at issue)
    after: list[int]  # explicit deps not yet seen finished
    parents: list[int] = field(default_factory=list)
    children: set[int] = field(default_factory=set)  # unfinished children
    self_done: bool = False  # finish() was called; may still wait for children
    finished: bool = False


class TaskDAG:
    """Tracks one caller's tasks: issued, ready (deps finished), finished.

    Memory stays bounded: finished tasks older than the oldest unfinished task are dropped; any id
    below that watermark then reads as finished. Task ids are non-negative and must increase in
    registration order (issue and new subtasks share one id space).

    Errors a caller can cause (unknown ids, non-increasing ids, cyclic subtasks) raise TaskError.
    """

    def __init__(self, model: ConsistencyModel | str | None = None) -> None:
        self._cond = threading.Condition()
        self._model = parse_model(model) if model is not None else Sequential()
        self._tasks: dict[int, _Task] = {}
        self._order: deque[int] = deque()  # live task ids, increasing
        self._steps: deque[tuple[int, int]] = deque()  # (step, id) of possibly unfinished steps
        self._next_step = 0
        self._last_id = -1
        self._floor = 0  # every id < floor is finished and compacted away

    # -- configuration ---------------------------------------------------------------------
    @property
    def model(self) -> ConsistencyModel:
        """The model applied to newly issued tasks."""
        return self._model

    def set_model(self, model: ConsistencyModel | str) -> None:
        """Change consistency while running; applies to tasks issued from now on."""
        model = parse_model(model)
        with self._cond:
            self._model = model
        log.info("consistency model set to %s", model)

    # -- registration ----------------------------------------------------------------------
    def _new_id(self, t: int | None) -> int:
        if t is None:
            return self._last_id + 1
        t = operator.index(t)
        if t <= self._last_id or t < 0:
            raise TaskError(
                f"task id {t} is not newer than the last registered id {self._last_id}; "
                "task timestamps must increase (or pass None to get the next one)"
            )
        return t

    def _check_after(self, t: int, after: Iterable[int]) -> list[int]:
        deps = []
        for a in after:
            a = operator.index(a)
            if a >= t:
                raise TaskError(f"task {t} cannot wait for task {a}: dependencies must be older")
            if a >= self._floor and a not in self._tasks:
                raise TaskError(f"task {t} depends on task {a}, which was never issued")
            deps.append(a)
        return deps

    def _register(self, task: _Task) -> None:
        self._tasks[task.id] = task
        self._order.append(task.id)
        self._last_id = task.id

    def issue(self, t: int | None = None, after: Iterable[int] = ()) -> int:
        """Register a task (the next step of the model) and return its id.

        It waits for the model's deps (fixed now, from the current model) plus the tasks in
        `after`. `t` defaults to the last id + 1. Raises TaskError for a non-increasing id or an
        unknown dependency.
        """
        with self._cond:
            tid = self._new_id(t)
            deps = self._check_after(tid, after)
            step = self._next_step
            self._next_step += 1
            self._register(_Task(tid, step, self._model.horizon(step), deps))
            self._steps.append((step, tid))
            return tid

    def add_subtask(self, parent: int, child: int | None = None, after: Iterable[int] = ()) -> int:
        """Make `child` a subtask of `parent`: the parent finishes only when finish(parent) was
        called and all its children finished. Returns the child id.

        A new child id (None allocates the next one) registers a subtask: it is not a step of the
        model and waits only for `after`. An already issued task may also be linked as a child
        (then `after` must be empty); linking a finished task is a no-op.
        Raises TaskError if the parent is unknown or finished, or the link would form a cycle.
        """
        with self._cond:
            parent = operator.index(parent)
            ptask = self._tasks.get(parent)
            if ptask is None or ptask.finished:
                state = "finished" if parent < self._floor or ptask else "unknown"
                raise TaskError(f"cannot add a subtask to {state} task {parent}; "
                                "add subtasks before the parent finishes")
            if child is None or operator.index(child) > self._last_id:
                cid = self._new_id(child)
                task = _Task(cid, None, -1, self._check_after(cid, after), parents=[parent])
                self._register(task)
                ptask.children.add(cid)
                return cid
            cid = operator.index(child)
            if after:
                raise TaskError(f"task {cid} is already issued; its dependencies are fixed")
            ctask = self._tasks.get(cid)
            if ctask is None and cid >= self._floor:
                raise TaskError(f"subtask {cid} was never issued")
            if ctask is None or ctask.finished:
                return cid
            if self._is_ancestor(cid, parent):
                raise TaskError(f"making {cid} a subtask of {parent} would form a cycle")
            if cid not in ptask.children:
                ptask.children.add(cid)
                ctask.parents.append(parent)
            return cid

    def _is_ancestor(self, a: int, t: int) -> bool:
        """True if a == t or a is a (transitive) parent of t."""
        stack, seen = [t], set()
        while stack:
            x = stack.pop()
            if x == a:
                return True
            if x in seen:
                continue
            seen.add(x)
            task = self._tasks.get(x)
            if task is not None:
                stack.extend(task.parents)
        return False

    # -- completion ------------------------------------------------------------------------
    def finish(self, t: int) -> None:
        """Mark task t done (its reply arrived). If it has unfinished subtasks it finishes when the
        last of them does. Idempotent: finishing a finished task again is ignored (resends after a
        failover may deliver a reply twice). Raises TaskError for a never-issued id."""
        t = operator.index(t)
        with self._cond:
            if t < self._floor:
                return
            task = self._tasks.get(t)
            if task is None:
                raise TaskError(f"cannot finish task {t}: it was never issued")
            if task.self_done:
                return
            task.self_done = True
            if not task.children:
                self._mark_finished(task)
                self._compact()
                self._cond.notify_all()

    def _mark_finished(self, task: _Task) -> None:
        stack = [task]
        while stack:
            task = stack.pop()
            task.finished = True
            for p in task.parents:
                ptask = self._tasks.get(p)
                if ptask is None or ptask.finished:
                    continue
                ptask.children.discard(task.id)
                if ptask.self_done and not ptask.children:
                    stack.append(ptask)

    def _compact(self) -> None:
        order, tasks = self._order, self._tasks
        while order and tasks[order[0]].finished:
            del tasks[order.popleft()]
        self._floor = order[0] if order else self._last_id + 1
        steps = self._steps
        while steps and (steps[0][1] < self._floor or tasks[steps[0][1]].finished):
            steps.popleft()

    # -- queries ---------------------------------------------------------------------------
    def _finished(self, t: int) -> bool:
        if t < self._floor:
            return True
        task = self._tasks.get(t)
        if task is None:
            raise TaskError(f"task {t} was never issued")
        return task.finished

    def _ready(self, t: int) -> bool:
        if t < self._floor:
            return True
        task = self._tasks.get(t)
        if task is None:
            raise TaskError(f"task {t} was never issued")
        if task.finished:
            return True
        if task.step is not None and self._steps and self._steps[0][0] <= task.horizon:
            return False
        while task.after and self._finished(task.after[-1]):
            task.after.pop()
        return not task.after

    def ready(self, t: int) -> bool:
        """True if every task t depends on has finished (a finished task is ready).
        Raises TaskError for a never-issued id."""
        with self._cond:
            return self._ready(operator.index(t))

    def wait_ready(self, t: int, timeout: float | None = None) -> bool:
        """Block until t is ready or `timeout` seconds pass (None: forever); returns ready(t)."""
        t = operator.index(t)
        with self._cond:
            return self._cond.wait_for(lambda: self._ready(t), timeout)

    def finished(self, t: int) -> bool:
        """True if t (and all its subtasks) finished. Ids below the compaction watermark read as
        finished. Raises TaskError for a never-issued id."""
        with self._cond:
            return self._finished(operator.index(t))

    def wait_finished(self, t: int, timeout: float | None = None) -> bool:
        """Block until t finished or `timeout` seconds pass (None: forever); returns finished(t)."""
        t = operator.index(t)
        with self._cond:
            return self._cond.wait_for(lambda: self._finished(t), timeout)

    def oldest_unfinished(self) -> int | None:
        """Id of the oldest unfinished task (step or subtask), None if all finished."""
        with self._cond:
            return self._order[0] if self._order else None

    def last_issued(self) -> int:
        """The newest registered id (-1 before the first)."""
        with self._cond:
            return self._last_id

    def __len__(self) -> int:
        """Number of tasks held in memory (unfinished ones and finished ones not yet compacted)."""
        with self._cond:
            return len(self._tasks)
