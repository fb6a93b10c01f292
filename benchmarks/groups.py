"""Two jobs on one cluster, in two worker groups: interference measured as throughput ratios.

The sparse LR job (`python -m pserver.apps.lr.worker`, generated data) runs in group `lr-*` and the
CountMin job (`python -m pserver.apps.sketch.worker`, the LR training file as its text) in group
`count-*`, each with --workers processes, on the same --servers servers of one long-lived cluster.
Per round: LR alone, count alone, both at once (each run on fresh tables, in a fresh group: a
group's ranks are not reused); the ratios together / alone are per round, then the median. Method
and results: docs/groups.md.

Usage: python benchmarks/groups.py [--examples 100000] [--epochs 3] [--workers 1] [--servers 2]
       [--repeat 2] [--rounds 2] [--out benchmarks/results/groups.json]"""

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

from pserver.apps.lr.gen import generate
from pserver.launch import LocalCluster

CASES = ("lr_alone", "count_alone", "together")


def _job(cluster: LocalCluster, group: str, argv: list[str], workers: int) -> list:
    env = {"PSERVER_GROUP": group, "PSERVER_NUM_WORKERS": str(workers)}
    return [cluster.spawn_worker([sys.executable, "-m", *argv], rank, env)
            for rank in range(workers)]


def _wait(procs: list, what: str) -> None:
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        raise SystemExit(f"the {what} job failed: exit codes {codes}")


def lr_argv(data: str, epochs: int, table: str, out: str) -> list[str]:
    return ["pserver.apps.lr.worker", "--data", os.path.join(data, "train.libsvm"),
            "--epochs", str(epochs), "--table", table, "--summary-json", out]


def count_argv(data: str, repeat: int, name: str, out: str) -> list[str]:
    return ["pserver.apps.sketch.worker", os.path.join(data, "train.libsvm"), "--repeat",
            str(repeat), "--name", name, "--summary-json", out]


def lr_rate(path: str) -> dict:
    s = json.loads(Path(path).read_text())
    examples = sum(h["examples"] for h in s["history"])
    return {"examples_per_s": examples / s["train_seconds"], "train_seconds": s["train_seconds"],
            "passes": s["passes"], "train_objective": s["train_objective"]}


def count_rate(path: str) -> dict:
    s = json.loads(Path(path).read_text())
    return {"inserts_per_s": s["inserts_per_s"], "seconds": s["seconds"], "inserts": s["inserts"]}


def run_round(cluster: LocalCluster, args: argparse.Namespace, data: str, tmp: str, r: int) -> dict:
    out: dict = {}
    for case in CASES:
        tag = f"{r}_{case}"  # names its tables, outputs and groups
        procs_lr, procs_count = [], []
        t0 = time.perf_counter()
        if case != "count_alone":
            procs_lr = _job(cluster, f"lr-{tag}", lr_argv(data, args.epochs, f"w_{tag}",
                                                   f"{tmp}/lr_{tag}.json"), args.workers)
        if case != "lr_alone":
            procs_count = _job(cluster, f"count-{tag}", count_argv(data, args.repeat, f"sk_{tag}",
                                                            f"{tmp}/count_{tag}.json"), args.workers)
        _wait(procs_lr, "LR")
        _wait(procs_count, "count")
        out[case] = {"wall_seconds": time.perf_counter() - t0}
        if procs_lr:
            out[case]["lr"] = lr_rate(f"{tmp}/lr_{tag}.json")
        if procs_count:
            out[case]["count"] = count_rate(f"{tmp}/count_{tag}.json")
        print(f"round {r} {case}: {json.dumps(out[case])}", flush=True)
    out["lr_together_over_alone"] = (out["together"]["lr"]["examples_per_s"]
                                     / out["lr_alone"]["lr"]["examples_per_s"])
    out["count_together_over_alone"] = (out["together"]["count"]["inserts_per_s"]
                                        / out["count_alone"]["count"]["inserts_per_s"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--features", type=int, default=1 << 20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="workers per job")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="the count job inserts its shard N times")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/groups.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pserver-groups-") as tmp:
        data = os.path.join(tmp, "data")
        generate(data, args.examples, features=args.features, nnz=40, seed=1)
        sizes = [a for r in range(args.rounds) for case in CASES for job in ("lr", "count")
                 for a in ("--group-size", f"{job}-{r}_{case}={args.workers}")]
        with LocalCluster(args.servers, 0, insecure=True, heartbeat_timeout=30.0,
                          prefix_output=False, scheduler_args=["--keep-alive", *sizes]) as cluster:
            rounds = [run_round(cluster, args, data, tmp, r) for r in range(args.rounds)]
    result = {
        "what": "two jobs in two worker groups on one cluster: throughput together / alone",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "2-core VM shared with other work: ratios, not absolute rates"},
        "config": vars(args),
        "rounds": rounds,
        "median_lr_together_over_alone": statistics.median(
            r["lr_together_over_alone"] for r in rounds),
        "median_count_together_over_alone": statistics.median(
            r["count_together_over_alone"] for r in rounds),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("median")}, indent=1))


if __name__ == "__main__":
    main()
