"""One role's share of a `pserver keygen` directory (every public key, that role's secret key only)
as bytes, so an engine can carry it to a node without a shared filesystem, and back into files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..security import PRIVATE_DIR, PUBLIC_DIR, ROLES


class KeyFiles:
    """Relative path -> content of the key files one role needs. Its repr never shows a key."""

    __slots__ = ("files", "role")

    def __init__(self, role: str, files: dict[str, bytes]):
        self.role, self.files = role, files

    def __repr__(self) -> str:
        return f"KeyFiles({self.role!r}, {sorted(self.files)})"

    @classmethod
    def read(cls, directory: str | os.PathLike, role: str) -> KeyFiles:
        """Read ``role``'s share of a key directory.

        Raises:
            ConfigError: ``role`` is not a role, or a file is missing (nothing is read then).
        """
        if role not in ROLES:
            raise ConfigError(f"{role!r} is not a role: one of {', '.join(ROLES)}")
        root = Path(directory)
        names = [f"{PUBLIC_DIR}/{r}.key" for r in ROLES] + [f"{PRIVATE_DIR}/{role}.key_secret"]
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise ConfigError(f"{root} lacks {', '.join(missing)}: make the keys with "
                              f"`pserver keygen DIR` and pass that DIR")
        return cls(role, {n: (root / n).read_bytes() for n in names})

    def write(self, parent: str | os.PathLike | None = None) -> Path:
        """Write the files into a new 0700 directory under ``parent`` (default: the temp dir),
        secret keys 0600 and created with that mode (never briefly readable). Returns the
        directory, for PSERVER_KEYS; the caller removes it.

        Raises:
            ConfigError: a path would leave the directory (a forged share).
        """
        root = Path(tempfile.mkdtemp(prefix=f"pserver-{self.role}-keys-", dir=parent))
        for sub in (PUBLIC_DIR, PRIVATE_DIR):
            (root / sub).mkdir(mode=0o700)
        for name, data in self.files.items():
            head, _, leaf = name.partition("/")
            if head not in (PUBLIC_DIR, PRIVATE_DIR) or not leaf or "/" in leaf or leaf in (".", ".."):
                raise ConfigError(f"key file {name!r} is not public/NAME or private/NAME")
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return root
