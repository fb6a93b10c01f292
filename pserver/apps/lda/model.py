"""A trained LDA model: the word-topic counts, priors and vocabulary; export and reload; top words;
held-out perplexity by document completion; topic mixtures of new documents (`pserver lda-infer`).

The perplexity is computed the same way for any topic-word matrix (ours, scikit-learn's, gensim's)
so that benchmarks/lda.py compares models and not estimators: docs/lda.md, "Perplexity".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ...errors import ConfigError
from . import kernels
from .corpus import encode, tokenize

FOLD_IN_ITERS = 50


@dataclass
class LDAModel:
    """vocab: V words; nwk: (V, K) int64 word-topic counts; alpha, beta: the priors."""

    vocab: list[str]
    nwk: np.ndarray
    alpha: float
    beta: float
    meta: dict = field(default_factory=dict)

    @property
    def num_topics(self) -> int:
        return self.nwk.shape[1]

    def phi(self) -> np.ndarray:
        """(V, K) float64: column k is topic k's distribution over words (smoothed by beta)."""
        return topic_word(self.nwk, self.beta)

    def top_words(self, n: int = 10) -> list[list[str]]:
        """The n most probable words of every topic."""
        order = np.argsort(-self.nwk, axis=0, kind="stable")[:n]
        return [[self.vocab[i] for i in order[:, k]] for k in range(self.num_topics)]

    def infer(self, texts: list[str], iters: int = FOLD_IN_ITERS) -> np.ndarray:
        """(len(texts), K) topic mixtures of new documents (rows sum to one; a document with no
        known word gets the uniform mixture)."""
        corpus = encode([tokenize(t) for t in texts], self.vocab, keep_empty=True)
        theta = np.empty((corpus.num_docs, self.num_topics))
        kernels.fold_in(corpus.doc_ptr, corpus.words, self.phi(), self.alpha, iters, 1, theta)
        return theta


def topic_word(nwk: np.ndarray, beta: float) -> np.ndarray:
    """(V, K) phi[w, k] = (nwk[w, k] + beta) / (n_k + V beta) from counts (negatives read 0)."""
    counts = np.maximum(nwk, 0).astype(np.float64)
    return (counts + beta) / (counts.sum(axis=0) + nwk.shape[0] * beta)


def perplexity(phi: np.ndarray, alpha: float, doc_ptr: np.ndarray, words: np.ndarray,
               iters: int = FOLD_IN_ITERS) -> float:
    """Held-out perplexity by document completion: each document's mixture is fitted on its
    even-position tokens (phi fixed), and exp(-mean log p) is taken over its odd-position ones.
    phi: (V, K), each column a distribution over the V words. nan when nothing is evaluated."""
    phi = np.ascontiguousarray(phi, dtype=np.float64)
    theta = np.empty((doc_ptr.size - 1, phi.shape[1]))
    kernels.fold_in(doc_ptr, words, phi, float(alpha), iters, 2, theta)
    loglik, n = kernels.completion_loglik(doc_ptr, words, phi, theta)
    return float(np.exp(-loglik / n)) if n else float("nan")


def save_model(path: str, model: LDAModel) -> str:
    """Write the model to directory ``path`` (created): counts.npy, vocab.txt, model.json."""
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "counts.npy"), model.nwk)
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(model.vocab) + "\n")
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump({"alpha": model.alpha, "beta": model.beta, "topics": model.num_topics,
                   "format": "pserver-lda-v1", **model.meta}, f, indent=2)
    return path


def load_model(path: str) -> LDAModel:
    """Read a model written by save_model. ConfigError if the directory is not one."""
    try:
        with open(os.path.join(path, "model.json")) as f:
            meta = json.load(f)
        with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as f:
            vocab = f.read().split("\n")[:-1]
        nwk = np.load(os.path.join(path, "counts.npy"), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path!r} is not an LDA model directory (from `pserver train lda "
                          f"--model-out`): {e}") from None
    if meta.get("format") != "pserver-lda-v1" or nwk.ndim != 2 or nwk.shape[0] != len(vocab):
        raise ConfigError(f"{path!r}: counts, vocabulary and model.json do not match")
    alpha, beta = float(meta.pop("alpha")), float(meta.pop("beta"))
    return LDAModel(vocab, nwk.astype(np.int64, copy=False), alpha, beta, meta)
