"""DBPG's per-pass objective against scikit-learn's optimum, for several settings side by side.

The optimum (liblinear, tol 1e-8) is computed once per data set and L1/L2 and cached in the data
directory. Each setting runs `pserver train lr` on 2 servers x 2 workers; the JSON holds every
pass's relative gap (F - F*) / F*, the passes to within 0.1% and a plot of the curves.

Where liblinear takes too long (the noise-free data of issue 17), --reference-passes N uses the
lowest objective of an N-pass DBPG run instead (an upper bound of F*: gaps are then lower bounds;
the JSON says how much the reference still moved in its last 10 passes).

Usage: python benchmarks/lr_convergence.py --data-dir DIR [--l1 10] [--epochs 30]
       [--setting NAME="--blocks 64" ...] [--reference-passes 40]
       [--out benchmarks/results/lr_convergence.json]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_SETTINGS = ["blocks16=--blocks 16", "blocks64=--blocks 64"]


def optimum(d: str, l1: float, l2: float) -> dict:
    """scikit-learn's F(w*) for the training file of d (cached in d)."""
    cache = Path(d) / f"sklearn_optimum_l1_{l1}_l2_{l2}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from sklearn.linear_model import LogisticRegression

    from pserver.apps.lr.data import read_shard

    s = read_shard(f"{d}/train.libsvm")
    C, ratio = (1 / l1, 1.0) if l1 else (1 / l2, 0.0)
    t0 = time.perf_counter()
    clf = LogisticRegression(C=C, l1_ratio=ratio, solver="liblinear", tol=1e-8, max_iter=1000,
                             fit_intercept=False).fit(s.X, s.y)
    seconds = time.perf_counter() - t0
    w = clf.coef_.ravel()
    f = float(np.logaddexp(0, -s.y * (s.X @ w)).sum() + l1 * np.abs(w).sum() + 0.5 * l2 * w @ w)
    out = {"objective": f, "nnz": int(np.count_nonzero(w)), "seconds": seconds,
           "load": os.getloadavg()[0]}
    cache.write_text(json.dumps(out, indent=2))
    return out


def reference(d: str, l1: float, l2: float, passes: int) -> dict:
    """The lowest objective of a `passes`-pass DBPG run (64 blocks), cached in d."""
    cache = Path(d) / f"dbpg_reference_l1_{l1}_l2_{l2}_{passes}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    objs = [h["objective"] for h in run(d, l1, l2, passes, "--blocks 64")["history"]]
    f = min(objs)
    out = {"objective": f, "source": f"DBPG, {passes} passes, 64 blocks",
           "moved_in_last_10_passes": (objs[-11] - objs[-1]) / f if len(objs) > 10 else None,
           "seconds": time.perf_counter() - t0, "load": os.getloadavg()[0]}
    cache.write_text(json.dumps(out, indent=2))
    return out


def run(d: str, l1: float, l2: float, epochs: int, extra: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="lrconv-") as tmp:
        out = os.path.join(tmp, "s.json")
        cmd = [sys.executable, "-m", "pserver", "train", "lr", "--data", f"{d}/train.libsvm",
               "--l1", str(l1), "--l2", str(l2), "--epochs", str(epochs), "--insecure",
               "--summary-json", out, *extra.split()]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out).read_text())


def passes_to(gaps: list[float], within: float) -> int | None:
    return next((i + 1 for i, g in enumerate(gaps) if g <= within), None)


def plot(results: dict, path: str, title: str, ref: str = "scikit-learn") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ax.semilogy(range(1, len(r["gaps"]) + 1), np.maximum(r["gaps"], 1e-7), marker=".",
                    label=name)
    ax.axhline(1e-3, color="grey", ls="--", lw=1, label="0.1% of the optimum")
    ax.axvline(10, color="grey", ls=":", lw=1)
    ax.set_xlabel("pass")
    ax.set_ylabel(f"(F - F*) / F*   (F*: {ref})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--l1", type=float, default=10.0)
    ap.add_argument("--l2", type=float, default=0.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--setting", action="append", help='NAME="train lr options"')
    ap.add_argument("--reference-passes", type=int, default=0,
                    help="F* from a DBPG run of this many passes instead of liblinear")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "lr_convergence.json"))
    args = ap.parse_args()
    opt = (reference(args.data_dir, args.l1, args.l2, args.reference_passes)
           if args.reference_passes else optimum(args.data_dir, args.l1, args.l2))
    results = {}
    for spec in args.setting or DEFAULT_SETTINGS:
        name, _, extra = spec.partition("=")
        load = os.getloadavg()[0]
        s = run(args.data_dir, args.l1, args.l2, args.epochs, extra)
        gaps = [(h["objective"] - opt["objective"]) / opt["objective"] for h in s["history"]]
        results[name] = {"options": extra, "gaps": gaps, "load_before": load,
                         "passes_to_0.1pct": passes_to(gaps, 1e-3),
                         "passes_to_0.5pct": passes_to(gaps, 5e-3),
                         "train_seconds": s["train_seconds"], "nnz": s["nnz"]}
        print(f"{name}: to 0.1% in {results[name]['passes_to_0.1pct']} passes, to 0.5% in "
              f"{results[name]['passes_to_0.5pct']}; gap after 10: "
              f"{gaps[min(9, len(gaps) - 1)]:.2e}; load {load:.1f}", flush=True)
    meta = json.loads((Path(args.data_dir) / "meta.json").read_text())
    out = {"command": "python benchmarks/lr_convergence.py " + " ".join(sys.argv[1:]),
           "data": {k: meta[k] for k in ("examples", "features", "nnz", "density", "noise",
                                          "seed")},
           "l1": args.l1, "l2": args.l2,
           ("reference" if args.reference_passes else "sklearn"): opt, "settings": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(results, args.out.replace(".json", ".png"),
         f"DBPG per pass, density {meta['density']}, noise {meta['noise']}, L1 = {args.l1:g} "
         "(2 servers x 2 workers)",
         f"DBPG after {args.reference_passes} passes" if args.reference_passes else "scikit-learn")


if __name__ == "__main__":
    main()
