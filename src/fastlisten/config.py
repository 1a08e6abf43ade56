"""One validated listener configuration: :class:`ListenConfig`.

Every option of a fastlisten listener is defined and checked here, once, and
used by ``fastlisten.listen(...)``, the socketserver classes and the command
line alike::

    cfg = ListenConfig(host="127.0.0.1", port=0, nodelay=True)
    lst = fastlisten.Listener.from_config(cfg)      # or fastlisten.listen(...)

A bad value raises what the standard library raises for the same mistake
(``TypeError`` for a wrong type, ``OverflowError`` for a port outside
0-65535 or an int too big for C, ``ValueError`` for other out-of-range or
contradictory values, ``OSError(ENOPROTOOPT)`` for an option this platform
lacks), naming the value.  Building a ListenConfig opens nothing, so a bad
value can never leak a descriptor.

For code that owns its own ``socket.socket`` (socketserver's
``server_bind``), :meth:`ListenConfig.apply_listener_options` sets the
listener's options on it before bind, and
:meth:`ListenConfig.apply_connection_options` sets TCP_NODELAY/keep-alive on
each accepted connection.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import math
import os
import socket
import ssl
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, List, NamedTuple, Optional, Tuple, Union

from fastlisten import address as _address

_log = logging.getLogger("fastlisten")

__all__ = ["ListenConfig", "ProxySettings", "ReadySettings", "TLSSettings", "systemd_fds",
           "check_backlog", "check_int", "check_seconds", "option_fields"]

_C_INT_MAX = 2**31 - 1

#: Options that only mean something for TCP.
_TCP_ONLY = ("reuse_port", "nodelay", "keepalive", "defer_accept", "fastopen")

#: (level, option, value, "name=value") for setsockopt
Opt = Tuple[int, int, int, str]

#: Linux copies a listener's TCP_NODELAY and SO_KEEPALIVE (with its timer)
#: into every connection accept() returns (sk_clone_lock copies the socket,
#: tcp_create_openreq_child arms keep-alive), so setting them once on the
#: listener costs no system call per connection.
_ACCEPT_INHERITS = sys.platform.startswith("linux")


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A ListenConfig field with its one-line description; ``cli`` says how
    the command line spells it (``flag``, ``metavar``, ``type``, ``choices``),
    where that differs from the field's name and type."""
    return field(default=default, metadata={"help": help, **cli})


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}: {value!r}")


def check_int(name: str, value: Any, low: int, high: int = _C_INT_MAX,
              what: str = "") -> int:
    """An int option in [low, high]: TypeError, ValueError below, OverflowError above.
    ``name`` is what the message calls it (a field, a keyword, a flag such
    as ``--threads``); ``what`` follows the bound (`` (connections)``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool):     # True is no count of anything
                raise AttributeError
            value = value.__index__()
        except AttributeError:
            raise TypeError(
                f"{name} must be an integer{what}, not {type(value).__name__}: {value!r}"
            ) from None
    if value > high:
        raise OverflowError(f"{name}={value} is too large: the largest is {high}")
    if value < low:
        if value < -_C_INT_MAX - 1:
            raise OverflowError(f"{name}={value} is too small for a C int")
        raise ValueError(f"{name}={value} is out of range: {name} must be at least {low}{what}")
    return int(value)


def check_backlog(backlog: Any) -> int:
    """A listen() backlog checked as ``socket.listen`` checks it: an integer
    (else TypeError) that fits a C int (else OverflowError); a negative one
    is clamped to 0."""
    if isinstance(backlog, bool):
        backlog = int(backlog)      # socket.listen(True) is listen(1)
    return max(check_int("backlog", backlog, -_C_INT_MAX - 1), 0)


def _platform_option(option: str, constant: str) -> int:
    value = getattr(socket, constant, None)
    if value is None:
        raise OSError(errno.ENOPROTOOPT,
                      f"{os.strerror(errno.ENOPROTOOPT)}: {option} needs socket.{constant}, "
                      "which this platform does not have (Linux has it)")
    return value


def systemd_fds(unset_environment: bool = True) -> List[int]:
    """Descriptors passed by systemd-style socket activation.

    The parent sets ``LISTEN_PID`` to this process's pid and ``LISTEN_FDS``
    to how many descriptors it passed, numbered from 3 (sd_listen_fds(3)).
    Returns ``[3, 4, ...]``, or [] when nothing was passed to *this*
    process.  The variables are removed from the environment by default so
    that child processes do not take the descriptors for theirs, and, as
    sd_listen_fds() does, the descriptors are made close-on-exec.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    fds = list(range(3, 3 + max(n, 0)))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass    # not open: adopting it will say so
    return fds


