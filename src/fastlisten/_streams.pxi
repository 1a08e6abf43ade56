# A request handler's file objects over its connection: the raw reader under
# StreamRequestHandler's rfile (an io.BufferedReader, as the stdlib's is) and
# its unbuffered wfile.  Included into fastlisten._core.  They do what the
# stdlib's socket.SocketIO(sock, "rb") with makefile()'s reference, and
# socketserver._SocketWriter, do (fastlisten._corepy's twins are those two
# classes), in C: the stdlib's run a Python frame for every construction,
# raw read, flush and close, and IOBase's finaliser on top.  The messages and
# exception types are the stdlib's, so that a handler cannot tell them apart
# (tests/test_streams.py holds them side by side).

from cpython.buffer cimport (
    PyObject_CheckBuffer, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE,
)
from fastlisten.includes.system cimport recv as c_recv, send as c_send, MSG_DONTWAIT
from fastlisten.includes.system cimport EWOULDBLOCK

import errno as _errno
import io as _io

cdef object _Unsupported = _io.UnsupportedOperation
cdef object _socket_timeout = _socket.timeout
cdef frozenset _BLOCKING_ERRNOS = frozenset({_errno.EAGAIN, _errno.EWOULDBLOCK})
cdef Py_ssize_t _CHUNK = _io.DEFAULT_BUFFER_SIZE


cdef inline void _check_open(bint closed, str what="file") except *:
    if closed:
        raise ValueError(f"I/O operation on closed {what}.")


# A plain socket.socket's recv_into() and sendall() release the GIL around
# every system call, even one that does not wait; between threads on other
# CPUs that hand-off costs context switches.  So a plain socket is first
# tried without waiting and without releasing the GIL; only when that would
# block (or for any other socket class: an SSLSocket, a subclass) does the
# socket's own method run, which waits, honours the socket's timeout and
# raises what it raises.  Errors of the first try are raised as the socket
# module raises them (OSError from errno: its subclass, same message).

cdef inline int _plain_fd(object sock) except -2:
    """sock's descriptor when it is a plain, open socket.socket; else -1."""
    if type(sock) is not _socket_class:
        return -1
    return sock.fileno()


