"""FTRL-proximal logistic regression (McMahan et al., KDD 2013) on the parameter server.

Each worker streams minibatches of its shard: it pulls the weights of a minibatch's keys, computes
the summed per-coordinate gradient and pushes it to an asynchronous table whose servers run the
`ftrl` rule (L1, L2) per coordinate. Minibatches are tasks of the application "lr_ftrl" under
bounded delay tau (default 0: a gradient misses none of this worker's updates, only the other
workers' in flight: summed minibatch gradients overshoot when they arrive a few minibatches late).
Progress is the progressive logloss, as Vowpal Wabbit reports it. Details, measurements: docs/lr.md.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numba
import numpy as np

from ...consistency.executor import Executor
from ...errors import ConfigError
from .data import Shard
from .dbpg import KEY_SPACE, PassStats

SETUP_KEY = KEY_SPACE - 100   # stats-table key of the set-up sum (pass keys are 1, 2, ...)


@dataclass
class FTRLConfig:
    """Hyper-parameters: alpha > 0, beta >= 0, l1, l2 >= 0 (the ftrl rule's); batch >= 1 examples
    per minibatch (about: every worker runs the same number of minibatches per pass)."""

    alpha: float = 0.2
    beta: float = 1.0
    l1: float = 1.0
    l2: float = 0.0
    epochs: int = 3
    batch: int = 2048
    tau: int = 0
    table: str = "lr_w"
    app: str = "lr_ftrl"

    def check(self) -> None:
        """Raise ConfigError on an invalid setting."""
        if not self.alpha > 0 or self.beta < 0 or self.l1 < 0 or self.l2 < 0:
            raise ConfigError(f"ftrl needs alpha > 0 and beta, l1, l2 >= 0, got alpha="
                              f"{self.alpha} beta={self.beta} l1={self.l1} l2={self.l2}")
        if self.batch < 1 or self.epochs < 0 or self.tau < 0:
            raise ConfigError(f"ftrl needs --batch >= 1, --epochs >= 0 and --tau >= 0, got "
                              f"{self.batch}, {self.epochs}, {self.tau}")


@dataclass
class Minibatches:
    """A shard cut into row ranges, each with its own sorted keys and local column ids.

    Minibatch b: rows starts[b]:starts[b + 1] of the shard's CSR form; its keys are
    keys[uptr[b]:uptr[b + 1]]; entry p's column is local[p] among them."""

    starts: np.ndarray
    indptr: np.ndarray     # the CSR row pointer of the whole shard (int64)
    local: np.ndarray      # int32, per entry
    data: np.ndarray       # float32, per entry
    y: np.ndarray          # float64, +-1
    keys: np.ndarray       # uint64, per minibatch, concatenated
    uptr: np.ndarray
    binary: bool

    def __len__(self) -> int:
        return self.starts.size - 1

    def keys_of(self, b: int) -> np.ndarray:
        return self.keys[self.uptr[b]:self.uptr[b + 1]]


def cut_minibatches(shard: Shard, count: int) -> Minibatches:
    """The shard in `count` >= 1 row ranges of nearly equal size (some empty if count exceeds the
    examples). Raises ConfigError for count < 1."""
    if count < 1:
        raise ConfigError(f"need at least one minibatch, got {count}")
    X = shard.X.tocsr()
    X.sort_indices()
    indptr = X.indptr.astype(np.int64)
    starts = np.linspace(0, shard.num_examples, count + 1).round().astype(np.int64)
    local = np.empty(X.nnz, np.int32)
    ucols = np.empty(X.nnz, np.int64)
    uptr = np.zeros(count + 1, np.int64)
    _local_columns(indptr, X.indices.astype(np.int32, copy=False), starts, shard.keys.size,
                   local, ucols, uptr)
    data = X.data.astype(np.float32)
    return Minibatches(starts, indptr, local, data, shard.y.astype(np.float64),
                       shard.keys[ucols[:uptr[-1]]], uptr, bool(np.all(data == 1.0)))


@numba.njit(cache=True, nogil=True)
def _local_columns(indptr, indices, starts, ncols, local, ucols, uptr):
    """Per row range: its distinct columns sorted into ucols, each entry's rank among them into
    local (a column -> rank map, reset after each range, makes it one pass plus a small sort)."""
    rank = np.full(ncols, -1, np.int64)
    u = 0
    for b in range(starts.size - 1):
        first = u
        lo, hi = indptr[starts[b]], indptr[starts[b + 1]]
        for p in range(lo, hi):
            j = indices[p]
            if rank[j] < 0:
                rank[j] = 0
                ucols[u] = j
                u += 1
        ucols[first:u] = np.sort(ucols[first:u])
        for q in range(first, u):
            rank[ucols[q]] = q - first
        for p in range(lo, hi):
            local[p] = rank[indices[p]]
        for q in range(first, u):
            rank[ucols[q]] = -1
        uptr[b + 1] = u


@numba.njit(cache=True, nogil=True)
def batch_gradient(indptr, local, data, y, r0, r1, w, binary, grad):
    """grad[k] = sum over rows r0..r1 of dloss/dm_i * x_ik (local column k); returns the summed
    logloss of the rows under w (the progressive loss: w is the weights before this update)."""
    grad[:] = 0.0
    loss = 0.0
    for i in range(r0, r1):
        m = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            m += w[local[p]] if binary else data[p] * w[local[p]]
        z = y[i] * m
        loss += math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z)) - z
        r = -y[i] / (1.0 + math.exp(z))
        for p in range(indptr[i], indptr[i + 1]):
            grad[local[p]] += r if binary else r * data[p]
    return loss


