"""What a launcher does when one of its worker processes exits, free of I/O.

A worker killed by a signal is the failure the cluster is built to survive (the scheduler notices
it, its tasks or data shard go to the live workers): the others go on. A worker that exits with an
error code failed in its own code: the job's exit code says so, and with ``stop_on_error`` the
others are stopped (the old behaviour, for programs that cannot go on without every rank).
"""

from __future__ import annotations


class WorkerExits:
    """The exit codes of a job's workers as they come.

    ``exited(rc)`` records one and says whether the launcher must stop the others; ``code`` is the
    job's exit code once every worker is gone: 0 when no worker failed in its own code and at
    least one finished (deaths by a signal are survived), else the worst code seen.
    """

    def __init__(self, stop_on_error: bool = False) -> None:
        self.stop_on_error = stop_on_error
        self.finished = 0
        self.deaths: list[int] = []     # signal exit codes (negative), in the order seen
        self.errors: list[int] = []     # positive exit codes, in the order seen

    def exited(self, rc: int) -> bool:
        """Record a worker's exit code; True if the other workers must be stopped now."""
        if rc == 0:
            self.finished += 1
            return False
        (self.deaths if rc < 0 else self.errors).append(rc)
        return rc > 0 and self.stop_on_error

    @property
    def code(self) -> int:
        if self.errors:
            return max(self.errors)
        if self.deaths and not self.finished:
            return max(self.deaths, key=abs)
        return 0
