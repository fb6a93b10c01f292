"""Before/after: this tree's benchmarks run against two installed versions of pserver, interleaved.

Each round runs every part once with the base interpreter and once with this tree's (the order
alternates between rounds, so drift of the machine's speed hits both alike), then reports the median
of each case per side, the ratio after/before of the medians and the median of the per-round
(paired) ratios. The benchmark scripts are this tree's; the pserver
they import is the interpreter's (a venv with the other checkout installed: `pip install -e`).

Usage: python benchmarks/before_after.py --base-python OTHER/.venv/bin/python [--base-tree OTHER] [--rounds 3]
       [--parts pushpull,lr,replication] [--seconds 2] [--out benchmarks/results/before_after.json]
"""

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

HERE = Path(__file__).resolve().parent


def _check(proc: subprocess.CompletedProcess) -> None:
    """Raise with the end of the run's error output if it failed (a benchmark run that fails is a
    finding, not noise: it is never retried silently)."""
    if proc.returncode:
        tail = proc.stderr.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, proc.args))[:300]} exited {proc.returncode}:\n{tail}")


def _run(python: str, argv: list[str], out: str, timeout: float) -> dict:
    _check(subprocess.run([python, *argv, "--out", out], timeout=timeout, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd=tempfile.gettempdir()))
    return json.loads(Path(out).read_text())


def pushpull(python: str, args, out: str) -> dict:
    """Ops/s of the message cases (plain text, no busy polling, no store case)."""
    res = _run(python, [str(HERE / "pushpull.py"), "--seconds", str(args.seconds), "--busy-poll", "0",
                        "--no-store"], out, 900)
    found = {f"pushpull.{case}": v["ops_per_s"] for case, v in res["insecure"].items()
             if isinstance(v, dict)}
    # the same run's raw pyzmq baseline (this tree's script measures it for both sides): a ratio
    # to it cancels most of a shared machine's drift between the two sides
    for case, v in res.get("ratio_to_raw_pyzmq", {}).items():
        found[f"pushpull.ratio_to_raw_pyzmq.{case}"] = v["median"]
    return found


