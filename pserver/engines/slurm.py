"""`pserver launch --backend slurm`: inside an allocation (salloc/sbatch), the scheduler, the servers
and the workers run as three `srun` steps of the job. Each step's tasks are ranked 0..n-1 by Slurm
(SLURM_PROCID of that step), so ranks are contiguous per role. The steps share a run directory on
the shared filesystem: the scheduler publishes its address there, each role reads its keys there."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import security
from ..config import settings_env
from ..errors import ConfigError, PServerError
from .keyfiles import KeyFiles

log = logging.getLogger(__name__)

ADDRESS_FILE = "scheduler.address"
# srun options per role: one task on the first node for the scheduler; the others spread
# cyclically (rank r on node r mod n). A failed worker ends its step (as the local launcher
# stops the other workers); a failed server must not: the others take its ranges over.
_KILL_ON_BAD_EXIT = {"scheduler": 1, "server": 0, "worker": 1}


@dataclass(frozen=True)
class Allocation:
    """The job this launcher runs in: its id and node names (first = where the scheduler goes)."""

    job_id: str
    nodes: tuple[str, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str], expand=None) -> Allocation:
        """The allocation of ``env`` (SLURM_JOB_ID, SLURM_JOB_NODELIST); ``expand`` turns a node
        list into names (default: `scontrol show hostnames`).

        Raises:
            ConfigError: not inside an allocation, or its node list cannot be read.
        """
        job, nodelist = env.get("SLURM_JOB_ID"), env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not job or not nodelist:
            raise ConfigError("--backend slurm runs inside an allocation: start it from an sbatch "
                              "script or under `salloc -N NODES -n TASKS` (see docs/engines.md)")
        nodes = tuple((expand or expand_nodelist)(nodelist))
        if not nodes:
            raise ConfigError(f"the allocation's node list {nodelist!r} names no node")
        return cls(job, nodes)


def expand_nodelist(nodelist: str) -> list[str]:
    """Node names of a Slurm node list ("n[01-03],gpu1"), by `scontrol show hostnames`.

    Raises:
        ConfigError: scontrol is missing or rejects the list.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"cannot run `scontrol show hostnames {nodelist}`: {e}; is Slurm "
                          f"installed on this node?") from e
    if out.returncode != 0:
        raise ConfigError(f"`scontrol show hostnames {nodelist}` failed: {out.stderr.strip()}")
    return out.stdout.split()


def srun_argv(role: str, tasks: int, nodes: Sequence[str], run_dir: str, command: Sequence[str],
              python: str = sys.executable) -> list[str]:
    """The `srun` command line of one role's step (pure). ``command`` is what each task runs,
    through `python -m pserver.engines.slurm_task`, which sets its rank and keys first."""
    if role == "scheduler":
        place = ["--nodes=1", "--ntasks=1", f"--nodelist={nodes[0]}"]
    else:
        place = [f"--nodes={min(tasks, len(nodes))}", f"--ntasks={tasks}", "--distribution=cyclic"]
    # --overlap/--overcommit: the three steps share the allocation's CPUs (a server mostly waits)
    return ["srun", "--overlap", "--overcommit", f"--kill-on-bad-exit={_KILL_ON_BAD_EXIT[role]}",
            f"--job-name=pserver-{role}", *place,
            python, "-m", "pserver.engines.slurm_task", role, run_dir, "--", *command]


def role_commands(worker_command: Sequence[str], scheduler_args: Sequence[str] = (),
                  server_args: Sequence[str] = (), python: str = sys.executable
                  ) -> dict[str, list[str]]:
    """What the tasks of each role run (pure)."""
    return {"scheduler": [python, "-m", "pserver", "scheduler", *scheduler_args],
            "server": [python, "-m", "pserver", "server", *server_args],
            "worker": list(worker_command)}


def cluster_env(base: Mapping[str, str], num_servers: int, num_workers: int,
                settings: Mapping[str, Any], log_level: str | None) -> dict[str, str]:
    """The environment every step starts from (pure): ``base`` without the variables each task
    sets itself (rank, scheduler, keys), plus the cluster's settings."""
    env = {k: v for k, v in base.items()
           if k not in ("PSERVER_RANK", "PSERVER_SCHEDULER", "PSERVER_KEYS", "PSERVER_INSECURE",
                        "PSERVER_PORT")}
    env.update(settings_env(settings))
    env.update({"PSERVER_NUM_SERVERS": str(num_servers), "PSERVER_NUM_WORKERS": str(num_workers)})
    if log_level:
        env["PSERVER_LOG_LEVEL"] = log_level
    return env


