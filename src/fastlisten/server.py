"""A drop-in ``socketserver``: the same classes, hooks and attributes,
served by fastlisten's core.

``import fastlisten as socketserver`` keeps code written for the standard
library working.  Each class here subclasses its standard-library namesake
(so ``isinstance(server, socketserver.TCPServer)`` holds for both modules'
``TCPServer``) and changes only what is slow there:

- ``serve_forever`` of a stream server whose ``get_request`` is the stock
  one takes connections from the core in batches, waiting without the GIL;
  every other hook (``verify_request``, ``process_request``,
  ``handle_error``, ``shutdown_request``, ``service_actions``...) is called
  as the stdlib calls it.  Other servers (UDP, an overridden
  ``get_request``, a TLS-wrapped ``self.socket``) keep the stdlib's loop.
- ``shutdown()`` wakes ``serve_forever`` at once instead of waiting for the
  next ``poll_interval`` tick (CPython gh-88932).
- ``ThreadingMixIn`` reuses threads (``fastlisten._threadpool``); with stock
  serving-thread hooks its idle threads accept connections themselves
  (leader/follower) and run the request at once.
- ``request_queue_size`` is the kernel's somaxconn, not 5 (CPython 3.15:
  ``socket.SOMAXCONN``, the C library's constant).

Behind a load balancer and with TLS (fastlisten's additions): a
``listen_config`` with ``proxy_protocol`` makes every connection start with
a PROXY protocol header; the accept filter holds the connection in the core
until the header is complete (``proxy_timeout``), then it is read before
``verify_request``, so that verify_request and the handler see the real
client in ``client_address``; ``self.server.proxy_header`` is the parsed
header.  A ``listen_config`` with ``ssl_context`` waits for the complete
ClientHello there and runs each TLS handshake in the thread or process
that runs the handler, under its ``handshake_timeout``, after the PROXY
header: the accept loop never waits for a client.  ``ready_rule`` makes
the filter wait for the request too (see docs/guide/dropin.md).  A connection
that is an ``ssl.SSLSocket`` already is never wrapped again.
A ``listen_config`` with ``handler_timeout`` shuts a connection down once
its handler has run that long, wherever the handler runs (fastlisten._deadline).

The names these classes add to the stdlib's are fastlisten's only where no
subclass can mean something else by them (see the README's table): the
settings live in ``listen_config`` (read only when it is a ListenConfig)
or carry an ``fl_`` prefix (``fl_max_threads``, ``fl_max_queued``,
``fl_thread_idle_timeout``, ``fl_accept_batch_size``, ``fl_kill_timeout``);
a subclass's own ``ssl_context``, ``handshake_timeout``, ``max_threads``,
``counters``, ``drain``, ``end_handlers`` or ``proxy_header`` is its own,
and fastlisten's code never calls or reads those names.

The loop lives in the mixins as well as in the servers, so
``class S(fastlisten.ThreadingMixIn, http.server.HTTPServer)`` is fast too.
The request handlers are the standard library's own classes, but for
``StreamRequestHandler``, whose ``rfile`` and ``wfile`` the core builds.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import select
import selectors
import signal
import socket
import socketserver as _std
import ssl
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple, overload

from fastlisten import address as _address
from fastlisten import sysinfo
from fastlisten._backend import SocketReader, SocketWriter
from fastlisten._coreshared import DEFAULT_BATCH
from fastlisten._deadline import Watchdog
from fastlisten._frontdoor import FrontDoor
from fastlisten._queued import grace_left, hand_over, serve_queued
from fastlisten._threadpool import LeaderPool
from fastlisten._wakeup import SignalWakeup, Waker
from fastlisten.config import ListenConfig, ReadySettings, server_side_context
from fastlisten.errors import (
    SERVER_REUSE_HINT,
    effective_backlog,
    explain_bind_error,
    stale_socket_hint,
    warn_if_ephemeral,
)
from fastlisten.listener import Listener, UnixSocketFile, adoptable, default_backlog
from fastlisten.proxy import ProxyHeader

_log = logging.getLogger("fastlisten")

# The request handlers behave the same: the stdlib's classes, and a
# StreamRequestHandler whose setup() builds its file objects in the core.
BaseRequestHandler = _std.BaseRequestHandler
DatagramRequestHandler = _std.DatagramRequestHandler

_stock_makefile = socket.socket.makefile


class StreamRequestHandler(_std.StreamRequestHandler):
    """socketserver.StreamRequestHandler, with the same attributes and
    behaviour (``connection``, ``rfile``, ``wfile``, ``rbufsize``,
    ``wbufsize``, ``timeout``, ``disable_nagle_algorithm``; ``finish()``
    flushes ``wfile`` and closes both), built for less per connection.

    ``setup()`` builds ``rfile`` as the stdlib's ``makefile("rb")`` does, an
    ``io.BufferedReader``, but over the core's ``SocketReader`` instead of
    ``socket.SocketIO``, and an unbuffered ``wfile`` (``wbufsize`` 0, the
    default) as the core's ``SocketWriter`` instead of
    ``socketserver._SocketWriter``: the same methods, results, messages and
    socket reference counting, without a Python frame per construction,
    read and close.  An unbuffered ``rfile`` (``rbufsize`` 0), a buffered
    ``wfile`` and a request that is not a plain socket get the stdlib's
    own objects.
    """

    def setup(self) -> None:
        conn = self.request
        rbufsize = self.rbufsize
        if (type(rbufsize) is not int or rbufsize == 0
                or getattr(type(conn), "makefile", None) is not _stock_makefile):
            return super().setup()
        self.connection = conn
        if self.timeout is not None:
            conn.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = io.BufferedReader(
            SocketReader(conn), rbufsize if rbufsize > 0 else io.DEFAULT_BUFFER_SIZE)
        if self.wbufsize == 0:
            self.wfile = SocketWriter(conn)
        else:
            self.wfile = conn.makefile("wb", self.wbufsize)

#: The request handlers' setup() that wrap nothing (see _FastLoop._fl_check_old_tls).
_STOCK_SETUPS = (_std.BaseRequestHandler.setup, _std.StreamRequestHandler.setup,
                 _std.DatagramRequestHandler.setup, StreamRequestHandler.setup)

#: Guards publishing, waking and closing a serving loop's wake-up source, so
#: that shutdown() never writes to a descriptor closed (and maybe reused) meanwhile.
_wake_lock = threading.Lock()


#: socket.socket.close() is "_closed = True, then the real close unless a
#: makefile() object still uses the socket" (3.9 to 3.13); the inline path
#: does the same without two Python calls, where the class still looks so.
_socket_close: Callable[[socket.socket], None] = getattr(socket.socket.__mro__[1], "close")
_INLINE_CLOSE = {"_io_refs", "_closed"} <= set(getattr(socket.socket, "__slots__", ()))


def _stock(cls: type, name: str, stdlib_owner: type) -> bool:
    """True if cls uses stdlib_owner's own implementation of method name."""
    return getattr(cls, name, None) is getattr(stdlib_owner, name)


def _own_method(server: Any, name: str) -> Callable[..., Any]:
    """fastlisten's own implementation of method ``name`` (``drain``,
    ``end_handlers``, ``counters``) bound to ``server``: the one the
    nearest fastlisten class in its MRO defines, whatever a subclass
    defines under that name for its own purposes.  fastlisten's code
    (``drain()``, ``fastlisten.Workers``) calls these through it, never
    through the public name.  AttributeError for a server that is not
    built on fastlisten's classes."""
    cls = type(server)
    for klass in cls.__mro__:
        if klass.__module__ == __name__ and name in vars(klass):
            return vars(klass)[name].__get__(server, cls)
    raise AttributeError(f"{cls.__name__} is not a fastlisten server: it has no "
                         f"fastlisten {name}()")


class _ProxyHeaderAttr:
    """``server.proxy_header``: in a handler, the PROXY protocol header of
    the connection this thread (or process) is handling (a
    :class:`fastlisten.proxy.ProxyHeader`: addresses, TLVs), or None without
    one; ``client_address`` already holds the real client's address.

    A non-data descriptor: a subclass's own ``proxy_header`` (a class
    attribute, or one set on the instance) wins, and fastlisten never reads
    the name itself."""

    @overload
    def __get__(self, server: None, owner: Optional[type] = None) -> "_ProxyHeaderAttr": ...

    @overload
    def __get__(self, server: Any, owner: Optional[type] = None) -> Optional[ProxyHeader]: ...

    def __get__(self, server: Any, owner: Optional[type] = None) -> Any:
        if server is None:
            return self
        local = server._fl_local
        return getattr(local, "header", None) if local is not None else None


