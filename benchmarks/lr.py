"""Sparse logistic regression: pserver's DBPG and FTRL on a real local cluster against Vowpal Wabbit.

Two generated data sets (1 M examples + 100 k held out, ~40 non-zeros over 2**22 ids): "default"
(5% of ids carry weight, label noise 0.02) and "hard" (`gen-data --density 0.1`, no noise: issue
17's). Per data set: scikit-learn's optimum once (cached), VW's best of 3 --l1 values x 1-5
passes, then VW, DBPG and FTRL alternately --repeat times (shared machine); medians of the time
from launch to VW's held-out logloss, of the final held-out logloss and of DBPG's passes to within
0.1% of the optimum. Method and clocks: docs/benchmarks.md, docs/lr.md.

Usage: python benchmarks/lr.py [--datasets default hard] [--repeat 3] [--data-dir DIR]
       [--out benchmarks/results/lr.json]"""

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

from pserver.apps.lr.cli import node_environment
from pserver.apps.lr.gen import generate
from pserver.apps.lr.model import auc, logloss
from pserver.launch import LocalCluster

# name -> gen-data settings (examples and features from the command line)
DATASETS = {"default": dict(density=0.05, noise=0.02, seed=7),
            "hard": dict(density=0.1, noise=0.0, seed=0)}


def ensure_data(d: str, examples: int, settings: dict) -> dict:
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(meta_path):
        meta = json.loads(Path(meta_path).read_text())
        if meta["examples"] == examples and "train_vw" in meta["files"] and all(
                meta[k] == v for k, v in settings.items()):
            return meta
    return generate(d, examples, features=1 << 22, nnz=40, vw=True, **settings)


def run_ours(d: str, solver_args: list[str], workers: int = 2, servers: int = 2) -> dict:
    out = os.path.join(d, "ours_summary.json")
    argv = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", f"{d}/train.libsvm",
            "--test", f"{d}/test.libsvm", *solver_args, "--test-every-pass",
            "--summary-json", out]
    t_launch = time.time()   # VW's clock starts when its process is launched: so does ours
    t0 = time.perf_counter()
    # the processes' environment as `pserver train lr` sets it
    with LocalCluster(servers, workers, insecure=True, heartbeat_timeout=30.0,
                      env=node_environment()) as cluster:
        t_up = time.perf_counter()
        rc = cluster.run_workers(argv)
        t_done = time.perf_counter()
    if rc != 0:
        raise SystemExit(f"training failed with exit code {rc}")
    s = json.loads(Path(out).read_text())
    s["cluster_start_seconds"] = t_up - t0
    s["workers_wall_seconds"] = t_done - t_up
    for e in s["test_every_pass"]:   # scoring and reading the held-out set are not counted
        e["seconds_since_launch"] = e["unix_time_excl"] - t_launch
    return s


