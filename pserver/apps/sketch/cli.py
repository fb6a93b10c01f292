"""`pserver sketch count | query`: the CountMin sketch job's commands.

pserver/cli.py calls register(subparsers); each command's handler returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ...errors import ConfigError

HEARTBEAT_TIMEOUT = 10.0  # seconds
QUERY_GROUP = "sketch-query"  # the read-only group `pserver sketch query` joins


def register(subparsers) -> None:
    """Add `sketch` (with `count` and `query`) to the pserver command."""
    from .worker import add_count_args

    p = subparsers.add_parser("sketch", help="CountMin sketch of a text stream: count, query")
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser("count", help="count the tokens of text files on a local cluster "
                                         "(or, with PSERVER_SCHEDULER set, as one worker of it)")
    add_count_args(c)
    c.add_argument("--servers", type=int, default=2, help="servers of the local cluster")
    c.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    c.add_argument("--insecure", action="store_true", help="local cluster without CURVE keys")
    c.set_defaults(fn=cmd_count)

    q = actions.add_parser("query", help="estimates and heavy hitters of a sketch on a running "
                                         "cluster (PSERVER_SCHEDULER, PSERVER_KEYS), while it "
                                         "is being written")
    q.add_argument("items", nargs="*", help="items to estimate (lower-cased unless --exact)")
    q.add_argument("--name", default="sketch")
    q.add_argument("--top", type=float, metavar="PHI", help="list the items >= PHI * N")
    q.add_argument("--exact", action="store_true", help="do not lower-case the items")
    q.add_argument("--json", action="store_true")
    q.add_argument("--scheduler", help="HOST:PORT (default: PSERVER_SCHEDULER)")
    q.add_argument("--keys", help="cluster keys directory (default: PSERVER_KEYS)")
    q.add_argument("--insecure", action="store_true", help="the cluster runs without keys")
    q.add_argument("--group", default=QUERY_GROUP,
                   help=f"read-only worker group the query joins (default {QUERY_GROUP}): it "
                        "does not count as a writer")
    q.set_defaults(fn=cmd_query)


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = [*map(os.path.abspath, args.files), "--name", args.name, "--eps", str(args.eps),
            "--delta", str(args.delta), "--seed", str(args.seed), "--share", str(args.share),
            "--top", str(args.top), "--repeat", str(args.repeat),
            "--chunk-bytes", str(args.chunk_bytes)]
    for flag in ("width", "depth", "summary_json", "group"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"),
                     os.path.abspath(value) if flag == "summary_json" else str(value)]
    return argv + ["--conservative"] * args.conservative + ["--check"] * args.check


def cmd_count(args: argparse.Namespace) -> int:
    from . import worker

    if args.servers < 1 or args.workers < 1:
        raise ConfigError("sketch count needs --servers >= 1 and --workers >= 1")
    for path in args.files:
        if not os.path.isfile(path):
            raise ConfigError(f"input file {path!r} does not exist")
    worker.shape_of(args)  # a bad shape fails here, before any process starts
    if os.environ.get("PSERVER_SCHEDULER"):
        return worker.main(_worker_argv(args))  # join the existing cluster as one worker
    from ...launch import LocalCluster

    # --check counts every token exactly in Python on rank 0: allow it a loaded machine's pauses
    with LocalCluster(args.servers, args.workers, insecure=args.insecure,
                      heartbeat_timeout=HEARTBEAT_TIMEOUT,
                      settings={"group": args.group} if args.group else None) as cluster:
        return cluster.run_workers([sys.executable, "-m", "pserver.apps.sketch.worker",
                                    *_worker_argv(args)])


def cmd_query(args: argparse.Namespace) -> int:
    from ... import KVWorker
    from .countmin import CountMinSketch

    overrides = {k: v for k, v in (("scheduler", args.scheduler), ("keys", args.keys),
                                   ("insecure", args.insecure or None)) if v}
    if not (overrides.get("scheduler") or os.environ.get("PSERVER_SCHEDULER")):
        raise ConfigError("give the cluster with --scheduler HOST:PORT or "
                          "PSERVER_SCHEDULER")
    # bytes.lower() folds ASCII only, as the tokeniser does
    items = [i.encode("utf-8") if args.exact else i.encode("utf-8").lower() for i in args.items]
    # a read-only group: the query never counts among the writers, and cannot write by mistake
    with KVWorker(group=args.group, read_only=True, **overrides) as kv:
        sketch = CountMinSketch(kv, args.name, read_only=True)
        n = sketch.total()
        out = {"total": n, "bound": sketch.shape.bound(n),
               "estimates": dict(zip(args.items, sketch.estimate(items).tolist(), strict=True))}
        if args.top is not None:
            out["heavy_hitters"] = [[t.decode("utf-8", "replace"), e]
                                    for t, e in sketch.heavy_hitters(args.top)]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"N = {n:,.0f}; {out['bound']}")
    for item, e in out["estimates"].items():
        print(f"{item!r:30} {e:,.0f}")
    if "heavy_hitters" in out:
        print(f"items with estimate >= {args.top:g} * N:")
    for item, e in out.get("heavy_hitters", []):
        print(f"  {item!r:30} {e:,.0f}")
    return 0
