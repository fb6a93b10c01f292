"""A local cluster on this machine: the scheduler and servers as OS processes, workers as commands run
once per rank with the environment set. Used by ``pserver launch``, ``pserver train`` and the tests.

Cluster engines (Kubernetes, Slurm, Ray, ssh) do not need this module: they start ``pserver scheduler``,
``pserver server`` and the worker program with the same PSERVER_* variables (see the README).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import security
from .config import Config, settings_env
from .errors import ConfigError, PServerError
from .groups import DEFAULT as DEFAULT_GROUP
from .groups import check_name as check_group
from .protocol import DIR
from .worker_exits import WorkerExits

log = logging.getLogger(__name__)

# settings a LocalCluster decides for all its processes (its arguments, not ``settings``)
_CLUSTER_DECIDES = {"scheduler", "host", "port", "keys", "insecure", "num_servers", "num_workers",
                    "rank", "log_level"}


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the launcher dies, so no orphan outlives it (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Prefixer(threading.Thread):
    """Copies a child's output line by line to ours, prefixed with its role and rank."""

    def __init__(self, stream, prefix: str, sink):
        super().__init__(daemon=True)
        self.stream, self.prefix, self.sink = stream, prefix, sink

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            self.sink.write(self.prefix + line.decode(errors="replace"))
            self.sink.flush()


