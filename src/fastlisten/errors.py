"""Errors that explain themselves, and fastlisten's warnings.

A failed bind keeps the ``OSError`` subclass and ``errno`` the standard
library gives (``except OSError``, ``except PermissionError`` and checks of
``exc.errno`` keep working); only the message grows: which address, who
holds it, what this machine has, what to do.

Warnings (all :class:`FastlistenWarning`, a ``UserWarning``) flag choices
that work today and fail later: a fixed port in the ephemeral range, a
backlog the kernel truncates, an option the kernel has switched off.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Dict, Iterator, List, Optional, Tuple

from fastlisten import sysinfo

__all__ = [
    "FastlistenWarning", "EphemeralPortWarning", "BacklogTruncatedWarning",
    "OptionIneffectiveWarning", "explain_bind_error", "format_address",
    "find_holders", "warn", "warn_if_ephemeral", "effective_backlog",
]


class FastlistenWarning(UserWarning):
    """Base class of fastlisten's warnings."""


class EphemeralPortWarning(FastlistenWarning):
    """A fixed port inside the kernel's ephemeral range
    (``net.ipv4.ip_local_port_range``): any outgoing connection may take it
    first, which shows up as an intermittent EADDRINUSE."""


class BacklogTruncatedWarning(FastlistenWarning):
    """A backlog above ``net.core.somaxconn``: the kernel silently truncates
    it; ``Listener.backlog`` reports the effective value."""


class OptionIneffectiveWarning(FastlistenWarning):
    """An option the kernel accepts but ignores as configured (for example
    TCP_FASTOPEN while ``net.ipv4.tcp_fastopen`` has the server bit off)."""


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


# -- who holds an address ---------------------------------------------------

_TCP_LISTEN = b"0A"
_TCP_SYN_RECV = b"03"
_SO_ACCEPTCON = 0x10000


