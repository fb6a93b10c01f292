"""Push/pull and the sparse LR job across separate network hosts (Linux network namespaces, pserver.netns)
over links limited by a token bucket (unlimited, 1 Gbit/s, 200 Mbit/s) or delayed (1 ms, 5 ms one
way: every host's packets held that long on the way in, by pserver.netdelay, since this kernel has
no netem). For the LR job, sequential (tau 0) against bounded delay (tau 4): how much relaxed
consistency recovers as the links get slower. Needs root (and the netem extra for delays).

Usage: python benchmarks/network.py [--rates none,1gbit,200mbit] [--delays 1,5] [--seconds 3]
                                    [--examples 200000] [--out benchmarks/results/network.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pserver import netns  # noqa: E402

HOSTS = ("sched", "s1", "s2", "w1", "w2")


def worker_main(out: str, seconds: float) -> None:
    """In a worker host: 1,000 random keys pushed with 1 and 16 in flight, a 4 MB tensor push."""
    import pserver

    kv = pserver.KVWorker()
    rkeys = np.unique(np.random.default_rng(0).integers(0, 2**64 - 1, 1000, dtype=np.uint64))
    rvals = np.ones(len(rkeys), np.float32)
    kv.wait(kv.push(rkeys, rvals))
    res = {}

    def timed(fn) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += fn()
        return round(n / (time.perf_counter() - t0), 1)

    res["push_1000_keys_1_in_flight_per_s"] = timed(lambda: kv.wait(kv.push(rkeys, rvals)) or 1)
    window: list[int] = []

    def sixteen() -> int:
        window.append(kv.push(rkeys, rvals))
        if len(window) >= 16:
            kv.wait(window.pop(0))
        return 1

    res["push_1000_keys_16_in_flight_per_s"] = timed(sixteen)
    kv.wait_all()
    kv.declare_table("tensor", dim=1_000_000)
    one, tensor = np.array([7], np.uint64), np.ones(1_000_000, np.float32)
    res["push_4MB_tensor_per_s"] = timed(lambda: kv.wait(kv.push(one, tensor, table="tensor")) or 1)
    Path(out).write_text(json.dumps(res))
    kv.close()


_SINK = """
import socket
s = socket.create_server(("0.0.0.0", 9100))
c, _ = s.accept()
while True:
    n = 0
    while n < 4 << 20:
        d = c.recv(1 << 20)
        if not d:
            raise SystemExit
        n += len(d)
    c.sendall(b"k")
"""
_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 9100), timeout=60)
buf, n, t0 = b"x" * (4 << 20), 0, time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[2]):
    c.sendall(buf)
    c.recv(1)
    n += 1
print(n / (time.perf_counter() - t0))
"""


def raw_tcp(hosts: netns.Hosts, seconds: float) -> float:
    """4 MB sent over a plain TCP socket from w1 to s1 and a byte back, per second: what the link
    (and the delay process) allow without pserver, the baseline of the tensor push."""
    sink = subprocess.Popen(hosts.argv("s1", [sys.executable, "-c", _SINK]))
    try:
        for _ in range(100):
            got = subprocess.run(hosts.argv("w1", [sys.executable, "-c", _SOURCE, hosts.hosts["s1"]["lan"],
                                                   str(seconds)]), capture_output=True, text=True)
            if got.returncode == 0:
                return round(float(got.stdout), 1)
            time.sleep(0.1)   # the sink is not listening yet
        raise RuntimeError(f"raw TCP transfer failed: {got.stderr[-2000:]}")
    finally:
        sink.kill()
        sink.wait()


