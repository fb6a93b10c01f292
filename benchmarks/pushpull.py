"""Push/pull throughput and latency on a real local cluster (1 scheduler + 1 server + this process as
the worker), over ZeroMQ on loopback: (a) 1 M dense keys push+pull, (b) a 4 MB tensor push,
(c) 1,000 random keys with 1 and 16 in flight, (d) the store's lookup+update rate (no network).
In the same run, interleaved with it: raw pyzmq with the same frames (a DEALER sending a header,
1,000 uint64 keys and 1,000 float32, or a 4 MB tensor, to a ROUTER in another process that answers
a short ack), and the 1,000-key and 4 MB push cases as ratios to it. --curve also runs a-c (and
the baseline) encrypted: with large arrays sealed beside CURVE (the default, AES-256-GCM), with
CURVE alone (PSERVER_SEAL_MIN=0), and with AEGIS-128X2 when `aeg` is installed; each with its
slowdown against the plain run of the same round. --busy-poll S with a busy-polling server and
--worker-busy-poll S with a busy-polling worker, each in every round (0 skips either).
Method: docs/performance.md.

Usage: python benchmarks/pushpull.py [--seconds 3] [--rounds 1] [--curve] [--busy-poll S]
                                     [--worker-busy-poll S] [--no-store]
                                     [--out benchmarks/results/pushpull.json]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq
from raw_peer import connect_dealer, cpu_seconds

import pserver
from pserver.launch import LocalCluster

RAW_HEADER = b'{"op":"push","ts":0,"t":"default","m":{"p":0,"rv":1}}'


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


class _CpuWindow:
    """CPU time of the worker (this process) and the server from now on, per push when asked:
    each side's total and by thread kind (Python threads, ZeroMQ's I/O thread)."""

    def __init__(self, worker_pid: int, server_pid: int) -> None:
        self.pids = worker_pid, server_pid
        self.start = [_thread_cpu(pid) for pid in self.pids]

    def per_push(self, count: int) -> dict:
        out = {}
        for side, pid, before in zip(("worker", "server"), self.pids, self.start):
            by_thread = _per_push_us(before, _thread_cpu(pid), count)
            out[f"{side}_cpu_us_per_push"] = round(sum(by_thread.values()), 1)
            out[f"{side}_cpu_us_per_push_by_thread"] = by_thread
        return out


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
    cpu = _CpuWindow(os.getpid(), server_pid)
    lat = _timed(lambda: kv.wait(kv.push(rkeys, rvals)), seconds)
    res["c_1000keys_push_1_in_flight"] = {**_summary(lat), **cpu.per_push(len(lat))}
    res["c_1000keys_pull_1_in_flight"] = _summary(_timed(lambda: kv.pull(rkeys), seconds))

    # 16 in flight, kept full: a new push as soon as the oldest is acknowledged
    window: list[int] = []
    lat = []
    end = time.perf_counter() + seconds
    count = 0
    t0 = time.perf_counter()
    cpu0, scpu0 = time.process_time(), cpu_seconds(server_pid)
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
        "server_cpu_us_per_push": round(1e6 * (cpu_seconds(server_pid) - scpu0) / count, 1),
        # by thread kind: the Python threads vs ZeroMQ's I/O thread
        "worker_cpu_us_per_push_by_thread": _per_push_us(wthr0, _thread_cpu(os.getpid()), count),
        "server_cpu_us_per_push_by_thread": _per_push_us(sthr0, _thread_cpu(server_pid), count),
        "p50_wait_ms": round(float(np.percentile(lat, 50)) * 1e3, 4),
        "p99_wait_ms": round(float(np.percentile(lat, 99)) * 1e3, 4)}
    return res


def run_cluster(seconds: float, insecure: bool, busy_poll: float = 0.0,
                worker_busy_poll: float = 0.0, seal: dict | None = None) -> dict:
    """The cases on a new cluster. seal: settings of the sealed channel (seal_min, seal_cipher)
    for the server and the worker."""
    load = os.getloadavg()  # the machine may be shared: what else was running, as uptime says
    env = {"PSERVER_BUSY_POLL": str(busy_poll)} if busy_poll else {}
    for name, value in (seal or {}).items():
        env["PSERVER_" + name.upper()] = value
    # a patient heartbeat timeout: on a loaded shared machine a starved heartbeat is no failure here
    with LocalCluster(1, 1, insecure=insecure, prefix_output=False, env=env or None,
                      heartbeat_timeout=5.0) as cluster:
        t = time.perf_counter()
        kv = pserver.KVWorker(cluster.config(0).with_(worker_busy_poll=worker_busy_poll,
                                                      **(seal or {})))
        start = time.perf_counter() - t
        try:
            res = run_cases(kv, seconds, cluster.procs["server 0"].pid)
        finally:
            kv.close()
    res["worker_join_s"] = round(start, 3)
    res["load_average_before"] = [round(x, 2) for x in load]
    return res


# -- raw pyzmq: the most any protocol on this transport can do -------------------------------------
def raw_router(curve_secret: str) -> None:
    """The baseline's server (run in its own process): a ROUTER that answers every message with a
    short ack; prints its port, then serves until stdin closes."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    if curve_secret:
        sock.curve_secretkey = curve_secret.encode()
        sock.curve_publickey = zmq.curve_public(curve_secret.encode())
        sock.curve_server = True
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if sys.stdin.fileno() in ready:
            return
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            sock.send_multipart([frames[0], b"ack"])


