"""Listener: the Python face of the core.

``fastlisten.listen(address)`` creates, binds and listens in one call, like
``socket.create_server``; or walk the lifecycle step by step::

    lst = fastlisten.Listener(socket.AF_INET)
    lst.bind(("127.0.0.1", 0))
    lst.listen()                 # backlog: the kernel's somaxconn
    conn, addr = lst.accept()    # an ordinary socket.socket
    lst.close()

This layer resolves host names, checks arguments and logs; the core
(``fastlisten._backend.RawListener``) makes the system calls.
"""

from __future__ import annotations

import logging
import os
import socket
from time import monotonic
from typing import Any, List, Optional, Tuple, Union

from fastlisten._backend import RawListener
from fastlisten._coreshared import remaining

__all__ = ["Listener", "listen", "default_backlog", "Address"]

_log = logging.getLogger("fastlisten")

Address = Union[Tuple[Any, ...], str, bytes, "os.PathLike[str]"]

_SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


def default_backlog() -> int:
    """The kernel's ``net.core.somaxconn``, read now (the largest backlog
    listen() honours; larger values are silently truncated to it).  Falls
    back to ``socket.SOMAXCONN`` where /proc cannot tell."""
    try:
        with open(_SOMAXCONN_PATH, "rb") as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return socket.SOMAXCONN
    return value if value > 0 else socket.SOMAXCONN


def _check_backlog(backlog: Any) -> int:
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        try:
            backlog = backlog.__index__()
        except AttributeError:
            raise TypeError(
                f"backlog must be an integer, not {type(backlog).__name__}: {backlog!r}"
            ) from None
    # socket.listen clamps negatives to 0 and so do we; C int overflow is
    # the stdlib's OverflowError.
    if backlog > 2**31 - 1:
        raise OverflowError(f"backlog {backlog} does not fit in a C int")
    return max(backlog, 0)


def _family_of(address: Address) -> int:
    """The address family an address implies: a path is AF_UNIX, a host
    with a colon AF_INET6, anything else AF_INET."""
    if isinstance(address, tuple):
        host = address[0] if address else ""
        if isinstance(host, str) and ":" in host:
            return socket.AF_INET6
        return socket.AF_INET
    if isinstance(address, (str, bytes)) or hasattr(address, "__fspath__"):
        return socket.AF_UNIX
    raise TypeError(f"address must be a (host, port) tuple or a path, not {address!r}")


def resolve(family: int, address: Address) -> Address:
    """A bind address with its host made numeric, as the core wants it.

    '' means every interface, as in the socket module; names go through
    getaddrinfo(AI_PASSIVE).  Ports are checked here so that the message
    names the bad value.
    """
    if family == socket.AF_UNIX:
        return address
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise OSError(97, f"unsupported address family: {family!r}")  # EAFNOSUPPORT
    if not isinstance(address, tuple) or len(address) < 2:
        raise TypeError(f"address must be a (host, port) tuple, not {address!r}")
    host, port, rest = address[0], address[1], tuple(address[2:])
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an integer, not {type(port).__name__}: {port!r}")
    if not 0 <= port <= 65535:
        raise OverflowError(f"bind(): port must be 0-65535, not {port}")
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, not {type(host).__name__}: {host!r}")
    if host == "":
        host = "0.0.0.0" if family == socket.AF_INET else "::"
    else:
        try:
            socket.inet_pton(family, host)
        except OSError:
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
            sockaddr = infos[0][4]
            host = sockaddr[0]
            if family == socket.AF_INET6 and not rest:
                rest = tuple(sockaddr[2:])
    return (host, port) + rest


