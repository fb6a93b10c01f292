"""LDA's input and model files: Debian control text, tokens, vocabulary, encoding, shards, export."""

import numpy as np
import pytest

from pserver.apps.lda.corpus import Corpus, build_corpus, encode, read_dumpavail, shard_bounds, tokenize
from pserver.apps.lda.model import LDAModel, load_model, save_model
from pserver.errors import ConfigError

CONTROL = """Package: zsh
Version: 5.9-4
Description: shell with lots of extra features
 Zsh is a UNIX command interpreter (shell) usable as an
 interactive login shell.
 .
 It has command line editing.
Tag: shell

Package: zsh-doc
Description-en: zsh documentation - info/HTML format
 Zsh is a UNIX command interpreter (shell) usable as an
 interactive login shell.
 .
 It has command line editing.

Package: tiny
Description: a synopsis only
"""


def test_dumpavail_descriptions_joined_and_shared_long_text_once():
    docs = list(read_dumpavail(CONTROL.splitlines(keepends=True)))
    assert docs == ["shell with lots of extra features Zsh is a UNIX command interpreter (shell) "
                    "usable as an interactive login shell.  It has command line editing.",
                    "a synopsis only"]


def test_tokenize_drops_stop_words_short_tokens_and_punctuation():
    assert tokenize("This package provides THE fast X11 zstd-compression of a file.") == \
        ["fast", "x11", "zstd", "compression", "file"]


def test_vocabulary_by_document_frequency_and_encoding():
    docs = ["apple banana cherry", "apple banana", "apple durian", "banana", "zzz"]
    c = build_corpus(docs, min_df=2, max_df=0.6, held_out=0.0)
    assert c.vocab == ["apple", "banana"]           # 3 documents each (60%), cherry/durian: 1
    assert c.num_docs == 4                          # "zzz" keeps no word: dropped
    assert c.doc_ptr.tolist() == [0, 2, 4, 5, 6]
    assert c.words.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ConfigError, match="min-df"):
        build_corpus(docs, min_df=10)


def test_held_out_documents_have_two_words_and_subset_reassembles():
    tokens = [["a"] * (i % 4) + ["b"] for i in range(100)]
    c = encode(tokens, ["a", "b"], held_out=0.2, seed=3)
    assert c.held_out.size == 75 * 0.2 and (np.diff(c.held_out) > 0).all()
    lens = np.diff(c.doc_ptr)
    assert (lens[c.held_out] >= 2).all()
    train = c.training_docs()
    assert train.size + c.held_out.size == c.num_docs
    ptr, words = c.subset(train)
    assert ptr[-1] == lens[train].sum() and words.size == ptr[-1]
    assert words[ptr[1]:ptr[2]].tolist() == c.words[c.doc_ptr[train[1]]:c.doc_ptr[train[1] + 1]] \
        .tolist()


def test_shards_split_tokens_evenly_and_cover_every_document():
    ptr = np.concatenate([[0], np.cumsum(np.full(10, 7))])
    b = shard_bounds(ptr, 3)
    assert b[0] == 0 and b[-1] == 10 and (np.diff(b) >= 3).all()
    assert shard_bounds(np.array([0, 5]), 2).tolist() == [0, 1, 1]   # more shards than documents


def test_corpus_and_model_files_round_trip(tmp_path):
    c = encode([["a", "b"], ["b"]], ["a", "b"])
    c.save(str(tmp_path / "c.npz"))
    back = Corpus.load(str(tmp_path / "c.npz"))
    assert back.vocab == ["a", "b"] and back.words.tolist() == [0, 1, 1]
    m = LDAModel(["a", "b"], np.array([[3, 0], [1, 4]], np.int64), 0.1, 0.01, {"passes": 2})
    save_model(str(tmp_path / "m"), m)
    m2 = load_model(str(tmp_path / "m"))
    assert m2.vocab == m.vocab and (m2.nwk == m.nwk).all() and (m2.alpha, m2.beta) == (0.1, 0.01)
    assert m2.top_words(1) == [["a"], ["b"]]
    with pytest.raises(ConfigError, match="not an LDA model"):
        load_model(str(tmp_path))
