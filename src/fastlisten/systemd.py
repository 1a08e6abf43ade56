"""systemd's service protocol without libsystemd: ``sd_notify`` over
``$NOTIFY_SOCKET`` and the watchdog.

``Notifier.from_environment()`` reads ``NOTIFY_SOCKET`` (a path, or ``@name``
for an abstract socket), ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` and, by
default, removes them from the environment so that worker processes and
their children do not talk to systemd in the supervisor's name.  Each
:meth:`Notifier.notify` call sends one datagram of newline-separated
``KEY=VALUE`` lines (sd_notify(3))::

    n = Notifier.from_environment()
    n.notify(READY=1, STATUS="4 workers accepting")
    n.reloading()          # RELOADING=1 + MONOTONIC_USEC, for Type=notify-reload
    n.notify(READY=1)
    n.notify(STOPPING=1)

Without ``NOTIFY_SOCKET`` every call does nothing and returns False.
Socket activation (``LISTEN_FDS``) is :func:`fastlisten.config.systemd_fds`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Mapping, MutableMapping, Optional, Union

__all__ = ["Notifier", "monotonic_usec"]

_log = logging.getLogger("fastlisten.systemd")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock ``MONOTONIC_USEC`` uses."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(path: str) -> Union[str, bytes]:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address: ``@name`` is abstract."""
    if path.startswith("@"):
        return b"\0" + os.fsencode(path[1:])
    return path


class Notifier:
    """Sends sd_notify messages to one socket; does nothing without one.

    ``socket_path``: the ``NOTIFY_SOCKET`` value (None: notifications off).
    ``watchdog_usec``: the ``WATCHDOG_USEC`` value (None or 0: watchdog
    off); :attr:`watchdog_interval` is half of it, as sd_watchdog_enabled(3)
    advises.
    """

    def __init__(self, socket_path: Optional[str] = None,
                 watchdog_usec: Optional[int] = None) -> None:
        if socket_path is not None and not (socket_path.startswith("/")
                                             or socket_path.startswith("@")):
            raise ValueError(f"NOTIFY_SOCKET must be an absolute path or an @abstract "
                             f"name, not {socket_path!r}")
        self.socket_path = socket_path
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._warned = False
        self._next_watchdog = 0.0     # time.monotonic() of the next keep_alive ping

    @classmethod
    def from_environment(cls, environ: Optional[MutableMapping[str, str]] = None,
                         unset: bool = True) -> "Notifier":
        """A Notifier for what systemd passed this process (``os.environ``
        by default); with ``unset``, the variables are removed from it.
        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or is
        this process's pid.  A malformed value is logged and ignored."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or None
        usec: Optional[int] = None
        wd_pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC") and (not wd_pid or wd_pid == str(os.getpid())):
            try:
                usec = int(env["WATCHDOG_USEC"])
            except ValueError:
                _log.warning("ignoring WATCHDOG_USEC=%r: not a number", env["WATCHDOG_USEC"])
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        if path is not None and not (path.startswith("/") or path.startswith("@")):
            _log.warning("ignoring NOTIFY_SOCKET=%r: not a path or @abstract name", path)
            path = None
        return cls(path, usec)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between ``WATCHDOG=1`` pings (half of WATCHDOG_USEC), or None."""
        if self.watchdog_usec is None or not self.enabled:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, fields: Optional[Mapping[str, Any]] = None, **more: Any) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True when sent.  A
        value may not contain a newline (ValueError).  A failed send is
        logged once at WARNING (systemd may be gone) and returns False."""
        items = dict(fields or {}, **more)
        for key, value in items.items():
            if "\n" in str(value) or "=" in key or "\n" in key:
                raise ValueError(f"sd_notify field {key}={value!r}: no newline in a "
                                 "value, no '=' or newline in a key")
        if self.socket_path is None:
            return False
        message = "\n".join(f"{k}={v}" for k, v in items.items()).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.sendto(message, _socket_address(self.socket_path))
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _log.warning("sd_notify to %s failed: %s", self.socket_path, exc)
            return False
        finally:
            sock.close()
        return True

    def reloading(self, status: Optional[str] = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (what ``Type=notify-reload``
        needs before the ``READY=1`` that ends the reload)."""
        fields: dict = {"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec()}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(fields)

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` (when the watchdog is on)."""
        if self.watchdog_usec is None:
            return False
        return self.notify(WATCHDOG=1)

    def keep_alive(self, now: float) -> None:
        """The watchdog on a schedule, for a loop that calls this on every
        pass: ``WATCHDOG=1`` once ``now`` (``time.monotonic()``) reaches
        :attr:`next_watchdog` (the first call: at once), then every
        :attr:`watchdog_interval`.  Does nothing with the watchdog off."""
        interval = self.watchdog_interval
        if interval is not None and now >= self._next_watchdog:
            self.watchdog()
            self._next_watchdog = now + interval

    @property
    def next_watchdog(self) -> Optional[float]:
        """When :meth:`keep_alive` pings next (``time.monotonic()``), or
        None with the watchdog off: the latest a loop may sleep until."""
        return None if self.watchdog_interval is None else self._next_watchdog
