"""Push/pull and the sparse LR job across separate network hosts (Linux network namespaces, pserver.netns)
with the links' bandwidth limited by a token bucket: unlimited, 1 Gbit/s, 200 Mbit/s. For the LR job,
sequential (tau 0) against bounded delay (tau 4): how much relaxed consistency recovers as the links
get slower. Link DELAY (tc netem) cannot be measured on this machine: its kernel has no netem
(CONFIG_NET_SCH_NETEM is not set) - see docs/networks.md. Needs root.

Usage: python benchmarks/network.py [--rates none,1gbit,200mbit] [--seconds 3] [--examples 200000]
                                    [--out benchmarks/results/network.json]
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
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "network.json"))
    args = p.parse_args()
    why = netns.available()
    if why:
        raise SystemExit(f"cannot run: {why}")
    from pserver.apps.lr import gen
    from pserver.security import keygen

    tmp = Path(tempfile.mkdtemp(prefix="pserver-network-"))
    keys = str(keygen(tmp / "keys"))
    gen.generate(str(tmp / "lr"), args.examples, features=1 << 20, nnz=40, noise=0.02, seed=7)
    t0 = time.time()
    result = {"command": "python benchmarks/network.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count()},
              "layout": "scheduler, 2 servers and 2 workers each on its own network namespace, one "
                        "bridge; every link limited to the rate on the receiving side; CURVE on",
              "lr": {"examples": args.examples, "epochs": args.epochs, "l1": 5, "blocks": 16},
              "rates": {}}
    with netns.Hosts("psb") as hosts:
        hosts.add_lan("lan", "192.0.2.0/24")
        for n, host in enumerate(HOSTS, start=1):
            hosts.add_host(host, {"lan": n})
        for rate in args.rates.split(","):
            for host in HOSTS:
                hosts.shape(host, "lan", None if rate == "none" else rate)
            out = {}
            pp = tmp / f"pp-{rate}.json"
            run(hosts, keys, [[sys.executable, __file__, "--worker", str(pp), str(args.seconds)]])
            out["pushpull"] = json.loads(pp.read_text())
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
            result["rates"][rate] = out
            print(rate, json.dumps(out), flush=True)
    base = result["rates"].get("none")
    if base:
        for out in result["rates"].values():
            out["vs_unlimited"] = {k: round(v / base["pushpull"][k], 3) for k, v in out["pushpull"].items()}
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