# -- the stdlib server class the mixins join --------------------------------------
# _FastLoop (and through it every class here) is mixed into a stdlib server
# class: its methods use that class's attributes and hooks (socket,
# server_address, verify_request, ...) and call its methods through super().
# At run time it derives from object, so that it fits anywhere in an MRO;
# the type checker sees _StdServer, which declares what the mixins expect of
# the class they join, the BaseServer private state below included.  (Not
# the stdlib's TCPServer itself: as a base of the mixins it would come before
# the stdlib's mixins in the servers' MROs, where ThreadingTCPServer & co.
# put it after them.)
if TYPE_CHECKING:
    class _StdServer:
        socket: socket.socket
        server_address: Any
        address_family: int
        socket_type: int
        allow_reuse_address: bool
        request_queue_size: int
        RequestHandlerClass: Any
        _BaseServer__shutdown_request: bool
        _BaseServer__is_shut_down: threading.Event

        def server_bind(self) -> None: ...
        def server_activate(self) -> None: ...
        def server_close(self) -> None: ...
        def serve_forever(self, poll_interval: Optional[float] = 0.5) -> None: ...
        def shutdown(self) -> None: ...
        def fileno(self) -> int: ...
        def _handle_request_noblock(self) -> None: ...
        def verify_request(self, request: Any, client_address: Any) -> bool: ...
        def process_request(self, request: Any, client_address: Any) -> None: ...
        def finish_request(self, request: Any, client_address: Any) -> None: ...
        def shutdown_request(self, request: Any) -> None: ...
        def handle_error(self, request: Any, client_address: Any) -> None: ...
        def service_actions(self) -> None: ...
else:
    _StdServer = object

# What the parts of _FastLoop (_Binding, _FrontDoorHooks, _GracefulStop,
# _Counters, and _FastLoop's own loop) use of one another: their state and
# methods, declared for the type checker; at run time each part derives
# from object, and _FastLoop joins them.
if TYPE_CHECKING:
    class _FastLoopParts(_StdServer):
        _fl_defer: bool
        _fl_config: Optional[ListenConfig]
        _fl_listener: Optional[Listener]
        _fl_filter: Optional[ReadySettings]
        _fl_in_batch: bool
        _fl_handled: bool
        _fl_door: Optional[FrontDoor]
        _fl_dog: Optional[Watchdog]
        _fl_ended: Any
        _fl_unserved: Optional[List[Tuple[Any, Any, bool]]]

        def _fl_listen_config(self) -> Optional[ListenConfig]: ...
        def _fl_check_stream(self, name: str, value: Any) -> None: ...
        def _fl_stock(self, names: Tuple[str, ...], owner: type = ...) -> bool: ...
        def _fl_frontdoor(self) -> Optional[FrontDoor]: ...
        def _fl_watchdog(self) -> Optional[Watchdog]: ...
        def _fl_interrupt(self) -> None: ...
        def _fl_filtering(self) -> Optional[Listener]: ...
else:
    _FastLoopParts = object


# -- the stdlib BaseServer's private state ------------------------------------
# serve_forever() and shutdown() keep their state where the stdlib's
# BaseServer keeps it: in its name-mangled private attributes
# (``__shutdown_request``, ``__is_shut_down``), which BaseServer.__init__
# sets.  So the loop works over any stdlib server class, whoever's __init__
# ran (a mixin's, a third party's), and the stdlib's own methods that read
# them (handle_request's callers, a base class's own serve_forever) see the
# same state.  These helpers are the one place that spells the names; the
# fast loop's two per-connection checks read the attribute inline (a call
# there would cost every connection a Python frame).

def _stop_asked(server: _StdServer) -> bool:
    """True once shutdown() asked the running serve_forever() to return."""
    return bool(server._BaseServer__shutdown_request)


def _ask_stop(server: _StdServer, asked: bool) -> None:
    """Set (or clear) the request to stop that serve_forever() checks."""
    server._BaseServer__shutdown_request = asked


def _shut_down_event(server: _StdServer) -> threading.Event:
    """The event shutdown() waits on: clear while serve_forever() runs."""
    return server._BaseServer__is_shut_down


#: What runs per connection in a loop that accepts in the core: (request,
#: client_address) -> None.
PerConnection = Callable[[socket.socket, Any], None]


class Loop(enum.Enum):
    """Which loop ``serve_forever`` runs (see _FastLoop._fl_choose_loop);
    the value is what ``_fl_loop`` holds while it runs."""

    #: A base class's own serve_forever()/shutdown() pair.
    BASE = "base"
    #: The stdlib's loop (select, then _handle_request_noblock), with a
    #: wake-up descriptor for shutdown().
    SELECTOR = "selector"
    #: The serving thread takes batches of connections from the core.
    BATCHES = "batches"
    #: ThreadingMixIn's leader/follower: idle worker threads accept in the
    #: core themselves; the serving thread only waits for shutdown().
    LEADER = "leader"


class LoopChoice(NamedTuple):
    """The loop serve_forever runs and the call it makes per connection."""

    loop: Loop
    #: BATCHES: called in the serving thread for each accepted connection;
    #: LEADER: in the worker thread that accepted it; None for BASE and
    #: SELECTOR (the stdlib's _handle_request_noblock calls the hooks).
    per_connection: Optional[PerConnection]
    #: Why (one line, for tests and debugging).
    why: str


#: A server's accept batch takes at most 1/HEADROOM_SHARE of the descriptors
#: its process may still open (see _FastLoop.fl_accept_batch_size).
HEADROOM_SHARE = 4


class _Binding(_FastLoopParts):
    """The listening socket's life: ``listen_config``'s listener options
    applied in server_bind() (or the socket it hands over adopted),
    listen() with its backlog, the checks of what a server's class allows,
    and server_close(), which releases what the other parts hold and
    removes the Unix socket file the server bound."""

    #: Listener options (a :class:`fastlisten.ListenConfig` without an
    #: address; the server's ``server_address`` says where) applied with the
    #: same validation, warnings and explained errors as
    #: ``fastlisten.listen``: e.g. ``ListenConfig(nodelay=True,
    #: defer_accept=1)``; ``fd=`` takes over an open listening socket
    #: (``'systemd'``: socket activation).  None: the stdlib's
    #: attribute-driven set-up alone (``allow_reuse_address``,
    #: ``request_queue_size`` ...), which also applies with a config.
    #: TLS too: ``ListenConfig(ssl_context=..., handshake_timeout=...)``
    #: wraps each connection and runs its handshake in the handler's thread
    #: (or process), never in the accept loop; a failed handshake is logged
    #: (once per run of failures), counted (``counters()['tls_failures']``)
    #: and the connection closed.  ``ListenConfig(handler_timeout=N)``
    #: shuts a connection down once its handler has run N seconds (see
    #: fastlisten._deadline).  A value that is not a ListenConfig is a
    #: subclass's own: it is left alone.
    listen_config: Optional[ListenConfig] = None
    _fl_config: Optional[ListenConfig] = None  # listen_config at server_address
    _fl_adopted = False         # self.socket came from listen_config.fd, listening
    _fl_unix_file: Optional[UnixSocketFile] = None

    def server_bind(self) -> None:
        """Bind the socket as the stdlib does, after applying
        ``listen_config`` (if any); a failing bind keeps its OSError subclass
        and errno and explains itself (who holds the port, ...)."""
        config = self._fl_listen_config()
        if config is not None:
            self._fl_check_stream("listen_config", config)
            if self._fl_defer:
                self._fl_refuse_ready_rule(config, "its class brings its own serve_forever()")
            config = self._fl_config = config.for_address(
                self.server_address, self.address_family)
            if config.fd is not None:
                self._fl_adopt(config)
                return
            config.apply_listener_options(self.socket)
            config.before_bind()
            if config.family != socket.AF_UNIX:
                warn_if_ephemeral(config.port)
            self.server_address = config.address
        else:
            # A str is never a TCP address (nor, behind the caller's back, a file).
            _address.check_inet_tuple(self.address_family,
                                      self.server_address)
        try:
            super().server_bind()
        except OSError as exc:
            family, where = self.address_family, self.server_address
            try:
                where = _address.resolve(family, where)   # name the numeric address
            except socket.gaierror as unknown:
                if isinstance(exc, socket.gaierror):
                    raise unknown from None     # names the host, as listen() does
            except (OSError, TypeError, ValueError, OverflowError):
                pass
            reuse = None
            if config is None and not self.allow_reuse_address:
                reuse = SERVER_REUSE_HINT
            raise explain_bind_error(exc, family, where, reuse_hint=reuse,
                                     stale_hint=stale_socket_hint(config, server=True)) from None
        if config is not None:
            config.after_bind()
            if config.family == socket.AF_UNIX:
                self._fl_unix_file = UnixSocketFile.record(_address.unix_path(config.path))

    def _fl_check_old_tls(self) -> None:
        """Warn (once per server) a program written for fastlisten's old
        ``ssl_context`` server attribute: one that holds a server-side
        SSLContext there, listens on a plain socket, and whose hooks
        (get_request, finish_request, the handler's setup) are all stock,
        so that nothing of its own wraps a connection: it serves plain
        TCP.  A program that keeps the name for itself (werkzeug wraps its
        listening socket; others wrap in get_request) is not warned."""
        if (not server_side_context(getattr(self, "ssl_context", None))
                or vars(self).get("_fl_tls_warned")
                or isinstance(getattr(self, "socket", None), ssl.SSLSocket)):
            return
        config = self._fl_config if self._fl_config is not None else self._fl_listen_config()
        setup = getattr(getattr(self, "RequestHandlerClass", None), "setup", None)
        if not (config is None or config.tls() is None) or not (
                self._fl_stock(("get_request",))
                and getattr(type(self), "finish_request", None) is _FastLoop.finish_request
                and "finish_request" not in vars(self)
                and setup in _STOCK_SETUPS):
            return
        self._fl_tls_warned = True
        from fastlisten.errors import warn
        warn(f"{type(self).__name__}.ssl_context holds a server-side SSLContext, but "
             "fastlisten no longer reads that attribute (it is the subclass's own): this "
             "server answers plain TCP. For fastlisten's TLS, set listen_config = "
             "fastlisten.ListenConfig(ssl_context=..., handshake_timeout=...)")

    def _fl_current_config(self) -> Optional[ListenConfig]:
        """listen_config as server_bind() resolved it, else as it is now."""
        return self._fl_config if self._fl_config is not None else self._fl_listen_config()

    def _fl_listen_config(self) -> Optional[ListenConfig]:
        """``listen_config`` when it is a ListenConfig; None for anything
        else, which is a subclass's own attribute of that name."""
        config = getattr(self, "listen_config", None)
        return config if isinstance(config, ListenConfig) else None

    def _fl_refuse_ready_rule(self, config: Optional[ListenConfig], why: str) -> None:
        """A ValueError for an explicit ``listen_config.ready_rule`` on a
        server whose loop cannot apply the accept filter (Loop.BASE,
        Loop.SELECTOR: ``why``): serving every connection at once while the
        program asked for a filter would leave it unprotected without a
        word.  (Without ready_rule, the PROXY header and the TLS handshake
        are then waited for in the handler's thread, as before.)"""
        if config is not None and config.ready_rule is not None:
            raise ValueError(
                f"{type(self).__name__}: listen_config.ready_rule={config.ready_rule!r} "
                f"cannot be applied: {why}, so connections are not accepted in "
                "fastlisten's core, where the accept filter waits. Keep the stock "
                "get_request(), fileno() and _handle_request_noblock() and a plain "
                "listening socket (wrap connections with listen_config.ssl_context, not "
                "the listening socket), or leave ready_rule unset")

    def _fl_check_stream(self, name: str, value: Any) -> None:
        """A ValueError when ``name`` is set (not None) on a server that is
        not a stream server: they act on connections."""
        if value is not None and self.socket_type != socket.SOCK_STREAM:
            raise ValueError(f"{type(self).__name__}: {name} is for stream "
                             "(TCP and Unix stream) servers")

    def _fl_adopt(self, config: ListenConfig) -> None:
        """server_bind() for ``listen_config.fd``: the socket becomes the one
        passed in (self.socket is replaced; server_address is its address)."""
        fd, family, listening = adoptable(config)
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        self.socket.close()
        self.socket = sock
        self.address_family = family
        self.server_address = sock.getsockname()
        self._fl_adopted = listening
        config.apply_listener_options(sock)

    def server_activate(self) -> None:
        """listen(), with ``listen_config.backlog`` (else
        ``request_queue_size``); an adopted listening socket is left as it
        is unless listen_config sets a backlog."""
        config = self._fl_config
        if config is None:
            return super().server_activate()
        if self._fl_adopted and config.backlog is None:
            return None
        backlog = config.backlog if config.backlog is not None else self.request_queue_size
        self.socket.listen(backlog)
        effective_backlog(backlog)     # warns when the kernel truncates it
        return None

    def server_close(self) -> None:
        """Close the server (and remove the Unix socket file listen_config bound)."""
        listener, self._fl_listener = self._fl_listener, None
        kept, self._fl_unserved = self._fl_unserved or [], None
        for request, _, _ in kept:
            self.shutdown_request(request)
        try:
            super().server_close()
        finally:
            if listener is not None:
                listener.close()
            door, self._fl_door = self._fl_door, None
            if door is not None:
                door.close()
            if self._fl_dog is not None:
                # its thread leaves once the handlers still armed are done
                # (or expire); counters() keeps its count
                self._fl_dog.close()
            unix, self._fl_unix_file = self._fl_unix_file, None
            if unix is not None:
                unix.remove()


