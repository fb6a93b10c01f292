"""LDA's compiled kernels and the worker's count cache, without sockets: the sampler keeps every
count consistent with the assignments, recovers planted topics, alias tables draw the proposal,
the fold-in finds a document's topic, and CountCache keeps a worker's own pushes exact."""

import numpy as np
import pytest

from pserver.apps.lda import kernels
from pserver.apps.lda.corpus import build_corpus
from pserver.apps.lda.model import LDAModel, perplexity, topic_word
from pserver.apps.lda.planted import planted_corpus, recovery
from pserver.apps.lda.trainer import CountCache


def _state(corpus, k, seed=0):
    rng = np.random.default_rng(seed)
    kernels.seed(seed)
    words = corpus.words.astype(np.int32)
    z = rng.integers(k, size=words.size).astype(np.int64)
    v = len(corpus.vocab)
    nwk = np.zeros((v + 1, k), np.int64)
    kernels.add_word_topic_counts(words, z, nwk, 1)
    nwk[v] = nwk[:v].sum(axis=0)
    return words, z, kernels.doc_topic_counts(corpus.doc_ptr, z, k), nwk


def _sweeps(corpus, k, passes, alpha=0.1, beta=0.01, mh=2, seed=0):
    words, z, ndk, nwk = _state(corpus, k, seed)
    v = len(corpus.vocab)
    prob, wq, alias = np.ones(nwk.shape), np.ones(nwk.shape), np.zeros(nwk.shape, np.int64)
    rows = np.arange(v)
    history = []
    for _ in range(passes):
        kernels.build_alias(rows, nwk, nwk[v], beta, v * beta, prob, alias, wq)
        kernels.sample_docs(0, corpus.num_docs, corpus.doc_ptr, words, z, ndk, nwk, nwk[v],
                            alpha, beta, v * beta, prob, alias, wq, mh)
        history.append(perplexity(topic_word(nwk[:v], beta), alpha, corpus.doc_ptr, words))
    return words, z, ndk, nwk, history


@pytest.fixture(scope="module")
def planted():
    return build_corpus(planted_corpus(topics=5, docs=300, seed=1), min_df=1, max_df=1.0,
                        held_out=0.0)


def test_sampler_keeps_counts_equal_to_assignments(planted):
    words, z, ndk, nwk, _ = _sweeps(planted, 5, 3)
    v = len(planted.vocab)
    expect = np.zeros_like(nwk)
    kernels.add_word_topic_counts(words, z, expect, 1)
    assert (nwk[:v] == expect[:v]).all()
    assert (nwk[v] == expect[:v].sum(axis=0)).all()
    assert (ndk == kernels.doc_topic_counts(planted.doc_ptr, z, 5)).all()
    assert nwk.min() >= 0 and ndk.min() >= 0


def test_sampler_recovers_planted_topics_and_perplexity_falls(planted):
    *_, nwk, history = _sweeps(planted, 5, 30)
    model = LDAModel(planted.vocab, nwk[:-1], 0.1, 0.01)
    assert recovery(model.top_words(10), 5) == 1.0
    assert history[-1] < 0.7 * history[0]
    # the planted model's perplexity: each document's words come from <= 2 topics of 20 words
    assert history[-1] < 40


def test_alias_table_draws_the_word_proposal():
    nwk = np.array([[0, 5, 1, 10], [0, 0, 0, 0]], np.int64)
    nk = np.array([10, 10, 2, 20], np.int64)
    prob, wq, alias = np.ones((2, 4)), np.ones((2, 4)), np.zeros((2, 4), np.int64)
    kernels.build_alias(np.array([0]), nwk, nk, 0.5, 2.0, prob, alias, wq)
    expect = (nwk[0] + 0.5) / (nk + 2.0)
    assert np.allclose(wq[0], expect)
    # the distribution the table encodes: bucket k keeps prob[k] / K, gives the rest to alias[k]
    drawn = prob[0] / 4
    np.add.at(drawn, alias[0], (1 - prob[0]) / 4)
    assert np.allclose(drawn, expect / expect.sum())


def test_fold_in_finds_the_topic_of_a_document(planted):
    *_, nwk, _ = _sweeps(planted, 5, 20)
    model = LDAModel(planted.vocab, nwk[:-1], 0.1, 0.01)
    tops = model.top_words(5)
    theta = model.infer([" ".join(tops[2]), "nothing known here"])
    assert theta.shape == (2, 5) and np.allclose(theta.sum(axis=1), 1.0)
    assert theta[0].argmax() == 2 and theta[0, 2] > 0.8
    assert np.allclose(theta[1], 0.2)      # no known word: the uniform mixture


def test_count_cache_adds_back_own_pushes_a_read_cannot_reflect():
    cache = CountCache(num_words=3, num_topics=2)
    server = np.zeros((4, 2), np.int64)
    other = np.array([[1, 0], [0, 0], [0, 2], [1, 2]])       # another worker's counts
    server += other
    mine = np.array([[2, 0], [0, 1], [0, 0], [2, 1]])
    rows = np.array([0, 1, 3])
    server[rows] += mine[rows]                     # push 1, applied before the read
    cache.nwk[rows] += mine[rows]
    cache.pushed(rows, mine[rows])
    after = cache.seq                              # a read issued now reflects push 1 ...
    later = np.array([[0, 0], [1, -1], [0, 0], [1, -1]])
    rows2 = np.array([1, 3])
    cache.nwk[rows2] += later[rows2]
    cache.pushed(rows2, later[rows2])              # ... but not push 2, sent after it
    read_rows = np.array([0, 1, 2, 3])
    cache.apply_read(read_rows, server[read_rows], after)
    assert cache.nwk.tolist() == (other + mine + later).tolist()
    server[rows2] += later[rows2]
    cache.forget(cache.seq)
    cache.apply_read(read_rows, server[read_rows], cache.seq)
    assert cache.nwk.tolist() == (other + mine + later).tolist()


def test_perplexity_of_the_true_model_beats_a_uniform_one(planted):
    v = len(planted.vocab)
    uniform = np.full((v, 5), 1.0 / v)
    ppl = perplexity(uniform, 0.1, planted.doc_ptr, planted.words)
    assert ppl == pytest.approx(v, rel=1e-6)
