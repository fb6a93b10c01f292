"""A tiny corpus with planted topics, to check that LDA recovers what it should (tests, demos).

Topic k owns its own words ("topic<k>word<j>"); each document draws one or two topics and then
its words from them, uniformly.
"""

from __future__ import annotations

import numpy as np


def planted_corpus(topics: int = 5, words_per_topic: int = 20, docs: int = 400,
                   doc_len: int = 30, seed: int = 0) -> list[str]:
    """Documents as text lines over topics x words_per_topic words (see the module doc)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(docs):
        mine = rng.choice(topics, size=rng.integers(1, 3), replace=False)
        picks = rng.choice(mine, size=doc_len)
        out.append(" ".join(f"topic{k}word{j}" for k, j in
                            zip(picks, rng.integers(words_per_topic, size=doc_len))))
    return out


def planted_topic(word: str) -> int:
    """The planted topic a word of planted_corpus belongs to."""
    return int(word[len("topic"):word.index("word")])


def recovery(top_words: list[list[str]], topics: int) -> float:
    """Share of the planted topics that some learned topic matches: its top words all belong
    to that planted topic."""
    found = {planted_topic(ws[0]) for ws in top_words
             if len({planted_topic(w) for w in ws}) == 1}
    return len(found) / topics
