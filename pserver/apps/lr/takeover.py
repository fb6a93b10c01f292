"""Worker failure in the LR job: the shard of a dead worker is taken over by a live one (paper:
"Worker management"), or, by option, dropped.

The lowest-ranked live worker (the heir) reads the dead rank's shard again in a background thread
and merges it into its own at an iteration boundary (DBPG.adopt), from iteration t + tau + 2 on,
so no round counts the shard twice; rounds go on with the live workers meanwhile. With policy
"drop", or if a worker died before its key counts reached the servers, the job finishes on the
remaining shards and the summary names the dropped ones. Why this is exact: docs/lr.md, "Worker
failure"."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from ...errors import ConfigError, WorkerDeclaredDeadError
from .data import Shard

log = logging.getLogger(__name__)

POLICIES = ("takeover", "drop")


def merge_shards(a: Shard, b: Shard, mult_a: np.ndarray | None = None
                 ) -> tuple[Shard, np.ndarray]:
    """a's examples followed by b's, over the union of their keys (columns still in key order).

    Returns (merged, mult): mult[j] is how many of the merged shards hold merged.keys[j] (mult_a:
    the same count for a, default 1 per key). Vectorised: every entry is copied once, rows stay
    ascending within a column (a's rows first)."""
    keys = np.union1d(a.keys, b.keys)
    ia, ib = np.searchsorted(keys, a.keys), np.searchsorted(keys, b.keys)
    Xa, Xb = a.X.tocsc(), b.X.tocsc()
    na, nb = np.diff(Xa.indptr), np.diff(Xb.indptr)      # entries per column
    in_a = np.zeros(keys.size, np.int64)
    in_a[ia] = na
    per_col = in_a.copy()
    per_col[ib] += nb
    indptr = np.concatenate([[0], np.cumsum(per_col)])
    # entry p of a's column c goes to indptr[ia[c]] + (p - Xa.indptr[c]); b's after a's entries
    pos_a = np.repeat(indptr[ia] - Xa.indptr[:-1], na) + np.arange(Xa.nnz)
    pos_b = np.repeat(indptr[ib] + in_a[ib] - Xb.indptr[:-1], nb) + np.arange(Xb.nnz)
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.result_type(Xa.dtype, Xb.dtype))
    indices[pos_a], indices[pos_b] = Xa.indices, Xb.indices + a.num_examples
    data[pos_a], data[pos_b] = Xa.data, Xb.data
    X = sp.csc_matrix((data, indices, indptr), shape=(a.num_examples + b.num_examples, keys.size))
    mult = np.zeros(keys.size)
    mult[ia] = 1.0 if mult_a is None else mult_a
    mult[ib] += 1.0
    merged = Shard(X=X, y=np.concatenate([a.y, b.y]), keys=keys, skipped=a.skipped + b.skipped,
                   ranges=a.ranges + b.ranges)
    return merged, mult


class _Reader(threading.Thread):
    """read(rank) in the background; result() re-raises its error."""

    def __init__(self, read: Callable[[int], Shard], rank: int) -> None:
        super().__init__(daemon=True, name=f"lr-read-shard-{rank}")
        self._read, self.rank = read, rank
        self.shard: Shard | None = None
        self.error: Exception | None = None
        self.seconds = 0.0
        self.start()

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.shard = self._read(self.rank)
        except Exception as e:  # noqa: BLE001 - re-raised in the training thread by result()
            self.error = e
        self.seconds = time.perf_counter() - t0

    def result(self) -> Shard:
        self.join()
        if self.error is not None:
            raise self.error
        return self.shard