def run_raw(seconds: float, curve: bool) -> dict:
    """Round trips/s with 1 in flight and messages/s with 16 in flight, DEALER -> ROUTER (other
    process) on loopback, each message three frames: header, 1,000 uint64 keys, 1,000 float32; and
    round trips/s of a 4 MB tensor (header + 1 M float32, the frames of case b's push)."""
    public, secret = zmq.curve_keypair() if curve else (b"", b"")
    proc = subprocess.Popen([sys.executable, __file__, "--raw-router=" + secret.decode()],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ctx = zmq.Context()
    try:
        port = int(proc.stdout.readline())
        sock = connect_dealer(ctx, port, public)
        rng = np.random.default_rng(0)
        keys = np.unique(rng.integers(0, 2**64 - 1, 1000, dtype=np.uint64))
        vals = np.ones(len(keys), np.float32)

        def send() -> None:
            sock.send(RAW_HEADER, zmq.SNDMORE)
            sock.send(keys, zmq.SNDMORE, copy=False)
            sock.send(vals, 0, copy=False)

        def one() -> None:
            send()
            sock.recv()

        for _ in range(200):  # connection, handshake and warm-up
            one()
        cpu = _CpuWindow(os.getpid(), proc.pid)
        lat = _timed(one, seconds)
        res = {"c_1000keys_push_1_in_flight": {**_summary(lat), **cpu.per_push(len(lat))}}
        count, end = 0, time.perf_counter() + seconds
        t0 = time.perf_counter()
        cpu0, scpu0 = time.process_time(), cpu_seconds(proc.pid)
        for _ in range(16):
            send()
        while time.perf_counter() < end:
            sock.recv()
            send()
            count += 1
        for _ in range(16):
            sock.recv()
        count += 16
        res["c_1000keys_push_16_in_flight"] = {
            "pushes": count, "ops_per_s": round(count / (time.perf_counter() - t0), 1),
            "worker_cpu_us_per_push": round(1e6 * (time.process_time() - cpu0) / count, 1),
            "server_cpu_us_per_push": round(1e6 * (cpu_seconds(proc.pid) - scpu0) / count, 1)}
        tensor = np.ones(1_000_000, np.float32)   # as case b's

        def one_tensor() -> None:
            sock.send(RAW_HEADER, zmq.SNDMORE)
            sock.send(tensor, 0, copy=False)
            sock.recv()

        for _ in range(5):
            one_tensor()
        res["b_tensor_4MB_push"] = _summary(_timed(one_tensor, seconds), payload_bytes=tensor.nbytes)
        sock.close()
        return res
    finally:
        ctx.term()
        proc.stdin.close()
        proc.wait(10)


RATIO_CASES = ("c_1000keys_push_1_in_flight", "c_1000keys_push_16_in_flight", "b_tensor_4MB_push")


def _ratios(rounds: list[dict], side: str, raw: str) -> dict:
    """Per 1,000-key case: the ratio pserver / raw pyzmq of each round (same round: measured side by
    side) and their median."""
    out = {}
    for case in RATIO_CASES:
        per_round = [round(r[side][case]["ops_per_s"] / r[raw][case]["ops_per_s"], 3)
                     for r in rounds if side in r and raw in r]
        if per_round:
            out[case] = {"median": round(statistics.median(per_round), 3), "rounds": per_round}
    return out


def _cpu_ratios(rounds: list[dict], side: str, raw: str) -> dict:
    """1 and 16 in flight: CPU time per push (worker + server) of raw pyzmq / pserver, per round -
    steadier than rates when other jobs share the machine (1.0 = as cheap as raw pyzmq)."""
    out = {}
    for case in ("c_1000keys_push_1_in_flight", "c_1000keys_push_16_in_flight"):
        per_round = []
        for r in rounds:
            mine, base = r[side][case], r[raw][case]
            if "worker_cpu_us_per_push" not in mine or "worker_cpu_us_per_push" not in base:
                continue
            per_round.append(round(
                (base["worker_cpu_us_per_push"] + base["server_cpu_us_per_push"])
                / (mine["worker_cpu_us_per_push"] + mine["server_cpu_us_per_push"]), 3))
        if per_round:
            out[case] = {"median": round(statistics.median(per_round), 3), "rounds": per_round}
    return out


def _slowdowns(rounds: list[dict], side: str, plain: str) -> dict:
    """Per case: 1 - side's rate / the plain rate of the same round, per round, and the median."""
    out = {}
    for case, v in rounds[0][side].items():
        if not (isinstance(v, dict) and "ops_per_s" in v):
            continue
        per_round = [round(1 - r[side][case]["ops_per_s"] / r[plain][case]["ops_per_s"], 3)
                     for r in rounds]
        out[case] = {"median": round(statistics.median(per_round), 3), "rounds": per_round}
    return out


def _median_case(values: list[dict]) -> dict:
    """The round whose ops/s is the median (lower middle): a whole record, not a mix of rounds."""
    ordered = sorted(values, key=lambda v: v["ops_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "ops_per_s_rounds": [v["ops_per_s"] for v in values]}


def _merge(rounds: list[dict], side: str) -> dict:
    """One side's results over the rounds: per case, the median round's record."""
    first = rounds[0][side]
    out = {}
    for case, v in first.items():
        if isinstance(v, dict) and "ops_per_s" in v:
            out[case] = _median_case([r[side][case] for r in rounds])
        else:
            out[case] = v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="time per case")
    p.add_argument("--curve", action="store_true", help="also measure a CURVE-encrypted cluster")
    p.add_argument("--busy-poll", type=float, default=0.002,
                   help="also run, in every round, with the server busy-polling this long "
                        "(s; 0 = skip)")
    p.add_argument("--worker-busy-poll", type=float, default=0.0005,
                   help="also run, in every round, with the worker busy-polling this long in wait "
                        "(s; 0 = skip)")
    p.add_argument("--no-store", action="store_true", help="skip case d (the store without network)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians reported)")
    p.add_argument("--out", default="benchmarks/results/pushpull.json")
    p.add_argument("--raw-router", help=argparse.SUPPRESS)  # internal: the baseline's server
    args = p.parse_args()
    if args.raw_router is not None:
        raw_router(args.raw_router)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import store_index

    curve_sides = {}
    if args.curve:  # (an older pserver, as before_after.py runs, has no sealed channel: no --curve)
        from pserver import sealed
        curve_sides = {"curve": {"seal_cipher": "aes-256-gcm"}, "curve_unsealed": {"seal_min": "0"}}
        if sealed.available("aegis-128x2"):
            curve_sides["curve_aegis"] = {"seal_cipher": "aegis-128x2"}
    # interleaved: every round measures raw pyzmq and pserver one after the other, so a drift of the
    # shared machine's speed hits both; ratios are taken within a round
    rounds = []
    for _ in range(args.rounds):
        r = {"raw_pyzmq": run_raw(args.seconds, curve=False),
             "insecure": run_cluster(args.seconds, insecure=True)}
        if args.worker_busy_poll:
            r["insecure_worker_busy_poll"] = run_cluster(args.seconds, True,
                                                         worker_busy_poll=args.worker_busy_poll)
        if args.busy_poll:
            r["insecure_busy_poll"] = run_cluster(args.seconds, True, args.busy_poll)
        if args.curve:
            r["raw_pyzmq_curve"] = run_raw(args.seconds, curve=True)
            for side, seal in curve_sides.items():
                r[side] = run_cluster(args.seconds, insecure=False, seal=seal)
        rounds.append(r)
    result = {"command": "python benchmarks/pushpull.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "shared": "yes: other jobs ran at the same time "
                          "(see load_average_before); compare ratios within a run, not absolutes"},
              "seconds_per_case": args.seconds, "rounds": args.rounds,
              "raw_pyzmq": _merge(rounds, "raw_pyzmq"), "insecure": _merge(rounds, "insecure"),
              "ratio_to_raw_pyzmq": _ratios(rounds, "insecure", "raw_pyzmq"),
              "cpu_ratio_to_raw_pyzmq": _cpu_ratios(rounds, "insecure", "raw_pyzmq")}
    if args.worker_busy_poll:
        result["insecure_worker_busy_poll"] = {
            "worker_busy_poll_s": args.worker_busy_poll,
            **_merge(rounds, "insecure_worker_busy_poll"),
            "ratio_to_raw_pyzmq": _ratios(rounds, "insecure_worker_busy_poll", "raw_pyzmq")}
    if args.busy_poll:
        result["insecure_busy_poll"] = {
            "busy_poll_s": args.busy_poll, **_merge(rounds, "insecure_busy_poll"),
            "ratio_to_raw_pyzmq": _ratios(rounds, "insecure_busy_poll", "raw_pyzmq")}
    if not args.no_store:
        result["d_store_lookup_update"] = store_index.run(n_table=10_000_000, n_query=1_000_000)
    if args.curve:
        result["raw_pyzmq_curve"] = _merge(rounds, "raw_pyzmq_curve")
        result["seal_settings"] = curve_sides
        for side in curve_sides:
            result[side] = _merge(rounds, side)
            # per round against that round's plain run, then the median: the slowdown to read
            result[side + "_slowdown"] = _slowdowns(rounds, side, "insecure")
        result["curve_ratio_to_raw_pyzmq_curve"] = _ratios(rounds, "curve", "raw_pyzmq_curve")
        result["curve_cpu_ratio_to_raw_pyzmq_curve"] = _cpu_ratios(rounds, "curve", "raw_pyzmq_curve")
        # the transport's own cost of encryption, same frames: the floor of curve_slowdown
        result["raw_pyzmq_curve_slowdown"] = {
            case: round(1 - result["raw_pyzmq_curve"][case]["ops_per_s"] / v["ops_per_s"], 3)
            for case, v in result["raw_pyzmq"].items() if isinstance(v, dict) and "ops_per_s" in v}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
