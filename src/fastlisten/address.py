"""Addresses: parsed, checked and made numeric in one place.

Every address a fastlisten listener, socketserver class, the command line or
the benchmark is given goes through this module, so the rules and the
messages are the same everywhere:

- **TCP**: a ``(host, port)`` tuple (IPv6 may add flowinfo and scope id, as
  ``socket.bind`` takes it) or, as a string, ``HOST:PORT``, ``[IPv6]:PORT``,
  ``:PORT`` (every interface) or ``PORT``.  The host is an IPv4/IPv6 address
  or a name (resolved with ``getaddrinfo(AI_PASSIVE)`` when binding); ``''``
  means every interface.  One rule everywhere: no host at all (``PORT``
  alone, or ``port=`` without ``host=``) means loopback only, 127.0.0.1
  (``::1`` for IPv6); an empty one (``:PORT``, ``''``) every interface.  The
  port is an ``int`` 0-65535 (``bool`` is refused, as it is almost always a
  mistake); 0 lets the kernel choose.  A URL (``http://host:port``) is
  refused with the ``HOST:PORT`` to write instead.
- **Unix sockets**: ``bytes`` or an ``os.PathLike`` are always paths; a
  ``str`` is a path when it starts with ``unix:`` (which is stripped) or
  contains a ``/``, or when the family is already known to be AF_UNIX
  (``family="unix"``).  So ``"localhost:8080"`` is TCP and never silently
  becomes a socket file; write ``"./app.sock"`` or ``"unix:app.sock"`` for a
  file in the current directory.  A leading NUL byte names Linux's abstract
  namespace.  At most 108 bytes (``sizeof(sun_path)``, the standard
  library's limit); a file-system path may not contain a NUL byte.
- **A socketserver server's** ``server_address`` is read as ``socket.bind``
  reads it (``split(..., literal=True)``): no text notation; a TCP server
  takes a tuple only (a ``str`` is a TypeError naming it, the type the
  standard library raises) and a Unix server takes any path as written.

Mistakes raise what the standard library raises for them (``TypeError``,
``OverflowError`` for a port out of range, ``ValueError``,
``OSError(EINVAL)`` for a path that is too long, ``OSError(EAFNOSUPPORT)``
for an unknown family), naming the value, before any descriptor is opened.
The cores repeat only the checks that must sit next to the system call, by
calling the functions here.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from typing import Any, Dict, Optional, Tuple, Union
from urllib.parse import urlsplit

__all__ = [
    "UNIX_PATH_MAX", "FAMILIES", "Address", "check_port", "check_family", "family_name",
    "unix_path", "check_numeric", "decode_unix_path", "numeric_family", "parse", "split",
    "check_inet_tuple", "resolve", "format_address",
]

#: sizeof(struct sockaddr_un.sun_path) on Linux: the longest Unix socket
#: address, abstract or not (the socket module's limit too).
UNIX_PATH_MAX = 108

#: The families fastlisten listens on.
FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)

_FAMILY_NAMES = {
    "ipv4": socket.AF_INET, "inet": socket.AF_INET, "4": socket.AF_INET,
    "ipv6": socket.AF_INET6, "inet6": socket.AF_INET6, "6": socket.AF_INET6,
    "unix": socket.AF_UNIX,
}

#: What ``socket.bind`` takes: (host, port[, flowinfo, scope_id]) or a path.
Address = Union[Tuple[Any, ...], str, bytes, "os.PathLike[str]"]


def family_name(family: Any) -> str:
    """AF_INET, AF_INET6, AF_UNIX... or the value's repr."""
    try:
        return socket.AddressFamily(family).name
    except (ValueError, TypeError):
        return repr(family)


def check_family(family: Any) -> socket.AddressFamily:
    """An address family fastlisten listens on, from ``socket.AF_*`` or one
    of the names "ipv4", "ipv6", "unix"."""
    if isinstance(family, str):
        if family.lower() not in _FAMILY_NAMES:
            raise ValueError(f"family must be one of ipv4, ipv6, unix (or socket.AF_*), "
                             f"not {family!r}")
        family = _FAMILY_NAMES[family.lower()]
    elif isinstance(family, bool) or not isinstance(family, int):
        raise TypeError(f"family must be an address family, not {type(family).__name__}: "
                        f"{family!r}")
    if family not in FAMILIES:
        raise OSError(errno.EAFNOSUPPORT,
                      f"{os.strerror(errno.EAFNOSUPPORT)}: family {family_name(family)} "
                      "(use AF_INET, AF_INET6 or AF_UNIX)")
    return socket.AddressFamily(family)


