"""One task of a `pserver launch --backend slurm` step: take the rank from this step's own
SLURM_PROCID (contiguous per role), and for the scheduler choose a port and publish
``host:port`` in the run directory; then exec the role's command.

    python -m pserver.engines.slurm_task ROLE RUN_DIR -- COMMAND...
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..config import interface_address
from ..errors import ConfigError


def task_env(role: str, env: Mapping[str, str]) -> dict[str, str]:
    """The task's environment (pure): PSERVER_RANK from SLURM_PROCID, which srun numbers per step.

    Raises:
        ConfigError: no SLURM_PROCID (not started by srun).
    """
    procid = env.get("SLURM_PROCID")
    if procid is None or not procid.isdigit():
        raise ConfigError("pserver.engines.slurm_task runs under srun (no SLURM_PROCID); use "
                          "`pserver launch --backend slurm`")
    out = dict(env)
    if role != "scheduler":
        out["PSERVER_RANK"] = procid
    return out


def scheduler_host(env: Mapping[str, str]) -> str:
    """The address the other nodes reach the scheduler at: PSERVER_ADVERTISE_HOST, else
    PSERVER_INTERFACE's address, else this node's host name."""
    if env.get("PSERVER_ADVERTISE_HOST"):
        return env["PSERVER_ADVERTISE_HOST"]
    if env.get("PSERVER_INTERFACE"):
        return interface_address(env["PSERVER_INTERFACE"])
    return socket.gethostname()


def publish(run_dir: str, address: str) -> None:
    """Write the scheduler's address where the launcher waits for it (atomically)."""
    from .slurm import ADDRESS_FILE

    tmp = Path(run_dir) / f".{ADDRESS_FILE}.{os.getpid()}"
    tmp.write_text(address + "\n")
    os.replace(tmp, Path(run_dir) / ADDRESS_FILE)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    role, run_dir, command = argv[0], argv[1], list(argv[3:])
    try:
        env = task_env(role, os.environ)
    except ConfigError as e:
        print(f"pserver slurm task: {e}", file=sys.stderr)
        return 2
    if role == "scheduler":
        port = int(env.pop("PSERVER_PORT", "0") or 0)
        if not port:
            with socket.socket() as s:  # a free port of this node; the scheduler binds it next
                s.bind(("", 0))
                port = s.getsockname()[1]
        env["PSERVER_SCHEDULER"] = f"{scheduler_host(env)}:{port}"
        publish(run_dir, env["PSERVER_SCHEDULER"])
    os.execvpe(command[0], command, env)
    return 127  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