def _env(keys: str, workers: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSERVER_")}
    env.update(PSERVER_SCHEDULER="192.0.2.1:7000", PSERVER_NUM_SERVERS="2",
               PSERVER_NUM_WORKERS=str(workers), PSERVER_KEYS=keys, PSERVER_HEARTBEAT_TIMEOUT="10",
               PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def run(hosts: netns.Hosts, keys: str, worker_cmds: list[list[str]]) -> None:
    """One cluster (scheduler on sched, servers on s1/s2) running one command per worker host."""
    workers = len(worker_cmds)
    procs = [subprocess.Popen(hosts.argv("sched", [sys.executable, "-m", "pserver", "scheduler"]),
                              env=_env(keys, workers))]
    procs += [subprocess.Popen(hosts.argv(h, [sys.executable, "-m", "pserver", "server"]),
                               env=_env(keys, workers)) for h in ("s1", "s2")]
    try:
        ws = [subprocess.Popen(hosts.argv(f"w{r + 1}", cmd), env=_env(keys, workers, PSERVER_RANK=str(r)))
              for r, cmd in enumerate(worker_cmds)]
        codes = [w.wait(timeout=900) for w in ws]
        if any(codes):
            raise RuntimeError(f"workers exited with {codes}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], float(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="none,1gbit,200mbit", help="link rates (tc units; none = unlimited)")
    p.add_argument("--delays", default="1,5", help="one-way link delays in ms, on unlimited links "
                   "('' for none)")
    p.add_argument("--mtu", type=int, default=9000, help="of every link: jumbo frames, as data-centre "
                   "networks use (the delay process then handles a sixth of the packets)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "network.json"))
    args = p.parse_args()
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    why = netns.available() or (netns.delay_available() if delays else None)
    if why:
        raise SystemExit(f"cannot run: {why}")
    links = [(rate, None if rate == "none" else rate, None) for rate in args.rates.split(",")]
    links += [(f"delay_{d:g}ms", None, d) for d in delays]
    from pserver.apps.lr import gen
    from pserver.security import keygen

    tmp = Path(tempfile.mkdtemp(prefix="pserver-network-"))
    keys = str(keygen(tmp / "keys"))
    gen.generate(str(tmp / "lr"), args.examples, features=1 << 20, nnz=40, noise=0.02, seed=7)
    t0 = time.time()
    result = {"command": "python benchmarks/network.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count()},
              "mtu": args.mtu,
              "layout": "scheduler, 2 servers and 2 workers each on its own network namespace, one "
                        "bridge; every link limited to the rate on the receiving side, or every "
                        "host's packets delayed on the way in (a round trip: twice the delay); "
                        "CURVE on",
              "lr": {"examples": args.examples, "epochs": args.epochs, "l1": 5, "blocks": 16},
              "links": {}}
    with netns.Hosts("psb", mtu=args.mtu) as hosts:
        hosts.add_lan("lan", "192.0.2.0/24")
        for n, host in enumerate(HOSTS, start=1):
            hosts.add_host(host, {"lan": n})
        for rate, limit, delay in links:
            for host in HOSTS:
                hosts.shape(host, "lan", limit)
                hosts.delay(host, delay)
            out = {"rate": limit, "delay_ms": delay}
            pp = tmp / f"pp-{rate}.json"
            run(hosts, keys, [[sys.executable, __file__, "--worker", str(pp), str(args.seconds)]])
            out["pushpull"] = json.loads(pp.read_text())
            out["raw_tcp_4MB_round_trips_per_s"] = raw_tcp(hosts, args.seconds)
            out["tensor_push_vs_raw_tcp"] = round(out["pushpull"]["push_4MB_tensor_per_s"]
                                                  / out["raw_tcp_4MB_round_trips_per_s"], 3)
            print(rate, json.dumps(out["pushpull"]), flush=True)
            for tau in (0, 4):
                summary = tmp / f"lr-{rate}-{tau}.json"
                data = str(tmp / "lr" / "train.libsvm")
                cmd = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", data,
                       "--l1", "5", "--epochs", str(args.epochs), "--blocks", "16", "--tau", str(tau),
                       "--summary-json", str(summary)]
                run(hosts, keys, [cmd, cmd])
                s = json.loads(summary.read_text())
                steady = [h["examples_per_s"] for h in s["history"][1:]] or [s["history"][0]["examples_per_s"]]
                out[f"lr_tau{tau}"] = {"examples_per_s": round(statistics.median(steady)),
                                       "train_seconds": round(s["train_seconds"], 3),
                                       "objective": s["train_objective"],
                                       "idle_fraction": round(s["idle_fraction"], 3)}
            lr0, lr4 = out["lr_tau0"]["examples_per_s"], out["lr_tau4"]["examples_per_s"]
            out["lr_tau4_vs_tau0"] = round(lr4 / lr0, 3)
            result["links"][rate] = out
            print(rate, json.dumps(out), flush=True)
    base = result["links"].get("none")
    if base:
        for out in result["links"].values():
            out["vs_unlimited"] = {k: round(v / base["pushpull"][k], 3) for k, v in out["pushpull"].items()}
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
