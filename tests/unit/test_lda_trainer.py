"""LDATrainer's pipeline against an in-process stand-in of the worker API (no sockets): with
bounded delay the worker's copy of the counts stays exact for its own changes, the servers' counts
equal its assignments after every pass, and only changed rows are pushed."""

import numpy as np
import pytest

from pserver.apps.lda import kernels
from pserver.apps.lda.corpus import build_corpus
from pserver.apps.lda.planted import planted_corpus
from pserver.apps.lda.trainer import LDAConfig, LDATrainer


class FakeKV:
    """One worker's view of an int64 sum table: a push is applied when sent and a pull reads
    when sent (what per-sender order gives); results come back at wait()."""

    rank, num_workers, num_servers = 0, 1, 1

    def __init__(self):
        self.rows: dict[int, np.ndarray] = {}
        self.results: dict[int, np.ndarray | None] = {}
        self.pushed_rows = 0
        self.next_ts = 0

    def declare_table(self, name, dim, dtype):
        assert dtype == "int64"
        self.dim = dim

    def push(self, keys, vals, table=None):
        assert keys.dtype == np.uint64 and vals.dtype == np.int64 and (np.diff(keys) > 0).all()
        for k, v in zip(keys.tolist(), vals):
            self.rows[k] = self.rows.get(k, np.zeros(self.dim, np.int64)) + v
        self.pushed_rows += keys.size
        return self._result(None)

    def pull(self, keys, table=None, wait=True):
        vals = np.array([self.rows.get(k, np.zeros(self.dim, np.int64)) for k in keys.tolist()])
        return vals if wait else self._result(vals)

    def _result(self, value):
        ts = self.next_ts
        self.next_ts += 1
        self.results[ts] = value
        return ts

    def wait(self, ts):
        return self.results.pop(ts)

    def wait_all(self):
        self.results.clear()

    def barrier(self, name=""):
        pass


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_worker_counts_stay_exact_under_bounded_delay(tau):
    corpus = build_corpus(planted_corpus(4, docs=120, seed=5), min_df=1, max_df=1.0, held_out=0)
    kv = FakeKV()
    v = len(corpus.vocab)
    t = LDATrainer(kv, corpus.doc_ptr, corpus.words, v, LDAConfig(topics=4, blocks=5, tau=tau))
    t.initialize()
    for epoch in range(3):
        t.run_pass(epoch)
        expect = np.zeros((v + 1, 4), np.int64)
        kernels.add_word_topic_counts(t.words, t.z, expect, 1)
        expect[v] = expect[:v].sum(axis=0)
        assert (t.pull_model() == expect).all()      # the servers hold exactly the assignments
        assert (t.cache.nwk == expect).all()         # and so does the worker's copy
    assert kv.pushed_rows < 3 * 5 * (v + 1) + v + 1  # unchanged rows were not pushed
