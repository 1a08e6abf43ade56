# cython: language_level=3, embedsignature=True
"""The compiled core of fastlisten.

It owns listening descriptors and makes the socket, bind, listen and
accept4 system calls itself.  ``accept_many`` waits on the listener and a
wake-up descriptor and then drains the accept queue in a single stretch
without the GIL, so the GIL is taken once per batch, not once per connection.

This module knows descriptors, addresses, errno and batches; it knows
nothing of servers, handlers or configuration (that is the Python layer).
``fastlisten._corepy`` is its pure-Python twin with the same API.
"""

cimport cython
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memset
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport PyObject
from cpython.pythread cimport PyThread_get_thread_ident
from posix.signal cimport sigset_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from libc.math cimport ceil

from fastlisten.includes.system cimport (
    sockaddr, sockaddr_storage, sockaddr_in, sockaddr_in6, sockaddr_un,
    socklen_t, AF_INET, AF_INET6, AF_UNIX,
    bind as c_bind, listen as c_listen, getsockname as c_getsockname,
    setsockopt as c_setsockopt, getsockopt as c_getsockopt,
    ntohs, ntohl, inet_ntop, close as c_close,
    errno, EBUSY,
)
from fastlisten.includes.shared cimport raise_errno, addr_from_py
from fastlisten.includes.fl_net cimport (
    fl_stats, fl_stats_read, fl_conn, fl_socket, fl_set_nonblocking, fl_wakeup_open,
    fl_wakeup_signal, fl_wakeup_drain, fl_wakeup_close, fl_wait_accept, fl_capacity_backoff,
    fl_tcp_queue, fl_accept_error_class, fl_block_signals, fl_restore_signals,
    fl_waiter_open, fl_wait_accept_ep, fl_epoll_watch, fl_format_ipv4,
    fl_gate, fl_gate_init, fl_gate_destroy, fl_gate_close, fl_gate_closed, fl_gate_busy,
    fl_gate_wait,
    FL_ERRNO_SLOTS, FL_ERR_CAPACITY,
    FL_WAIT_EINTR, FL_WAIT_WOKEN, FL_WAIT_TIMEOUT,
)
from fastlisten.includes.fl_filter cimport (
    fl_filter, fl_filter_init, fl_filter_configure, fl_filter_clear, fl_filter_shut,
    fl_filter_destroy, fl_filter_drop_runs, fl_filter_set_min_rate, FL_DROP_SHUTDOWN,
    fl_filter_wait_accept, fl_filter_wait_accept_ep, fl_filter_watch, fl_ready_rule,
    fl_filter_forget,
    FL_RULE_NONE,
)

import os as _os
import signal as _signal
import socket as _socket
import threading as _threading
import weakref as _weakref

from fastlisten._coreshared import (
    BACKOFF_FIRST_MS, BACKOFF_MAX_MS, DEFAULT_BATCH, ERRNO_SLOTS, MAX_BATCH, MAX_WAIT_MS,
    c_int, check_max,
    timeout_ms, closed_error,
)
from fastlisten._coreshared import (
    DEFAULT_READY_TIMEOUT, DEFAULT_READY_MAX_BYTES, DEFAULT_MAX_WAITING,
    check_filter as _check_filter,
    check_min_rate as _check_min_rate,
)
from fastlisten.proxy import DEFAULT_MAX_V2 as _PROXY_DEFAULT_MAX_V2

if ERRNO_SLOTS != FL_ERRNO_SLOTS:
    raise ImportError(f"fastlisten._core was built with FL_ERRNO_SLOTS={FL_ERRNO_SLOTS}, "
                      f"but fastlisten._coreshared says {ERRNO_SLOTS}: rebuild")
from fastlisten.address import decode_unix_path

__all__ = ["RawListener", "Waiter", "Stop", "proxy_parse", "proxy_read", "crc32c",
           "SocketReader", "SocketWriter", "ready_check"]

cdef object _socket_class = _socket.socket
# socket.socket(family, type, proto, fd) runs a Python-level __init__ that
# does exactly this: _socket.socket.__init__, then two slots.  Doing it here,
# through the two types' C slots (tp_new, tp_init) rather than their Python
# wrappers, saves about 0.4 us per connection; where the class does not look
# like that (another Python, a patched socket module), use the class itself.
cdef extern from "Python.h":
    # (self or type, args, kwargs or NULL): no keywords, so NULL
    ctypedef int (*_initproc "initproc")(object, object, PyObject *) except -1
    ctypedef object (*_newfunc "newfunc")(object, object, PyObject *)
    ctypedef struct _TypeSlots "PyTypeObject":
        _newfunc tp_new
        _initproc tp_init
cdef _TypeSlots *_socket_slots = <_TypeSlots *>_socket_class
cdef _TypeSlots *_base_slots = <_TypeSlots *>_socket.socket.__mro__[1]
cdef tuple _NO_ARGS = ()
cdef bint _build_directly = (
    set(getattr(_socket.socket, '__slots__', ())) >= {'_io_refs', '_closed'}
    and _socket.socket.__mro__[1].__module__ == '_socket'
    and '__new__' not in vars(_socket.socket)
    and _socket_slots.tp_new is not NULL and _base_slots.tp_init is not NULL)
