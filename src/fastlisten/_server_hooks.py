"""What a :class:`fastlisten.Workers` worker process uses of a server
beyond socketserver's API, written down: :class:`FastServer`, the hooks
fastlisten's own servers (``server.py``) offer, and :class:`PeriodicActions`,
how the worker marks the ``service_actions`` it sets on the instance.

A worker serves any socketserver-like server (``socket``,
``serve_forever(poll_interval)``, ``shutdown()``, ``server_close()``,
``service_actions()``, ``verify_request()``).  When the server is also a
:class:`FastServer` (every fastlisten class is), the worker gives it its
``listen_config``, reads the connections accepted from the server's
listener and the running handlers from the server, and wakes its loop to
stop at once; any other server gets its connections counted through
``verify_request`` and its loop sees the stop within ``poll_interval``.
The methods a stop calls (``serve_queued``, ``drain``, ``_fl_serve_kept``)
are fastlisten's own implementations, reached through
``fastlisten.server._own_method`` whatever a subclass defines under those
names.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Tuple, runtime_checkable

from fastlisten.config import ListenConfig
from fastlisten.listener import Listener

if TYPE_CHECKING:
    from fastlisten.server import BaseServer

__all__ = ["FastServer", "PeriodicActions"]


@runtime_checkable
class FastServer(Protocol):
    """The hooks of fastlisten's servers that a worker process uses
    (``isinstance(server, FastServer)`` tells such a server)."""

    #: The listener options the server applies (PROXY protocol, TLS,
    #: connection options): a worker sets Workers' own here before serving.
    _fl_config: Optional[ListenConfig]

    #: The server's Listener over its socket once its loop accepts in the
    #: core (None before, or with a loop that does not): its
    #: ``stats()["accepted"]`` counts the connections.
    _fl_listener: Optional[Listener]

    def _fl_get_listener(self, sock: socket.socket) -> Listener:
        """The server's Listener over ``sock``, made once and kept."""

    def _fl_handlers(self) -> Tuple[int, int]:
        """(running, peak) handlers."""

    def _fl_wake(self) -> None:
        """Wake the running serving loop: it checks for shutdown() and
        runs service_actions() at once."""


class PeriodicActions:
    """A ``service_actions`` set on a server instance that asks to run
    every ``poll_interval``, not after each request: the worker's heartbeat
    (and its stop) wrapped around the server's own ``service_actions``.

    What marks it is its true ``fl_periodic`` attribute, the marker
    fastlisten's threaded servers look for (documented in the user guide's
    drop-in page: an application may set it on a function of its own): a
    ThreadingMixIn keeps leader/follower with it, and its serving thread
    runs it every ``poll_interval``."""

    #: The marker ``ThreadingMixIn`` reads on an instance's service_actions.
    fl_periodic = True

    def __init__(self, actions: Callable[[], None]) -> None:
        self._actions = actions

    def __call__(self) -> None:
        self._actions()


if TYPE_CHECKING:
    def _conforms(server: BaseServer) -> FastServer:
        return server       # mypy: every fastlisten server offers these hooks
