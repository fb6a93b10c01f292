"""pserver: a parameter server for distributed machine learning.

The public API::

    import pserver
    kv = pserver.KVWorker()               # a worker joining the cluster described by PSERVER_* vars
    server = pserver.KVServer(handle=fn)  # a server with a user update function
    with pserver.LocalCluster(2, 4) as cluster: ...   # scheduler + servers on this machine
"""

from . import errors
from .config import Config
from .kv.server import KVServer
from .kv.worker import KVWorker
from .launch import LocalCluster
from .store.spec import TableSpec
from .store.updaters import Updater, register_updater

__version__ = "0.1.0"

__all__ = ["Config", "KVServer", "KVWorker", "LocalCluster", "TableSpec", "Updater", "errors",
           "register_updater", "__version__"]
