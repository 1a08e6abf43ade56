# The PROXY protocol: bindings over csrc/fl_proxy.c, included into
# fastlisten._core.  fastlisten.proxy has the header class, the error table
# and the argument checks both cores share; fastlisten._corepy has the
# pure-Python twin of proxy_parse and proxy_read.

from libc.errno cimport EAGAIN
from fastlisten.includes.system cimport EINTR
from fastlisten.includes.fl_proxy cimport (
    fl_proxy_hdr, fl_proxy_parse, fl_proxy_take, fl_proxy_wait, fl_crc32c,
    FL_PROXY_V1_MAX, FL_PROXY_AF_INET, FL_PROXY_AF_INET6,
)
from fastlisten import proxy as _proxy

cdef object _proxy_error = _proxy.error
cdef object _proxy_check = _proxy.check_args
cdef object _ProxyHeader = _proxy.ProxyHeader
cdef object _proxy_unix = _proxy.unix_address
cdef tuple _PROXY_FAMILIES = _proxy.FAMILIES
cdef tuple _PROXY_TRANSPORTS = _proxy.TRANSPORTS
cdef long _PROXY_MIN_MAX_V2 = _proxy.MIN_MAX_V2
cdef long _PROXY_V2_LIMIT = _proxy.V2_LIMIT
cdef int _PROXY_E_EOF = _proxy.E_EOF
cdef int _PROXY_E_TIMEOUT = _proxy.E_TIMEOUT


cdef inline str _ip_text(int af, const unsigned char *raw):
    cdef char text[64]
    inet_ntop(af, raw, text, sizeof(text))
    return text.decode('ascii')


cdef object _proxy_address(fl_proxy_hdr *h, const unsigned char *buf,
                           const unsigned char *ip, unsigned int port, size_t unix_at):
    if h.family == FL_PROXY_AF_INET:
        return (_ip_text(AF_INET, ip), port)
    if h.family == FL_PROXY_AF_INET6:
        return (_ip_text(AF_INET6, ip), port, 0, 0)
    return _proxy_unix((<const char *>buf)[unix_at:unix_at + 108])


cdef object _proxy_header(const unsigned char *buf, fl_proxy_hdr *h):
    """The ProxyHeader for what fl_proxy_parse found in buf (what
    fastlisten.proxy.build makes for the pure-Python parser)."""
    cdef size_t i, n
    cdef list tlvs
    source = destination = None
    if h.has_addresses:
        source = _proxy_address(h, buf, h.src, h.src_port, h.src_unix)
        destination = _proxy_address(h, buf, h.dst, h.dst_port, h.dst_unix)
    found = ()
    if h.tlv_end > h.tlv_start:
        tlvs = []
        i = h.tlv_start
        while i < h.tlv_end:         # checked well formed by fl_proxy_parse
            n = (<size_t>buf[i + 1] << 8) | buf[i + 2]
            tlvs.append((buf[i], (<const char *>buf)[i + 3:i + 3 + n]))
            i += 3 + n
        found = tuple(tlvs)
    return _ProxyHeader(h.version, 'PROXY' if h.command else 'LOCAL',
                        _PROXY_FAMILIES[h.family], _PROXY_TRANSPORTS[h.transport],
                        source, destination, found, h.length)


def proxy_parse(data, int versions=3, max_v2=_proxy.DEFAULT_MAX_V2):
    """Parse a PROXY protocol header at the start of ``data`` (bytes-like).

    Returns a :class:`fastlisten.proxy.ProxyHeader` when data starts with a
    complete valid header (``header.length`` bytes of it; the rest is the
    client's), None when data is a valid beginning of one (more bytes are
    needed), and raises :class:`fastlisten.proxy.ProxyProtocolError` when it
    is not and cannot become one.  ``versions``: V1, V2 or V1 | V2;
    ``max_v2``: the largest v2 header accepted, in bytes.
    """
    cdef fl_proxy_hdr h
    cdef long r
    cdef bytes buf
    cdef const unsigned char *p
    _proxy_check(versions, max_v2)
    buf = data if type(data) is bytes else bytes(data)
    p = <const unsigned char *><const char *>buf
    r = fl_proxy_parse(p, len(buf), versions, <size_t>max_v2, &h, NULL)
    if r < 0:
        raise _proxy_error(r, buf)
    if r == 0:
        return None
    return _proxy_header(p, &h)


