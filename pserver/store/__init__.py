"""The server-side parameter store: named tables of (uint64 key -> value row) with server-side
update functions.

``TableSpec``, the updater registry and the initializers are plain numpy and import cheaply
(workers use them). ``Table`` and ``HashIndex`` pull in numba, so they are imported on first
access (``pserver.store.Table``) rather than with the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .init import initial_values
from .spec import TableSpec
from .updaters import FunctionUpdater, Updater, make_updater, register_updater

if TYPE_CHECKING:
    from .index import HashIndex
    from .table import Table

__all__ = ["FunctionUpdater", "HashIndex", "Table", "TableSpec", "Updater", "initial_values",
           "make_updater", "register_updater"]


def __getattr__(name: str):
    if name == "Table":
        from .table import Table
        return Table
    if name == "HashIndex":
        from .index import HashIndex
        return HashIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
