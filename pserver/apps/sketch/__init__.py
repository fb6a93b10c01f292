"""CountMin sketches on the parameter server: the sketch's rows are key ranges of the servers.

Written only against the public worker API (pserver.KVWorker), as a user would write it.
Modules: shape (d x w and the eps/delta bound), kernels (compiled hashing and updates), text
(sharded text input, exact reference counts), candidates (heavy-hitter candidates), countmin
(CountMinSketch: insert, estimate, heavy hitters), worker (one process), cli (`pserver sketch`).
"""

from .countmin import CountMinSketch
from .shape import SketchShape

__all__ = ["CountMinSketch", "SketchShape"]
