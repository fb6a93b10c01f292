"""A cluster across separate network hosts: every node in its own Linux network namespace, joined by
veth pairs to bridges, on documentation addresses (pserver.netns); exact sums over the real links,
secure (CURVE) as by default. Also a node on two networks choosing its interface, and one bound to
0.0.0.0 advertising its address. Needs root (skipped with the reason otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pserver import netns
from pserver.security import keygen

PROGRAMS = Path(__file__).parent / "programs"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]
ROUNDS, KEYS = 20, 3000


def _env(keys: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSERVER_")}
    env.update(PSERVER_SCHEDULER="192.0.2.1:7000", PSERVER_NUM_SERVERS="2", PSERVER_NUM_WORKERS="2",
               PSERVER_KEYS=str(keys), PSERVER_HEARTBEAT_TIMEOUT="5", PSERVER_CONNECT_TIMEOUT="60",
               PYTHONPATH=str(Path(__file__).parents[2]))
    env.update(extra)
    return env


_CONNECT = ("import socket, time; t = time.perf_counter(); "
            "socket.create_connection(('192.0.2.1', 7000), timeout=30).close(); "
            "print(time.perf_counter() - t)")


def _run_cluster(hosts: netns.Hosts, keys: Path, out: Path, server_env: dict[str, dict]) -> tuple:
    """Scheduler on host "sched", servers on s1/s2 (with their extra settings), the exact-count
    program on w1/w2; returns what each worker read, `pserver status` of the running cluster and
    the seconds a TCP handshake from w1 to the scheduler took (one round trip)."""
    procs = []
    try:
        procs.append(subprocess.Popen(hosts.argv("sched", [sys.executable, "-m", "pserver",
                                                           "scheduler"]), env=_env(keys)))
        for host, extra in server_env.items():
            procs.append(subprocess.Popen(hosts.argv(host, [sys.executable, "-m", "pserver",
                                                            "server"]), env=_env(keys, **extra)))
        # "hold": the workers stay (the cluster up) until the status and rtt are taken (out/go)
        cmd = [sys.executable, str(PROGRAMS / "count_worker.py"), str(out), str(ROUNDS), str(KEYS),
               "hold"]
        workers = [subprocess.Popen(hosts.argv(h, cmd), env=_env(keys, PSERVER_RANK=str(r)))
                   for r, h in enumerate(("w1", "w2"))]
        procs += workers  # stopped with the rest if the test fails before they finish
        status = None
        deadline = time.monotonic() + 60
        while status is None and time.monotonic() < deadline:
            got = subprocess.run(hosts.argv("sched", [sys.executable, "-m", "pserver", "status",
                                                      "--json"]),
                                 env=_env(keys), capture_output=True, text=True, timeout=30)
            if got.returncode == 0 and sum(n["role"] == "server"
                                           for n in json.loads(got.stdout)["nodes"]) == 2:
                status = json.loads(got.stdout)
        rtt = float(subprocess.run(hosts.argv("w1", [sys.executable, "-c", _CONNECT]),
                                   capture_output=True, text=True, timeout=60).stdout)
        (out / "go").touch()
        assert [w.wait(timeout=120) for w in workers] == [0, 0]
        results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        return results, status, rtt
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _check_sums(results: list[dict]) -> None:
    for r in results:
        assert r["num_servers"] == 2 and r["num_workers"] == 2
        assert r["dense"] == [2 * ROUNDS, 2 * ROUNDS] and r["hashed"] == [2 * ROUNDS, 2 * ROUNDS]
        assert r["vec"] == [ROUNDS * (1 + 2), ROUNDS * (1 + 2)]
        assert r["range_n"] == KEYS and r["range_keys_ok"]


def test_a_secure_cluster_across_five_hosts_sums_exactly(tmp_path):
    keys = keygen(tmp_path / "keys")
    with netns.Hosts() as hosts:
        hosts.add_lan("lan", "192.0.2.0/24")
        for n, host in enumerate(("sched", "s1", "s2", "w1", "w2"), start=1):
            hosts.add_host(host, {"lan": n})
        results, status, _ = _run_cluster(hosts, keys, tmp_path, {"s1": {}, "s2": {}})
    _check_sums(results)
    addresses = sorted(n["host"] for n in status["nodes"] if n["role"] == "server")
    assert addresses == ["192.0.2.2", "192.0.2.3"]    # each server on its own host


def test_servers_on_a_data_network_by_interface_or_advertised_address(tmp_path):
    """Two networks: control (192.0.2.0/24, where the scheduler listens) and data
    (198.51.100.0/24). Server s1 picks its data NIC by name (PSERVER_INTERFACE); s2 binds every
    interface and advertises its data address (PSERVER_ADVERTISE_HOST). Workers reach the servers
    only at the advertised data addresses."""
    keys = keygen(tmp_path / "keys")
    with netns.Hosts() as hosts:
        hosts.add_lan("ctl", "192.0.2.0/24")
        hosts.add_lan("data", "198.51.100.0/24")
        for n, host in enumerate(("sched", "s1", "s2", "w1", "w2"), start=1):
            hosts.add_host(host, {"ctl": n, "data": n})
        results, status, _ = _run_cluster(
            hosts, keys, tmp_path,
            {"s1": {"PSERVER_INTERFACE": "data"},
             "s2": {"PSERVER_HOST": "0.0.0.0", "PSERVER_ADVERTISE_HOST": "198.51.100.3"}})
    _check_sums(results)
    addresses = sorted(n["host"] for n in status["nodes"] if n["role"] == "server")
    assert addresses == ["198.51.100.2", "198.51.100.3"]


@pytest.mark.skipif(netns.delay_available() is not None, reason=str(netns.delay_available()))
def test_a_cluster_over_links_with_a_delay_sums_exactly(tmp_path):
    """Every host's packets held 3 ms on the way in (pserver.netdelay: this kernel has no netem),
    so any round trip between two hosts takes at least 6 ms: exact sums still, and the handshake
    from a worker to the scheduler shows the delay is on the path."""
    keys = keygen(tmp_path / "keys")
    with netns.Hosts() as hosts:
        hosts.add_lan("lan", "192.0.2.0/24")
        for n, host in enumerate(("sched", "s1", "s2", "w1", "w2"), start=1):
            hosts.add_host(host, {"lan": n})
            hosts.delay(host, 3.0)
        results, _, rtt = _run_cluster(hosts, keys, tmp_path, {"s1": {}, "s2": {}})
    _check_sums(results)
    assert rtt >= 0.006, rtt