#: The values of ``proxy_protocol`` and the versions they accept (fastlisten.proxy.V1/V2).
PROXY_PROTOCOLS = {"v1": 1, "v2": 2, "v1+v2": 3}
#: Who may send a PROXY header unless ``trusted_proxies`` says otherwise.
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ProxySettings(NamedTuple):
    """The PROXY protocol part of a ListenConfig, resolved (defaults filled
    in): what the server classes use for each connection."""

    versions: int                   #: fastlisten.proxy.V1, V2 or V1 | V2
    trusted: Tuple[Network, ...]    #: networks a header is accepted from
    timeout: float                  #: seconds to wait for the complete header
    max_v2: int                     #: largest v2 header accepted, bytes

    def trusts(self, peer: Any) -> bool:
        """True when the connection's real peer (a socket module address)
        may send a PROXY header: its IP is in ``trusted``, or it is a Unix
        socket peer (a local process; the socket file's mode decides who
        can connect).  An IPv4-mapped IPv6 peer counts as its IPv4 address."""
        if not isinstance(peer, tuple):
            return True         # AF_UNIX: '' or a path
        try:
            ip = ipaddress.ip_address(peer[0].partition("%")[0])
        except (ValueError, TypeError, IndexError, AttributeError):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted)


#: The readiness rules of ``ready_rule`` (fastlisten's accept filter).
READY_RULES = ("none", "data", "line", "http", "tls")


class ReadySettings(NamedTuple):
    """The accept-filter part of a ListenConfig, resolved (defaults filled
    in, the PROXY part taken from the config's ``proxy_protocol``): the
    arguments of ``Listener.set_accept_filter``."""

    rule: str                       #: 'none', 'data', 'line', 'http' or 'tls'
    timeout: float                  #: seconds from accept to ready
    max_bytes: int                  #: longest line / request head, bytes
    max_waiting: Optional[int]      #: cap on waiting connections (None: from headroom)
    proxy: int                      #: PROXY versions required first (0: none)
    proxy_max_v2: int               #: largest PROXY v2 header accepted, bytes
    min_rate: int = 0               #: bytes per second below which a waiting one is closed


#: Seconds a TLS handshake may take in all unless ``handshake_timeout`` says otherwise.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


def server_side_context(context: Any) -> bool:
    """True when ``context`` is an ssl.SSLContext that can wrap the server
    side of a connection: not a client context (PROTOCOL_TLS_CLIENT, or
    ``check_hostname`` on, as ``ssl.create_default_context()`` makes on
    every version), which ``wrap_socket(server_side=True)`` refuses."""
    return (isinstance(context, ssl.SSLContext)
            and context.protocol != ssl.PROTOCOL_TLS_CLIENT and not context.check_hostname)


class TLSSettings(NamedTuple):
    """The TLS part of a ListenConfig, resolved: what the server classes use
    for each connection."""

    context: ssl.SSLContext         #: the server-side context each connection is wrapped with
    handshake_timeout: float        #: seconds the whole handshake may take


def _check_networks(value: Any) -> Tuple[Network, ...]:
    """``trusted_proxies``: CIDRs (or addresses) as a comma-separated str or
    an iterable of str/ipaddress networks; host bits set is an error."""
    if isinstance(value, str):
        items: Iterable[Any] = [v.strip() for v in value.split(",")]
    elif isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise TypeError(f"trusted_proxies must be CIDRs (a comma-separated str or a "
                            f"list of str), not {type(value).__name__}: {value!r}") from None
    nets = []
    for item in items:
        if not isinstance(item, (str, ipaddress.IPv4Network, ipaddress.IPv6Network)):
            raise TypeError(f"trusted_proxies: {item!r} is not a CIDR str such as "
                            f"'10.0.0.0/8' ({type(item).__name__})")
        try:
            nets.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {item!r} is not a network: {exc}") from None
    if not nets:
        raise ValueError(f"trusted_proxies={value!r} trusts nobody: every connection would "
                         "be dropped (give at least one network, or leave it unset for "
                         "loopback only)")
    return tuple(nets)


