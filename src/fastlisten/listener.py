"""Listener: the Python face of the core.

``fastlisten.listen(address)`` creates, binds and listens in one call, like
``socket.create_server``; or walk the lifecycle step by step::

    lst = fastlisten.Listener(socket.AF_INET)
    lst.bind(("127.0.0.1", 0))
    lst.listen()                 # backlog: the kernel's somaxconn
    conn, addr = lst.accept()    # an ordinary socket.socket
    lst.close()

Or describe it once with a :class:`fastlisten.config.ListenConfig` and call
``Listener.from_config(cfg)``.  This layer resolves host names, checks
choices (warnings for an ephemeral port or a truncated backlog), explains
bind errors and counts; the core (``fastlisten._backend.RawListener``) makes
the system calls.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import threading
from time import monotonic
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from fastlisten import address as _address
from fastlisten import sysinfo
from fastlisten._backend import RawListener
from fastlisten._coreshared import (
    DEFAULT_BATCH,
    DEFAULT_READY_MAX_BYTES,
    DEFAULT_READY_TIMEOUT,
    remaining,
)
from fastlisten.address import Address
from fastlisten.config import ListenConfig, ReadySettings, check_backlog
from fastlisten.errors import (
    effective_backlog,
    explain_bind_error,
    stale_socket_hint,
    warn_if_ephemeral,
)

__all__ = ["Listener", "listen", "default_backlog", "default_max_waiting", "describe_ready",
           "adoptable", "Address", "UnixSocketFile"]

_log = logging.getLogger("fastlisten")

#: What a run of the accept filter's drops began with, for its log line.
_DROP_MEANING = {
    "malformed": "malformed: a bad PROXY header, or not a TLS ClientHello",
    "oversize": "oversize: no complete line or request head within max_bytes",
    "expired": "expired: not ready within the filter's timeout",
    "evicted": "evicted: the oldest waiting, closed to make room at max_waiting",
    "error": "error: the core could not watch it",
    "slow": "slow: sent its head more slowly than the filter's min_rate",
}


def default_backlog() -> int:
    """The kernel's ``net.core.somaxconn``, read now (the largest backlog
    listen() honours; larger values are silently truncated to it).  Falls
    back to ``socket.SOMAXCONN`` where /proc cannot tell."""
    value = sysinfo.somaxconn()
    return value if value is not None and value > 0 else socket.SOMAXCONN


#: The accept filter holds at most 1/WAITING_SHARE of the descriptors the
#: process may still open when the filter is set (the rest are for the
#: connections handlers hold and for everything else).
WAITING_SHARE = 2
#: The cap when the process has no descriptor limit (or it cannot be read).
UNLIMITED_MAX_WAITING = 65536


def default_max_waiting() -> int:
    """The default cap on connections waiting in an accept filter: half the
    descriptors this process may still open (RLIMIT_NOFILE less those
    open), at least 1; UNLIMITED_MAX_WAITING where there is no limit."""
    free = sysinfo.descriptor_headroom()
    if free is None:
        return UNLIMITED_MAX_WAITING
    return max(1, min(free // WAITING_SHARE, UNLIMITED_MAX_WAITING))


class UnixSocketFile:
    """The socket file a bind() on a Unix path created, removed again by
    remove() only by the process that bound it and only while it is still
    the same file (another server may have replaced it meanwhile)."""

    def __init__(self, path: bytes) -> None:
        st = os.stat(path)
        self._path, self._id, self._pid = path, (st.st_dev, st.st_ino), os.getpid()

    @classmethod
    def record(cls, path: bytes) -> Optional["UnixSocketFile"]:
        """The file just bound at ``path``; None for an abstract name (or a
        file already gone)."""
        if path[:1] == b"\0":
            return None
        try:
            return cls(path)
        except OSError:
            return None

    def remove(self) -> None:
        """Unlink the file if it is still ours."""
        try:
            st = os.stat(self._path)
            if self._pid == os.getpid() and (st.st_dev, st.st_ino) == self._id:
                os.unlink(self._path)
        except OSError:
            pass


def adoptable(config: ListenConfig) -> Tuple[int, socket.AddressFamily, bool]:
    """The descriptor ``config.fd`` names, checked: an open AF_INET,
    AF_INET6 or AF_UNIX stream socket that listens or is at least bound,
    fitting ``config``.  Returns (fd, family, listening); raises OSError or
    ValueError naming the descriptor otherwise.  The descriptor stays the
    caller's."""
    fd = config.resolve_fd()
    assert fd is not None
    try:
        probe = socket.socket(fileno=fd)
    except OSError as exc:
        raise type(exc)(exc.errno, f"{exc.strerror}: fd={config.fd!r} ({fd}) is not "
                                   "an open socket") from None
    try:
        family, stype = probe.family, probe.type
        listening = bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        name = probe.getsockname()
    finally:
        probe.detach()
    where = f"fd={config.fd!r} ({fd})"
    if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise ValueError(f"{where} is an {family.name} socket; fastlisten listens on "
                         "AF_INET, AF_INET6 and AF_UNIX")
    if stype != socket.SOCK_STREAM:
        raise ValueError(f"{where} is a {socket.SocketKind(stype).name} socket; "
                         "only stream sockets listen")
    if config.family is not None and config.family != family:
        raise ValueError(f"{where} is an {family.name} socket, but family is "
                         f"{socket.AddressFamily(int(config.family)).name}")
    if not listening and (name in ("", b"") or (isinstance(name, tuple) and not name[1])):
        raise ValueError(f"{where} is neither listening nor bound: bind it first, "
                         "or pass host/port instead")
    if family == socket.AF_UNIX and any(
            getattr(config, n) not in (None, False) for n in
            ("nodelay", "keepalive", "defer_accept", "fastopen")):
        raise ValueError(f"{where} is a Unix socket: TCP options do not apply")
    return fd, family, listening


