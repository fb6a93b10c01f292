"""One-off requests to the scheduler from tools (``pserver status``, the launcher's shutdown)."""

from __future__ import annotations

from ..config import Config
from ..errors import RemoteError, SchedulerUnreachableError
from ..transport import Transport
from ..wire import Message


def scheduler_request(cfg: Config, op: str, meta: dict | None = None, role: str = "scheduler",
                      timeout: float = 5.0) -> Message:
    """Send ``op`` to the scheduler with the credentials of ``role`` and return its reply."""
    host, port = cfg.require_scheduler()
    transport = Transport(cfg, role)
    try:
        sock = transport.connect_dealer(host, port, "scheduler")
        transport.send(sock, Message(op, 1, meta=meta or {}))
        if not sock.poll(timeout * 1000):
            raise SchedulerUnreachableError(
                f"no answer from the scheduler at {host}:{port} within {timeout:g} s (is it "
                f"running, and are PSERVER_SCHEDULER and PSERVER_KEYS right?)")
        _, msg, _ = transport.decode(sock.recv_multipart(copy=False), routed=False)
        if msg.op == "error":
            raise RemoteError(f"the scheduler refused {op!r}: {msg.meta.get('error')}")
        return msg
    finally:
        transport.close()


__all__ = ["scheduler_request"]
