"""One-off requests to the scheduler from tools (``pserver status``, the launcher's shutdown)."""

from __future__ import annotations

from ..config import Config
from ..errors import RemoteError, SchedulerUnreachableError
from ..link import LinkError
from ..protocol import ERROR
from ..transport import Transport
from ..wire import Message


def scheduler_request(cfg: Config, op: str, meta: dict | None = None, role: str = "scheduler",
                      timeout: float = 5.0, transport: Transport | None = None) -> Message:
    """Send ``op`` to the scheduler with the credentials of ``role`` and return its reply.

    transport: the sockets to use (default: a new Transport of ``role``, closed on return; a
    given one is left open). Raises: SchedulerUnreachableError without an answer within
    ``timeout`` seconds; RemoteError if the scheduler refused; ProtocolError for a malformed reply;
    ConfigError for missing keys or scheduler address."""
    host, port = cfg.require_scheduler()
    own = transport is None
    if transport is None:
        transport = Transport(cfg, role)
    link = None
    unreachable = (f"no answer from the scheduler at {host}:{port} within {timeout:g} s (is it "
                   f"running, and are PSERVER_SCHEDULER and PSERVER_KEYS right?)")
    try:
        link = transport.dealer_link(host, port, "scheduler")
        try:
            link.send(Message(op, 1, meta=meta or {}))
        except LinkError:  # no connection could be made (ZeroMQ: within the connect timeout)
            raise SchedulerUnreachableError(unreachable) from None
        item = link.recv() if link.poll(timeout) else None
        if item is None:
            raise SchedulerUnreachableError(unreachable)
        msg, _ = transport.decode_body(item[1])
        if msg.op == "error":
            raise RemoteError(f"the scheduler refused {op!r}: {msg.meta.get(ERROR)}")
        return msg
    finally:
        if own:
            transport.close()
        elif link is not None:
            link.close()


__all__ = ["scheduler_request"]
