"""Choosing L1 without guessing: a regularisation path (`--l1 auto` or `--l1 a,b,c`).

Every worker holds out the last rows of its shard as a validation split. DBPG runs for each L1
value from the largest down, each in a table of its own, warm-started from the previous value's
weights; after each value the workers sum the validation logloss through the servers, so all pick
the same value: the lowest validation logloss. "auto" starts at l1_max (the smallest L1 whose
solution is w = 0: max_k |gradient_k at 0|) / 2 and halves until the validation logloss got worse
twice in a row. Why and how it compares with a brute-force grid: docs/lr.md, "Choosing L1".
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...errors import ConfigError
from .data import Shard
from .dbpg import DBPG, KEY_SPACE, DBPGConfig, declare_tables

AUTO_POINTS = 16      # "auto": at most this many values, l1_max / 2 ** k for k = 1 ...
AUTO_PATIENCE = 2     # "auto": stop after this many values worse than the best so far
VALID_KEY = KEY_SPACE - 200    # stats-table keys of the path's sums (passes use 1, 2, ...)


def parse_l1(text: str) -> list[float] | None:
    """The --l1 option: one value -> [v]; "a,b,c" -> the values, largest first; "auto" -> None.
    Raises ConfigError for anything else or a negative value."""
    text = str(text).strip()
    if text == "auto":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--l1 {text!r}: give a number, a comma-separated list such as "
                          "10,3,1 (a regularisation path) or auto") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"--l1 {text!r}: values must be finite and >= 0")
    return sorted(set(values), reverse=True)


def l1_values(text: str, solver: str) -> list[float] | None:
    """parse_l1 for `solver`: only DBPG runs a path. Raises ConfigError (what to give instead)."""
    values = parse_l1(text)
    if solver != "dbpg" and (values is None or len(values) > 1):
        raise ConfigError(f"--l1 {text}: a regularisation path needs --solver dbpg; give "
                          f"{solver} one value")
    return values


def split_validation(shard: Shard, fraction: float) -> tuple[Shard, Shard]:
    """(training rows, validation rows): the last `fraction` of the shard's rows are held out,
    over the same columns (keys). Raises ConfigError unless 0 < fraction < 1."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--validation must be between 0 and 1, got {fraction}")
    n = shard.num_examples
    cut = n - round(n * fraction)
    X = shard.X.tocsr()
    parts = []
    for rows in (slice(0, cut), slice(cut, n)):
        Xp = X[rows].tocsc()
        used = np.flatnonzero(np.diff(Xp.indptr))       # drop columns the part never uses
        parts.append(Shard(X=Xp[:, used], y=shard.y[rows], keys=shard.keys[used]))
    return parts[0], parts[1]


def pick(losses: list[float]) -> int:
    """Index of the value to keep: the lowest validation logloss (the first on a tie, i.e. the
    larger L1: the sparser model)."""
    return int(np.argmin(losses))


def auto_done(losses: list[float]) -> bool:
    """Whether an "auto" path has seen enough: AUTO_PATIENCE values in a row worse than the best."""
    best = pick(losses)
    return len(losses) - 1 - best >= AUTO_PATIENCE or len(losses) >= AUTO_POINTS


