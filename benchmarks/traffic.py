"""Traffic of the sparse-LR job with and without filters (the paper's traffic figure, our scale).

`pserver train lr` on 2 servers x 2 workers, generated data, each run to convergence; runs differ
only in the weight table's filters (none, key_cache, compress, kkt, all). Measures the data-plane
bytes of workers and servers and the final objective; a 0-pass run of each isolates the set-up
exchange. Writes JSON and a bar chart. Method: docs/benchmarks.md.

Usage: python benchmarks/traffic.py [--examples 300000] [--l1 4] [--tol 2e-4] [--data-dir DIR]
       [--out benchmarks/results/traffic.json] [--png benchmarks/results/traffic.png]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pserver.apps.lr.data import read_shard
from pserver.apps.lr.gen import generate
from pserver.launch import LocalCluster

RESULTS = Path(__file__).parent / "results"
CONFIGS: dict[str, list[str]] = {
    "none": [],
    "key_cache": ["--filters", "key_cache", "--pull-filters", "key_cache"],
    "compress": ["--filters", "compress", "--pull-filters", "compress"],
    "kkt": ["--kkt"],
    "all": ["--kkt", "--filters", "key_cache,compress"],   # + --pull-filters from --all-pull
}


def ensure_data(d: str, examples: int, features: int) -> dict:
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("examples") == examples and meta.get("features") == features:
            return meta
    return generate(d, examples, features=features, nnz=40, noise=0.02, seed=5)


def run(d: str, name: str, extra: list[str], args: argparse.Namespace, epochs: int) -> dict:
    out = os.path.join(d, f"traffic_{name}_{epochs}.json")
    argv = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", f"{d}/train.libsvm",
            "--l1", str(args.l1), "--epochs", str(epochs), "--blocks", str(args.blocks),
            "--tol", str(args.tol), "--summary-json", out, *extra]
    t0 = time.perf_counter()
    with LocalCluster(2, 2, insecure=True, heartbeat_timeout=30.0) as cluster:
        rc = cluster.run_workers(argv)
    if rc != 0:
        raise SystemExit(f"run {name!r} failed with exit code {rc}")
    with open(out) as f:
        s = json.load(f)
    t = s["traffic"]
    return {"filters": extra, "workers_sent_bytes": t["workers_sent_bytes"],
            "servers_sent_bytes": t["servers_sent_bytes"],
            "push_pairs_raw": t["filtered_push_pairs_raw"],
            "push_pairs_sent": t["filtered_push_pairs_sent"],
            "objective": s["train_objective"], "nnz": s["nnz"], "passes": s["passes"],
            "train_seconds": s["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "history": [h["objective"] for h in s["history"]]}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = results["runs"]
    names = list(runs)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, who in zip(axes, ("servers", "workers")):
        setup = np.array([runs[n][f"{who}_setup_bytes"] for n in names]) / 1e6
        passes = np.array([runs[n][f"{who}_passes_bytes"] for n in names]) / 1e6
        ax.bar(x, passes, color="C0", label="passes (to convergence)")
        ax.bar(x, setup, bottom=passes, color="C0", alpha=0.35, label="setup (counts)")
        for i, n in enumerate(names):
            if n != "none":
                ax.annotate(f"{runs[n][f'{who}_reduction']:.1f}x", (i, passes[i] + setup[i]),
                            ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, [f"{n.replace('_', ' ')}\n{runs[n]['passes']} passes" for n in names])
        ax.set_title(f"bytes sent by the {who}")
        ax.set_ylabel("MB, all nodes")
        ax.legend(fontsize=8)
    st = results["setup"]
    fig.suptitle(f"sparse LR with L1 = {st['l1']:g}: {st['examples']:,} examples, "
                 f"{st['features_seen']:,} features, 2 workers x 2 servers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=300_000)
    p.add_argument("--features", type=int, default=1 << 20)
    p.add_argument("--epochs", type=int, default=40, help="most passes")
    p.add_argument("--tol", type=float, default=2e-4,
                   help="stop when a pass improves the objective by less than this (relative)")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--l1", type=float, default=4.0)
    p.add_argument("--all-pull", default="fp16,key_cache,compress",
                   help="pull filters of the 'all' run")
    p.add_argument("--runs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                      "pserver-traffic"))
    p.add_argument("--out", default=str(RESULTS / "traffic.json"))
    p.add_argument("--png", default=str(RESULTS / "traffic.png"))
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    args = p.parse_args()
    if args.plot_only:
        with open(args.out) as f:
            plot(json.load(f), args.png)
        return 0
    os.makedirs(args.data_dir, exist_ok=True)
    meta = ensure_data(args.data_dir, args.examples, args.features)
    meta["features_seen"] = int(read_shard([os.path.join(args.data_dir, "train.libsvm")],
                                           "libsvm").keys.size)
    runs = {}
    for name in args.runs.split(","):
        extra = list(CONFIGS[name])
        if name == "all" and args.all_pull:
            extra += ["--pull-filters", args.all_pull]
        print(f"run {name}: {' '.join(extra) or '(no filters)'}", flush=True)
        runs[name] = r = run(args.data_dir, name, extra, args, args.epochs)
        # The same job without passes: the setup exchange (key counts, column masses), so
        # that the passes' own traffic is the difference.
        setup = run(args.data_dir, name, extra, args, 0)
        for who in ("workers", "servers"):
            r[f"{who}_setup_bytes"] = setup[f"{who}_sent_bytes"]
            r[f"{who}_passes_bytes"] = r[f"{who}_sent_bytes"] - setup[f"{who}_sent_bytes"]
        print(f"  workers sent {r['workers_sent_bytes'] / 1e6:.1f} MB "
              f"({r['workers_setup_bytes'] / 1e6:.1f} in setup), servers sent "
              f"{r['servers_sent_bytes'] / 1e6:.1f} MB ({r['servers_setup_bytes'] / 1e6:.1f} in "
              f"setup), objective {r['objective']:.6e}, {r['wall_seconds']:.0f} s", flush=True)
    results = {"setup": {"examples": args.examples, "id_space": args.features,
                         "features_seen": meta.get("features_seen", args.features),
                         "epochs": args.epochs, "blocks": args.blocks, "l1": args.l1,
                         "workers": 2, "servers": 2, "all_pull_filters": args.all_pull},
               "runs": runs}
    if "none" in runs:
        base = runs["none"]
        for r in runs.values():
            for who in ("servers", "workers"):
                r[f"{who}_reduction"] = base[f"{who}_sent_bytes"] / max(r[f"{who}_sent_bytes"], 1)
                r[f"{who}_passes_reduction"] = (base[f"{who}_passes_bytes"]
                                                / max(r[f"{who}_passes_bytes"], 1))
                r[f"{who}_per_pass_reduction"] = r[f"{who}_passes_reduction"] * (
                    r["passes"] / max(base["passes"], 1))
            r["objective_rel_diff"] = (r["objective"] - base["objective"]) / base["objective"]
        checks = {}
        if "key_cache" in runs:
            kc = runs["key_cache"]
            checks["key_cache_workers_saving>=40%"] = 1 - 1 / kc["workers_reduction"] >= 0.40
        if "all" in runs:
            a = runs["all"]
            checks["all_servers>=10x"] = a["servers_reduction"] >= 10
            checks["all_workers>=5x"] = a["workers_reduction"] >= 5
            checks["all_objective_within_1%"] = abs(a["objective_rel_diff"]) <= 0.01
        results["targets"] = checks
        print("reduction vs none: whole job / the passes / per pass")
        for name, r in runs.items():
            print(f"{name:10s} {r['passes']:3d} passes  servers {r['servers_reduction']:5.1f}x "
                  f"{r['servers_passes_reduction']:5.1f}x {r['servers_per_pass_reduction']:5.1f}x"
                  f"  workers {r['workers_reduction']:5.1f}x {r['workers_passes_reduction']:5.1f}x "
                  f"{r['workers_per_pass_reduction']:5.1f}x  objective "
                  f"{100 * r['objective_rel_diff']:+.3f}%")
        print("targets:", json.dumps(checks))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    if "none" in runs:
        plot(results, args.png)
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
