"""Delayed Block Proximal Gradient (DBPG) for L1/L2-regularised logistic regression.

Minimises F(w) = sum_i log(1 + exp(-y_i x_i . w)) + l1 ||w||_1 + (l2 / 2) ||w||^2 (scikit-learn's
C = 1 / l1 or 1 / l2 with fit_intercept=False). Features are split into blocks by key range; in
iteration t every worker pushes block t mod B's gradient and a diagonal curvature bound to the
synchronous l1_prox table, whose servers take the exact proximal step, then pulls the new weights
and updates its margins incrementally. Iterations are tasks of the application "lr" under bounded
delay tau (changeable while running); a stale gradient's curvature is damped by its lag. The
derivation, the objective's exact per-pass sum and the delay damping: docs/lr.md, "The algorithm"."""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ...consistency.executor import Executor
from ...errors import ConfigError
from ...kv.filtering import lossless_part
from . import kernels
from .data import Shard
from .kernels import (
    add_block_margins,
    all_ones,
    block_grad_curv,
    block_grad_curv_lazy,
    curvature_scale,
    key_counts,
    refresh_qs,
    row_terms,
)
from .takeover import merge_shards

log = logging.getLogger(__name__)

CURVATURES = ("hessian", "bound")
KEY_SPACE = 1 << 64


@dataclass
class DBPGConfig:
    """Hyper-parameters. l1, l2 >= 0; blocks >= 1; eta scales the step (u' = u / eta)."""

    l1: float = 1.0
    l2: float = 0.0
    epochs: int = 10
    blocks: int = 4
    tau: int = 0
    curvature: str = "hessian"
    eta: float = 1.0
    tol: float = 0.0           # stop when a pass lowers F by less than tol * F (0 = never)
    warm_start: bool = False   # start from the table's weights (else the table must be new)
    table: str = "lr_w"        # tables used: table, table + "_stats", table + "_count"
    kkt: bool = False          # KKT filter on the pushes (pserver.filters.KKTFilter), with...
    kkt_delta: float = 0.0     # ...its safety margin delta
    filters: str = ""          # more push filters of the weight table, e.g. "key_cache,compress"
    pull_filters: str = ""     # pull filters of the weight table, e.g. "key_cache,compress"
    target: float = 0.0        # stop after the first pass with F <= target (0 = never)
    delay_damping: float = 0.2  # curvature *= 1 + delay_damping * max(0, lag - delay_free), lag:
    delay_free: int = 0        # earlier iterations not yet applied when a gradient is computed
    slowdown: float = 1.0      # straggler simulation: computing takes slowdown x as long ...
    slowdown_share: float = 0.0  # ... on this random share of the iterations
    app: str = "lr"            # the application's name at the scheduler (tasks, consistency)
    push_pull: bool = True     # an iteration's push and pull as one request (when no filter or
    #                            clock log needs them apart); False: two requests

    def push_filters(self, num_workers: int) -> str:
        """The weight table's push filter spec. A worker holds 1/num_workers of the data, so the
        KKT filter tests its estimate num_workers * g_k of the full gradient: it skips k when
        w_k = 0 and |g_k| <= (l1 - delta) / num_workers."""
        kkt = f"kkt:{self.l1 / num_workers!r}:{self.kkt_delta / num_workers!r}" if self.kkt else ""
        return ",".join(f for f in (kkt, self.filters) if f)

    def check(self) -> None:
        """Raise ConfigError on an invalid setting."""
        if self.l1 < 0 or self.l2 < 0:
            raise ConfigError(f"l1 and l2 must be >= 0, got l1={self.l1} l2={self.l2}")
        if self.blocks < 1 or self.epochs < 0:
            raise ConfigError(f"need blocks >= 1 and epochs >= 0, got {self.blocks}, {self.epochs}")
        if self.tau < 0 or self.delay_damping < 0 or self.delay_free < 0:
            raise ConfigError(f"tau, delay_damping and delay_free must be >= 0, got {self.tau}, "
                              f"{self.delay_damping}, {self.delay_free}")
        if self.slowdown < 1 or not 0 <= self.slowdown_share <= 1:
            raise ConfigError(f"a straggler needs slowdown >= 1 and 0 <= share <= 1, got "
                              f"{self.slowdown}, {self.slowdown_share}")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if not self.eta > 0:
            raise ConfigError(f"eta must be > 0, got {self.eta}")


