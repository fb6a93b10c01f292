"""`pserver launch --backend slurm` on a real single-host Slurm (Debian's slurm-wlm and munge),
configured and started here: munged, slurmctld and slurmd as this test's own processes, with their
state in a temporary directory. The LR job runs under `sbatch --wait` (the docs' example), the
exact-count job under `salloc`; both secure by default."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pserver.launch import free_port

from .conftest import PROGRAMS

pytestmark = pytest.mark.slow

_DAEMONS = ("munged", "slurmctld", "slurmd", "salloc", "sbatch", "srun", "sinfo")


def _missing() -> str | None:
    """Why Slurm cannot start here (None if it can)."""
    absent = [d for d in _DAEMONS if not shutil.which(d, path=os.environ["PATH"] + ":/usr/sbin")]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): "
                f"apt-get install -y slurm-wlm munge (as .ci/run does)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps: run these tests as root (CI does)"
    return None


_CONF = """ClusterName=pservertest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


@pytest.fixture(scope="module")
def slurm_env():
    """A running single-host Slurm; yields the environment for its commands (SLURM_CONF)."""
    why = _missing()
    if why:
        pytest.skip(why)
    # a short path: munge's socket path must fit a sockaddr_un
    d = Path(tempfile.mkdtemp(prefix="psl-", dir="/tmp"))
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(_CONF.format(host=host, dir=d, ctld_port=free_port(),
                                               d_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"),
           "PATH": os.environ["PATH"] + ":/usr/sbin"}
    daemons = []
    out = open(d / "daemons.out", "wb")  # noqa: SIM115 - closed in the finaliser
    try:
        daemons.append(subprocess.Popen(
            ["munged", "-F", "-f", f"--socket={d}/munge.sock", f"--key-file={key}",
             f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid",
             f"--seed-file={d}/munged.seed"], env=env, stdout=out, stderr=out))
        _wait(lambda: (d / "munge.sock").exists(), "munged", d)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=out, stderr=out))
        daemons.append(subprocess.Popen(["slurmd", "-D"], env=env, stdout=out, stderr=out))
        _wait(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                     text=True).stdout.strip() == "idle", "the node", d)
        yield env
    finally:
        for p in reversed(daemons):
            p.terminate()
        for p in reversed(daemons):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        out.close()
        shutil.rmtree(d, ignore_errors=True)


def _wait(ready, what: str, d: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in d.glob("*.log")
                             if p.exists())
            out = (d / "daemons.out").read_text()[-2000:]
            pytest.fail(f"{what} did not come up within {timeout} s\n{out}\n{logs}")
        time.sleep(0.2)


def test_lr_job_under_sbatch_matches_sklearn(slurm_env, tmp_path):
    """The docs' sbatch example: 2 servers and 2 workers as srun steps train sparse LR; the
    objective reaches scikit-learn's optimum (the same bound as the local cluster's test)."""
    from sklearn.linear_model import LogisticRegression

    from pserver.apps.lr import gen
    from pserver.apps.lr.data import read_shard

    gen.generate(str(tmp_path), 3000, features=1500, nnz=20, noise=0.05, seed=1, test_examples=500)
    data, summary = tmp_path / "train.libsvm", tmp_path / "summary.json"
    script = tmp_path / "lr.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=pserver-lr
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --output={tmp_path}/slurm-%j.out
{sys.executable} -m pserver launch --backend slurm -s 2 -w 2 --heartbeat-timeout 10 -- \\
    {sys.executable} -m pserver.apps.lr.worker --data {data} --l1 2 --epochs 12 --blocks 16 \\
    --summary-json {summary}
""")
    done = subprocess.run(["sbatch", "--wait", "--chdir", str(tmp_path), str(script)],
                          env=slurm_env, capture_output=True, text=True, timeout=150)
    output = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert done.returncode == 0, done.stderr + output
    assert "pserver: scheduler at" in output and "2 servers, 2 workers" in output
    s = json.loads(summary.read_text())
    assert s["workers"] == 2 and s["examples"] == 3000
    shard = read_shard(str(data))
    w = LogisticRegression(C=1 / 2, l1_ratio=1.0, solver="liblinear", tol=1e-8, max_iter=10_000,
                           fit_intercept=False).fit(shard.X, shard.y).coef_.ravel()
    best = float(np.logaddexp(0, -shard.y * (shard.X @ w)).sum() + 2 * np.abs(w).sum())
    assert best * (1 - 1e-4) <= s["train_objective"] <= best * 1.005
    assert not list(tmp_path.glob(".pserver-slurm-*")), "the run directory was left behind"


def test_ranks_are_contiguous_per_role_and_sums_exact_under_salloc(slurm_env, tmp_path):
    """3 workers after 2 servers: one step for all roles would number the workers 2..4; here
    they are 0..2, and every worker reads the exact sum of everyone's pushes."""
    rounds, nkeys = 20, 2000
    done = subprocess.run(
        ["salloc", "--nodes=1", "--ntasks=4", sys.executable, "-m", "pserver", "launch",
         "--backend", "slurm", "-s", "2", "-w", "3", "--heartbeat-timeout", "5", "--",
         sys.executable, str(PROGRAMS / "count_worker.py"), str(tmp_path), str(rounds), str(nkeys)],
        env=slurm_env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [r["rank"] for r in results] == [0, 1, 2]
    for r in results:
        assert r["num_workers"] == 3 and r["num_servers"] == 2
        assert r["dense"] == [3 * rounds, 3 * rounds] and r["hashed"] == [3 * rounds, 3 * rounds]
        assert r["vec"] == [6.0 * rounds, 6.0 * rounds]  # ranks push rank + 1: (1 + 2 + 3) x rounds
    assert ", secure" in done.stderr  # CURVE keys by default, each role holding its own secret
