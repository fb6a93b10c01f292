"""What the raw pyzmq baselines of the benchmarks share (pushpull.py, cipher_floor.py): the client's
DEALER, plain or CURVE-encrypted, and the CPU time of a process from /proc."""

from __future__ import annotations

import os

import zmq


def connect_dealer(ctx: zmq.Context, port: int, server_public: bytes = b"") -> zmq.Socket:
    """A DEALER connected to 127.0.0.1:``port``; CURVE-encrypted to ``server_public`` if given
    (with a fresh client key pair)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if server_public:
        sock.curve_serverkey = server_public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, every thread included (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
