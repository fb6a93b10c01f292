"""The launcher and the CLI, as a user runs them (real processes)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import pserver

from .conftest import PROGRAMS, pserver_cli


def _pids_alive(pids):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_launch_runs_the_readme_job_securely_and_prefixes_output():
    r = pserver_cli("launch", "-s", "2", "-w", "2", "--", sys.executable,
                    str(PROGRAMS / "readme_train.py"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[worker 0] rank 0 of 2 done" in r.stdout and "[worker 1] rank 1 of 2 done" in r.stdout
    assert "keys in" in r.stderr            # the default cluster is secure, with ephemeral keys
    assert "WITHOUT authentication" not in r.stdout + r.stderr


def test_launch_exits_with_the_worst_code_and_leaves_no_process(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(
        "import os, sys, pserver\n"
        "kv = pserver.KVWorker()\n"
        "open(os.environ['OUT'] + f'/pids{kv.rank}', 'w').write(' '.join(\n"
        "    str(n.pid) for n in kv.membership.view.nodes.values()))\n"
        "kv.barrier()\n"
        "sys.exit(3 if kv.rank == 1 else 0)\n")
    r = pserver_cli("launch", "-s", "1", "-w", "2", "--insecure", "--", sys.executable, str(script),
                    env={"OUT": str(tmp_path)})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "WITHOUT authentication" in r.stdout + r.stderr  # --insecure warns
    pids = [int(p) for p in (tmp_path / "pids0").read_text().split()]
    assert pids and _pids_alive(pids) == []


def test_launch_without_a_command_is_a_clear_error():
    r = pserver_cli("launch", "-s", "1", "-w", "1")
    assert r.returncode == 2 and "give the worker command after --" in r.stderr


def test_status_table_and_json(cluster_factory):
    cluster = cluster_factory(2, 1)
    kv = pserver.KVWorker(cluster.config(0))
    try:
        env = {"PSERVER_SCHEDULER": cluster.scheduler, "PSERVER_INSECURE": "1"}
        r = pserver_cli("status", "--json", env=env)
        assert r.returncode == 0, r.stderr
        view = json.loads(r.stdout)
        roles = sorted(n["role"] for n in view["nodes"])
        assert roles == ["server", "server", "worker"]
        assert all(n["state"] == "up" and n["last_heartbeat"] < 1.0 for n in view["nodes"])
        shares = [n["ring_share"] for n in view["nodes"] if n["role"] == "server"]
        assert sum(shares) == pytest.approx(1.0, abs=0.01)
        table = pserver_cli("status", env=env).stdout
        assert "ROLE" in table and "RING SHARE" in table and table.count("server") >= 2
    finally:
        kv.close()


def test_status_of_an_absent_scheduler_is_a_clear_error():
    from pserver.launch import free_port

    r = pserver_cli("status", "--timeout", "0.5",
                    env={"PSERVER_SCHEDULER": f"127.0.0.1:{free_port()}", "PSERVER_INSECURE": "1"})
    assert r.returncode == 1 and "no answer from the scheduler" in r.stderr


def test_missing_keys_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSERVER_")}
    env["PSERVER_SCHEDULER"] = "127.0.0.1:9"
    r = pserver_cli("status", env=env)
    assert r.returncode == 1 and "pserver keygen" in r.stderr


def test_user_update_rule_from_a_plugin(cluster_factory):
    cluster = cluster_factory(1, 1, server_args=["--plugin", "myrules"],
                              env={"PYTHONPATH": str(PROGRAMS)})
    kv = pserver.KVWorker(cluster.config(0))
    try:
        kv.declare_table("w", updater="clip")
        keys = np.arange(3, dtype=np.uint64)
        kv.wait(kv.push(keys, np.array([0.5, 5.0, -7.0], np.float32), table="w"))
        assert kv.pull(keys, table="w").tolist() == [0.5, 1.0, -1.0]
        with pytest.raises(pserver.errors.TableError, match="not registered on this server"):
            kv.declare_table("v", updater="no_such_rule")
    finally:
        kv.close()


def test_keygen_cli(tmp_path):
    r = pserver_cli("keygen", str(tmp_path / "k"))
    assert r.returncode == 0
    assert (tmp_path / "k" / "private" / "worker.key_secret").exists()
    again = pserver_cli("keygen", str(tmp_path / "k"))
    assert again.returncode == 1  # refuses to overwrite


@pytest.mark.parametrize("role, flag, value, var, bad_env, says", [
    ("server", "--busy-poll", "-1", "PSERVER_BUSY_POLL", "-0.5", "busy polling"),
    ("server", "--slot-cache", "lots", "PSERVER_SLOT_CACHE", "-1", "is not a size"),
    ("scheduler", "--replica-key-cache", "8 megs", "PSERVER_REPLICA_KEY_CACHE", "-8M", "is not a size"),
])
def test_bad_node_settings_are_clear_errors(role, flag, value, var, bad_env, says):
    r = pserver_cli(role, flag, value, "--insecure",
                    env={"PSERVER_SCHEDULER": "127.0.0.1:1"}, timeout=60)
    assert r.returncode == 1
    assert f"{var} ({flag})" in r.stderr
    with pytest.raises(pserver.errors.ConfigError, match=says):
        pserver.Config.from_env({var: bad_env})


def test_slot_cache_sizes_read_from_the_environment():
    assert pserver.Config.from_env({"PSERVER_SLOT_CACHE": "0"}).slot_cache_bytes == 0
    assert pserver.Config.from_env({"PSERVER_SLOT_CACHE": "512k"}).slot_cache_bytes == 512 << 10
    assert pserver.Config.from_env({}).slot_cache_bytes == 64 << 20
    assert pserver.Config.from_env({}).replica_key_cache_bytes == 8 << 20
    assert pserver.Config.from_env({"PSERVER_REPLICA_KEY_CACHE": "0"}).replica_key_cache_bytes == 0


# -- every role option reaches `pserver launch` -------------------------------------------------
# Options launch decides itself, so it does not take them: it runs the scheduler (so knows its
# address) and numbers the nodes of each role.
LAUNCH_DECIDES = {"--scheduler", "--rank"}


def _role_options(role):
    from pserver.cli import build_parser

    sub = next(a for a in build_parser(with_apps=False)._actions if a.dest == "cmd")
    return [a for a in sub.choices[role]._actions if a.option_strings and a.dest != "help"]


def _example_argv(action):
    if action.nargs == 0:
        return [action.option_strings[-1]]
    if action.metavar == "1|0":  # a boolean setting that is on by default
        return [action.option_strings[-1], "0"]
    if action.choices:
        return [action.option_strings[-1], str(list(action.choices)[-1])]
    return [action.option_strings[-1], {int: "2", float: "0.5"}.get(action.type, "8M")]


@pytest.mark.parametrize("role", ["server", "scheduler"])
def test_launch_accepts_and_forwards_every_role_option(role):
    from pserver.cli import build_parser

    checked = 0
    for action in _role_options(role):
        if set(action.option_strings) & LAUNCH_DECIDES:
            continue
        argv = _example_argv(action)
        try:
            args = build_parser(with_apps=False).parse_args(["launch", *argv, "--", "true"])
        except SystemExit:
            pytest.fail(f"pserver launch does not accept the {role} option {argv[0]}")
        from pserver.cli import launch_cluster_kwargs

        kw, value = launch_cluster_kwargs(args), getattr(args, action.dest)
        forwarded = (argv[0] in kw[f"{role}_args"] or kw["settings"].get(action.dest) == value
                     or kw.get(action.dest) == value)
        assert forwarded, f"launch accepts the {role} option {argv[0]} but does not pass it: {kw}"
        checked += 1
    assert checked >= 10


def test_launch_passes_a_plugin_and_scheduler_settings_to_the_cluster(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(
        "import numpy as np, pserver\n"
        "kv = pserver.KVWorker()\n"
        "s = kv.membership.view.settings\n"
        "assert s['replication'] == 2 and s['replica_key_cache'] == 0, s\n"
        "kv.declare_table('w', updater='clip')\n"   # registered by the servers' --plugin
        "keys = np.arange(3, dtype=np.uint64)\n"
        "kv.wait(kv.push(keys, np.array([0.5, 5.0, -7.0], np.float32), table='w'))\n"
        "assert kv.pull(keys, table='w').tolist() == [0.5, 1.0, -1.0]\n"
        "print('settings and plugin seen')\n"
        "kv.close()\n")
    r = pserver_cli("launch", "-s", "3", "-w", "1", "--insecure", "--plugin", "myrules",
                    "--replication", "2", "--replica-key-cache", "0", "--heartbeat-timeout", "3",
                    "--", sys.executable, str(script), env={"PYTHONPATH": str(PROGRAMS)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "settings and plugin seen" in r.stdout


def test_local_cluster_settings_are_variables_of_every_process():
    from pserver.launch import LocalCluster

    c = LocalCluster(1, 1, insecure=True, settings={"max_keys": 7, "replicate_after_aggregation": False},
                     heartbeat_timeout=3.0)
    for env in (c.env(), c.env(0)):
        assert env["PSERVER_MAX_KEYS"] == "7" and env["PSERVER_REPLICATE_AFTER_AGGREGATION"] == "0"
        assert env["PSERVER_HEARTBEAT_TIMEOUT"] == "3.0"
    with pytest.raises(pserver.errors.ConfigError, match=r"sets \['host'\] itself"):
        LocalCluster(1, 1, settings={"host": "10.0.0.1"})
    with pytest.raises(pserver.errors.ConfigError, match="unknown setting 'max_key'"):
        LocalCluster(1, 1, settings={"max_key": 7})