class _FrontDoorHooks(_FastLoopParts):
    """A connection's front door, in the thread or process that runs its
    handler: the PROXY header and the TLS handshake before the handler
    (finish_request(), through a FrontDoor), the header read early for
    verify_request (_fl_front), the handler deadline's watchdog around the
    handler, and handle_error() quiet for the connections the server ended."""

    _fl_door: Optional[FrontDoor] = None    # PROXY header / TLS handshake, when configured
    #: listen_config.handler_timeout's watchdog (see _fl_watchdog), when configured
    _fl_dog: Optional[Watchdog] = None
    #: Connections whose PROXY header _fl_read_proxy() read before
    #: verify_request, to (header,) for finish_request (weakly held: a
    #: connection closed unhandled is forgotten).
    _fl_proxied: Any = None
    _fl_local: Optional[threading.local] = None
    _fl_forking = False         # handlers run in forked children

    proxy_header = _ProxyHeaderAttr()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating RequestHandlerClass; behind
        a load balancer (``listen_config.proxy_protocol``) or with
        ``listen_config.ssl_context``, first read the PROXY header and run the TLS
        handshake, here, in the handler's thread or process.  A connection
        that fails them never reaches the handler (it is counted, logged
        once per episode, and closed by the caller).  With
        ``listen_config.handler_timeout``, the handler runs under its
        deadline (see fastlisten._deadline), from the moment it is built."""
        dog = self._fl_watchdog()
        door = self._fl_frontdoor()
        if door is None:
            if dog is None:
                return super().finish_request(request, client_address)
            entry = dog.arm(request)
            try:
                return super().finish_request(request, client_address)
            finally:
                dog.disarm(entry)   # before the caller closes the request
        proxied = (self._fl_proxied.pop(request, None) if self._fl_proxied is not None
                   else None)
        prepared = door.prepare(request, client_address, proxied)
        if prepared is None:
            return None
        conn, address, header = prepared
        local = self._fl_local
        if local is None:
            local = self._fl_local = threading.local()
        local.header = header
        if conn is not request:
            self._fl_swapped[request] = conn
        try:
            entry = None if dog is None else dog.arm(conn)
            try:
                super().finish_request(conn, address)
            finally:
                if dog is not None:
                    dog.disarm(entry)
        except Exception:
            # reported with the real client's address and connection
            self.handle_error(conn, address)
        finally:
            local.header = None
            if conn is not request:
                self._fl_swapped.pop(request, None)
                self.shutdown_request(conn)
        return None

    def _fl_front(self, request: socket.socket, client_address: Any) -> Any:
        """What comes before verify_request for a connection the loop (or
        serve_queued()) took from the server's Listener: the PROXY header,
        when the accept filter waited for it (_fl_read_proxy); returns the
        address verify_request gets, or None to drop the connection."""
        ready = self._fl_filter
        if ready is not None and ready.proxy:
            return self._fl_read_proxy(request, client_address)
        return client_address

    def _fl_read_proxy(self, request: socket.socket, client_address: Any) -> Any:
        """For a connection the accept filter handed over with its PROXY
        header complete: read the header now (it cannot block), in the
        thread that accepted the connection, so that verify_request and
        process_request see the real client.  Returns the address they
        get, or None when the connection is to be dropped (counted and
        logged by the FrontDoor; the caller closes it).  finish_request()
        then uses the header read here instead of reading one."""
        door = self._fl_frontdoor()
        if door is None or door.proxy is None:
            return client_address       # (listen_config replaced under a running loop)
        read = door.read_proxy(request, client_address)
        if read is None:
            return None
        address, header = read
        with _wake_lock:
            proxied = self._fl_proxied
            if proxied is None:
                proxied = self._fl_proxied = weakref.WeakKeyDictionary()
            proxied[request] = (header,)
        return address

    @property
    def _fl_swapped(self) -> Dict[Any, Any]:
        """Accepted sockets whose descriptor an SSLSocket took over, to it
        (end_handlers() shuts the SSLSocket down)."""
        swapped = self.__dict__.get("_fl_swapped_map")
        if swapped is None:
            swapped = self.__dict__.setdefault("_fl_swapped_map", {})
        return swapped

    def _fl_frontdoor(self) -> Optional[FrontDoor]:
        """The FrontDoor for the current listen_config (built on first use,
        rebuilt if it was replaced), or None when it asks for neither the
        PROXY protocol nor TLS."""
        config = self._fl_config if self._fl_config is not None else self._fl_listen_config()
        proxy = config.proxy() if config is not None else None
        tls = config.tls() if config is not None else None
        context = tls.context if tls is not None else None
        timeout = tls.handshake_timeout if tls is not None else None
        door = self._fl_door
        # per connection: compared by identity (config.proxy() returns the
        # same object each time), not by value
        if door is not None and door.proxy is proxy and door.ssl_context is context \
                and door.handshake_timeout == timeout:
            return door
        if proxy is None and context is None:
            return None
        self._fl_check_stream("listen_config", config)     # (set after start-up)
        with _wake_lock:
            door = self._fl_door
            if door is None or door.proxy is not proxy or door.ssl_context is not context \
                    or door.handshake_timeout != timeout:
                if self._fl_door is not None:
                    self._fl_door.close()
                self._fl_door = FrontDoor(proxy, context, timeout, forking=self._fl_forking)
            return self._fl_door

    def _fl_watchdog(self) -> Optional[Watchdog]:
        """The Watchdog for ``listen_config.handler_timeout`` (built on first
        use, rebuilt if the timeout changed), or None when it is not set;
        kept in ``_fl_dog``, which _fl_handle_inline reads as it is (this
        runs when serve_forever() starts).  A connection it shuts down is
        marked as end_handlers() marks one (see handle_error)."""
        config = self._fl_config if self._fl_config is not None else self._fl_listen_config()
        seconds = config.handler_timeout if config is not None else None
        dog = self._fl_dog
        if (dog.seconds if dog is not None else None) == seconds:
            return dog
        if seconds is not None:
            self._fl_check_stream("listen_config", config)     # (set after start-up)
        with _wake_lock:
            dog = self._fl_dog
            if dog is not None and dog.seconds != seconds:
                dog.close()     # (its thread ends with its last armed handler)
                dog = self._fl_dog = None
            if dog is None and seconds is not None:
                dog = self._fl_dog = Watchdog(seconds, _ender(self), forking=self._fl_forking)
            return dog

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Report a handler's exception (the stdlib prints the traceback to
        stderr).  A failure caused by end_handlers() (or the handler
        deadline) shutting the connection down is logged at DEBUG level
        instead: it is the server's doing."""
        if request in self._fl_ended:
            _log.debug("handler for %s ended by the server", _address.format_address(
                client_address))
            return
        super().handle_error(request, client_address)


