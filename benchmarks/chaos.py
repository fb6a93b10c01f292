"""Chaos soak: an exact-count job and the LR job run while a fault schedule plays out - a server
SIGKILLed and replaced, a server SIGSTOPped past the heartbeat timeout then resumed (and replaced),
a worker SIGKILLed and replaced, the scheduler SIGKILLed and restarted with --recover. Records every
fault, its recovery time and failed requests, and the final checks: every key of the counting job
within [acknowledged, acknowledged + ambiguous] pushes (ambiguous: in flight at a killed worker),
and the LR job's objective against an undisturbed run. Method: docs/fault-tolerance.md, "Chaos".

Usage: python benchmarks/chaos.py [--duration 600] [--every 12] [--servers 3] [--workers 3]
           [--lr-examples 300000] [--lr-every 3] [--seed 1] [--out benchmarks/results/chaos.json]
       (the coordinator's soak: the defaults; a quick check: --duration 60 --every 8)"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pserver
from pserver.errors import PServerError
from pserver.launch import LocalCluster
from pserver.membership.client import scheduler_request

HB_TIMEOUT = 0.6
FAULTS = ("server_kill", "server_stop", "worker_kill", "scheduler_kill")
RECORD = 96   # bytes of a worker's progress record


# -- the counting worker (run as `chaos.py --count-worker DIR NKEYS WINDOW`) -------------------------
def count_worker(out_dir: str, nkeys: int, window: int) -> int:
    """Push +1 to NKEYS keys until DIR/stop exists, WINDOW pushes in flight; after every push and
    every acknowledgement rewrite DIR/w<pid>: pushes sent, acknowledged, failed, time."""
    kv = pserver.KVWorker()
    keys = np.arange(nkeys, dtype=np.uint64) * np.uint64(2654435761)
    ones = np.ones(nkeys, np.float32)
    fd = os.open(f"{out_dir}/w{os.getpid()}", os.O_WRONLY | os.O_CREAT, 0o644)
    sent = acked = failed = 0

    def record() -> None:
        os.pwrite(fd, f"{sent} {acked} {failed} {time.time():.3f}".ljust(RECORD).encode(), 0)

    stop = Path(out_dir, "stop")
    inflight: collections.deque = collections.deque()
    while True:
        if sent % 20 == 0 and stop.exists():
            break
        sent += 1
        record()
        inflight.append(kv.push(keys, ones))
        while len(inflight) >= window:
            try:
                kv.wait(inflight.popleft(), timeout=60)
                acked += 1
            except PServerError as e:   # accounted for: it may or may not have been applied
                failed += 1
                print(f"count worker {kv.rank}: a push failed: {e}", file=sys.stderr)
            record()
    while inflight:
        try:
            kv.wait(inflight.popleft(), timeout=60)
            acked += 1
        except PServerError:
            failed += 1
        record()
    kv.close()
    return 0


def _records(d: Path) -> dict[int, tuple[int, int, int, float]]:
    out = {}
    for f in d.glob("w*"):
        try:
            sent, acked, failed, t = f.read_text().split()
            out[int(f.name[1:])] = (int(sent), int(acked), int(failed), float(t))
        except (ValueError, OSError):
            continue
    return out


# -- faults -----------------------------------------------------------------------------------
class Chaos:
    """Plays faults on a LocalCluster and measures recovery from the workers' progress records."""

    def __init__(self, cluster: LocalCluster, rng: random.Random, work: Path | None,
                 spawn_worker) -> None:
        self.cluster, self.rng, self.work, self.spawn_worker = cluster, rng, work, spawn_worker
        self.killed_workers: set[int] = set()
        self.events: list[dict] = []

    def _servers(self) -> list[str]:
        return [n for n, p in self.cluster.procs.items()
                if n.startswith("server") and p.poll() is None]

    def _live_workers(self) -> dict[int, object]:
        return {p.pid: p for n, p in self.cluster.procs.items()
                if n.startswith("worker") and p.poll() is None}

    def _progress_after(self, t0: float, deadline: float) -> float | None:
        """Seconds from t0 until every live counting worker had a push sent after t0
        acknowledged (None: not within the deadline, or no progress records)."""
        if self.work is None:
            return None
        base = {pid: r[0] for pid, r in _records(self.work).items()}
        while time.monotonic() < deadline:
            live = self._live_workers()
            recs = _records(self.work)
            if live and all(pid in recs and recs[pid][1] > base.get(pid, 0) for pid in live):
                return time.monotonic() - t0
            time.sleep(0.02)
        return None

    def play(self, kind: str) -> dict:
        ev = {"fault": kind, "at": time.time()}
        getattr(self, "_" + kind)(ev)
        if self.work is None:  # the LR job records no pushes: its stall shows in its pass times
            ev.pop("recovery_s", None)
        self.events.append(ev)
        print(f"chaos: {json.dumps(ev)}", flush=True)
        return ev

    def _server_kill(self, ev: dict) -> None:
        victim = self.rng.choice(self._servers())
        t0 = time.monotonic()
        self.cluster.kill(victim, signal.SIGKILL)
        ev.update(victim=victim, recovery_s=self._progress_after(t0, t0 + 30))
        ev["replacement"] = self.cluster.add_server()

    def _server_stop(self, ev: dict) -> None:
        victim = self.rng.choice(self._servers())
        stall = 3 * HB_TIMEOUT
        t0 = time.monotonic()
        self.cluster.kill(victim, signal.SIGSTOP)
        rec = self._progress_after(t0, t0 + 30)
        time.sleep(max(0.0, stall - (time.monotonic() - t0)))
        self.cluster.kill(victim, signal.SIGCONT)
        try:  # declared dead meanwhile: it must exit rather than serve stale ranges
            code = self.cluster.procs[victim].wait(15)
        except Exception:
            code = None
        ev.update(victim=victim, stall_s=stall, recovery_s=rec, resumed_server_exit_code=code)
        ev["replacement"] = self.cluster.add_server()

    def _worker_kill(self, ev: dict) -> None:
        live = self._live_workers()
        if len(live) < 2:
            ev["skipped"] = "fewer than 2 live workers"
            return
        pid = self.rng.choice(sorted(live))
        live[pid].send_signal(signal.SIGKILL)
        self.killed_workers.add(pid)
        ev.update(victim_pid=pid)
        if self.spawn_worker is not None:
            ev["replacement_pid"] = self.spawn_worker().pid

    def _scheduler_kill(self, ev: dict) -> None:
        before = _records(self.work) if self.work else {}
        self.cluster.kill("scheduler", signal.SIGKILL)
        self.cluster.procs["scheduler"].wait(10)
        t0 = time.monotonic()
        time.sleep(1.0)   # down for a second: the data plane must go on
        after = _records(self.work) if self.work else {}
        ev["acked_while_down"] = sum(r[1] for r in after.values()) - sum(
            r[1] for r in before.values())
        self.cluster.restart_scheduler()
        while time.monotonic() - t0 < 60:
            try:
                s = scheduler_request(self.cluster.config(), "status", role="worker", timeout=1.0)
                if s.meta.get("scheduler", {}).get("started"):
                    break
            except PServerError:
                pass
            time.sleep(0.05)
        ev["recovery_s"] = time.monotonic() - t0 - 1.0   # from the restart to a rebuilt view


