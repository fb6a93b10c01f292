"""DeepFM on Criteo-format data with its embedding tables on a pserver cluster (2 servers, 2
workers), against the same model trained by torch alone in one process.

    python examples/ctr_deepfm.py [--train criteo_day.tsv --test held_out.tsv] [--examples 200000]
                                  [--export DIR]

Without --train, Criteo-like data is generated (26 categorical fields, Zipf-distributed IDs).
--export writes the trained model for serving without pserver (pserver.apps.ctr.train.load_model)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from pserver.apps.ctr import data, train
from pserver.apps.lr.model import auc
from pserver.launch import LocalCluster


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train")
    p.add_argument("--test")
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--export", help="write the trained model here (ID tables as .npy files)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ctr-"))
    tr = args.train or str(data.generate(tmp / "train.tsv", args.examples, seed=1))
    te = args.test or str(data.generate(tmp / "test.tsv", max(args.examples // 5, 1000), seed=2))
    cmd = [sys.executable, "-W", "ignore", "-m", "pserver.apps.ctr.train", "--train", tr, "--test", te,
           "--epochs", str(args.epochs), "--out", str(tmp / "rank_RANK.json")]
    if args.export:
        cmd += ["--export", str(Path(args.export).resolve())]
    with LocalCluster(2, 2) as cluster:                       # secure: ephemeral CURVE keys
        if cluster.run_workers(cmd) != 0:
            raise SystemExit("training failed")
    ranks = [json.loads((tmp / f"rank_{r}.json").read_text()) for r in range(2)]
    torch.set_num_threads(1)
    base = train.train_local(data.read(tr), data.read(te), train.CTRConfig(epochs=args.epochs))
    rate = sum(r["examples_per_s"] for r in ranks)
    print(f"pserver (2 servers x 2 workers): held-out AUC {ranks[0]['test_auc']:.4f}, "
          f"{rate:,.0f} examples/s")
    print(f"torch alone (one process):       held-out AUC {base['test_auc']:.4f}, "
          f"{base['examples_per_s']:,.0f} examples/s")
    if args.export:
        model = train.load_model(args.export, train.CTRConfig())
        test = data.read(te)
        p = train.predict(model, test)
        print(f"exported model (plain PyTorch, no cluster): held-out AUC "
              f"{auc(test.labels * 2 - 1, p):.4f}, files in {args.export}")


if __name__ == "__main__":
    main()