class _GracefulStop(_FastLoopParts):
    """The graceful stop after shutdown(): serve_queued() serves what the
    loop kept from its handler and what the kernel queued, drain() waits
    for the handlers, end_handlers() ends the rest (the pools' and the
    children's versions live in ThreadingMixIn and ForkingMixIn)."""

    _fl_ended: Any = ()         # connections end_handlers() shut down (weakly held)
    #: Connections accepted but kept from their handler by shutdown()
    #: ((request, client_address, verified)): serve_queued() serves them,
    #: server_close() closes them.
    _fl_unserved: Optional[List[Tuple[Any, Any, bool]]] = None
    #: end_handlers() ran during a stop: serve_queued() hands no more
    #: connections to handlers (it closes them), and a wait for room in the
    #: pool (or for a child to exit) gives up, so a stop's grace and its
    #: second signal reach a serve_queued() that waits for a stuck handler.
    _fl_abandoned = False
    #: A graceful stop is under way (_fl_stop_gracefully): the loop leaves
    #: the connections waiting in the accept filter for serve_queued().
    _fl_graceful = False

    def _fl_stop_gracefully(self) -> None:
        """Tell the serving loop, before it is stopped (shutdown(), or a
        Workers worker's service_actions), that serve_queued() follows: the
        connections waiting in the accept filter stay there for it, instead
        of being closed when the loop returns.  server_close() closes them
        if serve_queued() never comes."""
        self._fl_graceful = True

    def serve_queued(self, timeout: Optional[float] = None) -> int:
        """After shutdown(), before server_close(): serve the connections
        the loop had accepted but shutdown() kept from their handler, and
        those the kernel has completed and queued on the listening socket;
        return how many.  server_close() alone (the stdlib's behaviour,
        kept) closes them unserved, and the kernel resets the queued ones:
        the client reads ECONNRESET.  First the kernel is made to complete no
        new connection (TCP: a socket filter drops new SYNs, so a client
        that connects from now on is refused once the socket closes); each
        queued connection then goes to ``process_request()`` as the serving
        loop would hand it; drain() then waits for their handlers too.
        ``fastlisten serve`` and :class:`fastlisten.Workers` call it on every
        graceful stop.  A socket taken over with ``listen_config.fd`` (say
        systemd's) outlives the server with its queue, for the next start:
        its queue is left alone.  Call it from one thread, with no other
        loop accepting on a blocking socket.

        With an accept filter (``listen_config.ready_rule``), a graceful
        stop (``fastlisten serve``'s, :func:`fastlisten.stop_serving`'s,
        Workers') leaves the connections still waiting in the filter
        (accepted, but their request has not arrived) to this call: those
        that become ready within ``timeout`` seconds (the stop's grace) are
        served, then the rest are closed (counted
        ``dropped['shutdown']``).  The wait is in the core (no thread
        spins); it ends once none waits, or when end_handlers() runs.
        ``timeout`` None or 0, a bare shutdown() (which closes them at
        once) or a socket taken over with ``fd``: none is waited for.  The
        grace counts from this call: handing the kept connections over
        (waiting for room in a bounded pool) uses it up too."""
        start = time.monotonic()
        kept = self._fl_serve_kept()
        config = self._fl_config
        if config is not None and config.fd is not None:
            listener = self._fl_filtering()
            if listener is not None:
                listener.close_waiting()    # (waiting would take from the queue)
            return kept
        return kept + serve_queued(self, timeout=grace_left(timeout, start))

    def _fl_serve_kept(self) -> int:
        """serve_queued()'s first half, alone: hand the connections
        shutdown() kept from their handler to it, and return how many.  A
        retiring worker whose socket stays open for its successor (a reload,
        a recycle) calls it: the kernel's queue is the successor's."""
        kept, self._fl_unserved = self._fl_unserved or [], None
        for i, (request, client_address, verified) in enumerate(kept):
            try:
                hand_over(self, request, client_address, verified)
            except BaseException:
                for rest, _, _ in kept[i + 1:]:
                    self.shutdown_request(rest)
                raise
        return len(kept)

    def _fl_keep(self, request: Any, client_address: Any, verified: bool) -> None:
        """A connection shutdown() kept from its handler (see serve_queued)."""
        with _wake_lock:
            if self._fl_unserved is None:
                self._fl_unserved = []
            self._fl_unserved.append((request, client_address, verified))

    def drain(self, timeout: Optional[float] = None) -> int:
        """After shutdown(): wait up to ``timeout`` seconds (None: for ever)
        for the handlers still running, then end the rest (end_handlers()).
        Returns how many handlers had to be ended (0: all finished).
        Call it from any thread but a handler's."""
        if self._fl_wait_handlers(timeout):
            return 0
        return _own_method(self, "end_handlers")()

    def end_handlers(self) -> int:
        """End the handlers running now, without waiting for them, and
        return how many there were.  Threads: each connection is shut down
        (SHUT_RDWR: reads see end of file, writes fail), so a handler that
        talks to its client ends; a thread cannot be killed, so one that
        waits on something else finishes on its own (with
        ``daemon_threads`` the process can exit without it); requests
        queued for a thread are closed unhandled.  Processes: SIGTERM, then
        SIGKILL after ``fl_kill_timeout`` seconds.  What this does to a
        connection is not reported to handle_error() as a handler's failure.
        The synchronous server runs its handler in the serving thread: once
        serve_forever() returned there is none to end.  Whatever the
        server, serve_queued() hands no more connections to handlers from
        then on: it closes them."""
        self._fl_abandon()
        return 0

    def _fl_abandon(self) -> None:
        """end_handlers() of a stop: see _fl_abandoned."""
        self._fl_abandoned = True
        self._fl_interrupt()
        listener = self._fl_filtering()
        if listener is not None:
            listener.wakeup()       # serve_queued() waits no more for the filter

    def _fl_wait_handlers(self, timeout: Optional[float]) -> bool:
        """Wait for running handlers (drain()); True when none is left."""
        return True


class _Counters(_FastLoopParts):
    """What the server reports: counters() and the handlers running."""

    def counters(self) -> Dict[str, Any]:
        """The server's counters: those of :meth:`Listener.counters` for the
        listening socket (accepted, batches, accept errors, queue depth,
        ListenOverflows ...) while the fast loop serves it, and
        ``handlers_running``/``handlers_peak`` (handlers running now / at
        most at once); with ``listen_config.handler_timeout``,
        ``handler_timeouts`` (connections the handler deadline shut down)."""
        listener = self._fl_listener
        out: Dict[str, Any] = listener.counters() if listener is not None else {}
        out["handlers_running"], out["handlers_peak"] = self._fl_handlers()
        door = self._fl_frontdoor()
        if door is not None:
            out.update(door.counters())
        dog = self._fl_watchdog()
        if dog is not None:
            out["handler_timeouts"] = dog.expired
        return out

    def _fl_handlers(self) -> Tuple[int, int]:
        """(running, peak) handlers: the synchronous server runs one at a time."""
        return int(self._fl_in_batch), int(self._fl_handled)


