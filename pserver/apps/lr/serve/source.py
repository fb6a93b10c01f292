"""The service's view of the live weights: one KVWorker (connected lazily, the weight table
declared read-only), pulls with their range clocks, an optional WeightCache, and the mapping of
cluster failures to Unavailable (HTTP 503). Call it from one thread only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from ....errors import (
    DataLostError,
    PServerError,
    RequestTimeoutError,
    SchedulerUnreachableError,
)
from .batcher import Pulled
from .cache import WeightCache

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


class WeightSource:
    """Weights of the table ``table`` from the cluster.

    connect() -> a KVWorker; table_args: declare_table keywords (the training job's spec; see
    dbpg.weight_table_args); timeout: seconds a pull may take before Unavailable.
    """

    def __init__(self, connect: Callable[[], object], table: str, table_args: dict,
                 timeout: float = 5.0, cache: WeightCache | None = None) -> None:
        self._connect, self.table, self._table_args = connect, table, dict(table_args)
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
        try:
            kv.declare_table(self.table, **self._table_args, pushes=False)
        except PServerError as e:
            kv.close()
            self.last_error = f"cannot declare table {self.table!r}: {e}"
            raise Unavailable(self.last_error) from None
        self.kv = kv
        return kv

    def connect(self) -> None:
        """Join the cluster and declare the table now, unless done. Raises Unavailable."""
        self._worker()

    def fetch(self, keys: np.ndarray) -> Pulled:
        """Weights of sorted unique ``keys`` (cached ones when fresh enough). Raises Unavailable
        (the cluster is unreachable, a pull timed out, keys were lost); the next call retries, and
        after the scheduler is lost a new KVWorker joins."""
        now = time.time()
        if self.cache is not None:
            w, t, hit = self.cache.lookup(keys, now)
            if hit.all():
                return Pulled(keys, w, self.last_version, float(t.min()) if t.size else now)
            missing = keys[~hit]
        else:
            missing = keys
        fresh, clock = self._pull(missing)
        self.last_pull, self.last_version, self.last_error = now, model_version(clock), None
        if self.cache is None:
            return Pulled(keys, fresh, self.last_version, now)
        self.cache.store(missing, fresh, now)
        w[~hit] = fresh
        t[~hit] = now
        return Pulled(keys, w, self.last_version, float(t.min()) if t.size else now)

    def _pull(self, keys: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
        kv = self._worker()
        self._collect_abandoned(kv)
        try:
            ts = kv.pull(keys, table=self.table, wait=False, clock=True)
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
        """Non-zero weights of the table (a full range pull: a diagnostic, not a hot path).
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