class ShardTakeover:
    """Which data shards this worker trains on as workers die (see the module docstring).

    kv: the KVWorker (its cluster view tells who is dead). read(rank): reads shard `rank`.
    num_shards: the workers the job started with. policy: "takeover" or "drop". counted: how
    many workers' key counts reached the servers at set-up (DBPG.counted; fewer than num_shards:
    dead shards are dropped). ConfigError for an unknown policy.
    Call check() before every iteration from the training thread; it never blocks.
    """

    def __init__(self, kv, read: Callable[[int], Shard], num_shards: int,
                 policy: str = "takeover", counted: int | None = None) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"--on-worker-failure must be one of {POLICIES}, got {policy!r}")
        self.kv, self._read, self.num_shards = kv, read, num_shards
        self.policy = policy
        self.exact = counted is None or counted >= num_shards
        if not self.exact:
            log.warning("only %d of %d workers' key counts reached the servers: the shards of "
                        "workers that died before will not be trained on", counted, num_shards)
        self.mine = {kv.rank}                     # shards this worker's gradients cover
        self.dead: list[int] = []                 # ranks seen dead, in the order noticed
        self.taken: list[dict] = []               # what this worker took over, and when
        self._reading: dict[int, tuple[_Reader, int]] = {}   # rank -> (reader, first iteration)
        self._version = -1
        self._tau = 0.0   # the largest bounded delay seen: a dead worker may have run with it

    def _dead_and_live(self) -> tuple[set[int], list[int]]:
        view = self.kv.membership.view
        workers = view.group_nodes(self.kv.group, alive_only=False)  # this job's group
        dead = {n.rank for n in workers if n.state == "dead" and n.rank < self.num_shards}
        return dead, sorted(n.rank for n in workers if n.alive)

    def check(self, t: int, tau: float) -> list[tuple[int, Shard]]:
        """Before iteration t (tau: the current bounded delay): the (rank, shard) pairs to adopt
        now, in rank order - read, and due (t >= the safe iteration). Starts reading the shards
        this worker has become the heir of. Raises WorkerDeclaredDeadError if the scheduler
        declared this worker dead (its shard is being taken over: going on would count it twice).
        """
        m = self.kv.membership
        if self.policy == "takeover" and m.declared_dead.is_set():
            raise WorkerDeclaredDeadError(
                f"the scheduler declared worker {self.kv.rank} dead (missed heartbeats) and hands "
                "its shard to another worker; raise PSERVER_HEARTBEAT_TIMEOUT on a loaded machine")
        self._tau = max(self._tau, tau)
        if m.view.version != self._version:
            self._version = m.view.version
            self._on_view(t)
        due = [r for r, (reader, first) in self._reading.items()
               if t >= first and not reader.is_alive()]
        out = []
        for r in sorted(due):
            reader, _ = self._reading.pop(r)
            out.append((r, reader.result()))
            self.taken.append({"shard": r, "by": self.kv.rank, "iteration": t,
                               "examples": out[-1][1].num_examples,
                               "read_seconds": round(reader.seconds, 3)})
            self.mine.add(r)
        return out

    def _on_view(self, t: int) -> None:
        dead, live = self._dead_and_live()
        new = sorted(dead - set(self.dead))
        for r in new:
            self.dead.append(r)
            log.warning("worker rank %d is dead: its shard is %s", r,
                        "dropped (--on-worker-failure drop)" if self.policy == "drop"
                        else f"taken over by rank {live[0] if live else '?'}")
        if self.policy == "drop" or not live or live[0] != self.kv.rank:
            return
        if not self.exact:
            if new:
                log.warning("shard(s) %s dropped: a worker died before its key counts reached "
                            "the servers, so no shard can join exactly", new)
            return
        # the dead worker pushed rounds <= t + tau (see the module docstring); eventual
        # consistency bounds nothing: the shard may then count twice in rounds it had sent
        lag = int(self._tau) if math.isfinite(self._tau) else 0
        for r in sorted(dead - self.mine - set(self._reading)):
            log.warning("rank %d takes over shard %d: reading it", self.kv.rank, r)
            self._reading[r] = (_Reader(self._read, r), t + lag + 2)

    def summary(self) -> dict:
        """For the job's summary: the policy, the shards taken over (by this worker) and those
        whose worker died and that nobody trains on any more ("dropped")."""
        dead, _ = self._dead_and_live()
        noticed = self.dead + sorted(dead - set(self.dead))
        return {"count": self.num_shards, "policy": self.policy,
                "dead_workers": sorted(noticed), "taken_over": list(self.taken),
                "dropped": sorted(r for r in noticed if r not in self.mine)}