@dataclass
class PassStats:
    """One pass: global objective and its parts, this worker's timing."""

    epoch: int
    objective: float
    loss: float
    nnz: int
    examples: int              # global
    seconds: float             # wall time of the pass on this worker
    wait_seconds: float        # of which idle: waiting on earlier iterations or replies
    extra: dict = field(default_factory=dict)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


def mass_cap(threshold: float) -> float:
    """A cap C > threshold >= 0 for column masses: the next integer (so binary features keep
    integer masses, which the compress filter sends as bytes), or inf for a huge threshold.
    Capping non-negative masses at any C > threshold keeps "sum > threshold" exact: a capped
    term alone already exceeds it, and without capped terms the sum is unchanged."""
    return float(np.floor(threshold) + 1.0) if threshold < float(1 << 24) else np.inf


def block_bounds(blocks: int, key_bound: int = KEY_SPACE) -> list[int]:
    """Key-range boundaries b_0 = 0 < ... < b_B = key_bound of B equal key ranges."""
    return [key_bound * b // blocks for b in range(blocks + 1)]


def weight_table_args(cfg: DBPGConfig, num_workers: int) -> dict:
    """declare_table keywords of the weight table cfg.table for a job of num_workers workers (a
    reader such as `pserver serve lr` declares the same spec)."""
    # filters only when set: stand-ins for the KV API (tests) need not know them
    filters = {k: v for k, v in (("push_filters", cfg.push_filters(num_workers)),
                                 ("pull_filters", cfg.pull_filters)) if v}
    return dict(dim=1, updater="l1_prox", sync=True,
                updater_args={"l1": cfg.l1, "l2": cfg.l2, "eta": cfg.eta}, **filters)


def declare_tables(kv, cfg: DBPGConfig) -> None:
    """Declare the job's tables: cfg.table and its "_stats" and "_count" companions."""
    args = weight_table_args(cfg, kv.num_workers)
    filters = {k: args[k] for k in ("push_filters", "pull_filters") if k in args}
    kv.declare_table(cfg.table, **args)
    kv.declare_table(cfg.table + "_stats", dim=4, dtype="float64", updater="sum", sync=True)
    exact = {k: lossless_part(v) for k, v in filters.items() if lossless_part(v)}
    kv.declare_table(cfg.table + "_count", dim=2, updater="sum", sync=True, **exact)


def warm_up_servers(kv, cfg: DBPGConfig) -> None:
    """Declare the tables and run the servers' store kernels once, so that they load their
    compiled code while the workers still read their data (else the setup's key-count exchange
    waits for it). Adds a zero row to the "_count" table under key 2**64 - 1 (adding zeros
    changes nothing, whatever that key holds). The table is synchronous: every worker must call
    this, before DBPG(), or none. Blocks until every worker has called it (run it in a thread)."""
    declare_tables(kv, cfg)
    kv.barrier("lr_tables")  # a sync round waits for the workers that declared it before it began
    key, table = np.array([KEY_SPACE - 1], np.uint64), cfg.table + "_count"
    kv.push(key, np.zeros((1, 2), np.float32), table=table)
    kv.pull(key, table=table)


class DBPG:
    """One worker's side of DBPG. Construct on every worker with the same config, then run()."""

    def __init__(self, kv, shard: Shard, cfg: DBPGConfig, init: np.ndarray | None = None):
        """init: start from these weights (float64, per shard key; every worker passes the same
        weight for a shared key) instead of zeros - a warm start into a new table (path.py).
        Raises ConfigError for a bad config; what KVWorker push/pull raise during the set-up."""
        cfg.check()
        self.kv, self.shard, self.cfg = kv, shard, cfg
        self._init = init
        self._declare_tables()
        t0 = time.perf_counter()
        self._push_counts()   # first: the servers aggregate while this worker prepares
        self._t_pushed = time.perf_counter()
        self._load(shard, np.zeros(shard.keys.size), np.ones(shard.keys.size))
        self.takeover = None   # a ShardTakeover: adopt dead workers' shards (takeover.py)
        self.history: list[PassStats] = []
        self.clock_log: dict | None = None  # set to {} to record the clocks of every read
        self.timing: dict[str, float] = {}  # computing / waiting seconds of the last run()
        self.max_lag = 0                    # most unapplied earlier iterations any gradient saw
        self._setup(t0)

    # -- setup ------------------------------------------------------------------------------
    def _declare_tables(self) -> None:
        declare_tables(self.kv, self.cfg)
        self.full_pass = False     # KKT: this pass pushes every coordinate (active set reset)
        if self.cfg.kkt:   # self.shard, not its keys now: adopt() replaces the shard
            self.kv.filters.set_weights(self.cfg.table,
                                        lambda k: self.w[np.searchsorted(self.shard.keys, k)])

    def _load(self, shard: Shard, w: np.ndarray, mult: np.ndarray) -> None:
        """Hold `shard` with weights w (float64, per key; the margins follow from them) and mult
        (how many of the workers' shards merged into this one hold each key)."""
        self.shard, X = shard, shard.X
        # Compact types: the block kernels are bound by memory traffic, not arithmetic.
        self.indptr = X.indptr.astype(np.int64, copy=False)
        self.indices = X.indices.astype(np.int32, copy=False)
        self.data = X.data.astype(np.float32, copy=False)   # read-only here: no copy
        self.binary = all_ones(self.data)   # then the kernels skip reading x
        self.y = shard.y.astype(np.float64)
        self.w, self.mult = w, mult                      # this worker's view of w[keys]
        self.m = np.asarray(X @ w).ravel() if w.any() else np.zeros(shard.num_examples)
        self.qs = np.empty(shard.num_examples, np.float32)   # y * exp(-m), see kernels.py
        refresh_qs(self.m, self.y, self.qs)
        self.rd = np.empty((shard.num_examples, 2))   # per row: dloss/dm, curvature weight

    def _push_counts(self) -> None:
        """Push what the setup needs from every worker (see _setup, steps 1 and 2)."""
        kv, keys, cfg, X = self.kv, self.shard.keys, self.cfg, self.shard.X
        # 1. Per key, summed over workers: how many workers hold it (for exact regulariser
        #    shares) and its column mass a_k = sum_i |x_ik|. Since |dloss/dm| < 1, |g_k| < a_k:
        #    where a_k <= l1 a zero weight stays zero for ever (the KKT condition), so such
        #    keys are never pushed - the paper's KKT filter, exact here and agreed by all.
        #    Only whether the sum exceeds the threshold matters, so each worker sends
        #    min(a_k, cap), cap > threshold (see mass_cap): few distinct small values, which
        #    compress far better than raw masses.
        self.threshold = cfg.l1 * (1 + 1e-6)
        counts = np.empty((keys.size, 2), np.float32)
        key_counts(X.indptr, X.data, mass_cap(self.threshold), counts)
        kv.push(keys, counts, table=cfg.table + "_count")
        # 2. The global key bit-length (so raw, small keys still split into B non-empty
        #    blocks): stats keys 2**64 - 1 - bits carry a one-hot of each worker's bit-length.
        bits = int(keys[-1]).bit_length() if keys.size else 0
        flag = np.array([[1.0, 0, 0, 0]])
        kv.push(np.array([KEY_SPACE - 1 - bits], np.uint64), flag, table=cfg.table + "_stats")
        # asked for now, ahead of the count pull: a server answers in order, and behind the other
        # workers' big count pulls this small read would wait for them (~0.5 s with 2 x 2 M keys)
        self._bits_ts = kv.pull_range(KEY_SPACE - 65, KEY_SPACE, table=cfg.table + "_stats",
                                      wait=False)

    def _setup(self, t0: float) -> None:
        """Collect what _push_counts sent, then build the blocks (t0: when the push began)."""
        kv, keys, cfg = self.kv, self.shard.keys, self.cfg
        kernels.warm_up()   # load the compiled kernels while the servers aggregate the counts
        counts = kv.pull(keys, table=cfg.table + "_count").reshape(-1, 2)
        t_counts = time.perf_counter()
        bkeys, bvals = kv.wait(self._bits_ts)
        flags = np.atleast_2d(bvals)[:, 0]
        bits = max([KEY_SPACE - 1 - int(k) for k in bkeys[flags > 0]] + [1])
        self.key_bound = 1 << bits
        self.counted = round(float(flags.sum()))  # workers whose counts reached the servers
        t_bits = time.perf_counter()
        # 3. Warm start from whatever the table holds (a new table holds zeros: no pull), or
        #    from init, written into the new table first.
        if self._init is not None:
            self._seed(counts[:, 0].astype(np.float64))
        if cfg.warm_start or self._init is not None:
            self._load(self.shard, kv.pull(keys, table=cfg.table).astype(np.float64), self.mult)
        t_blocks = time.perf_counter()
        self._blocks(counts)
        t_end = time.perf_counter()
        self.setup_seconds = {"counts": t_counts - t0, "total": t_end - t0,
                              "push": self._t_pushed - t0, "bits": t_bits - t_counts,
                              "blocks": t_end - t_blocks}

    def _seed(self, holders: np.ndarray) -> None:
        """Make the new table hold self._init through one round of the l1_prox rule itself: each
        holder of key k pushes its share of g = -sign(w)(|w|(1 + l2) + l1) and of u = eta, so the
        summed step from 0 lands on w (to float32 rounding; the caller pulls the exact result)."""
        cfg, w = self.cfg, self._init
        share = self.mult / np.maximum(holders, self.mult)
        nz = np.flatnonzero(w)
        g = -np.sign(w[nz]) * (np.abs(w[nz]) * (1.0 + cfg.l2) + cfg.l1) * share[nz]
        row = np.column_stack([g, cfg.eta * share[nz]]).astype(np.float32)
        self.kv.push(self.shard.keys[nz], row, table=cfg.table)

    def _blocks(self, counts: np.ndarray) -> None:
        """Regulariser shares, the KKT verdicts and the blocks' active columns of the shard, from
        the servers' per-key [holders, capped mass] sums (float32, as the table holds them)."""
        cfg, keys = self.cfg, self.shard.keys
        self.holders = counts[:, 0].astype(np.float64)
        # |w_k| * mult_k / c_k: this worker's share of key k's penalty (mult = c = 1 alone)
        self.share = self.mult / np.maximum(self.holders, self.mult)
        active = (counts[:, 1] > self.threshold) | (self.w != 0)
        self.filtered = int(keys.size - np.count_nonzero(active))
        # 4. Blocks: key ranges -> the active columns of each.
        bounds = block_bounds(cfg.blocks, self.key_bound)
        ranges = [self.shard.columns_in(bounds[b], bounds[b + 1] if b < cfg.blocks - 1
                                        else None) for b in range(cfg.blocks)]
        self.cols = [c0 + np.flatnonzero(active[c0:c1]) for c0, c1 in ranges]
        col_bounds = np.array([c0 for c0, _ in ranges] + [keys.size], np.int64)
        self.scale = curvature_scale(self.indptr, self.indices, self.data, col_bounds,
                                      active, self.shard.num_examples)
        if cfg.curvature == "bound":
            self.scale *= 0.25
        self.entries = [int(np.sum(self.indptr[c + 1] - self.indptr[c])) for c in self.cols]

    def adopt(self, extra: Shard) -> None:
        """Train on `extra` (a dead worker's shard, see takeover.py) too, from the next iteration
        on. Call between iterations with no reply outstanding: the servers' weights are then
        those after the last round this worker applied (the next round needs its push), so the
        merged shard starts from exactly the state its own keys are in. The holder counts and
        masses of its keys are in the count table already (its worker pushed them at set-up)."""
        kv, cfg = self.kv, self.cfg
        merged, mult = merge_shards(self.shard, extra, self.mult)
        counts = kv.pull(merged.keys, table=cfg.table + "_count")
        w = kv.pull(merged.keys, table=cfg.table).astype(np.float64)
        self._load(merged, w, mult)
        self._blocks(counts.reshape(-1, 2))

    # -- one iteration = one block ----------------------------------------------------------
    def _compute(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        cols = self.cols[block]
        gu = np.empty((cols.size, 2), np.float32)
        # with the "bound" curvature, scale already holds n_ib * x^2 / 4 and c_i = 1
        hessian = self.cfg.curvature == "hessian"
        if self.entries[block] < self.m.size:   # the block touches few rows: terms per entry
            block_grad_curv_lazy(self.indptr, self.indices, self.data, self.scale, cols,
                                  self.qs, hessian, self.binary, gu)
        else:
            row_terms(self.qs, hessian, self.rd)
            block_grad_curv(self.indptr, self.indices, self.data, self.scale, cols, self.rd,
                             gu)
        return self.shard.keys[cols], gu

    def _apply(self, block: int, w_new: np.ndarray) -> None:
        cols = self.cols[block]
        delta = w_new.astype(np.float64) - self.w[cols]
        self.w[cols] += delta
        add_block_margins(self.indptr, self.indices, self.data, cols, delta, self.binary,
                           self.m, self.qs)
        if block == self.cfg.blocks - 1:   # once a pass: qs exactly from m again (no drift)
            refresh_qs(self.m, self.y, self.qs)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, on_pass=None, on_local_pass=None) -> list[PassStats]:
        """Run cfg.epochs passes (fewer when cfg.tol or cfg.target is met) under the consistency
        model (bounded delay cfg.tau). on_pass(PassStats) is called after every pass on every
        worker, once the pass's global objective is known, then on_local_pass(epoch) (the same
        hook as FTRL's: here the servers' weights are then those after the pass, under tau = 0).
        Returns the history.

        Under bounded delay a pass's objective is known only tau iterations later, so the stop
        rule looks at pass e when the first iteration of pass e + 2 is due (e + 1 when tau = 0):
        the same iteration on every worker, as synchronous rounds need.
        """
        kv, cfg, B = self.kv, self.cfg, self.cfg.blocks
        model = "sequential" if cfg.tau == 0 else f"bounded_delay:{cfg.tau}"
        self._real = hasattr(kv, "tasks")   # a KVWorker (stand-ins in tests lack the extras)
        # push and pull of an iteration in one request (push_pull) when nothing needs them apart:
        # the clock log reads the pull's vector clock, filters split push_pull anyway
        self._push_pull = (cfg.push_pull and self._real and self.clock_log is None and not cfg.push_filters(
            kv.num_workers) and not cfg.pull_filters)
        ex = kv.tasks(app=cfg.app, model=model) if self._real else Executor(kv, model)
        self._ex = ex
        prev = self._objective(-1, 0.0, 0.0) if not self.history else self.history[-1]
        self._base, self._stats = len(self.history), deque()
        self._bounds = block_bounds(B, self.key_bound)
        self._rng = random.Random(7919 + kv.rank)
        self._t0 = time.perf_counter()
        self._mark = (self._t0, ex.timer.snapshot(), 0)
        self._applied_t = self._pass_lag = -1
        self._rest_s = self._apply_s = 0.0   # CPU seconds of the last push/pull dispatch, apply
        lead = 1 if cfg.tau == 0 else 2
        ex.plan(cfg.epochs * B)
        last = -1
        for t, _ in ex.assigned():
            if t % B == 0 and t >= lead * B:
                stats = self._collect(t // B - lead, on_pass, on_local_pass)
                # a pass that lost (or regained) a dead worker's shard is no measure of progress
                whole = stats.examples == prev.examples
                reached = whole and cfg.target > 0 and stats.objective <= cfg.target
                if reached or self._converged(whole and cfg.tol > 0 and prev.objective
                                              - stats.objective < cfg.tol * abs(stats.objective)):
                    ex.stop()
                    break
                prev = stats
            if self.takeover is not None:
                for _, extra in self.takeover.check(t, ex.tau):
                    ex.wait(t - 1)   # nothing in flight: w is the servers' after round t - 1
                    self.adopt(extra)
            ex.run(t, self._iteration)
            last = t
        ex.drain()
        for k in range(len(self.history) - self._base, (last + 1) // B):
            self._collect(k, on_pass, on_local_pass)
        self.timing = ex.stats()
        ex.close()
        return self.history

    def _iteration(self, t: int) -> None:
        """Iteration t: the gradient of block t mod B, pushed; the new weights pulled (applied
        when collected, in order)."""
        cfg, ex, b = self.cfg, self._ex, t % self.cfg.blocks
        t0 = time.thread_time()
        keys, gu = self._compute(b)
        lag = ex.lag
        if self.clock_log is not None:  # what this gradient reads: pulls applied up to _applied_t
            self.clock_log.setdefault("starts", []).append([t, self._applied_t, lag])
        self.max_lag = max(self.max_lag, lag)
        self._pass_lag = max(self._pass_lag, lag)
        if lag > cfg.delay_free and cfg.delay_damping:
            gu[:, 1] *= 1.0 + cfg.delay_damping * (lag - cfg.delay_free)
        if cfg.slowdown_share and self._rng.random() < cfg.slowdown_share:
            # a machine FACTOR x slower needs FACTOR x the CPU time for all of the iteration's
            # work: the gradient (measured) and sending the push and pull and applying the reply
            # (this iteration's are still to come: the last iteration's stand in). CPU time,
            # not wall time: the work's, without the waits for a core on a busy machine.
            time.sleep((cfg.slowdown - 1.0) * (time.thread_time() - t0 + self._rest_s))
        t1 = time.thread_time()
        extra = {"span": (self._bounds[b], self._bounds[b + 1])} if self._real else {}
        then = partial(self._applied, t, b)
        if self._push_pull:
            ts = ex.push_pull(keys, gu, cfg.table, then=then, **extra)
        else:
            ts = ex.push(keys, gu, cfg.table, **extra)
            clock = {"clock": True} if self.clock_log is not None else {}
            ex.pull(keys, cfg.table, then=then, **clock)
        self._rest_s = time.thread_time() - t1 + self._apply_s
        if self.clock_log is not None:
            self.clock_log.setdefault("push_ts", {})[t] = ts

    def _applied(self, t: int, b: int, result) -> None:
        w_new, vc = result if isinstance(result, tuple) else (result, None)
        t0 = time.thread_time()
        self._apply(b, w_new)
        self._apply_s = time.thread_time() - t0   # the straggler's estimate (_iteration)
        self._applied_t = t
        if vc is not None:
            self.clock_log.setdefault("pulls", []).append([t, {str(n): v for n, v in vc.items()}])
        if b == self.cfg.blocks - 1:
            self._pass_done(t // self.cfg.blocks)

    def _pass_done(self, k: int) -> None:
        """The last block of pass k is applied: w and the margins are the servers' after that
        pass, so this worker's share of F is pushed now and its sum collected later."""
        ell = float(np.logaddexp(0.0, -self.y * self.m).sum())
        share = self.share
        reg = float(np.dot(share, self.cfg.l1 * np.abs(self.w) + 0.5 * self.cfg.l2 * self.w ** 2))
        nnz = float(np.dot(share, self.w != 0))
        key = np.array([self._base + k + 1], np.uint64)
        table = self.cfg.table + "_stats"
        self.kv.push(key, np.array([[ell, reg, nnz, self.shard.num_examples]]), table=table)
        ts = self.kv.pull(key, table=table, wait=False)
        self._stats.append((k, ts, time.perf_counter(), self._ex.timer.snapshot(), self._pass_lag))
        self._pass_lag = -1

    def _collect(self, k: int, on_pass, on_local_pass=None) -> PassStats:
        """PassStats of pass k of this run (and of the passes before it), waiting for them."""
        B = self.cfg.blocks
        while len(self.history) - self._base <= k:
            self._ex.wait((len(self.history) - self._base + 1) * B - 1)
            kk, ts, now, snap, lag = self._stats.popleft()
            loss, reg, nnz, n = self.kv.wait(ts)[0]
            t_prev, s_prev, _ = self._mark
            self._mark = (now, snap, lag)
            spent = {c: snap[c] - s_prev[c] for c in ("computing_s", "waiting_deps_s",
                                                      "waiting_net_s")}
            extra = {"kkt_filtered_keys": self.filtered, "elapsed_s": now - self._t0,
                     "max_lag": lag, **spent}
            stats = PassStats(self._base + kk, loss + reg, loss, round(nnz), int(n), now - t_prev,
                              spent["waiting_deps_s"] + spent["waiting_net_s"], extra)
            self.history.append(stats)
            if on_pass is not None:
                on_pass(stats)
            if on_local_pass is not None:
                on_local_pass(stats.epoch)
        return self.history[self._base + k]

    def _converged(self, converged: bool) -> bool:
        """Whether to stop after a pass that ``converged``. With the KKT filter, convergence on
        the active set is not the end (the paper's active-set reset): the next pass pushes every
        coordinate, so the servers re-check the KKT conditions of those the filter skipped, and
        the run stops only when such a full pass converges too. Once reset, the passes stay
        full: a full pass that still moves the objective shows the filter skipped coordinates
        that matter (a gradient split across workers), so filtering again would only repeat
        the reset later."""
        if not self.cfg.kkt:
            return converged
        if self.full_pass:
            return converged
        if converged:
            self.full_pass = True
            self.kv.filters.select_all(self.cfg.table, True)
        return False

    def _objective(self, epoch: int, seconds: float, waited: float) -> PassStats:
        """Global F(w) after a pass, summed through the stats table (key = epoch)."""
        ell = float(np.logaddexp(0.0, -self.y * self.m).sum())
        share = self.share
        reg = float(np.dot(share, self.cfg.l1 * np.abs(self.w) + 0.5 * self.cfg.l2 * self.w ** 2))
        nnz = float(np.dot(share, self.w != 0))
        row = np.array([[ell, reg, nnz, self.shard.num_examples]])
        kv, table = self.kv, self.cfg.table + "_stats"
        tw = time.perf_counter()
        kv.push(np.array([epoch + 1], np.uint64), row, table=table)
        loss, reg_sum, nnz_sum, n = kv.pull(np.array([epoch + 1], np.uint64), table=table)[0]
        waited += time.perf_counter() - tw
        return PassStats(epoch, loss + reg_sum, loss, round(nnz_sum), int(n), seconds, waited,
                         {"kkt_filtered_keys": self.filtered})

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """This worker's (keys, weights) view after the last pass."""
        return self.shard.keys, self.w.copy()