cdef int _SOCK_STREAM = _socket.SOCK_STREAM
cdef int _MAX_BATCH = MAX_BATCH
cdef int _MAX_WAIT_MS = MAX_WAIT_MS
# Python runs signal handlers in the main thread only.
cdef unsigned long _main_thread = _threading.main_thread().ident


cdef inline double _now() noexcept nogil:
    """CLOCK_MONOTONIC in seconds (time.monotonic's clock)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline int _ms_until(double deadline) noexcept nogil:
    """poll()'s milliseconds until a monotonic deadline: rounded up, 0 once
    it passed, at most _MAX_WAIT_MS (a float-to-int cast out of range is
    undefined behaviour, so it is clamped first)."""
    cdef double left = (deadline - _now()) * 1000.0
    if not left > 0.0:
        return 0
    if left >= <double>_MAX_WAIT_MS:
        return _MAX_WAIT_MS
    return <int>ceil(left)


cdef object _addr_to_py(const sockaddr_storage *ss, socklen_t addrlen):
    """A sockaddr as the stdlib's socket module reports it."""
    cdef char buf[64]
    cdef const sockaddr_in *sin
    cdef const sockaddr_in6 *sin6
    cdef const sockaddr_un *sun
    cdef Py_ssize_t n
    if ss.ss_family == AF_INET:
        sin = <const sockaddr_in *>ss
        n = fl_format_ipv4(&sin.sin_addr, buf)
        return (buf[:n].decode('ascii'), ntohs(sin.sin_port))
    if ss.ss_family == AF_INET6:
        sin6 = <const sockaddr_in6 *>ss
        inet_ntop(AF_INET6, &sin6.sin6_addr, buf, sizeof(buf))
        return (buf.decode('ascii'), ntohs(sin6.sin6_port),
                ntohl(sin6.sin6_flowinfo), sin6.sin6_scope_id)
    if ss.ss_family == AF_UNIX:
        sun = <const sockaddr_un *>ss
        n = <Py_ssize_t>addrlen - <Py_ssize_t>(<char *>sun.sun_path - <char *>sun)
        if n <= 0:
            return ''
        return decode_unix_path(sun.sun_path[:n])
    return (ss.ss_family, b'')


cdef list _wrap(fl_conn *conns, int n, int family, int proto):
    """socket.socket objects for the n accepted descriptors in conns; if
    building one fails, every descriptor not yet wrapped is closed."""
    cdef int i = 0, j
    cdef fl_conn *c
    cdef list out = []
    try:
        for i in range(n):
            c = &conns[i]
            if _build_directly:
                sock = _socket_slots.tp_new(_socket_class, _NO_ARGS, NULL)
                _base_slots.tp_init(sock, (family, _SOCK_STREAM, proto, c.fd), NULL)
                sock._io_refs = 0
                sock._closed = False
            else:
                sock = _socket_class(family, _SOCK_STREAM, proto, c.fd)
            c.fd = -1
            out.append(sock)
            out[i] = (sock, _addr_to_py(&c.addr, c.addrlen))
    except BaseException:
        for j in range(i, n):
            if conns[j].fd >= 0:
                c_close(conns[j].fd)
        for item in out:
            (item[0] if type(item) is tuple else item).close()
        raise
    return out


def _accept_error_class(int err):
    """How accept_many treats accept()'s errno ``err``: 0 skip it, 1 back
    off (capacity), 2 the listener is gone, 3 raise (csrc/fl_net.c's table,
    for the test that compares it with _coreshared's)."""
    return fl_accept_error_class(err)


