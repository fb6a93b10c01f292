"""Embeddings for PyTorch: the DeepFM example (pserver.apps.ctr) trained with pserver's embedding
tables (1 server x 1 worker, 2 servers x 2 workers) against the single-process torch baseline
(nn.Embedding(sparse=True) + Adagrad, one thread) in the same invocation - examples/s and rows
pulled/pushed per second - and the memory of a table under --max-table-bytes as the IDs pushed
grow to 10x its budget (per server: stored rows, the bytes the budget counts, the table's
allocated bytes and the process's RSS). Method and figures: docs/torch.md, "Benchmark".

Usage: python benchmarks/embeddings.py [--examples 60000] [--epochs 1] [--repeat 2]
       [--budget-rows 20000] [--short] [--out benchmarks/results/embeddings.json]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pserver
from pserver.apps.ctr import data, train
from pserver.apps.export import server_stats
from pserver.launch import LocalCluster
from pserver.ring import mix64

MEMORY_DIM = 16       # the memory case's rows: 16 float32 + adagrad state


def baseline(tr: str, te: str, epochs: int) -> dict:
    torch.set_num_threads(1)   # a 2-core machine: more OpenMP threads spin against each other
    return train.train_local(data.read(tr), data.read(te), train.CTRConfig(epochs=epochs))


def on_cluster(tr: str, te: str, epochs: int, servers: int, workers: int, tmp: Path) -> dict:
    out = tmp / f"s{servers}w{workers}_RANK.json"
    cmd = [sys.executable, "-W", "ignore", "-m", "pserver.apps.ctr.train", "--train", tr,
           "--test", te, "--epochs", str(epochs), "--out", str(out)]
    with LocalCluster(servers, workers, insecure=True, heartbeat_timeout=10.0,
                      prefix_output=False) as cluster:
        if cluster.run_workers(cmd, timeout=3600) != 0:
            raise SystemExit(f"the {servers}x{workers} training failed")
    ranks = [json.loads(Path(str(out).replace("RANK", str(r))).read_text()) for r in range(workers)]
    seconds = max(r["train_seconds"] for r in ranks)   # the job's wall time
    examples = sum(r["examples"] for r in ranks)
    return {"examples_per_s": examples / seconds, "train_seconds": seconds,
            "rows_pulled_per_s": sum(r["rows_pulled"] for r in ranks) / seconds,
            "rows_pushed_per_s": sum(r["rows_pushed"] for r in ranks) / seconds,
            "test_auc": ranks[0].get("test_auc"),
            "per_worker_examples_per_s": [r["examples_per_s"] for r in ranks]}


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory(budget_rows: int, batch: int, servers: int = 2) -> dict:
    """Push IDs growing to 10x the budget (each batch new IDs plus a hot set pushed every time)
    and read every server's stats at each 1x of the budget."""
    row_cost = MEMORY_DIM * 4 * 2 + 80
    budget = budget_rows * row_cost
    points = []
    with LocalCluster(servers, 1, insecure=True, heartbeat_timeout=10.0, prefix_output=False,
                      settings={"max_table_bytes": str(budget)}) as cluster, \
            pserver.KVWorker(cluster.config(0)) as kv:
        kv.declare_table("emb", dim=MEMORY_DIM, init="normal:0.01", updater="adagrad",
                         updater_args={"lr": 0.05})
        hot = mix64(np.arange(1 << 40, (1 << 40) + 1000, dtype=np.uint64))
        grads = None
        pushed = 0
        t0 = time.perf_counter()
        for _ in range(10 * budget_rows // batch):
            new = mix64(np.arange(pushed, pushed + batch, dtype=np.uint64))
            pushed += batch
            keys = np.unique(np.concatenate([hot, new]))
            if grads is None or grads.shape[0] != keys.size:
                grads = np.full((keys.size, MEMORY_DIM), 0.01, np.float32)
            kv.wait(kv.push(keys, grads, table="emb"))
            if pushed % budget_rows == 0:
                stats = server_stats(kv)
                points.append({
                    "ids_pushed": pushed, "x_budget": pushed / budget_rows,
                    "seconds": time.perf_counter() - t0,
                    "servers": [{"keys": s["tables"]["emb"]["keys"],
                                 "budget_bytes": s["tables"]["emb"].get("budget_bytes"),
                                 "table_bytes": s["tables"]["emb"]["bytes"],
                                 "rows_evicted": s["tables"]["emb"]["rows_evicted"],
                                 "rss_mb": _rss_mb(s["pid"])} for s in stats]})
    return {"budget_rows_per_server": budget_rows, "max_table_bytes": budget,
            "row_cost_bytes": row_cost, "dim": MEMORY_DIM, "batch_new_ids": batch,
            "hot_ids": 1000, "points": points}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=60_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="runs of each training case (median)")
    p.add_argument("--budget-rows", type=int, default=20_000)
    p.add_argument("--short", action="store_true", help="small settings, for a quick check")
    p.add_argument("--out", default="benchmarks/results/embeddings.json")
    args = p.parse_args()
    if args.short:
        args.examples, args.repeat, args.budget_rows = 6_000, 1, 2_000
    tmp = Path(tempfile.mkdtemp(prefix="emb-bench-"))
    tr = str(data.generate(tmp / "train.tsv", args.examples, seed=1))
    te = str(data.generate(tmp / "test.tsv", max(args.examples // 5, 1000), seed=2))
    runs: dict[str, list[dict]] = {"torch_single_process": [], "pserver_1x1": [],
                                   "pserver_2x2": []}
    for _ in range(args.repeat):   # interleaved, so a drift of the machine's load hits every case
        runs["torch_single_process"].append(baseline(tr, te, args.epochs))
        runs["pserver_1x1"].append(on_cluster(tr, te, args.epochs, 1, 1, tmp))
        runs["pserver_2x2"].append(on_cluster(tr, te, args.epochs, 2, 2, tmp))
        print({k: round(v[-1]["examples_per_s"]) for k, v in runs.items()}, flush=True)
    median = {k: statistics.median(r["examples_per_s"] for r in v) for k, v in runs.items()}
    base = median["torch_single_process"]
    result = {
        "benchmark": "embeddings", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_at_start": os.getloadavg()},
        "settings": {"examples": args.examples, "epochs": args.epochs, "repeat": args.repeat,
                     "model": "DeepFM k=8, MLP 64-32, batch 512, adagrad (pserver.apps.ctr)"},
        "examples_per_s_median": median,
        "pserver_over_baseline": {k: median[k] / base for k in ("pserver_1x1", "pserver_2x2")},
        "runs": runs,
        "memory": memory(args.budget_rows, max(100, args.budget_rows // 10)),
        "torchrec": ("not compared: fbgemm-gpu-cpu 1.9.0 (torchrec 1.9.2's kernels) fails to load with "
                     "torch 2.13.0 (undefined symbol torch::autograd::_wrap_outputs; docs/torch.md)"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"examples_per_s_median": median,
                      "pserver_over_baseline": result["pserver_over_baseline"]}, indent=1))
    last = result["memory"]["points"][-1]
    print(f"memory at {last['x_budget']:.0f}x the budget: " + ", ".join(
        f"{s['keys']} rows, {s['table_bytes'] / 1e6:.1f} MB table, {s['rss_mb']:.0f} MB RSS"
        for s in last["servers"]))


if __name__ == "__main__":
    main()
