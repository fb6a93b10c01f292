"""Shared fixtures: real local clusters (scheduler and servers as OS processes on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pserver.launch import LocalCluster

PROGRAMS = Path(__file__).parent / "programs"


@pytest.fixture
def cluster_factory():
    """Start LocalClusters (insecure unless asked otherwise, for speed); stop them all at the end."""
    made: list[LocalCluster] = []

    def make(num_servers: int = 2, num_workers: int = 1, **kw) -> LocalCluster:
        kw.setdefault("insecure", True)
        kw.setdefault("prefix_output", True)
        # a loaded 2-core CI machine can starve a heartbeat thread for a while: tests that are not
        # about failure detection use a patient timeout (those that are pass 0.6 s, the default)
        kw.setdefault("heartbeat_timeout", 2.0)
        c = LocalCluster(num_servers, num_workers, **kw).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def run_program(cluster: LocalCluster, name: str, *args: str, timeout: float = 120) -> int:
    """Run tests/programs/<name>.py once per worker rank of ``cluster``; return the worst code."""
    return cluster.run_workers([sys.executable, str(PROGRAMS / f"{name}.py"), *args],
                               timeout=timeout)


def pserver_cli(*args: str, env: dict | None = None, timeout: float = 120
                ) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "pserver", *args], env=full, timeout=timeout,
                          capture_output=True, text=True)