def _hex_to_ip(family: int, text: str) -> str:
    """/proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(text)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw)


_WILDCARDS = ("0.0.0.0", "::")


def _conflicts(ours: str, theirs: str) -> bool:
    """Whether a listener on ``theirs`` can be why ``ours`` is in use (same
    port): the same address, or either is a wildcard."""
    return ours == theirs or ours in _WILDCARDS or theirs in _WILDCARDS


def _tcp_listeners(port: int, host: Optional[str] = None) -> List[Tuple[str, int]]:
    """(address, inode) of the listening TCP sockets on ``port`` (that
    conflict with ``host``, when given)."""
    found: List[Tuple[str, int]] = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            f = open(f"/proc/net/{name}", "rb")
        except OSError:
            continue
        with f:
            f.readline()   # the header
            # The kernel lists listening sockets first, then the connection
            # table (which a busy host fills with TIME_WAIT): stop there.
            # (Kernels before 4.4 interleave their SYN_RECV requests.)
            for raw in f:
                parts = raw.split()
                if len(parts) < 10:
                    break
                if parts[3] != _TCP_LISTEN:
                    if parts[3] == _TCP_SYN_RECV:
                        continue
                    break
                try:
                    addr_hex, port_hex = parts[1].split(b":")
                    if int(port_hex, 16) != port:
                        continue
                    ip = _hex_to_ip(family, addr_hex.decode("ascii", "replace"))
                    if host is not None and not _conflicts(host, ip):
                        continue
                    found.append((format_address((ip, port)), int(parts[9])))
                except (ValueError, OSError):
                    continue
    return found


def _unix_listeners(path: str) -> List[Tuple[str, int]]:
    """(path, inode) of the listening Unix sockets bound to ``path``."""
    found: List[Tuple[str, int]] = []
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = [os.fsdecode(line) for line in f.read().splitlines()[1:]]
    except OSError:
        return found
    for line in lines:
        parts = line.split(None, 7)
        if len(parts) < 8 or parts[7] != path:
            continue
        try:
            if int(parts[3], 16) & _SO_ACCEPTCON:
                found.append((path, int(parts[6])))
        except ValueError:
            continue
    return found


def _processes_with(inodes: Dict[int, str], limit: int = 4) -> Iterator[Tuple[int, str, str]]:
    """(pid, command, address) of processes with a descriptor on one of the
    socket ``inodes``; only the ones /proc lets us see (others' processes
    need root)."""
    targets = {f"socket:[{ino}]": addr for ino, addr in inodes.items()}
    seen = 0
    try:
        pids = sorted((int(p) for p in os.listdir("/proc") if p.isdigit()),
                      key=lambda p: (p != os.getpid(), p))
    except OSError:
        return
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in targets:
                yield pid, _command_of(pid), targets[link]
                seen += 1
                break
        if seen >= limit:
            return


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a for a in f.read().split(b"\0") if a]
        text = " ".join(os.fsdecode(a) for a in argv)
    except OSError:
        text = ""
    if not text:
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                text = os.fsdecode(f.read().strip())
        except OSError:
            text = "?"
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def find_holders(family: int, address: Any) -> List[Dict[str, Any]]:
    """Who listens on the port (or Unix path) of ``address``: a list of
    ``{"address", "pid", "command"}``, ``pid``/``command`` None when the socket
    is visible but its process is not (another user's, without root)."""
    if family == socket.AF_UNIX:
        path = address if isinstance(address, str) else os.fsdecode(address)
        sockets = _unix_listeners(path)
    else:
        host = address[0].split("%", 1)[0] if isinstance(address[0], str) else None
        sockets = _tcp_listeners(int(address[1]), host)
    if not sockets:
        return []
    inodes = {ino: addr for addr, ino in sockets}
    holders: List[Dict[str, Any]] = []
    found = set()
    for pid, command, addr in _processes_with(inodes):
        holders.append({"address": addr, "pid": pid, "command": command})
        found.add(addr)
    for addr, _ in sockets:
        if addr not in found:
            holders.append({"address": addr, "pid": None, "command": None})
            found.add(addr)
    return holders


# -- the explanations -------------------------------------------------------

def _explain_addrinuse(family: int, address: Any) -> str:
    where = format_address(address)
    holders = find_holders(family, address)
    if family == socket.AF_UNIX:
        path = address if isinstance(address, str) else os.fsdecode(address)
        if not holders:
            if os.path.lexists(path) and not _is_socket(path):
                return (f"{where} exists and is not a socket; fastlisten leaves it "
                        "alone: remove it or choose another path")
            return (f"{where} exists; remove the stale file or let fastlisten do it "
                    "(unlink_stale=True, the default, removes a socket nobody listens on)")
    if holders:
        parts = []
        for h in holders:
            if h["pid"] is not None:
                parts.append(f"pid {h['pid']} ({h['command']}) listening on {h['address']}")
            else:
                parts.append(f"a process this user cannot see (try as root: ss -ltnp) "
                             f"listening on {h['address']}")
        held = "; ".join(parts)
        return (f"{where} is held by {held}. Stop that process "
                "(often another instance of this server), or choose another port "
                "(port 0 lets the kernel pick a free one)")
    if family == socket.AF_UNIX:
        return f"{where} is already in use"
    return (f"{where}: no listening socket holds it, so it is bound by a socket "
            "that does not listen, or held by a connection "
            "(TIME_WAIT). reuse_address=True (the default) rebinds over TIME_WAIT; "
            "otherwise choose another port, or port 0")


def _is_socket(path: str) -> bool:
    import stat
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _explain_addrnotavail(family: int, address: Any) -> str:
    where = format_address(address)
    try:
        have = sysinfo.local_addresses(family)
    except OSError:
        have = []
    wildcard = "0.0.0.0" if family == socket.AF_INET else "::"
    listing = ", ".join(have) if have else "(the system does not tell)"
    extra = ""
    if family == socket.AF_INET and "127.0.0.0/8" not in have:
        extra = " and all of 127.0.0.0/8"
    return (f"{where}: {address[0]} is not an address of this machine (or its "
            f"interface is down). This machine has: {listing}{extra}. "
            f"Bind {wildcard} to listen on every interface, or 127.0.0.1/::1 for "
            "this machine only")


def _explain_acces(family: int, address: Any) -> str:
    where = format_address(address)
    if family == socket.AF_UNIX:
        path = address if isinstance(address, str) else os.fsdecode(address)
        return (f"{where}: no permission to create a socket in "
                f"{os.path.dirname(os.path.abspath(path)) or '.'}; choose a directory "
                "this user can write (e.g. $XDG_RUNTIME_DIR)")
    port = int(address[1])
    start = sysinfo.unprivileged_port_start()
    if start is None:
        start = 1024
    if 0 < port < start:
        return (f"{where}: ports below {start} (net.ipv4.ip_unprivileged_port_start) "
                "need root or CAP_NET_BIND_SERVICE. Ways out: use a port >= "
                f"{start} (and a proxy or firewall redirect in front); grant the "
                "capability (setcap cap_net_bind_service=+ep on the interpreter, or "
                "AmbientCapabilities= in a systemd unit); lower the sysctl "
                f"(sysctl net.ipv4.ip_unprivileged_port_start={port}); or let systemd "
                "open the socket and pass it in (fd='systemd')")
    return (f"{where}: permission denied by the system (a security module or "
            "firewall policy, not the port number)")


_EXPLAINERS = {
    errno.EADDRINUSE: _explain_addrinuse,
    errno.EADDRNOTAVAIL: _explain_addrnotavail,
    errno.EACCES: _explain_acces,
}


def explain_bind_error(exc: OSError, family: int, address: Any) -> OSError:
    """The same error with a message that explains it.

    For EADDRINUSE, EADDRNOTAVAIL and EACCES from bind(), returns a new
    exception of ``type(exc)`` with ``errno`` intact and a message naming
    ``address``, the holder, this machine's addresses or the way out; any
    other error comes back unchanged.  Use as
    ``raise explain_bind_error(e, family, addr) from None``.
    """
    explainer = _EXPLAINERS.get(exc.errno)  # type: ignore[arg-type]
    if explainer is None:
        return exc
    try:
        detail = explainer(family, address)
    except Exception:  # noqa: BLE001 - an explanation must never hide the error
        return exc
    strerror = exc.strerror or os.strerror(exc.errno)  # type: ignore[arg-type]
    new = type(exc)(exc.errno, f"{strerror}: {detail}")
    new.__traceback__ = exc.__traceback__
    return new


def warn(message: str, category: type = FastlistenWarning) -> None:
    """Issue a warning attributed to the first caller outside fastlisten
    (so that it points at the user's ``listen(...)`` line, however deep
    inside the package the choice was checked)."""
    import sys
    import warnings

    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level = 2
    frame: Optional[Any] = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def warn_if_ephemeral(port: int) -> None:
    """Warn (EphemeralPortWarning) when a fixed ``port`` lies in the kernel's
    ephemeral range and is not reserved (net.ipv4.ip_local_reserved_ports)."""
    if not port:
        return
    eph = sysinfo.ephemeral_port_range()
    if eph is None or not eph[0] <= port <= eph[1]:
        return
    if any(a <= port <= b for a, b in sysinfo.reserved_ports()):
        return
    low, high = eph
    start = sysinfo.unprivileged_port_start() or 1024
    safe = f"{start}-{low - 1}" if start < low else "below the range"
    if high < 65535:
        safe += f" or {high + 1}-65535"
    warn(f"port {port} is inside the ephemeral port range {low}-{high} "
         "(net.ipv4.ip_local_port_range): the kernel gives these ports to "
         "outgoing connections at random, so binding it can fail now and then "
         f"with EADDRINUSE. Choose a port in {safe}, or reserve this one "
         f"(sysctl -w net.ipv4.ip_local_reserved_ports={port})", EphemeralPortWarning)


def effective_backlog(requested: int) -> int:
    """The backlog the kernel will really use for ``requested`` (it
    truncates to net.core.somaxconn), warning (BacklogTruncatedWarning)
    when that is less than asked."""
    limit = sysinfo.somaxconn()
    if limit is None or limit <= 0 or requested <= limit:
        return requested
    warn(f"backlog {requested} is above net.core.somaxconn={limit}: the kernel "
         f"silently truncates it to {limit}. Raise the limit "
         f"(sysctl -w net.core.somaxconn={requested}) if you need the deeper queue",
         BacklogTruncatedWarning)
    return limit