class Listener:
    """A listening TCP (or Unix stream) socket served by fastlisten's core.

    Listener(family=AF_INET, *, fileno=None)

    Methods for the caller: bind(), listen(), accept(), accept_many(),
    wakeup(), queue(), fileno(), close(); also a context manager.
    Accepted connections are ordinary ``socket.socket`` objects,
    independent of the listener: closing it leaves them working.
    """

    def __init__(self, family: int = socket.AF_INET, *, fileno: Optional[int] = None,
                 type: int = socket.SOCK_STREAM, proto: int = 0) -> None:
        if not isinstance(family, int):
            raise TypeError(f"family must be an address family, not {family!r}")
        if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise OSError(97, f"unsupported address family: {family!r} "
                              "(use AF_INET, AF_INET6 or AF_UNIX)")
        if type != socket.SOCK_STREAM:
            raise OSError(94, f"fastlisten listens on stream sockets only, not type {type!r}")
        self._raw = RawListener(family, type, proto, fileno)
        self._backlog: Optional[int] = None
        self._logged_episodes = 0

    # -- the lifecycle -------------------------------------------------

    @property
    def family(self) -> socket.AddressFamily:
        """The address family."""
        return socket.AddressFamily(self._raw.family)

    def fileno(self) -> int:
        """The listening descriptor (-1 once closed)."""
        return self._raw.fileno()

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._raw.closed

    def setsockopt(self, level: int, option: int, value: int) -> None:
        """Set an integer socket option on the listener."""
        self._raw.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        """Read an integer socket option of the listener."""
        return self._raw.getsockopt(level, option)

    def bind(self, address: Address) -> None:
        """Bind to ``address``: (host, port) or a Unix path; port 0 lets the
        kernel choose (read it back from ``address``)."""
        self._raw.bind(resolve(self._raw.family, address))

    def listen(self, backlog: Optional[int] = None) -> None:
        """Start listening.  ``backlog`` defaults to the kernel's somaxconn;
        the kernel truncates larger values to it (``backlog`` then reports
        the effective value) and a negative one is clamped to 0."""
        requested = default_backlog() if backlog is None else _check_backlog(backlog)
        self._raw.listen(requested)
        self._backlog = min(requested, default_backlog())

    @property
    def address(self) -> Any:
        """The bound address; after binding port 0, it holds the chosen port."""
        return self._raw.getsockname()

    @property
    def backlog(self) -> Optional[int]:
        """The effective backlog (the kernel truncates to somaxconn), or None
        before listen()."""
        if self._backlog is not None and self._raw.family != socket.AF_UNIX:
            try:
                return self._raw.queue()[1]
            except OSError:
                pass
        return self._backlog

    def queue(self) -> Tuple[int, int]:
        """(queued, backlog): connections waiting in the accept queue now,
        and the queue's effective size (Linux TCP_INFO, as ``ss -lnt``)."""
        return self._raw.queue()

    def accept_many(self, max: int = 64, timeout: Optional[float] = None
                    ) -> List[Tuple[socket.socket, Any]]:
        """Wait up to ``timeout`` seconds (None: for ever) for connections and
        accept up to ``max`` pending ones in one go, without the GIL.

        Returns a list of (socket, address); empty on timeout or wakeup().
        """
        batch = self._raw.accept_many(max, timeout)
        if self._raw.capacity_episodes != self._logged_episodes:
            self._log_capacity()
        return batch

    def _log_capacity(self) -> None:
        self._logged_episodes = self._raw.capacity_episodes
        err = self._raw.last_capacity_errno
        _log.warning(
            "accept() on %s failed with %s (%s): out of descriptors or memory; "
            "pending connections stay queued and accept backs off instead of "
            "spinning. Raise the limit (ulimit -n) or close descriptors.",
            self._describe(), os.strerror(err), err)

    def _describe(self) -> str:
        try:
            return repr(self._raw.getsockname())
        except OSError:
            return f"fd {self._raw.fileno()}"

    def accept(self, timeout: Optional[float] = None) -> Tuple[socket.socket, Any]:
        """Accept one connection, waiting up to ``timeout`` seconds (None: for
        ever); raises ``socket.timeout`` (TimeoutError) when it expires."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            left = None if deadline is None else remaining(deadline)
            batch = self.accept_many(1, left)
            if batch:
                return batch[0]
            if deadline is not None and remaining(deadline) <= 0:
                raise socket.timeout("timed out")

    def wakeup(self) -> None:
        """Make a waiting accept_many() return an empty batch at once.  Safe
        from any thread."""
        self._raw.wakeup()

    def stats(self) -> dict:
        """Counters of this listener's life: accepted, batches, max_batch,
        capacity_episodes and errors by errno."""
        return self._raw.stats()

    def close(self) -> None:
        """Stop listening.  Idempotent; connections already accepted stay open."""
        self._raw.close()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self._describe()
        return f"<fastlisten.Listener {state}>"


def listen(address: Address, *, family: Optional[int] = None,
           backlog: Optional[int] = None, reuse_address: bool = True,
           reuse_port: bool = False, dualstack: bool = False) -> Listener:
    """Create, bind and listen in one call; returns a Listener.

    ``address`` is (host, port) or a Unix socket path; the family follows
    from it unless given.  ``backlog`` defaults to the kernel's somaxconn.
    ``reuse_address`` (SO_REUSEADDR, on by default as in
    socket.create_server) lets a restarted server bind while old
    connections sit in TIME_WAIT; ``reuse_port`` sets SO_REUSEPORT;
    ``dualstack`` makes an IPv6 listener on '::' serve IPv4 too.
    On any failure the descriptor is closed before the error propagates.
    """
    if family is None:
        family = _family_of(address)
    lst = Listener(family)
    try:
        if family != socket.AF_UNIX:
            if reuse_address:
                lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                if not hasattr(socket, "SO_REUSEPORT"):
                    raise ValueError("reuse_port: SO_REUSEPORT is not available here")
                lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
            elif dualstack:
                raise ValueError("dualstack needs an IPv6 address such as ('::', port)")
        lst.bind(address)
        lst.listen(backlog)
    except BaseException:
        lst.close()
        raise
    return lst
