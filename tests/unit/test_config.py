"""Settings read from the environment and the command line: validation of the busy-polling knobs."""

from __future__ import annotations

import pytest

from pserver.config import Config
from pserver.errors import ConfigError


def test_a_workers_busy_polling_is_off_by_default_and_must_not_be_negative():
    assert Config.from_env({}).worker_busy_poll == 0.0
    assert Config.from_env({"PSERVER_WORKER_BUSY_POLL": "0.0005"}).worker_busy_poll == 0.0005
    with pytest.raises(ConfigError, match=r"PSERVER_WORKER_BUSY_POLL \(--worker-busy-poll\)"):
        Config.from_env({"PSERVER_WORKER_BUSY_POLL": "-0.5"})


def test_launch_takes_the_workers_busy_polling_and_a_server_does_not():
    from pserver.cli import build_parser

    args = build_parser().parse_args(["launch", "--worker-busy-poll", "0.001", "--", "true"])
    assert args.worker_busy_poll == 0.001
    with pytest.raises(SystemExit):  # a worker setting: not a flag of `pserver server`
        build_parser().parse_args(["server", "--worker-busy-poll", "0.001"])