class _FastLoop(_Binding, _FrontDoorHooks, _GracefulStop, _Counters):
    """The serve loop shared by every server and mixin here:
    serve_forever() and shutdown(), the choice of loop
    (_fl_choose_loop) and the loops themselves; the listening socket, the
    front door, the graceful stop and the counters are its bases' jobs.

    It keeps its state in the stdlib BaseServer's own private attributes
    (``__shutdown_request``, ``__is_shut_down``), set by its ``__init__``, so
    that it works over any stdlib server class, whoever's ``__init__`` ran.
    Its bases come after it in every MRO (see ``__init_subclass__``): they
    define neither serve_forever nor shutdown.
    """

    #: Connections taken from the core per wake-up (the GIL is taken once per
    #: batch).  The connections of a batch wait, open, for their turn: a batch
    #: is therefore cut to a quarter (HEADROOM_SHARE) of the descriptors the
    #: process may still open when serve_forever() starts, so that handlers
    #: keep the rest, and with ThreadingMixIn's fl_max_threads to the room in
    #: its queue.
    fl_accept_batch_size = DEFAULT_BATCH
    _fl_waker: Any = None       # the running loop's wake-up source, if any
    #: Which loop serve_forever runs now, a Loop's value: "batches" (the
    #: serving thread takes batches from the core), "leader" (worker threads
    #: accept: ThreadingMixIn's leader/follower), "selector" (the stdlib's
    #: loop); None when not serving (and under a base class's own loop).
    _fl_loop: Optional[str] = None
    _fl_defer = False           # a base class below brings its own loop: use it
    _fl_listener: Optional[Listener] = None    # over self.socket, for the server's life
    #: The accept filter set on _fl_listener (None: none); its ``proxy``: the
    #: PROXY header is complete in the kernel when a connection is handed over.
    _fl_filter: Optional[ReadySettings] = None
    _fl_in_batch = False        # the serving thread is handling connections
    _fl_handled = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # class S(fastlisten.ThreadingMixIn, SomeServer): if SomeServer (or
        # any class after this one in the MRO, short of the stdlib's
        # BaseServer) has its own serve_forever or shutdown, keep its pair.
        below = cls.__mro__[cls.__mro__.index(_FastLoop) + 1:]
        cls._fl_defer = any(
            name in vars(klass) for klass in below if klass is not _std.BaseServer
            for name in ("serve_forever", "shutdown"))
        # The stdlib's backlog of 5 overflows under a few dozen clients: use the
        # kernel's somaxconn, unless some class between here and the stdlib's
        # TCPServer chose its own value.
        for klass in cls.__mro__:
            if "request_queue_size" in vars(klass):
                if klass is _std.TCPServer:
                    cls.request_queue_size = default_backlog()
                break

    def serve_forever(self, poll_interval: Optional[float] = 0.5) -> None:
        """Handle requests until shutdown() is called.

        poll_interval is how often service_actions() runs while idle;
        shutdown() does not wait for it.
        """
        if self._fl_defer:     # Loop.BASE (shutdown() asks the same, without choosing)
            self._fl_refuse_ready_rule(self._fl_current_config(), "its class brings its "
                                       "own serve_forever()")
            return super().serve_forever(poll_interval)
        self._fl_abandoned = self._fl_graceful = False
        _shut_down_event(self).clear()
        try:
            self._fl_check_old_tls()    # (here: a warning raised as an error ends the loop cleanly)
            self._fl_watchdog()         # (_fl_handle_inline reads _fl_dog)
            choice = self._fl_choose_loop()
            if choice.loop is Loop.SELECTOR:
                self._fl_refuse_ready_rule(self._fl_current_config(), choice.why)
            if choice.loop is Loop.SELECTOR or not self._fl_serve_fast(choice, poll_interval):
                # (the fast loops return False on an error the stdlib's loop
                # would ignore: it takes over and keeps the stdlib's behaviour)
                self._fl_serve_selector(poll_interval)
        finally:
            _ask_stop(self, False)
            _shut_down_event(self).set()

    def shutdown(self) -> None:
        """Stop the serve_forever loop and wait until it has returned.

        The loop wakes at once, whatever its poll_interval.  Called from the
        thread that runs serve_forever, this deadlocks (as in the stdlib).
        Handlers already running go on: drain() waits for them.
        """
        if self._fl_defer:     # Loop.BASE: the base class's pair
            return super().shutdown()
        _ask_stop(self, True)
        self._fl_wake()
        self._fl_interrupt()
        _shut_down_event(self).wait()

    # -- internals -----------------------------------------------------

    def _fl_filtering(self) -> Optional[Listener]:
        """The server's Listener while it holds an accept filter over the
        open ``self.socket`` (serve_queued() then accepts through it), else
        None."""
        listener, sock = self._fl_listener, getattr(self, "socket", None)
        if (listener is None or self._fl_filter is None or listener.closed or sock is None
                or listener.fileno() != sock.fileno()):
            return None
        return listener

    def _fl_interrupt(self) -> None:
        """Called by shutdown(): cut short anything the loop may wait on."""

    def _fl_wake(self) -> None:
        """Wake the running serving loop, if any: it checks for shutdown()
        and runs service_actions() at once."""
        with _wake_lock:
            if self._fl_waker is not None:
                self._fl_waker.wakeup()

    def _fl_publish(self, waker: Any, loop: Loop) -> None:
        with _wake_lock:
            self._fl_waker, self._fl_loop = waker, loop.value

    def _fl_unpublish(self) -> None:
        with _wake_lock:
            self._fl_waker = self._fl_loop = None

    def _fl_can_batch(self) -> bool:
        """True when taking connections from the core changes nothing a
        subclass could observe: a plain listening stream socket and the
        stock get_request/_handle_request_noblock/fileno."""
        cls, own = type(self), vars(self)
        sock = getattr(self, "socket", None)
        return (
            type(sock) is socket.socket   # an SSLSocket's accept() does more
            and sock.type == socket.SOCK_STREAM
            and sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
            and sock.fileno() >= 0
            and _stock(cls, "get_request", _std.TCPServer)
            and _stock(cls, "fileno", _std.TCPServer)
            and _stock(cls, "_handle_request_noblock", _std.BaseServer)
            and not {"get_request", "fileno", "_handle_request_noblock"} & own.keys()
        )

    def _fl_choose_loop(self) -> LoopChoice:
        """Which loop serve_forever() runs and what it calls per connection,
        from the hooks the server's class (or instance) overrides; checked
        each time serve_forever() starts.  The first row that applies:

        ==================================  ========  ======================  ======================
        server, hooks overridden            loop      per connection          why
        ==================================  ========  ======================  ======================
        a class after _FastLoop in the MRO  BASE      the base's own          its serve_forever()
        (short of the stdlib's                                                and shutdown() go
        BaseServer) defines serve_forever                                     together
        or shutdown (``_fl_defer``)
        not a plain listening stream        SELECTOR  _handle_request_        only the stdlib's
        socket (UDP, an SSLSocket, closed),           noblock (the stdlib's)  get_request() does
        or get_request, fileno or                                             what those ask
        _handle_request_noblock overridden
        ThreadingMixIn with epoll, stock    LEADER    _fl_handle_inline, in   nothing runs in the
        verify_request, process_request,              the worker thread that  serving thread: idle
        service_actions (or fl_periodic),             accepted it             workers accept; the
        finish_request without PROXY/TLS,                                     hooks' chain in one
        shutdown_request, close_request,                                      call
        process_request_thread
        the same, but finish_request,       LEADER    process_request_thread  as above; the
        shutdown_request, close_request               in the worker thread    overridden hooks run
        or process_request_thread                                             as the stdlib runs
        overridden, or PROXY/TLS on                                           them
        every per-connection hook stock,    BATCHES   _fl_handle_inline, in   the five hook calls
        finish_request without PROXY/TLS              the serving thread      in one
        (TCPServer, UnixStreamServer)
        any other stream server             BATCHES   _fl_handle_accepted:    the hooks as the
        (ThreadingMixIn: the pool;                    verify_request ->       stdlib calls them
        ForkingMixIn: fork)                           process_request ...
        ==================================  ========  ======================  ======================

        BATCHES and LEADER take connections from the server's Listener,
        prepared in _fl_get_listener() with the accept filter
        (``listen_config.server_ready()``): both see only ready connections
        (LEADER's waiters through the filter too); with the PROXY header
        waited for there, BATCHES' _fl_handle_accepted reads it before
        verify_request, and LEADER's thread in finish_request (its
        verify_request is stock).  BASE and SELECTOR have no filter: an
        explicit ``ready_rule`` is a ValueError there
        (_fl_refuse_ready_rule), while the PROXY/TLS defaults fall back to
        the handler's thread.
        """
        if self._fl_defer:
            return LoopChoice(Loop.BASE, None, "a base class's own serve_forever/shutdown")
        if not self._fl_can_batch():
            return LoopChoice(Loop.SELECTOR, None, "not a plain stream socket, or "
                              "get_request/fileno/_handle_request_noblock overridden")
        if isinstance(self, ThreadingMixIn) and self._fl_can_lead():
            if (self._fl_plain_finish()
                    and self._fl_stock(("shutdown_request", "close_request"))
                    and self._fl_stock(("process_request_thread",), _std.ThreadingMixIn)):
                return LoopChoice(Loop.LEADER, self._fl_handle_inline,
                                  "leader/follower, stock hooks inline")
            return LoopChoice(Loop.LEADER, self.process_request_thread,
                              "leader/follower, the thread's hooks as the stdlib's")
        if self._fl_stock_hooks():
            return LoopChoice(Loop.BATCHES, self._fl_handle_inline,
                              "batches, stock hooks inline")
        return LoopChoice(Loop.BATCHES, self._fl_handle_accepted,
                          "batches, the hooks as the stdlib calls them")

    def _fl_get_listener(self, sock: socket.socket) -> Listener:
        """The server's Listener over ``sock`` (kept for the server's life,
        so that its counters span serve_forever() calls): the one place
        where the listener of a loop that accepts in the core (Loop.BATCHES,
        Loop.LEADER, and fastlisten.Workers' loop in each worker process)
        is prepared.  The accept filter is applied here
        (``listen_config.server_ready()``: ``ready_rule``, or by default the
        PROXY header and the TLS ClientHello), and again whenever
        listen_config asks for another one."""
        listener = self._fl_listener
        if listener is None or listener.closed or listener.fileno() != sock.fileno():
            if listener is not None:
                listener.close()
            listener = Listener(sock.family, fileno=sock.fileno(), proto=sock.proto,
                                owned=False)
            listener.config = self._fl_config
            self._fl_listener = listener
            self._fl_filter = None
        else:
            os.set_blocking(sock.fileno(), False)   # the core relies on EAGAIN
        config = self._fl_current_config()
        ready = config.server_ready() if config is not None else None
        if ready != self._fl_filter:
            if ready is None:
                listener.set_accept_filter("none")      # off: every connection at once
            else:
                listener.set_accept_filter(ready.rule, ready.timeout, ready.max_bytes,
                                           ready.max_waiting, ready.proxy, ready.proxy_max_v2,
                                           ready.min_rate)
            self._fl_filter = ready
        return listener

    def _fl_serve_fast(self, choice: LoopChoice, poll_interval: Optional[float]) -> bool:
        """Run the loop ``choice`` names (Loop.BATCHES or Loop.LEADER) over
        the server's Listener.  Returns False on an error the stdlib's loop
        would ignore: the caller then runs the selector loop."""
        run = choice.per_connection
        assert run is not None
        sock = self.socket
        # The listener both loops accept from (where the accept filter is to
        # be set up: see _fl_get_listener).  The core makes the descriptor
        # non-blocking; the socket object is told again what it is set to
        # when the loop ends.
        listener = self._fl_get_listener(sock)
        # As selectors do: a negative timeout means "do not wait".
        timeout = None if poll_interval is None else max(float(poll_interval), 0.0)
        # What the loop leaves for the very end, once the socket's mode is
        # restored (ThreadingMixIn wakes its idle workers there, when
        # nothing is left that could make this thread wait for the GIL
        # while they leave).
        last: List[Callable[[], None]] = []
        try:
            if choice.loop is Loop.LEADER:
                return self._fl_serve_leader(listener, timeout, run, last)
            return self._fl_serve_accepted(listener, timeout, run)
        finally:
            try:
                # shutdown() stays immediate: a connection still waiting in
                # the accept filter is closed now (counted 'shutdown'), not
                # left to wait for a loop that may never run again; a
                # graceful stop leaves it to serve_queued(), which serves
                # it if it becomes ready within the grace
                if self._fl_filter is not None and not self._fl_graceful:
                    listener.close_waiting()
                if sock.fileno() >= 0:
                    try:
                        sock.settimeout(sock.gettimeout())
                    except OSError:
                        pass
            finally:
                for step in last:
                    step()

    def _fl_serve_accepted(self, listener: Listener, timeout: Optional[float],
                           handle_one: PerConnection) -> bool:
        """Loop.BATCHES: the serving thread takes batches from the core and
        runs ``handle_one`` for each connection."""
        limit = self._fl_batch_limit()
        self._fl_publish(listener, Loop.BATCHES)
        try:
            while not self._BaseServer__shutdown_request:  # (_stop_asked, inline)
                take = self._fl_take(limit)
                if take == 0:
                    continue            # shutdown() ended the wait for room
                try:
                    batch = listener.accept_many(take, timeout)
                except OSError:
                    return False
                if batch:
                    self._fl_handle_batch(batch, handle_one)
                self.service_actions()
        finally:
            self._fl_unpublish()
        return True

    def _fl_batch_limit(self) -> int:
        """fl_accept_batch_size, cut to a share of the descriptor headroom."""
        size = self.fl_accept_batch_size
        free = sysinfo.descriptor_headroom()
        if free is not None:
            size = min(size, max(1, free // HEADROOM_SHARE))
        return size

    def _fl_take(self, limit: int) -> int:
        """How many connections the loop may take now (at most ``limit``);
        0 when shutdown() ended a wait for room."""
        return limit

    def _fl_serve_leader(self, listener: Listener, timeout: Optional[float],
                         run: PerConnection, last: List[Callable[[], None]]) -> bool:
        raise NotImplementedError   # Loop.LEADER: ThreadingMixIn's

    def _fl_handle_batch(self, batch: List[Tuple[socket.socket, Any]],
                         handle_one: Callable[[socket.socket, Any], None]) -> None:
        self._fl_in_batch = self._fl_handled = True
        try:
            for i, (request, client_address) in enumerate(batch):
                if self._BaseServer__shutdown_request:  # (_stop_asked, inline)
                    # Not handed to the server yet: kept for serve_queued(),
                    # closed unprocessed by server_close() (docs/guide/dropin.md lists
                    # this difference).
                    for rest, address in batch[i:]:
                        self._fl_keep(rest, address, False)
                    return
                try:
                    handle_one(request, client_address)
                except BaseException:
                    for rest, _ in batch[i + 1:]:
                        rest.close()
                    raise
        finally:
            self._fl_in_batch = False

    def _fl_stock_hooks(self) -> bool:
        """True when every per-connection hook is stock (on the class and
        not replaced on the instance) and finish_request has no front door
        work, so that _fl_handle_inline may stand in for the chain of them.
        Checked when serve_forever starts."""
        return self._fl_plain_finish() and self._fl_stock(
            ("verify_request", "process_request", "shutdown_request", "close_request"))

    def _fl_plain_finish(self) -> bool:
        """True when finish_request is fastlisten's own and has no PROXY
        header or TLS handshake to do first (it only builds the handler)."""
        return (getattr(type(self), "finish_request", None) is _FastLoop.finish_request
                and "finish_request" not in vars(self)
                and self._fl_frontdoor() is None)

    def _fl_stock(self, names: Tuple[str, ...], owner: type = _std.TCPServer) -> bool:
        """True when each hook in ``names`` is ``owner``'s own, on the class
        and not replaced on the instance."""
        cls, own = type(self), vars(self)
        return all(_stock(cls, name, owner) and name not in own for name in names)

    def _fl_handle_inline(self, request: socket.socket, client_address: Any) -> None:
        """What the stock hooks do for one connection, without the five
        Python calls of verify_request -> process_request -> finish_request
        -> shutdown_request -> close_request: the handler, handle_error for
        an Exception, then SHUT_WR and close (also when handle_error or the
        handler raises something else)."""
        dog = self._fl_dog
        try:
            try:
                if dog is None:
                    self.RequestHandlerClass(request, client_address, self)
                else:
                    entry = dog.arm(request)
                    try:
                        self.RequestHandlerClass(request, client_address, self)
                    finally:
                        dog.disarm(entry)   # before the close below
            except Exception:
                self.handle_error(request, client_address)
        finally:
            try:
                # SHUT_WR first: the peer sees EOF now, even while a
                # makefile() object still holds the socket open
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone already (ENOTCONN)
            if _INLINE_CLOSE:
                # socket.socket.close() without its two Python frames
                request._closed = True  # type: ignore[attr-defined]
                if request._io_refs <= 0:  # type: ignore[attr-defined]
                    _socket_close(request)
            else:
                request.close()

    def _fl_handle_accepted(self, request: socket.socket, client_address: Any) -> None:
        """The stdlib's _handle_request_noblock, after its get_request();
        first the PROXY header, when the accept filter waited for it."""
        client_address = self._fl_front(request, client_address)
        if client_address is None:
            self.shutdown_request(request)
            return
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                # (KeyboardInterrupt & co.) unless process_request handed
                # the request on already: then its new owner closes it
                if not self._fl_handed_on(request):
                    self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def _fl_handed_on(self, request: socket.socket) -> bool:
        """True if process_request gave ``request`` to someone else (a worker
        thread) who will close it; the serving thread must not."""
        return False

    def _fl_serve_selector(self, poll_interval: Optional[float]) -> None:
        """The stdlib's loop, plus a wake-up descriptor for shutdown()."""
        waker = Waker()
        self._fl_publish(waker, Loop.SELECTOR)
        try:
            with selectors.PollSelector() as selector:
                if self.fileno() >= 0:
                    selector.register(self, selectors.EVENT_READ)
                selector.register(waker, selectors.EVENT_READ)
                while not _stop_asked(self):
                    ready = selector.select(poll_interval)
                    if _stop_asked(self):
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._fl_unpublish()
            waker.close()


class BaseServer(_FastLoop, _std.BaseServer):
    """Base class for server classes; socketserver.BaseServer with
    fastlisten's serve_forever() and immediate shutdown().

    Methods for the caller: __init__(server_address, RequestHandlerClass),
    serve_forever(poll_interval=0.5), shutdown(), handle_request(),
    service_actions(), server_close(), fileno().

    Methods that may be overridden: server_bind(), server_activate(),
    get_request(), handle_timeout(), verify_request(), process_request(),
    finish_request(), shutdown_request(), close_request(), service_actions(),
    handle_error().
    """


class TCPServer(BaseServer, _std.TCPServer):
    """socketserver.TCPServer served by fastlisten's core.

    ``self.socket`` is an ordinary socket.socket, created before
    server_bind(); request_queue_size defaults to the kernel's somaxconn.
    A failing bind raises the same OSError, errno intact, with a message
    that explains it (who holds the port, which addresses exist, ...).
    ``listen_config`` adds fastlisten's listener options; drain(),
    end_handlers() and counters() are fastlisten's additions.
    """


class UDPServer(TCPServer, _std.UDPServer):
    """socketserver.UDPServer with an immediate shutdown()."""


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer, _std.UnixStreamServer):
        """socketserver.UnixStreamServer served by fastlisten's core."""

    class UnixDatagramServer(UDPServer, _std.UnixDatagramServer):
        """socketserver.UnixDatagramServer with an immediate shutdown()."""


def _ender(server: _FastLoopParts) -> Callable[[Any], None]:
    """The handler deadline's on_expire for ``server`` (held weakly): the
    connection it shut down is one the server ended (see handle_error)."""
    ref = weakref.ref(server)

    def ended(sock: Any) -> None:
        server = ref()
        if server is not None:
            if not isinstance(server._fl_ended, weakref.WeakSet):
                server._fl_ended = weakref.WeakSet()
            server._fl_ended.add(sock)
    return ended


def _wait_for_children(pids: Any, timeout: Optional[float], wake_fd: int = -1) -> None:
    """Wait up to ``timeout`` seconds (None: for ever) until one of ``pids``
    exits or ``wake_fd`` is readable; without reaping.  Uses pidfds where the
    kernel has them (Linux 5.3+), else waits in short steps."""
    fds: List[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                return              # exited and reaped meanwhile: look again
            except (AttributeError, OSError):
                fds = []
                break
        if not fds:     # no pidfds: look again soon
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        if wake_fd >= 0:
            fds.append(wake_fd)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
    finally:
        for fd in fds:
            if fd != wake_fd:
                os.close(fd)


class _BusyThreads(list):
    """A snapshot of the threads handling a request now, which is what the
    stdlib's ``_threads`` lists.  Its join() does nothing: server_close()
    waits for the pool itself."""

    def join(self) -> None:
        pass


class _LeaderSource:
    """What ThreadingMixIn's worker threads serve under leader/follower
    (a ``fastlisten._threadpool.Source``): each waits in the core on its own
    waiter over the listener and ``stop`` (a core Stop: once set, no
    waiter touches the listening descriptor), and runs
    ``run(request, client_address)`` for what it accepted."""

    def __init__(self, listener: Listener, stop: Any,
                 run: Callable[[socket.socket, Any], None]) -> None:
        self.listener = listener
        self.stop = stop
        self.run = run
        #: The first error open() or accept() raised, if any.
        self.error: Optional[BaseException] = None

    def open(self, timeout: float) -> Tuple[Callable[[], List[Tuple[socket.socket, Any]]],
                                            Callable[[], None]]:
        waiter = self.listener.waiter(self.stop)
        return self.listener.accept_one_with(waiter, timeout), waiter.close

    def empty(self) -> None:
        self.listener.check_capacity()

    def interrupt(self) -> None:
        self.stop.set()

    def failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()         # the serving thread (and the other workers) stop


class ThreadingMixIn(_FastLoop, _std.ThreadingMixIn):
    """Mix-in class to handle each request in a thread, reusing threads.

    A new thread starts only when every existing one is busy; a thread idle
    for ``fl_thread_idle_timeout`` seconds exits.  ``daemon_threads`` and
    ``block_on_close`` mean what they mean in the stdlib.  Set
    ``fl_max_threads`` to cap the threads: requests beyond it wait in a FIFO
    queue of up to ``fl_max_queued`` requests (default: fl_max_threads); while
    that is full, the loop stops accepting and the kernel's backlog holds
    new connections.  So the server holds at most ``fl_max_threads +
    fl_max_queued`` connections open: the loop takes no more at a time than
    there is room for.

    Leader/follower: when the hooks that the stdlib calls in the serving
    thread are stock (``verify_request``, ``process_request``,
    ``service_actions``) on a listening stream socket that the core can
    serve, the serving thread accepts nothing: idle worker threads wait for
    connections in the core themselves, the kernel gives each connection to
    one of them, and that thread runs ``process_request_thread`` (or, with
    the stock ``finish_request``/``shutdown_request``/``close_request``,
    the same steps inline) at once.  One thread always waits (up to
    ``fl_max_threads``); connections beyond ``fl_max_threads`` stay in the
    kernel's backlog (``fl_max_queued`` plays no part: no request waits in
    the process, and the server holds at most ``fl_max_threads`` connections,
    one per running handler).  The serving thread keeps ``shutdown()``,
    ``service_actions()`` and Ctrl-C; ``shutdown()`` makes every waiting
    worker leave the core at once, and serve_forever() returns as soon as
    none of them can accept any more, without waiting for them to be
    scheduled: they leave on their own.
    """

    #: Seconds an idle thread waits for another request before it exits.
    fl_thread_idle_timeout = 5.0
    #: None: unbounded, as in the stdlib.
    fl_max_threads: Optional[int] = None
    #: Requests that may wait for a thread when fl_max_threads is reached.
    fl_max_queued: Optional[int] = None

    _fl_pool: Optional[LeaderPool] = None
    _fl_stop: Any = None        # the running leader loop's workers' Stop

    @property
    def _threads(self) -> Any:
        """The threads handling a request now, as the stdlib's ``_threads``
        lists them (idle pool threads are not in it)."""
        pool = self._fl_pool
        return _BusyThreads(pool.busy_threads() if pool is not None else ())

    def _fl_get_pool(self) -> LeaderPool:
        pool = self._fl_pool
        if pool is None:
            pool = self._fl_pool = LeaderPool(
                name=f"{type(self).__name__}-pool", daemon=self.daemon_threads,
                idle_timeout=self.fl_thread_idle_timeout, max_threads=self.fl_max_threads,
                max_queued=self.fl_max_queued)
        return pool

    def _fl_take(self, limit: int) -> int:
        """With fl_max_threads: no more than the pool takes without waiting
        (waiting, until shutdown(), while that is none)."""
        if self.fl_max_threads is None:
            return limit
        room = self._fl_get_pool().wait_for_room(self._fl_shutdown_requested)
        return room if 0 <= room < limit else limit

    def process_request(self, request: Any, client_address: Any) -> None:
        """Run process_request_thread(request, client_address) on a pool thread."""
        pool = self._fl_get_pool()
        pool.daemon = self.daemon_threads
        if not pool.submit(self.process_request_thread, request, client_address,
                           cancelled=self._fl_shutdown_requested):
            if pool.closed or self._fl_abandoned:
                self.shutdown_request(request)
            else:
                self._fl_keep(request, client_address, True)    # for serve_queued()

    def _fl_can_lead(self) -> bool:
        """Leader/follower applies (see _FastLoop._fl_choose_loop) when the
        hooks the stdlib runs in the serving thread are stock (else a
        worker would run them).  A service_actions set on the instance with
        a true ``fl_periodic`` attribute (fastlisten.Workers' heartbeat)
        counts as stock: it asks to run every poll_interval, not after each
        request, and the serving thread runs it so."""
        if not hasattr(select, "epoll"):
            return False
        cls = type(self)
        own_actions = vars(self).get("service_actions")
        return (_stock(cls, "service_actions", _std.BaseServer)
                and (own_actions is None or getattr(own_actions, "fl_periodic", False))
                and self._fl_stock(("verify_request",), _std.BaseServer)
                and getattr(cls, "process_request", None) is ThreadingMixIn.process_request
                and "process_request" not in vars(self))

    def _fl_serve_leader(self, listener: Listener, timeout: Optional[float],
                         run: PerConnection, last: List[Callable[[], None]]) -> bool:
        """serve_forever's loop under leader/follower (Loop.LEADER): the workers accept;
        this thread waits for shutdown() (or a worker's accept error, which
        returns False: the selector loop takes over), running
        service_actions() every ``timeout`` seconds.  The idle workers are
        woken by the steps it adds to ``last``, once the caller is done
        with the listening socket."""
        pool = self._fl_get_pool()
        pool.daemon = self.daemon_threads
        stop = listener.new_stop()     # the workers' (a worker's error and pool.close() set it)
        try:
            waker = Waker()     # shutdown()'s
        except BaseException:
            stop.close()
            raise

        def wake_workers() -> None:
            try:
                stop.set()
            finally:
                stop.close()
        last.append(wake_workers)
        source = _LeaderSource(listener, stop, run)
        self._fl_stop = stop
        self._fl_publish(waker, Loop.LEADER)
        accepted = listener.stats()["accepted"]
        try:
            pool.lead(source)
            poller = select.poll()
            poller.register(waker.fileno(), select.POLLIN)
            poller.register(stop.fileno(), select.POLLIN)
            ms = None if timeout is None else int(timeout * 1000 + 0.999)
            # (a signal just before poll() begins ends it too: Ctrl-C is not
            # left waiting for poll_interval)
            with SignalWakeup() as signals:
                if signals.fd >= 0:
                    poller.register(signals.fd, select.POLLIN)
                while True:
                    if (_stop_asked(self) or source.error is not None
                            or pool.closed or stop.fenced):
                        break
                    if poller.poll(ms):
                        signals.drain()
                    if (_stop_asked(self) or source.error is not None
                            or pool.closed or stop.fenced):
                        break
                    self.service_actions()
        finally:
            # Once fence() returns, no worker touches the listening
            # descriptor any more (it waits only for a worker in the middle
            # of accept4, never for a thread to be scheduled or to take the
            # GIL): the caller may make it blocking, close it or serve it
            # again.  A connection a worker accepted before that is waited
            # for until the worker has it in hand (drain() sees it); the
            # workers are woken last (``last``) and leave the core on their
            # own, without being waited for; the stop's descriptor closes
            # with the last one's waiter.
            stop.fence()
            pool.stop_leading(listener.stats()["accepted"] - accepted,
                              lambda: source.error is not None)
            self._fl_unpublish()
            self._fl_stop = None
            waker.close()
        # A worker's accept error, or a pool closed under a running loop (at
        # interpreter exit): the selector loop goes on, as the stdlib's would.
        return source.error is None and not pool.closed

    def _fl_handed_on(self, request: socket.socket) -> bool:
        pool = self._fl_pool
        return pool is not None and pool.holds(request)

    def _fl_shutdown_requested(self) -> bool:
        return _stop_asked(self) or self._fl_abandoned

    def _fl_interrupt(self) -> None:
        if self._fl_pool is not None:
            self._fl_pool.interrupt()

    def _fl_handlers(self) -> Tuple[int, int]:
        pool = self._fl_pool
        return (pool.busy, pool.peak) if pool is not None else (0, 0)

    def _fl_wait_handlers(self, timeout: Optional[float]) -> bool:
        pool = self._fl_pool
        return pool is None or pool.wait_idle(timeout)

    def end_handlers(self) -> int:
        """End the running handlers' connections; close queued requests
        (see BaseServer.end_handlers)."""
        self._fl_abandon()
        pool = self._fl_pool
        if pool is None:
            return 0
        queued = pool.cancel_queued()
        for request, _ in queued:
            self.shutdown_request(request)
        pool.stop_waiting()     # a drain() waiting for them is done
        running = pool.running()
        if running and not self._fl_ended:
            # weak: a connection is forgotten once its handler is done with it
            self._fl_ended = weakref.WeakSet()
        for request, _ in running:
            self._fl_ended.add(request)
            request = self._fl_swapped.get(request, request)     # its SSLSocket
            self._fl_ended.add(request)
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass    # closed meanwhile: that handler is done
        return len(running) + len(queued)

    def server_close(self) -> None:
        """Close the server; with block_on_close (and non-daemon threads),
        wait until every request being handled is done."""
        stop = self._fl_stop
        if stop is not None:
            # closed under a running leader loop: keep its workers off the
            # descriptor before it is closed (and its number reused)
            stop.fence()
        pool, self._fl_pool = self._fl_pool, None
        try:
            # The stdlib ThreadingMixIn's server_close then joins an empty _threads.
            super().server_close()
        finally:
            if pool is not None:
                pool.close()
                if self.block_on_close and not pool.daemon:
                    pool.join()


if hasattr(os, "fork"):

    class ForkingMixIn(_FastLoop, _std.ForkingMixIn):
        """Mix-in class to handle each request in a new process: the
        stdlib's ForkingMixIn (children reaped by pid, max_children,
        block_on_close) over fastlisten's loop."""

        #: One connection per wake-up: a child forked in the middle of a
        #: batch would inherit (and hold open) the rest of it.
        fl_accept_batch_size = 1
        #: Seconds end_handlers() gives children after SIGTERM before SIGKILL.
        fl_kill_timeout = 5.0

        _fl_forking = True

        _fl_peak = 0
        _fl_room: Optional[Waker] = None    # shutdown() cuts a wait for room short

        def process_request(self, request: Any, client_address: Any) -> None:
            """Fork a new subprocess to process the request."""
            # The stdlib waits for a child to exit (uninterruptibly) when
            # max_children run; wait here instead, for a child or shutdown().
            if not self._fl_wait_for_room():
                if self._fl_abandoned:
                    self.shutdown_request(request)
                else:
                    self._fl_keep(request, client_address, True)    # for serve_queued()
                return
            self._fl_frontdoor()    # its report pipe exists before the fork
            self._fl_watchdog()     # (and the deadline's)
            super().process_request(request, client_address)
            if self.active_children and len(self.active_children) > self._fl_peak:
                self._fl_peak = len(self.active_children)

        def _fl_wait_for_room(self) -> bool:
            """Reap children until fewer than max_children run; False if
            shutdown() was asked meanwhile."""
            children = self.active_children
            if children is None or len(children) < self.max_children:
                return True
            room = self._fl_room
            if room is None:
                room = self._fl_room = Waker()
            while True:
                self._fl_reap()
                if len(children) < self.max_children:
                    return True
                if _stop_asked(self) or self._fl_abandoned:
                    return False
                _wait_for_children(children, None, room.fileno())
                room.drain()

        def collect_children(self, *, blocking: bool = False) -> None:
            """Reap the children that have exited; with ``blocking``, wait
            for every child (as server_close does with block_on_close).

            Unlike the stdlib's, a non-blocking call never waits when
            max_children run: process_request waits for room instead, and
            that wait ends on shutdown()."""
            if blocking:
                super().collect_children(blocking=True)
            else:
                self._fl_reap()
            if self._fl_door is not None:
                self._fl_door.collect()     # what children reported
            if self._fl_dog is not None:
                self._fl_dog.collect()

        def _fl_interrupt(self) -> None:
            if self._fl_room is not None:
                self._fl_room.wakeup()

        def _fl_reap(self) -> None:
            """Collect exited children without blocking."""
            children = self.active_children or set()
            for pid in list(children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid      # reaped by someone else
                if done:
                    children.discard(pid)

        def _fl_handlers(self) -> Tuple[int, int]:
            return len(self.active_children or ()), self._fl_peak

        def _fl_wait_handlers(self, timeout: Optional[float]) -> bool:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                self._fl_reap()
                if not self.active_children:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                _wait_for_children(self.active_children, left)

        def end_handlers(self) -> int:
            """SIGTERM the children, SIGKILL those left after fl_kill_timeout
            seconds, reap them all; returns how many there were."""
            self._fl_abandon()
            self._fl_reap()
            children = list(self.active_children or ())
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.active_children or ():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                if self._fl_wait_handlers(self.fl_kill_timeout if sig == signal.SIGTERM else None):
                    break
            return len(children)

        def server_close(self) -> None:
            """Close the server; see the stdlib's ForkingMixIn.server_close."""
            try:
                super().server_close()
            finally:
                room, self._fl_room = self._fl_room, None
                if room is not None:
                    room.close()

    class ForkingUDPServer(ForkingMixIn, UDPServer, _std.ForkingUDPServer):
        """UDPServer with ForkingMixIn."""

    class ForkingTCPServer(ForkingMixIn, TCPServer, _std.ForkingTCPServer):
        """TCPServer with ForkingMixIn."""


class ThreadingUDPServer(ThreadingMixIn, UDPServer, _std.ThreadingUDPServer):
    """UDPServer with ThreadingMixIn."""


class ThreadingTCPServer(ThreadingMixIn, TCPServer, _std.ThreadingTCPServer):
    """TCPServer with ThreadingMixIn."""


if hasattr(socket, "AF_UNIX"):

    class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer,
                                    _std.ThreadingUnixStreamServer):
        """UnixStreamServer with ThreadingMixIn."""

    class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer,
                                      _std.ThreadingUnixDatagramServer):
        """UnixDatagramServer with ThreadingMixIn."""

    if hasattr(os, "fork") and "ForkingUnixStreamServer" in _std.__all__:

        # (the stdlib's since 3.12: the type checker, set to 3.10, does not know them)
        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer,
                                      _std.ForkingUnixStreamServer):  # type: ignore[name-defined]
            """UnixStreamServer with ForkingMixIn."""

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer,
                                        _std.ForkingUnixDatagramServer):  # type: ignore[name-defined]
            """UnixDatagramServer with ForkingMixIn."""


