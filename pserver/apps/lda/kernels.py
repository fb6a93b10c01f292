"""LDA's compiled kernels: the alias-table Metropolis-Hastings sampler (LightLDA's cycle of a word
and a document proposal, O(1) per token whatever the number of topics) and the fold-in that gives
new or held-out documents their topic mixture. Counts are int64 (the servers' table dtype).

nwk: (V + 1, K) word-topic counts, row V unused by the sampler; nk: (K,) topic totals; ndk:
(D, K) document-topic counts of this worker's documents. Why this sampler: docs/lda.md.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True)
def seed(s):
    """Seed the kernels' random stream (numba's own generator, per process)."""
    np.random.seed(s)


@numba.njit(cache=True, nogil=True)
def doc_topic_counts(doc_ptr, z, num_topics):
    """(D, K) int64 counts of each document's topic assignments."""
    ndk = np.zeros((doc_ptr.size - 1, num_topics), np.int64)
    for d in range(doc_ptr.size - 1):
        for i in range(doc_ptr[d], doc_ptr[d + 1]):
            ndk[d, z[i]] += 1
    return ndk


@numba.njit(cache=True, nogil=True)
def add_word_topic_counts(words, z, nwk, sign):
    """nwk[words[i], z[i]] += sign for every token."""
    for i in range(words.size):
        nwk[words[i], z[i]] += sign


@numba.njit(cache=True, nogil=True)
def build_alias(rows, nwk, nk, beta, vbeta, prob, alias, wq):
    """For each word w in rows: wq[w, k] = (nwk[w, k] + beta) / (nk[k] + vbeta), the word
    proposal, and its Walker alias table (prob[w], alias[w]) built by Vose's method."""
    num_topics = nk.size
    small = np.empty(num_topics, np.int64)
    large = np.empty(num_topics, np.int64)
    scaled = np.empty(num_topics)
    for r in range(rows.size):
        w = rows[r]
        total = 0.0
        for k in range(num_topics):
            q = (max(nwk[w, k], 0) + beta) / (max(nk[k], 0) + vbeta)
            wq[w, k] = q
            total += q
        ns = nl = 0
        for k in range(num_topics):
            scaled[k] = wq[w, k] * num_topics / total
            if scaled[k] < 1.0:
                small[ns] = k
                ns += 1
            else:
                large[nl] = k
                nl += 1
        while ns > 0 and nl > 0:
            ns -= 1
            s = small[ns]
            g = large[nl - 1]
            prob[w, s] = scaled[s]
            alias[w, s] = g
            scaled[g] -= 1.0 - scaled[s]
            if scaled[g] < 1.0:
                nl -= 1
                small[ns] = g
                ns += 1
        for j in range(nl):
            prob[w, large[j]] = 1.0
            alias[w, large[j]] = large[j]
        for j in range(ns):   # rounding leftovers
            prob[w, small[j]] = 1.0
            alias[w, small[j]] = small[j]


@numba.njit(cache=True, nogil=True, inline="always")
def _target(ndk_dk, nwk_wk, nk_k, alpha, beta, vbeta):
    """The collapsed conditional of a topic, up to a constant (counts without the token)."""
    return (ndk_dk + alpha) * (max(nwk_wk, 0) + beta) / (max(nk_k, 0) + vbeta)


