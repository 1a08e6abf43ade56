"""What happens to a connection between accept() and its handler when a
server sits behind a load balancer or speaks TLS: the PROXY protocol header
(read only from trusted peers, under a deadline) and then the TLS handshake
(under ``handshake_timeout``).

The server classes (``fastlisten.server``) call :meth:`FrontDoor.prepare`
in the thread or process that runs the handler, never in the accept loop.
When their accept filter has waited for the complete PROXY header, they
read it first (:meth:`FrontDoor.read_proxy`, which then cannot block), in
the thread that accepted the connection, before ``verify_request``.
A connection that fails either step is dropped (the caller closes it),
counted, and logged once per episode: the first failure of a run is logged
at WARNING, the rest are only counted until a connection succeeds again,
which logs how many were dropped meanwhile.  Forked children report their
counts to the server process over a pipe, one byte per event; the server
process reads it whenever it reaps children (each child has at most two
events to tell), and in counters().  A report that finds the pipe full (a
server that stopped reaping) is counted in memory shared with the children
and reported: ``counters()['reports_lost']``, and a warning.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from typing import Any, Dict, List, Optional, Tuple

from fastlisten import proxy as _proxy
from fastlisten._backend import core
from fastlisten._childreports import ChildReports
from fastlisten.address import format_address
from fastlisten.config import ProxySettings

_log = logging.getLogger("fastlisten")

#: One byte per event in a forked child's report; the order is the wire format.
_EVENTS: List[str] = (
    ["proxy_accepted", "proxy_local", "proxy_untrusted", "proxy_socket_error",
     "tls_handshakes", "tls_failures"]
    + [f"proxy_error:{reason}" for reason, _ in _proxy.REASONS.values()])
_CODE = {name: i for i, name in enumerate(_EVENTS)}


def _peer(address: Any) -> str:
    return format_address(address) or "a Unix socket peer"


class _Episode:
    """Log the first failure of a run and, when the run ends, its size."""

    def __init__(self, what: str, counter: str) -> None:
        self.what = what
        self.counter = counter
        self.failed = 0

    def failure(self, detail: str) -> None:
        self.failed += 1
        if self.failed == 1:
            _log.warning("%s: %s; further failures are counted (counters()['%s']), not "
                         "logged, until a connection succeeds", self.what, detail, self.counter)

    def success(self) -> None:
        if self.failed:
            if self.failed > 1:
                _log.warning("%s: %d connections were dropped in a row before this one "
                             "succeeded", self.what, self.failed)
            self.failed = 0


class FrontDoor:
    """The PROXY header and TLS handshake for one server.

    ``proxy``: the resolved settings (ListenConfig.proxy()), or None;
    ``ssl_context``: a server-side ssl.SSLContext, or None;
    ``handshake_timeout``: seconds for the whole TLS handshake;
    ``forking``: handlers run in forked children, which report over a pipe.
    """

    def __init__(self, proxy: Optional[ProxySettings], ssl_context: Optional[ssl.SSLContext],
                 handshake_timeout: Optional[float], forking: bool = False) -> None:
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not "
                            f"{type(ssl_context).__name__}")
        self.proxy = proxy
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self._lock = threading.Lock()
        self._trusted: Dict[str, bool] = {}
        self._counts = [0] * len(_EVENTS)
        self._proxy_episode = _Episode("PROXY protocol", "proxy_rejected")
        self._tls_episode = _Episode("TLS handshake", "tls_failures")
        self._pid = os.getpid()
        #: the children's reports (None: handlers run in this process)
        self._reports = ChildReports() if forking else None

    # -- per connection (in the handler's thread or process) -------------

    def prepare(self, request: socket.socket, client_address: Any,
                proxied: Optional[Tuple[Optional[_proxy.ProxyHeader]]] = None
                ) -> Optional[Tuple[socket.socket, Any, Optional[_proxy.ProxyHeader]]]:
        """Read the PROXY header, then run the TLS handshake, as configured.
        Returns (connection, client address, header): the connection is
        ``request`` itself (also when it is an ``ssl.SSLSocket`` already:
        that one is never wrapped again), or the SSLSocket that took over
        its descriptor;
        the address is the real client's.  Returns None when the connection
        is to be dropped (already counted and logged; the caller closes
        ``request``).  Never raises for anything the peer did.
        ``proxied``: ``(header,)`` when read_proxy() read the header already
        (``client_address`` is then the real client's)."""
        header = None
        address = client_address
        if proxied is not None:
            header = proxied[0]
        elif self.proxy is not None:
            read = self.read_proxy(request, client_address)
            if read is None:
                return None
            address, header = read
        conn = request
        # A connection that is TLS already (accepted from a listening socket
        # the server wrapped itself, or wrapped by its own get_request) is
        # never wrapped again: a second handshake inside the first fails.
        if self.ssl_context is not None and not isinstance(request, ssl.SSLSocket):
            wrapped = self._handshake(request, address)
            if wrapped is None:
                return None
            conn = wrapped
        return conn, address, header

    def read_proxy(self, request: socket.socket, client_address: Any
                   ) -> Optional[Tuple[Any, Optional[_proxy.ProxyHeader]]]:
        """The PROXY part of prepare(): from a trusted peer, read the
        header; returns (the real client's address, header), or None when
        the connection is to be dropped (counted, logged once per episode;
        the caller closes it)."""
        proxy = self.proxy
        assert proxy is not None
        if not self._trusts(proxy, client_address):
            self._record("proxy_untrusted", f"a connection from "
                         f"{_peer(client_address)}, which is not in "
                         f"trusted_proxies, was dropped unread")
            return None
        try:
            header = core.proxy_read(request, proxy.versions, proxy.timeout, proxy.max_v2)
        except _proxy.ProxyProtocolError as exc:
            self._record(f"proxy_error:{exc.reason}", f"dropped the connection from "
                         f"{_peer(client_address)}: {exc}")
            return None
        except OSError as exc:
            self._record("proxy_socket_error", f"reading the header from "
                         f"{_peer(client_address)} failed: {exc}")
            return None
        if header.source is not None:
            self._record("proxy_accepted")
            return header.source, header
        self._record("proxy_local")
        return client_address, header

    def _trusts(self, proxy: ProxySettings, peer: Any) -> bool:
        """proxy.trusts(peer), remembered per peer IP (a balancer's few
        addresses; the memory is bounded)."""
        if not isinstance(peer, tuple):
            return proxy.trusts(peer)
        known = self._trusted.get(peer[0])
        if known is None:
            known = proxy.trusts(peer)
            if len(self._trusted) >= 256:
                self._trusted.clear()
            self._trusted[peer[0]] = known
        return known

    def _handshake(self, request: socket.socket, address: Any) -> Optional[socket.socket]:
        timeout = request.gettimeout()
        try:
            conn = self.ssl_context.wrap_socket(  # type: ignore[union-attr]
                request, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            self._record("tls_failures", f"with {_peer(address)}: {exc}")
            return None
        try:
            conn.settimeout(self.handshake_timeout)
            conn.do_handshake()
            conn.settimeout(timeout)
        except (OSError, ValueError) as exc:    # SSLError, timeout, reset ...
            self._record("tls_failures", f"with {_peer(address)} failed: "
                         f"{exc.__class__.__name__}: {exc}")
            conn.close()
            return None
        self._record("tls_handshakes")
        return conn

    # -- counting and logging --------------------------------------------

    def _record(self, event: str, detail: str = "") -> None:
        if os.getpid() != self._pid:
            # a forked child: the server process counts and logs
            if self._reports is not None:
                self._reports.send(_CODE[event])
            return
        with self._lock:
            self._counts[_CODE[event]] += 1
            if event.startswith("proxy"):
                episode = self._proxy_episode
            else:
                episode = self._tls_episode
            if event in ("proxy_accepted", "proxy_local", "tls_handshakes"):
                episode.success()
            else:
                episode.failure(detail or event.replace("proxy_error:", "rejected: "))

    def collect(self) -> None:
        """In the server process: count what forked children reported."""
        if self._reports is None:
            return
        for code in self._reports.read():
            if code < len(_EVENTS):
                self._record(_EVENTS[code])

    def _reports_lost(self) -> int:
        """Children's reports lost so far (a warning when that grew)."""
        if self._reports is None:
            return 0
        if self._reports.newly_lost():
            _log.warning("%d counter report(s) of forked children were lost (their pipe to the "
                         "server process was full: the server did not reap its children); "
                         "counters() lacks them", self._reports.lost())
        return self._reports.lost()

    def counters(self) -> Dict[str, Any]:
        """proxy_accepted (headers whose client became client_address),
        proxy_local (LOCAL/UNKNOWN headers: the peer's own address stands),
        proxy_rejected (connections dropped: bad, late or missing headers,
        untrusted peers, socket errors), proxy_untrusted, proxy_errors
        ({reason: n}); tls_handshakes, tls_failures."""
        self.collect()
        with self._lock:
            counts = dict(zip(_EVENTS, self._counts))
        out: Dict[str, Any] = {}
        if self.proxy is not None:
            errors = {name.split(":", 1)[1]: n for name, n in counts.items()
                      if name.startswith("proxy_error:") and n}
            if counts["proxy_socket_error"]:
                errors["socket"] = counts["proxy_socket_error"]
            out["proxy_accepted"] = counts["proxy_accepted"]
            out["proxy_local"] = counts["proxy_local"]
            out["proxy_untrusted"] = counts["proxy_untrusted"]
            out["proxy_rejected"] = sum(errors.values()) + counts["proxy_untrusted"]
            out["proxy_errors"] = errors
        if self.ssl_context is not None:
            out["tls_handshakes"] = counts["tls_handshakes"]
            out["tls_failures"] = counts["tls_failures"]
        lost = self._reports_lost()
        if lost:
            out["reports_lost"] = lost
        return out

    def close(self) -> None:
        """Close the children's report pipe (after counting what is in it)."""
        self.collect()
        self._reports_lost()
        reports, self._reports = self._reports, None
        if reports is not None:
            reports.close()
