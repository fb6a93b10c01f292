"""Link delay without the kernel's netem: every packet a network namespace receives on its
LAN interfaces goes to a netfilter queue (an iptables NFQUEUE rule on INPUT), and this process,
run inside the namespace, accepts each packet ``delay`` seconds after it arrived, in arrival
order: a constant one-way delay, as `tc netem delay` gives. On the receiving side a held packet
no longer counts against the sender's socket, so TCP's small-queue limit does not stall it.
Used by pserver.netns.Hosts.delay for tests and benchmarks only; needs root, iptables and the
NetfilterQueue package. docs/networks.md.

    python -m pserver.netdelay --queue 0 --delay-ms 5
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import sys
import time
from collections import deque


class DelayLine:
    """Packets in arrival order with their due times (pure: ``arrive`` and ``due`` take the
    clock, so the decision is testable without a queue)."""

    def __init__(self, delay: float) -> None:
        if not delay >= 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        self.delay = delay
        self.waiting: deque[tuple[float, object]] = deque()

    def arrive(self, packet: object, now: float) -> None:
        self.waiting.append((now + self.delay, packet))

    def due(self, now: float) -> list[object]:
        """The packets whose time has come, oldest first (removed from the line)."""
        out = []
        while self.waiting and self.waiting[0][0] <= now:
            out.append(self.waiting.popleft()[1])
        return out

    def wait_for(self, now: float, idle: float = 1.0) -> float:
        """Seconds until the oldest packet is due (``idle`` when none waits)."""
        return max(0.0, self.waiting[0][0] - now) if self.waiting else idle


def serve(queue: int, delay: float, ready_file: str | None = None) -> None:
    """Hold every packet of netfilter queue ``queue`` for ``delay`` seconds, then accept it; until
    SIGTERM. Raises ImportError without NetfilterQueue, OSError if the queue cannot be bound."""
    from netfilterqueue import COPY_META, NetfilterQueue

    line, clock = DelayLine(delay), time.monotonic
    nfq = NetfilterQueue()
    nfq.bind(queue, lambda pkt: line.arrive(pkt, clock()), max_len=1 << 16, mode=COPY_META)
    sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    if ready_file:
        open(ready_file, "w").close()
    try:
        while not stop:
            readable, _, _ = select.select([sock], [], [], line.wait_for(clock(), 0.2))
            if readable:
                nfq.run(block=False)
            for pkt in line.due(clock()):
                pkt.accept()
    finally:
        for _, pkt in line.waiting:  # let what is held go: the rule is removed before us
            pkt.accept()
        nfq.unbind()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--ready-file", help="created once the queue is bound")
    args = p.parse_args(argv)
    serve(args.queue, args.delay_ms / 1e3, args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
