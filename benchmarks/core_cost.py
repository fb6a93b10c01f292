"""The Python cost of one request on a server, without sockets: decode a 1,000-key push as it comes
off the wire, serve it with ServerCore (store update, clocks, exactly-once, ack) and encode the ack -
in one process, in a tight loop (warm caches). Against the same steps inside a running server (CPU
per push by thread, benchmarks/pushpull.py) it shows what a request costs when it finds the caches
cold. Method and findings: docs/performance.md, "Where a small request's time goes".

Usage: python benchmarks/core_cost.py [--pushes 20000] [--rounds 5] [--out benchmarks/results/core_cost.json]"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from pserver import wire
from pserver.config import Config
from pserver.ft.replication import Replicator
from pserver.kv import keys as keyfmt
from pserver.kv.core import ServerCore
from pserver.membership.view import ClusterView, NodeInfo
from pserver.protocol import PART, RING_VERSION
from pserver.transport import Transport

WORKER = 4  # the sending worker's node id (its DEALER identity is b"n4")


def _core(transport: Transport) -> ServerCore:
    core = ServerCore(Replicator(None, 1, None), transport.limits, 64 << 20, "sum", secure=False)
    core.on_view(ClusterView(version=1, nodes={WORKER: NodeInfo(WORKER, "worker", 0, "h", 0, 0)}))
    core.repl.my_id = core.exactly_once.me = 1
    return core


def _frames(ts: int, keys: np.ndarray, vals: np.ndarray) -> list:
    """A push as a worker encodes it (one inline frame, as KVWorker._message builds it)."""
    meta, arrays = keyfmt.pack_keys(keys)
    arrays.append(vals)
    meta[PART], meta[RING_VERSION] = 0, 1
    return wire.encode(wire.Message("push", ts, "default", meta, arrays))


def measure(pushes: int) -> dict:
    transport = Transport(Config.from_env(insecure=True), "server")
    try:
        core = _core(transport)
        rng = np.random.default_rng(0)
        keys = np.unique(rng.integers(0, 2**64 - 1, 1000, dtype=np.uint64))
        vals = np.ones(len(keys), np.float32)
        frames = [_frames(ts, keys, vals) for ts in range(1, 2 * pushes + 1)]  # encoded beforehand
        identity = b"n%d" % WORKER
        decode, handle, out, acks = transport.decode_body, core.handle, core.out, core.acks

        def serve(batch: list) -> None:
            for f in batch:
                msg, role = decode(f)
                handle(identity, msg, role)
                if acks.due:
                    for _, ack in acks.take():
                        wire.encode(ack)
                out.clear()

        serve(frames[:pushes])  # warm-up: numba kernels, slot cache, allocator
        start = time.thread_time()
        serve(frames[pushes:])
        cpu = time.thread_time() - start
        if core.errors:
            raise RuntimeError(f"{core.errors} pushes refused: {dict(core.rejections)}")
        return {"us_per_push": round(1e6 * cpu / pushes, 1)}
    finally:
        transport.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pushes", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/core_cost.json")
    args = p.parse_args()
    per_round = [measure(args.pushes)["us_per_push"] for _ in range(args.rounds)]
    result = {"command": "python benchmarks/core_cost.py " + " ".join(
                  f"--{k} {v}" for k, v in (("pushes", args.pushes), ("rounds", args.rounds))),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "case": "1,000 random uint64 keys x 1 float32, one push per message, table 'default'",
              "server_python_us_per_push": {"median": statistics.median(per_round),
                                            "rounds": per_round}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