@cython.final
@cython.no_gc      # _watching holds ints only: no cycle; a GC clear would leave Waiter._close without it
cdef class Stop:
    """The stop of a group of leader/follower waiters (``RawListener.waiter(stop)``).

    ``fence()`` returns once no accept_many with such a waiter touches the
    listening descriptor any more, and never will: from then on it may be
    made blocking, closed or reused, although the waiting threads may not
    have left the core yet.  It waits only for a waiter that is accepting
    at that moment (a non-blocking accept4 stretch, without the GIL), never
    for a thread to be scheduled or to take the GIL.  Every accept_many
    with such a waiter returns an empty batch at once from then on; one
    waiting in the kernel returns when it next wakes up.

    ``set()`` (or ``wakeup()``) is fence() and wakes every waiting one
    (``fileno()``, an eventfd or a pipe, becomes readable: a loop may poll
    it too).  Both are idempotent, from any thread.  ``close()`` closes the
    descriptor once the last waiter made with this stop is closed; a waiter
    made after that, from a stop that was set, only ever stops.
    """
    cdef fl_gate _gate
    cdef bint _gate_ready
    cdef bint _woken
    cdef int _r
    cdef int _w
    cdef int _users             # open waiters made with this stop
    cdef bint _close_pending
    cdef dict _watching         # their epoll descriptors that watch the listener: its fd

    def __cinit__(self):
        self._r = self._w = -1
        self._watching = {}
        cdef int err = fl_gate_init(&self._gate)
        if err != 0:
            raise_errno(err)
        self._gate_ready = True
        if fl_wakeup_open(&self._r, &self._w) < 0:
            raise_errno(errno)

    def __dealloc__(self):
        self._close_fds()
        if self._gate_ready:
            fl_gate_destroy(&self._gate)

    cdef void _close_fds(self) noexcept:
        fl_wakeup_close(&self._r, &self._w)

    cdef void _release(self) noexcept:
        """A waiter made with this stop was closed."""
        self._users -= 1
        if self._users == 0 and self._close_pending:
            self._close_fds()

    def fileno(self):
        """The descriptor set() makes readable; -1 once closed."""
        return self._r

    @property
    def fenced(self):
        """True once fence() or set() was called."""
        return bool(fl_gate_closed(&self._gate))

    def fence(self):
        """Keep every waiter made with this stop off the listening
        descriptor from now on; see the class docstring."""
        fl_gate_close(&self._gate)
        if fl_gate_busy(&self._gate):
            with nogil:
                fl_gate_wait(&self._gate)
        # Off the listener's wait queue too.  With EPOLLEXCLUSIVE the kernel
        # gives a new connection's one wake-up to the first epoll set that
        # has a thread blocked in it: a thread of ours still asleep there
        # after this fence (not woken yet, or never: fence() alone) would
        # take it from the waiters that still accept, in this process or
        # another sharing the socket (Workers), and the connection would
        # wait for the next one.  (Under the GIL, as Waiter._close and
        # waiter() are: no descriptor in the dict is closed or reused
        # meanwhile.)
        watching, self._watching = self._watching, {}
        for epfd, lfd in watching.items():
            fl_epoll_watch(epfd, lfd, 0)

    def set(self):
        """fence(), and wake every waiting one."""
        self.fence()
        if not self._woken and self._w >= 0:
            self._woken = True
            fl_wakeup_signal(self._w)       # (EAGAIN: readable already)

    def wakeup(self):
        """set(), under the name shutdown() calls on a loop's wake-up source."""
        self.set()

    def close(self):
        """Close the descriptor, now or, while waiters made with this stop
        are open, when the last of them is closed.  Idempotent."""
        self._close_pending = True
        if self._users == 0:
            self._close_fds()

    def __repr__(self):
        return (f"<fastlisten._core.Stop fd={self._r} fenced={self.fenced} "
                f"woken={bool(self._woken)} waiters={self._users}>")


@cython.final
@cython.no_gc_clear     # _close() needs _stop, even when a cycle is collected
cdef class Waiter:
    """One thread's way to wait in ``RawListener.accept_many(..., waiter=)``
    (leader/follower): an epoll descriptor watching the listener (with
    EPOLLEXCLUSIVE where the kernel has it, so that each connection wakes
    one waiting thread, not every one), the listener's wake-up descriptor,
    and ``stop_fd`` if given.  While ``stop_fd`` is readable, every
    accept_many with this waiter returns an empty batch at once, accepting
    nothing, and leaves it set; with a :class:`Stop`, the same once it is
    set, and accept4 runs only inside its gate.  Made by
    ``RawListener.waiter()``; use it from one thread at a time; close() it
    when that thread is done.
    """
    cdef int _epfd
    cdef readonly int stop_fd
    cdef readonly bint exclusive
    cdef object _listener
    cdef Stop _stop
    cdef bint _filtered         # its epoll set watches the listener's accept filter

    def __cinit__(self):
        self._epfd = -1

    def __dealloc__(self):
        self._close()

    cdef void _close(self) noexcept:
        if self._epfd >= 0:
            if self._stop is not None:
                self._stop._watching.pop(self._epfd, None)
            c_close(self._epfd)
            self._epfd = -1
            if self._stop is not None:
                self._stop._release()

    def fileno(self):
        """The epoll descriptor, -1 once closed."""
        return self._epfd

    def close(self):
        """Close the epoll descriptor.  Idempotent."""
        self._close()

    def __repr__(self):
        return (f"<fastlisten._core.Waiter epfd={self._epfd} stop_fd={self.stop_fd} "
                f"exclusive={bool(self.exclusive)}>")


