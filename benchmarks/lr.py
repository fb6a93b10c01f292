"""Sparse logistic regression: pserver's DBPG on a real local cluster against Vowpal Wabbit.

Generated data (1 M examples + 100 k held out, ~40 non-zeros over 2**22 ids) as libsvm and VW text;
ours on 2 servers x 2 workers, VW with several --l1 values. Reports examples/s per pass, time to
within 1% of the optimum and time to VW's held-out logloss from process launch; the two run
alternately --repeat times (shared machine). Method and clocks: docs/benchmarks.md.

Usage: python benchmarks/lr.py [--examples 1000000] [--epochs 12] [--blocks 16] [--tau 0]
       [--repeat 2] [--data-dir DIR] [--out benchmarks/results/lr.json]"""

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


def ensure_data(d: str, examples: int) -> dict:
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(meta_path):
        meta = json.loads(Path(meta_path).read_text())
        if meta["examples"] == examples and "train_vw" in meta["files"]:
            return meta
    return generate(d, examples, features=1 << 22, nnz=40, noise=0.02, seed=7, vw=True)


def run_ours(d: str, workers: int, servers: int, l1: float, l2: float, epochs: int,
             blocks: int, tau: int = 0) -> dict:
    out = os.path.join(d, f"ours_{workers}x{servers}_{l1}_{l2}.json")
    argv = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", f"{d}/train.libsvm",
            "--test", f"{d}/test.libsvm", "--l1", str(l1), "--l2", str(l2),
            "--epochs", str(epochs), "--tau", str(tau),
            "--blocks", str(blocks), "--test-every-pass", "--summary-json", out]
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
    # rank 0's phases on the same clock (where the launch-to-first-pass time goes), with the CPU
    # seconds and the peak memory rank 0 had used by then
    s["timeline_since_launch"] = {k: {"s": t - t_launch, "cpu_user": u, "cpu_sys": sy,
                                      "peak_rss_mb": mb}
                                  for k, (t, u, sy, mb) in s.get("timeline", {}).items()}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--l2", type=float, default=2.0)
    ap.add_argument("--tau", type=int, default=0, help="bounded delay of our runs")
    ap.add_argument("--vw-l1", type=float, nargs="+", default=[1e-8, 1e-7, 1e-6])
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of VW and ours")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pserver-bench-lr"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lr.json"))
    args = ap.parse_args()

    meta = ensure_data(args.data_dir, args.examples)
    reading = read_speed(args.data_dir)
    # This machine is shared: other jobs' load changes run times by 2-3x. So VW's --l1 is chosen
    # once, then VW and ours run alternately `repeat` times and the best time of each counts.
    sweep = [run_vw(args.data_dir, l1) for l1 in args.vw_l1]
    best_l1 = min(sweep, key=lambda r: r["test_logloss"])["l1"]
    vw_runs, our_runs = [], []
    for _ in range(args.repeat):
        vw_runs.append({**run_vw(args.data_dir, best_l1), "load": os.getloadavg()[0]})
        load = os.getloadavg()[0]
        our_runs.append({**run_ours(args.data_dir, 2, 2, args.l1, args.l2, args.epochs,
                                    args.blocks, args.tau), "load_before": load})
    vw = min(vw_runs, key=lambda r: r["train_seconds"])
    for run in our_runs:
        # The same clock as VW's: from launching the processes (our cluster and workers) to
        # the end of the first pass whose model reaches VW's held-out logloss.
        run["reach_vw"] = first_reach(run["test_every_pass"], "logloss", vw["test_logloss"],
                                      "seconds_since_launch")
        run["reach_vw_worker_clock"] = first_reach(run["test_every_pass"], "logloss",
                                                   vw["test_logloss"], "seconds_since_start")
        # what the in-worker clock misses: cluster start, process start-up and shutdown (an
        # upper bound of the launch cost, since shutdown after training is included)
        run["launch_overhead_seconds"] = run["cluster_start_seconds"] + max(
            run["workers_wall_seconds"] - run["total_seconds"], 0.0)
    # best of the runs: the earliest to VW's logloss (else the fastest)
    ours = min(our_runs, key=lambda r: (r["reach_vw"] is None, r["reach_vw"] or 0.0,
                                        r["train_seconds"] + r["read_seconds_mean"]))
    hist = ours["history"]
    evals = ours["test_every_pass"]
    # the optimum, estimated: the best objective of the run (changes per pass are ~1e-4 there)
    f_star = min(h["objective"] for h in hist)
    t_cum = np.cumsum([h["seconds"] for h in hist])
    for h, t in zip(hist, t_cum):
        h["train_seconds_cumulative"] = float(t)
    reach_1pct = first_reach(hist, "objective", 1.01 * f_star, "train_seconds_cumulative")
    for h, e in zip(hist, evals):
        h["seconds_since_start"] = e["seconds_since_start"]
        h["seconds_since_launch"] = e["seconds_since_launch"]
    reach_1pct_all = first_reach(hist, "objective", 1.01 * f_star, "seconds_since_start")
    reach_1pct_launch = first_reach(hist, "objective", 1.01 * f_star, "seconds_since_launch")
    steady = hist[1:] or hist
    total_eps = float(np.median([h["examples_per_s"] for h in steady]))
    reach_vw = ours["reach_vw"]
    result = {
        "command": "python benchmarks/lr.py " + " ".join(sys.argv[1:]),
        "data": {k: meta[k] for k in ("examples", "test_examples", "features", "nnz", "noise",
                                      "zipf", "density", "signal", "true_nonzeros")},
        "machine": {"cores": os.cpu_count(), "note": "shared with other jobs; best of "
                    f"{args.repeat} alternating runs"},
        "ours": {
            "cluster": "2 servers x 2 workers (LocalCluster, loopback, plain text)",
            "l1": args.l1, "l2": args.l2, "blocks": args.blocks, "passes": len(hist),
            "examples_per_s_total_median_pass": total_eps,
            "examples_per_s_per_worker_median_pass": total_eps / ours["workers"],
            "examples_per_s_total_best_pass": max(h["examples_per_s"] for h in hist),
            "read_seconds_mean": ours["read_seconds_mean"],
            "setup_seconds_rank0": ours.get("setup_seconds_rank0"),
            "train_seconds": ours["train_seconds"],
            "idle_fraction": ours["idle_fraction"],
            "kkt_filtered_fraction_rank0": ours.get("kkt_filtered_fraction_rank0"),
            "objective_final": hist[-1]["objective"], "nnz": ours["nnz"],
            "seconds_to_1pct_of_optimum_training": reach_1pct,
            "seconds_to_1pct_of_optimum_incl_reading": reach_1pct_all,
            "seconds_to_1pct_of_optimum_incl_launch": reach_1pct_launch,
            "test_logloss_final": ours.get("test_logloss"), "test_auc_final": ours.get("test_auc"),
            "seconds_to_vw_logloss_incl_launch": reach_vw,
            "seconds_to_vw_logloss_worker_clock": ours["reach_vw_worker_clock"],
            "launch_overhead_seconds": ours["launch_overhead_seconds"],
            # rank 0's phases: seconds since launch, CPU user/system seconds and peak memory so far
            "timeline_rank0": ours.get("timeline_since_launch"),
            "bytes_sent": ours["bytes_sent"], "bytes_received": ours["bytes_received"],
            "per_pass": [{**h, **e} for h, e in zip(hist, evals)],
            "runs": [{k: r.get(k) for k in ("load_before", "read_seconds_mean", "train_seconds",
                                            "setup_seconds_rank0", "reach_vw",
                                            "reach_vw_worker_clock", "launch_overhead_seconds",
                                            "test_logloss")} for r in our_runs],
        },
        "reading_one_process": reading,
        "vw": {"best": vw, "runs": vw_runs, "l1_sweep": sweep},
        "ours_vs_vw": {
            "clock": "both from launching the processes; ours to the end of the first pass "
                     "at VW's held-out logloss (scoring and held-out reading excluded)",
            "faster_to_vw_logloss": reach_vw is not None and reach_vw < vw["train_seconds"],
            "faster_by_worker_clock": ours["reach_vw_worker_clock"] is not None and
            ours["reach_vw_worker_clock"] < vw["train_seconds"],
            "better_final_logloss": (ours.get("test_logloss") or 1e9) < vw["test_logloss"],
            "speedup_to_vw_logloss": (vw["train_seconds"] / reach_vw) if reach_vw else None,
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result["ours"].items() if k != "per_pass"}, indent=2))
    print(json.dumps(result["vw"]["best"], indent=2))
    print(json.dumps(result["ours_vs_vw"], indent=2))


if __name__ == "__main__":
    main()