def check_port(port: Any) -> int:
    """A TCP port: an int 0-65535 (TypeError for anything else, bool included;
    OverflowError out of range, as ``socket.bind`` raises)."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an integer 0-65535, not {type(port).__name__}: "
                        f"{port!r}")
    if not 0 <= port <= 65535:
        raise OverflowError(f"port must be 0-65535, not {port}")
    return int(port)


def unix_path(path: Any) -> bytes:
    """A Unix socket address as the bytes bind() takes, checked: str,
    bytes(-like) or os.PathLike; not empty; no NUL inside a file-system path
    (a leading NUL is the abstract namespace); at most UNIX_PATH_MAX bytes."""
    if isinstance(path, (bytearray, memoryview)):
        path = bytes(path)
    elif hasattr(path, "__fspath__"):
        path = os.fspath(path)
    if isinstance(path, str):
        raw = os.fsencode(path)
    elif isinstance(path, bytes):
        raw = path
    else:
        raise TypeError(f"a Unix socket path must be str, bytes or os.PathLike, "
                        f"not {type(path).__name__}: {path!r}")
    if not raw:
        raise ValueError("a Unix socket path must not be empty (a leading NUL means an "
                         "abstract socket: b'\\0name')")
    if raw[:1] != b"\0" and b"\0" in raw:
        raise ValueError(f"embedded null byte in Unix socket path {path!r}")
    if len(raw) > UNIX_PATH_MAX:
        raise OSError(errno.EINVAL, f"AF_UNIX path too long ({len(raw)} bytes, the limit "
                                    f"is {UNIX_PATH_MAX}): {path!r}")
    return raw


def check_numeric(family: int, address: Any) -> Any:
    """An address as the cores bind it, checked: a numeric ``(host, port)``
    (IPv6: up to ``(host, port, flowinfo, scope_id)``) or, for AF_UNIX,
    the path as checked bytes.  Names are resolve()'s job, not the cores'."""
    if family in (socket.AF_INET, socket.AF_INET6):
        if not isinstance(address, tuple) or len(address) < 2:
            raise TypeError(f"an {family_name(family)} address must be a (host, port) tuple, "
                            f"not {address!r}")
        host = address[0]
        check_port(address[1])
        if family == socket.AF_INET6 and len(address) > 4:
            raise TypeError(f"an AF_INET6 address has at most 4 items, not {address!r}")
        if family == socket.AF_INET and len(address) > 2:
            raise TypeError(f"an AF_INET address is (host, port), not {address!r}")
        try:
            socket.inet_pton(family, host)
        except (OSError, TypeError, ValueError):
            kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
            raise ValueError(f"not a numeric {kind} address: {host!r}") from None
        return address
    if family == socket.AF_UNIX:
        return unix_path(address)
    raise OSError(errno.EAFNOSUPPORT, f"unsupported address family: {family_name(family)}")


def decode_unix_path(raw: bytes) -> Union[str, bytes]:
    """A Unix socket address as the socket module reports it: abstract names
    stay bytes, file-system paths become str."""
    if raw[:1] == b"\0":
        return raw
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    return os.fsdecode(raw)


def numeric_family(host: str) -> Optional[socket.AddressFamily]:
    """AF_INET or AF_INET6 if ``host`` is a numeric address of that family
    (an IPv6 one may carry a ``%scope``), else None (a name)."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return socket.AF_INET
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return socket.AF_INET6
    except OSError:
        return None


