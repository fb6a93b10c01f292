"""Fault tolerance on a real local cluster: recovery after a server is SIGKILLed, throughput while a
server joins, and the cost of replication. Writes JSON (with the command line and machine facts) and
prints a short summary.

1. recovery: 3 servers, k=1, this process as the worker. It keeps one single-key push in flight per
   segment of the key ring (one key per virtual server), SIGKILLs one server, and at once issues one
   fresh push per segment (a probe). A segment's recovery time is the time from the kill to the
   acknowledgement of its probe: the first push issued after the kill to succeed. Segments the victim
   mastered fail over to their replica; segments it replicated stall until their master drops it.
   Each kill is broken down into detection (the scheduler marks the victim dead; polled every 5 ms),
   the worker receiving the new ring (its heartbeat thread), and the resend to the heir (which refuses
   with WrongOwner until it too has the ring). A fresh cluster per kill; the victim rotates.
2. join: 3 servers, k=1, W workers pushing 10k-key pushes; a fourth server joins (two-phase
   migration). Throughput before, while the joiner starts, during the migration and after it.
3. replication cost: 4 servers, W workers, 10k-key pushes; an asynchronous table with k=0, 1, 2 and
   a synchronous one (every worker pushes every round) with k=0, 1, 2 and replicate-after-aggregation
   on and off. Also the servers' CPU seconds per push (from /proc), which does not depend on how many
   cores the machine has.

Usage: python benchmarks/recovery.py [--kills 10] [--seconds 4] [--workers 2] [--repeats 1]
           [--only recovery,join,replication] [--heartbeat-timeout S] [--out benchmarks/results/recovery.json]
Cluster output goes to a log file in a temporary directory (its path is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

import pserver
from pserver.errors import PServerError, RequestTimeoutError
from pserver.launch import LocalCluster
from pserver.transport import Transport
from pserver.wire import Message

TICK = os.sysconf("SC_CLK_TCK")


# -- helpers -------------------------------------------------------------------------------------
def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "pyzmq": zmq.__version__,
            "pserver": pserver.__version__}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def server_cpu(cluster: LocalCluster) -> float:
    return sum(cpu_seconds(p.pid) for n, p in cluster.procs.items() if n.startswith("server "))


def stats(xs) -> dict:
    a = np.asarray(xs, dtype=float)
    a = a[np.isfinite(a)]
    if not len(a):
        return {"n": 0}
    return {"n": len(a), "median": round(float(np.median(a)), 4), "p90": round(float(np.percentile(a, 90)), 4),
            "max": round(float(a.max()), 4), "min": round(float(a.min()), 4)}


class SchedulerProbe:
    """A DEALER to the scheduler for cheap, repeated status requests."""

    def __init__(self, cluster: LocalCluster):
        cfg = cluster.config()
        self.transport = Transport(cfg, "worker" if cluster.insecure else "scheduler")
        self.sock = self.transport.connect_dealer(*cfg.require_scheduler(), "scheduler")
        self.ts = 0

    def status(self, timeout: float = 2.0) -> dict:
        self.ts += 1
        self.transport.send(self.sock, Message("status", self.ts))
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            _, msg, _ = self.transport.decode(self.sock.recv_multipart(copy=False), routed=False)
            if msg.ts == self.ts:
                return msg.meta
        raise PServerError("the scheduler did not answer a status request")

    def close(self) -> None:
        self.transport.close()


@contextlib.contextmanager
def child_output(path: Path):
    """Send the output of cluster processes started inside the block to ``path`` (LocalCluster's
    prefixer threads write to whatever sys.stdout is when a process is spawned)."""
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield


# -- 1. recovery after SIGKILL ---------------------------------------------------------------------
class ProbeWorker(pserver.KVWorker):
    """A KVWorker that, once ``replies`` is a list, logs every reply: (time, server, op, error kind,
    the server's ring version) - to see heirs refusing keys until they have the new ring."""

    replies: list | None = None

    def _on_reply(self, sid: int, frames: list) -> None:
        if self.replies is not None:
            with contextlib.suppress(PServerError):
                _, msg, _ = self.transport.decode(frames, routed=False)
                self.replies.append((time.monotonic(), sid, msg.op, msg.meta.get("kind"), msg.meta.get("rv")))
        super()._on_reply(sid, frames)


def segment_keys(ring) -> np.ndarray:
    """One key in each segment of the ring (index i = the segment ending at virtual server i)."""
    blocks = np.arange(1 << 20, dtype=np.uint64)
    vnode = ring.vnode_of(blocks << np.uint64(ring.block_bits))
    found, first = np.unique(vnode, return_index=True)
    if len(found) != len(ring.positions):
        raise RuntimeError("a ring segment holds none of the first 2**20 blocks")
    return blocks[first] << np.uint64(ring.block_bits)


class Prober:
    """Keeps one single-key push in flight per segment (the background load) and sends probes."""

    def __init__(self, kv: pserver.KVWorker, keys: np.ndarray, interval: float):
        self.kv, self.keys, self.interval = kv, keys, interval
        self.one = np.ones(1, np.float32)
        self.busy: set[int] = set()                 # segments with a background push in flight
        self.pending: dict[int, list] = {}          # ts -> [segment, is_probe, ts]
        self.probe_sent = np.full(len(keys), np.nan)
        self.probe_acked = np.full(len(keys), np.nan)
        self.background_acks = 0

    def _issue(self, j: int, probe: bool) -> None:
        rec = [j, probe, 0]
        rec[2] = self.kv.push(self.keys[j:j + 1], self.one, callback=lambda: self._acked(rec))
        self.pending[rec[2]] = rec
        if probe:
            self.probe_sent[j] = time.monotonic()
        else:
            self.busy.add(j)

    def _acked(self, rec: list) -> None:
        j, probe, ts = rec
        self.pending.pop(ts, None)
        if probe:
            self.probe_acked[j] = time.monotonic()
        else:
            self.busy.discard(j)
            self.background_acks += 1

    def probe_all(self) -> None:
        for j in range(len(self.keys)):
            self._issue(j, probe=True)

    def run(self, seconds: float, until=None) -> None:
        """Push for ``seconds`` (or until ``until()`` is true)."""
        end = time.monotonic() + seconds
        next_tick = 0.0
        while (now := time.monotonic()) < end and not (until and until()):
            if now >= next_tick:
                for j in range(len(self.keys)):
                    if j not in self.busy:
                        self._issue(j, probe=False)
                next_tick = now + self.interval
            if self.pending:
                with contextlib.suppress(RequestTimeoutError):  # wait() drives replies and resends
                    self.kv.wait(min(self.pending), timeout=0.005)
            else:
                time.sleep(max(0.0, min(next_tick, end) - time.monotonic()))


def watch_scheduler(probe: SchedulerProbe, victim: int, ring_v0: int, out: dict, stop: threading.Event) -> None:
    """Record when the scheduler marks the victim dead and publishes a new ring (5 ms polling)."""
    while not stop.is_set():
        try:
            st = probe.status()
        except PServerError:
            continue
        now = time.monotonic()
        node = next(n for n in st["nodes"] if n["id"] == victim)
        if not node["alive"] and "dead" not in out:
            out["dead"] = now
        if st["ring"]["version"] > ring_v0 and "ring" not in out:
            out["ring"] = now
        if "dead" in out and "ring" in out:
            return
        time.sleep(0.005)


def recovery_once(i: int, args, log: Path) -> dict:
    victim_rank = i % args.servers
    name = f"server {victim_rank}"
    with child_output(log), LocalCluster(args.servers, 1, insecure=True, replication=1,
                                         heartbeat_timeout=args.heartbeat_timeout) as cluster:
        kv = ProbeWorker(cluster.config(0))
        probe = SchedulerProbe(cluster)
        try:
            view = kv.membership.view
            ring = view.ring
            victim = next(n.id for n in view.role_nodes("server") if n.rank == victim_rank)
            assert next(n.pid for n in view.role_nodes("server") if n.id == victim) == cluster.procs[name].pid
            if args.preload:
                kv.wait(kv.push(np.arange(args.preload, dtype=np.uint64), np.ones(args.preload, np.float32)))
            keys = segment_keys(ring)
            mastered = ring.owners == victim
            replicated = (ring.replica_table(1)[:, 0] == victim) & ~mastered
            prober = Prober(kv, keys, args.probe_interval)
            prober.run(args.warmup + random.uniform(0, 0.1))
            views: dict[str, float] = {}
            kv.membership.on_view_change(
                lambda v: views.setdefault("worker", time.monotonic()) if v.ring.version > ring.version else None)
            st = probe.status()
            hb_age = next(n["last_heartbeat"] for n in st["nodes"] if n["id"] == victim)
            sched: dict[str, float] = {}
            stop = threading.Event()
            watcher = threading.Thread(target=watch_scheduler, args=(probe, victim, ring.version, sched, stop))
            kv.replies = []
            t_kill = time.monotonic()
            cluster.kill(name)
            watcher.start()
            prober.probe_all()
            prober.run(args.recovery_timeout, until=lambda: np.isfinite(prober.probe_acked).all())
            stop.set()
            watcher.join()
            replies = kv.replies
            kv.replies = None
        finally:
            probe.close()
            kv.close()
    rec = prober.probe_acked - t_kill
    heirs = ring.replica_table(1)[mastered, 0]
    refusals = [r for r in replies if r[3] == "WrongOwnerError"]
    first_heir_ack = [min((r[0] for r in replies if r[1] == h and r[2] == "ack"), default=np.nan) - t_kill
                      for h in sorted(set(heirs.tolist()))]
    return {
        "kill": i, "victim_rank": victim_rank, "victim_id": victim,
        "victim_heartbeat_age_at_kill_s": hb_age,
        "scheduler_marked_dead_s": round(sched.get("dead", np.nan) - t_kill, 4),
        "scheduler_new_ring_s": round(sched.get("ring", np.nan) - t_kill, 4),
        "worker_got_ring_s": round(views.get("worker", np.nan) - t_kill, 4),
        "heirs_first_ack_s": [round(x, 4) for x in first_heir_ack],
        "wrong_owner_refusals": len(refusals),
        "last_refusal_s": round(max((r[0] for r in refusals), default=t_kill) - t_kill, 4) if refusals else None,
        "probe_issue_lag_s": round(float(np.nanmax(prober.probe_sent)) - t_kill, 4),
        "mastered_segments": int(mastered.sum()), "replicated_segments": int(replicated.sum()),
        "recovery_mastered_s": [round(x, 4) for x in rec[mastered]],
        "recovery_replicated_s": [round(x, 4) for x in rec[replicated]],
        "recovery_unaffected_s": stats(rec[~mastered & ~replicated]),
        "unrecovered_segments": int((~np.isfinite(rec)).sum()),
        "background_acks": prober.background_acks,
    }


def run_recovery(args, log: Path) -> dict:
    kills = []
    for i in range(args.kills):
        r = recovery_once(i, args, log)
        kills.append(r)
        print(f"  kill {i}: victim rank {r['victim_rank']}, dead after {r['scheduler_marked_dead_s']:.3f} s, "
              f"worker ring {r['worker_got_ring_s']:.3f} s, mastered ranges recovered median "
              f"{np.median(r['recovery_mastered_s']):.3f} max {max(r['recovery_mastered_s']):.3f} s",
              flush=True)
    every = [x for r in kills for x in r["recovery_mastered_s"]]
    return {
        "servers": args.servers, "replication": 1, "heartbeat_interval_s": 0.1,
        "heartbeat_timeout_s": args.heartbeat_timeout or 0.6, "preloaded_keys": args.preload,
        "probe_interval_s": args.probe_interval,
        "mastered_ranges_all_kills_s": stats(every),
        "mastered_ranges_worst_per_kill_s": stats([max(r["recovery_mastered_s"]) for r in kills]),
        "replicated_ranges_all_kills_s": stats([x for r in kills for x in r["recovery_replicated_s"]]),
        "breakdown_median_s": {
            key: round(float(np.nanmedian([r[key] for r in kills])), 4)
            for key in ("victim_heartbeat_age_at_kill_s", "scheduler_marked_dead_s", "scheduler_new_ring_s",
                        "worker_got_ring_s")},
        "kills": kills,
    }


# -- 2 and 3: throughput with worker processes ---------------------------------------------------
def worker_main(argv: list[str]) -> None:
    """A throughput worker (run by the cluster): preload its slice, then push PUSH_KEYS random keys of
    the table with WINDOW pushes in flight until STOP_FILE exists; save the acknowledgement times."""
    out, mode, nkeys, push_keys, window = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    kv = pserver.KVWorker()
    kv.declare_table("bench", sync=mode == "sync")
    mine = np.array_split(np.arange(nkeys, dtype=np.uint64), kv.num_workers)[kv.rank]
    kv.wait(kv.push(mine, np.ones(len(mine), np.float32), table="bench"))
    rng = np.random.default_rng(kv.rank)
    subsets = [np.sort(rng.choice(nkeys, push_keys, replace=False)).astype(np.uint64) for _ in range(8)]
    vals = np.full(push_keys, 0.5, np.float32)
    kv.barrier("start")
    Path(out, f"ready{kv.rank}").touch()
    stop = Path(out, "stop")
    acks: list[float] = []
    flight: list[int] = []
    i = 0
    while not stop.exists():
        flight.append(kv.push(subsets[i % 8], vals, table="bench"))
        i += 1
        if len(flight) >= window:
            kv.wait(flight.pop(0))
            acks.append(time.monotonic())
    for ts in flight:
        kv.wait(ts)
        acks.append(time.monotonic())
    np.save(Path(out, f"acks{kv.rank}.npy"), np.asarray(acks))
    kv.close()


def _rate(acks: np.ndarray, lo: float, hi: float) -> float:
    return float(((acks >= lo) & (acks < hi)).sum() / (hi - lo)) if hi > lo else float("nan")


def throughput_run(args, log: Path, servers: int, k: int, sync: bool, after: bool = True,
                   join: bool = False) -> dict:
    """One fresh cluster; returns pushes/s (all workers) over the measured window, and for ``join``
    the rates of each phase around a server join."""
    tmp = tempfile.mkdtemp(prefix="pserver-recovery-")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tmp, "sync" if sync else "async",
           str(args.table_keys), str(args.push_keys), str(args.window)]
    w = args.workers
    with child_output(log), LocalCluster(servers, w, insecure=True, replication=k,
                                         replicate_after_aggregation=after) as cluster:
        procs = [cluster.spawn_worker(cmd, rank) for rank in range(w)]
        deadline = time.monotonic() + 180
        while not all(Path(tmp, f"ready{r}").exists() for r in range(w)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"throughput workers did not start (see {log})")
            time.sleep(0.02)
        t0 = time.monotonic() + args.warmup
        time.sleep(args.warmup)
        cpu0, load0 = server_cpu(cluster), load()
        phases: dict[str, float] = {}
        if join:
            probe = SchedulerProbe(cluster)
            time.sleep(args.seconds)
            phases["join"] = time.monotonic()
            with child_output(log):
                cluster.add_server()
            while "commit" not in phases and time.monotonic() < phases["join"] + 120:
                st = probe.status()
                if "registered" not in phases and len([n for n in st["nodes"] if n["role"] == "server"]) > servers:
                    phases["registered"] = time.monotonic()
                if st["ring"]["version"] > 1:
                    phases["commit"] = time.monotonic()
                time.sleep(0.05)
            probe.close()
            time.sleep(args.seconds)
        else:
            time.sleep(args.seconds)
        t1 = time.monotonic()
        cpu1, load1 = server_cpu(cluster), load()
        Path(tmp, "stop").touch()
        for p in procs:
            if p.wait(120) != 0:
                raise RuntimeError(f"a throughput worker failed (see {log})")
    acks = np.sort(np.concatenate([np.load(Path(tmp, f"acks{r}.npy")) for r in range(w)]))
    pushes = int(((acks >= t0) & (acks < t1)).sum())
    out = {"pushes_per_s": round(pushes / (t1 - t0), 1), "keys_per_s": round(pushes * args.push_keys / (t1 - t0)),
           "server_cpu_ms_per_push": round(1e3 * (cpu1 - cpu0) / max(pushes, 1), 3),
           "seconds": round(t1 - t0, 2), "load": [load0, load1]}
    if join:
        j, reg, com = phases["join"], phases.get("registered", np.nan), phases.get("commit", np.nan)
        bins = np.arange(t0, t1 + 1e-9, 0.25)
        out.update({
            "joiner_registered_after_s": round(reg - j, 3), "migration_s": round(com - reg, 3),
            "pushes_per_s_before": round(_rate(acks, t0, j), 1),
            "pushes_per_s_joiner_starting": round(_rate(acks, j, reg), 1),
            "pushes_per_s_during_migration": round(_rate(acks, reg, com), 1),
            "pushes_per_s_after": round(_rate(acks, com, t1), 1),
            "longest_gap_between_acks_s": round(float(np.diff(acks[(acks >= t0) & (acks < t1)]).max()), 3),
            "timeline": {"bin_s": 0.25, "join_at_s": round(j - t0, 3), "registered_at_s": round(reg - t0, 3),
                         "commit_at_s": round(com - t0, 3),
                         "pushes_per_s": (np.histogram(acks, bins)[0] / 0.25).round(1).tolist()}})
    return out


