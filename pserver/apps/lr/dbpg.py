"""Delayed Block Proximal Gradient (DBPG) for L1/L2-regularised logistic regression.

Objective (labels y in {-1, +1}, margins m_i = x_i . w):

    F(w) = sum_i log(1 + exp(-y_i m_i)) + l1 * ||w||_1 + (l2 / 2) * ||w||^2

scikit-learn's LogisticRegression(penalty="l1", C=C, fit_intercept=False) minimises
||w||_1 + C * sum_i loss_i, i.e. F / l1 with C = 1 / l1; penalty="l2" minimises
0.5 * ||w||^2 + C * sum_i loss_i, i.e. F / l2 with C = 1 / l2.

The features are split into B blocks by key range; an iteration updates one block, a pass all B.
In iteration t (block b = t mod B) every worker, on its shard:
  1. computes the block's gradient g_k = sum_i (p_i - [y_i = 1]) x_ik and a diagonal curvature
     u_k = sum_i c_i n_ib x_ik^2, with n_ib the non-zeros of row i inside the block (Cauchy-Schwarz
     makes the separable quadratic an upper bound for a joint step of the block's coordinates)
     and c_i = p_i (1 - p_i) ("hessian") or 1/4 ("bound", a global bound: monotone descent);
  2. pushes [g, u] to the synchronous l1_prox table: the servers sum all workers' pushes and set
     w_k <- soft_threshold(u_k w_k - g_k, l1) / (u_k + l2), the exact minimiser of that bound;
  3. pulls the block's new weights and adds X_b (w_new - w_old) to its margins.
The margins are kept up to date incrementally, so the work per iteration is two sparse products
over the block's columns and O(n) vector work (compiled; no Python loop over examples or keys).

Consistency: iteration t may start once iteration t - tau - 1 has finished; tau = 0 (sequential)
is what is implemented (the loop keeps a queue of outstanding iterations for tau > 0 later).

Per-pass objective: each worker's loss plus its share of the regulariser, summed through a small
synchronous "sum" table. Shares are exact without a gather of w: at setup every worker pushes 1 per
key it holds, so it knows c_k, the number of workers holding key k, and adds |w_k| / c_k.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numba
import numpy as np

from ...errors import ConfigError
from .data import Shard

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
    table: str = "lr_w"        # tables used: table, table + "_stats", table + "_count"

    def check(self) -> None:
        """Raise ConfigError on an invalid setting."""
        if self.l1 < 0 or self.l2 < 0:
            raise ConfigError(f"l1 and l2 must be >= 0, got l1={self.l1} l2={self.l2}")
        if self.blocks < 1 or self.epochs < 0:
            raise ConfigError(f"need blocks >= 1 and epochs >= 0, got {self.blocks}, {self.epochs}")
        if self.tau != 0:
            raise ConfigError(f"tau={self.tau}: only sequential consistency (tau=0) is "
                              "implemented so far")
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
    wait_seconds: float        # of which blocked in kv.wait (idle)
    extra: dict = field(default_factory=dict)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


# -- compiled kernels over the CSC shard -------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _row_terms(y, m, hessian, rd):
    """rd[i] = [dloss/dm_i, c_i] = [p_i - [y_i = 1], p_i (1 - p_i) or 1]; p_i = sigmoid(m_i)."""
    for i in range(m.size):
        p = 1.0 / (1.0 + np.exp(-m[i]))
        rd[i, 0] = p - (1.0 if y[i] > 0 else 0.0)
        rd[i, 1] = p * (1.0 - p) if hessian else 1.0


@numba.njit(cache=True, nogil=True)
def _block_grad_curv(indptr, indices, data, scale, c0, c1, rd, out):
    """out[j - c0] = [sum x r, sum scale c] over column j of [c0, c1)."""
    for j in range(c0, c1):
        gs = 0.0
        us = 0.0
        for p in range(indptr[j], indptr[j + 1]):
            i = indices[p]
            gs += data[p] * rd[i, 0]
            us += scale[p] * rd[i, 1]
        out[j - c0, 0] = gs
        out[j - c0, 1] = us


@numba.njit(cache=True, nogil=True)
def _add_block_margins(indptr, indices, data, c0, delta, m):
    """m += X[:, c0:c0+len(delta)] @ delta (skipping unchanged coordinates)."""
    for jj in range(delta.size):
        dj = delta[jj]
        if dj != 0.0:
            j = c0 + jj
            for p in range(indptr[j], indptr[j + 1]):
                m[indices[p]] += data[p] * dj


@numba.njit(cache=True, nogil=True)
def _curvature_scale(indptr, indices, data, bounds, n_rows):
    """scale[p] = x_p^2 * (non-zeros of x_p's row inside x_p's block) for every entry p."""
    scale = np.empty(data.size, np.float32)
    count = np.zeros(n_rows, np.int64)
    for b in range(bounds.size - 1):
        lo, hi = indptr[bounds[b]], indptr[bounds[b + 1]]
        for p in range(lo, hi):
            count[indices[p]] += 1
        for p in range(lo, hi):
            scale[p] = data[p] * data[p] * count[indices[p]]
        for p in range(lo, hi):
            count[indices[p]] = 0
    return scale


def block_bounds(blocks: int, key_bound: int = KEY_SPACE) -> list[int]:
    """Key-range boundaries b_0 = 0 < ... < b_B = key_bound of B equal key ranges."""
    return [key_bound * b // blocks for b in range(blocks + 1)]


class DBPG:
    """One worker's side of DBPG. Construct on every worker with the same config, then run()."""

    def __init__(self, kv, shard: Shard, cfg: DBPGConfig):
        cfg.check()
        self.kv, self.shard, self.cfg = kv, shard, cfg
        X = shard.X
        # Compact types: the block kernels are bound by memory traffic, not arithmetic.
        self.indptr, self.indices = X.indptr.astype(np.int64), X.indices.astype(np.int32)
        self.data = X.data.astype(np.float32)
        self.y = shard.y.astype(np.float64)
        self.m = np.zeros(shard.num_examples)
        self.w = np.zeros(shard.keys.size)              # this worker's view of w[keys]
        self.rd = np.empty((shard.num_examples, 2))   # per row: dloss/dm, curvature weight
        self.history: list[PassStats] = []
        kv.declare_table(cfg.table, dim=1, updater="l1_prox", sync=True,
                         updater_args={"l1": cfg.l1, "l2": cfg.l2, "eta": cfg.eta})
        kv.declare_table(cfg.table + "_stats", dim=4, dtype="float64", updater="sum", sync=True)
        kv.declare_table(cfg.table + "_count", dim=1, updater="sum", sync=True)
        self._setup()

    # -- setup ------------------------------------------------------------------------------
    def _setup(self) -> None:
        kv, keys, cfg = self.kv, self.shard.keys, self.cfg
        # 1. How many workers hold each key (for the exact regulariser shares), and the global
        #    key bit-length (so raw, small keys are still split into B non-empty blocks).
        bits = int(keys[-1]).bit_length() if keys.size else 0
        kv.push(keys, np.ones(keys.size, np.float32), table=cfg.table + "_count")
        # stats keys 2**64 - 1 - bits (bits = 0..64) carry a one-hot of each worker's bit-length
        flag = np.array([[1.0, 0, 0, 0]])
        kv.push(np.array([KEY_SPACE - 1 - bits], np.uint64), flag, table=cfg.table + "_stats")
        self.holders = kv.pull(keys, table=cfg.table + "_count").astype(np.float64)
        bkeys, bvals = kv.pull_range(KEY_SPACE - 65, KEY_SPACE, table=cfg.table + "_stats")
        bits = max([KEY_SPACE - 1 - int(k) for k in bkeys[np.atleast_2d(bvals)[:, 0] > 0]] + [1])
        self.key_bound = 1 << bits
        bounds = block_bounds(cfg.blocks, self.key_bound)
        self.cols = [self.shard.columns_in(bounds[b], bounds[b + 1] if b < cfg.blocks - 1
                                           else None) for b in range(cfg.blocks)]
        col_bounds = np.array([c0 for c0, _ in self.cols] + [keys.size], np.int64)
        self.scale = _curvature_scale(self.indptr, self.indices, self.data, col_bounds,
                                      self.shard.num_examples)
        if cfg.curvature == "bound":
            self.scale *= 0.25
        # 2. Warm start from whatever the table holds (zeros for a new table).
        self.w = kv.pull(keys, table=cfg.table).astype(np.float64)
        if np.any(self.w):
            self.m = np.asarray(self.shard.X @ self.w).ravel()

    # -- one iteration = one block ----------------------------------------------------------
    def _compute(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        c0, c1 = self.cols[block]
        gu = np.empty((c1 - c0, 2), np.float32)
        # with the "bound" curvature, scale already holds n_ib * x^2 / 4 and c_i = 1
        _row_terms(self.y, self.m, self.cfg.curvature == "hessian", self.rd)
        _block_grad_curv(self.indptr, self.indices, self.data, self.scale, c0, c1, self.rd, gu)
        return self.shard.keys[c0:c1], gu

    def _apply(self, block: int, w_new: np.ndarray) -> None:
        c0, c1 = self.cols[block]
        delta = w_new.astype(np.float64) - self.w[c0:c1]
        self.w[c0:c1] += delta
        _add_block_margins(self.indptr, self.indices, self.data, c0, delta, self.m)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, on_pass=None) -> list[PassStats]:
        """Run cfg.epochs passes (fewer when cfg.tol is met). on_pass(PassStats) is called after
        every pass on every worker. Returns the history."""
        kv, cfg = self.kv, self.cfg
        prev = self._objective(-1, 0.0, 0.0) if not self.history else self.history[-1]
        for epoch in range(len(self.history), len(self.history) + cfg.epochs):
            t0 = time.perf_counter()
            waited = 0.0
            pending: deque = deque()   # outstanding iterations: (t, block, push ts, pull ts)
            for t in range(cfg.blocks):
                # Bounded delay: iteration t starts once iteration t - tau - 1 has finished.
                while pending and pending[0][0] <= t - cfg.tau - 1:
                    _, blk, push_ts, pull_ts = pending.popleft()
                    tw = time.perf_counter()
                    w_new = kv.wait(pull_ts)
                    kv.wait(push_ts)
                    waited += time.perf_counter() - tw
                    self._apply(blk, w_new)
                keys, gu = self._compute(t)
                push_ts = kv.push(keys, gu, table=cfg.table)
                # Per-sender FIFO: this pull is answered once the round of that push is applied.
                pull_ts = kv.pull(keys, table=cfg.table, wait=False)
                pending.append((t, t, push_ts, pull_ts))
            while pending:
                _, blk, push_ts, pull_ts = pending.popleft()
                tw = time.perf_counter()
                w_new = kv.wait(pull_ts)
                kv.wait(push_ts)
                waited += time.perf_counter() - tw
                self._apply(blk, w_new)
            stats = self._objective(epoch, time.perf_counter() - t0, waited)
            self.history.append(stats)
            if on_pass is not None:
                on_pass(stats)
            if cfg.tol > 0 and prev.objective - stats.objective < cfg.tol * abs(stats.objective):
                break
            prev = stats
        return self.history

    def _objective(self, epoch: int, seconds: float, waited: float) -> PassStats:
        """Global F(w) after a pass, summed through the stats table (key = epoch)."""
        ell = float(np.logaddexp(0.0, -self.y * self.m).sum())
        share = 1.0 / np.maximum(self.holders, 1.0)
        reg = float(np.dot(share, self.cfg.l1 * np.abs(self.w) + 0.5 * self.cfg.l2 * self.w ** 2))
        nnz = float(np.dot(share, self.w != 0))
        row = np.array([[ell, reg, nnz, self.shard.num_examples]])
        kv, table = self.kv, self.cfg.table + "_stats"
        tw = time.perf_counter()
        kv.push(np.array([epoch + 1], np.uint64), row, table=table)
        loss, reg_sum, nnz_sum, n = kv.pull(np.array([epoch + 1], np.uint64), table=table)[0]
        waited += time.perf_counter() - tw
        return PassStats(epoch, loss + reg_sum, loss, int(round(nnz_sum)), int(n), seconds, waited)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """This worker's (keys, weights) view after the last pass."""
        return self.shard.keys, self.w.copy()
