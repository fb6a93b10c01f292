"""DBPG logistic regression: convergence against scikit-learn, ground-truth recovery, and the
`pserver train lr` command end to end.

The algorithm's unit tests run against FakeKV, an in-process stand-in with the same semantics as
pserver.KVWorker (synchronous sum over workers, l1_prox updater, per-sender FIFO). Everything that
claims distributed results runs on a real LocalCluster: real processes, real sockets.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pserver.apps.lr.dbpg import DBPG, DBPGConfig

sklearn = pytest.importorskip("sklearn.linear_model")


# -- an in-process fake of the worker API (for the algorithm's unit tests only) -------------------
class _FakeTable:
    def __init__(self, spec: dict):
        self.spec = spec
        self.keys = np.empty(0, np.uint64)
        self.vals = np.zeros((0, spec["dim"]), spec["dtype"])
        self.rounds: dict[int, list] = {}
        self.applied = 0

    def rows(self, keys: np.ndarray) -> np.ndarray:
        new = np.setdiff1d(keys, self.keys)
        if new.size:
            allk = np.concatenate([self.keys, new])
            order = np.argsort(allk)
            self.keys = allk[order]
            self.vals = np.concatenate([self.vals, np.zeros((new.size, self.vals.shape[1]),
                                                            self.vals.dtype)])[order]
        return np.searchsorted(self.keys, keys)

    def apply(self, keys: np.ndarray, vals: np.ndarray) -> None:
        pos = self.rows(keys)
        if self.spec["updater"] == "sum":
            self.vals[pos] += vals
            return
        a = self.spec["updater_args"]
        w = self.vals[pos, 0].astype(np.float64)
        g, u = vals[:, 0].astype(np.float64), vals[:, 1] / a.get("eta", 1.0)
        x = u * w - g
        den = u + a.get("l2", 0.0)
        shrunk = np.sign(x) * np.maximum(np.abs(x) - a["l1"], 0.0)
        self.vals[pos, 0] = np.where(den > 0, shrunk / np.where(den > 0, den, 1.0), w)


class FakeCluster:
    """Shared state of the fake: tables and synchronous rounds (threads stand in for workers)."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.tables: dict[str, _FakeTable] = {}
        self.cond = threading.Condition()

    def workers(self) -> list[FakeKV]:
        return [FakeKV(self, r) for r in range(self.num_workers)]


class FakeKV:
    def __init__(self, cluster: FakeCluster, rank: int):
        self.c, self.rank, self.num_workers, self.num_servers = cluster, rank, \
            cluster.num_workers, 1
        self.rounds: dict[str, int] = {}
        self.results: dict[int, object] = {}
        self.ts = 0
        self.sent = 0

    def declare_table(self, name, dim=1, dtype="float32", init="zeros", updater="sum",
                      updater_args=None, sync=False):
        spec = dict(dim=dim, dtype=dtype, updater=updater, updater_args=updater_args or {},
                    sync=sync)
        with self.c.cond:
            t = self.c.tables.setdefault(name, _FakeTable(spec))
            assert t.spec == spec, f"table {name} declared with another spec"

    def _next(self, result=None) -> int:
        self.ts += 1
        self.results[self.ts] = result
        return self.ts

    def push(self, keys, vals, table="default"):
        t = self.c.tables[table]
        cols = t.spec["dim"] * (2 if t.spec["updater"] == "l1_prox" else 1)
        assert keys.dtype == np.uint64 and np.all(keys[1:] > keys[:-1])
        assert vals.dtype == np.dtype(t.spec["dtype"]) and vals.size == keys.size * cols
        vals = vals.reshape(keys.size, cols)
        self.sent += keys.nbytes + vals.nbytes
        with self.c.cond:
            if not t.spec["sync"]:
                t.apply(keys, vals)
                return self._next()
            k = self.rounds.get(table, 0)
            self.rounds[table] = k + 1
            parts = t.rounds.setdefault(k, [])
            parts.append((keys.copy(), vals.copy()))
            if len(parts) == self.num_workers:
                allk = np.concatenate([p[0] for p in parts])
                allv = np.concatenate([p[1] for p in parts]).astype(np.float64)
                uk, inv = np.unique(allk, return_inverse=True)
                summed = np.zeros((uk.size, cols))
                np.add.at(summed, inv, allv)
                t.apply(uk, summed)
                t.applied += 1
                del t.rounds[k]
                self.c.cond.notify_all()
        return self._next()

    def _synced(self, table):
        t = self.c.tables[table]
        if t.spec["sync"]:
            self.c.cond.wait_for(lambda: t.applied >= self.rounds.get(table, 0), timeout=30)

    def pull(self, keys, table="default", out=None, wait=True):
        t = self.c.tables[table]
        with self.c.cond:
            self._synced(table)
            pos = t.rows(keys)
            v = t.vals[pos].copy()
        v = v[:, 0] if t.spec["dim"] == 1 else v
        if out is not None:
            out[...] = v.reshape(out.shape)
        ts = self._next(v)
        return self.wait(ts) if wait else ts

    def pull_range(self, lo=0, hi=1 << 64, table="default"):
        t = self.c.tables[table]
        with self.c.cond:
            self._synced(table)
            sel = (t.keys >= np.uint64(lo)) & ((hi >= 1 << 64) | (t.keys < np.uint64(
                min(hi, (1 << 64) - 1))))
            v = t.vals[sel].copy()
            return t.keys[sel].copy(), (v[:, 0] if t.spec["dim"] == 1 else v)

    def wait(self, ts):
        return self.results.pop(ts, None)

    def barrier(self):
        pass

    def stats(self):
        return {"bytes_sent": self.sent, "bytes_received": 0}

    def close(self):
        pass


def run_fake(shards, cfg: DBPGConfig) -> list:
    """Train with one thread per shard on a FakeCluster; returns every worker's DBPG."""
    cluster = FakeCluster(len(shards))
    algos: list = [None] * len(shards)
    errors: list = []

    def work(rank, kv):
        try:
            algos[rank] = DBPG(kv, shards[rank], cfg)
            algos[rank].run()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r, kv))
               for r, kv in enumerate(cluster.workers())]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    if errors:
        raise errors[0]
    return algos