@cython.final
cdef class RawListener:
    """A listening socket's descriptor, owned by the core.

    RawListener(family=AF_INET, type=SOCK_STREAM, proto=0, fileno=None, owned=True)

    With ``fileno`` it adopts an existing socket instead of creating one;
    ``owned=False`` leaves that descriptor open on ``close()`` (its owner,
    say a ``socket.socket``, closes it).  The descriptor is made
    non-blocking: ``accept_many`` relies on EAGAIN to end a batch.
    """
    cdef int _fd
    cdef int _wake_r
    cdef int _wake_w
    cdef int _sig_r             # the signal wake-up pipe (a main-thread wait's)
    cdef int _sig_w
    cdef bint _owned
    cdef int _busy              # accept_many calls in flight (GIL released)
    # Wake-up generations (all under the GIL; see accept_many): a wake-up is
    # consumed once by the calls in flight when it is seen (generation
    # _gen - 1, _old of them still inside) and cleared when the last of them
    # leaves; calls that start meanwhile wait on _cond, not on the fd.
    cdef unsigned long long _gen
    cdef int _old               # calls in flight that the current wake-up is for
    cdef bint _again            # wakeup() while one was being delivered
    cdef object _cond           # parks calls that start during a delivery
    cdef bint _buf_in_use       # _conns is being filled or read by a call
    cdef bint _close_pending    # close() asked while busy: the last one closes
    cdef readonly int family
    cdef readonly int type
    cdef readonly int proto
    cdef fl_stats _st
    cdef fl_conn *_conns
    cdef int _nconns
    cdef int _backoff_ms
    cdef fl_filter *_filter     # the accept filter (NULL: none yet)
    cdef bint _filtering        # set_accept_filter gave a rule that waits
    cdef bint _not_accepting    # set_accepting(False): the filter's connections only
    cdef object __weakref__     # _FILTERED (after a fork: forget_filter_after_fork)

    def __cinit__(self):
        self._fd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._sig_r = -1
        self._sig_w = -1
        self._conns = NULL

    def __init__(self, int family=AF_INET, int type=_SOCK_STREAM, int proto=0,
                 fileno=None, *, bint owned=True):
        cdef int fd
        if self._fd >= 0 or self._wake_r >= 0:
            raise RuntimeError("RawListener.__init__ called twice")
        memset(&self._st, 0, sizeof(fl_stats))
        self.family = family
        self.type = type
        self.proto = proto
        self._owned = owned
        self._backoff_ms = BACKOFF_FIRST_MS
        self._cond = _threading.Condition(_threading.Lock())
        if fl_wakeup_open(&self._wake_r, &self._wake_w) < 0:
            raise_errno(errno)
        try:
            # made now, as the pure core's: a wait under EMFILE needs none
            self._sig_r, self._sig_w = _os.pipe2(_os.O_NONBLOCK | _os.O_CLOEXEC)
        except BaseException:
            self._close_wakeup()
            raise
        if fileno is None:
            fd = fl_socket(family, type, proto)
            if fd < 0:
                err = errno
                self._close_wakeup()
                raise_errno(err)
            self._owned = True
        else:
            fd = fileno
            if fd < 0:
                self._close_wakeup()
                raise ValueError(f"negative file descriptor: {fd}")
        self._fd = fd
        if fl_set_nonblocking(fd, 1) < 0:
            err = errno
            self._close_now()
            raise_errno(err)

    def __dealloc__(self):
        self._close_now()
        free(self._conns)
        if self._filter != NULL:
            fl_filter_destroy(self._filter)
            free(self._filter)

    cdef void _close_wakeup(self) noexcept:
        fl_wakeup_close(&self._wake_r, &self._wake_w)
        if self._sig_r >= 0:
            c_close(self._sig_r)
            c_close(self._sig_w)
            self._sig_r = self._sig_w = -1

    cdef int _arm_signals(self, int epfd) except -2:
        """In the main thread, before the handlers' last check: make this
        listener's pipe the interpreter's signal wake-up fd for one wait (in
        epfd too, if >= 0) and return its read end; -1 when the application
        has its own wake-up fd (left alone) or epoll cannot watch the pipe:
        the caller then masks signals for the wait instead."""
        try:
            previous = _signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        except ValueError:
            return -1       # not the main interpreter's main thread
        if previous != -1 and previous != self._sig_w:
            _signal.set_wakeup_fd(previous)
            return -1
        if epfd >= 0 and fl_epoll_watch(epfd, self._sig_r, 1) < 0:
            _signal.set_wakeup_fd(-1)
            return -1           # (ENOMEM, ENOSPC): the mask, this time
        return self._sig_r

    cdef void _disarm_signals(self, int sig_fd, int epfd) noexcept:
        """Undo _arm_signals (sig_fd: what it returned) after the wait, and
        empty the pipe: the handlers run after this (PyErr_CheckSignals)."""
        if sig_fd < 0:
            return
        try:
            _signal.set_wakeup_fd(-1)
        except BaseException:
            pass        # (not the main thread's interpreter any more: nothing to undo)
        if epfd >= 0:
            fl_epoll_watch(epfd, sig_fd, 0)
        fl_wakeup_drain(sig_fd)

    cdef void _close_now(self) noexcept:
        if self._fd >= 0 and self._owned:
            c_close(self._fd)
        self._fd = -1
        self._close_wakeup()
        if self._filter != NULL:
            # no accept_many in flight: nobody is inside the filter
            fl_filter_shut(self._filter)
            self._filtering = False

    cdef int _check_open(self) except -1:
        if self._fd < 0 or self._close_pending:
            raise closed_error()
        return 0

    @property
    def closed(self):
        """True once close() was called."""
        return self._fd < 0 or self._close_pending

    def fileno(self):
        """The listening descriptor, or -1 once closed (like socket.fileno)."""
        return -1 if self.closed else self._fd

    def setsockopt(self, int level, int option, value):
        """setsockopt(2) with an int value."""
        cdef int v = c_int(value, "value")
        self._check_open()
        if c_setsockopt(self._fd, level, option, &v, sizeof(int)) < 0:
            raise_errno(errno)

    def getsockopt(self, int level, int option):
        """getsockopt(2) for an int value."""
        cdef int value = 0
        cdef socklen_t n = sizeof(int)
        self._check_open()
        if c_getsockopt(self._fd, level, option, &value, &n) < 0:
            raise_errno(errno)
        return value

    def bind(self, address):
        """bind(2) to a numeric address: (host, port), (host, port, flow, scope) or a path."""
        cdef sockaddr_storage ss
        cdef socklen_t n
        self._check_open()
        addr_from_py(self.family, address, &ss, &n)
        if c_bind(self._fd, <sockaddr *>&ss, n) < 0:
            raise_errno(errno)

    def listen(self, backlog):
        """listen(2); a negative backlog is clamped to 0, as socket.listen does."""
        cdef int n = c_int(backlog, "backlog")
        self._check_open()
        if c_listen(self._fd, n if n > 0 else 0) < 0:
            raise_errno(errno)

    def getsockname(self):
        """The bound address, in the stdlib's form."""
        cdef sockaddr_storage ss
        cdef socklen_t n = sizeof(ss)
        self._check_open()
        memset(&ss, 0, sizeof(ss))
        if c_getsockname(self._fd, <sockaddr *>&ss, &n) < 0:
            raise_errno(errno)
        return _addr_to_py(&ss, n)

    def queue(self):
        """(queued, backlog): the accept queue now and its effective size (TCP_INFO)."""
        cdef unsigned int queued = 0, backlog = 0
        self._check_open()
        if fl_tcp_queue(self._fd, &queued, &backlog) < 0:
            raise_errno(errno)
        return (queued, backlog)

    def wakeup(self):
        """Make a blocked (or the next) accept_many return at once.  Thread-safe.

        Every call waiting when the wake-up is seen returns once (an empty
        batch); calls made after that wait for connections again.
        """
        if self._wake_w < 0:
            return
        if self._old > 0:
            # one is being delivered: this one is for the calls parked
            # meanwhile, once that delivery is over
            self._again = True
        elif fl_wakeup_signal(self._wake_w) < 0:
            raise_errno(errno)

    cdef void _leave(self, unsigned long long gen) noexcept:
        """Bookkeeping when an accept_many call of generation gen returns
        (GIL held, so wakeup() cannot interleave)."""
        self._busy -= 1
        if gen == self._gen or self._old == 0:
            return
        self._old -= 1
        if self._old > 0:
            return
        # The last call the wake-up was for is out.
        if self._again:
            # Another came during the delivery: it is for the calls parked
            # meanwhile (or, if none, the next call), so the fd stays set.
            self._again = False
            self._gen += 1
            self._old = self._busy
        elif self._wake_r >= 0:
            fl_wakeup_drain(self._wake_r)
        if self._busy > 0:
            self._notify()

    cdef void _notify(self) noexcept:
        try:
            with self._cond:
                self._cond.notify_all()
        except BaseException:       # a signal handler raised: nothing to undo
            pass

    cdef int _park(self, unsigned long long gen, int ms, double deadline) except -1:
        """Wait while a wake-up is being delivered to calls that started
        before this one, until it is over, a later wake-up is for this call,
        close() is called or the timeout passes."""
        cdef double left
        with self._cond:
            while self._old > 0 and gen == self._gen and not self._close_pending:
                if ms < 0:
                    self._cond.wait()
                else:
                    left = deadline - _now()
                    if left <= 0:
                        break
                    self._cond.wait(left)
        return 0

    cdef int _reserve(self, int n) except -1:
        cdef fl_conn *p
        if n > self._nconns:
            p = <fl_conn *>realloc(self._conns, n * sizeof(fl_conn))
            if p == NULL:
                raise MemoryError()
            self._conns = p
            self._nconns = n
        return 0

    def set_accept_filter(self, rule, timeout=DEFAULT_READY_TIMEOUT,
                          max_bytes=DEFAULT_READY_MAX_BYTES, max_waiting=DEFAULT_MAX_WAITING,
                          proxy=0, proxy_max_v2=_PROXY_DEFAULT_MAX_V2, min_rate=0):
        """Make accept_many return only connections that are *ready*.

        ``rule``: 'none' (every connection at once: no filter), 'data' (at
        least one byte), 'line' (a complete line within ``max_bytes``),
        'http' (a complete request head within ``max_bytes``) or 'tls' (a
        complete first TLS record holding a ClientHello).  ``proxy``: 0, or
        the PROXY protocol versions (fastlisten.proxy.V1 | V2) of a header
        that must come first, complete and valid (at most ``proxy_max_v2``
        bytes for v2); the rule then applies to what follows it.  After a
        LOCAL header (a balancer's health check) at least one byte must
        follow, whatever the rule ('none' too): a health check that closes
        or resets is dropped ('closed', 'reset'), never returned.

        Connections not ready at accept wait in an epoll set the core holds
        (no thread, no GIL, no Python object each), judged with MSG_PEEK so
        that every byte stays for the handler, for at most ``timeout``
        seconds from their accept.  With ``min_rate`` (bytes per second,
        0: none), one that has waited a second or more and sent fewer than
        ``min_rate`` bytes for every second it waited is closed ('slow')
        when it sends more without becoming ready: a client that dribbles
        goes long before its deadline.  At most ``max_waiting`` wait at
        once: one more closes the oldest ('evicted').  Expired, malformed,
        oversize, closed, reset and evicted connections are closed and
        counted by reason (``stats()['dropped']``), never returned; one that
        sent something and then shut its side is handed over as it is.
        close() closes every waiting connection ('shutdown').

        May be called again (say, to change the rule) only while no
        connection waits and no accept_many runs.  Leader/follower waiters
        must be made after it (their epoll sets watch the filter's): an
        older waiter raises ValueError in accept_many.  Every idle waiter
        wakes when a waiting connection has news; the first judges it.
        """
        cdef fl_ready_rule r
        cdef int e
        code, ms, mb, cap, versions, max_v2 = _check_filter(
            rule, timeout, max_bytes, max_waiting, proxy, proxy_max_v2)
        rate = _check_min_rate(min_rate)
        self._check_open()
        if self._busy:
            raise_errno(EBUSY, "cannot change the accept filter while accept_many is waiting")
        if self._filter == NULL:
            self._filter = <fl_filter *>malloc(sizeof(fl_filter))
            if self._filter == NULL:
                raise MemoryError()
            e = fl_filter_init(self._filter)
            if e != 0:
                free(self._filter)
                self._filter = NULL
                raise_errno(e)
            _FILTERED.add(self)
        r.rule = code
        r.max_bytes = mb
        r.proxy = versions
        r.proxy_max_v2 = max_v2
        e = fl_filter_configure(self._filter, &r, ms, cap)
        if e != 0:
            raise_errno(e, "cannot change the accept filter while connections wait in it"
                        if e == EBUSY else None)
        fl_filter_set_min_rate(self._filter, rate)
        self._filtering = code != FL_RULE_NONE or versions != 0

    def set_accepting(self, on):
        """False: accept_many takes no new connection from the kernel's
        queue, only those waiting in the accept filter as they become
        ready (none without a filter, nor with a waiter: it returns an
        empty batch at once); True again: as before.  For a graceful stop
        on a socket others go on accepting from (a successor worker): it
        waits for what its filter holds without taking theirs."""
        self._not_accepting = not on

    def close_waiting(self):
        """Close every connection waiting in the accept filter, counted as
        dropped for 'shutdown', and return how many; the listener stays
        open and the filter set.  Safe while other threads are inside
        accept_many (the filter's lock: a connection is either handed over
        or closed here, never both).  0 without a filter, or once closed
        (close() closed them)."""
        cdef fl_filter *f = self._filter
        cdef int n
        if f == NULL:
            return 0
        with nogil:
            n = fl_filter_clear(f, FL_DROP_SHUTDOWN)
        return n

    def forget_filter_after_fork(self):
        """In a process just forked: let go of the connections waiting in
        the parent's accept filter and of its epoll set, and return how
        many connections were let go.  Their descriptors here are copies:
        closed with close() alone (the epoll set is the parent's too, and
        must keep the parent's registrations), so that a connection the
        parent drops is closed for its peer at once, not when this process
        exits.  The filter stays set, empty, with an epoll set of its own;
        its counters stay.  Runs by itself after every os.fork() (an
        os.register_at_fork hook, for every listener with a filter); call
        it only in a child forked some other way.  0 without a filter."""
        if self._filter == NULL:
            return 0
        return fl_filter_forget(self._filter)

    def new_stop(self):
        """A :class:`Stop` for this listener's waiters (of this core)."""
        return Stop()

    def waiter(self, stop=-1):
        """A :class:`Waiter` for one thread's ``accept_many(..., waiter=)``
        calls on this listener.  ``stop``: a :class:`Stop`, or a descriptor
        whose readability means "stop" (-1: none)."""
        cdef int exclusive = 0, stop_fd
        cdef Stop gate_owner = None
        cdef fl_gate *gate = NULL
        cdef Waiter w
        if isinstance(stop, Stop):
            gate_owner = stop
            if gate_owner._r < 0 and not fl_gate_closed(&gate_owner._gate):
                raise ValueError("that stop is closed")
            stop_fd = gate_owner._r     # (-1 once set and closed: the waiter only stops)
            gate = &gate_owner._gate
        else:
            stop_fd = c_int(stop, "stop")
        self._check_open()
        fd = fl_waiter_open(self._fd, self._wake_r, stop_fd, gate, &exclusive)
        if fd < 0:
            raise_errno(errno)
        if self._filtering and fl_filter_watch(self._filter, fd) < 0:
            err = errno
            c_close(fd)
            raise_errno(err)
        w = Waiter.__new__(Waiter)
        w._epfd = fd
        w.stop_fd = stop_fd
        w.exclusive = exclusive
        w._listener = self
        w._filtered = self._filtering
        if gate_owner is not None:
            w._stop = gate_owner
            gate_owner._users += 1
            if not fl_gate_closed(gate):   # (the GIL held since fl_waiter_open)
                gate_owner._watching[fd] = self._fd     # it registered the listener
        return w

    def accept_many(self, max=DEFAULT_BATCH, timeout=None, Waiter waiter=None):
        """Wait for connections and accept up to ``max`` of them.

        Returns a list of ``(socket.socket, address)``, empty when the wait
        timed out, when ``wakeup()`` was called, or after a capacity error
        (EMFILE, ENFILE, ENOBUFS, ENOMEM), which pauses for a growing back-off
        instead of spinning and leaves the connection queued.  ``timeout`` is
        in seconds, None waits for ever.  Errors of a peer that gave up are
        counted and skipped; others raise the stdlib's OSError subclass.
        Signals interrupt the wait: their Python handlers run, and the wait
        goes on with the time left unless a handler raised.

        With a ``waiter`` (from this listener's ``waiter()``), the wait is
        on its epoll descriptor: several threads can wait so, and the kernel
        gives each connection to one of them; a readable stop descriptor
        makes it return an empty batch at once.
        """
        cdef int n = 0, status = 0, err = 0, ms, fd, wake, i, lfd
        cdef int epfd = -1, stop_fd = -1
        cdef fl_gate *gate = NULL
        cdef fl_filter *filt = self._filter if self._filtering else NULL
        cdef fl_conn one
        cdef unsigned long long gen
        cdef double deadline = 0.0
        cdef bint stepped          # the timeout is longer than one poll() can wait
        cdef fl_conn *conns
        cdef fl_conn *private
        cdef fl_stats *st = &self._st
        cdef sigset_t old_mask
        cdef const sigset_t *wait_mask
        cdef int sig_fd
        cdef bint main = PyThread_get_thread_ident() == _main_thread
        cdef int nmax
        self._check_open()
        if self._not_accepting and (filt == NULL or waiter is not None):
            return []           # nothing to take but what the filter holds
        if type(max) is int and 1 <= max <= _MAX_BATCH:
            nmax = max
        else:
            nmax = check_max(max)           # a float, a bool... raise with the message
        # Timeouts are converted in C: a server loop calls this once per
        # batch, with None or its poll_interval.
        if timeout is None:
            ms = -1
        else:
            if type(timeout) is float and 0.0 <= <double>timeout <= 1e6:
                ms = <int>ceil(<double>timeout * 1000.0)
            else:
                ms = timeout_ms(timeout)    # checks and explains anything else
            if ms >= 0:                     # (-1: so long it is for ever)
                deadline = _now() + <double>timeout
        stepped = ms == _MAX_WAIT_MS
        if waiter is not None:
            if filt != NULL and not waiter._filtered:
                raise ValueError("that waiter was made before set_accept_filter: make "
                                 "waiters after setting the filter")
            if waiter._listener is not self:
                raise ValueError("that waiter belongs to another listener")
            epfd, stop_fd = waiter._epfd, waiter.stop_fd
            if epfd < 0:
                raise ValueError("that waiter is closed")
            if waiter._stop is not None:
                gate = &waiter._stop._gate
                if fl_gate_closed(gate):
                    return []       # stopped: at once, whatever is queued
        # The listener's own buffer serves one caller at a time; a second
        # thread accepting concurrently gets a buffer of its own (one
        # connection: on the stack).
        private = NULL
        if nmax == 1 and self._buf_in_use:
            conns = &one
        elif self._buf_in_use:
            private = <fl_conn *>malloc(nmax * sizeof(fl_conn))
            if private == NULL:
                raise MemoryError()
            conns = private
        else:
            if nmax > self._nconns:
                self._reserve(nmax)
            conns = self._conns
            self._buf_in_use = True     # until _wrap is done with it
        gen = self._gen
        self._busy += 1
        try:
            try:
                if self._old > 0:
                    self._park(gen, ms, deadline)
                    if gen != self._gen or self._close_pending or self._old > 0:
                        # woken, closed or timed out while parked
                        status = FL_WAIT_WOKEN if gen != self._gen else FL_WAIT_TIMEOUT
                while self._old == 0 and gen == self._gen and not self._close_pending:
                    lfd = self._fd
                    wake = self._wake_r
                    # In the main thread, a signal that arrives after Python
                    # last ran its handlers but before poll() would be lost
                    # until the next connection.  The wait watches a
                    # signal.set_wakeup_fd pipe armed before that check
                    # (as the pure core does): Python writes it whichever
                    # thread the kernel hands the signal to.  A ppoll()
                    # mask alone would not do with other threads: a signal
                    # sent to the process while this thread blocks it goes
                    # to one of them, and this wait goes on.  The mask is
                    # the fallback when the application owns the wake-up fd.
                    wait_mask = NULL
                    sig_fd = -1
                    if main:
                        sig_fd = self._arm_signals(epfd)
                        if sig_fd < 0 and fl_block_signals(&old_mask) == 0:
                            wait_mask = &old_mask
                        try:
                            PyErr_CheckSignals()
                        except BaseException:
                            if wait_mask != NULL:
                                fl_restore_signals(&old_mask)
                            self._disarm_signals(sig_fd, epfd)
                            raise
                    with nogil:
                        if filt != NULL and epfd >= 0:
                            n = fl_filter_wait_accept_ep(filt, epfd, lfd, wake, sig_fd, stop_fd,
                                                         gate, ms, wait_mask, conns, nmax, st,
                                                         &status, &err)
                        elif filt != NULL:
                            # (lfd -1: poll() skips it, nothing new is accepted)
                            n = fl_filter_wait_accept(filt, -1 if self._not_accepting else lfd,
                                                      wake, sig_fd, ms, wait_mask,
                                                      conns, nmax, st, &status, &err)
                        elif epfd >= 0:
                            n = fl_wait_accept_ep(epfd, lfd, wake, sig_fd, stop_fd, gate, ms,
                                                  wait_mask, conns, nmax, st, &status, &err)
                        else:
                            n = fl_wait_accept(lfd, wake, sig_fd, ms, wait_mask, conns, nmax,
                                               st, &status, &err)
                        if wait_mask != NULL:
                            fl_restore_signals(wait_mask)
                        if n == 0 and err != 0 and fl_accept_error_class(err) == FL_ERR_CAPACITY:
                            fl_capacity_backoff(wake, self._backoff_ms if ms < 0 or ms > self._backoff_ms else ms)
                    self._disarm_signals(sig_fd, epfd)
                    if status == FL_WAIT_TIMEOUT and stepped:
                        ms = _ms_until(deadline)
                        if ms > 0:
                            continue        # one step of a very long wait ended
                        break
                    if status != FL_WAIT_EINTR:
                        break
                    PyErr_CheckSignals()     # PEP 475: handlers run, may raise
                    if self._close_pending:
                        break
                    if ms > 0:
                        ms = _ms_until(deadline)
                if status == FL_WAIT_WOKEN and gen == self._gen:
                    # The first to see this wake-up: it is for every call in
                    # flight now (they see the fd too); the last one of them
                    # to leave clears it.  Calls that start before then park.
                    self._gen += 1
                    self._old = self._busy
            finally:
                self._leave(gen)
            if self._close_pending:
                # closed while we waited: every waiter raises, the last one
                # out closes the descriptor
                for i in range(n):
                    c_close(conns[i].fd)
                if self._busy == 0:
                    self._close_now()
                raise closed_error()
            if n == 0:
                if err == 0:
                    return []
                if fl_accept_error_class(err) == FL_ERR_CAPACITY:
                    self._backoff_ms = min(self._backoff_ms * 2, BACKOFF_MAX_MS)
                    return []
                raise_errno(err)
            self._backoff_ms = BACKOFF_FIRST_MS
            return _wrap(conns, n, self.family, self.proto)
        finally:
            if conns == self._conns:
                self._buf_in_use = False
            free(private)

    @property
    def capacity_episodes(self):
        """How many runs of capacity errors (EMFILE, ...) accept has met."""
        cdef fl_stats now
        fl_stats_read(&self._st, &now)
        return now.capacity_episodes

    @property
    def last_capacity_errno(self):
        """The errno of the latest capacity error, 0 if none."""
        cdef fl_stats now
        fl_stats_read(&self._st, &now)
        return now.last_capacity_errno

    @property
    def drop_episodes(self):
        """How many runs of drops the accept filter has begun: a run begins
        with a connection dropped as malformed, oversize, expired, evicted
        or error, and ends when a connection is made ready ('closed',
        'reset' and 'shutdown' neither begin nor end one).  Cheap enough
        to read after every accept_many, as capacity_episodes is."""
        if self._filter == NULL:
            return 0
        return fl_filter_drop_runs(self._filter)

    def last_drop_episode(self):
        """The latest run of drops: (drop_episodes, the reason of its first
        drop, True while it goes on, how many it dropped so far);
        (0, None, False, 0) before any."""
        return _filter_drop_episode(self._filter)

    def stats(self):
        """Counters: accepted, batches, max_batch, capacity_episodes, errors
        {errno: n}; and the accept filter's: waiting (now), waiting_peak,
        waited (connections that had to wait), made_ready (handed over by
        the filter, at once or after waiting), dropped {reason: n}."""
        cdef fl_stats now
        fl_stats_read(&self._st, &now)    # waiters may be counting without the GIL
        errors = {}
        for i in range(FL_ERRNO_SLOTS):
            if now.errors[i]:
                errors[i] = now.errors[i]
        out = {
            'accepted': now.accepted,
            'batches': now.batches,
            'max_batch': now.max_batch,
            'capacity_episodes': now.capacity_episodes,
            'errors': errors,
        }
        out.update(_filter_counters(self._filter))
        return out

    def close(self):
        """Close the listener (and its wake-up descriptor).  Idempotent.

        Called while another thread waits in accept_many, it wakes that
        thread, which closes the descriptor once it is out of the kernel,
        so that no descriptor number is ever reused under a running poll().
        """
        if self._fd < 0:
            return
        if self._busy:
            self._close_pending = True
            fl_wakeup_signal(self._wake_w)
            self._notify()          # calls parked in accept_many raise too
            return
        self._close_now()

    def detach(self):
        """Stop owning the descriptor and return it (like socket.detach)."""
        if self._busy:
            raise_errno(EBUSY, "cannot detach while accept_many is waiting")
        fd = self._fd
        self._owned = False
        self._close_now()
        return fd

    def __repr__(self):
        return (f"<fastlisten._core.RawListener fd={self.fileno()} "
                f"family={self.family}>")
include "_proxy.pxi"
include "_streams.pxi"
include "_filter.pxi"


#: The listeners that have an accept filter: a forked child lets go of what
#: waits in them (RawListener.forget_filter_after_fork).
_FILTERED = _weakref.WeakSet()


def _forget_filters_after_fork():
    """os.register_at_fork's after_in_child: every fork, whoever makes it
    (ForkingMixIn, os.fork in a handler, multiprocessing), leaves the
    parent's waiting connections to the parent."""
    for listener in list(_FILTERED):
        listener.forget_filter_after_fork()


_os.register_at_fork(after_in_child=_forget_filters_after_fork)
