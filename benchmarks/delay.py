"""Bounded delay: idle time and time to converge of sparse LR against tau (paper: "tau = 0: 50% idle;
tau = 16: 1.7% idle; tau = 8 best trade-off, 1.6x faster than sequential").

DBPG on 2 servers x 4 workers with one straggler, each tau in {0, 1, 2, 4, 8, 16} run until the
objective is within 1% of scikit-learn's optimum; reports idle share, time to objective, passes and
CPU per tau (--simulate: passes under an exact delay, in process). Parameter choices, pinning and
targets: docs/benchmarks.md.

Usage: python benchmarks/delay.py [--examples 400000] [--reps 2] [--out benchmarks/results/delay.json]
       [--plot docs/img/delay.png] [--data-dir DIR] [--simulate] [--merge PART.json ...]"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

from pserver.apps.lr.data import read_shard
from pserver.apps.lr.gen import generate
from pserver.launch import LocalCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def ensure_data(d: str, args: argparse.Namespace) -> str:
    """Generate the training set once per parameter set (kept in the data directory)."""
    want = {"examples": args.examples, "features": args.features, "nnz": args.nnz, "seed": 5}
    meta_path = os.path.join(d, "bench_meta.json")
    train = os.path.join(d, "train.libsvm")
    if os.path.exists(meta_path) and read_json(meta_path) == want and os.path.exists(train):
        return train
    for name in os.listdir(d):  # optima of other data
        if name.startswith("optimum_"):
            os.remove(os.path.join(d, name))
    generate(d, args.examples, features=args.features, nnz=args.nnz, noise=0.02, seed=5,
             test_examples=1000)
    write_json(want, meta_path)
    return train


def optimum(train: str, l1: float, d: str) -> float:
    """F* = min_w sum_i log(1 + exp(-y_i x_i.w)) + l1 ||w||_1 by liblinear (cached)."""
    cache = os.path.join(d, f"optimum_l1_{l1}_v2.json")
    if os.path.exists(cache):
        return read_json(cache)["objective"]
    from sklearn.linear_model import LogisticRegression

    s = read_shard(train)
    # tol 1e-6: agrees with 1e-4 to 1e-7 relative here; 1e-8 made liblinear stop far off
    clf = LogisticRegression(C=1 / l1, l1_ratio=1.0, solver="liblinear", tol=1e-6, max_iter=1000,
                             fit_intercept=False).fit(s.X, s.y)
    w = clf.coef_.ravel()
    f = float(np.logaddexp(0, -s.y * (s.X @ w)).sum() + l1 * np.abs(w).sum())
    write_json({"objective": f, "nnz": int(np.count_nonzero(w))}, cache)
    return f


class CpuSampler(threading.Thread):
    """Samples, every `period` seconds, the machine's busy CPU time (/proc/stat: all but idle and
    iowait) and the CPU time of each child process of this benchmark (the cluster: scheduler,
    servers, workers), so that the CPU use during training can be cut out afterwards. Linux only
    (elsewhere it records nothing)."""

    def __init__(self, period: float = 0.1, pin: bool = False) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._halt = period, [], threading.Event()
        self.roles: dict[int, str] = {}
        self.pin, self.pinned, self.servers_seen = pin, set(), 0
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _machine(self) -> tuple[float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / self.tick, sum(v) / self.tick

    def _children(self) -> dict[int, float]:
        me, out = os.getpid(), {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) != me:
                    continue
                pid = int(name)
                if self.roles.get(pid, "other") == "other":   # "other": maybe not exec'd yet
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                    self.roles[pid] = ("worker" if "apps.lr.worker" in cmd else "server"
                                       if " server" in cmd else "scheduler"
                                       if " scheduler" in cmd else "other")
                if self.pin and pid not in self.pinned and self.roles[pid] != "other":
                    self._pin(pid, self.roles[pid])
                out[pid] = (int(fields[11]) + int(fields[12])) / self.tick
            except (OSError, ValueError, IndexError):
                continue
        return out

    def _pin(self, pid: int, role: str) -> None:
        """Give a process of the cluster a fixed core, round robin: worker RANK on core
        RANK mod cores, server i on core i mod cores, the scheduler on core 0 (with 2 cores: 2
        workers and a server per core). Its threads follow (those started later inherit it)."""
        cores = sorted(os.sched_getaffinity(0))
        if role == "worker":
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            index = int(env.get(b"PSERVER_RANK", b"0"))
        elif role == "server":
            index, self.servers_seen = self.servers_seen, self.servers_seen + 1
        else:
            index = 0
        core = cores[index % len(cores)]
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {core})
        self.pinned.add(pid)

    def run(self) -> None:
        if not os.path.exists("/proc/stat"):
            return
        while not self._halt.is_set():
            self.samples.append((time.time(), *self._machine(), self._children()))
            # pinning is done at first sight: look again soon while processes are starting
            self._halt.wait(0.02 if self.pin and len(self.samples) < 100 else self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def window(self, t0: float, t1: float) -> dict | None:
        """CPU use between unix times t0 and t1 (the nearest samples inside): the machine's busy
        share of all its cores and, per role, the cores the cluster's processes used."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        a, b = inside[0], inside[-1]
        dt = b[0] - a[0]
        roles: dict[str, float] = {}
        for pid, cpu in b[3].items():
            if pid in a[3]:
                role = self.roles.get(pid, "other")
                roles[role] = roles.get(role, 0.0) + (cpu - a[3][pid]) / dt
        return {"seconds": dt, "cores": os.cpu_count() or 1,
                "machine_busy_share": (b[1] - a[1]) / max(b[2] - a[2], 1e-9),
                "job_cores": sum(roles.values()),
                "cores_by_role": {k: round(v, 3) for k, v in sorted(roles.items())}}


