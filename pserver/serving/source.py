"""A serving process's view of live tables: one KVWorker (connected lazily, its tables declared
read-only), pulls with their range clocks, an optional WeightCache, and the mapping of cluster
failures to Unavailable (HTTP 503). Call it from one thread only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (
    DataLostError,
    PServerError,
    RequestTimeoutError,
    SchedulerUnreachableError,
)
from ..store.spec import TableSpec
from .batcher import Pulled

if TYPE_CHECKING:
    from ..apps.lr.serve.cache import WeightCache

log = logging.getLogger(__name__)

RECONNECT_INTERVAL_S = 1.0    # after a failed connect, requests fail fast for this long
ABANDONED_RETRY_S = 1.0       # how often timed-out pulls are collected (they may still finish)


# what a failed pull says about the cluster (HTTP 503 reasons), by the KVWorker's exception
_FAILURES = {SchedulerUnreachableError: "lost the cluster's scheduler",
             DataLostError: "weights lost on the servers (no replica left)",
             RequestTimeoutError: "pull timed out (--pull-timeout)"}


class Unavailable(Exception):
    """The cluster cannot answer now (HTTP 503); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def model_version(clock: dict[int, int]) -> int:
    """A version that grows with training: the number of requests of the training workers the
    weights reflect (sum over workers of the newest timestamp reflected, + 1 each)."""
    return sum(t + 1 for t in clock.values() if t >= 0)


def servers_spec(kv, table: str) -> TableSpec:
    """The spec of ``table`` as the servers hold it (raises TableError if they hold none)."""
    from ..apps.export import server_table_spec
    return server_table_spec(kv, table)


class WeightSource:
    """Rows of the tables ``tables`` from the cluster.

    connect() -> a KVWorker; tables: {name: declare_table keywords (the training job's spec, see
    dbpg.weight_table_args), or None to declare the spec the servers hold (read by
    ``spec_of(kv, name)``)}; timeout: seconds a pull may take before Unavailable; cache: only
    for tables of dim 1. ``specs`` holds each table's spec once connected.
    """

    def __init__(self, connect: Callable[[], object], tables: dict[str, dict | None],
                 timeout: float = 5.0, cache: WeightCache | None = None,
                 spec_of: Callable[[object, str], TableSpec] = servers_spec) -> None:
        if not tables:
            raise ValueError("a WeightSource needs at least one table")
        self._connect, self._tables, self._spec_of = connect, dict(tables), spec_of
        self.table = next(iter(self._tables))     # the default table of fetch
        self.specs: dict[str, TableSpec] = {}
        self.timeout, self.cache = timeout, cache
        self.kv = None
        self.last_error: str | None = None
        self.last_version = 0
        self.last_pull = 0.0          # unix time of the last successful pull
        self._next_connect = 0.0
        self._abandoned: list[int] = []
        self._abandoned_due = 0.0

    def _worker(self):
        if self.kv is not None:
            return self.kv
        now = time.monotonic()
        if now < self._next_connect:
            raise Unavailable(self.last_error or "connecting to the cluster")
        self._next_connect = now + RECONNECT_INTERVAL_S
        try:
            kv = self._connect()
        except PServerError as e:
            self.last_error = f"cannot join the cluster: {e}"
            raise Unavailable(self.last_error) from None
        for name, args in self._tables.items():
            try:
                self.specs[name] = self._declare(kv, name, args)
            except PServerError as e:
                kv.close()
                self.last_error = f"cannot declare table {name!r}: {e}"
                raise Unavailable(self.last_error) from None
        self.kv = kv
        return kv

    def _declare(self, kv, name: str, args: dict | None) -> TableSpec:
        if args is None:
            args = self._spec_of(kv, name).to_json()
            args.pop("name")
        return kv.declare_table(name, **args, pushes=False)

    def connect(self) -> None:
        """Join the cluster and declare the table now, unless done. Raises Unavailable."""
        self._worker()

    def fetch(self, keys: np.ndarray, table: str | None = None) -> Pulled:
        """Rows of sorted unique ``keys`` of ``table`` (default: the first; cached ones when fresh
        enough). Raises Unavailable (the cluster is unreachable, a pull timed out, keys were lost,
        a server refused); the next call retries, and after the scheduler is lost a new KVWorker
        joins."""
        now = time.time()
        if self.cache is not None:
            w, t, hit = self.cache.lookup(keys, now)
            if hit.all():
                return Pulled(keys, w, self.last_version, float(t.min()) if t.size else now)
            missing = keys[~hit]
        else:
            missing = keys
        fresh, clock = self._pull(missing, table or self.table)
        self.last_pull, self.last_version, self.last_error = now, model_version(clock), None
        if self.cache is None:
            return Pulled(keys, fresh, self.last_version, now)
        self.cache.store(missing, fresh, now)
        w[~hit] = fresh
        t[~hit] = now
        return Pulled(keys, w, self.last_version, float(t.min()) if t.size else now)

    def _pull(self, keys: np.ndarray, table: str) -> tuple[np.ndarray, dict[int, int]]:
        kv = self._worker()
        self._collect_abandoned(kv)
        try:
            ts = kv.pull(keys, table=table, wait=False, clock=True)
        except PServerError as e:
            raise self._unavailable(e) from None
        try:
            return kv.wait(ts, timeout=self.timeout)
        except PServerError as e:
            if isinstance(e, RequestTimeoutError):
                self._abandoned.append(ts)
            raise self._unavailable(e) from None

    def _unavailable(self, e: PServerError) -> Unavailable:
        """The 503 of a failed request; after the scheduler was lost the worker is dropped (the
        next request joins again)."""
        self.last_error = f"{_FAILURES.get(type(e), 'pull failed')}: {e}"
        if isinstance(e, SchedulerUnreachableError):
            kv, self.kv, self._abandoned = self.kv, None, []
            try:
                kv.close()
            except Exception as err:  # noqa: BLE001 - closing a dead worker: log, never raise
                log.debug("closing the lost worker: %s", err)
        return Unavailable(self.last_error)

    def _collect_abandoned(self, kv) -> None:
        """Timed-out pulls stay tracked until collected: collect those that finished since."""
        if not self._abandoned or time.monotonic() < self._abandoned_due:
            return
        self._abandoned_due = time.monotonic() + ABANDONED_RETRY_S
        still = []
        for ts in self._abandoned:
            try:
                kv.wait(ts, timeout=0.0)
            except RequestTimeoutError:
                still.append(ts)
            except PServerError:
                pass
        self._abandoned = still

    def nnz(self) -> int:
        """Non-zero weights of the first table (a full range pull: a diagnostic, not a hot path).
        Raises Unavailable."""
        kv = self._worker()
        try:
            _, w = kv.pull_range(table=self.table)
        except PServerError as e:
            raise self._unavailable(e) from None
        return int(np.count_nonzero(w))

    def close(self) -> None:
        """Leave the cluster (idempotent; never raises)."""
        kv, self.kv = self.kv, None
        if kv is not None:
            kv.close()
