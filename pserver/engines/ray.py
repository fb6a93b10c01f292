"""pserver on Ray (`pip install 'pserver[ray]'`): the scheduler and the servers are Ray actors in one
placement group (declared CPUs and memory), each running its role as a child process; workers are
Ray actors that run a function or a command with the PSERVER_* environment set. A server actor that
dies is restarted by Ray and its server joins again. Actors are owned by the driver, so Ray tears
everything down when the driver exits. Keys travel as actor arguments, never in the environment."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import security
from ..config import Config, settings_env
from ..errors import ConfigError, PServerError
from ..launch import _die_with_parent, _worse, free_port
from .keyfiles import KeyFiles

log = logging.getLogger(__name__)
_MB = 1 << 20


@dataclass(frozen=True)
class Resources:
    """What each actor declares to Ray (CPUs may be fractions; memory in bytes). A server's CPU is
    mostly waiting on its socket; the defaults fit a laptop. Raise ``server_memory`` to the
    tables' size so Ray places servers where that memory is free."""

    scheduler_cpus: float = 0.25
    scheduler_memory: int = 256 * _MB
    server_cpus: float = 0.5
    server_memory: int = 512 * _MB
    worker_cpus: float = 0.5
    worker_memory: int = 256 * _MB


def bundles(num_servers: int, res: Resources) -> list[dict[str, float]]:
    """Placement-group bundles (pure): the scheduler's first, then one per server."""
    return ([{"CPU": res.scheduler_cpus, "memory": res.scheduler_memory}]
            + [{"CPU": res.server_cpus, "memory": res.server_memory}] * num_servers)


def role_argv(role: str, restarted: bool, scheduler_args: Sequence[str] = (),
              server_args: Sequence[str] = ()) -> list[str]:
    """The child command of a role actor (pure): a server restarted by Ray joins the running
    cluster (it gets its ranges by migration, not a fresh rank)."""
    if role == "scheduler":
        return [sys.executable, "-m", "pserver", "scheduler", *scheduler_args]
    return [sys.executable, "-m", "pserver", "server", *(["--join"] if restarted else []), *server_args]


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray backend needs Ray: pip install 'pserver[ray]'") from None
    return ray


class _RoleActor:
    """A scheduler or server: its role runs as a child process that dies with this actor."""

    def __init__(self, role: str, rank: int, env: dict[str, str], keys: KeyFiles | None,
                 argv_args: tuple[Sequence[str], Sequence[str]]):
        import ray

        with warnings.catch_warnings():  # Ray's own property trips its deprecation warning
            warnings.simplefilter("ignore")
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.host = ray.util.get_node_ip_address()
        self.node = ray.get_runtime_context().get_node_id()
        self.env = {**os.environ, **env}
        self._keys = _place_keys(self.env, keys)
        if role == "scheduler":
            self.env["PSERVER_SCHEDULER"] = f"{self.host}:{env.get('PSERVER_PORT') or free_port(self.host)}"
        elif not restarted:
            self.env["PSERVER_RANK"] = str(rank)
        self.env.pop("PSERVER_PORT", None)
        # the main thread spawns it: PDEATHSIG follows the spawning thread, so the role dies
        # exactly when this actor's process does
        self.proc = subprocess.Popen(role_argv(role, restarted, *argv_args), env=self.env,
                                     preexec_fn=_die_with_parent)

    def info(self) -> dict[str, Any]:
        """Where this role runs: scheduler address, node id, child pid, exit code (None = alive)."""
        return {"scheduler": self.env.get("PSERVER_SCHEDULER"), "node": self.node,
                "pid": self.proc.pid, "returncode": self.proc.poll()}


