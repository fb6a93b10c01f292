"""One worker's share of distributed LDA: its documents' topic assignments stay here, the
word-topic counts and topic totals live on the servers (an int64 table with summed pushes).

A pass walks the worker's documents in blocks. Block t is sampled against counts pulled when
block t - tau began, and pushes its count changes without waiting; at most tau + 1 of a worker's
pushes are unacknowledged (bounded delay). The CountCache keeps this worker's own changes exact in
its copy of the counts. Workers meet at a barrier after every pass. Details: docs/lda.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError
from . import kernels


@dataclass
class LDAConfig:
    """topics: K; alpha, beta: Dirichlet priors of the document-topic and topic-word
    distributions; blocks: blocks per pass per worker; tau: bounded delay in blocks; mh_steps:
    Metropolis-Hastings cycles per token; table: name of the counts table; seed: random seed."""

    topics: int = 50
    alpha: float = 0.1
    beta: float = 0.01
    passes: int = 50
    blocks: int = 4
    tau: int = 1
    mh_steps: int = 2
    table: str = "lda_counts"
    seed: int = 0

    def check(self) -> None:
        """ConfigError naming the first option out of range."""
        for name, ok in (("topics", self.topics >= 2), ("alpha", self.alpha > 0),
                         ("beta", self.beta > 0), ("passes", self.passes >= 0),
                         ("blocks", self.blocks >= 1), ("tau", self.tau >= 0),
                         ("mh_steps", self.mh_steps >= 1)):
            if not ok:
                raise ConfigError(f"LDA option --{name.replace('_', '-')} is out of range: "
                                  f"topics >= 2, alpha and beta > 0, blocks and mh-steps >= 1, "
                                  f"passes and tau >= 0")


class CountCache:
    """A worker's copy of the counts, nwk (V + 1, K) with row V the topic totals: rows read from
    the servers, plus this worker's own pushes that the read cannot reflect yet. A read issued
    after push s reflects every push <= s (one worker's requests reach a server in order)."""

    def __init__(self, num_words: int, num_topics: int) -> None:
        self.nwk = np.zeros((num_words + 1, num_topics), np.int64)
        self.seq = 0                                   # pushes sent so far
        self._sent: list[tuple[int, np.ndarray, np.ndarray]] = []

    def pushed(self, rows: np.ndarray, delta: np.ndarray) -> None:
        """Record a push of ``delta`` for the sorted rows ``rows`` (already in nwk)."""
        self.seq += 1
        self._sent.append((self.seq, rows, delta))

    def apply_read(self, rows: np.ndarray, values: np.ndarray, after: int) -> None:
        """Install server values of the sorted ``rows`` read after push number ``after``, adding
        back this worker's later pushes to them. Pushes no outstanding read needs are forgotten
        by forget()."""
        self.nwk[rows] = values
        for seq, r, d in self._sent:
            if seq > after:
                pos = np.searchsorted(rows, r)
                hit = pos < rows.size
                hit[hit] = rows[pos[hit]] == r[hit]
                self.nwk[r[hit]] += d[hit]

    def forget(self, before: int) -> None:
        """Drop pushes with number <= before (no read still outstanding was issued before them)."""
        self._sent = [s for s in self._sent if s[0] > before]


@dataclass
class PassStats:
    epoch: int
    seconds: float
    tokens: int
    wait_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class LDATrainer:
    """Sampler of one worker over its documents (doc_ptr, words: word ids < num_words)."""

    def __init__(self, kv, doc_ptr: np.ndarray, words: np.ndarray, num_words: int,
                 cfg: LDAConfig) -> None:
        """Declare the counts table and draw random initial topics (nothing is pushed yet).
        Raises ConfigError for options out of range, TableError if the table exists with
        another spec (another K, or not int64)."""
        cfg.check()
        self.kv, self.cfg, self.num_words = kv, cfg, num_words
        self.doc_ptr = np.ascontiguousarray(doc_ptr, np.int64)
        self.words = np.ascontiguousarray(words, np.int32)
        kv.declare_table(cfg.table, dim=cfg.topics, dtype="int64")
        rng = np.random.default_rng([cfg.seed, kv.rank])
        kernels.seed(int(rng.integers(1 << 31)))
        self.z = rng.integers(cfg.topics, size=self.words.size).astype(np.int64)
        self.ndk = kernels.doc_topic_counts(self.doc_ptr, self.z, cfg.topics)
        self.cache = CountCache(num_words, cfg.topics)
        ndocs = self.doc_ptr.size - 1
        self.bounds = np.linspace(0, ndocs, min(cfg.blocks, max(ndocs, 1)) + 1).astype(np.int64)
        self.block_rows = [self._rows(self.words[self.doc_ptr[a]:self.doc_ptr[b]])
                           for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        shape = self.cache.nwk.shape
        self.prob, self.wq = np.ones(shape), np.ones(shape)
        self.alias = np.zeros(shape, np.int64)

    def _rows(self, words: np.ndarray) -> np.ndarray:
        """Sorted rows a block reads and writes: its words and the totals row."""
        return np.append(np.unique(words).astype(np.int64), self.num_words)

    def initialize(self) -> None:
        """Push this worker's initial counts and wait until every worker has (barrier).

        Raises: the worker API's errors (pserver.errors: RemoteError, RequestTimeoutError,
        BarrierTimeoutError, ...); the servers may then hold this worker's counts or not, and the
        job cannot go on."""
        rows = self._rows(self.words)
        kernels.add_word_topic_counts(self.words, self.z, self.cache.nwk, 1)
        self.cache.nwk[self.num_words] = self.cache.nwk[:self.num_words].sum(axis=0)
        self.kv.push(rows.astype(np.uint64), self.cache.nwk[rows], table=self.cfg.table)
        self.kv.wait_all()
        self.kv.barrier(self.cfg.table + "-init")

    def run_pass(self, epoch: int) -> PassStats:
        """Resample every token once (blocks pipelined with bounded delay tau), wait for the
        pushes, then barrier with the other workers.

        Raises: the worker API's errors, as initialize(); some of this pass's pushes may then
        have been applied, so the servers' counts no longer match this worker's assignments."""
        cfg, cache, kv = self.cfg, self.cache, self.kv
        t0, waited = time.perf_counter(), 0.0
        nblocks = len(self.block_rows)
        reads: dict[int, tuple[int, int]] = {}      # block -> (timestamp, pushes it reflects)
        pushes: list[int] = []
        for t in range(nblocks):
            for u in range(t, min(t + cfg.tau, nblocks - 1) + 1):
                if u not in reads:
                    keys = self.block_rows[u].astype(np.uint64)
                    reads[u] = (kv.pull(keys, table=cfg.table, wait=False), cache.seq)
            rows = self.block_rows[t]
            w0 = time.perf_counter()
            ts, after = reads.pop(t)
            cache.apply_read(rows, kv.wait(ts), after)
            cache.forget(min([a for _, a in reads.values()], default=cache.seq))
            if len(pushes) > cfg.tau:                 # bounded delay
                kv.wait(pushes[-cfg.tau - 1])
            waited += time.perf_counter() - w0
            before = cache.nwk[rows]
            nk = cache.nwk[self.num_words]
            kernels.build_alias(rows[:-1], cache.nwk, nk, cfg.beta, self.num_words * cfg.beta,
                                self.prob, self.alias, self.wq)
            kernels.sample_docs(self.bounds[t], self.bounds[t + 1], self.doc_ptr, self.words,
                                self.z, self.ndk, cache.nwk, nk, cfg.alpha, cfg.beta,
                                self.num_words * cfg.beta, self.prob, self.alias, self.wq,
                                cfg.mh_steps)
            delta = cache.nwk[rows] - before
            changed = delta.any(axis=1)     # late in training most rows keep their counts
            if changed.any():
                rows, delta = rows[changed], delta[changed]
                pushes.append(kv.push(rows.astype(np.uint64), delta, table=cfg.table))
                cache.pushed(rows, delta)
        w0 = time.perf_counter()
        kv.wait_all()
        cache.forget(cache.seq)
        kv.barrier(f"{cfg.table}-pass{epoch}")
        waited += time.perf_counter() - w0
        return PassStats(epoch, time.perf_counter() - t0, int(self.words.size), waited)

    def pull_model(self) -> np.ndarray:
        """(V + 1, K) counts as the servers hold them now (row V: topic totals).

        Raises: the worker API's errors for a pull (nothing changes)."""
        keys = np.arange(self.num_words + 1, dtype=np.uint64)
        return self.kv.pull(keys, table=self.cfg.table).reshape(self.num_words + 1, -1)
