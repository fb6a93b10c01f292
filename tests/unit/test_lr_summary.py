"""The LR job's summary text and its launch clock (no cluster: plain dicts and the environment)."""

from __future__ import annotations

import pytest

from pserver.apps.lr import worker


def summary(**kw) -> dict:
    s = {"examples": 1000, "workers": 2, "servers": 2, "passes": 2, "train_seconds": 1.5,
         "train_objective": 123.0, "nnz": 10, "idle_fraction": 0.1, "bytes_sent": 1e6,
         "bytes_received": 2e6, "total_seconds": 3.0, "history": [{"epoch": 0}, {"epoch": 1}]}
    s.update(kw)
    return s


def test_summary_names_each_pass_held_out_logloss_with_its_time_from_launch():
    ttq = [{"epoch": 0, "seconds_from_launch": 2.04, "logloss": 0.51234, "auc": 0.8},
           {"epoch": 1, "seconds_from_launch": 3.5, "logloss": 0.49, "auc": 0.81}]
    text = worker.format_summary(summary(time_to_quality=ttq))
    assert "held-out logloss after each pass (seconds from launch): 1: 0.51234 (2.0 s), " \
           "2: 0.49000 (3.5 s)" in text
    assert "train objective 1.230000e+02" in text
    assert "seconds from launch" not in worker.format_summary(summary())


def test_ftrl_summary_reports_the_progressive_logloss_not_an_objective():
    text = worker.format_summary(summary(history=[{"epoch": 0, "progressive_logloss": 0.4321}]))
    assert "progressive logloss 0.43210" in text and "train objective" not in text


@pytest.mark.parametrize("value,expected", [("1700000000.25", 1700000000.25), ("", None),
                                            ("garbage", None)])
def test_launch_time_from_the_environment_else_the_process_start(monkeypatch, value, expected):
    monkeypatch.setenv("PSERVER_LR_LAUNCH_TIME", value)
    monkeypatch.setitem(worker.TIMELINE, "main", [1234.5, 0, 0, 0])
    assert worker.launch_time() == (expected if expected is not None else 1234.5)


def test_demo_and_train_options_reach_the_worker_intact(monkeypatch, tmp_path):
    """The demo builds train lr's options by hand: every one that `train lr` and the worker
    read must be there (the cluster is a stand-in that records the worker command)."""
    import argparse

    import pserver.launch
    from pserver.apps.lr import cli

    commands, envs = [], []

    class Cluster:
        def __init__(self, *a, env=None, **kw):
            envs.append(env)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run_workers(self, argv, **options):
            commands.append(argv)
            return 0

    monkeypatch.setattr(pserver.launch, "LocalCluster", Cluster)
    monkeypatch.delenv("PSERVER_SCHEDULER", raising=False)
    assert cli.cmd_demo(argparse.Namespace(examples=1000, dir=str(tmp_path))) == 0
    p = argparse.ArgumentParser()
    worker.add_train_args(p)
    argv = commands[0][commands[0].index("pserver.apps.lr.worker") + 1:]
    args = p.parse_args(argv)
    assert (args.solver, args.l1, args.tau, args.epochs) == ("dbpg", "4.0", 0, 5)
    assert float(envs[0]["PSERVER_LR_LAUNCH_TIME"]) > 0      # time to quality's clock
