"""Progress bars for long work (reading data, passes, checkpoint writes and restores, migrations):
tqdm's rates and ETA on a terminal, nothing at all when stderr is not one (logs, CI, the nodes a
launcher starts), so library code may use them unconditionally."""

from __future__ import annotations

import sys
from typing import IO, Any


def bar(total: float | None, desc: str, unit: str = "it", *, scale: bool = False,
        file: IO[str] | None = None) -> Any:
    """A tqdm bar of ``total`` ``unit`` s (None: unknown), described as ``desc``; ``scale``: SI
    prefixes (bytes). Disabled - every call a no-op - unless ``file`` (default stderr) is a TTY.
    Use as a context manager or close it."""
    from tqdm import tqdm  # imported on first use: nodes that never show a bar never load it

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, disable=None, leave=False,
                file=file if file is not None else sys.stderr, dynamic_ncols=True)
