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
- ``ThreadingMixIn`` reuses threads (``fastlisten._workers``).
- ``request_queue_size`` is the kernel's somaxconn, not 5.

The loop lives in the mixins as well as in the servers, so
``class S(fastlisten.ThreadingMixIn, http.server.HTTPServer)`` is fast too.
The request handlers are the standard library's own classes.
"""

from __future__ import annotations

import os
import selectors
import socket
import socketserver as _std
import threading
from typing import Any, Callable, List, Optional, Tuple

from fastlisten.errors import explain_bind_error
from fastlisten._workers import WorkerPool
from fastlisten.listener import Listener, default_backlog, resolve

# The request handlers behave the same: they are the stdlib's classes.
BaseRequestHandler = _std.BaseRequestHandler
StreamRequestHandler = _std.StreamRequestHandler
DatagramRequestHandler = _std.DatagramRequestHandler

#: Guards publishing, waking and closing a serving loop's wake-up source, so
#: that shutdown() never writes to a descriptor closed (and maybe reused) meanwhile.
_wake_lock = threading.Lock()


class _PipeWaker:
    """A wake-up pipe for the loop that waits with a selector."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def wakeup(self) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # a wake-up is pending already: just as good

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


#: socket.socket.close() is "_closed = True, then the real close unless a
#: makefile() object still uses the socket" (3.9 to 3.13); the inline path
#: does the same without two Python calls, where the class still looks so.
_socket_close = socket.socket.__mro__[1].close
_INLINE_CLOSE = {"_io_refs", "_closed"} <= set(getattr(socket.socket, "__slots__", ()))


def _stock(cls: type, name: str, stdlib_owner: type) -> bool:
    """True if cls uses stdlib_owner's own implementation of method name."""
    return getattr(cls, name, None) is getattr(stdlib_owner, name)