@numba.njit(cache=True, nogil=True)
def sample_docs(d0, d1, doc_ptr, words, z, ndk, nwk, nk, alpha, beta, vbeta, prob, alias, wq,
                mh_steps):
    """Resample the topic of every token of documents d0..d1-1 in place (z, ndk, nwk, nk):
    mh_steps cycles of a word proposal (alias table of the word, from the counts when it was
    built) and a document proposal (the topic of a random token of the document, or a uniform
    topic with probability K alpha / (L + K alpha)), each accepted by Metropolis-Hastings against
    the current counts."""
    num_topics = nk.size
    k_alpha = num_topics * alpha
    for d in range(d0, d1):
        start, end = doc_ptr[d], doc_ptr[d + 1]
        length = end - start
        for i in range(start, end):
            w = words[i]
            old = z[i]
            ndk[d, old] -= 1
            nwk[w, old] -= 1
            nk[old] -= 1
            s = old
            p_s = _target(ndk[d, s], nwk[w, s], nk[s], alpha, beta, vbeta)
            for _ in range(mh_steps):
                # word proposal
                k = np.random.randint(num_topics)
                t = k if np.random.random() < prob[w, k] else alias[w, k]
                if t != s:
                    p_t = _target(ndk[d, t], nwk[w, t], nk[t], alpha, beta, vbeta)
                    if np.random.random() * p_s * wq[w, t] < p_t * wq[w, s]:
                        s, p_s = t, p_t
                # document proposal (its counts include the token: z[i] is still `old`)
                u = np.random.random() * (length + k_alpha)
                if u < length:
                    t = z[start + int(u)]
                else:
                    t = np.random.randint(num_topics)
                if t != s:
                    p_t = _target(ndk[d, t], nwk[w, t], nk[t], alpha, beta, vbeta)
                    q_s = ndk[d, s] + (s == old) + alpha
                    q_t = ndk[d, t] + (t == old) + alpha
                    if np.random.random() * p_s * q_t < p_t * q_s:
                        s, p_s = t, p_t
            z[i] = s
            ndk[d, s] += 1
            nwk[w, s] += 1
            nk[s] += 1


@numba.njit(cache=True, nogil=True)
def fold_in(doc_ptr, words, phi, alpha, iters, stride, theta):
    """theta[d] = the topic mixture of document d given the topics phi ((V, K), rows sum to one
    over words per topic column), by `iters` EM fixed-point steps from uniform; only tokens at
    positions i with (i - start) % stride == 0 count (stride 2: the estimation half of document
    completion, 1: every token)."""
    num_topics = phi.shape[1]
    resp = np.empty(num_topics)
    counts = np.empty(num_topics)
    for d in range(doc_ptr.size - 1):
        start, end = doc_ptr[d], doc_ptr[d + 1]
        n = (end - start + stride - 1) // stride
        for k in range(num_topics):
            theta[d, k] = 1.0 / num_topics
        for _ in range(iters):
            counts[:] = 0.0
            for i in range(start, end, stride):
                w = words[i]
                total = 0.0
                for k in range(num_topics):
                    resp[k] = theta[d, k] * phi[w, k]
                    total += resp[k]
                if total > 0.0:
                    for k in range(num_topics):
                        counts[k] += resp[k] / total
            for k in range(num_topics):
                theta[d, k] = (counts[k] + alpha) / (n + num_topics * alpha)


@numba.njit(cache=True, nogil=True)
def completion_loglik(doc_ptr, words, phi, theta):
    """(sum of log p(w) over the tokens at odd positions of each document, their number), with
    p(w) = sum_k theta[d, k] phi[w, k] - the evaluation half of document completion."""
    total = 0.0
    n = 0
    for d in range(doc_ptr.size - 1):
        for i in range(doc_ptr[d] + 1, doc_ptr[d + 1], 2):
            w = words[i]
            p = 0.0
            for k in range(phi.shape[1]):
                p += theta[d, k] * phi[w, k]
            total += math.log(max(p, 1e-300))
            n += 1
    return total, n


def warm_up() -> None:
    """Load (or compile once, then cache on disk) every kernel."""
    ptr = np.array([0, 2], np.int64)
    words = np.array([0, 1], np.int32)
    z = np.zeros(2, np.int64)
    seed(0)
    ndk = doc_topic_counts(ptr, z, 2)
    nwk = np.zeros((3, 2), np.int64)
    add_word_topic_counts(words, z, nwk, 1)
    nk = nwk.sum(axis=0)
    prob, alias, wq = np.ones((3, 2)), np.zeros((3, 2), np.int64), np.ones((3, 2))
    build_alias(np.array([0, 1], np.int64), nwk, nk, 0.1, 0.3, prob, alias, wq)
    sample_docs(0, 1, ptr, words, z, ndk, nwk, nk, 0.1, 0.1, 0.3, prob, alias, wq, 1)
    theta = np.empty((1, 2))
    phi = np.full((3, 2), 1 / 3)
    fold_in(ptr, words, phi, 0.1, 1, 2, theta)
    completion_loglik(ptr, words, phi, theta)