class L1Path:
    """Runs the path on one worker (every worker constructs it with the same arguments) and acts
    as the chosen value's DBPG afterwards (history, tables, timing) for the summary."""

    def __init__(self, kv, shard: Shard, cfg: DBPGConfig, values: list[float] | None,
                 fraction: float):
        self.kv, self.base, self.values = kv, cfg, values
        self.shard, self.valid = split_validation(shard, fraction)
        self.cfg = cfg
        self.points: list[dict] = []
        self.algo: DBPG | None = None    # the value running, after run() the chosen one
        self._algos: list[DBPG] = []
        self.takeover = None
        self.filtered, self.counted = 0, kv.num_workers
        self.setup_seconds = {"total": 0.0, "counts": 0.0}

    @property
    def timing(self) -> dict:
        return self.algo.timing if self.algo else {}

    @property
    def max_lag(self) -> int:
        return max((a.max_lag for a in self._algos), default=0)

    def _table(self, i: int) -> str:
        # not the base table: the warm-up declared it before "auto" knew its first value
        return f"{self.base.table}_l1path{i}"

    def _l1_max(self) -> float:
        """max_k |sum over workers of gradient_k at w = 0|, the same on every worker."""
        kv, table = self.kv, self.base.table + "_g0"
        kv.declare_table(table, dim=1, dtype="float32", updater="sum", sync=True)
        kv.barrier("lr_path_g0")  # a sync round counts the workers that declared before it began
        r = np.where(self.shard.y > 0, -0.5, 0.5)   # dloss/dm = p - [y = 1] at p = 1/2
        g = np.asarray(self.shard.X.T @ r).ravel().astype(np.float32)
        kv.push(self.shard.keys, g, table=table)
        local = float(np.abs(kv.pull(self.shard.keys, table=table)).max(initial=0.0))
        return self._max_over_workers(local)

    def _max_over_workers(self, value: float) -> float:
        kv, stats = self.kv, self.base.table + "_stats"
        kv.declare_table(stats, dim=4, dtype="float64", updater="sum", sync=True)
        kv.barrier("lr_path_stats")
        kv.push(np.array([VALID_KEY - 64 + kv.rank], np.uint64),
                np.array([[value, 0, 0, 0]]), table=stats)
        _, rows = kv.pull_range(VALID_KEY - 64, VALID_KEY, table=stats)
        return float(np.atleast_2d(rows)[:, 0].max())

    def _validation_logloss(self, i: int, table: str) -> float:
        kv, stats = self.kv, self.base.table + "_stats"
        w = kv.pull(self.valid.keys, table=table).astype(np.float64)
        m = np.asarray(self.valid.X @ w).ravel()
        ll = float(np.logaddexp(0.0, -self.valid.y * m).sum())
        key = np.array([VALID_KEY + i], np.uint64)
        kv.push(key, np.array([[ll, self.valid.num_examples, 0, 0]]), table=stats)
        total, n = kv.pull(key, table=stats)[0][:2]
        return total / max(n, 1.0)

    def run(self, on_pass=None, on_local_pass=None) -> list:
        """Train along the path; returns the chosen value's history (its DBPG stays in self.algo,
        its table in self.cfg.table). on_pass / on_local_pass: as DBPG.run, for every value."""
        values = self.values
        if values is None:
            top = self._l1_max()
            values = [top / 2 ** (k + 1) for k in range(AUTO_POINTS)]
        w, losses, algos = None, [], self._algos
        for i, l1 in enumerate(values):
            cfg = dataclasses.replace(self.base, l1=l1, table=self._table(i))
            self.cfg = cfg
            declare_tables(self.kv, cfg)  # every worker, before any pushes to the new tables
            self.kv.barrier(f"lr_path_{i}")
            algo = DBPG(self.kv, self.shard, cfg, init=w)
            self.algo = algo
            history = algo.run(on_pass, on_local_pass)
            losses.append(self._validation_logloss(i, cfg.table))
            self.points.append({"l1": l1, "validation_logloss": losses[-1],
                                "passes": len(history), "nnz": history[-1].nnz if history else 0,
                                "train_objective": history[-1].objective if history else None})
            algos.append(algo)
            w = algo.w.copy()
            if self.values is None and auto_done(losses):
                break
        best = pick(losses)
        self.algo = algos[best]
        self.cfg = self.algo.cfg
        return self.algo.history

    def summary(self) -> dict:
        """The path as the summary reports it."""
        best = pick([p["validation_logloss"] for p in self.points])
        return {"points": self.points, "chosen_l1": self.points[best]["l1"],
                "validation_examples_rank": self.valid.num_examples}