cdef Py_ssize_t _recv_now(object sock, object b) except -3:
    """Bytes received into b without waiting; -2 when the caller must use
    the socket's own recv_into (would block, or not a plain socket)."""
    cdef Py_buffer view
    cdef ssize_t n
    cdef int err
    cdef int fd = _plain_fd(sock)
    if fd < 0:
        return -2
    try:
        PyObject_GetBuffer(b, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    except (BufferError, TypeError):
        return -2       # recv_into raises its own error for it
    n = c_recv(fd, view.buf, <size_t>view.len, MSG_DONTWAIT)
    err = errno
    PyBuffer_Release(&view)
    if n >= 0:
        return n
    if err == EAGAIN or err == EWOULDBLOCK or err == EINTR:
        return -2
    raise_errno(err)


cdef Py_ssize_t _send_now(object sock, object b) except -3:
    """Bytes of b sent without waiting (maybe fewer than all, maybe 0);
    -2 when the caller must use the socket's own sendall for all of it
    (not a plain socket, or not a contiguous bytes-like object: sendall
    then raises what it raises)."""
    cdef Py_buffer view
    cdef ssize_t n
    cdef int err
    cdef int fd = _plain_fd(sock)
    if fd < 0 or not PyObject_CheckBuffer(b):
        return -2
    try:
        PyObject_GetBuffer(b, &view, PyBUF_SIMPLE)
    except (BufferError, TypeError):
        return -2       # sendall raises its own error for it
    n = c_send(fd, view.buf, <size_t>view.len, MSG_DONTWAIT)
    err = errno
    PyBuffer_Release(&view)
    if n >= 0:
        return n
    if err == EAGAIN or err == EWOULDBLOCK or err == EINTR:
        return 0
    raise_errno(err)


@cython.auto_pickle(False)
@cython.final
cdef class SocketReader:
    """The raw, read-only stream of a connected socket: what
    ``socket.SocketIO(sock, "rb")`` is, holding the reference that
    ``sock.makefile("rb")`` takes (``sock.close()`` closes the descriptor
    only once this is closed too).  A timeout leaves it unreadable, as
    SocketIO does; a non-blocking socket with nothing to read gives None.
    """

    cdef object _sock
    cdef bint _closed
    cdef bint _timeout_occurred

    def __cinit__(self, sock):
        sock._io_refs += 1
        self._sock = sock

    def __del__(self):
        # IOBase closes an object nobody closed when it is collected
        try:
            self.close()
        except Exception:
            pass

    def readinto(self, b):
        """Read into the writable buffer b; the number of bytes read (0 at
        end of stream), or None when a non-blocking socket has none."""
        _check_open(self._closed)
        if self._timeout_occurred:
            raise OSError("cannot read from timed out object")
        n = _recv_now(self._sock, b)
        if n >= 0:
            return n
        try:
            return self._sock.recv_into(b)
        except _socket_timeout:
            self._timeout_occurred = True
            raise
        except OSError as exc:
            if exc.errno in _BLOCKING_ERRNOS:
                return None
            raise

    def read(self, Py_ssize_t size=-1):
        """At most size bytes from one read (size < 0: until end of stream)."""
        if size < 0:
            return self.readall()
        buf = bytearray(size)
        n = self.readinto(buf)
        if n is None:
            return None
        del buf[n:]
        return bytes(buf)

    def readall(self):
        """Everything until end of stream."""
        out = bytearray()
        while True:
            data = self.read(_CHUNK)
            if data is None:
                return bytes(out) if out else None
            if not data:
                return bytes(out)
            out += data

    def readline(self, Py_ssize_t size=-1):
        """One line, read a byte at a time (as IOBase does for a raw stream
        that cannot peek)."""
        out = bytearray()
        while size < 0 or len(out) < size:
            b = self.read(1)
            if not b:
                break
            out += b
            if b == b"\n":
                break
        return bytes(out)

    def readlines(self, Py_ssize_t hint=-1):
        lines, total = [], 0
        for line in self:
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        _check_open(self._closed)
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def write(self, b):
        _check_open(self._closed)
        raise _Unsupported("File or stream is not writable.")

    def readable(self):
        _check_open(self._closed, "socket")
        return True

    def writable(self):
        _check_open(self._closed, "socket")
        return False

    def seekable(self):
        _check_open(self._closed, "socket")
        return False

    def seek(self, pos, whence=0):
        raise _Unsupported("seek")

    def tell(self):
        raise _Unsupported("seek")

    def truncate(self, pos=None):
        raise _Unsupported("truncate")

    def isatty(self):
        _check_open(self._closed)
        return False

    def flush(self):
        _check_open(self._closed)

    def fileno(self):
        _check_open(self._closed)
        return self._sock.fileno()

    @property
    def name(self):
        return -1 if self._closed else self.fileno()

    @property
    def mode(self):
        return "rb"

    @property
    def closed(self):
        return self._closed

    def close(self):
        """Close it and give the socket back its reference: the socket's
        descriptor closes now if ``sock.close()`` was called already."""
        if self._closed:
            return
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:        # (None: its construction failed)
            sock._decref_socketios()

    def __enter__(self):
        _check_open(self._closed)
        return self

    def __exit__(self, *exc_info):
        self.close()


@cython.auto_pickle(False)
@cython.final
cdef class SocketWriter:
    """The unbuffered write stream of a connected socket, as the stdlib's
    ``socketserver._SocketWriter``: ``write()`` is ``sendall()`` and
    returns the byte count; closing it leaves the socket alone (and, as
    there, ``write()`` does not look at ``closed``)."""

    cdef object _sock
    cdef bint _closed

    def __cinit__(self, sock):
        self._sock = sock

    def write(self, b):
        """Send all of b; its length in bytes."""
        cdef Py_ssize_t sent = _send_now(self._sock, b)
        if sent < 0:
            self._sock.sendall(b)
        elif type(b) is bytes and sent == len(<bytes>b):
            return sent             # all at once: the common case
        with memoryview(b) as view:
            if 0 <= sent < view.nbytes:
                # the rest, without copying it
                with view.cast("B") as octets:
                    self._sock.sendall(octets[sent:])
            return view.nbytes

    def writelines(self, lines):
        _check_open(self._closed)
        for line in lines:
            self.write(line)

    def writable(self):
        return True

    def readable(self):
        return False

    def seekable(self):
        return False

    def read(self, size=-1):
        raise _Unsupported("read")

    def read1(self, size=-1):
        raise _Unsupported("read1")

    def readinto(self, b):
        raise _Unsupported("read")

    def readinto1(self, b):
        raise _Unsupported("read1")

    def detach(self):
        raise _Unsupported("detach")

    def seek(self, pos, whence=0):
        raise _Unsupported("seek")

    def tell(self):
        raise _Unsupported("seek")

    def truncate(self, pos=None):
        raise _Unsupported("truncate")

    def isatty(self):
        _check_open(self._closed)
        return False

    def flush(self):
        _check_open(self._closed)

    def fileno(self):
        return self._sock.fileno()

    @property
    def closed(self):
        return self._closed

    def close(self):
        self._closed = True

    def __enter__(self):
        _check_open(self._closed)
        return self

    def __exit__(self, *exc_info):
        self.close()


_io.RawIOBase.register(SocketReader)
_io.BufferedIOBase.register(SocketWriter)