#: The names of the running Python's socketserver.__all__.
__all__ = list(_std.__all__)


#: What the running Python's socketserver answers through its module
#: ``__getattr__`` with a DeprecationWarning: name -> (value, message).
#: 3.15 deprecates ``__version__`` ("0.4" since 2.x) for removal in 3.20;
#: before 3.15 it is a plain attribute, forwarded as it is.
_DEPRECATED: Dict[str, Tuple[Any, str]] = {}
if "__version__" not in vars(_std):
    _DEPRECATED["__version__"] = (
        "0.4", "'__version__' is deprecated and slated for removal in Python 3.20")


def _stdlib_attribute(name: str, stacklevel: int = 2) -> Any:
    """The stdlib socketserver's module attribute ``name`` as reading it
    there gives it: its private helpers, ``__version__`` (with the same
    DeprecationWarning where the running Python deprecates it, attributed
    to the frame ``stacklevel`` levels up from the caller), else an
    AttributeError.  Backs this module's and the package's ``__getattr__``."""
    if name in _DEPRECATED:
        value, message = _DEPRECATED[name]
        warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)
        return value
    # Other dunder names (__path__, __file__...) are this module's own business.
    if name.startswith("__") and name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return vars(_std)[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __getattr__(name: str) -> Any:
    # The stdlib module's other names (its private helpers, __version__),
    # for code that reaches for them.
    return _stdlib_attribute(name, stacklevel=2)
