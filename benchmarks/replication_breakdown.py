"""Where the servers' CPU goes with and without replication: recovery.py's throughput run with k=0
and k=1, every server timing the main steps of its loop in thread CPU time during the measured
window. Writes JSON: per step, microseconds per push, calls per push, microseconds per call (steps
nest, so rows do not add up; the timers cost CPU: compare steps within one run). Method:
docs/benchmarks.md.

Usage: python benchmarks/replication_breakdown.py [--servers 2] [--workers 2] [--mode shared]
           [--push-keys 10000] [--out benchmarks/results/replication_breakdown.json]"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# -- inside a server process ----------------------------------------------------------------------
def server_main(out_dir: str, argv: list[str]) -> None:
    """Install the timers, then run ``pserver server ARGV``; SIGUSR1 starts timing, SIGUSR2 stops
    it and writes OUT_DIR/PID.json."""
    from pserver import link as link_mod
    from pserver import transport as transport_mod
    from pserver import wire as wire_mod
    from pserver.cli import main
    from pserver.ft import replica as replica_mod
    from pserver.kv import core as core_mod
    from pserver.kv import server as server_mod
    from pserver.store import index as index_mod
    from pserver.store import table as table_mod

    acc: dict[str, list[int]] = {}
    state = {"on": False, "replica": False}

    def timed(name, fn, by_role: bool = False, by_op=None):
        def run(*a, **k):
            if not state["on"]:
                return fn(*a, **k)
            t = time.thread_time_ns()
            r = fn(*a, **k)
            key = name
            if by_role:
                key += "_replica" if state["replica"] else "_master"
            if by_op is not None:
                key += "_" + by_op(a, r)
            d = acc.setdefault(key, [0, 0])
            d[0] += time.thread_time_ns() - t
            d[1] += 1
            return r
        return run

    def in_replica_apply(fn):
        def run(self):
            state["replica"] = True
            try:
                return fn(self)
            finally:
                state["replica"] = False
        return run

    srv = server_mod.KVServer
    for step in ("_burst", "_drain_replica", "_end_burst"):
        setattr(srv, step, timed(step, getattr(srv, step)))
    replica = replica_mod.ReplicaSide
    replica.apply_deferred = timed("replica_apply", in_replica_apply(replica.apply_deferred))
    core_mod.ServerCore._process = timed("process", core_mod.ServerCore._process,
                                         by_op=lambda a, r: a[2].op)
    # every message leaves through a link's send_frames (replies, acks, forwards, copies), encoded
    # by wire.encode just before; every one received is decoded by Transport.decode_body
    wire_mod.encode = timed("encode", wire_mod.encode, by_op=lambda a, r: a[0].op)
    link_mod.ZmqLink.send_frames = timed("send", link_mod.ZmqLink.send_frames,
                                         by_op=lambda a, r: a[2])
    transport_mod.Transport.decode_body = timed("decode", transport_mod.Transport.decode_body,
                                                by_op=lambda a, r: r[0].op)
    index_mod.HashIndex.lookup = timed("lookup", index_mod.HashIndex.lookup, by_role=True)
    table_mod.update_rows = timed("update", table_mod.update_rows, by_role=True)
    core_mod.sum_parts = timed("sum_parts", core_mod.sum_parts)

    def start(*_):
        state["on"] = True

    def stop(*_):
        state["on"] = False
        Path(out_dir, f"{os.getpid()}.json").write_text(json.dumps(acc))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = ["pserver", *argv]
    main()


# -- the driver -----------------------------------------------------------------------------------
def measure(args, k: int, log) -> dict:
    sys.path.insert(0, str(HERE))
    import recovery  # the benchmark whose throughput run this breaks down

    from pserver import launch

    out_dir = tempfile.mkdtemp(prefix="pserver-breakdown-")
    spawn = launch.LocalCluster._spawn

    def spawn_timed(self, name, cmd, env):
        if name.startswith("server"):  # [python, -m, pserver, server, ...] -> this script
            cmd = [cmd[0], str(Path(__file__).resolve()), "--server", out_dir, *cmd[3:]]
        return spawn(self, name, cmd, env)

    calls = {"n": 0}
    server_cpu = recovery.server_cpu

    def signalled_cpu(cluster):  # called at the start and at the end of the measured window
        sig = signal.SIGUSR1 if calls["n"] == 0 else signal.SIGUSR2
        calls["n"] += 1
        for name, proc in cluster.procs.items():
            if name.startswith("server"):
                os.kill(proc.pid, sig)
        return server_cpu(cluster)

    launch.LocalCluster._spawn, recovery.server_cpu = spawn_timed, signalled_cpu
    try:
        run_args = argparse.Namespace(workers=args.workers, table_keys=1_000_000, push_keys=args.push_keys,
                                      window=4, warmup=1.0, seconds=args.seconds, key_sets=8)
        r = recovery.throughput_run(run_args, log, args.servers, k, args.mode, True)
    finally:
        launch.LocalCluster._spawn, recovery.server_cpu = spawn, server_cpu
    deadline = time.monotonic() + 10
    while len(list(Path(out_dir).glob("*.json"))) < args.servers and time.monotonic() < deadline:
        time.sleep(0.05)
    pushes = r["pushes_per_s"] * r["seconds"]
    total: dict[str, list[int]] = {}
    for f in Path(out_dir).glob("*.json"):
        for name, (ns, n) in json.loads(f.read_text()).items():
            t = total.setdefault(name, [0, 0])
            t[0] += ns
            t[1] += n
    steps = {name: {"us_per_push": round(ns / 1e3 / pushes, 1), "calls_per_push": round(n / pushes, 2),
                    "us_per_call": round(ns / 1e3 / max(n, 1), 1)}
             for name, (ns, n) in sorted(total.items(), key=lambda x: -x[1][0])}
    return {"pushes_per_s": r["pushes_per_s"], "server_cpu_ms_per_push": r["server_cpu_ms_per_push"],
            "steps": steps}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--server":
        server_main(sys.argv[2], sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", default="shared", choices=["async", "sync", "shared"])
    p.add_argument("--push-keys", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default="benchmarks/results/replication_breakdown.json")
    args = p.parse_args()
    result = {"command": " ".join([sys.executable, *sys.argv]), "load_at_start": os.getloadavg(),
              "args": vars(args)}
    with open(Path(tempfile.mkdtemp(prefix="pserver-breakdown-logs-"), "cluster.log"), "w") as log:
        for k in (0, 1):
            result[f"k{k}"] = m = measure(args, k, log)
            print(f"k={k}: {m['pushes_per_s']:.0f} pushes/s, server CPU {m['server_cpu_ms_per_push']:.3f} "
                  f"ms/push (timers included); main-thread steps, us per push:")
            for name, s in m["steps"].items():
                print(f"  {name:28s} {s['us_per_push']:8.1f}  ({s['calls_per_push']:.2f} calls x "
                      f"{s['us_per_call']:.1f} us)")
    result["load_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