def check_seconds(name: str, value: Any, zero: bool = False) -> float:
    """A duration: a finite number of seconds, more than 0 (or, with
    ``zero``, at least 0); TypeError or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not "
                        f"{type(value).__name__}: {value!r}")
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name}={value!r} is out of range: {name} must be "
                         f"{'>= 0' if zero else '> 0'} (a finite number of seconds)")
    return float(value)



@dataclass(frozen=True)
class ListenConfig:
    """The configuration of one listening socket, validated on creation.

    Where to listen (one of):

    - ``host``/``port``: an IP address or name (None or '' means every
      interface, 0.0.0.0 or ::) and a port 0-65535 (0: the kernel picks).
    - ``path``: a Unix socket path (a leading NUL: the abstract namespace).
      ``unlink_stale`` removes a leftover socket file nobody listens on
      before binding (never a file that is not a socket, never a live
      socket); ``unix_mode`` chmods the socket file after bind.
    - ``fd``: an already-open listening (or bound) socket descriptor, which
      the listener takes over; ``"systemd"`` takes the first descriptor of
      systemd-style socket activation (``LISTEN_FDS``/``LISTEN_PID``).

    ``family``: ``AF_INET``, ``AF_INET6`` or ``AF_UNIX`` (or "ipv4", "ipv6",
    "unix"); by default the address decides.  IPv6 listeners are IPv6-only
    unless ``dualstack=True`` (then ``::`` serves IPv4 too).

    The listener: ``backlog`` (None: net.core.somaxconn; negative clamps to
    0), ``reuse_address`` (SO_REUSEADDR, default on), ``reuse_port``
    (SO_REUSEPORT), ``rcvbuf``/``sndbuf`` (SO_RCVBUF/SO_SNDBUF bytes,
    inherited by accepted connections), ``defer_accept`` (TCP_DEFER_ACCEPT:
    seconds to wait for the client's first data), ``fastopen``
    (TCP_FASTOPEN: queue length of pending fast-open requests).

    Each accepted connection: ``nodelay`` (TCP_NODELAY), ``keepalive``
    (SO_KEEPALIVE).

    Behind a load balancer (applied by the socketserver classes and
    ``fastlisten serve``, in the worker that runs the handler; a bare
    :class:`Listener` hands over raw connections): ``proxy_protocol``
    ('v1', 'v2' or 'v1+v2'; off by default) requires a PROXY protocol
    header first on every connection, never guessing whether one is there;
    ``trusted_proxies`` lists the networks it is accepted from (CIDRs;
    default loopback only: a connection from anywhere else is dropped
    unread); ``proxy_timeout`` (seconds, default 3, the spec's minimum)
    bounds the wait for it; ``proxy_max_v2`` caps a v2 header's size in
    bytes (default 2048).  :meth:`proxy` gives them resolved.

    The accept filter (applied by :meth:`Listener.from_config` and by the
    socketserver classes whose loop accepts in the core): ``ready_rule``
    ('none', 'data', 'line', 'http' or 'tls') makes the listener hand over
    a connection only once it is ready by that rule, after a complete PROXY
    header when ``proxy_protocol`` is set; meanwhile it waits in the core,
    holding no thread.  ``ready_timeout`` (seconds from accept, default 10;
    one deadline covers the PROXY header and the rule),
    ``ready_max_bytes`` (longest line or request head, default 16384) and
    ``max_waiting`` (cap on waiting connections; default half the
    descriptors the process may still open) bound it, and optionally
    ``ready_min_rate`` (bytes per second a waiting connection must keep up
    once it has waited a second; default 0, none); a connection that
    misses them is closed and counted.  :meth:`ready` gives them resolved;
    :meth:`server_ready` what the server classes apply (without
    ``ready_rule``: the PROXY header and the TLS ClientHello by default).
    With ``ssl_context``, 'line' and 'http' are refused: the filter cannot
    read through TLS.

    TLS (applied by the socketserver classes, after the PROXY header, in
    the thread or process that runs the handler; a bare :class:`Listener`
    refuses it): ``ssl_context``, a server-side :class:`ssl.SSLContext`
    each accepted connection is wrapped with; ``handshake_timeout``
    (seconds, default 10) bounds its handshake.  :meth:`tls` gives them
    resolved.  Neither is a command-line flag: ``fastlisten serve`` has
    ``--tls-cert``/``--tls-key``/``--handshake-timeout``.

    The handler deadline (applied by the socketserver classes; off by
    default): ``handler_timeout`` (seconds) shuts a connection down
    (``SHUT_RDWR``) once its handler has run that long, so that a handler
    blocked on a client that sends its request a byte at a time reads end
    of file and returns; counted in ``counters()['handler_timeouts']``.  It
    starts when the handler is built, after the PROXY header and the TLS
    handshake, which have their own deadlines.
    """

    host: Optional[str] = _option(None, "IP address or host name to bind ('' for every "
                                        "interface; default: loopback)")
    port: int = _option(0, "TCP port 0-65535 (0: the kernel picks)")
    path: Optional[Union[str, bytes, "os.PathLike[str]"]] = _option(
        None, "Unix socket path (a leading NUL: the abstract namespace)")
    fd: Optional[Union[int, str]] = _option(
        None, "take over an open listening socket: a descriptor number, or 'systemd' for "
              "socket activation (LISTEN_FDS/LISTEN_PID)", metavar="N|systemd")
    family: Optional[Union[int, str]] = _option(
        None, "address family (default: what the address implies)",
        choices=("ipv4", "ipv6", "unix"))
    dualstack: bool = _option(False, "an IPv6 listener on [::] serves IPv4 too "
                                     "(else IPv6-only)")
    backlog: Optional[int] = _option(None, "accept queue size (default: net.core.somaxconn)")
    reuse_address: bool = _option(True, "do not set SO_REUSEADDR", flag="--no-reuse-address")
    reuse_port: bool = _option(False, "set SO_REUSEPORT (several servers share the port)")
    nodelay: bool = _option(False, "TCP_NODELAY on connections")
    keepalive: bool = _option(False, "SO_KEEPALIVE on connections")
    rcvbuf: Optional[int] = _option(None, "SO_RCVBUF", metavar="BYTES")
    sndbuf: Optional[int] = _option(None, "SO_SNDBUF", metavar="BYTES")
    defer_accept: Optional[int] = _option(
        None, "TCP_DEFER_ACCEPT: wake only once the client has sent data", metavar="SECONDS")
    fastopen: Optional[int] = _option(
        None, "TCP_FASTOPEN: queue length of pending fast-open requests", metavar="QLEN")
    unix_mode: Optional[int] = _option(None, "file mode of a Unix socket, e.g. 660",
                                       metavar="OCTAL", type="octal")
    unlink_stale: bool = _option(True, "do not remove a stale Unix socket file before "
                                       "binding", flag="--keep-stale")
    proxy_protocol: Optional[str] = _option(
        None, "require a PROXY protocol header (HAProxy's send-proxy / send-proxy-v2) "
              "first on every connection", choices=tuple(PROXY_PROTOCOLS))
    trusted_proxies: Optional[Union[str, Tuple[Any, ...]]] = _option(
        None, "networks the PROXY header is accepted from, comma-separated (default: "
              "loopback only); connections from elsewhere are dropped",
        flag="--trusted-proxy", metavar="CIDR[,CIDR...]", type="str")
    proxy_timeout: Optional[float] = _option(
        None, "seconds to wait for the PROXY header (default 3)", metavar="SECONDS",
        type="float")
    proxy_max_v2: Optional[int] = _option(
        None, "largest PROXY v2 header accepted (default 2048)", metavar="BYTES")
    # The accept filter (issue 19); ``fastlisten serve`` chooses a rule for
    # its handler when --ready-rule is not given.
    ready_rule: Optional[str] = _option(
        None, "hand over a connection only once it is ready: 'data' (a byte), 'line', "
              "'http' (a request head) or 'tls' (a ClientHello); meanwhile it waits in "
              "the core, holding no thread", choices=READY_RULES)
    ready_timeout: Optional[float] = _option(
        None, "seconds from accept to ready (default 10); later, the connection is "
              "closed", metavar="SECONDS", type="float")
    ready_max_bytes: Optional[int] = _option(
        None, "longest line or request head the 'line'/'http' rule waits for (default "
              "16384); a longer one is closed", metavar="BYTES")
    max_waiting: Optional[int] = _option(
        None, "most connections waiting to be ready at once (default: half the "
              "descriptors the process may still open); one more closes the oldest",
        metavar="N")
    ready_min_rate: Optional[int] = _option(
        None, "bytes per second a waiting connection must keep up once it has waited a "
              "second (default 0: none); a slower one is closed as it sends",
        metavar="BYTES")

    ssl_context: Optional[ssl.SSLContext] = None
    handshake_timeout: Optional[float] = None
    handler_timeout: Optional[float] = _option(
        None, "shut a connection down (its reads see end of file) once its handler has run "
              "this long (default: never)", metavar="SECONDS", type="float")

    _listener_opts: Tuple[Opt, ...] = field(init=False, repr=False, compare=False, default=())
    _proxy: Optional[ProxySettings] = field(init=False, repr=False, compare=False, default=None)
    _tls: Optional[TLSSettings] = field(init=False, repr=False, compare=False, default=None)
    _conn_opts: Tuple[Opt, ...] = field(init=False, repr=False, compare=False, default=())
    _ready: Optional[ReadySettings] = field(init=False, repr=False, compare=False,
                                            default=None)

    # -- construction ----------------------------------------------------

    @classmethod
    def from_address(cls, address: Any = None, **options: Any) -> "ListenConfig":
        """A config from an address in the forms :mod:`fastlisten.address`
        takes: a ``(host, port)`` tuple (an IPv6 4-tuple's scope id becomes
        ``host%scope``), ``"HOST:PORT"``, a Unix path (bytes, a path-like,
        or a str starting with ``unix:`` or containing ``/``; any str with
        ``family=AF_UNIX``), or ``None`` with ``fd=`` (or for loopback and a
        port the kernel picks)."""
        if address is None:
            return cls(**options)
        family = options.get("family")
        if family is not None:
            family = _address.check_family(family)
        return cls(**_address.split(address, family), **options)

    def for_address(self, address: Any, family: Optional[int] = None) -> "ListenConfig":
        """These options at ``address``, validated together: how a
        socketserver class combines its ``listen_config`` with its
        ``server_address``, which is read as ``socket.bind`` reads it (a
        tuple for TCP; any path, as written, for AF_UNIX; no ``HOST:PORT``
        or ``unix:`` text).  A config with ``fd=`` ignores the address."""
        if self.fd is not None:
            return self
        if family is not None:
            family = _address.check_family(family)
        where = {"host": None, "port": 0, "path": None, "family": family,
                 **_address.split(address, family, literal=True)}
        return dataclasses.replace(self, **where)

    def replace(self, **changes: Any) -> "ListenConfig":
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("dualstack", "reuse_address", "reuse_port", "nodelay",
                     "keepalive", "unlink_stale"):
            _check_bool(name, getattr(self, name))

        family = self.family
        if family is not None:
            family = _address.check_family(family)

        # where: exactly one of host/port, path, fd
        if self.fd is not None:
            self._check_fd()
            if self.host is not None or self.port != 0 or self.path is not None:
                raise ValueError(f"fd={self.fd!r} is already bound: give no host, port "
                                 f"or path with it (got host={self.host!r}, "
                                 f"port={self.port!r}, path={self.path!r})")
        elif self.path is not None:
            put("path", self._check_path())
            if self.host is not None or self.port != 0:
                raise ValueError(f"a Unix socket path ({self.path!r}) takes no host or "
                                 f"port (got host={self.host!r}, port={self.port!r})")
            if family is None:
                family = socket.AF_UNIX
            elif family != socket.AF_UNIX:
                raise ValueError(f"path={self.path!r} is a Unix socket, "
                                 f"but family is {_address.family_name(family)}")
        else:
            _address.check_port(self.port)
            family = self._check_host(family)

        if self.dualstack and family not in (None, socket.AF_INET6):
            raise ValueError(f"dualstack=True needs an IPv6 listener (such as host='::'), "
                             f"not family {_address.family_name(family)}")
        put("family", family)

        if self.backlog is not None:
            # socket.listen clamps a negative backlog to 0; we do the same.
            put("backlog", check_backlog(self.backlog))
        for name in ("rcvbuf", "sndbuf"):
            if getattr(self, name) is not None:
                put(name, check_int(name, getattr(self, name), 1, what=" (bytes)"))
        if self.defer_accept is not None:
            put("defer_accept", check_int("defer_accept", self.defer_accept, 0,
                                           what=" (seconds)"))
        if self.fastopen is not None:
            put("fastopen", check_int("fastopen", self.fastopen, 0,
                                       what=" (queue length)"))
        if self.unix_mode is not None:
            mode = check_int("unix_mode", self.unix_mode, 0, what=" (file mode, e.g. 0o660)")
            if mode > 0o7777:
                raise ValueError(f"unix_mode={oct(mode)} is not a file mode (0 to 0o7777)")
            put("unix_mode", mode)
            if family != socket.AF_UNIX or self.fd is not None:
                raise ValueError(f"unix_mode={oct(self.unix_mode)} needs a Unix socket "
                                 "(path=, or family='unix' for a server's listen_config)")
            if self.path is not None and os.fsencode(self.path)[:1] == b"\0":
                raise ValueError("unix_mode: an abstract socket has no file to chmod")

        if family == socket.AF_UNIX:
            for name in _TCP_ONLY:
                value = getattr(self, name)
                if value not in (None, False):
                    raise ValueError(f"{name}={value!r} is a TCP option: a Unix socket "
                                     "has no use for it")
        conn_opts = self._connection_options()
        listener_opts = self._listener_options(family)
        if _ACCEPT_INHERITS:
            listener_opts, conn_opts = listener_opts + conn_opts, ()
        put("_listener_opts", listener_opts)
        put("_conn_opts", conn_opts)
        self._check_proxy(put)
        self._check_tls(put)
        self._check_ready(put)
        if self.handler_timeout is not None:
            put("handler_timeout", check_seconds("handler_timeout", self.handler_timeout))

    def _check_ready(self, put: Any) -> None:
        from fastlisten._coreshared import (
            DEFAULT_READY_MAX_BYTES,
            DEFAULT_READY_TIMEOUT,
            MAX_READY_MAX_BYTES,
            MAX_READY_TIMEOUT,
        )

        rule = self.ready_rule
        if rule is None:
            given = [f"{name}={getattr(self, name)!r}" for name in
                     ("ready_timeout", "ready_max_bytes", "max_waiting", "ready_min_rate")
                     if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} without ready_rule: set ready_rule="
                                 "'data', 'line', 'http' or 'tls' as well")
            return
        if not isinstance(rule, str):
            raise TypeError(f"ready_rule must be one of {', '.join(READY_RULES)}, not "
                            f"{type(rule).__name__}: {rule!r}")
        if rule not in READY_RULES:
            raise ValueError(f"ready_rule={rule!r}: use one of {', '.join(READY_RULES)}")
        if self._tls is not None and rule in ("line", "http"):
            raise ValueError(
                f"ready_rule={rule!r} with ssl_context: the accept filter reads what the "
                "client sent before the TLS handshake, which is encrypted after the "
                "ClientHello; no line or request head can be seen there. Use 'tls' (the "
                "default with ssl_context: a complete ClientHello) or 'data'")
        timeout = DEFAULT_READY_TIMEOUT
        if self.ready_timeout is not None:
            timeout = check_seconds("ready_timeout", self.ready_timeout)
            if timeout > MAX_READY_TIMEOUT:
                raise ValueError(f"ready_timeout={timeout!r} is out of range: at most "
                                 f"{MAX_READY_TIMEOUT:g} seconds")
            put("ready_timeout", timeout)
        max_bytes = DEFAULT_READY_MAX_BYTES
        if self.ready_max_bytes is not None:
            max_bytes = check_int("ready_max_bytes", self.ready_max_bytes, 1,
                                   MAX_READY_MAX_BYTES, what=" (bytes)")
            put("ready_max_bytes", max_bytes)
        cap = None
        if self.max_waiting is not None:
            cap = check_int("max_waiting", self.max_waiting, 1, what=" (connections)")
            put("max_waiting", cap)
        min_rate = 0
        if self.ready_min_rate is not None:
            min_rate = check_int("ready_min_rate", self.ready_min_rate, 0, MAX_READY_MAX_BYTES,
                                 what=" (bytes per second)")
            put("ready_min_rate", min_rate)
        proxy, max_v2 = 0, 0
        if self._proxy is not None:
            proxy, max_v2 = self._proxy.versions, self._proxy.max_v2
        else:
            from fastlisten.proxy import DEFAULT_MAX_V2
            max_v2 = DEFAULT_MAX_V2
        put("_ready", ReadySettings(rule, timeout, max_bytes, cap, proxy, max_v2, min_rate))

    def ready(self) -> Optional[ReadySettings]:
        """The accept filter's settings with their defaults filled in, or
        None when ``ready_rule`` is not set."""
        return self._ready

    def server_ready(self) -> Optional[ReadySettings]:
        """The accept filter the socketserver classes apply: :meth:`ready`
        when ``ready_rule`` is set; else, by default, rule 'none' with the
        PROXY header required (``proxy_protocol`` on: the complete, valid
        header, within ``proxy_timeout``) and rule 'tls' with
        ``ssl_context`` (a complete ClientHello, within
        ``handshake_timeout``; with both, the header first and the longer
        of the two deadlines, since the filter has one per connection);
        None with neither."""
        if self._ready is not None:
            return self._ready
        proxy, tls = self._proxy, self._tls
        if proxy is None and tls is None:
            return None
        from fastlisten._coreshared import DEFAULT_READY_MAX_BYTES
        from fastlisten.proxy import DEFAULT_MAX_V2

        timeouts = [s.timeout for s in (proxy,) if s is not None]
        timeouts += [s.handshake_timeout for s in (tls,) if s is not None]
        return ReadySettings("tls" if tls is not None else "none", max(timeouts),
                             DEFAULT_READY_MAX_BYTES, None,
                             proxy.versions if proxy is not None else 0,
                             proxy.max_v2 if proxy is not None else DEFAULT_MAX_V2)

    def _check_proxy(self, put: Any) -> None:
        mode = self.proxy_protocol
        if mode is None:
            given = [f"{name}={getattr(self, name)!r}" for name in
                     ("trusted_proxies", "proxy_timeout", "proxy_max_v2")
                     if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} without proxy_protocol: set "
                                 "proxy_protocol='v1', 'v2' or 'v1+v2' as well")
            return
        if not isinstance(mode, str):
            raise TypeError(f"proxy_protocol must be 'v1', 'v2' or 'v1+v2', not "
                            f"{type(mode).__name__}: {mode!r}")
        if mode not in PROXY_PROTOCOLS:
            raise ValueError(f"proxy_protocol={mode!r}: use 'v1', 'v2' or 'v1+v2'")
        from fastlisten import proxy

        trusted = _check_networks(LOOPBACK_NETWORKS if self.trusted_proxies is None
                                  else self.trusted_proxies)
        if self.trusted_proxies is not None:
            put("trusted_proxies", tuple(str(net) for net in trusted))
        timeout = proxy.DEFAULT_TIMEOUT
        if self.proxy_timeout is not None:
            timeout = check_seconds("proxy_timeout", self.proxy_timeout)
            put("proxy_timeout", timeout)
        max_v2 = proxy.DEFAULT_MAX_V2
        if self.proxy_max_v2 is not None:
            max_v2 = check_int("proxy_max_v2", self.proxy_max_v2, proxy.MIN_MAX_V2,
                                proxy.V2_LIMIT, what=" (bytes)")
            put("proxy_max_v2", max_v2)
        put("_proxy", ProxySettings(PROXY_PROTOCOLS[mode], trusted, timeout, max_v2))

    def _check_tls(self, put: Any) -> None:
        context = self.ssl_context
        if context is None:
            if self.handshake_timeout is not None:
                raise ValueError(f"handshake_timeout={self.handshake_timeout!r} without "
                                 "ssl_context: give the server-side ssl.SSLContext as well")
            return
        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not "
                            f"{type(context).__name__}: {context!r}")
        if not server_side_context(context):
            raise ValueError("ssl_context is a client context (PROTOCOL_TLS_CLIENT or "
                             "check_hostname=True, as ssl.create_default_context() makes): "
                             "a server needs ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) with "
                             "load_cert_chain()")
        timeout = DEFAULT_HANDSHAKE_TIMEOUT
        if self.handshake_timeout is not None:
            timeout = check_seconds("handshake_timeout", self.handshake_timeout)
            put("handshake_timeout", timeout)
        put("_tls", TLSSettings(context, timeout))

    def tls(self) -> Optional[TLSSettings]:
        """The TLS settings with their defaults filled in, or None without
        ``ssl_context``."""
        return self._tls

    def socket_only(self) -> "ListenConfig":
        """This config without what acts on each connection (the PROXY
        protocol, TLS and accept-filter options, the handler deadline): the
        listening socket's own options, as a :class:`Listener` takes them
        (fastlisten.Workers' parent: the servers in the workers apply the
        rest)."""
        return self.replace(proxy_protocol=None, trusted_proxies=None, proxy_timeout=None,
                            proxy_max_v2=None, ssl_context=None, handshake_timeout=None,
                            ready_rule=None, ready_timeout=None, ready_max_bytes=None,
                            max_waiting=None, ready_min_rate=None,
                            handler_timeout=None)

    def proxy(self) -> Optional[ProxySettings]:
        """The PROXY protocol settings with their defaults filled in, or
        None when ``proxy_protocol`` is off."""
        return self._proxy

    def _check_fd(self) -> None:
        fd = self.fd
        if isinstance(fd, str):
            if fd != "systemd":
                raise ValueError(f"fd must be a descriptor number or 'systemd', not {fd!r}")
            return
        check_int("fd", fd, 0, what=" (an open socket descriptor)")

    def _check_path(self) -> Union[str, bytes]:
        path = self.path
        _address.unix_path(path)     # raises what is wrong with it
        if isinstance(path, (bytearray, memoryview)):
            return bytes(path)
        return os.fspath(path)  # type: ignore[arg-type]

    def _check_host(self, family: Optional[int]) -> Optional[int]:
        host = self.host
        if host is None or host == "":
            if family is None:
                family = socket.AF_INET6 if self.dualstack else socket.AF_INET
            if family == socket.AF_UNIX and (host == "" or self.port):
                raise ValueError("family AF_UNIX needs path=, not host/port")
            # family AF_UNIX and no address: options for a socketserver
            # class's listen_config, whose server_address gives the path
            return family
        _address.check_host(host)
        if family == socket.AF_UNIX:
            raise ValueError(f"family AF_UNIX needs path=, not host {host!r}")
        numeric = _address.numeric_family(host)
        if numeric is not None:
            if family is not None and family != numeric:
                raise ValueError(f"host {host!r} is an {_address.family_name(numeric)} address, "
                                 f"but family is {_address.family_name(family)}")
            return numeric
        if "%" in host or ":" in host:
            raise ValueError(f"host {host!r} is neither an IPv4 nor an IPv6 address")
        return family if family is not None else socket.AF_INET

    def _listener_options(self, family: Optional[int]) -> Tuple[Opt, ...]:
        opts: List[Opt] = []
        sol, tcp = socket.SOL_SOCKET, socket.IPPROTO_TCP
        bindable = self.fd is None and family != socket.AF_UNIX
        if bindable and self.reuse_address:
            opts.append((sol, socket.SO_REUSEADDR, 1, "reuse_address=True"))
        if self.reuse_port:
            if self.fd is not None:
                raise ValueError("reuse_port must be set before bind; "
                                 f"fd={self.fd!r} is bound already")
            opts.append((sol, _platform_option("reuse_port", "SO_REUSEPORT"), 1,
                         "reuse_port=True"))
        if bindable and family == socket.AF_INET6:
            opts.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.dualstack else 1,
                         f"dualstack={self.dualstack}"))
        if self.rcvbuf is not None:
            opts.append((sol, socket.SO_RCVBUF, self.rcvbuf, f"rcvbuf={self.rcvbuf}"))
        if self.sndbuf is not None:
            opts.append((sol, socket.SO_SNDBUF, self.sndbuf, f"sndbuf={self.sndbuf}"))
        if self.defer_accept is not None:
            opts.append((tcp, _platform_option("defer_accept", "TCP_DEFER_ACCEPT"),
                         self.defer_accept, f"defer_accept={self.defer_accept}"))
        if self.fastopen is not None:
            opts.append((tcp, _platform_option("fastopen", "TCP_FASTOPEN"),
                         self.fastopen, f"fastopen={self.fastopen}"))
        return tuple(opts)

    def _connection_options(self) -> Tuple[Opt, ...]:
        opts: List[Opt] = []
        if self.nodelay:
            opts.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1, "nodelay=True"))
        if self.keepalive:
            opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, "keepalive=True"))
        return tuple(opts)

    # -- use -------------------------------------------------------------

    @property
    def address(self) -> Any:
        """Where to bind: (host, port) with the host as bind_host says, or
        the Unix path; None for ``fd=``."""
        if self.fd is not None:
            return None
        if self.family == socket.AF_UNIX:
            return self.path
        return (self.bind_host, self.port)

    @property
    def bind_host(self) -> str:
        """The host to bind: as given, with '' made explicit (0.0.0.0 or ::,
        every interface); with no host, loopback only (127.0.0.1, or ::1 for
        IPv6), or :: for a dualstack listener."""
        if self.host:
            return self.host
        if self.family == socket.AF_INET6:
            return "::" if self.host == "" or self.dualstack else "::1"
        return "0.0.0.0" if self.host == "" else "127.0.0.1"

    @property
    def accepted_options(self) -> bool:
        """True when accepted connections need apply_connection_options()
        (nodelay or keepalive asked, on a system that does not copy them
        from the listener)."""
        return bool(self._conn_opts)

    def apply_listener_options(self, sock: Any) -> None:
        """Set this config's listener options on ``sock`` before bind:
        SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY, buffer sizes,
        TCP_DEFER_ACCEPT, TCP_FASTOPEN; on Linux also TCP_NODELAY and
        SO_KEEPALIVE, which accepted connections inherit from the listener.

        ``sock`` is a ``socket.socket``, a raw descriptor (int) or anything
        with ``setsockopt(level, option, int)`` (a Listener).  A refused
        option raises the kernel's OSError with a message naming it.
        """
        if self.fastopen:
            from fastlisten import sysinfo
            from fastlisten.errors import OptionIneffectiveWarning, warn

            mode = sysinfo.tcp_fastopen()
            if mode is not None and not mode & 2:
                warn(f"fastopen={self.fastopen}: the kernel has server-side TCP Fast "
                     f"Open off (net.ipv4.tcp_fastopen={mode}); clients' data will not "
                     "ride on the SYN until you set it to 3 "
                     "(sysctl -w net.ipv4.tcp_fastopen=3)", OptionIneffectiveWarning)
        _apply(sock, self._listener_opts, "listener")

    def apply_connection_options(self, conn: Any) -> None:
        """Set TCP_NODELAY / SO_KEEPALIVE on an accepted connection, as
        configured.  Nothing to do on Linux, where connections inherit them
        from the listener (see apply_listener_options); call it anyway."""
        if self._conn_opts:
            _apply(conn, self._conn_opts, "accepted connection")

    def resolve_fd(self) -> Optional[int]:
        """The descriptor ``fd`` names: the number itself, or for
        ``'systemd'`` the first socket-activation descriptor (raises
        OSError(EBADF) when this process was passed none)."""
        if self.fd != "systemd":
            return self.fd  # type: ignore[return-value]
        fds = systemd_fds()
        if not fds:
            from fastlisten.errors import explain_no_systemd_socket
            raise explain_no_systemd_socket()
        return fds[0]

    def before_bind(self) -> None:
        """What to do before bind(): remove a stale Unix socket file when
        ``unlink_stale`` says so (never a live socket or another file)."""
        if self.family == socket.AF_UNIX and self.unlink_stale and self.stale_unix_socket():
            _log.info("removing stale socket file %s (nobody listens on it)", self.path)
            os.unlink(self.path)  # type: ignore[arg-type]

    def after_bind(self) -> None:
        """What to do after bind(): chmod the Unix socket file to ``unix_mode``."""
        if self.family == socket.AF_UNIX and self.unix_mode is not None:
            os.chmod(self.path, self.unix_mode)  # type: ignore[arg-type]

    def stale_unix_socket(self) -> bool:
        """True when ``path`` is a leftover socket file that nobody listens
        on (connect is refused): safe to remove before bind."""
        if self.family != socket.AF_UNIX or self.path is None:
            return False
        raw = os.fsencode(self.path)
        if raw[:1] == b"\0":
            return False
        try:
            if not stat.S_ISSOCK(os.lstat(raw).st_mode):
                return False
        except OSError:
            return False
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.setblocking(False)
            err = probe.connect_ex(raw)
        finally:
            probe.close()
        return err == errno.ECONNREFUSED


def _apply(sock: Any, opts: Tuple[Opt, ...], what: str) -> None:
    if isinstance(sock, int):
        target = socket.socket(fileno=sock)
        try:
            _apply(target, opts, what)
        finally:
            target.detach()
        return
    for level, option, value, label in opts:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:
            raise type(exc)(exc.errno, f"{exc.strerror or os.strerror(exc.errno or 0)}: "
                                       f"{label} on the {what} was refused") from None


def option_fields() -> List["dataclasses.Field[Any]"]:
    """The fields of ListenConfig that are listener options (each with its
    ``help`` and command-line spelling in ``metadata``), in order; the
    command line generates its flags from them.  Options marked
    ``cli=False`` are left out."""
    return [f for f in dataclasses.fields(ListenConfig)
            if "help" in f.metadata and f.metadata.get("cli", True)]
