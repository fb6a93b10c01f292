"""One worker of `pserver train lr`: join the cluster, read this worker's shard, run DBPG, and on
rank 0 export the model, score the held-out set and print the summary.

Run as ``python -m pserver.apps.lr.worker ARGS`` with PSERVER_* set (the launcher does that);
ARGS are those of `pserver train lr` (see add_train_args).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from functools import partial

import numpy as np

from ... import logs
from ...errors import ConfigError, PServerError
from ...kv.traffic import format_traffic_summary, traffic_row, traffic_summary
from ...progress import bar
from .data import prefer_small_pages, read_shard
from .dbpg import DBPG, DBPGConfig, PassStats, warm_up_servers
from .ftrl import FTRL, FTRLConfig, declare_ftrl_tables
from .model import auc, logloss, predict, save_model
from .path import L1Path, l1_values
from .takeover import POLICIES, ShardTakeover

log = logging.getLogger(__name__)

# Marks of this worker's start-up phases, reported in the summary so that a benchmark can split
# the time from launching the processes to the first pass: name -> [unix time, CPU user seconds,
# CPU system seconds of the process so far, peak resident memory in MB so far (0: unknown)].
TIMELINE: dict[str, list[float]] = {}


def _mark(name: str) -> None:
    t = os.times()
    try:
        import resource  # Unix only
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KB on Linux
    except ImportError:
        peak = 0.0
    TIMELINE[name] = [time.time(), t.user, t.system, peak]


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of `pserver train lr` (shared by the CLI and this module)."""
    p.add_argument("--data", required=True, nargs="+", help="training file(s)")
    p.add_argument("--format", default="libsvm", choices=("libsvm", "criteo"))
    p.add_argument("--test", nargs="+", help="held-out file(s), scored by rank 0 at the end")
    p.add_argument("--solver", default="dbpg", choices=("dbpg", "ftrl"),
                   help="dbpg: Delayed Block Proximal Gradient (batch, converges to the optimum); "
                        "ftrl: FTRL-proximal over minibatches (online; 1-5 passes)")
    p.add_argument("--alpha", type=float, default=0.2, help="ftrl: learning rate alpha")
    p.add_argument("--beta", type=float, default=1.0, help="ftrl: learning rate beta")
    p.add_argument("--batch", type=int, default=2048,
                   help="ftrl: examples per minibatch (about; the same count on every worker)")
    p.add_argument("--l1", default="1.0",
                   help="L1 penalty (sklearn C = 1/l1); a list such as 30,10,3 or auto: a "
                        "regularisation path (dbpg) keeping the value with the best logloss on "
                        "--validation")
    p.add_argument("--validation", type=float, default=0.1,
                   help="with an --l1 path: the share of each worker's rows held out to choose")
    p.add_argument("--l2", type=float, default=0.0, help="L2 penalty (sklearn C = 1/l2)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data")
    p.add_argument("--blocks", type=int, default=64, help="feature blocks (key ranges)")
    p.add_argument("--tau", type=int, default=None,
                   help="bounded delay: iteration t may start while iterations t-tau..t-1 are "
                        "unfinished (0 = sequential; the default); changeable while running with "
                        "`pserver consistency --app lr --tau N`")
    p.add_argument("--delay-damping", type=float, default=0.2,
                   help="curvature *= 1 + this * max(0, lag - --delay-free), lag = earlier "
                        "iterations a gradient did not see")
    p.add_argument("--delay-free", type=int, default=0, help="lag tolerated without damping")
    p.add_argument("--target-objective", type=float, default=0.0,
                   help="stop after the first pass whose objective is <= this (0 = never)")
    p.add_argument("--straggler", metavar="RANK[:FACTOR[:SHARE]]",
                   help="simulate a straggler: worker RANK computes FACTOR (2) x slower on a "
                        "random SHARE (0.25) of its iterations (benchmarks/delay.py)")
    p.add_argument("--separate-pull", action="store_true",
                   help="send an iteration's push and pull as two requests instead of one "
                        "push_pull (to compare; the result is the same)")
    p.add_argument("--clock-log", metavar="DIR",
                   help="every worker writes DIR/rank<r>.json: its push timestamps and the range "
                        "clocks of every pull it applied (to check the staleness bound)")
    p.add_argument("--curvature", default="hessian", choices=("hessian", "bound"))
    p.add_argument("--eta", type=float, default=1.0, help="step scale (u' = u / eta)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="stop when a pass improves the objective by less than tol (relative)")
    p.add_argument("--model-out", help="directory to write the model to")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed lines")
    p.add_argument("--split", default="bytes", choices=("bytes", "file"),
                   help="shard by byte ranges of all files, or by whole files")
    p.add_argument("--raw-keys", action="store_true",
                   help="libsvm: use the feature index itself as the key (default: hashed)")
    p.add_argument("--int-bins", default="log", choices=("log", "raw"),
                   help="criteo integer columns: log-binned or raw values")
    p.add_argument("--bias", action="store_true",
                   help="add a constant feature (an intercept, regularised like the others)")
    p.add_argument("--table", default="lr_w", help="name of the weight table")
    p.add_argument("--group", help="worker group to join (default: PSERVER_GROUP, else "
                                   "'default'); shards and ranks are the group's")
    p.add_argument("--kkt", action="store_true",
                   help="KKT filter: skip pushing coordinates the L1 step keeps at zero")
    p.add_argument("--kkt-delta", type=float, default=0.0, help="safety margin of --kkt")
    p.add_argument("--filters", default="",
                   help='more push filters of the weight table, e.g. "key_cache,compress"')
    p.add_argument("--pull-filters", default="",
                   help='pull filters of the weight table, e.g. "key_cache,compress"')
    p.add_argument("--summary-json", help="rank 0 (if it died: the lowest live rank) writes the "
                                          "summary (and per-pass history) here")
    p.add_argument("--test-every-pass", action="store_true",
                   help="rank 0 scores the held-out set after every pass (time not counted)")
    p.add_argument("--on-worker-failure", default="takeover", choices=POLICIES,
                   help="a worker dies: the lowest-ranked live worker takes its data shard over "
                        "(default), or the job goes on without it (drop; the summary names it)")


def _progress(s: PassStats, rank_examples: int) -> None:
    if "progressive_logloss" in s.extra:   # ftrl: no objective of a weight vector to report
        print(f"pass {s.epoch + 1:3d}  progressive logloss {s.extra['progressive_logloss']:.5f}  "
              f"{s.examples_per_s:,.0f} examples/s ({rank_examples / s.seconds:,.0f} on this "
              "worker)", flush=True)
        return
    print(f"pass {s.epoch + 1:3d}  objective {s.objective:.6e}  loss {s.loss:.6e}  nnz(w) "
          f"{s.nnz:9d}  {s.examples_per_s:,.0f} examples/s ({rank_examples / s.seconds:,.0f} "
          f"on this worker)  idle {100 * s.wait_seconds / max(s.seconds, 1e-9):.0f}%",
          flush=True)


def _read_opts(args: argparse.Namespace) -> dict:
    return dict(skip_bad=args.skip_bad, raw_keys=args.raw_keys, int_bins=args.int_bins,
                bias=args.bias)


def _reader(args: argparse.Namespace):
    """read(rank, num_shards) -> Shard: shard `rank` of the training data."""
    opts = _read_opts(args)
    return lambda rank, num_shards: read_shard(args.data, args.format, rank, num_shards,
                                               args.split, **opts)


def _read_early(args: argparse.Namespace, rank: int, num_shards: int):
    """Compiled kernels, then - when the environment names this worker's rank and the number of
    workers, as LocalCluster's does - its shard, while the worker joins the cluster."""
    _load_kernels()
    _mark("kernels_loaded")
    if rank < 0 or num_shards < 1:
        return None
    t0 = time.perf_counter()
    shard = _reader(args)(rank, num_shards)
    _mark("read_done")
    return rank, num_shards, shard, time.perf_counter() - t0


def _dbpg(kv, args: argparse.Namespace):
    """(config, warm-up function, algorithm factory) of the DBPG solver; a regularisation path
    (path.py) when --l1 names several values or auto."""
    values = l1_values(args.l1, "dbpg")
    slowdown, share = _straggler(args.straggler, kv.rank)
    cfg = DBPGConfig(l1=values[0] if values else 0.0, l2=args.l2, epochs=args.epochs,
                     blocks=args.blocks, tau=_tau(args), curvature=args.curvature, eta=args.eta,
                     tol=args.tol, table=args.table, kkt=args.kkt, kkt_delta=args.kkt_delta,
                     filters=args.filters, pull_filters=args.pull_filters,
                     delay_damping=args.delay_damping, delay_free=args.delay_free,
                     target=args.target_objective,
                     slowdown=slowdown, slowdown_share=share, push_pull=not args.separate_pull)
    if values is not None and len(values) == 1:
        return cfg, warm_up_servers, DBPG
    return cfg, warm_up_servers, partial(L1Path, values=values, fraction=args.validation)


def _ftrl(kv, args: argparse.Namespace):
    """(config, warm-up function, algorithm factory) of the FTRL-proximal solver."""
    values = l1_values(args.l1, "ftrl")
    cfg = FTRLConfig(alpha=args.alpha, beta=args.beta, l1=values[0], l2=args.l2,
                     epochs=args.epochs, batch=args.batch, tau=_tau(args), table=args.table)
    return cfg, declare_ftrl_tables, FTRL


SOLVERS = {"dbpg": _dbpg, "ftrl": _ftrl}
DEFAULT_TAU = {"dbpg": 0, "ftrl": FTRLConfig.tau}


def _tau(args: argparse.Namespace) -> int:
    return DEFAULT_TAU[args.solver] if args.tau is None else args.tau


def train(kv, args: argparse.Namespace, early=None) -> dict | None:
    """Train as one worker of kv's cluster. Returns the summary dict on rank 0, else None.
    early: (rank, num_shards, shard, seconds) read before joining (used if rank and count hold)."""
    t_start = time.perf_counter()
    _mark("train_start")
    cfg, warm_up, solver = SOLVERS[args.solver](kv, args)
    cfg.check()
    warm = _Background(warm_up, kv, cfg)   # the servers get ready while we read
    # shard r = rank r's byte range among the workers the job started with (dead ones included),
    # so a live worker can read a dead one's shard again (takeover.py)
    num_shards = len(kv.membership.view.group_nodes(kv.group, alive_only=False))
    reader, opts = _reader(args), _read_opts(args)

    def read(rank: int):
        return reader(rank, num_shards)

    if early is not None and early[:2] == (kv.rank, num_shards):
        shard, t_read = early[2], early[3]   # read while joining
    else:
        shard = read(kv.rank)
        t_read = time.perf_counter() - t_start
    log.info("worker %d: %d examples, %d features, %d non-zeros, read in %.2f s", kv.rank,
             shard.num_examples, shard.keys.size, shard.X.nnz, t_read)
    warm.join()
    _mark("tables_ready")
    algo = solver(kv, shard, cfg)
    _mark("setup_done")
    if isinstance(algo, DBPG):   # FTRL's asynchronous table goes on without a dead shard
        algo.takeover = ShardTakeover(kv, read, num_shards, args.on_worker_failure,
                                      algo.counted)
    if args.clock_log and isinstance(algo, DBPG):
        algo.clock_log = {}
    if kv.rank == 0:
        print(f"worker 0: {shard.num_examples:,} examples, {shard.keys.size:,} keys "
              f"({algo.filtered:,} can never leave zero: KKT-filtered), read in {t_read:.2f} s, "
              f"set up in {algo.setup_seconds['total']:.2f} s (key counts "
              f"{algo.setup_seconds['counts']:.2f} s)", flush=True)
    test, t_test = None, time.perf_counter()
    if kv.rank == 0 and args.test:
        test = read_shard(args.test, args.format, **opts)
    t_test = time.perf_counter() - t_test   # not part of training: excluded from the clock
    evals: list[dict] = []
    t_train = time.perf_counter()

    def evaluate(epoch: int) -> None:
        if test is None or not args.test_every_pass or not _reports(kv):
            return
        t0 = time.perf_counter()
        p = 1.0 / (1.0 + np.exp(-(test.X @ kv.pull(test.keys, table=algo.cfg.table))))
        spent = sum(e["eval_seconds"] for e in evals)
        # unix_time_excl: the wall clock at this point minus the scoring and test reading so
        # far, comparable with a clock started outside this process (benchmarks/lr.py)
        unix_excl = time.time() - (time.perf_counter() - t0) - t_test - spent
        evals.append({"epoch": epoch, "logloss": logloss(test.y, p), "auc": auc(test.y, p),
                      "seconds_since_start": t0 - t_start - t_test - spent,
                      "seconds_from_launch": unix_excl - launch_time(),
                      "unix_time_excl": unix_excl, "eval_seconds": time.perf_counter() - t0})

    passes = bar(algo.cfg.epochs, "passes", "pass")

    def on_pass(s: PassStats) -> None:
        passes.update(1)
        if not _reports(kv):
            return
        _mark(f"pass{s.epoch}")
        _progress(s, algo.shard.num_examples)   # grows when it takes a shard over

    with passes:
        history = algo.run(on_pass, evaluate)
    train_seconds = time.perf_counter() - t_train - sum(e["eval_seconds"] for e in evals)
    if args.clock_log:
        os.makedirs(args.clock_log, exist_ok=True)
        with open(os.path.join(args.clock_log, f"rank{kv.rank}.json"), "w") as f:
            json.dump({"node": kv.membership.node_id, "tau": cfg.tau, **algo.clock_log}, f)
    # Totals over workers through the stats table (sync sum): traffic, read and wait time.
    st = kv.stats()
    waited = sum(h.wait_seconds for h in history)
    tm = algo.timing
    row = np.array([[st["bytes_sent"], st["bytes_received"], t_read, waited], traffic_row(st),
                    [tm["computing_s"], tm["waiting_deps_s"], tm["waiting_net_s"], algo.max_lag]])
    base = 1 << 63   # + 1, + 2: sums over workers; + 16 + rank: one worker's time split and lag
    key = np.array([base + 1, base + 2, base + 16 + kv.rank], np.uint64)
    kv.push(key, row, table=args.table + "_stats")
    totals = kv.pull(np.array([base + 1, base + 2] + [
        base + 16 + r for r in range(num_shards)], np.uint64), table=args.table + "_stats")
    sent, received, read_sum, wait_sum = totals[0]
    summary = None
    if _reports(kv):   # rank 0, or the lowest live rank if rank 0 died (the heir of its shard)
        if args.test and test is None:
            test = read_shard(args.test, args.format, **opts)
        keys, w = kv.pull_range(table=algo.cfg.table)   # a path's: the chosen value's table
        summary = {
            "workers": kv.num_workers, "servers": kv.num_servers,
            "examples": history[-1].examples if history else shard.num_examples,
            "skipped_lines_rank0": shard.skipped,
            "kkt_filtered_fraction_rank0": algo.filtered / max(shard.keys.size, 1),
            "train_objective": history[-1].objective if history else float("nan"),
            "nnz": int(np.count_nonzero(w)), "passes": len(history),
            "train_seconds": train_seconds, "setup_seconds_rank0": algo.setup_seconds,
            "read_seconds_mean": read_sum / kv.num_workers,
            "idle_fraction": wait_sum / max(kv.num_workers * train_seconds, 1e-9),
            "bytes_sent": int(sent), "bytes_received": int(received),
            "traffic": traffic_summary(totals[1]),
            "timing": dict(zip(("computing_s", "waiting_deps_s", "waiting_net_s"),
                               totals[2:, :3].sum(axis=0).tolist())),
            "timing_per_worker": [dict(zip(("computing_s", "waiting_deps_s", "waiting_net_s",
                                            "max_lag"), r)) for r in totals[2:].tolist()],
            "max_lag": int(totals[2:, 3].max()), "consistency": algo.timing.get("model"),
            "pass_seconds": pass_seconds(history),
            "history": [{"epoch": h.epoch, "objective": h.objective, "loss": h.loss,
                         "nnz": h.nnz, "examples": h.examples, "seconds": h.seconds,
                         "wait_seconds": h.wait_seconds, "examples_per_s": h.examples_per_s,
                         **{k: h.extra[k] for k in ("elapsed_s", "max_lag", "computing_s",
                                                    "progressive_logloss",
                                                    "waiting_deps_s", "waiting_net_s")
                            if k in h.extra}} for h in history],
            "config": vars(cfg), "test_every_pass": evals, "launch_time": launch_time(),
            "time_to_quality": [{k: e[k] for k in ("epoch", "seconds_from_launch", "logloss",
                                                   "auc")} for e in evals],
            "reported_by": kv.rank, "solver": args.solver, "l1": algo.cfg.l1,
            "l1_path": algo.summary() if isinstance(algo, L1Path) else None,
            "shards": algo.takeover.summary() if algo.takeover else None,
            "timeline": dict(TIMELINE),
        }
        meta = {"data_format": args.format, "raw_keys": args.raw_keys, "int_bins": args.int_bins,
                "bias": args.bias, "l1": algo.cfg.l1, "l2": args.l2, "passes": len(history),
                "train_objective": summary["train_objective"]}
        model = save_model(args.model_out, keys, w, meta) if args.model_out else None
        if test is not None:
            if model is None:
                from .model import Model
                nz = w != 0
                model = Model(keys[nz], w[nz].astype(np.float32))
            p = predict(model, test)
            summary.update(test_examples=test.num_examples, test_logloss=logloss(test.y, p),
                           test_auc=auc(test.y, p))
        summary["total_seconds"] = time.perf_counter() - t_start
        print(format_summary(summary), flush=True)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
    kv.barrier()
    return summary


class _Background(threading.Thread):
    """fn(*args) in a thread; join() re-raises its exception in the caller."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self._fn, self._args, self._error = fn, args, None
        self.result = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except Exception as e:  # noqa: BLE001 - re-raised in the caller by join()
            self._error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._error is not None:
            raise self._error


def launch_time() -> float:
    """Unix time the job was launched: `pserver train lr` sets PSERVER_LR_LAUNCH_TIME before it
    starts the cluster; a worker that joined an existing cluster counts from its own start."""
    text = os.environ.get("PSERVER_LR_LAUNCH_TIME", "")
    try:
        return float(text)
    except ValueError:
        return TIMELINE.get("main", [time.time()])[0]


def _reports(kv) -> bool:
    """Whether this worker prints progress and the summary: the lowest live rank."""
    live = kv.membership.view.group_nodes(kv.group)
    return not live or live[0].rank == kv.rank


def _load_kernels() -> None:
    from . import data, ftrl, kernels
    data.warm_up()
    kernels.warm_up()
    ftrl.warm_up()


def _straggler(spec: str | None, rank: int) -> tuple[float, float]:
    """(slowdown, share) of this worker from --straggler RANK[:FACTOR[:SHARE]]."""
    if not spec:
        return 1.0, 0.0
    parts = spec.split(":")
    try:
        who = int(parts[0])
        factor = float(parts[1]) if len(parts) > 1 else 2.0
        share = float(parts[2]) if len(parts) > 2 else 0.25
    except (ValueError, IndexError):
        raise ConfigError(f"--straggler {spec!r}: use RANK[:FACTOR[:SHARE]], e.g. 3:2:0.25") \
            from None
    return (factor, share) if who == rank else (1.0, 0.0)


def _fit(s: dict) -> str:
    """How well the model fits its training data: FTRL's progressive logloss (it has no single
    weight vector per pass), else the objective."""
    last = s["history"][-1] if s["history"] else {}
    if "progressive_logloss" in last:
        return f"progressive logloss {last['progressive_logloss']:.5f}"
    return f"train objective {s['train_objective']:.6e}"


def pass_seconds(history) -> dict:
    """The slowest and the median pass (seconds), and their ratio: a failure's stall shows here."""
    secs = sorted(h.seconds for h in history)
    if not secs:
        return {}
    median = secs[len(secs) // 2]
    return {"slowest": secs[-1], "median": median, "slowest_over_median": secs[-1] / median
            if median > 0 else float("nan")}


def format_summary(s: dict) -> str:
    """The final report as text lines."""
    lines = [f"trained on {s['examples']:,} examples with {s['workers']} workers x "
             f"{s['servers']} servers: {s['passes']} passes in {s['train_seconds']:.2f} s",
             f"  {_fit(s)}   nnz(w) {s['nnz']:,}   "
             f"workers idle {100 * s['idle_fraction']:.1f}%"]
    lines += _format_shards(s.get("shards"))
    if s.get("pass_seconds"):
        p = s["pass_seconds"]
        lines.append(f"  slowest pass {p['slowest']:.2f} s, median pass {p['median']:.2f} s")
    if s.get("time_to_quality"):
        lines.append("  held-out logloss after each pass (seconds from launch): " + ", ".join(
            f"{q['epoch'] + 1}: {q['logloss']:.5f} ({q['seconds_from_launch']:.1f} s)"
            for q in s["time_to_quality"]))
    if "test_logloss" in s:
        lines.append(f"  held-out ({s['test_examples']:,} examples): logloss "
                     f"{s['test_logloss']:.5f}   AUC {s['test_auc']:.5f}")
    lines.append(f"  traffic of all workers: sent {s['bytes_sent'] / 1e6:,.1f} MB, received "
                 f"{s['bytes_received'] / 1e6:,.1f} MB; total time {s['total_seconds']:.2f} s")
    if "traffic" in s:
        lines.append(format_traffic_summary(s["traffic"]))
    return "\n".join(lines)


def _format_shards(sh: dict | None) -> list[str]:
    """Summary lines on worker failures (none when every worker lived)."""
    if not sh or not sh["dead_workers"]:
        return []
    lines = [f"  shard {t['shard']} (its worker died): taken over by worker {t['by']} from "
             f"iteration {t['iteration']} ({t['examples']:,} examples)" for t in sh["taken_over"]]
    if sh["dropped"]:
        lines.append(f"  shard(s) {', '.join(map(str, sh['dropped']))} DROPPED (worker died; "
                     f"--on-worker-failure {sh['policy']}): the objective covers the other shards")
    return lines


def main(argv: list[str] | None = None) -> int:
    _mark("main")
    prefer_small_pages()
    import pserver

    p = argparse.ArgumentParser(prog="python -m pserver.apps.lr.worker")
    add_train_args(p)
    args = p.parse_args(argv)
    # compiled kernels load, and the shard is read, while the worker joins the cluster (that
    # mostly waits for the other nodes to start)
    env = os.environ
    early = _Background(_read_early, args, int(env.get("PSERVER_RANK", "-1") or -1),
                        int(env.get("PSERVER_NUM_WORKERS", "0") or 0))
    kv = pserver.KVWorker(group=args.group)
    _mark("joined")
    early.join()
    logs.setup_logging(kv.cfg.log_level or "WARNING", None)
    logs.set_node("worker", kv.rank)
    try:
        train(kv, args, early.result)
    except PServerError as e:
        print(f"worker {kv.rank}: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        kv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