class Listener:
    """A listening TCP (or Unix stream) socket served by fastlisten's core.

    ``Listener(family=AF_INET, *, fileno=None, owned=True)``

    ``fileno`` adopts an existing socket's descriptor; with ``owned=False``
    close() leaves that descriptor open for its owner (a socket.socket).

    Methods for the caller: bind(), listen(), accept(), accept_many(),
    wakeup(), queue(), counters(), fileno(), close(); also a context
    manager.  ``Listener.from_config(cfg)`` builds one from a
    :class:`~fastlisten.config.ListenConfig`.  Accepted connections are
    ordinary ``socket.socket`` objects, independent of the listener:
    closing it leaves them working.

    Methods for servers built on it: handler_started()/handler_finished()
    (or ``with listener.handling():``) keep the "handlers running" counter.
    """

    def __init__(self, family: int = socket.AF_INET, *, fileno: Optional[int] = None,
                 type: int = socket.SOCK_STREAM, proto: int = 0, owned: bool = True) -> None:
        family = _address.check_family(family)
        if type != socket.SOCK_STREAM:
            raise OSError(errno.ESOCKTNOSUPPORT, f"{os.strerror(errno.ESOCKTNOSUPPORT)}: "
                          f"fastlisten listens on stream sockets only, not type {type!r}")
        self._raw = RawListener(family, type, proto, fileno, owned=owned)
        self._backlog: Optional[int] = None
        # An adopted descriptor may be listening already (a server's socket,
        # one systemd passed): then its queue can be read at once.
        self._listening = False
        if fileno is not None:
            try:
                self._listening = bool(
                    self._raw.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            except OSError:
                pass        # not a socket: what the caller does next says so
        self._logged_episodes = 0
        self._filtered = False          # set_accept_filter gave a rule that waits
        # the accept filter's runs of drops, as logged (see _log_drops)
        self._drop_lock = threading.Lock()
        self._drop_seen = 0             # drop_episodes when last looked at
        self._drop_open = False         # the run last logged goes on
        self._drop_quiet = 0            # runs since the last warning, not logged
        self._drop_logged_at: Optional[float] = None
        #: The ListenConfig this listener was built from (None when built by hand).
        self.config: Optional[ListenConfig] = None
        self._unix_file: Optional[UnixSocketFile] = None
        self._count_lock = threading.Lock()
        self._handlers = 0
        self._handlers_peak = 0
        self._deepest = 0
        self._system_at_open = sysinfo.listen_counters()

    # -- building from a configuration ----------------------------------

    @classmethod
    def from_config(cls, config: ListenConfig) -> "Listener":
        """Create, configure, bind and listen as ``config`` says (or take
        over its ``fd``).  Warns (EphemeralPortWarning,
        BacklogTruncatedWarning) about risky choices; bind errors explain
        themselves; on any failure the descriptor is closed (a passed-in
        ``fd`` is left open: it is still the caller's)."""
        if not isinstance(config, ListenConfig):
            raise TypeError(f"config must be a ListenConfig, not {type(config).__name__}")
        if config.proxy_protocol is not None and config.ready_rule is None:
            raise ValueError(
                f"proxy_protocol={config.proxy_protocol!r}: a Listener hands over raw "
                "connections; the PROXY header is read by the server classes "
                "(listen_config=...) in their workers, or by fastlisten.proxy_read(conn, ...) "
                "in yours (with ready_rule set, the Listener waits until it is complete "
                "and valid, and leaves it in the connection for proxy_read)")
        if config.ssl_context is not None:
            raise ValueError(
                "ssl_context: a Listener hands over raw connections; the TLS handshake is "
                "run by the server classes (listen_config=...) in their workers, or by "
                "ssl_context.wrap_socket(conn, server_side=True) in yours")
        if config.handler_timeout is not None:
            raise ValueError(
                "handler_timeout: a Listener runs no handlers; the server classes "
                "(listen_config=...) apply it")
        if config.fd is not None:
            return cls._adopt(config)
        if config.family == socket.AF_UNIX and config.path is None:
            raise ValueError("a Unix socket listener needs path=")
        family = config.family
        lst = cls(family)  # type: ignore[arg-type]
        try:
            lst.config = config
            config.apply_listener_options(lst)
            config.before_bind()
            lst.bind(config.address)
            config.after_bind()
            lst.listen(config.backlog)
            lst._apply_ready(config)
        except BaseException:
            lst.close()
            raise
        return lst

    def _apply_ready(self, config: ListenConfig) -> None:
        ready = config.ready()
        if ready is not None:
            self.set_accept_filter(ready.rule, ready.timeout, ready.max_bytes,
                                   ready.max_waiting, ready.proxy, ready.proxy_max_v2,
                                   ready.min_rate)

    @classmethod
    def _adopt(cls, config: ListenConfig) -> "Listener":
        fd, family, listening = adoptable(config)
        lst = cls(family, fileno=fd)
        try:
            lst.config = config
            config.apply_listener_options(lst)
            if not listening or config.backlog is not None:
                lst.listen(config.backlog)
            else:
                lst._listening = True
            lst._apply_ready(config)
        except BaseException:
            lst._raw.detach()   # still the caller's descriptor: leave it open
            raise
        return lst

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
        kernel choose (read it back from ``address``).

        A fixed port in the ephemeral range warns (EphemeralPortWarning).
        EADDRINUSE, EADDRNOTAVAIL and EACCES keep their OSError subclass and
        errno and explain themselves: who holds the address, which addresses
        this machine has, why the port is privileged.
        """
        family = self._raw.family
        numeric: Any = _address.resolve(family, address)
        if family != socket.AF_UNIX:
            warn_if_ephemeral(numeric[1])
        try:
            self._raw.bind(numeric)
        except OSError as exc:
            raise explain_bind_error(exc, family, numeric,
                                     stale_hint=stale_socket_hint(self.config)) from None
        if family == socket.AF_UNIX:
            self._unix_file = UnixSocketFile.record(numeric)

    def listen(self, backlog: Optional[int] = None) -> None:
        """Start listening.  ``backlog`` defaults to the kernel's somaxconn;
        the kernel truncates larger values to it (with a
        BacklogTruncatedWarning; ``backlog`` then reports the effective
        value) and a negative one is clamped to 0."""
        requested = default_backlog() if backlog is None else check_backlog(backlog)
        self._raw.listen(requested)
        self._listening = True
        self._backlog = effective_backlog(requested)

    @property
    def address(self) -> Any:
        """The bound address; after binding port 0, it holds the chosen port."""
        return self._raw.getsockname()

    @property
    def backlog(self) -> Optional[int]:
        """The effective backlog (the kernel truncates to somaxconn), or None
        before listen() (and for an adopted Unix listener, which cannot tell)."""
        if self._listening and self._raw.family != socket.AF_UNIX:
            try:
                return self._raw.queue()[1]
            except OSError:
                pass
        return self._backlog

    def queue(self) -> Tuple[int, int]:
        """(queued, backlog): connections waiting in the accept queue now,
        and the queue's effective size (Linux TCP_INFO, as ``ss -lnt``)."""
        queued, backlog = self._raw.queue()
        if queued > self._deepest:
            self._deepest = queued
        return queued, backlog

    def waiter(self, stop: Any = -1) -> Any:
        """A waiter for one thread's ``accept_many(..., waiter=)`` calls
        (leader/follower: several threads wait on this listener, each
        connection goes to one of them).  ``stop``: a descriptor (-1: none)
        while which is readable those calls return an empty batch at once;
        or a Stop from new_stop(), shared by the waiters.  Close the waiter
        when the thread is done with it."""
        return self._raw.waiter(stop)

    def new_stop(self) -> Any:
        """A Stop for waiters on this listener: its fence() returns once
        none of their accept_many calls can touch the listening descriptor
        any more (it may then be made blocking, closed or reused) and makes
        each of them return an empty batch at once from then on; set() is
        fence() and wakes the waiting ones; close() it when done (its
        descriptor closes with the last waiter made with it)."""
        return self._raw.new_stop()

    def set_accept_filter(self, rule: str, timeout: float = DEFAULT_READY_TIMEOUT,
                          max_bytes: int = DEFAULT_READY_MAX_BYTES,
                          max_waiting: Optional[int] = None, proxy: int = 0,
                          proxy_max_v2: Optional[int] = None, min_rate: int = 0) -> None:
        """From now on, accept() and accept_many() return only connections
        that are *ready* by ``rule``: 'data' (the client sent a byte),
        'line' (a complete line), 'http' (a complete request head, up to
        the empty line), 'tls' (a complete TLS ClientHello record), or
        'none' (every connection at once, as without a filter).  With
        ``proxy`` (fastlisten.proxy.V1, V2 or V1 | V2) a complete, valid
        PROXY header must come first; it stays in the connection, for
        ``fastlisten.proxy_read``.  After a LOCAL header (a balancer's
        health check) at least one byte must follow, whatever the rule:
        a health check that closes or resets is dropped and counted
        ('closed', 'reset'), never handed over.

        The others wait in the core (an epoll set: no thread, no GIL, no
        Python object each) for at most ``timeout`` seconds from their
        accept; bytes are only peeked at, so the handler reads them all.
        ``max_bytes`` bounds a line or head; ``max_waiting`` (default
        :func:`default_max_waiting`) the connections waiting at once: one
        more closes the oldest.  ``min_rate`` (bytes per second, 0: none):
        one that has waited a second or more and sent fewer than that many
        bytes for each second is closed ('slow') as soon as it sends more
        without becoming ready (a client that dribbles its head goes long
        before its deadline).  Expired, malformed, oversize, closed, reset,
        evicted and slow connections are closed and counted
        (``counters()['dropped']`` by reason, with ``waiting``,
        ``waiting_peak``, ``waited`` and ``made_ready``); close() and
        close_waiting() close those still waiting ('shutdown').  Waits
        stay interruptible: wakeup() and signals end them as before.
        Leader/follower waiters (``waiter()``) must be made after it.  Call
        it while no connection waits (before the first accept, or to
        change the rule)."""
        from fastlisten import proxy as _proxy

        self._raw.set_accept_filter(
            rule, timeout, max_bytes, default_max_waiting() if max_waiting is None
            else max_waiting, proxy, _proxy.DEFAULT_MAX_V2 if proxy_max_v2 is None
            else proxy_max_v2, min_rate)
        self._filtered = rule != "none" or proxy != 0

    def set_accepting(self, on: bool) -> None:
        """``False``: accept_many() takes no new connection from the
        kernel's queue, only the connections waiting in the accept filter,
        as they become ready (none without a filter, nor with a
        ``waiter``: an empty batch at once); ``True``: as before.  A
        graceful stop on a socket that others go on accepting from (the
        next worker after a reload) waits so for the clients its filter
        holds, without taking the new ones meant for the others."""
        self._raw.set_accepting(on)

    def close_waiting(self) -> int:
        """Close every connection waiting in the accept filter, counted in
        ``counters()['dropped']['shutdown']``, and return how many.  The
        listener stays open and keeps its filter: a server's shutdown()
        calls this, so that no client is left waiting for a reply that
        will not come.  Safe while other threads are inside accept_many()
        (each waiting connection is either handed over or closed here,
        never both); 0 without a filter or once the listener is closed."""
        return self._raw.close_waiting()

    def accept_many(self, max: int = DEFAULT_BATCH, timeout: Optional[float] = None,
                    waiter: Any = None) -> List[Tuple[socket.socket, Any]]:
        """Wait up to ``timeout`` seconds (None: for ever) for connections and
        accept up to ``max`` pending ones in one go, without the GIL.

        Returns a list of (socket, address); empty on timeout or wakeup()
        (and, with a ``waiter``, when its stop descriptor is readable or
        another thread took the connection first).  With an accept filter
        (set_accept_filter, or ``ready_rule`` in the config), only ready
        connections: the others wait in the core meanwhile, and ``timeout``
        ends the wait even while some are still waiting.
        """
        batch = self._raw.accept_many(max, timeout, waiter)
        self.check_capacity()
        n = len(batch)
        if n:
            depth = n
            if n >= max and waiter is None and self._raw.family != socket.AF_UNIX:
                # A full batch left some behind: they were queued too.
                try:
                    depth += self._raw.queue()[0]
                except OSError:
                    pass
            if depth > self._deepest:
                self._deepest = depth
            config = self.config
            if config is not None and config.accepted_options:
                for conn, _ in batch:
                    try:
                        config.apply_connection_options(conn)
                    except OSError as exc:   # the peer is gone already; its handler will see
                        _log.debug("options on accepted connection: %s", exc)
        return batch

    def accept_one_with(self, waiter: Any, timeout: Optional[float]
                        ) -> Callable[[], List[Tuple[socket.socket, Any]]]:
        """``accept_many(1, timeout, waiter)`` as a function of no argument,
        for a thread that calls it once per connection: the core's own
        when there is nothing to do per connection in Python (no
        accepted-connection options); its caller then calls
        check_capacity() after an empty batch.  With an accept filter, this
        listener's accept_many(), which checks the filter's drops after
        every batch (a run of them is logged while connections keep
        coming)."""
        config = self.config
        if self._filtered or (config is not None and config.accepted_options):
            return functools.partial(self.accept_many, 1, timeout, waiter)
        return functools.partial(self._raw.accept_many, 1, timeout, waiter)

    def check_capacity(self) -> None:
        """Log a warning for a new run of capacity errors (EMFILE ...), and
        for a new run of the accept filter's drops (see _log_drops).
        accept_many() calls it after every batch: two integer reads when
        nothing happened."""
        if self._raw.capacity_episodes != self._logged_episodes:
            self._log_capacity()
        if self._drop_open or self._raw.drop_episodes != self._drop_seen:
            self._log_drops()

    #: At most one warning per this many seconds for a new run of the accept
    #: filter's drops; the runs in between are counted, and the next warning
    #: says how many (under a steady attack, one line a minute, not one per
    #: client).
    drop_log_interval = 60.0

    def _log_drops(self) -> None:
        """The accept filter's drops, logged once per run, as the server
        classes log PROXY and TLS failures: the first drop of a run at
        WARNING with its reason, the rest only counted
        (``counters()['dropped']``) until a connection is made ready again,
        which logs how many there were.  Connections closed or reset
        before they were ready (health checks, port scanners) and those
        closed on purpose ('shutdown') are only counted."""
        with self._drop_lock:
            episodes, reason, ongoing, drops = self._raw.last_drop_episode()
            if episodes != self._drop_seen:
                runs = episodes - self._drop_seen
                self._drop_seen = episodes
                now = monotonic()
                if (self._drop_logged_at is not None
                        and now - self._drop_logged_at < self.drop_log_interval):
                    self._drop_quiet += runs
                    self._drop_open = False
                    return
                quiet, self._drop_quiet = self._drop_quiet + runs - 1, 0
                self._drop_logged_at = now
                self._drop_open = ongoing
                _log.warning(
                    "accept filter on %s: dropped a connection (%s); further drops are "
                    "counted (counters()['dropped']), not logged, until a connection is "
                    "made ready%s", self._describe(), _DROP_MEANING.get(reason or "", reason),
                    f" ({quiet} more runs of drops since the last warning were counted, "
                    "not logged)" if quiet else "")
            elif self._drop_open and not ongoing:
                self._drop_open = False
                if drops > 1:
                    _log.warning("accept filter on %s: %d connections were dropped in a "
                                 "row before one was made ready", self._describe(), drops)

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

    # -- counters --------------------------------------------------------

    def stats(self) -> dict:
        """Counters of the core: accepted, batches, max_batch,
        capacity_episodes and errors by errno."""
        return self._raw.stats()

    def handler_started(self) -> None:
        """Count a handler as running (servers call this; thread-safe)."""
        with self._count_lock:
            self._handlers += 1
            if self._handlers > self._handlers_peak:
                self._handlers_peak = self._handlers

    def handler_finished(self) -> None:
        """Count a handler as done (pairs with handler_started)."""
        with self._count_lock:
            self._handlers -= 1

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """``with listener.handling(): handle(conn)`` keeps handlers_running."""
        self.handler_started()
        try:
            yield
        finally:
            self.handler_finished()

    def counters(self) -> Dict[str, Any]:
        """Counters of this listener's life, and the system's.

        ``accepted``, ``batches``, ``max_batch`` (largest batch),
        ``capacity_episodes``, ``errors`` ({errno: count} of accept errors),
        ``handlers_running`` and ``handlers_peak``, ``queued`` (in the accept
        queue now; None for Unix sockets), ``backlog``, ``deepest_queue``
        (the most seen waiting at once: at a batch or a queue() call), and
        the system-wide ``listen_overflows``/``listen_drops`` (kernel
        ListenOverflows/ListenDrops since boot; ``*_since_open`` since this
        listener was created) -- when they rise, the kernel dropped
        handshakes because an accept queue was full.  The accept filter's
        (see set_accept_filter; zeros without one): ``waiting`` (now),
        ``waiting_peak``, ``waited`` (connections that had to wait),
        ``made_ready`` (handed over by the filter) and ``dropped``
        ({reason: count}: malformed, oversize, closed, reset, expired,
        evicted, shutdown, error, slow); ``accepted`` counts only connections
        handed over.
        """
        out: Dict[str, Any] = dict(self._raw.stats())
        queued: Optional[int] = None
        if not self.closed and self._listening and self._raw.family != socket.AF_UNIX:
            try:
                queued = self.queue()[0]
            except OSError:
                pass
        system = sysinfo.listen_counters()
        before = self._system_at_open
        with self._count_lock:
            out["handlers_running"] = self._handlers
            out["handlers_peak"] = self._handlers_peak
        out["queued"] = queued
        out["backlog"] = None if self.closed else self.backlog
        out["deepest_queue"] = self._deepest
        for key, name in (("listen_overflows", "ListenOverflows"), ("listen_drops", "ListenDrops")):
            now, then = system.get(name), before.get(name)
            out[key] = now
            out[key + "_since_open"] = None if now is None or then is None else now - then
        return out

    # -- the end ---------------------------------------------------------

    def close(self) -> None:
        """Stop listening.  Idempotent; connections already accepted stay open.
        A Unix socket file this listener created is removed (only by the
        process that bound it, and only if it is still the same file)."""
        self._raw.close()
        unix, self._unix_file = self._unix_file, None
        if unix is not None:
            unix.remove()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self._describe()
        return f"<fastlisten.Listener {state}>"


def listen(address: Optional[Address] = None, **options: Any) -> Listener:
    """Create, bind and listen in one call; returns a Listener.

    ``address`` is (host, port), text (``"HOST:PORT"``, ``"[::1]:PORT"``,
    ``":PORT"`` for every interface) or a Unix socket path (bytes, a
    path-like, or a str starting with ``unix:`` or containing ``/``; see
    :mod:`fastlisten.address`); the family follows from it unless given.
    No host (``address=None``, or ``port=`` alone) binds loopback only,
    127.0.0.1 (``::1`` for IPv6); ``''`` binds every interface.  With
    ``fd=``, no address.  ``options`` are those of
    :class:`fastlisten.config.ListenConfig`: ``family``, ``backlog``
    (default: the kernel's somaxconn), ``reuse_address`` (SO_REUSEADDR, on
    by default as in socket.create_server, so a restarted server binds
    while old connections sit in TIME_WAIT), ``reuse_port``,
    ``dualstack`` (an IPv6 listener on '::' serves IPv4 too; else
    IPv6-only), ``nodelay``, ``keepalive``, ``rcvbuf``, ``sndbuf``,
    ``defer_accept``, ``fastopen``, ``fd`` (an open listening socket, or
    'systemd'), ``unix_mode``, ``unlink_stale``, and the accept filter's
    ``ready_rule``, ``ready_timeout``, ``ready_max_bytes``, ``max_waiting``
    (see :meth:`Listener.set_accept_filter`).  Values are checked before
    anything is opened; on any later failure the descriptor is closed
    before the error propagates.
    """
    return Listener.from_config(ListenConfig.from_address(address, **options))


def describe_ready(ready: Optional[ReadySettings], why: str) -> str:
    """The accept filter ``ready`` (ListenConfig.server_ready(); None: none)
    in a sentence, for a log line: the rule (and ``why``: where it came
    from), what a connection waits for, its deadline and the cap."""
    if ready is None or (ready.rule == "none" and not ready.proxy):
        rule = ready.rule if ready is not None else "none"
        return f"ready rule {rule!r} ({why}): connections go to a thread at once"
    what = []
    if ready.proxy:
        what.append("a complete PROXY header")
    if ready.rule != "none":
        what.append(_READY_WORDS[ready.rule])
    cap = ready.max_waiting if ready.max_waiting is not None else default_max_waiting()
    return (f"ready rule {ready.rule!r} ({why}): a connection waits in the core, holding "
            f"no thread or process, for {', then '.join(what)}, at most {ready.timeout:g} s from "
            f"accept, at most {cap} at once")


#: What each rule waits for, in the startup log line.
_READY_WORDS = {"data": "a first byte", "line": "a whole line",
                "http": "a whole request head", "tls": "a whole TLS ClientHello"}
