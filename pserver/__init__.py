"""pserver: a parameter server for distributed machine learning.

The public API::

    import pserver
    kv = pserver.KVWorker()               # a worker joining the cluster described by PSERVER_* vars
    server = pserver.KVServer(handle=fn)  # a server with a user update function
    with pserver.LocalCluster(2, 4) as cluster: ...   # scheduler + servers on this machine
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import errors
from .config import Config

if TYPE_CHECKING:
    from .kv.server import KVServer
    from .kv.worker import KVWorker
    from .launch import LocalCluster
    from .store.spec import TableSpec
    from .store.updaters import Updater, register_updater

__version__ = "0.1.0"

# Imported on first use: a process that needs only some roles (the scheduler, the CLI's help)
# does not pay for the others' imports - numba's alone is ~0.1 s of a node's start.
_LAZY = {"KVServer": ".kv.server", "KVWorker": ".kv.worker", "LocalCluster": ".launch",
         "TableSpec": ".store.spec", "Updater": ".store.updaters",
         "register_updater": ".store.updaters"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pserver' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value

__all__ = ["Config", "KVServer", "KVWorker", "LocalCluster", "TableSpec", "Updater", "errors",
           "register_updater", "__version__"]