class _FastLoop:
    """The serve loop and shutdown shared by every server and mixin here.

    It keeps its state in the stdlib BaseServer's own private attributes
    (``__shutdown_request``, ``__is_shut_down``), set by its ``__init__``, so
    that it works over any stdlib server class, whoever's ``__init__`` ran.
    """

    #: Connections taken from the core per wake-up (the GIL is taken once per batch).
    accept_batch_size = 64

    _fl_waker: Any = None   # the running loop's wake-up source, if any
    _fl_defer = False       # a base class below brings its own loop: use it

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
        if self._fl_defer:
            return super().serve_forever(poll_interval)  # type: ignore[misc]
        self._BaseServer__is_shut_down.clear()  # type: ignore[attr-defined]
        try:
            if not self._fl_serve_batches(poll_interval):
                self._fl_serve_selector(poll_interval)
        finally:
            self._BaseServer__shutdown_request = False
            self._BaseServer__is_shut_down.set()  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """Stop the serve_forever loop and wait until it has returned.

        The loop wakes at once, whatever its poll_interval.  Called from the
        thread that runs serve_forever, this deadlocks (as in the stdlib).
        """
        if self._fl_defer:
            return super().shutdown()  # type: ignore[misc]
        self._BaseServer__shutdown_request = True
        with _wake_lock:
            if self._fl_waker is not None:
                self._fl_waker.wakeup()
        self._fl_interrupt()
        self._BaseServer__is_shut_down.wait()  # type: ignore[attr-defined]

    # -- internals -----------------------------------------------------

    def _fl_interrupt(self) -> None:
        """Called by shutdown(): cut short anything the loop may wait on."""

    def _fl_publish(self, waker: Any) -> None:
        with _wake_lock:
            self._fl_waker = waker

    def _fl_unpublish(self, waker: Any) -> None:
        with _wake_lock:
            self._fl_waker = None
            waker.close()

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

    def _fl_serve_batches(self, poll_interval: Optional[float]) -> bool:
        """The fast loop.  Returns False if it cannot serve this server (or
        met an error the stdlib's loop would ignore): the caller then runs
        the selector loop, which keeps the stdlib's behaviour."""
        if not self._fl_can_batch():
            return False
        sock = self.socket  # type: ignore[attr-defined]
        # The core adopts the descriptor and makes it non-blocking; the
        # socket object is told again what it is set to when the loop ends.
        listener = Listener(sock.family, fileno=sock.fileno(), proto=sock.proto, owned=False)
        # As selectors do: a negative timeout means "do not wait".
        timeout = None if poll_interval is None else max(float(poll_interval), 0.0)
        handle_one = self._fl_handle_inline if self._fl_stock_hooks() else self._fl_handle_accepted
        self._fl_publish(listener)
        try:
            while not self._BaseServer__shutdown_request:
                try:
                    batch = listener.accept_many(self.accept_batch_size, timeout)
                except OSError:
                    return False
                if batch:
                    self._fl_handle_batch(batch, handle_one)
                self.service_actions()  # type: ignore[attr-defined]
        finally:
            self._fl_unpublish(listener)
            if sock.fileno() >= 0:
                try:
                    sock.settimeout(sock.gettimeout())
                except OSError:
                    pass
        return True

    def _fl_handle_batch(self, batch: List[Tuple[socket.socket, Any]],
                         handle_one: Callable[[socket.socket, Any], None]) -> None:
        for i, (request, client_address) in enumerate(batch):
            if self._BaseServer__shutdown_request:
                # Not handed to the server yet: closed unprocessed (the
                # README lists this difference).
                for rest, _ in batch[i:]:
                    rest.close()
                return
            try:
                handle_one(request, client_address)
            except BaseException:
                for rest, _ in batch[i + 1:]:
                    rest.close()
                raise

    def _fl_stock_hooks(self) -> bool:
        """True when every per-connection hook is the stdlib TCPServer's own
        (on the class and not replaced on the instance), so that
        _fl_handle_inline may stand in for the chain of them.  Checked when
        serve_forever starts."""
        cls, own = type(self), vars(self)
        return all(_stock(cls, name, _std.TCPServer) and name not in own for name in (
            "verify_request", "process_request", "finish_request",
            "shutdown_request", "close_request"))

    def _fl_handle_inline(self, request: socket.socket, client_address: Any) -> None:
        """What the stock hooks do for one connection, without the five
        Python calls of verify_request -> process_request -> finish_request
        -> shutdown_request -> close_request: the handler, handle_error for
        an Exception, then SHUT_WR and close (also when handle_error or the
        handler raises something else)."""
        try:
            try:
                self.RequestHandlerClass(request, client_address, self)  # type: ignore[attr-defined]
            except Exception:
                self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            try:
                # SHUT_WR first: the peer sees EOF now, even while a
                # makefile() object still holds the socket open
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone already (ENOTCONN)
            if _INLINE_CLOSE:
                # socket.socket.close() without its two Python frames
                request._closed = True
                if request._io_refs <= 0:
                    _socket_close(request)
            else:
                request.close()

    def _fl_handle_accepted(self, request: socket.socket, client_address: Any) -> None:
        """The stdlib's _handle_request_noblock, after its get_request()."""
        if self.verify_request(request, client_address):  # type: ignore[attr-defined]
            try:
                self.process_request(request, client_address)  # type: ignore[attr-defined]
            except Exception:
                self.handle_error(request, client_address)  # type: ignore[attr-defined]
                self.shutdown_request(request)  # type: ignore[attr-defined]
            except BaseException:
                self.shutdown_request(request)  # type: ignore[attr-defined]
                raise
        else:
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def _fl_serve_selector(self, poll_interval: Optional[float]) -> None:
        """The stdlib's loop, plus a wake-up pipe for shutdown()."""
        waker = _PipeWaker()
        self._fl_publish(waker)
        try:
            with selectors.PollSelector() as selector:
                if self.fileno() >= 0:  # type: ignore[attr-defined]
                    selector.register(self, selectors.EVENT_READ)
                selector.register(waker, selectors.EVENT_READ)
                while not self._BaseServer__shutdown_request:
                    ready = selector.select(poll_interval)
                    if self._BaseServer__shutdown_request:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()  # type: ignore[attr-defined]
                    self.service_actions()  # type: ignore[attr-defined]
        finally:
            self._fl_unpublish(waker)


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
    """

    def server_bind(self) -> None:
        """Bind the socket (the stdlib's server_bind), explaining failures."""
        try:
            super().server_bind()
        except OSError as exc:
            address = self.server_address
            try:
                address = resolve(self.address_family, address)   # name the numeric address
            except (OSError, TypeError, ValueError, OverflowError):
                pass
            raise explain_bind_error(exc, self.address_family, address) from None


class UDPServer(TCPServer, _std.UDPServer):
    """socketserver.UDPServer with an immediate shutdown()."""


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer, _std.UnixStreamServer):
        """socketserver.UnixStreamServer served by fastlisten's core."""

    class UnixDatagramServer(UDPServer, _std.UnixDatagramServer):
        """socketserver.UnixDatagramServer with an immediate shutdown()."""


