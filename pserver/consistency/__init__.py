"""Consistency: range vector clocks, the task DAG with its consistency models, idle-time
accounting. Pure decision logic, free of I/O; the kv layer drives it from the network."""

from pserver.consistency.clock import KEY_SPACE_END, NEVER, RangeClock, RangeMap
from pserver.consistency.dag import (
    BoundedDelay,
    ConsistencyModel,
    Eventual,
    Sequential,
    TaskDAG,
    parse_model,
    staleness_ok,
)
from pserver.consistency.timing import IdleTimer

__all__ = [
    "KEY_SPACE_END",
    "NEVER",
    "BoundedDelay",
    "ConsistencyModel",
    "Eventual",
    "IdleTimer",
    "RangeClock",
    "RangeMap",
    "Sequential",
    "TaskDAG",
    "parse_model",
    "staleness_ok",
]
