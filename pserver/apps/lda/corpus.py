"""LDA's input: documents read from text, tokenised, a vocabulary built in one pass, encoded as ids.

Two sources: a file of one document per line, and the package descriptions of the machine's apt
metadata (Debian control stanzas, as `apt-cache dumpavail` prints them). A Corpus is CSR-shaped
(doc_ptr, words) and saves to / loads from one .npz: how the launcher hands the corpus to workers.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

TOKEN = re.compile(r"[a-z][a-z0-9]+")
MIN_TOKEN_LEN = 3
# English function words plus the boilerplate of package descriptions ("this package contains").
_STOP_TEXT = """
a about above after again against all also an and any are as at be because been before being
below between both but by can could did do does doing down during each either etc few for from
further had has have having here how however i if in into is it its itself just may me more most
must my no nor not now of off on once only or other our out over own same she should so some such
than that the their them then there these they this those through to too under until up use used
uses using very via was we well were what when where which while who whom why will with within
without would you your yet one two many much new way like make makes get gets see provides
provide provided contains contain package packages includes include including based allows
available support supports supported version versions also
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric words of at least MIN_TOKEN_LEN characters, stop words removed."""
    return [t for t in TOKEN.findall(text.lower()) if len(t) >= MIN_TOKEN_LEN
            and t not in STOP_WORDS]


def read_lines(path: str) -> Iterator[str]:
    """One document per non-blank line of a UTF-8 file (undecodable bytes replaced)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                yield line


def read_dumpavail(lines: Iterable[str]) -> Iterator[str]:
    """The Description (or Description-en) of every stanza of Debian control text (`apt-cache
    dumpavail` output, or apt's Translation-en lists): the synopsis and the extended lines (" ."
    lines are paragraph breaks). A description whose extended text was seen already (a -dev, -doc
    or data package of the same source; one package in several versions) is yielded once."""
    seen: set[str] = set()
    desc: list[str] | None = None
    for line in [*lines, "\n"]:
        if desc is not None and line.startswith(" "):
            desc.append("" if line.strip() == "." else line.strip())
            continue
        if desc is not None:
            body = " ".join(desc[1:]) or desc[0]
            if body not in seen:
                seen.add(body)
                yield " ".join(desc)
            desc = None
        if line.startswith(("Description:", "Description-en:")):
            desc = [line.split(":", 1)[1].strip()]


APT_LISTS = "/var/lib/apt/lists"
APT_HELPER = "/usr/lib/apt/apt-helper"


def apt_descriptions() -> list[str]:
    """Package descriptions of this machine's apt metadata: the long ones of apt's Translation-en
    lists when present (`apt-get update -o Acquire::Languages=en` fetches them), else the
    synopses of `apt-cache dumpavail`. ConfigError if apt knows no packages."""
    lists = sorted(glob.glob(os.path.join(APT_LISTS, "*_i18n_Translation-en*")))
    commands = [[APT_HELPER, "cat-file", f] for f in lists] or [["apt-cache", "dumpavail"]]
    text = []
    for cmd in commands:
        try:
            text.append(subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                                       check=True).stdout)
        except (OSError, subprocess.CalledProcessError) as e:
            raise ConfigError(f"{' '.join(cmd)} failed ({e}); give a text file with --data") \
                from None
    docs = list(read_dumpavail("".join(text).splitlines(keepends=True)))
    if not docs:
        raise ConfigError("apt knows no packages: run `apt-get update -o Acquire::Languages=en` "
                          "as root first, or give a text file with --data")
    return docs


@dataclass
class Corpus:
    """Documents as word ids: document d is words[doc_ptr[d]:doc_ptr[d+1]] (int32 ids into
    vocab). held_out: sorted ids of the documents kept out of training (perplexity)."""

    vocab: list[str]
    doc_ptr: np.ndarray
    words: np.ndarray
    held_out: np.ndarray

    @property
    def num_docs(self) -> int:
        return self.doc_ptr.size - 1

    def subset(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(doc_ptr, words) of the documents ``docs`` (in that order)."""
        lens = self.doc_ptr[docs + 1] - self.doc_ptr[docs]
        ptr = np.zeros(docs.size + 1, np.int64)
        np.cumsum(lens, out=ptr[1:])
        if not docs.size:
            return ptr, np.empty(0, np.int32)
        idx = np.repeat(self.doc_ptr[docs] - ptr[:-1], lens) + np.arange(ptr[-1])
        return ptr, self.words[idx]

    def training_docs(self) -> np.ndarray:
        keep = np.ones(self.num_docs, bool)
        keep[self.held_out] = False
        return np.flatnonzero(keep)

    def save(self, path: str) -> None:
        np.savez(path, vocab=np.array(self.vocab, dtype=str), doc_ptr=self.doc_ptr,
                 words=self.words, held_out=self.held_out)

    @classmethod
    def load(cls, path: str) -> Corpus:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["vocab"].tolist(), z["doc_ptr"], z["words"], z["held_out"])


def build_corpus(docs: Iterable[str], min_df: int = 5, max_df: float = 0.1,
                 max_vocab: int = 50_000, held_out: float = 0.05, seed: int = 0) -> Corpus:
    """Tokenise ``docs``, keep words in at least min_df and at most max_df (a fraction) of the
    documents (the max_vocab most frequent), encode, and draw a held-out share of the documents
    with at least two kept words. Documents left with no word are dropped.
    Raises ConfigError when no word survives."""
    tokens = [tokenize(d) for d in docs]
    df = Counter(w for t in tokens for w in set(t))
    limit = max_df * len(tokens)
    kept = sorted((w for w, c in df.items() if min_df <= c <= limit), key=lambda w: (-df[w], w))
    vocab = kept[:max_vocab]
    if not vocab:
        raise ConfigError(f"no word is in at least {min_df} and at most {max_df:.0%} of the "
                          f"{len(tokens):,} documents: lower --min-df or raise --max-df")
    return encode(tokens, vocab, held_out, seed)


def encode(tokens: list[list[str]], vocab: list[str], held_out: float = 0.0,
           seed: int = 0, keep_empty: bool = False) -> Corpus:
    """Corpus of the tokenised documents over ``vocab`` (unknown words dropped, then empty
    documents unless keep_empty); a held_out share of the documents with >= 2 words is held out."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = [[index[w] for w in t if w in index] for t in tokens]
    ids = ids if keep_empty else [d for d in ids if d]
    lens = np.array([len(d) for d in ids], np.int64)
    ptr = np.zeros(lens.size + 1, np.int64)
    np.cumsum(lens, out=ptr[1:])
    words = np.fromiter((w for d in ids for w in d), np.int32, count=int(ptr[-1]))
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(lens >= 2)
    n_out = round(held_out * eligible.size)
    out = np.sort(rng.choice(eligible, n_out, replace=False)) if n_out else np.empty(0, np.int64)
    return Corpus(list(vocab), ptr, words, out.astype(np.int64))


def shard_bounds(doc_ptr: np.ndarray, num_shards: int) -> np.ndarray:
    """Document boundaries (num_shards + 1) that split the documents into contiguous shards of
    about equal token counts."""
    targets = np.linspace(0, doc_ptr[-1], num_shards + 1)
    bounds = np.searchsorted(doc_ptr, targets, side="left")
    bounds[0], bounds[-1] = 0, doc_ptr.size - 1
    return np.maximum.accumulate(bounds)