# -- the two jobs -------------------------------------------------------------------------------
def count_job(args: argparse.Namespace, rng: random.Random) -> dict:
    with tempfile.TemporaryDirectory(prefix="chaos-count-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, os.path.abspath(__file__), "--count-worker", tmp,
               str(args.keys), str(args.window)]
        with LocalCluster(args.servers, args.workers, insecure=True, replication=1,
                          heartbeat_timeout=HB_TIMEOUT, scheduler_args=["--keep-alive"],
                          log_level="WARNING", prefix_output=args.verbose) as cluster:
            for r in range(args.workers):
                cluster.spawn_worker(cmd, r)
            chaos = Chaos(cluster, rng, work, lambda: cluster.spawn_worker(cmd))
            deadline = time.monotonic() + 300
            while not (len(recs := _records(work)) == args.workers
                       and all(r[1] > 0 for r in recs.values())):   # every worker is pushing
                if time.monotonic() > deadline:
                    raise SystemExit("the counting workers did not start within 300 s")
                time.sleep(0.1)
            t_end = time.monotonic() + args.duration
            time.sleep(min(args.every, 5.0))
            while time.monotonic() + args.every < t_end:
                t = time.monotonic()
                chaos.play(rng.choice(args.faults))
                time.sleep(max(0.5, args.every - (time.monotonic() - t)))
            work.joinpath("stop").touch()
            for name, p in list(cluster.procs.items()):
                if name.startswith("worker"):
                    p.wait(120)
            recs = _records(work)
            kv = pserver.KVWorker(cluster.config())
            try:
                keys = np.arange(args.keys, dtype=np.uint64) * np.uint64(2654435761)
                vals = kv.pull(keys)
            finally:
                kv.close()
        killed = {pid: recs[pid] for pid in chaos.killed_workers if pid in recs}
        acked = sum(r[1] for r in recs.values())
        ambiguous = sum(r[0] - r[1] for r in killed.values()) + sum(r[2] for r in recs.values())
        lo, hi = float(vals.min()), float(vals.max())
        return {"events": chaos.events, "acknowledged_pushes": acked,
                "failed_requests": sum(r[2] for r in recs.values()),
                "in_flight_at_killed_workers": sum(r[0] - r[1] for r in killed.values()),
                "ambiguous_pushes": ambiguous, "key_min": lo, "key_max": hi,
                "no_lost_update": lo >= acked, "no_doubled_update": hi <= acked + ambiguous}