def run_one(train: str, tau: int, target: float, args: argparse.Namespace, d: str) -> dict:
    """One training job on a fresh cluster; returns its measurements."""
    out = os.path.join(d, f"summary_tau{tau}.json")
    if os.path.exists(out):
        os.remove(out)
    argv = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", train, "--l1", str(args.l1),
            "--epochs", str(args.max_epochs), "--blocks", str(args.blocks), "--tau", str(tau),
            "--delay-damping", str(args.damping), "--delay-free", str(args.free),
            "--target-objective", repr(target),
            "--straggler", f"{args.workers - 1}:{args.slowdown}:{args.slow_share}",
            "--summary-json", out] + (["--separate-pull"] if args.separate_pull else [])
    load = os.getloadavg()[0]
    sampler = CpuSampler(pin=args.pin)
    sampler.start()
    ru0, w0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(os.devnull, "w") as devnull:
        # the cluster's output is copied to our stdout: dropped unless --verbose
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(devnull)
        with quiet, LocalCluster(args.servers, args.workers, insecure=True, heartbeat_timeout=30.0,
                                 env={"PSERVER_REPLICATION": str(args.replication)}) as cluster:
            rc = cluster.run_workers(argv, timeout=900)
    ru1, w1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    sampler.stop()
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if rc != 0:
        raise SystemExit(f"tau={tau}: training failed with exit code {rc}")
    s = read_json(out)
    # Training ended just before rank 0 wrote the summary (after a few small requests): the
    # middle 80% of the last train_seconds before it is surely training.
    end = os.path.getmtime(out) - 0.2
    span = s["train_seconds"] - 0.2
    cpu_train = sampler.window(end - 0.9 * span, end - 0.1 * span)
    hist = s["history"]
    hit = next((h for h in hist if h["objective"] <= target), None)
    if min(h["objective"] for h in hist) < target / 1.01 * (1 - 1e-6):
        print(f"warning: tau={tau} went below the optimum F*: F* is not the minimum", flush=True)
    t = s["timing"]
    tracked = t["computing_s"] + t["waiting_deps_s"] + t["waiting_net_s"]
    return {
        "tau": tau, "reached": hit is not None,
        "time_to_objective_s": crossing(hist, target),
        "time_to_objective_pass_end_s": hit["elapsed_s"] if hit else None,
        "passes_to_objective": hit["epoch"] + 1 if hit else None,
        "idle_share": (t["waiting_deps_s"] + t["waiting_net_s"]) / tracked,
        "waiting_deps_share": t["waiting_deps_s"] / tracked,
        "waiting_net_share": t["waiting_net_s"] / tracked,
        "computing_share": t["computing_s"] / tracked,
        "seconds_per_pass": hist[-1]["elapsed_s"] / len(hist),
        "train_seconds": s["train_seconds"], "passes": len(hist),
        "final_objective": s["train_objective"], "max_lag": s.get("max_lag"),
        "load_avg_before": load, "objectives": [[h["elapsed_s"], h["objective"]] for h in hist],
        # CPU seconds of every process of the job (start, data loading and training) over the
        # cores' wall seconds: near 1 means the job was bound by this machine's CPUs
        "job_cpu_utilisation": cpu / ((w1 - w0) * (os.cpu_count() or 1)),
        # during training only: whether the cores had time left for asynchrony to use
        "cpu_during_training": cpu_train,
        "idle_share_per_worker": [(w["waiting_deps_s"] + w["waiting_net_s"]) / max(
            w["computing_s"] + w["waiting_deps_s"] + w["waiting_net_s"], 1e-12)
            for w in s["timing_per_worker"]],
    }


