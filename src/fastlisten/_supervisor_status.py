"""What the supervisor (see :mod:`fastlisten.workers`) tells systemd, and
its log, about where it is: starting, accepting (``READY=1`` once), a
reload (``RELOADING=1``, then ``READY=1`` when the new generation accepts
or has failed to start), workers failing to start, stopping, stopped; and
the watchdog's pings.  Without ``$NOTIFY_SOCKET`` only the log lines are
left (:class:`fastlisten.systemd.Notifier` sends nothing).
"""

from __future__ import annotations

import logging
from typing import Optional

from fastlisten.systemd import Notifier

__all__ = ["SupervisorStatus"]

_log = logging.getLogger("fastlisten.workers")


class SupervisorStatus:
    """The supervisor's announcements through ``notifier``, and the two
    facts they depend on: whether ``READY=1`` was sent, and whether a
    reload waits for its ``READY=1``."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.ready_sent = False
        #: A reload asked for and not accepting yet (nor failed).
        self.reloading = False

    def starting(self, count: int) -> None:
        self.notifier.notify(STATUS=f"starting {count} worker(s)")

    def accepting(self, count: int, generation: int, old_generation_left: bool) -> None:
        """Every slot of the current ``generation`` has a worker that
        accepts: the first time, the service is ready; after a reload, once
        no worker of an older generation still accepts
        (``old_generation_left``), the reload is done."""
        if not self.ready_sent:
            self.ready_sent = True
            _log.info("%d worker(s) accepting", count)
            self.notifier.notify(READY=1, STATUS=f"{count} worker(s) accepting")
        elif self.reloading and not old_generation_left:
            self.reloading = False
            _log.info("reloaded: generation %d accepting", generation)
            self.notifier.notify(READY=1, STATUS=f"{count} worker(s) accepting "
                                                 f"(generation {generation})")

    def reload_started(self, generation: int) -> None:
        self.reloading = True
        _log.info("reloading: starting generation %d", generation)
        self.notifier.reloading(f"reloading: starting generation {generation}")

    def start_failed(self, failures: int, delay: float, cause: str,
                     ends_reload: bool) -> None:
        """A worker could not start (``failures`` in a row, the next start
        in ``delay`` seconds); ``ends_reload``: it was of the generation a
        reload started, whose ``READY=1`` (what ``Type=notify-reload``
        waits for) is sent now: the previous workers go on serving."""
        self.notifier.notify(STATUS=f"workers failing to start ({failures} in a row); "
                                    f"retrying in {delay:.3g} s")
        if self.reloading and ends_reload:
            self.reloading = False
            self.notifier.notify(READY=1, STATUS=f"reload failed ({cause}): the previous "
                                                 "workers go on serving")

    def stopping(self) -> None:
        self.notifier.notify(STOPPING=1, STATUS="stopping")

    def stopped(self) -> None:
        self.notifier.notify(STATUS="stopped")

    def keep_alive(self, now: float) -> None:
        """The watchdog's ping when due (see :meth:`Notifier.keep_alive`)."""
        self.notifier.keep_alive(now)

    @property
    def next_watchdog(self) -> Optional[float]:
        return self.notifier.next_watchdog
