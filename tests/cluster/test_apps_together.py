"""The paper's three applications at once on ONE cluster, each in its own worker group: sparse LR
(group lr), LDA (group lda) and CountMin (group count), written only against the public API. Each
job's own checks hold as when it runs alone: LR's objective falls, LDA's server counts equal the sum
of its workers' assignments, every CountMin estimate bounds the exact count."""

from __future__ import annotations

import json
import sys

import numpy as np

from pserver.apps.lda.corpus import build_corpus
from pserver.apps.lda.model import load_model
from pserver.apps.lda.planted import planted_corpus
from pserver.apps.lr import gen

GROUPS = {"lr": 2, "lda": 2, "count": 2}


def test_lr_lda_and_countmin_run_together_in_three_groups(cluster_factory, tmp_path):
    gen.generate(str(tmp_path / "lr"), 20_000, features=5000, nnz=20, seed=4, test_examples=100)
    build_corpus(planted_corpus(5, docs=300, seed=2), min_df=1, max_df=1.0, held_out=0.1,
                 seed=0).save(str(tmp_path / "corpus.npz"))
    text = tmp_path / "stream.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(f"w{int(x)}" for x in rng.zipf(1.3, 40_000) % 5000))
    sizes = [a for g, n in GROUPS.items() for a in ("--group-size", f"{g}={n}")]
    c = cluster_factory(2, 0, heartbeat_timeout=10.0, scheduler_args=["--keep-alive", *sizes])
    py = [sys.executable, "-m"]
    jobs = {
        "lr": [*py, "pserver.apps.lr.worker", "--data", str(tmp_path / "lr" / "train.libsvm"),
                    "--l1", "2", "--epochs", "4", "--blocks", "4",
                    "--summary-json", str(tmp_path / "lr.json")],
        "lda": [*py, "pserver.apps.lda.worker", "--corpus", str(tmp_path / "corpus.npz"),
                     "--topics", "5", "--passes", "10", "--blocks", "3", "--tau", "1",
                     "--model-out", str(tmp_path / "lda_model"),
                     "--assignments-out", str(tmp_path / "z"),
                     "--summary-json", str(tmp_path / "lda.json")],
        "count": [*py, "pserver.apps.sketch.worker", str(text), "--eps", "0.005", "--check",
                       "--summary-json", str(tmp_path / "count.json")],
    }
    # as `pserver launch --group G -w N` sets them: the job's group and its writer count
    procs = {g: [c.spawn_worker(cmd, None, env={"PSERVER_GROUP": g,
                                                "PSERVER_NUM_WORKERS": str(GROUPS[g])})
                 for _ in range(GROUPS[g])] for g, cmd in jobs.items()}
    codes = {g: [p.wait(timeout=600) for p in ps] for g, ps in procs.items()}
    assert codes == {g: [0] * n for g, n in GROUPS.items()}

    lr = json.loads((tmp_path / "lr.json").read_text())
    objectives = [h["objective"] for h in lr["history"]]
    assert lr["workers"] == 2 and len(objectives) == 4 and objectives[-1] < objectives[0]

    model = load_model(str(tmp_path / "lda_model"))
    expect = np.zeros_like(model.nwk)
    for rank in range(2):
        with np.load(tmp_path / "z" / f"rank{rank}.npz") as z:
            np.add.at(expect, (z["words"], z["z"]), 1)
    assert expect.sum() > 0 and (model.nwk == expect).all()     # nothing lost or doubled

    count = json.loads((tmp_path / "count.json").read_text())
    assert count["workers"] == 2 and count["inserts"] == 40_000
    assert count["check"]["below_true"] == 0
    assert count["check"]["share_beyond"] <= count["check"]["delta"]