class _BusyThreads(list):
    """A snapshot of the threads handling a request now, which is what the
    stdlib's ``_threads`` lists.  Its join() does nothing: server_close()
    waits for the pool itself."""

    def join(self) -> None:
        pass


class ThreadingMixIn(_FastLoop, _std.ThreadingMixIn):
    """Mix-in class to handle each request in a thread, reusing threads.

    A new thread starts only when every existing one is busy; a thread idle
    for ``thread_idle_timeout`` seconds exits.  ``daemon_threads`` and
    ``block_on_close`` mean what they mean in the stdlib.  Set
    ``max_threads`` to cap the threads: requests beyond it wait in a FIFO
    queue of up to ``max_queued`` requests (default: max_threads); while
    that is full, the loop stops accepting and the kernel's backlog holds
    new connections (shutdown() drops the one request waiting for room).
    """

    #: Seconds an idle thread waits for another request before it exits.
    thread_idle_timeout = 5.0
    #: None: unbounded, as in the stdlib.
    max_threads: Optional[int] = None
    #: Requests that may wait for a thread when max_threads is reached.
    max_queued: Optional[int] = None

    _fl_pool: Optional[WorkerPool] = None

    @property
    def _threads(self) -> Any:  # type: ignore[override]
        """The threads handling a request now, as the stdlib's ``_threads``
        lists them (idle pool threads are not in it)."""
        pool = self._fl_pool
        return _BusyThreads(pool.busy_threads() if pool is not None else ())

    def process_request(self, request: Any, client_address: Any) -> None:
        """Run process_request_thread(request, client_address) on a pool thread."""
        pool = self._fl_pool
        if pool is None:
            pool = self._fl_pool = WorkerPool(
                name=f"{type(self).__name__}-worker", daemon=self.daemon_threads,
                idle_timeout=self.thread_idle_timeout, max_threads=self.max_threads,
                max_queued=self.max_queued)
        pool.daemon = self.daemon_threads
        if not pool.submit(self.process_request_thread, request, client_address,
                           cancelled=self._fl_shutdown_requested):
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def _fl_shutdown_requested(self) -> bool:
        return bool(self._BaseServer__shutdown_request)

    def _fl_interrupt(self) -> None:
        if self._fl_pool is not None:
            self._fl_pool.interrupt()

    def server_close(self) -> None:
        """Close the server; with block_on_close (and non-daemon threads),
        wait until every request being handled is done."""
        pool, self._fl_pool = self._fl_pool, None
        try:
            # The stdlib ThreadingMixIn's server_close then joins an empty _threads.
            super().server_close()  # type: ignore[misc]
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
        accept_batch_size = 1

        def process_request(self, request: Any, client_address: Any) -> None:
            """Fork a new subprocess to process the request."""
            # The stdlib reaps between requests (service_actions); a batch
            # holds several, so keep max_children here too.
            if self.active_children is not None and \
                    len(self.active_children) >= self.max_children:
                self.collect_children()
            super().process_request(request, client_address)

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

        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer,
                                      _std.ForkingUnixStreamServer):
            """UnixStreamServer with ForkingMixIn."""

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer,
                                        _std.ForkingUnixDatagramServer):
            """UnixDatagramServer with ForkingMixIn."""


#: The names of the running Python's socketserver.__all__.
__all__ = list(_std.__all__)


def __getattr__(name: str) -> Any:
    # The stdlib module's other (private) names, for code that reaches for them.
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_std, name)
