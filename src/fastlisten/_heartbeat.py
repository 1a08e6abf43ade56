"""A worker's heartbeat record, in memory the worker shares with its
supervisor (the supervisor's side of gunicorn's ``workertmp``)."""

from __future__ import annotations

import mmap
from typing import Tuple

__all__ = ["Record"]


class Record:
    """One worker's record, in memory it shares with the supervisor:
    heartbeat (CLOCK_MONOTONIC seconds), connections accepted, handlers
    running, handlers peak.  Each field is an aligned 8-byte word stored and
    loaded whole (one machine store or load, through memoryview casts), so
    the supervisor never reads a half-written record.  (struct.pack_into
    zero-fills before it writes: a heartbeat read as 0.0 in between made the
    supervisor kill a healthy worker, and reset the connections it held.)"""

    def __init__(self) -> None:
        self._shm = mmap.mmap(-1, 32)
        view = memoryview(self._shm)
        self._time = view[:8].cast("d")
        self._counts = view[8:].cast("Q")
        view.release()

    def write(self, heartbeat: float, accepted: int, running: int, peak: int) -> None:
        counts = self._counts
        counts[0], counts[1], counts[2] = accepted, running, peak
        self._time[0] = heartbeat

    def read(self) -> Tuple[float, int, int, int]:
        counts = self._counts
        return self._time[0], counts[0], counts[1], counts[2]

    def close(self) -> None:
        self._time.release()
        self._counts.release()
        self._shm.close()