def declare_ftrl_tables(kv, cfg: FTRLConfig) -> None:
    """The asynchronous weight table (ftrl rule) and the synchronous "_stats" table."""
    kv.declare_table(cfg.table, dim=1, updater="ftrl", sync=False,
                     updater_args={"alpha": cfg.alpha, "beta": cfg.beta, "l1": cfg.l1,
                                   "l2": cfg.l2})
    kv.declare_table(cfg.table + "_stats", dim=4, dtype="float64", updater="sum", sync=True)


def minibatch_count(total_examples: int, workers: int, batch: int) -> int:
    """Minibatches per worker and pass: about `batch` examples each, the same on every worker."""
    return max(1, math.ceil(total_examples / max(workers, 1) / batch))


class FTRL:
    """One worker's side of FTRL-proximal. Construct on every worker with the same config (it
    declares the tables and agrees the minibatch count: a synchronous round), then run()."""

    def __init__(self, kv, shard: Shard, cfg: FTRLConfig):
        cfg.check()
        t0 = time.perf_counter()
        self.kv, self.shard, self.cfg = kv, shard, cfg
        declare_ftrl_tables(kv, cfg)
        kv.barrier("ftrl_tables")  # a sync round waits for the workers that declared before it began
        stats, key = cfg.table + "_stats", np.array([SETUP_KEY], np.uint64)
        kv.push(key, np.array([[shard.num_examples, 1.0, 0, 0]]), table=stats)
        total, self.counted = kv.pull(key, table=stats)[0][:2]
        self.per_pass = minibatch_count(int(total), kv.num_workers, cfg.batch)
        self.batches = cut_minibatches(shard, self.per_pass)
        self.history: list[PassStats] = []
        self.timing: dict[str, float] = {}
        self.max_lag = 0
        self.filtered = 0          # no KKT pre-filter in this solver (summary compatibility)
        self.takeover = None
        self.setup_seconds = {"total": time.perf_counter() - t0, "counts": 0.0}

    def run(self, on_pass=None, on_local_pass=None) -> list[PassStats]:
        """Run cfg.epochs passes. on_local_pass(epoch) is called the moment this worker finishes
        a pass (to score a held-out set then; after the last pass, once every worker's pushes are
        applied); on_pass(PassStats) once the pass's progressive logloss summed over workers is
        known (a pass later, or at the end). Returns the history.
        Raises what KVWorker.push/pull raise (the table then holds the updates applied so far)."""
        kv, cfg, mb = self.kv, self.cfg, self.batches
        model = "sequential" if cfg.tau == 0 else f"bounded_delay:{cfg.tau}"
        # a KVWorker's executor talks to the scheduler; stand-ins in tests get a local one
        ex = kv.tasks(app=cfg.app, model=model) if hasattr(kv, "tasks") else Executor(kv, model)
        total = cfg.epochs * self.per_pass
        pulls: deque = deque()
        ahead = 0       # the next minibatch whose weights are to be pulled

        def prefetch(upto: int) -> None:
            nonlocal ahead
            while ahead < min(upto, total):
                pulls.append(kv.pull(mb.keys_of(ahead % self.per_pass), table=cfg.table,
                                     wait=False))
                ahead += 1

        def step(t: int) -> None:
            b = t % self.per_pass
            w = kv.wait(pulls.popleft())
            grad = np.empty(mb.uptr[b + 1] - mb.uptr[b], np.float32)
            self._loss += batch_gradient(mb.indptr, mb.local, mb.data, mb.y, mb.starts[b],
                                         mb.starts[b + 1], w, mb.binary, grad)
            ex.push(mb.keys_of(b), grad, cfg.table)
            self.max_lag = max(self.max_lag, ex.lag)
            prefetch(t + 2 + cfg.tau)   # sent after push t: it misses at most tau of ours

        ex.plan(total)
        prefetch(1 + cfg.tau)
        self._loss, t_pass, started, open_stats = 0.0, time.perf_counter(), time.perf_counter(), []
        for t, _ in ex.assigned():
            ex.run(t, step)
            if t % self.per_pass == self.per_pass - 1:
                epoch = t // self.per_pass
                if epoch == cfg.epochs - 1:
                    ex.drain()   # the last pass's sum then says every push is applied
                now = time.perf_counter()
                open_stats.append((epoch, self._push_stats(epoch), now - t_pass, now - started))
                self._loss, t_pass = 0.0, now
                if on_local_pass is not None and epoch < cfg.epochs - 1:
                    on_local_pass(epoch)
                while len(open_stats) > 1:
                    self._collect(*open_stats.pop(0), on_pass)
        ex.drain()
        for item in open_stats:
            self._collect(*item, on_pass)
        if on_local_pass is not None and cfg.epochs > 0:
            on_local_pass(cfg.epochs - 1)   # the final weights: every worker's pushes are in
        self.timing = ex.stats()
        ex.close()
        return self.history

    def _push_stats(self, epoch: int) -> int:
        key = np.array([epoch + 1], np.uint64)
        table = self.cfg.table + "_stats"
        self.kv.push(key, np.array([[self._loss, self.shard.num_examples, 0, 0]]), table=table)
        return self.kv.pull(key, table=table, wait=False)

    def _collect(self, epoch: int, ts: int, seconds: float, elapsed: float, on_pass) -> None:
        loss, n = self.kv.wait(ts)[0][:2]
        stats = PassStats(epoch, loss, loss, 0, int(n), seconds, 0.0,
                          {"elapsed_s": elapsed, "progressive_logloss": loss / max(n, 1)})
        self.history.append(stats)
        if on_pass is not None:
            on_pass(stats)


def warm_up() -> None:
    """Call the compiled kernels once on tiny inputs (loading or compiling numba's machine code
    before the first pull: a worker compiling mid-pass would push gradients of stale weights)."""
    one_row = np.array([0, 1], np.int64)
    _local_columns(one_row, np.zeros(1, np.int32), one_row, 1, np.empty(1, np.int32),
                   np.empty(1, np.int64), np.zeros(2, np.int64))
    batch_gradient(one_row, np.zeros(1, np.int32), np.ones(1, np.float32), np.ones(1), 0, 1,
                   np.zeros(1, np.float32), True, np.empty(1, np.float32))
