"""Logging with the node's role and rank in every line."""

from __future__ import annotations

import logging
import os

_node = {"node": f"pid{os.getpid()}"}


class _NodeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.node = _node["node"]
        return True


def set_node(role: str, rank: int | None = None) -> None:
    """Name this process in log lines, e.g. ``server[1]``."""
    _node["node"] = role if rank is None or rank < 0 else f"{role}[{rank}]"


def setup_logging(level: str = "WARNING", role: str | None = None) -> None:
    """Configure the root logger of a pserver process (idempotent)."""
    if role:
        set_node(role)
    root = logging.getLogger()
    if not any(getattr(h, "_pserver", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(node)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(_NodeFilter())
        handler._pserver = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
