"""The engines' decisions without an engine: key shares, Ray bundles and commands, Slurm steps and
ranks, and the `pserver launch --backend` errors a user meets outside an engine."""

from __future__ import annotations

import stat

import pytest

from pserver import cli, security
from pserver.engines import ray as ray_engine
from pserver.engines import slurm, slurm_task
from pserver.engines.keyfiles import KeyFiles
from pserver.errors import ConfigError


@pytest.fixture
def keys(tmp_path):
    return security.keygen(tmp_path / "keys")


@pytest.mark.parametrize("role", security.ROLES)
def test_a_role_share_holds_every_public_key_and_only_its_own_secret(keys, tmp_path, role):
    share = KeyFiles.read(keys, role)
    assert sorted(share.files) == sorted([f"public/{r}.key" for r in security.ROLES]
                                         + [f"private/{role}.key_secret"])
    placed = share.write(tmp_path)
    assert stat.S_IMODE(placed.stat().st_mode) == 0o700
    assert stat.S_IMODE((placed / f"private/{role}.key_secret").stat().st_mode) == 0o600
    creds = security.Credentials.load(placed, role)   # usable as that role's PSERVER_KEYS
    assert creds.secure
    others = [r for r in security.ROLES if r != role]
    for other in others:
        with pytest.raises(security.AuthError):
            security.Credentials.load(placed, other)


def test_a_share_never_shows_a_key(keys):
    share = KeyFiles.read(keys, "server")
    secret = share.files["private/server.key_secret"].decode()
    key_line = next(line for line in secret.splitlines() if "secret-key" in line)
    assert key_line.split('"')[1] not in repr(share) + str(share)


@pytest.mark.parametrize("name", ["../escape", "private/../../x", "public/", "other/x.key",
                                  "public/a/b", "private/.."])
def test_a_forged_share_cannot_write_outside_its_directory(tmp_path, name):
    with pytest.raises(ConfigError, match="public/NAME or private/NAME"):
        KeyFiles("worker", {name: b"x"}).write(tmp_path)
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path.parent / "x").exists()


def test_reading_a_share_from_an_incomplete_directory_says_what_to_do(keys):
    (keys / "private" / "worker.key_secret").unlink()
    with pytest.raises(ConfigError, match="pserver keygen"):
        KeyFiles.read(keys, "worker")
    with pytest.raises(ConfigError, match="not a role"):
        KeyFiles.read(keys, "driver")


# -- Ray ------------------------------------------------------------------------------------------
def test_ray_bundles_declare_the_scheduler_then_one_per_server():
    res = ray_engine.Resources(scheduler_cpus=0.25, scheduler_memory=1, server_cpus=2,
                               server_memory=3)
    assert ray_engine.bundles(2, res) == [{"CPU": 0.25, "memory": 1}, {"CPU": 2, "memory": 3},
                                          {"CPU": 2, "memory": 3}]


def test_a_server_restarted_by_ray_joins_and_a_fresh_one_does_not():
    fresh = ray_engine.role_argv("server", False, (), ("--plugin", "m"))
    again = ray_engine.role_argv("server", True, (), ("--plugin", "m"))
    assert fresh[-3:] == ["server", "--plugin", "m"]
    assert again[-4:] == ["server", "--join", "--plugin", "m"]
    assert ray_engine.role_argv("scheduler", False, ("--keep-alive",))[-2:] == ["scheduler",
                                                                               "--keep-alive"]


def test_start_cluster_refuses_a_cluster_without_servers():
    with pytest.raises(ConfigError, match="at least one server"):
        ray_engine.start_cluster(0, 1)


# -- Slurm ----------------------------------------------------------------------------------------
def test_outside_an_allocation_the_slurm_backend_says_how_to_get_one():
    with pytest.raises(ConfigError, match="salloc"):
        slurm.Allocation.from_env({"PATH": "/bin"})


def test_the_allocation_lists_its_nodes_in_slurm_order():
    alloc = slurm.Allocation.from_env({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-3]"},
                                      expand=lambda nl: ["n1", "n2", "n3"])
    assert alloc == slurm.Allocation("7", ("n1", "n2", "n3"))


def test_each_role_is_its_own_step_so_its_ranks_start_at_zero():
    """One step per role: Slurm numbers each step's tasks 0..n-1 (SLURM_PROCID), so worker ranks
    are contiguous whatever the servers' count - unlike one step for all roles."""
    nodes = ("n1", "n2", "n3")
    sched = slurm.srun_argv("scheduler", 1, nodes, "/run", ["s"])
    servers = slurm.srun_argv("server", 2, nodes, "/run", ["v"])
    workers = slurm.srun_argv("worker", 5, nodes, "/run", ["python", "train.py"])
    assert sched[0] == "srun" and "--nodelist=n1" in sched and "--ntasks=1" in sched
    assert "--ntasks=2" in servers and "--nodes=2" in servers and "--kill-on-bad-exit=0" in servers
    assert "--ntasks=5" in workers and "--nodes=3" in workers and "--kill-on-bad-exit=1" in workers
    assert "--distribution=cyclic" in workers
    assert workers[workers.index("pserver.engines.slurm_task"):] == [
        "pserver.engines.slurm_task", "worker", "/run", "--", "python", "train.py"]


@pytest.mark.parametrize("role", ["server", "worker"])
def test_a_task_rank_is_its_step_procid(role):
    env = slurm_task.task_env(role, {"SLURM_PROCID": "3", "PSERVER_RANK": "9"})
    assert env["PSERVER_RANK"] == "3"


def test_the_scheduler_task_gets_no_rank_and_a_task_outside_srun_is_refused():
    assert "PSERVER_RANK" not in slurm_task.task_env("scheduler", {"SLURM_PROCID": "0"})
    with pytest.raises(ConfigError, match="srun"):
        slurm_task.task_env("worker", {})


def test_the_scheduler_advertises_the_host_the_user_chose():
    assert slurm_task.scheduler_host({"PSERVER_ADVERTISE_HOST": "10.1.2.3"}) == "10.1.2.3"


def test_steps_do_not_inherit_the_launchers_own_rank_scheduler_or_keys():
    env = slurm.cluster_env({"PATH": "/bin", "PSERVER_RANK": "4", "PSERVER_SCHEDULER": "h:1",
                             "PSERVER_KEYS": "/k"}, 2, 3, {"replication": 1}, "INFO")
    assert env == {"PATH": "/bin", "PSERVER_NUM_SERVERS": "2", "PSERVER_NUM_WORKERS": "3",
                   "PSERVER_REPLICATION": "1", "PSERVER_LOG_LEVEL": "INFO"}


def test_role_commands_run_the_roles_and_the_users_program():
    cmds = slurm.role_commands(["python", "train.py"], ["--keep-alive"], ["--plugin", "m"],
                               python="py")
    assert cmds == {"scheduler": ["py", "-m", "pserver", "scheduler", "--keep-alive"],
                    "server": ["py", "-m", "pserver", "server", "--plugin", "m"],
                    "worker": ["python", "train.py"]}


# -- the command line -----------------------------------------------------------------------------
def test_launch_backend_slurm_outside_an_allocation_fails_with_advice(monkeypatch, capsys):
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["launch", "--backend", "slurm", "-s", "1", "-w", "1", "--", "true"]) == 1
    assert "salloc" in capsys.readouterr().err


def test_address_is_refused_under_slurm(monkeypatch, capsys):
    assert cli.main(["launch", "--backend", "slurm", "--address", "auto", "--", "true"]) == 1
    assert "--address is Ray's" in capsys.readouterr().err
