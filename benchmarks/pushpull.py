"""Push/pull throughput and latency on a real local cluster (1 scheduler + 1 server + this process as
the worker), over ZeroMQ on loopback: (a) 1 M dense keys push+pull, (b) a 4 MB tensor push,
(c) 1,000 random keys with 1 and 16 in flight, (d) the store's lookup+update rate (no network).
--curve also runs a-c encrypted; --busy-poll S also with a busy-polling server (0 skips it).
Records the CPU time per request of worker and server. Method: docs/benchmarks.md.

Usage: python benchmarks/pushpull.py [--seconds 3] [--curve] [--busy-poll S] [--no-store]
                                     [--out benchmarks/results/pushpull.json]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import pserver
from pserver.launch import LocalCluster


def _timed(fn, seconds: float, min_iters: int = 5) -> list[float]:
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < min_iters:
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return lat


def _summary(lat: list[float], payload_bytes: int = 0, ops_per_call: int = 1) -> dict:
    lat_arr = np.asarray(lat)
    total = float(lat_arr.sum())
    out = {"calls": len(lat), "ops_per_s": round(len(lat) * ops_per_call / total, 1),
           "p50_ms": round(float(np.percentile(lat_arr, 50)) * 1e3 / ops_per_call, 4),
           "p99_ms": round(float(np.percentile(lat_arr, 99)) * 1e3 / ops_per_call, 4)}
    if payload_bytes:
        out["payload_GB_per_s"] = round(payload_bytes * len(lat) / total / 1e9, 3)
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, every thread included (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread kind of a process: "python" (the interpreter's threads), "zmq_io"
    (ZeroMQ's background I/O threads) and "zmq" (its reaper), from /proc/PID/task/*/stat."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        secs = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        kind = "zmq_io" if name.startswith("ZMQbg/IO") else "zmq" if name.startswith("ZMQbg") \
            else "python"
        out[kind] = out.get(kind, 0.0) + secs
    return out


def _per_push_us(before: dict[str, float], after: dict[str, float], count: int) -> dict:
    return {k: round(1e6 * (after[k] - before.get(k, 0.0)) / count, 1) for k in after
            if k in ("python", "zmq_io")}


def run_cases(kv: pserver.KVWorker, seconds: float, server_pid: int) -> dict:
    res = {}
    # (a) 1M dense keys x 1 float32: push then pull
    keys = np.arange(1_000_000, dtype=np.uint64)
    vals = np.ones(len(keys), np.float32)
    out = np.empty(len(keys), np.float32)
    kv.wait(kv.push(keys, vals))  # first touch inserts the keys

    def push_pull():
        kv.wait(kv.push(keys, vals))
        kv.pull(keys, out=out)

    res["a_dense_1M_push_pull"] = _summary(_timed(push_pull, seconds), 2 * vals.nbytes)

    # (b) one key holding a 4 MB tensor
    kv.declare_table("tensor", dim=1_000_000)
    one = np.array([7], dtype=np.uint64)
    tensor = np.ones(1_000_000, np.float32)
    kv.wait(kv.push(one, tensor, table="tensor"))
    res["b_tensor_4MB_push"] = _summary(
        _timed(lambda: kv.wait(kv.push(one, tensor, table="tensor")), seconds), tensor.nbytes)
    res["b_tensor_4MB_pull"] = _summary(
        _timed(lambda: kv.pull(one, table="tensor"), seconds), tensor.nbytes)

    # (c) 1,000 random uint64 keys
    rng = np.random.default_rng(0)
    rkeys = np.unique(rng.integers(0, 2**64 - 1, 1000, dtype=np.uint64))
    rvals = np.ones(len(rkeys), np.float32)
    kv.wait(kv.push(rkeys, rvals))
    res["c_1000keys_push_1_in_flight"] = _summary(
        _timed(lambda: kv.wait(kv.push(rkeys, rvals)), seconds))
    res["c_1000keys_pull_1_in_flight"] = _summary(_timed(lambda: kv.pull(rkeys), seconds))

    # 16 in flight, kept full: a new push as soon as the oldest is acknowledged
    window: list[int] = []
    lat = []
    end = time.perf_counter() + seconds
    count = 0
    t0 = time.perf_counter()
    cpu0, scpu0 = time.process_time(), _cpu_seconds(server_pid)
    wthr0, sthr0 = _thread_cpu(os.getpid()), _thread_cpu(server_pid)
    while time.perf_counter() < end:
        window.append(kv.push(rkeys, rvals))
        count += 1
        if len(window) >= 16:
            t = time.perf_counter()
            kv.wait(window.pop(0))
            lat.append(time.perf_counter() - t)
    kv.wait_all()
    elapsed = time.perf_counter() - t0
    res["c_1000keys_push_16_in_flight"] = {
        "pushes": count, "ops_per_s": round(count / elapsed, 1),
        "worker_cpu_us_per_push": round(1e6 * (time.process_time() - cpu0) / count, 1),
        "server_cpu_us_per_push": round(1e6 * (_cpu_seconds(server_pid) - scpu0) / count, 1),
        # by thread kind: the Python threads vs ZeroMQ's I/O thread
        "worker_cpu_us_per_push_by_thread": _per_push_us(wthr0, _thread_cpu(os.getpid()), count),
        "server_cpu_us_per_push_by_thread": _per_push_us(sthr0, _thread_cpu(server_pid), count),
        "p50_wait_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
        "p99_wait_ms": round(float(np.percentile(lat, 99)) * 1e3, 4)}
    return res


def run_cluster(seconds: float, insecure: bool, busy_poll: float = 0.0) -> dict:
    load = os.getloadavg()  # the machine may be shared: what else was running, as uptime says
    env = {"PSERVER_BUSY_POLL": str(busy_poll)} if busy_poll else None
    with LocalCluster(1, 1, insecure=insecure, prefix_output=False, env=env) as cluster:
        t = time.perf_counter()
        kv = pserver.KVWorker(cluster.config(0))
        start = time.perf_counter() - t
        try:
            res = run_cases(kv, seconds, cluster.procs["server 0"].pid)
        finally:
            kv.close()
    res["worker_join_s"] = round(start, 3)
    res["load_average_before"] = [round(x, 2) for x in load]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="time per case")
    p.add_argument("--curve", action="store_true", help="also measure a CURVE-encrypted cluster")
    p.add_argument("--busy-poll", type=float, default=0.002,
                   help="also run with the server busy-polling this long (s; 0 = skip)")
    p.add_argument("--no-store", action="store_true", help="skip case d (the store without network)")
    p.add_argument("--out", default="benchmarks/results/pushpull.json")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import store_index

    result = {"command": "python benchmarks/pushpull.py " + " ".join(sys.argv[1:]),
              "machine": {"cpus": os.cpu_count()}, "seconds_per_case": args.seconds,
              "insecure": run_cluster(args.seconds, insecure=True)}
    if args.busy_poll:
        result["insecure_busy_poll"] = {"busy_poll_s": args.busy_poll,
                                        **run_cluster(args.seconds, True, args.busy_poll)}
    if not args.no_store:
        result["d_store_lookup_update"] = store_index.run(n_table=10_000_000, n_query=1_000_000)
    if args.curve:
        result["curve"] = run_cluster(args.seconds, insecure=False)
        result["curve_slowdown"] = {
            case: round(1 - result["curve"][case]["ops_per_s"] / v["ops_per_s"], 3)
            for case, v in result["insecure"].items() if isinstance(v, dict)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
