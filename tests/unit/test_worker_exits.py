"""The launcher's decision on a worker's exit (pserver/worker_exits.py)."""

from pserver.worker_exits import WorkerExits


def test_a_worker_killed_by_a_signal_is_survived_and_the_job_succeeds():
    exits = WorkerExits(stop_on_error=True)
    assert exits.exited(-9) is False          # the others go on
    assert exits.exited(0) is False
    assert exits.code == 0


def test_every_worker_killed_is_a_failed_job():
    exits = WorkerExits()
    exits.exited(-9)
    exits.exited(-15)
    assert exits.code == -15


def test_an_error_exit_stops_the_others_only_when_asked_and_fails_the_job():
    assert WorkerExits(stop_on_error=True).exited(1) is True
    exits = WorkerExits(stop_on_error=False)
    assert exits.exited(1) is False
    exits.exited(0)
    exits.exited(-9)
    assert exits.code == 1
