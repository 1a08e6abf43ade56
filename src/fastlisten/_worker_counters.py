"""The supervisor's counters (see :mod:`fastlisten.workers`): what its
workers report in their heartbeat records, summed and per worker, the
workers that ended, and the listening sockets' queues, as
``Workers.counters()`` returns them and SIGUSR1's log line shows them.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Dict, Iterable, Protocol

from fastlisten._heartbeat import Record
from fastlisten.listener import Listener

__all__ = ["WorkerCounters", "WorkerView", "log_summary"]

_log = logging.getLogger("fastlisten.workers")


class WorkerView(Protocol):
    """What the counters read of one worker (the supervisor's record of it)."""

    @property
    def pid(self) -> int: ...

    @property
    def slot(self) -> int: ...

    @property
    def generation(self) -> int: ...

    @property
    def state(self) -> enum.Enum: ...

    @property
    def record(self) -> Record: ...


class WorkerCounters:
    """The counters the supervisor keeps itself (workers that ended,
    expected or not) and the summary of its workers' records."""

    def __init__(self) -> None:
        #: Workers that ended: {"expected": n, "unexpected": n}.
        self.exited: Dict[str, int] = {}

    def count_exit(self, expected: bool) -> None:
        """One worker more that ended (``expected``: it was told to stop)."""
        key = "expected" if expected else "unexpected"
        self.exited[key] = self.exited.get(key, 0) + 1

    def summary(self, workers: Iterable[WorkerView], target: int, generation: int,
                listeners: Iterable[Listener]) -> Dict[str, Any]:
        """Counters summed over the live ``workers``, and per worker:
        ``workers`` ({pid: {"accepted", "handlers_running", "handlers_peak",
        "slot", "generation", "state"}}), ``target`` and ``generation`` (as
        given), ``accepted``, ``handlers_running``, ``imbalance`` (max/min
        accepted among ready workers), ``exited`` (workers that ended,
        expected or not) and ``queued`` (connections waiting in
        ``listeners``' accept queues)."""
        per: Dict[int, Dict[str, Any]] = {}
        for w in workers:
            _, accepted, running, peak = w.record.read()
            per[w.pid] = {"accepted": accepted, "handlers_running": running,
                          "handlers_peak": peak, "slot": w.slot,
                          "generation": w.generation, "state": w.state.value}
        counts = [p["accepted"] for p in per.values() if p["state"] == "ready"]
        out: Dict[str, Any] = {
            "workers": per, "target": target, "generation": generation,
            "accepted": sum(p["accepted"] for p in per.values()),
            "handlers_running": sum(p["handlers_running"] for p in per.values()),
            "imbalance": (max(counts) / min(counts)) if counts and min(counts) else None,
            "exited": dict(self.exited),
        }
        queued = 0
        for listener in listeners:
            try:
                queued += listener.queue()[0]
            except OSError:
                pass
        out["queued"] = queued
        return out


def log_summary(c: Dict[str, Any]) -> None:
    """Log a :meth:`WorkerCounters.summary` as one line (SIGUSR1's)."""
    per = " ".join(f"{pid}:{p['accepted']}" for pid, p in sorted(c["workers"].items()))
    imbalance = "-" if c["imbalance"] is None else f"{c['imbalance']:.2f}"
    _log.info("counters: workers=%d accepted=%d handlers_running=%d queued=%d "
              "max/min=%s per-worker accepted {%s}", len(c["workers"]), c["accepted"],
              c["handlers_running"], c["queued"], imbalance, per)
