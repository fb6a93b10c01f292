"""One worker of `pserver sketch count`: insert this worker's shard of the files, then on rank 0
report throughput, heavy hitters and (with --check) the error against exact counts.

Run as ``python -m pserver.apps.sketch.worker ARGS`` with PSERVER_* set (the launcher does that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

from ... import logs
from ...errors import ConfigError, PServerError
from . import kernels
from .countmin import CountMinSketch
from .shape import SketchShape
from .text import CHUNK_BYTES, exact_counts, shard_chunks


def add_count_args(p: argparse.ArgumentParser) -> None:
    """The options of `pserver sketch count` that its workers take."""
    p.add_argument("files", nargs="+", help="text files; every token is an item")
    p.add_argument("--name", default="sketch", help="sketch name (its tables: NAME, NAME_hh, "
                                                    "NAME_meta)")
    p.add_argument("--eps", type=float, default=1e-4, help="error bound eps (width e/eps)")
    p.add_argument("--delta", type=float, default=0.01,
                   help="failure probability delta (depth ln(1/delta))")
    p.add_argument("--width", type=int, help="columns (overrides --eps)")
    p.add_argument("--depth", type=int, help="rows (overrides --delta)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row hashes")
    p.add_argument("--conservative", action="store_true",
                   help="conservative update of each worker's own sub-stream")
    p.add_argument("--share", type=float, default=1e-3,
                   help="heavy-hitter candidate share: --top finds every item above it")
    p.add_argument("--top", type=float, default=0.01, metavar="PHI",
                   help="print the items with estimate >= PHI * N at the end (default 0.01)")
    p.add_argument("--check", action="store_true",
                   help="rank 0 compares every estimate with the exact count (collections.Counter)")
    p.add_argument("--repeat", type=int, default=1, help="insert the shard this many times")
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help=argparse.SUPPRESS)
    p.add_argument("--summary-json", help="rank 0 writes the summary here")
    p.add_argument("--group", help="worker group of the writers (default: PSERVER_GROUP, else "
                                   "'default')")


def shape_of(args: argparse.Namespace) -> SketchShape:
    """The sketch shape the options ask for (ConfigError if invalid)."""
    base = SketchShape.for_error(args.eps, args.delta, args.seed)
    return SketchShape(args.depth or base.depth, args.width or base.width, args.seed)


def check(sketch: CountMinSketch, files: list[str], repeat: int) -> dict:
    """Estimates of every distinct token against exact counts: how many are below (must be
    none) and what share exceeds the truth by more than eps * N (expected below delta)."""
    truth = exact_counts(files)
    items = list(truth)
    true = np.fromiter(truth.values(), dtype=np.float64, count=len(items)) * repeat
    est = sketch.estimate(items)
    n = sketch.total()
    over = est - true
    beyond = int(np.count_nonzero(over > sketch.shape.eps * n))
    return {"items": len(items), "below_true": int(np.count_nonzero(over < 0)),
            "beyond_eps_n": beyond, "share_beyond": beyond / max(1, len(items)),
            "delta": sketch.shape.delta, "eps_n": sketch.shape.eps * n,
            "mean_overestimate": float(over.mean()) if items else 0.0,
            "max_overestimate": float(over.max()) if items else 0.0,
            "exact_share": float(np.mean(over == 0)) if items else 1.0}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def run(kv, args: argparse.Namespace) -> dict:
    """Insert this worker's shard; rank 0 returns the summary (others an empty dict)."""
    sketch = CountMinSketch(kv, args.name, shape_of(args), conservative=args.conservative,
                            share=args.share)
    # the job's worker count, not the live one: a query client may join while inserts go on
    workers = kv.cfg.num_workers
    if not 0 <= kv.rank < workers:
        raise ConfigError(f"worker rank {kv.rank} has no shard among {workers} workers: set "
                          "PSERVER_NUM_WORKERS to the number of writers (pserver launch does)")
    kv.barrier("sketch-start")  # start-up skew is not insert time
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    for _ in range(args.repeat):
        for chunk in shard_chunks(args.files, kv.rank, workers, args.chunk_bytes):
            sketch.insert_text(chunk)
    sketch.flush()
    mine, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    kv.barrier("sketch-done")
    seconds = time.perf_counter() - t0
    if kv.rank != 0:
        return {}
    n = sketch.total()
    summary = {"workers": workers, "servers": kv.num_servers, "inserts": n,
               "seconds": seconds, "inserts_per_s": n / seconds,
               "rank0_inserts_per_s": sketch.inserted / mine,
               "rank0_inserts_per_cpu_s": sketch.inserted / max(cpu, 1e-9),
               "depth": sketch.shape.depth, "width": sketch.shape.width,
               "eps": sketch.shape.eps, "delta": sketch.shape.delta,
               "conservative": sketch.conservative, "bound": sketch.shape.bound(n)}
    summary["heavy_hitters"] = [[t.decode("utf-8", "replace"), e]
                                for t, e in sketch.heavy_hitters(max(args.top, args.share))]
    if args.check:
        summary["check"] = check(sketch, args.files, args.repeat)
    return summary


def report(s: dict) -> str:
    """The summary as text."""
    lines = [f"{s['inserts']:,.0f} inserts by {s['workers']} workers into a {s['depth']} x "
             f"{s['width']} sketch on {s['servers']} servers in {s['seconds']:.2f} s: "
             f"{s['inserts_per_s']:,.0f} inserts/s ({s['inserts_per_s'] / s['workers']:,.0f} "
             f"per worker; rank 0: {s['rank0_inserts_per_cpu_s']:,.0f} per CPU second)",
             f"guarantee: {s['bound']}", "heavy hitters (item, estimate):"]
    lines += [f"  {t!r:30} {e:,.0f}" for t, e in s["heavy_hitters"][:50]]
    c = s.get("check")
    if c:
        lines.append(f"check: {c['items']:,} distinct items, {c['below_true']} below the true "
                     f"count, {c['beyond_eps_n']} ({100 * c['share_beyond']:.3f}%) beyond eps*N = "
                     f"{c['eps_n']:,.1f} (delta = {100 * c['delta']:.2f}%), exact for "
                     f"{100 * c['exact_share']:.1f}%, mean over-estimate {c['mean_overestimate']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pserver.apps.sketch.worker")
    add_count_args(p)
    args = p.parse_args(argv)
    from ... import KVWorker

    # the kernels load while this worker joins (that mostly waits for the other nodes)
    warm = threading.Thread(target=kernels.warm_up, daemon=True)
    warm.start()
    kv = KVWorker(group=args.group)
    warm.join()
    logs.setup_logging(kv.cfg.log_level or "WARNING", None)
    logs.set_node("worker", kv.rank)
    try:
        summary = run(kv, args)
    except PServerError as e:
        print(f"worker {kv.rank}: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        kv.close()
    if not summary:
        return 0
    print(report(summary), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    c = summary.get("check")
    return 1 if c and (c["below_true"] or c["share_beyond"] > c["delta"]) else 0


if __name__ == "__main__":
    sys.exit(main())
