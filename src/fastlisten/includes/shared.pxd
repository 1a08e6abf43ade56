# Helpers compiled into both extensions (fastlisten._core and
# fastlisten.benchmark._native): the one way the C side raises an errno,
# and the conversion of a checked, numeric Python address to a sockaddr.
# Address *rules* (ports, Unix path limits, messages) live in
# fastlisten.address; these functions only call them.

from cpython.exc cimport PyErr_SetFromErrno
from libc.string cimport memset, memcpy

from fastlisten.includes.system cimport (
    sockaddr_storage, sockaddr_in, sockaddr_in6, sockaddr_un, socklen_t,
    AF_INET, AF_INET6, AF_UNIX, htons, htonl, inet_pton, errno,
)


cdef inline int raise_errno(int err, str message=None) except -1:
    """Raise the OSError subclass the stdlib would raise for err: with
    strerror (as socket's own methods do), or with ``message`` where a
    caller has more to say."""
    if message is not None:
        raise OSError(err, message)
    errno = err
    PyErr_SetFromErrno(OSError)
    return -1


cdef inline int addr_from_py(int family, object address, sockaddr_storage *ss,
                             socklen_t *addrlen) except -1:
    """Fill ss from a numeric address, checked first by
    fastlisten.address.check_numeric (the one set of rules and messages)."""
    from fastlisten.address import check_numeric
    cdef sockaddr_in *sin
    cdef sockaddr_in6 *sin6
    cdef sockaddr_un *sun
    cdef bytes raw
    address = check_numeric(family, address)
    memset(ss, 0, sizeof(sockaddr_storage))
    if family == AF_INET:
        sin = <sockaddr_in *>ss
        sin.sin_family = AF_INET
        sin.sin_port = htons(<unsigned short>address[1])
        inet_pton(AF_INET, address[0].encode('ascii'), &sin.sin_addr)
        addrlen[0] = sizeof(sockaddr_in)
    elif family == AF_INET6:
        sin6 = <sockaddr_in6 *>ss
        sin6.sin6_family = AF_INET6
        sin6.sin6_port = htons(<unsigned short>address[1])
        sin6.sin6_flowinfo = htonl(address[2] if len(address) > 2 else 0)
        sin6.sin6_scope_id = address[3] if len(address) > 3 else 0
        inet_pton(AF_INET6, address[0].encode('ascii'), &sin6.sin6_addr)
        addrlen[0] = sizeof(sockaddr_in6)
    else:
        raw = address        # AF_UNIX: at most sizeof(sun_path) bytes
        sun = <sockaddr_un *>ss
        sun.sun_family = AF_UNIX
        memcpy(sun.sun_path, <char *>raw, len(raw))
        addrlen[0] = <socklen_t>(<char *>sun.sun_path - <char *>sun) + len(raw)
    return 0
