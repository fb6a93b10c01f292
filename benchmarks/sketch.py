"""CountMin sketch throughput: inserts/s end to end on a real local cluster against workers.

Input: the package descriptions of `apt-cache dumpavail` (about 50 MB, 6.8 M tokens here), each
worker inserting its shard --repeat times. Configurations (workers x 2 servers, plain and
conservative) run alternately --rounds times (shared machine); medians are reported with the
in-process kernel rate (no network) as the ceiling. Method and results: docs/sketch.md.

Usage: python benchmarks/sketch.py [--workers 1 2 3] [--servers 2] [--repeat 3] [--rounds 3]
       [--text FILE] [--out benchmarks/results/sketch.json] [--plot docs/img/sketch.png]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pserver.apps.sketch import kernels
from pserver.apps.sketch.shape import SketchShape
from pserver.apps.sketch.text import shard_chunks
from pserver.launch import LocalCluster


def ensure_text(path: str | None, tmp: str) -> str:
    if path:
        return path
    out = os.path.join(tmp, "dumpavail.txt")
    with open(out, "wb") as f:
        subprocess.run(["apt-cache", "dumpavail"], stdout=f, check=True)
    return out


def kernel_rate(text: str, shape: SketchShape, conservative: bool) -> float:
    """Tokens/s of tokenise + aggregate + update in this process, one core, no network."""
    salts = kernels.row_salts(np.uint64(shape.seed), shape.depth)
    pending, local = np.zeros(shape.cells), np.zeros(shape.cells)
    chunks = list(shard_chunks([text]))
    n, t0 = 0, time.perf_counter()
    for c in chunks:
        h, _, _ = kernels.tokenize_hash(c, kernels.FOLD)
        u, k, _ = kernels.aggregate(h)
        if conservative:
            kernels.add_conservative(u, k, salts, shape.width, local, pending)
        else:
            kernels.add_counts(u, k, salts, shape.width, pending)
        n += h.size
    return n / (time.perf_counter() - t0)


def run_cluster(text: str, workers: int, servers: int, repeat: int, conservative: bool,
                tmp: str) -> dict:
    out = os.path.join(tmp, f"s_{workers}_{servers}_{conservative}.json")
    argv = [sys.executable, "-m", "pserver.apps.sketch.worker", text, "--repeat", str(repeat),
            "--summary-json", out] + ["--conservative"] * conservative
    t0 = time.perf_counter()
    with LocalCluster(servers, workers, insecure=True, heartbeat_timeout=30.0,
                      prefix_output=False) as cluster:
        rc = cluster.run_workers(argv)
    if rc != 0:
        raise SystemExit(f"the sketch job failed with exit code {rc}")
    s = json.loads(Path(out).read_text())
    s["wall_seconds_with_cluster"] = time.perf_counter() - t0
    s.pop("heavy_hitters", None)
    return s


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cpu) = plt.subplots(1, 2, figsize=(10, 4))
    ws = sorted({r["workers"] for r in results["runs"]})
    for mode, style in (("plain", "o-"), ("conservative", "s--")):
        rows = [r for r in results["runs"] if r["mode"] == mode]
        if rows:
            x = [r["workers"] for r in rows]
            label = f"{mode} ({results['servers']} servers)"
            ax.plot(x, [r["median_inserts_per_s"] / 1e6 for r in rows], style, label=label)
            cpu.plot(x, [r["median_per_cpu_s"] / 1e6 for r in rows], style, label=label)
    ax.plot(ws, ws, ":", color="grey", label="target: 1 M/s per worker core")
    cpu.axhline(1.0, ls=":", color="grey", label="target: 1 M per worker core")
    ax.set_ylabel("inserts/s (millions), end to end, all workers")
    cpu.set_ylabel("inserts per CPU second of worker 0 (millions)")
    for a in (ax, cpu):
        a.set_xlabel("workers")
        a.set_xticks(ws)
        a.set_ylim(bottom=0)
        a.legend()
    fig.suptitle(f"CountMin {results['depth']} x {results['width']}, apt-cache dumpavail, "
                 f"{os.cpu_count()} cores shared by every process")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--text")
    p.add_argument("--no-conservative", action="store_true")
    p.add_argument("--out", default="benchmarks/results/sketch.json")
    p.add_argument("--plot", default="docs/img/sketch.png")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pserver-sketch-bench-") as tmp:
        text = ensure_text(args.text, tmp)
        shape = SketchShape.for_error(1e-4, 0.01)
        modes = ["plain"] + ([] if args.no_conservative else ["conservative"])
        configs = [(w, m) for m in modes for w in args.workers if m == "plain" or w == 2]
        samples: dict[tuple, list[dict]] = {c: [] for c in configs}
        for r in range(args.rounds):
            for w, m in configs:
                s = run_cluster(text, w, args.servers, args.repeat, m == "conservative", tmp)
                samples[(w, m)].append(s)
                print(f"round {r}: {w} workers, {m}: {s['inserts_per_s']:,.0f} inserts/s "
                      f"({s['inserts']:,.0f} in {s['seconds']:.2f} s)", flush=True)
        runs = [{"workers": w, "mode": m,
                 "median_inserts_per_s": statistics.median(x["inserts_per_s"] for x in xs),
                 "per_worker": statistics.median(x["inserts_per_s"] for x in xs) / w,
                 "median_per_cpu_s": statistics.median(x["rank0_inserts_per_cpu_s"] for x in xs),
                 "samples": xs} for (w, m), xs in samples.items()]
        results = {"text_bytes": os.path.getsize(text), "servers": args.servers,
                   "repeat": args.repeat, "rounds": args.rounds, "depth": shape.depth,
                   "width": shape.width, "cpu_count": os.cpu_count(),
                   "load_average_at_end": os.getloadavg(),
                   "kernel_tokens_per_s": {m: kernel_rate(text, shape, m == "conservative")
                                           for m in modes},
                   "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, args.plot)
    for r in runs:
        print(f"{r['workers']} workers x {args.servers} servers, {r['mode']}: median "
              f"{r['median_inserts_per_s']:,.0f} inserts/s ({r['per_worker']:,.0f} per worker, "
              f"{r['median_per_cpu_s']:,.0f} per worker CPU second)")
    print(f"kernel ceiling (one core, no network): {results['kernel_tokens_per_s']}")
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