def run_vw(d: str, l1: float, passes: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="vw-") as tmp:
        model, cache, preds = (os.path.join(tmp, n) for n in ("model.vw", "cache", "p.txt"))
        train = [sys.executable, "-m", "vowpalwabbit", "-d", f"{d}/train.vw", "--loss_function",
                 "logistic", "--l1", repr(l1), "--passes", str(passes), "--holdout_off", "-c",
                 "--cache_file", cache, "-k", "-b", "24", "-f", model, "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(train, check=True)
        train_s = time.perf_counter() - t0
        subprocess.run([sys.executable, "-m", "vowpalwabbit", "-t", "-i", model, "-d",
                        f"{d}/test.vw", "-p", preds, "--link", "logistic", "--quiet"], check=True)
        p = np.loadtxt(preds, usecols=0)
    lines = Path(f"{d}/test.vw").read_text().splitlines()
    y = np.array([1 if line.startswith("1") else -1 for line in lines])
    return {"l1": l1, "passes": passes, "train_seconds": train_s, "test_logloss": logloss(y, p),
            "test_auc": auc(y, p)}


def read_speed(d: str) -> dict:
    """One process reading half of the training file (a worker's shard of 2), best of 2."""
    from pserver.apps.lr.data import prefer_small_pages, read_shard
    from pserver.apps.lr.parsers import parse_libsvm

    prefer_small_pages()   # as a worker does

    best, shard = float("inf"), None
    for _ in range(2):
        t = time.perf_counter()
        shard = read_shard(f"{d}/train.libsvm", rank=0, num_workers=2)
        best = min(best, time.perf_counter() - t)
    with open(f"{d}/train.libsvm", "rb") as f:
        data = f.read(100 << 20)
    data = data[:data.rfind(b"\n") + 1]
    buf = np.frombuffer(data, np.uint8)
    n, cap = data.count(b"\n"), data.count(b":")
    out = (np.empty(n), np.empty(n, np.int64), np.empty(cap, np.uint64), np.empty(cap, np.float32))
    parse_s = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        parse_libsvm(buf, False, False, *out, np.ones(1, np.uint8))
        parse_s = min(parse_s, time.perf_counter() - t)
    return {"shard_lines": shard.num_examples, "shard_seconds": best,
            "lines_per_s": shard.num_examples / best, "nonzeros_per_s": shard.X.nnz / best,
            "parse_only_lines_per_s": n / parse_s, "parse_only_mb_per_s": len(data) / parse_s / 1e6,
            "load": os.getloadavg()[0]}


def first_reach(history: list[dict], key: str, target: float, time_key: str) -> float | None:
    for h in history:
        if h[key] <= target:
            return h[time_key]
    return None


def vw_sweep(d: str, l1s: list[float], passes: list[int]) -> list[dict]:
    """VW over every (--l1, --passes), once per data set (cached in d: it only picks VW's best
    setting; the timed VW runs are the alternating ones)."""
    cache = Path(d) / "vw_sweep.json"
    want = [[v, p] for v in l1s for p in passes]
    if cache.exists():
        got = json.loads(cache.read_text())
        if [[r["l1"], r["passes"]] for r in got] == want:
            return got
    sweep = [run_vw(d, v, p) for v, p in want]
    cache.write_text(json.dumps(sweep, indent=2))
    return sweep


def median(values: list) -> float | None:
    """Median of the values that exist (None: not reached) - None when most runs did not."""
    have = [v for v in values if v is not None]
    return float(np.median(have)) if len(have) * 2 > len(values) else None


def our_figures(run: dict, vw_logloss: float, f_star: float | None) -> dict:
    """What one of our runs shows: time from launch to VW's held-out logloss, the final and the
    best held-out logloss, and (DBPG) the relative gap to the optimum per pass."""
    evals = run["test_every_pass"]
    out = {"reach_vw_seconds": first_reach(evals, "logloss", vw_logloss, "seconds_since_launch"),
           "final_logloss": run["test_logloss"], "final_auc": run["test_auc"],
           "best_logloss": min(e["logloss"] for e in evals), "passes": run["passes"],
           "train_seconds": run["train_seconds"], "total_seconds": run["total_seconds"],
           "launch_to_end_seconds": run["cluster_start_seconds"] + run["workers_wall_seconds"],
           "per_pass": [{"epoch": e["epoch"], "seconds_since_launch": e["seconds_since_launch"],
                         "logloss": e["logloss"]} for e in evals]}
    if f_star is not None:
        gaps = [(h["objective"] - f_star) / f_star for h in run["history"]]
        out["gaps"] = gaps
        out["passes_to_0.1pct"] = next((i + 1 for i, g in enumerate(gaps) if g <= 1e-3), None)
    return out


def vs_vw(m: dict, vw_s: float, vw_ll: float) -> dict:
    """Side-by-side ratios of one solver's medians against VW's (same run, same files)."""
    reach = m["reach_vw_seconds"]
    return {"reach_vw_over_vw_seconds": None if reach is None else reach / vw_s,
            "end_over_vw_seconds": m["launch_to_end_seconds"] / vw_s,
            "final_logloss_minus_vw": m["final_logloss"] - vw_ll,
            "best_logloss_minus_vw": m["best_logloss"] - vw_ll}


def bench_dataset(name: str, d: str, args: argparse.Namespace) -> dict:
    from lr_convergence import optimum

    meta = ensure_data(d, args.examples, DATASETS[name])
    pure = args.dbpg_l1.split()
    l1 = float(pure[pure.index("--l1") + 1])
    cached = Path(d, f"sklearn_optimum_l1_{l1}_l2_0.0.json").exists()
    # liblinear (L1 alone) - on noise-free data it can take many minutes: --cached-optimum
    opt = optimum(d, l1, 0.0) if cached or not args.cached_optimum else None
    sweep = vw_sweep(d, args.vw_l1, args.vw_passes)
    best = min(sweep, key=lambda r: r["test_logloss"])
    print(f"{name}: VW's best {best}", flush=True)
    solvers = {"dbpg": args.dbpg.split(), "dbpg_l1": pure, "ftrl": args.ftrl.split()}
    runs: dict[str, list] = {"vw": [], **{k: [] for k in solvers}}
    for i in range(args.repeat):
        order = ["vw", *solvers]
        order = order[i % len(order):] + order[:i % len(order)]   # rotate who goes first
        for who in order:
            load = os.getloadavg()[0]
            if who == "vw":
                runs["vw"].append({**run_vw(d, best["l1"], best["passes"]), "load_before": load})
            else:
                r = run_ours(d, solvers[who])
                f_star = opt["objective"] if who == "dbpg_l1" and opt else None
                runs[who].append({**our_figures(r, best["test_logloss"], f_star),
                                  "load_before": load})
            print(f"{name} run {i + 1} {who}: {json.dumps(runs[who][-1])[:300]}", flush=True)
    vw_s = median([r["train_seconds"] for r in runs["vw"]])
    vw_ll = median([r["test_logloss"] for r in runs["vw"]])
    medians = {"vw": {"launch_to_end_seconds": vw_s, "final_logloss": vw_ll}}
    for who in solvers:
        rs = runs[who]
        medians[who] = {k: median([r.get(k) for r in rs]) for k in (
            "reach_vw_seconds", "final_logloss", "best_logloss", "passes_to_0.1pct",
            "train_seconds", "launch_to_end_seconds")}
        m = medians[who]
        m["faster_than_vw"] = m["reach_vw_seconds"] is not None and m["reach_vw_seconds"] < vw_s
        m["final_logloss_at_least_vws"] = m["final_logloss"] <= vw_ll
        m.update(vs_vw(m, vw_s, vw_ll))
    return {"data": {k: meta[k] for k in ("examples", "test_examples", "features", "nnz",
                                          "noise", "seed", "zipf", "density", "true_nonzeros")},
            "sklearn_optimum": opt, "vw_sweep": sweep, "vw_best": best,
            "options": {k: " ".join(v) for k, v in solvers.items()},
            "medians": medians, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--dbpg", default="--l1 5 --l2 2 --epochs 10 --blocks 64",
                    help="our DBPG run's train lr options (for held-out quality)")
    ap.add_argument("--dbpg-l1", default="--l1 10 --epochs 10 --blocks 64",
                    help="a DBPG run with L1 alone: its objective against liblinear's optimum")
    ap.add_argument("--ftrl", default="--solver ftrl --l1 5 --alpha 0.2 --epochs 3",
                    help="our FTRL run's train lr options")
    ap.add_argument("--vw-l1", type=float, nargs="+", default=[1e-8, 1e-7, 1e-6])
    ap.add_argument("--vw-passes", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--cached-optimum", action="store_true",
                    help="use scikit-learn's optimum only if cached (no gaps otherwise)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of VW and ours")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pserver-bench-lr"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lr.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    result = {"command": "python benchmarks/lr.py " + " ".join(sys.argv[1:]),
              "machine": {"cores": os.cpu_count(), "load_at_start": os.getloadavg()[0],
                          "note": f"shared; medians of {args.repeat} alternating runs"},
              "clock": "from launching the processes (ours: cluster and workers) to the end of "
                       "the first pass at VW's held-out logloss; scoring and reading the "
                       "held-out set excluded; VW: its training command's wall time",
              "datasets": {}}
    for name in args.datasets:
        d = os.path.join(args.data_dir, name)
        result["datasets"][name] = bench_dataset(name, d, args)
        result["reading_one_process"] = result.get("reading_one_process") or read_speed(d)
        result["machine"]["load_at_end"] = os.getloadavg()[0]
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result["datasets"][name]["medians"], indent=2), flush=True)


if __name__ == "__main__":
    main()
