"""The supervisor's pid file: written at start, removed at the end (only
while it still holds this process's pid)."""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["PidFile"]


class PidFile:
    """``path`` (None: no pid file) holding this process's pid."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._written = False

    def write(self) -> None:
        """Write the pid (atomically: a temporary file renamed over it)."""
        if self.path is None:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)
        self._written = True

    def remove(self) -> None:
        """Remove the file written, unless another process wrote its pid
        there since."""
        if not self._written or self.path is None:
            return
        self._written = False
        try:
            with open(self.path) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(self.path)
        except OSError:
            pass
