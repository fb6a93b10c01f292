"""One pull for concurrent requests: requests queue their keys; one task takes everything queued,
pulls the union of the keys once (in the service's single KV thread) and hands every request its
own weights. Nothing waits on purpose: a batch is what arrived while the previous pull ran."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Pulled:
    """Weights of sorted unique ``keys``, the model version they came from and the time of the
    oldest pull they reflect (unix seconds)."""

    keys: np.ndarray
    weights: np.ndarray
    version: int
    pulled_at: float


def merge_keys(requests: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(union of the requests' keys, sorted unique; for each request the positions of its keys in
    the union, so that union_weights[positions] are its weights in its own key order)."""
    union = np.unique(np.concatenate(requests)) if len(requests) > 1 else np.unique(requests[0])
    return union, [np.searchsorted(union, k) for k in requests]


class Batcher:
    """Merges the key sets of concurrent requests into one ``fetch(keys) -> Pulled`` call, run in
    ``executor`` (one thread: the KVWorker is used by that thread only). ``max_keys`` bounds the
    keys of one merged pull (a request with more is pulled alone)."""

    def __init__(self, fetch: Callable[[np.ndarray], Pulled], executor: Executor,
                 max_keys: int = 1 << 20) -> None:
        self._fetch, self._executor, self.max_keys = fetch, executor, max_keys
        self._queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.pulls = self.requests = 0   # counters for /model and the benchmark

    def start(self) -> None:
        """Start the batching task in the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the task; requests still queued fail with asyncio.CancelledError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            self._queue.popleft()[1].cancel()

    async def weights(self, keys: np.ndarray) -> tuple[np.ndarray, Pulled]:
        """Weights of ``keys`` (any order, repeats allowed), aligned with them, and the pull
        they came from. Raises what fetch raised (the whole batch shares the error)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((keys, fut))
        self._wake.set()
        return await fut

    def _take(self) -> list:
        """The queued requests of the next pull: at least one, then as many as fit max_keys."""
        batch = [self._queue.popleft()]
        total = batch[0][0].size
        while self._queue and total + self._queue[0][0].size <= self.max_keys:
            batch.append(self._queue.popleft())
            total += batch[-1][0].size
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take()
            live = [(k, f) for k, f in batch if not f.done()]   # a client may have gone away
            if not live:
                continue
            union, positions = merge_keys([k for k, _ in live])
            self.pulls += 1
            self.requests += len(live)
            try:
                pulled = await loop.run_in_executor(self._executor, self._fetch, union)
            except asyncio.CancelledError:
                for _, f in live:
                    f.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - handed to every request of the batch
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), pos in zip(live, positions):
                if not f.done():
                    f.set_result((pulled.weights[pos], pulled))