class SlurmLaunch:
    """The three steps of one cluster in the current allocation. ``run(command)`` returns the
    workers' exit code (srun's: the worst task's) and leaves no step or run directory behind."""

    def __init__(self, num_servers: int = 1, num_workers: int = 1, *, insecure: bool = False,
                 keys: str | None = None, port: int = 0, settings: Mapping[str, Any] | None = None,
                 scheduler_args: Sequence[str] = (), server_args: Sequence[str] = (),
                 log_level: str | None = None, run_dir: str | None = None,
                 env: Mapping[str, str] | None = None, start_timeout: float = 120.0):
        """Raises:
            ConfigError: not inside an allocation, or fewer than one server / one worker.
        """
        if num_servers < 1 or num_workers < 1:
            raise ConfigError("--backend slurm needs at least one server and one worker")
        self.env = dict(os.environ if env is None else env)
        self.allocation = Allocation.from_env(self.env)
        self.num_servers, self.num_workers = num_servers, num_workers
        self.insecure, self.keys, self.port = insecure, keys, port
        self.settings = dict(settings or {})
        self.scheduler_args, self.server_args = list(scheduler_args), list(server_args)
        self.log_level = log_level
        # the run directory must be visible from every node: the submission directory usually is
        self.parent = run_dir or os.getcwd()
        self.start_timeout = start_timeout
        self.steps: dict[str, subprocess.Popen] = {}
        self.run_dir: str | None = None
        self.scheduler: str | None = None

    def run(self, command: Sequence[str]) -> int:
        """Start the steps, run ``command`` as the workers' step, tear everything down.

        Raises:
            PServerError: the scheduler step failed or published no address in time.
        """
        try:
            self._start(command)
            rc = self.steps["worker"].wait()
            if rc == 0:  # else the cluster will not end by itself: stop() ends it now
                self._finish()
            return rc
        finally:
            self.stop()

    def _start(self, command: Sequence[str]) -> None:
        self.run_dir = tempfile.mkdtemp(prefix=f".pserver-slurm-{self.allocation.job_id}-",
                                        dir=self.parent)
        env = cluster_env(self.env, self.num_servers, self.num_workers, self.settings,
                          self.log_level)
        role_env = {role: dict(env) for role in security.ROLES}
        if self.insecure:
            for e in role_env.values():
                e["PSERVER_INSECURE"] = "1"
        else:  # each role's directory holds its own secret key only
            keys = self.keys or str(security.ephemeral(self.run_dir))
            for role, e in role_env.items():
                e["PSERVER_KEYS"] = str(KeyFiles.read(keys, role).write(self.run_dir))
        if self.port:
            role_env["scheduler"]["PSERVER_PORT"] = str(self.port)
        commands = role_commands(command, self.scheduler_args, self.server_args)
        self._step("scheduler", 1, commands["scheduler"], role_env["scheduler"])
        self.scheduler = self._wait_address()
        print(f"pserver: scheduler at {self.scheduler} (job {self.allocation.job_id}, "
              f"{len(self.allocation.nodes)} nodes), {self.num_servers} servers, "
              f"{self.num_workers} workers" + (", insecure" if self.insecure else ", secure"),
              file=sys.stderr)
        for role in ("server", "worker"):
            role_env[role]["PSERVER_SCHEDULER"] = self.scheduler
        self._step("server", self.num_servers, commands["server"], role_env["server"])
        self._step("worker", self.num_workers, commands["worker"], role_env["worker"])

    def _step(self, role: str, tasks: int, command: Sequence[str], env: dict[str, str]) -> None:
        assert self.run_dir is not None
        argv = srun_argv(role, tasks, self.allocation.nodes, self.run_dir, command)
        log.info("[launcher] %s step: %s", role, " ".join(argv))
        self.steps[role] = subprocess.Popen(argv, env=env)

    def _wait_address(self) -> str:
        assert self.run_dir is not None
        path = Path(self.run_dir) / ADDRESS_FILE
        deadline = time.monotonic() + self.start_timeout
        while not path.exists():
            if self.steps["scheduler"].poll() is not None:
                raise PServerError(f"the scheduler step exited with code "
                                   f"{self.steps['scheduler'].returncode}: see its output above")
            if time.monotonic() > deadline:
                raise PServerError(f"the scheduler step published no address within "
                                   f"{self.start_timeout:.0f} s: is {self.run_dir} on a filesystem "
                                   f"every node shares? Start `pserver launch` from such a "
                                   f"directory (the submission directory usually is)")
            time.sleep(0.05)
        return path.read_text().strip()

    def _finish(self, timeout: float = 30.0) -> None:
        """After the workers: the scheduler shuts the cluster down by itself; wait for it."""
        deadline = time.monotonic() + timeout
        for role in ("scheduler", "server"):
            try:
                self.steps[role].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("[launcher] the %s step is still running: stopping it", role)

    def stop(self) -> None:
        """End every step still running (SIGTERM, then SIGKILL) and remove the run directory."""
        for proc in self.steps.values():
            if proc.poll() is None:
                proc.terminate()  # srun forwards it to the tasks, then ends the step
        for proc in self.steps.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None


def launch(command: Sequence[str], kw: Mapping[str, Any], address: str | None = None) -> int:
    """`pserver launch --backend slurm`: ``kw`` are the parsed launch options (see
    cli.launch_cluster_kwargs). Returns the workers' exit code.

    Raises:
        ConfigError: not inside an allocation, or an option Slurm decides itself (--address).
    """
    if address:
        raise ConfigError("--address is Ray's: under Slurm the scheduler runs on the allocation's "
                          "first node")
    launcher = SlurmLaunch(kw["num_servers"], kw["num_workers"], insecure=bool(kw.get("insecure")),
                           keys=kw.get("keys"), port=kw.get("port") or 0, settings=kw.get("settings"),
                           scheduler_args=kw.get("scheduler_args", ()),
                           server_args=kw.get("server_args", ()), log_level=kw.get("log_level"))
    return launcher.run(command)
