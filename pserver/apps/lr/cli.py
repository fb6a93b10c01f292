"""`pserver gen-data | train lr | predict | demo`: the sparse logistic regression job's commands.

pserver/cli.py calls register(subparsers); each command's handler returns an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from ...errors import ConfigError


def node_environment() -> dict[str, str]:
    """Environment for the processes of a local LR cluster: numpy without transparent huge pages
    (numpy's own switch, NUMPY_MADVISE_HUGEPAGE=0) unless the caller's environment sets it. The
    servers' tables and the workers' shards are written once and then used in place; on a virtual
    machine that backs memory lazily, first-touching huge pages costs several times the small
    pages (see data.prefer_small_pages, docs/lr.md)."""
    return {"NUMPY_MADVISE_HUGEPAGE": os.environ.get("NUMPY_MADVISE_HUGEPAGE", "0")}


def register(subparsers) -> None:
    """Add gen-data, train (with its `lr` job), predict and demo to the pserver command."""
    p = subparsers.add_parser("gen-data", help="write synthetic CTR-like data with a known model")
    p.add_argument("out", help="output directory (train.libsvm, test.libsvm, truth.npz, ...)")
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--test-examples", type=int, help="default: 10%% of --examples (min 1000)")
    p.add_argument("--features", type=int, default=1 << 22, help="id space (default 2**22)")
    p.add_argument("--nnz", type=int, default=40, help="feature draws per example")
    p.add_argument("--noise", type=float, default=0.0, help="label flip probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zipf", type=float, default=1.0, help="power-law exponent of id frequency")
    p.add_argument("--density", type=float, default=0.1, help="fraction of ids with weight")
    p.add_argument("--signal", type=float, default=2.0, help="std of the true margins")
    p.add_argument("--vw", action="store_true", help="also write Vowpal Wabbit copies")
    p.set_defaults(fn=cmd_gen_data)

    p = subparsers.add_parser("train", help="train a model on a local or existing cluster")
    jobs = p.add_subparsers(dest="job", required=True)
    lr = jobs.add_parser("lr", help="L1/L2 logistic regression by Delayed Block Proximal "
                                    "Gradient or FTRL-proximal")
    from .worker import add_train_args
    add_train_args(lr)
    lr.add_argument("--servers", type=int, default=2, help="servers of the local cluster")
    lr.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    lr.add_argument("--insecure", action="store_true", help="local cluster without CURVE keys")
    lr.set_defaults(fn=cmd_train_lr)

    p = subparsers.add_parser("predict", help="score examples with a trained model")
    p.add_argument("--model", required=True, help="model directory (from --model-out)")
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--out", help="write one probability per line here (default: stdout)")
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(fn=cmd_predict)

    p = subparsers.add_parser("demo", help="generate a small data set and train on 2 servers "
                                           "x 2 workers")
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--dir", help="keep the data and model here (default: a temporary dir)")
    p.set_defaults(fn=cmd_demo)


def cmd_gen_data(args: argparse.Namespace) -> int:
    from .gen import generate

    meta = generate(args.out, args.examples, features=args.features, nnz=args.nnz,
                    noise=args.noise, seed=args.seed, test_examples=args.test_examples,
                    zipf=args.zipf, density=args.density, signal=args.signal, vw=args.vw)
    print(f"wrote {meta['examples']:,} training and {meta['test_examples']:,} held-out "
          f"examples to {args.out} in {meta['seconds']:.1f} s "
          f"({meta['true_nonzeros']:,} true non-zero weights)")
    return 0


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The worker's command line from the parsed train options (cluster options dropped)."""
    argv = ["--data", *args.data, "--format", args.format, "--l1", str(args.l1),
            "--l2", str(args.l2), "--epochs", str(args.epochs), "--blocks", str(args.blocks),
            "--solver", getattr(args, "solver", "dbpg"), "--alpha", str(getattr(args, "alpha", 0.2)),
            "--beta", str(getattr(args, "beta", 1.0)), "--batch", str(getattr(args, "batch", 2048)),
            "--validation", str(getattr(args, "validation", 0.1)),
            "--curvature", args.curvature, "--eta", str(args.eta),
            "--tol", str(args.tol), "--split", args.split, "--int-bins", args.int_bins,
            "--table", args.table]
    if args.test:
        argv += ["--test", *args.test]
    if args.tau is not None:
        argv += ["--tau", str(args.tau)]
    for flag, value in (("--model-out", args.model_out), ("--summary-json", args.summary_json)):
        if value:
            argv += [flag, os.path.abspath(value)]
    argv += ["--skip-bad"] * args.skip_bad + ["--raw-keys"] * args.raw_keys
    argv += ["--kkt", "--kkt-delta", str(args.kkt_delta)] if getattr(args, "kkt", False) else []
    for flag in ("filters", "pull_filters"):
        if getattr(args, flag, ""):
            argv += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    argv += ["--bias"] * args.bias + ["--test-every-pass"] * args.test_every_pass
    for flag in ("delay_damping", "delay_free", "target_objective", "straggler",
                 "clock_log", "on_worker_failure", "group"):  # consistency, fault tolerance, group
        value = getattr(args, flag, None)
        if value is not None and value != "":
            argv += ["--" + flag.replace("_", "-"),
                     os.path.abspath(value) if flag == "clock_log" else str(value)]
    return argv


def cmd_train_lr(args: argparse.Namespace) -> int:
    if args.servers < 1 or args.workers < 1:
        raise ConfigError("train lr needs --servers >= 1 and --workers >= 1")
    from .path import l1_values
    l1_values(args.l1, args.solver)   # a bad --l1 fails here, not in every worker
    for path in args.data + (args.test or []):
        if not os.path.isfile(path):
            raise ConfigError(f"data file {path!r} does not exist")
    if os.environ.get("PSERVER_SCHEDULER"):
        from . import worker  # join the existing cluster as one worker
        return worker.main(_worker_argv(args))
    from ...launch import LocalCluster

    # the workers measure time to quality from here (worker.launch_time)
    env = {**node_environment(), "PSERVER_LR_LAUNCH_TIME": repr(time.time())}
    # the default failure detection: heartbeats have their own thread and socket, the shard
    # parsers release the GIL, and the scheduler's detector adapts to late heartbeats
    with LocalCluster(args.servers, args.workers, insecure=args.insecure, env=env,
                      settings={"group": args.group} if args.group else None) as cluster:
        # a dead worker's shard is taken over (or dropped) by the live ones: they go on
        return cluster.run_workers([sys.executable, "-m", "pserver.apps.lr.worker",
                                    *_worker_argv(args)], stop_on_error=False)


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import read_shard
    from .model import auc, load_model, logloss, predict

    model = load_model(args.model)
    test = read_shard(args.data, model.meta.get("data_format", "libsvm"), skip_bad=args.skip_bad,
                      raw_keys=model.meta.get("raw_keys", False),
                      int_bins=model.meta.get("int_bins", "log"),
                      bias=model.meta.get("bias", False))
    p = predict(model, test)
    text = "\n".join(f"{v:.6f}" for v in p) + ("\n" if p.size else "")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    # libsvm and criteo lines always carry a label, so the metrics are always defined
    print(f"{test.num_examples:,} examples: logloss {logloss(test.y, p):.5f}  "
          f"AUC {auc(test.y, p):.5f}", file=sys.stderr if not args.out else sys.stdout)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .gen import generate

    with tempfile.TemporaryDirectory(prefix="pserver-demo-") as tmp:
        d = args.dir or tmp
        t0 = time.perf_counter()
        meta = generate(d, args.examples, features=1 << 20, nnz=40, noise=0.02, seed=1)
        print(f"demo: generated {args.examples:,} examples x ~40 features over 2**20 ids in "
              f"{time.perf_counter() - t0:.1f} s ({meta['true_nonzeros']:,} true non-zeros); "
              f"training on 2 servers x 2 workers", flush=True)
        ns = argparse.Namespace(
            data=[os.path.join(d, "train.libsvm")], test=[os.path.join(d, "test.libsvm")],
            format="libsvm", l1=4.0, l2=0.0, epochs=5, blocks=64, tau=0, curvature="hessian",
            eta=1.0, tol=0.0, split="bytes", int_bins="log", table="lr_w",
            model_out=os.path.join(d, "model"), summary_json=None, skip_bad=False,
            raw_keys=False, bias=False, servers=2, workers=2, insecure=False,
            test_every_pass=False, solver="dbpg", group=None)
        return cmd_train_lr(ns)