def proxy_read(sock, int versions=3, timeout=_proxy.DEFAULT_TIMEOUT,
               max_v2=_proxy.DEFAULT_MAX_V2):
    """Read one PROXY protocol header from the connected socket ``sock``.

    Takes only the header's bytes (v1: nothing past its CRLF; v2: nothing
    past 16 + its length), whatever the socket's blocking mode, and waits
    at most ``timeout`` seconds in all (None: for ever), without the GIL.
    Raises :class:`fastlisten.proxy.ProxyProtocolError` for a bad header,
    one that does not arrive in time (reason 'timeout') or a connection
    closed before a complete header ('eof'); OSError for a failing socket.
    Signals interrupt the wait; their handlers run and it goes on.
    """
    cdef fl_proxy_hdr h
    cdef long n = 0, r
    cdef int w = 0, err = 0, ms, fd
    cdef double deadline = 0.0
    cdef size_t have = 0, cap
    cdef unsigned char small[512]
    cdef unsigned char *buf = small
    if not (1 <= versions <= 3 and type(max_v2) is int
            and _PROXY_MIN_MAX_V2 <= max_v2 <= _PROXY_V2_LIMIT):
        _proxy_check(versions, max_v2)      # the common case needs no Python call
    if type(timeout) is float and 0.0 <= <double>timeout <= 1e6:
        ms = <int>ceil(<double>timeout * 1000.0)
    else:
        ms = timeout_ms(timeout)            # checks and explains anything else
    if timeout is not None:
        deadline = _now() + <double>timeout
    fd = sock.fileno()
    cap = <size_t>max_v2 if <size_t>max_v2 > FL_PROXY_V1_MAX else FL_PROXY_V1_MAX
    if cap > sizeof(small):
        buf = <unsigned char *>malloc(cap)
        if buf == NULL:
            raise MemoryError()
    try:
        while True:
            # MSG_DONTWAIT: this never blocks, so the GIL is kept (releasing
            # it for a few microseconds would only invite a hand-over)
            n = fl_proxy_take(fd, buf, cap, &have)
            err = errno
            if n == 0:
                raise _proxy_error(_PROXY_E_EOF, (<char *>buf)[:have])
            if n > 0:
                r = fl_proxy_parse(buf, have, versions, <size_t>max_v2, &h, NULL)
                if r > 0:
                    return _proxy_header(buf, &h)
                if r < 0:
                    raise _proxy_error(r, (<char *>buf)[:have])
                continue        # more may have arrived already
            if err != EAGAIN:     # EWOULDBLOCK is EAGAIN on Linux
                raise_errno(err)
            if timeout is not None:
                ms = _ms_until(deadline)
            w = 0
            if ms != 0:
                with nogil:
                    w = fl_proxy_wait(fd, ms)
                    err = errno
            if w < 0:
                if err != EINTR:
                    raise_errno(err)
                PyErr_CheckSignals()     # PEP 475: handlers run, may raise
            elif w == 0 and timeout is not None and deadline - _now() <= 0:
                raise _proxy_error(_PROXY_E_TIMEOUT, (<char *>buf)[:have])
    finally:
        if buf != small:
            free(buf)


def crc32c(data, unsigned int crc=0):
    """CRC32C (Castagnoli, RFC 4960 appendix B) of ``data`` (bytes-like),
    continuing from ``crc``: what a v2 header's CRC32C TLV holds."""
    cdef bytes buf = data if type(data) is bytes else bytes(data)
    return fl_crc32c(crc, <const unsigned char *><const char *>buf, len(buf))
