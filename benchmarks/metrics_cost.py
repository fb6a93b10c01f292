"""The cost of observability: metrics on (every node's /metrics scraped once a second) against off,
interleaved, on pushpull.py's cases and on the sparse LR job (issue 20 asks for at most 3% slower).

Each round runs both sides (the order alternates between rounds, so drift of a shared machine hits
both alike); reported per case: the median of each side, their ratio on/off and the median of the
per-round (paired) ratios. With metrics off a node does no metrics work at all; with them on, the
worker records one latency per request and each node builds its families when scraped.

Usage: python benchmarks/metrics_cost.py [--rounds 3] [--seconds 2] [--parts pushpull,lr]
       [--lr-examples 200000] [--lr-epochs 4] [--out benchmarks/results/metrics_cost.json]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lr as lr_bench  # noqa: E402 - benchmarks/lr.py
import pushpull  # noqa: E402 - benchmarks/pushpull.py

import pserver  # noqa: E402
from pserver.launch import LocalCluster, free_port  # noqa: E402

SCAN = 8  # endpoints on base..base+SCAN: every node of these clusters on this host


class Scraper(threading.Thread):
    """Scrapes every endpoint on base..base+SCAN once per ``interval`` until stopped, as a
    Prometheus server would; counts the scrapes that answered."""

    def __init__(self, base: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.base, self.interval, self.scrapes = base, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for port in range(self.base, self.base + SCAN):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        r.read()
                    self.scrapes += 1
                except (urllib.error.URLError, OSError):
                    continue

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.scrapes


def _side(metrics: bool):
    """(environment changes, scraper or None) of one side."""
    if not metrics:
        return {}, None
    base = free_port()
    return {"PSERVER_METRICS_PORT": str(base)}, Scraper(base)


def pushpull_part(metrics: bool, seconds: float) -> dict:
    env, scraper = _side(metrics)
    with LocalCluster(1, 1, insecure=True, prefix_output=False, env=env,
                      heartbeat_timeout=5.0) as cluster:
        kv = pserver.KVWorker(cluster.config(0))
        if scraper:
            scraper.start()
        try:
            res = pushpull.run_cases(kv, seconds, cluster.procs["server 0"].pid)
        finally:
            scrapes = scraper.stop() if scraper else 0
            kv.close()
    out = {f"pushpull.{case}": v["ops_per_s"] for case, v in res.items() if isinstance(v, dict)}
    return out | {"scrapes": scrapes}


def lr_part(metrics: bool, data: str, epochs: int) -> dict:
    env, scraper = _side(metrics)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # LocalCluster hands its own environment to every node
    if scraper:
        scraper.start()
    try:
        r = lr_bench.run_ours(data, ["--l1", "5", "--l2", "2", "--epochs", str(epochs),
                                     "--blocks", "16", "--tau", "0"])
    finally:
        scrapes = scraper.stop() if scraper else 0
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    steady = r["history"][1:] or r["history"]
    return {"lr.examples_per_s": statistics.median(h["examples_per_s"] for h in steady),
            "lr.train_seconds": r["train_seconds"], "scrapes": scrapes}


def summarise(rounds: list[dict]) -> dict:
    """Per case: medians of both sides, their ratio on/off and the median paired ratio (the
    scrape counts, proof that the "on" side was scraped, stay in the rounds)."""
    cases = sorted({k for r in rounds for k in r["on"] if not k.endswith("scrapes")})
    out = {}
    for case in cases:
        on = [r["on"][case] for r in rounds if case in r["on"]]
        off = [r["off"][case] for r in rounds if case in r["off"]]
        paired = [r["on"][case] / r["off"][case] for r in rounds
                  if r["off"].get(case) and case in r["on"]]
        m_on, m_off = statistics.median(on), statistics.median(off)
        out[case] = {"on": round(m_on, 2), "off": round(m_off, 2),
                     "ratio_on_off": round(m_on / m_off, 4) if m_off else None,
                     "paired_ratio_median": round(statistics.median(paired), 4) if paired else None,
                     "lower_is_better": case.endswith("seconds")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per pushpull case")
    p.add_argument("--parts", default="pushpull,lr")
    p.add_argument("--lr-examples", type=int, default=200_000)
    p.add_argument("--lr-epochs", type=int, default=4)
    p.add_argument("--lr-data", default=os.path.join(tempfile.gettempdir(),
                                                     "pserver-bench-metrics-lr"))
    p.add_argument("--out", default=str(HERE / "results" / "metrics_cost.json"))
    args = p.parse_args()
    parts = args.parts.split(",")
    if "lr" in parts:
        lr_bench.ensure_data(args.lr_data, args.lr_examples, dict(density=0.1, noise=0.02, seed=7))
    rounds = []
    for i in range(args.rounds):
        r: dict = {"on": {}, "off": {}}
        for metrics in ((True, False) if i % 2 == 0 else (False, True)):
            side = r["on" if metrics else "off"]
            if "pushpull" in parts:
                side.update(pushpull_part(metrics, args.seconds))
            if "lr" in parts:
                lr = lr_part(metrics, args.lr_data, args.lr_epochs)
                side["lr_scrapes"] = lr.pop("scrapes")
                side.update(lr)
        rounds.append(r)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    result = {"what": "metrics on (scraped every 1 s) vs off, interleaved rounds",
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "settings": vars(args), "cases": summarise(rounds), "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["cases"], indent=1))


if __name__ == "__main__":
    main()
