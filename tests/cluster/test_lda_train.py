"""`pserver train lda` and `pserver lda-infer` end to end on real local clusters: the servers'
counts equal the sum of the workers' assignments (nothing lost or doubled under bounded delay),
held-out perplexity falls, planted topics are recovered, and the exported model infers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pserver.apps.lda.model import load_model
from pserver.apps.lda.planted import planted_corpus, recovery

TOPICS = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("lda")
    (d / "docs.txt").write_text("\n".join(planted_corpus(TOPICS, docs=400, seed=2)) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "pserver", "train", "lda", "--data", str(d / "docs.txt"),
         "--topics", str(TOPICS), "--passes", "40", "--blocks", "3", "--tau", "1",
         "--min-df", "1", "--max-df", "1", "--held-out", "0.1", "--workers", "2",
         "--servers", "2", "--insecure", "--model-out", str(d / "model"),
         "--summary-json", str(d / "summary.json"), "--assignments-out", str(d / "z")],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return d, out.stdout


def test_server_counts_equal_the_workers_assignments(trained):
    d, _ = trained
    model = load_model(str(d / "model"))
    expect = np.zeros_like(model.nwk)
    for rank in range(2):
        with np.load(d / "z" / f"rank{rank}.npz") as z:
            np.add.at(expect, (z["words"], z["z"]), 1)
    assert expect.sum() > 0
    assert (model.nwk == expect).all()
    summary = json.loads((d / "summary.json").read_text())
    assert summary["totals_match_rows"]
    assert summary["tokens"] == expect.sum()


def test_perplexity_falls_and_planted_topics_are_recovered(trained):
    d, stdout = trained
    history = json.loads((d / "summary.json").read_text())["history"]
    ppl = [h["perplexity"] for h in history]
    assert len(ppl) == 40 and ppl[-1] < 0.8 * ppl[0]
    assert recovery(load_model(str(d / "model")).top_words(10), TOPICS) == 1.0
    assert "held-out perplexity" in stdout and "topic   4:" in stdout


def test_lda_infer_gives_each_document_its_planted_topic(trained, tmp_path):
    d, _ = trained
    model = load_model(str(d / "model"))
    docs = [" ".join(ws) for ws in model.top_words(8)[:2]]
    (tmp_path / "new.txt").write_text("\n".join(docs) + "\n")
    out = subprocess.run([sys.executable, "-m", "pserver", "lda-infer", "--model",
                          str(d / "model"), "--data", str(tmp_path / "new.txt"), "--out",
                          str(tmp_path / "theta.npy")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    theta = np.load(tmp_path / "theta.npy")
    assert theta.shape == (2, TOPICS) and theta.argmax(axis=1).tolist() == [0, 1]
    assert out.stdout.startswith("doc 0: topic 0 (")


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs Debian's apt metadata")
def test_train_lda_on_this_machines_apt_descriptions(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pserver", "train", "lda", "--max-docs", "2000", "--topics", "8",
         "--passes", "2", "--min-df", "2", "--workers", "1", "--servers", "1", "--insecure",
         "--summary-json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["documents"] > 1000 and summary["vocabulary"] > 100
    assert np.isfinite(summary["perplexity"]) and summary["totals_match_rows"]
    assert "topic   7:" in out.stdout
