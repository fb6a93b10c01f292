"""Does the servers' slot cache help or hurt the sparse-LR job? Alternating pairs of our LR run
(benchmarks/lr.py's run_ours: 2 servers x 2 workers, 6 passes, 64 blocks, on lr.py's generated
data) with PSERVER_SLOT_CACHE=0 and with the default 64M, in alternating order. Writes JSON: per
setting, the training seconds and the seconds from launch to VW's final held-out logloss (the
logloss VW reaches in benchmarks/results/lr.json), and their medians.

Usage: python benchmarks/lr_slot_cache.py [--pairs 4] [--out benchmarks/results/lr_slot_cache.json]
Run benchmarks/lr.py once first: it generates the data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lr  # noqa: E402 - the LR benchmark's own run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pserver-bench-lr"))
    ap.add_argument("--out", default=str(HERE / "results" / "lr_slot_cache.json"))
    a = ap.parse_args()
    if not Path(a.data_dir, "train.libsvm").exists():
        ap.error(f"no data in {a.data_dir}: run `python benchmarks/lr.py` first")
    target = json.loads((HERE / "results" / "lr.json").read_text())["vw"]["best"]["test_logloss"]
    runs: dict[str, list[dict]] = {"0": [], "64M": []}
    for i in range(a.pairs):
        for size in ("0", "64M") if i % 2 == 0 else ("64M", "0"):
            os.environ["PSERVER_SLOT_CACHE"] = size  # the cluster's processes inherit it
            s = lr.run_ours(a.data_dir, 2, 2, 5.0, 2.0, 6, 64)
            reach = lr.first_reach(s["test_every_pass"], "logloss", target, "seconds_since_launch")
            runs[size].append({"train_seconds": round(s["train_seconds"], 3),
                               "to_vw_logloss_from_launch": round(reach, 3) if reach else None,
                               "test_logloss": round(s["test_logloss"], 5), "load": os.getloadavg()[0]})
            print(size, runs[size][-1], flush=True)
    out = {"command": shlex.join([sys.executable, *sys.argv]), "vw_logloss": target, "runs": runs,
           "medians": {size: {"train_seconds": statistics.median(r["train_seconds"] for r in rs),
                              "to_vw_logloss_from_launch": statistics.median(
                                  r["to_vw_logloss_from_launch"] for r in rs
                                  if r["to_vw_logloss_from_launch"] is not None)}
                       for size, rs in runs.items()}}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["medians"]))


if __name__ == "__main__":
    main()