def simulate(train: str, tau: int, target: float, args: argparse.Namespace) -> dict:
    """Passes DBPG needs to reach `target` when every gradient is computed with exactly `tau`
    iterations unapplied (the steady state of bounded delay), in this process on the whole data
    set: the convergence cost of the delay, free of the machine's noise. The same block split,
    KKT-filtered keys, curvature, damping and server update as the cluster job (whose passes it
    reproduces: e.g. 5, 6, 6, 10, 18, 33 on the cluster against 4.9, 5.1, 5.9, 9.0, 17.0, 33.3
    passes here for tau 0, 1, 2, 4, 8, 16 with the 2x-straggler setup). The crossing is
    interpolated between passes."""
    from collections import deque

    from pserver.apps.lr import dbpg as D
    from pserver.apps.lr import kernels as K

    shard = _SIM_DATA.get(train) or _SIM_DATA.setdefault(train, read_shard(train))
    X, keys, B, l1 = shard.X, shard.keys, args.blocks, args.l1
    ptr, idx, val = X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data.astype(np.float32)
    active = np.add.reduceat(np.abs(X.data), X.indptr[:-1]) > l1 * (1 + 1e-6)
    bounds = D.block_bounds(B, 1 << int(keys[-1]).bit_length())
    ranges = [shard.columns_in(bounds[b], bounds[b + 1] if b < B - 1 else None) for b in range(B)]
    cols = [c0 + np.flatnonzero(active[c0:c1]) for c0, c1 in ranges]
    scale = K.curvature_scale(ptr, idx, val, np.array([c0 for c0, _ in ranges] + [keys.size]),
                              active, X.shape[0])
    binary = K.all_ones(val)
    y = shard.y.astype(np.float64)
    m, q, w = np.zeros(y.size), np.empty(y.size, np.float32), np.zeros(keys.size)
    K.refresh_qs(m, y, q)   # y * exp(-m), as the worker keeps it
    damp = 1.0 + args.damping * max(0, tau - args.free)
    inflight: deque = deque()   # (iteration, columns, delta) not yet in the margins
    hist: list[dict] = []
    for t in range(args.max_epochs * B):
        while inflight and inflight[0][0] <= t - tau - 1:
            _, c, d = inflight.popleft()
            K.add_block_margins(ptr, idx, val, c, d, binary, m, q)
        c = cols[t % B]
        gu = np.empty((c.size, 2), np.float32)
        K.block_grad_curv_lazy(ptr, idx, val, scale, c, q, True, binary, gu)
        g, u = gu[:, 0].astype(np.float64), gu[:, 1] * damp
        x = u * w[c] - g   # the servers' l1_prox step (their w is current)
        new = np.where(u > 0, np.sign(x) * np.maximum(np.abs(x) - l1, 0) / np.where(u > 0, u, 1),
                       w[c])
        inflight.append((t, c, new - w[c]))
        w[c] = new
        if t % B == B - 1:
            f = float(np.logaddexp(0, -y * (X @ w)).sum() + l1 * np.abs(w).sum())
            hist.append({"elapsed_s": float(len(hist) + 1), "objective": f})
            if f <= target or not f < 1e12:
                break
            K.refresh_qs(m, y, q)   # as the worker does once a pass
    return {"tau": tau, "passes_to_objective": crossing(hist, target),
            "objectives": [h["objective"] for h in hist]}


_SIM_DATA: dict = {}