def lr(python: str, args, out: str) -> dict:
    """Examples/s of the sparse LR job (median pass after the first) and its training seconds."""
    here, data = str(HERE), args.lr_data
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import lr; "
            # the data set of the earlier before/after runs (gen-data --density 0.1)
            f"lr.ensure_data({data!r}, {args.lr_examples}, dict(density=0.1, noise=0.02, seed=7)); "
            f"import resource; u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            f"r = lr.run_ours({data!r}, ['--l1', '5', '--l2', '2', '--epochs', '{args.lr_epochs}', "
            f"'--blocks', '16', '--tau', '0']); "
            f"v = resource.getrusage(resource.RUSAGE_CHILDREN); "
            f"cpu = v.ru_utime + v.ru_stime - u.ru_utime - u.ru_stime; "
            f"json.dump({{'history': r['history'], 'train_seconds': r['train_seconds'], 'cpu': cpu}}, "
            f"open({out!r}, 'w'))")
    _check(subprocess.run([python, "-c", code], timeout=1800, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd=tempfile.gettempdir()))
    res = json.loads(Path(out).read_text())
    steady = res["history"][1:] or res["history"]
    # cpu: every process of the job (scheduler, servers, workers), set-up included - steadier
    # than rates when the machine's speed drifts
    return {"lr.examples_per_s": statistics.median(h["examples_per_s"] for h in steady),
            "lr.train_seconds": res["train_seconds"], "lr.cpu_seconds": res["cpu"]}


def replication(python: str, args, out: str) -> dict:
    """Pushes/s (and server CPU ms per push) of every replication case at capacity (2 x 2). recovery.py reaches
    into the cluster's internals, so each side runs its own tree's copy (same JSON)."""
    tree = HERE if python == sys.executable else Path(args.base_tree) / "benchmarks"
    res = _run(python, [str(tree / "recovery.py"), "--only", "replication", "--replication",
                        args.replication, "--windows", args.windows, "--repeats", "1",
                        "--seconds", str(args.seconds), "--warmup", str(args.warmup)], out, 1800)
    found = {}
    for name, part in res.items():
        if name.startswith("replication_") and isinstance(part, dict) and "capacity" in part:
            for case, v in part["capacity"]["cases"].items():
                found[f"{name}.{case}"] = v["pushes_per_s"]
                if "server_cpu_ms_per_push" in v:  # steadier than rates on a shared machine
                    found[f"{name}.{case}.server_cpu_ms_per_push"] = v["server_cpu_ms_per_push"]
    return found


PARTS = {"pushpull": pushpull, "lr": lr, "replication": replication}
LOWER_IS_BETTER = ("train_seconds", "cpu_ms_per_push", "cpu_seconds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-python", required=True, help="interpreter with the 'before' pserver")
    p.add_argument("--base-tree", help="checkout of the 'before' pserver (default: the one "
                   "holding --base-python's venv), for benchmarks that use internals")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="pushpull,lr,replication")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per measured case")
    p.add_argument("--replication", default="2x2", help="SERVERSxWORKERS of the replication part")
    p.add_argument("--windows", default="16,64", help="windows of the replication part")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="s of load before a replication case is measured: a server loads its compiled "
                        "kernels on a thread after it starts (seconds on a busy machine), which a "
                        "shorter warm-up measures instead of the steady state")
    p.add_argument("--lr-examples", type=int, default=1_000_000)
    p.add_argument("--lr-epochs", type=int, default=6)
    p.add_argument("--lr-data", default=os.path.join(tempfile.gettempdir(), "pserver-bench-lr"))
    p.add_argument("--out", default=str(HERE / "results" / "before_after.json"))
    args = p.parse_args()
    if args.base_tree is None:  # OTHER/.venv/bin/python -> OTHER
        args.base_tree = str(Path(args.base_python).absolute().parents[2])
    if not (Path(args.base_tree) / "benchmarks" / "recovery.py").exists():
        p.error(f"{args.base_tree} holds no benchmarks/recovery.py: pass --base-tree")
    parts = [s for s in args.parts.split(",") if s]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}: choose from {sorted(PARTS)}")
    sides = {"before": args.base_python, "after": sys.executable}
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
            for part in parts:
                for side in order:
                    got = PARTS[part](sides[side], args, os.path.join(tmp, f"{side}.json"))
                    for case, value in got.items():
                        samples[side].setdefault(case, []).append(value)
                    print(f"round {rnd} {part} {side}: {json.dumps(got)}", flush=True)
    cases = {}
    for case in sorted(samples["after"]):
        before = statistics.median(samples["before"].get(case, [float("nan")]))
        after = statistics.median(samples["after"][case])
        ratio = after / before if before else float("nan")
        faster = ratio < 1 if case.endswith(LOWER_IS_BETTER) else ratio > 1
        # the two runs of one round are adjacent in time: their ratio cancels slow drift of the
        # machine's speed, which the ratio of the medians does not
        paired = sorted(a / b for a, b in zip(samples["after"][case], samples["before"].get(case, []))
                        if b)
        cases[case] = {"before_median": round(before, 3), "after_median": round(after, 3),
                       "after_vs_before": round(ratio, 3), "after_is_faster": faster,
                       "paired_ratio_median": round(statistics.median(paired), 3) if paired else None,
                       "paired_ratio_range": [round(paired[0], 3), round(paired[-1], 3)] if paired else None,
                       "before": samples["before"].get(case), "after": samples["after"][case]}
    result = {"command": "python benchmarks/before_after.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count()},
              "base_python": args.base_python, "rounds": args.rounds,
              "seconds": round(time.time() - t0, 1), "cases": cases}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for case, v in cases.items():
        print(f"{case:60s} {v['before_median']:>12} {v['after_median']:>12} {v['after_vs_before']:>7} "
              f"paired {v['paired_ratio_median']} {v['paired_ratio_range']}")


if __name__ == "__main__":
    main()