class LocalCluster:
    """Scheduler + servers on this machine, and helpers to run workers against them.

    By default the cluster is secure: a fresh set of CURVE keys is generated in a private temporary
    directory (removed on stop). ``insecure=True`` runs plain text; ``keys=DIR`` uses existing keys.
    Use as a context manager; ``stop()`` tears everything down (also on errors and Ctrl-C).
    """

    def __init__(self, num_servers: int = 1, num_workers: int = 1, *, host: str = "127.0.0.1",
                 port: int = 0, insecure: bool = False, keys: str | None = None,
                 env: dict[str, str] | None = None, server_args: Sequence[str] = (),
                 scheduler_args: Sequence[str] = (), settings: Mapping[str, Any] | None = None,
                 prefix_output: bool = True, log_level: str | None = None,
                 heartbeat_timeout: float | None = None, replication: int | None = None,
                 replicate_after_aggregation: bool | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: float = 0.0,
                 restore: str | None = None):
        """``settings``: Config fields (``{"max_keys": 1000}``) given to every process as PSERVER_*
        variables; ``server_args`` / ``scheduler_args``: extra command-line options of those roles
        (``["--plugin", "myrules"]``), as `pserver server` / `pserver scheduler` take them.

        Raises:
            ConfigError: fewer than one server, or a setting that is unknown or that the cluster
                decides itself (scheduler, host, keys, node counts, rank); nothing is started.
        """
        if num_servers < 1 or num_workers < 0:
            raise ConfigError("a local cluster needs at least one server and zero or more workers")
        self.num_servers, self.num_workers = num_servers, num_workers
        self.host = host
        self.port = port or free_port(host)
        self.insecure, self.keys = insecure, keys
        named = {"heartbeat_timeout": heartbeat_timeout or None, "replication": replication,
                 "replicate_after_aggregation": replicate_after_aggregation}
        self.settings = {**dict(settings or {}), **{k: v for k, v in named.items() if v is not None}}
        decided = set(self.settings) & _CLUSTER_DECIDES
        if decided:
            raise ConfigError(f"LocalCluster sets {sorted(decided)} itself: pass host=, port=, keys=, "
                              f"insecure= or the node counts as its arguments instead")
        self.extra_env = {**dict(env or {}), **settings_env(self.settings)}
        self.server_args = list(server_args)
        self.prefix_output = prefix_output
        self.log_level = log_level
        # scheduler flags: checkpoints to checkpoint_dir (every N s if > 0), start from restore
        flags = {"--checkpoint-dir": checkpoint_dir, "--checkpoint-every": checkpoint_every,
                 "--restore": restore}
        self.scheduler_args = [a for flag, v in flags.items() if v for a in (flag, str(v))]
        self.scheduler_args += list(scheduler_args)
        # workers of another group than "default" do not hold the start back: the scheduler waits
        # for none of them, and that group's barriers wait until all num_workers joined
        self.group = check_group(self.settings.get("group", DEFAULT_GROUP))
        self.expected_default = num_workers if self.group == DEFAULT_GROUP else 0
        if self.group != DEFAULT_GROUP and num_workers:
            self.scheduler_args += ["--group-size", f"{self.group}={num_workers}"]
        self.procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._tmp: str | None = None
        self._scheduler_down_since: float | None = None

    @property
    def scheduler(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self, rank: int | None = None) -> dict[str, str]:
        """Environment of a process of this cluster (a worker of ``rank`` when given)."""
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update({"PSERVER_SCHEDULER": self.scheduler, "PSERVER_HOST": self.host,
                    "PSERVER_NUM_SERVERS": str(self.num_servers),
                    "PSERVER_NUM_WORKERS": str(self.num_workers)})
        if self.insecure:
            env["PSERVER_INSECURE"] = "1"
            env.pop("PSERVER_KEYS", None)
        else:
            env["PSERVER_KEYS"] = str(self.keys)
            env.pop("PSERVER_INSECURE", None)
        if self.log_level:
            env["PSERVER_LOG_LEVEL"] = self.log_level
        if rank is not None:
            env["PSERVER_RANK"] = str(rank)
        else:
            env.pop("PSERVER_RANK", None)
        return env

    def config(self, rank: int | None = None) -> Config:
        """A Config for a worker in this process (e.g. ``KVWorker(cluster.config(0))``)."""
        return Config.from_env(self.env(rank))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        if not self.insecure and not self.keys:
            self._tmp = tempfile.mkdtemp(prefix="pserver-keys-")
            self.keys = str(security.keygen(os.path.join(self._tmp, "keys")))
        self._spawn("scheduler", [sys.executable, "-m", "pserver", "scheduler",
                                  *self.scheduler_args],
                    {**self.env(), "PSERVER_NUM_WORKERS": str(self.expected_default)})
        for i in range(self.num_servers):
            self._spawn(f"server {i}", [sys.executable, "-m", "pserver", "server",
                                        *self.server_args], self.env(i))
        return self

    def wait_scheduler(self, timeout: float = 30.0) -> dict:
        """Block until the scheduler answers a status request; return the status."""
        from .membership.client import scheduler_request

        deadline = time.monotonic() + timeout
        while True:
            try:
                return scheduler_request(self.config(), "status", role="scheduler" if not self.insecure
                                         else "worker", timeout=1.0).meta
            except PServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = subprocess.PIPE if self.prefix_output else None
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                preexec_fn=_die_with_parent)
        self.procs[name] = proc
        if out:
            t = _Prefixer(proc.stdout, f"[{name}] ", sys.stdout)
            t.start()
            self._threads.append(t)
        return proc

    def spawn_worker(self, cmd: Sequence[str], rank: int | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one worker process running ``cmd`` (returns its Popen)."""
        full = self.env(rank)
        full.update(env or {})
        name = f"worker {rank if rank is not None else len(self.procs)}"
        return self._spawn(name, list(cmd), full)

    def run_workers(self, cmd: Sequence[str], env: dict[str, str] | None = None,
                    timeout: float | None = None, stop_on_error: bool = True) -> int:
        """Run ``cmd`` once per worker rank; return the job's exit code (``WorkerExits.code``:
        0 if no worker failed in its own code and one finished; a worker killed by a signal is
        survived, the others go on without it). A worker exiting with an error code stops the
        others when ``stop_on_error`` (the cluster is stopped by the caller's ``with`` block).

        Raises: PServerError if the workers did not finish within ``timeout`` seconds or the
        scheduler died; the workers still running are killed then."""
        workers = [self.spawn_worker(cmd, rank, env) for rank in range(self.num_workers)]
        deadline = None if timeout is None else time.monotonic() + timeout
        exits = WorkerExits(stop_on_error)
        grace = self.config().scheduler_grace
        stopped: set[int] = set()  # workers we terminated: their exit codes are not the failure
        try:
            while workers:
                for w in list(workers):
                    rc = w.poll()
                    if rc is None:
                        continue
                    workers.remove(w)
                    if w.pid in stopped:
                        continue
                    if not exits.exited(rc):
                        if rc < 0:
                            log.error("a worker was killed (signal %d): the others go on without "
                                      "it", -rc)
                        elif rc > 0:
                            log.error("a worker exited with code %d", rc)
                        continue
                    log.error("a worker exited with code %d: stopping the others", rc)
                    for other in workers:
                        stopped.add(other.pid)
                        other.terminate()
                if deadline is not None and time.monotonic() > deadline:
                    raise PServerError(f"workers did not finish within {timeout} s")
                if self._scheduler_gone(grace):
                    raise PServerError(f"the scheduler died and was not replaced within "
                                       f"{grace:g} s (PSERVER_SCHEDULER_GRACE)")
                time.sleep(0.02)
        finally:
            for w in workers:
                w.kill()
        return exits.code

    def _scheduler_gone(self, grace: float) -> bool:
        """Whether the scheduler has been dead for ``grace`` seconds (nodes serve on meanwhile,
        and :meth:`restart_scheduler` may replace it)."""
        sched = self.procs.get("scheduler")
        if sched is None or sched.poll() is None or sched.returncode == 0:
            self._scheduler_down_since = None
            return False
        now = time.monotonic()
        if self._scheduler_down_since is None:
            self._scheduler_down_since = now
        return now - self._scheduler_down_since > grace

    def checkpoint(self, directory: str | None = None, timeout: float = 600.0) -> dict:
        """Write a checkpoint now (to ``directory``, default the cluster's checkpoint_dir) and return
        its summary (name, path, keys, bytes, seconds). Raises RemoteError if it was aborted."""
        from .membership.client import scheduler_request

        meta = {DIR: os.path.abspath(directory)} if directory else {}
        return scheduler_request(self.config(), "checkpoint", meta, role="scheduler",
                                 timeout=timeout).meta

    def add_server(self) -> str:
        """Start one more server; it joins the running cluster (its key ranges arrive by a
        two-phase migration). Returns its process name for kill()/leave()."""
        n = sum(1 for name in self.procs if name.startswith("server "))
        name = f"server {n}"
        self._spawn(name, [sys.executable, "-m", "pserver", "server", "--join", *self.server_args],
                    self.env())
        return name

    def restart_scheduler(self) -> None:
        """Start a new scheduler on the address of one that died (``pserver scheduler --recover``):
        it rebuilds the view from the nodes, which serve on meanwhile. Raises PServerError if
        the old one still runs."""
        old = self.procs.get("scheduler")
        if old is not None and old.poll() is None:
            raise PServerError("the scheduler is still running: kill it first")
        self._spawn("scheduler", [sys.executable, "-m", "pserver", "scheduler", "--recover",
                                  *self.scheduler_args],
                    {**self.env(), "PSERVER_NUM_WORKERS": str(self.expected_default)})

    def leave(self, name: str) -> None:
        """Ask one server to leave gracefully (SIGTERM: it hands its ranges over, then exits)."""
        self.procs[name].send_signal(signal.SIGTERM)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one process of the cluster (``"server 1"``, ``"scheduler"``, ...)."""
        self.procs[name].send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down: ask the scheduler to stop the cluster, then terminate whatever is left."""
        sched = self.procs.get("scheduler")
        if sched is not None and sched.poll() is None:
            try:  # after its last worker left, the scheduler is already shutting down by itself
                sched.wait(0.5)
            except subprocess.TimeoutExpired:
                try:
                    _request_shutdown(self)
                except PServerError as e:
                    log.debug("shutdown request failed: %s", e)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._threads:
            t.join(timeout=1)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _worse(a: int, b: int) -> int:
    """The worse of two exit codes: any failure beats success, signals count as failures."""
    if a == 0:
        return b
    if b == 0:
        return a
    return max(a, b, key=abs)


def _request_shutdown(cluster: LocalCluster) -> None:
    from .membership.client import scheduler_request

    scheduler_request(cluster.config(), "shutdown", role="scheduler", timeout=1.0)