def crossing(hist: list[dict], target: float) -> float | None:
    """Seconds at which the objective reached `target`, interpolated linearly between the ends
    of the two passes around it (the objective is only known per pass; without interpolation a
    run that just misses the target at a pass end is charged a whole pass)."""
    t0, f0 = 0.0, None
    for h in hist:
        t1, f1 = h["elapsed_s"], h["objective"]
        if f1 <= target:
            if f0 is None or f0 <= f1:
                return t1
            return t0 + (t1 - t0) * (f0 - target) / (f0 - f1)
        t0, f0 = t1, f1
    return None


def busy_of(r: dict) -> str:
    c = r.get("cpu_during_training")
    return f"{100 * c['machine_busy_share']:.0f}%" if c else "?"


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r[key] is not None]
    return statistics.median(vals) if vals else None


def plot(results: dict, path: str, fstar: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = [r["tau"] for r in results["per_tau"]]
    pos = list(range(len(taus)))
    idle = [100 * r["idle_share"] for r in results["per_tau"]]
    tto = [r["time_to_objective_s"] or float("nan") for r in results["per_tau"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(pos, idle, color="#c0504d")
    a.set_xticks(pos, [str(t) for t in taus])
    a.set_xlabel("maximal delay tau (iterations)")
    a.set_ylabel("worker idle time (% of tracked time)")
    a.set_title("idle share (4 workers, one straggler)")
    for x, v in zip(pos, idle):
        a.annotate(f"{v:.1f}%", (x, v), ha="center", va="bottom", fontsize=8)
    b.plot(pos, tto, "o-", color="#4f81bd")
    b.set_xticks(pos, [str(t) for t in taus])
    b.set_xlabel("maximal delay tau (iterations)")
    b.set_ylabel("seconds to objective within 1% of F*")
    b.set_title("time to converge (line), its two factors (dashed)")
    b.set_ylim(bottom=0)
    for x, v in zip(pos, tto):
        if v == v:
            b.annotate(f"{v:.1f}s", (x, v), ha="center", va="bottom", fontsize=8)
    # why: the pipelining gain per pass against the passes the delay costs
    c2 = b.twinx()
    spp = [r["seconds_per_pass"] for r in results["per_tau"]]
    passes = [r["passes_to_objective"] or float("nan") for r in results["per_tau"]]
    c2.plot(pos, passes, "s--", color="#9bbb59", label="passes to objective")
    c2.plot(pos, [10 * v for v in spp], "^:", color="#8064a2", label="seconds per 10 passes")
    floor = [r.get("cpu_floor_seconds_per_pass") for r in results["per_tau"]]
    if all(floor):
        c2.plot(pos, [10 * v for v in floor], "v:", color="#7f7f7f",
                label="CPU floor: job CPU s per 10 passes / free cores")
    c2.set_ylabel("passes  /  seconds per 10 passes")
    c2.set_ylim(bottom=0)
    c2.legend(loc="upper left", fontsize=8)
    c = results["config"]
    fig.suptitle(f"pserver DBPG, sparse LR: {c['examples']:,} examples x {c['nnz']} nnz, "
                 f"{c['blocks']} blocks, {c['workers']} workers + {c['servers']} servers on "
                 f"{c['cpus']} cores" + (", each process on a fixed core" if c.get("pin") else ""),
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=400_000)
    p.add_argument("--features", type=int, default=1 << 17)
    p.add_argument("--nnz", type=int, default=40)
    p.add_argument("--l1", type=float, default=1.0)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--damping", type=float, default=0.3,
                   help="curvature *= 1 + damping * max(0, lag - free), lag = unfinished earlier "
                        "iterations when a gradient is computed")
    p.add_argument("--free", type=int, default=2, help="lag without damping")
    p.add_argument("--taus", default="0,1,2,4,8,16")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slowdown", type=float, default=2.0, help="straggler: computing x this ...")
    p.add_argument("--slow-share", type=float, default=0.25, help="... on this share of iterations")
    p.add_argument("--replication", type=int, default=0,
                   help="replicas per key range (0: this benchmark isolates consistency; "
                        "replication costs are measured by the fault-tolerance benchmark)")
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--reps", type=int, default=2, help="runs per tau (medians are reported)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pserver-delay-bench"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "delay.json"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "delay.png"))
    p.add_argument("--verbose", action="store_true", help="show the cluster's output")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot from a results file")
    p.add_argument("--baseline", metavar="JSON",
                   help="a results file to compare with (e.g. --no-pin): its summary and per-tau "
                        "medians are copied under \"baseline\"")
    p.add_argument("--separate-pull", action="store_true",
                   help="workers send an iteration's push and pull as two requests (default: one "
                        "push_pull); e.g. a sequential baseline for --baseline")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="give every process of the cluster a fixed core, round robin (default; "
                        "--no-pin: let the kernel move them)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="add the runs of earlier result files (a sweep split into parts, each "
                        "short enough for the shared benchmark lock); --reps 0 only merges")
    p.add_argument("--simulate", action="store_true",
                   help="also simulate the delayed iteration in this process (passes to the "
                        "objective per tau, without the cluster; about a minute)")
    args = p.parse_args(argv)
    if args.replot:
        results = read_json(args.replot)
        plot(results, args.plot, results["config"]["optimum_objective"])
        return 0
    os.makedirs(args.data_dir, exist_ok=True)
    taus = [int(t) for t in args.taus.split(",")]

    t0 = time.time()
    train = ensure_data(args.data_dir, args)
    fstar = optimum(train, args.l1, args.data_dir)
    target = fstar * 1.01
    print(f"data ready ({time.time() - t0:.1f} s); F* = {fstar:.2f}, target {target:.2f}",
          flush=True)
    runs: dict[int, list[dict]] = {t: [] for t in taus}
    commands = ["python benchmarks/delay.py " + " ".join(argv if argv is not None else sys.argv[1:])]
    for path in args.merge or []:   # runs of earlier invocations (a sweep split in parts)
        part = read_json(path)
        commands += part.get("commands", [part.get("command")])
        for r in part["per_tau"]:
            runs.setdefault(r["tau"], []).extend(r["runs"])
    simulation = None
    if args.simulate:
        simulation = []
        for tau in taus:
            r = simulate(train, tau, target, args)
            simulation.append(r)
            print(f"simulated tau={tau:2d}: {r['passes_to_objective']} passes", flush=True)
    for rep in range(args.reps):  # interleaved, so a burst of machine load hits every tau alike
        for tau in taus:
            r = run_one(train, tau, target, args, args.data_dir)
            runs[tau].append(r)
            tto = r["time_to_objective_s"]
            print(f"rep {rep} tau={tau:2d}: idle {100 * r['idle_share']:5.1f}% (deps "
                  f"{100 * r['waiting_deps_share']:4.1f}%, net {100 * r['waiting_net_share']:4.1f}%)"
                  f"  to objective: {f'{tto:.2f} s' if tto else 'NOT REACHED'} in "
                  f"{r['passes_to_objective']} passes, {r['seconds_per_pass']:.3f} s/pass, max lag "
                  f"{r['max_lag']}, load {r['load_avg_before']:.1f}, machine busy "
                  f"{busy_of(r)}", flush=True)
    per_tau = [aggregate(tau, rs) for tau, rs in sorted(runs.items()) if rs]
    results = {
        "benchmark": "bounded delay: idle share and time to objective vs tau",
        "commands": commands,
        "config": {**{k: v for k, v in vars(args).items()
                      if k not in ("out", "plot", "verbose", "merge", "baseline")},
                   "cpus": os.cpu_count(), "python": platform.python_version(),
                   "optimum_objective": fstar, "target_objective": target},
        "paper": {"idle_share": {"0": 0.50, "16": 0.017}, "best_tau": 8, "speedup": 1.6},
        "summary": summarise(per_tau), "per_tau": per_tau,
        "simulation": simulation, "seconds": time.time() - t0,
    }
    if args.baseline:
        base = read_json(args.baseline)
        results["baseline"] = {
            "file": args.baseline, "commands": base.get("commands", [base.get("command")]),
            "pin": base["config"].get("pin", False), "summary": base["summary"],
            "per_tau": [{k: v for k, v in r.items() if k != "runs"} for r in base["per_tau"]]}
        # the target compares the best tau with the faster of the two sequential runs
        seq = [r["time_to_objective_s"] for r in per_tau + base["per_tau"]
               if r["tau"] == 0 and r["time_to_objective_s"] is not None]
        best = [r["time_to_objective_s"] for r in per_tau if r["time_to_objective_s"] is not None]
        if seq and best and base["config"].get("separate_pull") != args.separate_pull:
            sm = results["summary"]
            sm["speedup_best_vs_faster_sequential"] = min(seq) / min(best)
            sm["targets"]["best_tau_at_least_1.3x_faster"] = sm["speedup_best_vs_faster_sequential"] >= 1.3
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(results, args.out)
    if args.plot and per_tau:
        plot(results, args.plot, fstar)
    print(json.dumps(results["summary"], indent=2))
    print(f"wrote {args.out} and {args.plot} in {time.time() - t0:.0f} s")
    return 0


def free_cores(c: dict) -> float:
    """Cores the job could have used: its own and the idle ones (not other processes')."""
    return c.get("cores", os.cpu_count() or 1) * (1 - c["machine_busy_share"]) + c["job_cores"]


def aggregate(tau: int, rs: list[dict]) -> dict:
    """Medians over the runs of one tau (every run is kept under "runs")."""
    pairs = [(r["cpu_during_training"], r) for r in rs if r.get("cpu_during_training")]
    cpu = [c for c, _ in pairs]
    return {"tau": tau, "idle_share": median_of(rs, "idle_share"),
            "waiting_deps_share": median_of(rs, "waiting_deps_share"),
            "waiting_net_share": median_of(rs, "waiting_net_share"),
            "time_to_objective_s": median_of(rs, "time_to_objective_s"),
            "time_to_objective_pass_end_s": median_of(rs, "time_to_objective_pass_end_s"),
            "passes_to_objective": median_of(rs, "passes_to_objective"),
            "seconds_per_pass": median_of(rs, "seconds_per_pass"),
            "job_cpu_utilisation": median_of(rs, "job_cpu_utilisation"),
            # during training: the machine's busy share of its cores, the cores our job used
            # and so the CPU seconds the job spent per pass
            "machine_busy_share_training": statistics.median(
                [c["machine_busy_share"] for c in cpu]) if cpu else None,
            "job_cores_training": statistics.median([c["job_cores"] for c in cpu]) if cpu else None,
            "job_cpu_seconds_per_pass": statistics.median(
                [c["job_cores"] * r["seconds_per_pass"] for c, r in pairs]) if cpu else None,
            # those CPU seconds spread over every core the job could have had (all but what
            # other processes of the machine used): the least time a pass could take
            "cpu_floor_seconds_per_pass": statistics.median(
                [c["job_cores"] * r["seconds_per_pass"] / free_cores(c) for c, r in pairs])
            if cpu else None,
            "reached_all": all(r["reached"] for r in rs), "runs": rs}


def summarise(per_tau: list[dict]) -> dict:
    """The issue's targets and the figures that explain them."""
    by = {r["tau"]: r for r in per_tau}
    seq = by.get(0, {}).get("time_to_objective_s")
    reached = [r for r in per_tau if r["time_to_objective_s"] is not None]
    best = min(reached, key=lambda r: r["time_to_objective_s"]) if reached else None
    idle_ratio = by[8]["idle_share"] / by[0]["idle_share"] if 0 in by and 8 in by else None
    floor = [r["cpu_floor_seconds_per_pass"] for r in per_tau if r.get("cpu_floor_seconds_per_pass")]
    summary = {
        "best_tau": best["tau"] if best else None,
        "speedup_best_vs_sequential": seq / best["time_to_objective_s"] if best and seq else None,
        "idle_tau8_over_tau0": idle_ratio,
        # the pipelining gain per pass, before the delay's cost in extra passes
        "seconds_per_pass_tau0_over_tau8": (by[0]["seconds_per_pass"] / by[8]["seconds_per_pass"]
                                            if 0 in by and 8 in by else None),
        # the most any tau could gain per pass on this machine: tau = 0's seconds per pass over
        # the least CPU floor of a pass (no idle core, no extra pass). Asynchrony only fills
        # idle cores; it cannot beat this.
        "cpu_bound_speedup_ceiling": (by[0]["seconds_per_pass"] / min(floor)
                                      if 0 in by and floor else None),
        "every_run_reached_objective": all(r["reached_all"] for r in per_tau),
    }
    summary["targets"] = {
        "idle_tau8_at_most_a_fifth_of_tau0": idle_ratio is not None and idle_ratio <= 0.2,
        "best_tau_at_least_1.3x_faster": (summary["speedup_best_vs_sequential"] or 0) >= 1.3,
        "every_run_reaches_objective": summary["every_run_reached_objective"],
    }
    return summary

if __name__ == "__main__":
    sys.exit(main())
