"""pserver on a real local multi-node Ray cluster: `ray start --head` plus a second `ray start`
node with its own CPUs and a custom resource, both on loopback. The exact-count job through
`pserver launch --backend ray`, a server actor killed mid-run (failover, then Ray restarts it and
it joins), a function run on worker actors, and a killed driver taking every actor and role process
with it. Secure by default."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pserver.launch import free_port

from .conftest import PROGRAMS

ray = pytest.importorskip("ray", reason="the Ray tests need Ray: pip install -e '.[test]' "
                                        "(or 'pserver[ray]')")
pytestmark = pytest.mark.slow

_NODE = ["--num-cpus=2", "--memory=2000000000", "--object-store-memory=100000000",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def ray_address():
    """Two Ray nodes on this machine; this test process connects as a driver. `ray stop --force`
    at the end stops both (and any driver's leftovers)."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = free_port()
    temp = tempfile.mkdtemp(prefix="prt-", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    try:
        for extra in (["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                      [f"--address=127.0.0.1:{port}", '--resources={"second_node": 1}']):
            done = subprocess.run([ray_bin, "start", *extra, *_NODE], env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(0.2)
        yield address
    finally:
        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _all_free(timeout: float = 30) -> bool:
    """Every CPU and byte of memory of the Ray cluster is free again (no actor, no bundle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total, free = ray.cluster_resources(), ray.available_resources()
        if all(free.get(r, 0) >= total[r] for r in ("CPU", "memory")):
            return True
        time.sleep(0.2)
    return False


def test_launch_backend_ray_exact_sums_and_teardown(ray_address, tmp_path):
    """`pserver launch --backend ray`: 2 servers and 2 workers over two Ray nodes, secure; every
    worker reads the exact sum; when the driver is done, every actor and bundle is gone."""
    rounds, nkeys = 20, 2000
    done = subprocess.run(
        [sys.executable, "-m", "pserver", "launch", "--backend", "ray", "--address", ray_address,
         "-s", "2", "-w", "2", "--heartbeat-timeout", "5", "--",
         sys.executable, str(PROGRAMS / "count_worker.py"), str(tmp_path), str(rounds), str(nkeys)],
        capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on Ray, 2 servers, 2 workers, secure" in done.stderr
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["rank"] == r and res["num_servers"] == 2 and res["num_workers"] == 2
        assert res["dense"] == [2 * rounds, 2 * rounds] and res["hashed"] == [2 * rounds, 2 * rounds]
        assert res["vec"] == [3.0 * rounds, 3.0 * rounds]  # ranks push rank + 1
    assert _all_free(), "actors or the placement group outlived the driver"


def test_server_actor_killed_fails_over_and_ray_brings_it_back(ray_address, tmp_path):
    """k = 1: a server actor is killed while 2 workers push; its ranges fail over (no update lost
    or doubled), and Ray's restart brings it back as a server that joins the cluster."""
    from pserver.engines.ray import start_cluster
    from pserver.membership.client import scheduler_request

    rounds, nkeys = 80, 20_000
    cmd = [sys.executable, str(PROGRAMS / "ft_count_worker.py"), str(tmp_path), str(rounds), str(nkeys)]
    with start_cluster(2, 2, settings={"replication": 1, "heartbeat_timeout": 2.0},
                       scheduler_args=["--keep-alive"]) as cluster:
        where = cluster.placement()
        assert len(set(where["scheduler"] + where["server"])) == 2, where  # spread over both nodes
        old_pid = ray.get(cluster.servers[1].info.remote())["pid"]
        refs = cluster.submit_command(cmd)
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"started{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        cluster.kill_server(1)
        assert ray.get(refs, timeout=150) == [0, 0]
        results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
        for r in results:
            assert r["acked"] == rounds and r["min"] == r["max"] == 2 * rounds, r
            assert r["ring_version"] >= 2  # the ring did change
        deadline = time.monotonic() + 60
        while True:  # the restarted actor's server joined: two live servers again
            view = scheduler_request(cluster.config(), "status", role="scheduler", timeout=5).meta
            up = [n for n in view["nodes"] if n["role"] == "server" and n["state"] == "up"]
            if len(up) == 2 and all(n.get("ring_share", 1) > 0 for n in up):
                break
            assert time.monotonic() < deadline, view["nodes"]
            time.sleep(0.5)
        assert ray.get(cluster.servers[1].info.remote())["pid"] != old_pid
    assert _all_free()


_DRIVER = textwrap.dedent("""
    import json, sys, ray
    from pserver.engines.ray import start_cluster

    def count(rounds):  # runs in each worker actor, with the PSERVER_* environment set
        import os
        import numpy as np
        import pserver
        kv = pserver.KVWorker()
        keys = np.arange(1000, dtype=np.uint64)
        for _ in range(rounds):
            kv.wait(kv.push(keys, np.ones(len(keys), np.float32)))
        kv.barrier()
        vals = kv.pull(keys)
        kv.barrier()
        kv.close()
        return [kv.rank, os.environ["PSERVER_RANK"], float(vals.min()), float(vals.max())]

    ray.init(address=sys.argv[1], log_to_driver=False)
    c = start_cluster(1, 2, settings={"heartbeat_timeout": 5.0}, scheduler_args=["--keep-alive"])
    results = c.run(count, 10)
    pids = [ray.get(a.info.remote())["pid"] for a in [c.scheduler_actor, *c.servers]]
    print(json.dumps({"results": results, "pids": pids}), flush=True)
    sys.stdin.read()  # until killed
""")


def test_a_function_on_worker_actors_then_a_killed_driver_takes_everything_with_it(ray_address,
                                                                                   tmp_path):
    """RayCluster.run: a function on 2 worker actors returns their results in rank order (exact
    sums); then the driver is SIGKILLed: its scheduler and server processes disappear and every
    resource is freed."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), ray_address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line, f"the driver failed (exit code {driver.wait(30)})"
        out = json.loads(line)
        assert out["results"] == [[0, "0", 20.0, 20.0], [1, "1", 20.0, 20.0]]
        pids = out["pids"]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in pids):
            assert time.monotonic() < deadline, "the scheduler or server outlived its driver"
            time.sleep(0.2)
        assert _all_free()
    finally:
        driver.kill()
        driver.wait()


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