class _WorkerActor:
    """A worker: runs a function in its own process, or a command, with the environment set."""

    def __init__(self, rank: int, env: dict[str, str], keys: KeyFiles | None):
        import ray

        self.env = {**env, "PSERVER_RANK": str(rank)}
        self._keys = _place_keys(self.env, keys)
        self.node = ray.get_runtime_context().get_node_id()

    def call(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        os.environ.update(self.env)  # this actor's process serves this worker only
        return fn(*args, **kwargs)

    def run(self, command: Sequence[str], cwd: str | None) -> int:
        """Run ``command`` (its output goes to Ray's log stream, shown by the driver)."""
        env = {**os.environ, **self.env}
        cwd = cwd if cwd and os.path.isdir(cwd) else None
        return subprocess.run(list(command), env=env, cwd=cwd, preexec_fn=_die_with_parent).returncode

    def where(self) -> str:
        return self.node


def _place_keys(env: dict[str, str], keys: KeyFiles | None) -> str | None:
    """Write this role's keys into a private directory of this node (removed when the actor's
    process exits normally) and point PSERVER_KEYS at it."""
    if keys is None:
        env["PSERVER_INSECURE"] = "1"
        return None
    path = str(keys.write())
    atexit.register(shutil.rmtree, path, True)
    env["PSERVER_KEYS"] = path
    env.pop("PSERVER_INSECURE", None)
    return path


class RayCluster:
    """A running pserver cluster on Ray. ``scheduler`` is its address; ``run``/``run_command``
    run the workers; ``stop()`` (or leaving the ``with`` block, or the driver exiting) ends it."""

    def __init__(self, num_servers: int, num_workers: int, *, insecure: bool, keys: str | None,
                 port: int, settings: Mapping[str, Any], scheduler_args: Sequence[str],
                 server_args: Sequence[str], resources: Resources, server_restarts: int,
                 log_level: str | None, timeout: float):
        ray = _ray()
        from ray.util.placement_group import placement_group

        self.num_servers, self.num_workers, self.resources = num_servers, num_workers, resources
        self.insecure = insecure
        self._tmp = None if insecure or keys else tempfile.mkdtemp(prefix="pserver-ray-")
        self.keys = None if insecure else (keys or str(security.keygen(f"{self._tmp}/keys")))
        self.env = settings_env(settings)
        self.env.update({"PSERVER_NUM_SERVERS": str(num_servers),
                         "PSERVER_NUM_WORKERS": str(num_workers)})
        if log_level:
            self.env["PSERVER_LOG_LEVEL"] = log_level
        self.pg = placement_group(bundles(num_servers, resources), strategy="SPREAD")
        self.servers: list = []
        self.workers: list = []
        self.scheduler_actor = None
        self.scheduler = ""
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise PServerError(f"Ray could not place the scheduler and {num_servers} servers within "
                               f"{timeout:.0f} s: the cluster lacks {bundles(num_servers, resources)} "
                               f"(lower Resources or add nodes)") from None
        try:
            self._start_actors(port, scheduler_args, server_args, server_restarts, timeout)
        except BaseException:
            self.stop()  # nothing half-started stays placed
            raise

    def _start_actors(self, port: int, scheduler_args: Sequence[str], server_args: Sequence[str],
                      server_restarts: int, timeout: float) -> None:
        ray = _ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resources = self.resources
        role = ray.remote(_RoleActor)

        def placed(i: int, cpus: float, memory: int, restarts: int):
            return role.options(num_cpus=cpus, memory=memory, max_restarts=restarts,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(
                                    placement_group=self.pg, placement_group_bundle_index=i))

        args = (tuple(scheduler_args), tuple(server_args))
        sched_env = {**self.env, **({"PSERVER_PORT": str(port)} if port else {})}
        self.scheduler_actor = placed(0, resources.scheduler_cpus, resources.scheduler_memory, 0).remote(
            "scheduler", 0, sched_env, self._share("scheduler"), args)
        try:
            self.scheduler = ray.get(self.scheduler_actor.info.remote(), timeout=timeout)["scheduler"]
            self.env["PSERVER_SCHEDULER"] = self.scheduler
            self.servers = [placed(1 + i, resources.server_cpus, resources.server_memory,
                                   server_restarts).remote("server", i, self.env,
                                                           self._share("server"), args)
                            for i in range(self.num_servers)]
            ray.get([s.info.remote() for s in self.servers], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise PServerError(f"the scheduler and servers' actors did not start within {timeout:.0f} "
                               f"s (see the Ray logs of their nodes)") from None
        worker = ray.remote(_WorkerActor)
        self.workers = [worker.options(num_cpus=resources.worker_cpus, memory=resources.worker_memory,
                                       scheduling_strategy="SPREAD").remote(r, self.env,
                                                                            self._share("worker"))
                        for r in range(self.num_workers)]

    def _share(self, role: str) -> KeyFiles | None:
        return None if self.keys is None else KeyFiles.read(self.keys, role)

    def config(self, rank: int | None = None) -> Config:
        """A Config for this driver process (with the cluster's keys; ``rank`` for a worker)."""
        env = {**self.env, **({"PSERVER_RANK": str(rank)} if rank is not None else {})}
        env.update({"PSERVER_INSECURE": "1"} if self.keys is None else {"PSERVER_KEYS": self.keys})
        return Config.from_env(env)

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> list:
        """Start ``fn(*args, **kwargs)`` on every worker actor; returns their ObjectRefs."""
        return [w.call.remote(fn, args, kwargs) for w in self.workers]

    def run(self, fn: Callable, *args: Any, timeout: float | None = None, **kwargs: Any) -> list:
        """``fn(*args, **kwargs)`` on every worker (ranks 0..W-1), their results in rank order.

        Raises:
            ray.exceptions.RayTaskError: a worker's function raised (it wraps that exception).
            ray.exceptions.GetTimeoutError: not done within ``timeout`` seconds.
        """
        return _ray().get(self.submit(fn, *args, **kwargs), timeout=timeout)

    def submit_command(self, command: Sequence[str], cwd: str | None = None) -> list:
        """Start ``command`` once per worker rank (in ``cwd``, default this directory if the node
        has it); returns ObjectRefs of their exit codes."""
        cwd = cwd or os.getcwd()
        return [w.run.remote(list(command), cwd) for w in self.workers]

    def run_command(self, command: Sequence[str], cwd: str | None = None,
                    timeout: float | None = None) -> int:
        """Run ``command`` once per worker rank; returns the worst exit code (0 if all succeeded)."""
        worst = 0
        for rc in _ray().get(self.submit_command(command, cwd), timeout=timeout):
            worst = _worse(worst, rc)
        return worst

    def kill_server(self, index: int) -> None:
        """Kill one server actor's process (as a crash would); Ray restarts it and it joins again."""
        _ray().kill(self.servers[index], no_restart=False)

    def placement(self) -> dict[str, list[str]]:
        """The Ray node id of every actor, by role (to see how they were spread)."""
        ray = _ray()
        roles = {"scheduler": [self.scheduler_actor], "server": self.servers}
        out = {r: [i["node"] for i in ray.get([a.info.remote() for a in actors])]
               for r, actors in roles.items()}
        out["worker"] = ray.get([w.where.remote() for w in self.workers])
        return out

    def stop(self) -> None:
        """Kill every actor (their children die with them), free the placement group, and remove
        the driver's keys. Safe to call twice."""
        ray = _ray()
        from ray.util.placement_group import remove_placement_group

        for actor in [*self.workers, *self.servers, self.scheduler_actor]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.workers, self.servers, self.scheduler_actor = [], [], None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_cluster(num_servers: int = 1, num_workers: int = 1, *, insecure: bool = False,
                  keys: str | None = None, port: int = 0, settings: Mapping[str, Any] | None = None,
                  scheduler_args: Sequence[str] = (), server_args: Sequence[str] = (),
                  resources: Resources | None = None, server_restarts: int = 3,
                  log_level: str | None = None, timeout: float = 120.0) -> RayCluster:
    """Start a cluster on the Ray cluster this driver is connected to (`ray.init` first; without
    it, Ray starts a local one). Secure by default: fresh CURVE keys, or those of ``keys``.
    ``settings`` are Config fields for every node (``{"replication": 1}``); ``server_restarts``:
    how often Ray brings a dead server back (it joins again). Returns the RayCluster, whose
    ``scheduler`` is the address; the scheduler exits after its workers leave, unless
    ``scheduler_args=["--keep-alive"]``.

    Raises:
        ConfigError: Ray is not installed, fewer than one server, or a bad keys directory.
        PServerError: Ray could not place the actors within ``timeout`` seconds.
    """
    if num_servers < 1 or num_workers < 0:
        raise ConfigError("a cluster needs at least one server and zero or more workers")
    return RayCluster(num_servers, num_workers, insecure=insecure, keys=keys, port=port,
                      settings=dict(settings or {}), scheduler_args=scheduler_args,
                      server_args=server_args, resources=resources or Resources(),
                      server_restarts=server_restarts, log_level=log_level, timeout=timeout)


def run_workers(fn: Callable, *args: Any, num_servers: int = 1, num_workers: int = 1,
                **options: Any) -> list:
    """Start a cluster, run ``fn(*args)`` on its W workers, stop it; returns their results in rank
    order. ``options`` are start_cluster's. Raises what start_cluster and RayCluster.run raise."""
    with start_cluster(num_servers, num_workers, **options) as cluster:
        return cluster.run(fn, *args)


def launch(command: Sequence[str], kw: Mapping[str, Any], address: str | None = None) -> int:
    """`pserver launch --backend ray`: connect to ``address`` (auto, HOST:PORT, or by default
    RAY_ADDRESS or a new local Ray), run the cluster and ``command`` per worker, tear down.
    Returns the worst exit code.

    Raises:
        ConfigError, PServerError: as start_cluster; PServerError also when Ray fails the run (a
            worker actor or its node lost). The cluster is torn down either way.
    """
    ray = _ray()
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=True,
             configure_logging=False)
    try:
        with start_cluster(kw["num_servers"], kw["num_workers"], insecure=bool(kw.get("insecure")),
                           keys=kw.get("keys"), port=kw.get("port") or 0, settings=kw.get("settings"),
                           scheduler_args=kw.get("scheduler_args", ()),
                           server_args=kw.get("server_args", ()),
                           log_level=kw.get("log_level")) as cluster:
            print(f"pserver: scheduler at {cluster.scheduler} on Ray, {kw['num_servers']} servers, "
                  f"{kw['num_workers']} workers" + ("" if cluster.insecure else ", secure"),
                  file=sys.stderr)
            return cluster.run_command(command)
    except ray.exceptions.RayError as e:  # e.g. a worker actor's node was lost
        raise PServerError(f"Ray failed the run: {e}") from e
    finally:
        ray.shutdown()