def run_replication(args, log: Path) -> dict:
    cases = [("async", 0, True), ("async", 1, True), ("async", 2, True), ("sync", 0, True),
             ("sync", 1, True), ("sync", 1, False), ("sync", 2, True), ("sync", 2, False)]
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every case
        for mode, k, after in cases:
            name = f"{mode}_k{k}" + ("" if mode == "async" or k == 0 else ("_after_agg" if after else "_per_push"))
            r = throughput_run(args, log, 4, k, mode == "sync", after)
            runs.setdefault(name, []).append(r)
            print(f"  [{rep}] {name}: {r['pushes_per_s']:.0f} pushes/s, server CPU "
                  f"{r['server_cpu_ms_per_push']:.2f} ms/push, load {r['load'][1]}", flush=True)
    res = {name: {"pushes_per_s": round(float(np.median([r["pushes_per_s"] for r in rs])), 1),
                  "server_cpu_ms_per_push": round(float(np.median([r["server_cpu_ms_per_push"] for r in rs])), 3),
                  "runs": rs} for name, rs in runs.items()}
    ratios = {}
    for name, r in res.items():
        base = res[f"{name.split('_')[0]}_k0"]
        ratios[name] = {"throughput_vs_k0": round(r["pushes_per_s"] / base["pushes_per_s"], 3),
                        "server_cpu_vs_k0": round(r["server_cpu_ms_per_push"] / base["server_cpu_ms_per_push"], 3)}
    return {"servers": 4, "workers": args.workers, "push_keys": args.push_keys, "table_keys": args.table_keys,
            "window": args.window, "cases": res, "ratios": ratios}


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="recovery,join,replication", help="comma-separated parts to run")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs (a fresh cluster each)")
    p.add_argument("--servers", type=int, default=3, help="servers of the recovery cluster")
    p.add_argument("--heartbeat-timeout", type=float, default=None, help="PSERVER_HEARTBEAT_TIMEOUT (0.6)")
    p.add_argument("--preload", type=int, default=1_000_000, help="keys stored before the kill")
    p.add_argument("--probe-interval", type=float, default=0.01, help="s between background pushes")
    p.add_argument("--recovery-timeout", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0, help="s of load before measuring / killing")
    p.add_argument("--seconds", type=float, default=4.0, help="measured s per throughput case (and "
                   "before and after the join)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--push-keys", type=int, default=10_000)
    p.add_argument("--table-keys", type=int, default=1_000_000)
    p.add_argument("--window", type=int, default=4, help="pushes in flight per worker")
    p.add_argument("--repeats", type=int, default=1, help="runs per replication case (median)")
    p.add_argument("--out", default="benchmarks/results/recovery.json")
    args = p.parse_args()
    parts = set(args.only.split(","))
    log = Path(tempfile.mkdtemp(prefix="pserver-recovery-logs-"), "cluster.log")
    print(f"cluster output: {log}", flush=True)
    started = time.monotonic()
    result: dict = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine_info(),
                    "load_at_start": load(), "args": vars(args)}
    if "recovery" in parts:
        print("recovery after SIGKILL:", flush=True)
        result["recovery"] = run_recovery(args, log)
    if "join" in parts:
        print("throughput around a server join:", flush=True)
        result["join"] = {"servers_before": 3, "replication": 1, "workers": args.workers,
                          "push_keys": args.push_keys, "table_keys": args.table_keys,
                          **throughput_run(args, log, 3, 1, sync=False, join=True)}
    if "replication" in parts:
        print("cost of replication:", flush=True)
        result["replication"] = run_replication(args, log)
    result["load_at_end"] = load()
    result["seconds"] = round(time.monotonic() - started, 1)
    result["targets"] = targets(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(summary(result))


def targets(res: dict) -> dict:
    out = {}
    if "recovery" in res:
        r = res["recovery"]["mastered_ranges_all_kills_s"]
        out["recovery_under_1s_median_and_max"] = {"median_s": r.get("median"), "max_s": r.get("max"),
                                                   "met": r.get("n", 0) > 0 and r["max"] < 1.0}
    if "replication" in res:
        ratio = res["replication"]["ratios"]["sync_k1_after_agg"]["throughput_vs_k0"]
        out["k1_costs_at_most_30pct_with_aggregation"] = {"throughput_vs_k0": ratio, "met": ratio >= 0.7}
    return out


def summary(res: dict) -> str:
    lines = [f"machine: {res['machine']['cpus']} cpus, load {res['load_at_start']} -> {res['load_at_end']}; "
             f"{res['seconds']} s"]
    if "recovery" in res:
        r = res["recovery"]
        a, w, b = r["mastered_ranges_all_kills_s"], r["mastered_ranges_worst_per_kill_s"], r["breakdown_median_s"]
        lines.append(f"recovery ({r['kills'].__len__()} kills): ranges of the victim median {a['median']} s, max "
                     f"{a['max']} s (worst range per kill: median {w['median']} s); ranges it replicated median "
                     f"{r['replicated_ranges_all_kills_s'].get('median')} s")
        lines.append(f"  medians: heartbeat age at kill {b['victim_heartbeat_age_at_kill_s']} s, marked dead "
                     f"{b['scheduler_marked_dead_s']} s, worker has the ring {b['worker_got_ring_s']} s")
    if "join" in res:
        j = res["join"]
        lines.append(f"join: pushes/s before {j['pushes_per_s_before']}, joiner starting "
                     f"{j['pushes_per_s_joiner_starting']}, migrating {j['pushes_per_s_during_migration']} "
                     f"({j['migration_s']} s), after {j['pushes_per_s_after']}")
    if "replication" in res:
        for name, c in res["replication"]["cases"].items():
            q = res["replication"]["ratios"][name]
            lines.append(f"  {name:20} {c['pushes_per_s']:8.1f} pushes/s ({q['throughput_vs_k0']:.2f} of k=0), "
                         f"server CPU {c['server_cpu_ms_per_push']:.2f} ms/push ({q['server_cpu_vs_k0']:.2f})")
    for name, t in res["targets"].items():
        lines.append(f"target {name}: {'met' if t['met'] else 'MISSED'} {t}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
