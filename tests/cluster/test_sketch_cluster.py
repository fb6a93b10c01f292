"""The CountMin sketch on real processes: `pserver sketch count` against exact counts, and
`pserver sketch query` from the command line while two workers are writing."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter

import numpy as np

from pserver import KVWorker
from pserver.apps.sketch.countmin import CountMinSketch
from pserver.apps.sketch.text import exact_counts
from pserver.errors import TableError

from .conftest import pserver_cli

WORDS = [f"w{i}" for i in range(400)]

# One writer of the concurrent test: inserts part 1, flushes, waits for the test's go (key 0 of
# table "go" set to 1), then inserts part 2 and flushes. Only the public API.
WRITER = """
import sys, time
import numpy as np
import pserver
from pserver.apps.sketch import CountMinSketch, SketchShape

part1, part2 = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
kv = pserver.KVWorker()
kv.declare_table("go", dtype="float64")
sk = CountMinSketch(kv, "live", SketchShape(4, 2000, seed=5), conservative=True,
                    share=0.01)
sk.insert_text(part1)
sk.flush()
while kv.pull(np.zeros(1, dtype=np.uint64), table="go")[0] < 1:
    time.sleep(0.05)
sk.insert_text(part2)
sk.flush()
kv.close()
"""


def _text(rng: np.random.Generator, n: int) -> bytes:
    ids = np.minimum(rng.zipf(1.3, n), len(WORDS)) - 1
    return " ".join(WORDS[i] for i in ids).encode() + b"\n"


def test_count_command_estimates_bound_exact_counts(tmp_path):
    """Every estimate >= the exact count, and the share beyond eps*N below delta, with 2 workers
    x 2 servers on real text (the licences every Debian system ships, plus a generated file)."""
    rng = np.random.default_rng(0)
    gen = tmp_path / "zipf.txt"
    gen.write_bytes(_text(rng, 60_000))
    files = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
             str(gen)]
    out = tmp_path / "summary.json"
    proc = pserver_cli("sketch", "count", *files, "--insecure", "--eps", "0.002", "--check",
                       "--top", "0.01", "--summary-json", str(out), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    truth = exact_counts(files)
    c = s["check"]
    assert s["inserts"] == sum(truth.values()) and s["workers"] == 2 and s["servers"] == 2
    assert c["items"] == len(truth) and c["below_true"] == 0
    assert c["share_beyond"] <= c["delta"]
    heavy = {t for t, n in truth.items() if n >= 0.01 * s["inserts"]}
    assert {t.encode() for t, _ in s["heavy_hitters"]} >= heavy
    assert "inserts/s" in proc.stdout


def _wait_for_workers(cluster, n: int) -> None:
    """Until the cluster started with its n writers (a reader joining earlier would take a
    writer's place in the start-up count)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = cluster.wait_scheduler()
        if sum(1 for x in view["nodes"] if x["role"] == "worker" and x["state"] == "up") >= n:
            return
        time.sleep(0.1)
    raise AssertionError("the writers did not join")


def test_query_from_the_command_line_while_writers_insert(cluster_factory, tmp_path):
    rng = np.random.default_rng(1)
    parts = [[_text(rng, 20_000), _text(rng, 30_000)] for _ in range(2)]
    for r, (p1, p2) in enumerate(parts):
        (tmp_path / f"p1_{r}").write_bytes(p1)
        (tmp_path / f"p2_{r}").write_bytes(p2)
    prog = tmp_path / "writer.py"
    prog.write_text(WRITER)
    cluster = cluster_factory(2, 2)
    writers = [cluster.spawn_worker([sys.executable, str(prog), str(tmp_path / f"p1_{r}"),
                                     str(tmp_path / f"p2_{r}")], rank=r) for r in range(2)]
    _wait_for_workers(cluster, 2)
    first = Counter(t for p1, _ in parts for t in p1.split())
    with KVWorker(cluster.config()) as kv:
        kv.declare_table("go", dtype="float64")
        deadline = time.monotonic() + 60
        while True:  # both writers flushed part 1 and wait
            try:
                sk = CountMinSketch(kv, "live")
                if sk.total() == sum(first.values()):
                    break
            except TableError:  # not created yet
                pass
            assert time.monotonic() < deadline, "part 1 never arrived"
            time.sleep(0.1)
        q = pserver_cli("sketch", "query", "--name", "live", "--top", "0.05", "--json",
                        "W1", "w2", "nothere", env=cluster.env(), timeout=60)
        assert q.returncode == 0, q.stdout + q.stderr
        mid = json.loads(q.stdout)
        assert mid["total"] == sum(first.values())
        assert mid["estimates"]["W1"] >= first[b"w1"] and mid["estimates"]["w2"] >= first[b"w2"]
        assert mid["estimates"]["nothere"] <= math.e / 2000 * mid["total"]  # eps * N
        assert dict(mid["heavy_hitters"])["w0"] >= first[b"w0"]
        kv.push(np.zeros(1, dtype=np.uint64), np.ones(1), table="go")
        for w in writers:
            assert w.wait(timeout=60) == 0
        everything = first + Counter(t for _, p2 in parts for t in p2.split())
        items = list(everything)
        est = sk.estimate(items)
        assert sk.total() == sum(everything.values())
        assert np.all(est >= np.array([everything[i] for i in items]))