def lr_job(args: argparse.Namespace, rng: random.Random, data: str, faults: bool) -> dict:
    out = Path(data) / f"lr_{'chaos' if faults else 'calm'}.json"
    cmd = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", f"{data}/train.libsvm",
           "--l1", "1", "--epochs", str(args.lr_epochs), "--blocks", "8",
           "--summary-json", str(out)]
    events: list[dict] = []
    with LocalCluster(args.servers, 2, insecure=True, replication=1, heartbeat_timeout=HB_TIMEOUT,
                      log_level="WARNING", prefix_output=args.verbose) as cluster:
        workers = [cluster.spawn_worker(cmd, r) for r in range(2)]
        chaos = Chaos(cluster, rng, None, None)
        if faults:
            _wait_started(cluster)
            time.sleep(args.lr_every)
            plan = ["worker_kill", *["server_kill", "server_stop"] * 100]
            for kind in plan:
                if all(w.poll() is not None for w in workers):
                    break
                chaos.play(kind)
                time.sleep(args.lr_every)
        codes = [w.wait(900) for w in workers]
        events = chaos.events
    s = json.loads(out.read_text())
    return {"events": events, "exit_codes": codes, "train_objective": s["train_objective"],
            "passes": s["passes"], "examples": s["examples"], "shards": s.get("shards"),
            "pass_seconds": s.get("pass_seconds")}


def _wait_started(cluster: LocalCluster, timeout: float = 300.0) -> None:
    """Until the cluster started (every expected node registered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = scheduler_request(cluster.config(), "status", role="worker", timeout=1.0).meta
            if s.get("scheduler", {}).get("started"):
                return
        except PServerError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the cluster did not start within {timeout:g} s")


def _summary(events: list[dict]) -> dict:
    out = {}
    for kind in FAULTS:
        rec = [e["recovery_s"] for e in events if e["fault"] == kind and e.get("recovery_s")]
        out[kind] = {"count": sum(1 for e in events if e["fault"] == kind),
                     "recovery_median_s": statistics.median(rec) if rec else None,
                     "recovery_max_s": max(rec) if rec else None,
                     "unrecovered": sum(1 for e in events if e["fault"] == kind
                                        and "recovery_s" in e and e["recovery_s"] is None)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count-worker", nargs=3, metavar=("DIR", "NKEYS", "WINDOW"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of the count job")
    ap.add_argument("--every", type=float, default=12.0, help="seconds between faults")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--lr-examples", type=int, default=300_000)
    ap.add_argument("--lr-epochs", type=int, default=40)
    ap.add_argument("--lr-every", type=float, default=3.0,
                    help="seconds between faults during the LR job (it lasts tens of seconds)")
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help=f"faults the count job draws from (default {','.join(FAULTS)})")
    ap.add_argument("--no-lr", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="show the cluster's output")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chaos.json"))
    args = ap.parse_args()
    if args.count_worker:
        d, n, w = args.count_worker
        return count_worker(d, int(n), int(w))
    args.faults = args.faults.split(",")
    if not set(args.faults) <= set(FAULTS):
        ap.error(f"--faults: choose from {FAULTS}")
    rng = random.Random(args.seed)
    t0 = time.time()
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k != "count_worker"},
              "heartbeat_timeout_s": HB_TIMEOUT}
    result["count_job"] = count_job(args, rng)
    result["count_job"]["by_fault"] = _summary(result["count_job"]["events"])
    if not args.no_lr:
        from pserver.apps.lr.gen import generate
        with tempfile.TemporaryDirectory(prefix="chaos-lr-") as d:
            generate(d, args.lr_examples, features=1 << 16, nnz=30, seed=7, test_examples=1000)
            calm = lr_job(args, rng, d, faults=False)
            wild = lr_job(args, rng, d, faults=True)
        result["lr_job"] = {"calm": calm, "faults": wild, "by_fault": _summary(wild["events"]),
                            "objective_rel_diff": abs(wild["train_objective"]
                                                      - calm["train_objective"])
                            / abs(calm["train_objective"])}
    result["seconds"] = time.time() - t0
    c = result["count_job"]
    result["faults_total"] = len(c["events"]) + len(result.get("lr_job", {}).get("faults", {})
                                                     .get("events", []))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['faults_total']} faults; count job: {c['acknowledged_pushes']} acknowledged, "
          f"keys in [{c['key_min']:.0f}, {c['key_max']:.0f}], ambiguous {c['ambiguous_pushes']}, "
          f"lost: {not c['no_lost_update']}, doubled: {not c['no_doubled_update']}")
    for kind, s in c["by_fault"].items():
        print(f"  {kind}: {s}")
    if "lr_job" in result:
        print(f"LR job: objective {result['lr_job']['faults']['train_objective']:.6e} vs calm "
              f"{result['lr_job']['calm']['train_objective']:.6e} (rel diff "
              f"{result['lr_job']['objective_rel_diff']:.2e})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