def check_host(host: Any) -> str:
    """A host: a str that can be an address or a name ('' means every interface)."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str (an address, a name, or '' for every "
                        f"interface), not {type(host).__name__}: {host!r}")
    if "\0" in host or host.strip() != host or len(host) > 253 + 16:
        raise ValueError(f"host {host!r} is not an address or a host name")
    return host


def parse(text: str) -> Dict[str, Any]:
    """``host``/``port`` or ``path`` keywords from an address written as text.

    ``127.0.0.1:4481`` and ``[::1]:4481`` give host and port; ``:4481``
    every interface (host ''); ``4481`` alone, no host, loopback (the port
    only: ListenConfig's default host); ``unix:/run/app.sock`` or anything
    with a ``/`` a Unix socket path.  Raises ValueError naming what is
    wrong with a malformed one, and for a URL what to write instead.
    """
    if not isinstance(text, str):
        raise TypeError(f"an address must be a str here, not {type(text).__name__}: {text!r}")
    if text.startswith("unix:"):
        return {"path": text[5:]}
    if _URL.match(text):
        raise ValueError(_not_a_url(text))
    if "/" in text:
        return {"path": text}
    host: Optional[str]
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ValueError(f"address {text!r}: write IPv6 as [address]:port, "
                             "e.g. [::1]:4481")
        host, port_text = text[1:close], text[close + 2:]
    elif text.count(":") > 1:
        raise ValueError(f"address {text!r}: write IPv6 as [address]:port, e.g. [::1]:4481")
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    elif text.isdigit():
        return {"port": check_port(int(text, 10))}      # no host: loopback
    else:
        unix = "" if not text or numeric_family(text) else (
            f", or ./{text} or unix:{text} for a Unix socket")
        raise ValueError(f"address {text!r}: no port given. Write HOST:PORT "
                         f"(e.g. {text or '127.0.0.1'}:4481) for TCP{unix}")
    if not port_text.isdigit():
        raise ValueError(f"address {text!r}: the port must be a number 0-65535, "
                         f"not {port_text!r}")
    return {"host": host, "port": check_port(int(port_text, 10))}


#: A URL's scheme and "//": text that names a protocol, not where to listen.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _not_a_url(text: str) -> str:
    """What to say about a URL given as an address: the HOST:PORT (or Unix
    path) to write instead, taken from the URL where it says."""
    scheme = text.split(":", 1)[0].lower()
    try:
        url = urlsplit(text)
        host, port, path = url.hostname, url.port, url.path
    except ValueError:
        host, port, path = None, None, ""
    if scheme in ("unix", "file") and path:
        return (f"address {text!r} is a URL; an address says where to listen: write "
                f"unix:{path} for that Unix socket")
    host = host or "127.0.0.1"
    instead = f"{f'[{host}]' if ':' in host else host}:{'PORT' if port is None else port}"
    return (f"address {text!r} is a URL; an address says where to listen: write {instead} "
            "(HOST:PORT; :PORT for every interface, unix:PATH for a Unix socket)")


def split(address: Any, family: Optional[int] = None, *,
          literal: bool = False) -> Dict[str, Any]:
    """``host``/``port`` or ``path`` keywords (for ListenConfig) from an
    address in any form this module takes: a tuple (an IPv6 4-tuple's scope
    id becomes ``host%scope``), bytes or a path-like (a Unix path), or text
    (see parse(); with ``family`` AF_UNIX any str is a path, ``unix:``
    stripped).

    ``literal``: the address as ``socket.bind`` takes it, as a socketserver
    server's ``server_address`` is: a str is never parsed as text, so it is
    a Unix path as written, and an AF_INET/AF_INET6 address must be a tuple
    (see check_inet_tuple())."""
    if isinstance(address, tuple):
        if len(address) not in (2, 4):
            raise TypeError(f"address must be (host, port) or a path, not {address!r}")
        host = check_host(address[0])
        port = check_port(address[1])
        if len(address) == 4 and address[3]:
            host = f"{host}%{address[3]}"
        return {"host": host, "port": port}
    if literal:
        check_inet_tuple(family, address)
    elif isinstance(address, str):
        if address.startswith("unix:"):
            return {"path": address[5:]}
        if family != socket.AF_UNIX:
            return parse(address)
    if isinstance(address, (str, bytes, bytearray, memoryview)) or hasattr(address, "__fspath__"):
        return {"path": address}
    raise TypeError(f"address must be a (host, port) tuple or a path, "
                    f"not {type(address).__name__}: {address!r}")


def check_inet_tuple(family: Optional[int], address: Any) -> None:
    """For an AF_INET or AF_INET6 ``family``, raise TypeError (what
    ``socket.bind`` raises) naming ``address`` unless it is a tuple; a
    string never becomes a Unix socket file behind the caller's back."""
    if family not in (socket.AF_INET, socket.AF_INET6) or isinstance(address, tuple):
        return
    hint = ""
    if isinstance(address, str):
        hint = (" (text such as 'HOST:PORT' is read by fastlisten.listen() and the "
                "command line; a Unix socket needs a Unix server or family AF_UNIX)")
    raise TypeError(f"an {family_name(family)} address must be a (host, port) tuple, "
                    f"not {type(address).__name__}: {address!r}{hint}")


def resolve(family: int, address: Any) -> Any:
    """A bind address in the numeric form the core takes: (host, port, ...)
    with the host made numeric, or a Unix path as checked bytes.

    '' means every interface, as in the socket module; names go through
    getaddrinfo(AI_PASSIVE).
    """
    if family == socket.AF_UNIX:
        return unix_path(address)
    check_family(family)
    check_inet_tuple(family, address)
    if len(address) < 2:
        raise TypeError(f"an {family_name(family)} address must be a (host, port) tuple, "
                        f"not {address!r}")
    if family == socket.AF_INET6 and len(address) > 4:
        raise TypeError(f"an AF_INET6 address has at most 4 items, not {address!r}")
    if family == socket.AF_INET and len(address) > 2:
        raise TypeError(f"an AF_INET address is (host, port), not {address!r}")
    host, port, rest = check_host(address[0]), check_port(address[1]), tuple(address[2:])
    if host == "":
        return ("0.0.0.0" if family == socket.AF_INET else "::", port) + rest
    if "%" not in host or family != socket.AF_INET6:
        try:
            socket.inet_pton(family, host)
            return (host, port) + rest
        except OSError:
            pass
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as exc:
        kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
        raise socket.gaierror(exc.errno, f"{exc.strerror}: no {kind} address for "
                                         f"host {host!r}") from None
    sockaddr = infos[0][4]
    if family == socket.AF_INET6 and not rest:
        rest = tuple(sockaddr[2:])
    return (sockaddr[0], port) + rest


def format_address(address: Any) -> str:
    """An address as people write it: 127.0.0.1:80, [::1]:80, or a path."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if isinstance(host, str) and ":" in host:
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    if isinstance(address, bytes):
        return repr(address) if address[:1] == b"\0" else os.fsdecode(address)
    return str(os.fspath(address)) if hasattr(address, "__fspath__") else str(address)
