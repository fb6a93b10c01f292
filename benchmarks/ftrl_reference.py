"""What FTRL-proximal itself reaches on a data set, without a parameter server -> JSON.

One process runs the algorithm exactly as published: per example, in file order, no minibatch and
no delay (the best case of `pserver train lr --solver ftrl`), for each (alpha, beta, l1, l2) given,
and reports the held-out logloss after every pass. In the same invocation Vowpal Wabbit runs with
its best setting of the data set's sweep (benchmarks/lr.py). The question it answers: is a gap
between pserver's FTRL and VW the distribution's (minibatches, delay) or the algorithm's?

  python benchmarks/ftrl_reference.py [--data DIR] [--passes 4] [--settings 0.1,1,5,0 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import lr

from pserver.apps.lr.data import read_shard

OUT = os.path.join(os.path.dirname(__file__), "results", "ftrl_reference.json")
SETTINGS = ("0.1,1,1,0", "0.1,1,5,0", "0.1,1,10,0", "0.1,1,5,5", "0.2,1,5,0", "0.05,1,2,0.5")


@numba.njit(cache=True)
def _weight(z, n, alpha, beta, l1, l2):
    if abs(z) <= l1:
        return 0.0
    return -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n)) / alpha + l2)


@numba.njit(cache=True)
def _pass(indptr, ind, data, y, z, n, alpha, beta, l1, l2):
    """One pass of per-example FTRL-proximal; returns the progressive logloss."""
    loss = 0.0
    for i in range(y.size):
        m = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = ind[p]
            m += data[p] * _weight(z[j], n[j], alpha, beta, l1, l2)
        s = y[i] * m
        loss += math.log1p(math.exp(-s)) if s > 0 else math.log1p(math.exp(s)) - s
        r = -y[i] / (1.0 + math.exp(s))
        for p in range(indptr[i], indptr[i + 1]):
            j = ind[p]
            g = r * data[p]
            sigma = (math.sqrt(n[j] + g * g) - math.sqrt(n[j])) / alpha
            z[j] += g - sigma * _weight(z[j], n[j], alpha, beta, l1, l2)
            n[j] += g * g
    return loss / max(y.size, 1)


@numba.njit(cache=True)
def _heldout(indptr, ind, data, y, cols, z, n, alpha, beta, l1, l2):
    loss = 0.0
    for i in range(y.size):
        m = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = cols[ind[p]]
            if j >= 0:
                m += data[p] * _weight(z[j], n[j], alpha, beta, l1, l2)
        s = y[i] * m
        loss += math.log1p(math.exp(-s)) if s > 0 else math.log1p(math.exp(s)) - s
    return loss / max(y.size, 1)


def run(d: str, settings: list[str], passes: int) -> list[dict]:
    train = read_shard(f"{d}/train.libsvm", rank=0, num_workers=1)
    test = read_shard(f"{d}/test.libsvm", rank=0, num_workers=1)
    X, Xt = train.X.tocsr(), test.X.tocsr()
    y, yt = train.y.astype(np.float64), test.y.astype(np.float64)
    at = np.minimum(np.searchsorted(train.keys, test.keys), train.keys.size - 1)
    cols = np.where(train.keys[at] == test.keys, at, -1)   # test column -> train column (or none)
    out = []
    for s in settings:
        alpha, beta, l1, l2 = map(float, s.split(","))
        z, n = np.zeros(train.keys.size), np.zeros(train.keys.size)
        t0, per_pass = time.perf_counter(), []
        for _ in range(passes):
            prog = _pass(X.indptr, X.indices, X.data.astype(np.float64), y, z, n, alpha, beta, l1, l2)
            per_pass.append({"progressive_logloss": round(prog, 5), "test_logloss": round(_heldout(
                Xt.indptr, Xt.indices, Xt.data.astype(np.float64), yt, cols, z, n, alpha, beta, l1,
                l2), 5)})
        best = min(per_pass, key=lambda p: p["test_logloss"])
        out.append({"alpha": alpha, "beta": beta, "l1": l1, "l2": l2, "passes": per_pass,
                    "best_test_logloss": best["test_logloss"],
                    "best_pass": per_pass.index(best) + 1, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"FTRL {s}: held-out {[p['test_logloss'] for p in per_pass]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "pserver-bench-lr", "hard"),
                    help="a data directory of benchmarks/lr.py (train/test .libsvm and .vw)")
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), help="alpha,beta,l1,l2 ...")
    ap.add_argument("--vw-l1", type=float, default=None, help="VW's --l1 (default: the best of the "
                    "data set's vw_sweep.json)")
    ap.add_argument("--vw-passes", type=int, default=None)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    if not Path(args.data, "train.libsvm").exists():
        ap.error(f"{args.data} holds no train.libsvm: run benchmarks/lr.py --datasets hard first")
    ftrl = run(args.data, args.settings, args.passes)
    vw = None
    sweep = Path(args.data, "vw_sweep.json")
    l1, passes = args.vw_l1, args.vw_passes
    if (l1 is None or passes is None) and sweep.exists():
        best = min(json.loads(sweep.read_text()), key=lambda r: r["test_logloss"])
        l1, passes = (best["l1"] if l1 is None else l1), (best["passes"] if passes is None else passes)
    if l1 is not None and passes is not None:
        try:
            vw = lr.run_vw(args.data, l1, passes)
        except (OSError, Exception) as e:  # VW not installed (the bench extra): FTRL alone
            print(f"VW not run: {e}", flush=True)
    best = min(ftrl, key=lambda r: r["best_test_logloss"])
    result = {"benchmark": "ftrl_reference", "date": time.strftime("%Y-%m-%d %H:%M"),
              "data": args.data, "ftrl_sequential": ftrl, "vw": vw,
              "best_ftrl_test_logloss": best["best_test_logloss"],
              "gap_to_vw": None if vw is None else round(best["best_test_logloss"] - vw["test_logloss"], 5)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("best_ftrl_test_logloss", "gap_to_vw")}), f"-> {args.out}")


if __name__ == "__main__":
    main()
