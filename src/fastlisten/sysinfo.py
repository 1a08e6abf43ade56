"""What this machine allows a listener: kernel limits, counters, features.

Everything here is read at call time (a sysctl can change under a running
program) from ``/proc`` on Linux; a value the system does not show is
``None``, never a guess.  ``fastlisten info`` prints :func:`report`.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "somaxconn", "tcp_max_syn_backlog", "syncookies", "tcp_abort_on_overflow",
    "ephemeral_port_range", "reserved_ports", "unprivileged_port_start",
    "tcp_fastopen", "listen_counters", "features", "limits", "report",
    "local_addresses",
]

_SYSCTL = "/proc/sys/net"


def read_proc(path: str) -> Optional[str]:
    """The text of a /proc file, None when unreadable.  Read as bytes and
    decoded without a codec lookup, so that it works even where the
    ``encodings`` package cannot be imported any more (after dropping
    privileges, at interpreter shutdown)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("latin-1")
    except OSError:
        return None


def _read_sysctl(name: str) -> Optional[str]:
    """The text of /proc/sys/net/<name>, stripped; None when unreadable."""
    text = read_proc(os.path.join(_SYSCTL, name))
    return None if text is None else text.strip()


def _read_int(name: str) -> Optional[int]:
    text = _read_sysctl(name)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def somaxconn() -> Optional[int]:
    """``net.core.somaxconn``: the largest backlog listen() honours (the
    kernel silently truncates larger ones to it)."""
    return _read_int("core/somaxconn")


def tcp_max_syn_backlog() -> Optional[int]:
    """``net.ipv4.tcp_max_syn_backlog``: the size of the SYN queue
    (handshakes in progress)."""
    return _read_int("ipv4/tcp_max_syn_backlog")


def syncookies() -> Optional[int]:
    """``net.ipv4.tcp_syncookies``: 0 off, 1 when the SYN queue overflows, 2 always."""
    return _read_int("ipv4/tcp_syncookies")


def tcp_abort_on_overflow() -> Optional[int]:
    """``net.ipv4.tcp_abort_on_overflow``: 1 resets clients when the accept
    queue is full, 0 (default) drops their handshake so they retry."""
    return _read_int("ipv4/tcp_abort_on_overflow")


def ephemeral_port_range() -> Optional[Tuple[int, int]]:
    """``net.ipv4.ip_local_port_range``: the ports the kernel picks for the
    local side of outgoing connections (and for bind to port 0)."""
    text = _read_sysctl("ipv4/ip_local_port_range")
    if text is None:
        return None
    try:
        low, high = (int(x) for x in text.split())
    except ValueError:
        return None
    return low, high


def reserved_ports() -> List[Tuple[int, int]]:
    """``net.ipv4.ip_local_reserved_ports`` as (first, last) ranges: ports in
    the ephemeral range that the kernel never picks at random."""
    text = _read_sysctl("ipv4/ip_local_reserved_ports") or ""
    out: List[Tuple[int, int]] = []
    for part in text.replace(",", " ").split():
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.append((int(a), int(b)))
            else:
                out.append((int(part), int(part)))
        except ValueError:
            continue
    return out


def unprivileged_port_start() -> Optional[int]:
    """``net.ipv4.ip_unprivileged_port_start``: ports below it need root or
    CAP_NET_BIND_SERVICE (1024 by default)."""
    return _read_int("ipv4/ip_unprivileged_port_start")


def tcp_fastopen() -> Optional[int]:
    """``net.ipv4.tcp_fastopen`` bit mask: 1 client, 2 server (3 both)."""
    return _read_int("ipv4/tcp_fastopen")


def listen_counters() -> Dict[str, Optional[int]]:
    """The system's ``ListenOverflows`` (accept queue full, handshake dropped)
    and ``ListenDrops`` (all SYNs dropped at a listener) from
    /proc/net/netstat, counted since boot in this network namespace."""
    out: Dict[str, Optional[int]] = {"ListenOverflows": None, "ListenDrops": None}
    text = read_proc("/proc/net/netstat")
    if text is None:
        return out
    lines = text.splitlines()
    # Pairs of lines: "TcpExt: name name ..." then "TcpExt: value value ...".
    for names, values in zip(lines[::2], lines[1::2]):
        if not names.startswith("TcpExt:"):
            continue
        table = dict(zip(names.split()[1:], values.split()[1:]))
        for key in out:
            try:
                out[key] = int(table[key])
            except (KeyError, ValueError):
                pass
    return out


def _probe_option(family: int, level: int, name: str, value: int) -> bool:
    """Whether setsockopt(level, socket.<name>, value) works on a fresh
    stream socket: the constant exists *and* the kernel accepts it."""
    option = getattr(socket, name, None)
    if option is None:
        return False
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False
    with probe:
        try:
            probe.setsockopt(level, option, value)
        except OSError:
            return False
    return True


def features() -> Dict[str, Any]:
    """What this platform offers a listener: each a bool (or None when it
    cannot be told), probed now."""
    from fastlisten._backend import compiled

    fastopen = tcp_fastopen()
    return {
        "compiled_core": compiled,
        "SO_REUSEPORT": _probe_option(socket.AF_INET, socket.SOL_SOCKET, "SO_REUSEPORT", 1),
        "TCP_DEFER_ACCEPT": _probe_option(socket.AF_INET, socket.IPPROTO_TCP,
                                          "TCP_DEFER_ACCEPT", 1),
        "TCP_FASTOPEN": _probe_option(socket.AF_INET, socket.IPPROTO_TCP, "TCP_FASTOPEN", 1),
        "TCP_FASTOPEN_server_enabled": None if fastopen is None else bool(fastopen & 2),
        "TCP_INFO": hasattr(socket, "TCP_INFO"),
        "IPv6": socket.has_ipv6 and _probe_option(socket.AF_INET6, socket.SOL_SOCKET,
                                                  "SO_REUSEADDR", 1),
        "accept4": hasattr(socket, "SOCK_CLOEXEC"),
    }


def limits() -> Dict[str, Any]:
    """The kernel's listen limits, as ``fastlisten info`` prints them."""
    eph = ephemeral_port_range()
    return {
        "somaxconn": somaxconn(),
        "tcp_max_syn_backlog": tcp_max_syn_backlog(),
        "tcp_syncookies": syncookies(),
        "tcp_abort_on_overflow": tcp_abort_on_overflow(),
        "ip_local_port_range": list(eph) if eph else None,
        "ip_local_reserved_ports": [list(r) for r in reserved_ports()],
        "ip_unprivileged_port_start": unprivileged_port_start(),
        "tcp_fastopen": tcp_fastopen(),
    }


def report() -> Dict[str, Any]:
    """Everything ``fastlisten info`` shows: limits, counters, features."""
    import platform
    import sys

    from fastlisten import __version__

    return {
        "fastlisten": __version__,
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "limits": limits(),
        "counters": listen_counters(),
        "features": features(),
    }


# -- this machine's addresses (for the EADDRNOTAVAIL explanation) ----------

def _ipv4_from_fib_trie() -> List[str]:
    """Local IPv4 addresses from /proc/net/fib_trie ("host LOCAL" leaves)."""
    lines = (read_proc("/proc/net/fib_trie") or "").splitlines()
    found: List[str] = []
    last_addr = None
    for line in lines:
        text = line.strip()
        if text.startswith("|--"):
            last_addr = text[3:].strip()
        elif last_addr and text.startswith("/") and text.endswith("host LOCAL"):
            prefix = text.split()[0]
            entry = last_addr if prefix == "/32" else last_addr + prefix
            if entry not in found:
                found.append(entry)
    return found


def _ipv4_from_ioctl() -> List[str]:
    """Each interface's primary IPv4 address via SIOCGIFADDR (fallback)."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    found: List[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return found
    with probe:
        for name in names:
            req = struct.pack("256s", name.encode()[:15])
            try:
                res = fcntl.ioctl(probe.fileno(), siocgifaddr, req)
            except OSError:
                continue
            addr = socket.inet_ntoa(res[20:24])
            if addr not in found:
                found.append(addr)
    return found


def _ipv6_from_proc() -> List[str]:
    """Local IPv6 addresses from /proc/net/if_inet6 (link-local ones with %iface)."""
    lines = (read_proc("/proc/net/if_inet6") or "").splitlines()
    found: List[str] = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6:
            continue
        try:
            addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(parts[0]))
            scope = int(parts[3], 16)
        except (ValueError, OSError):
            continue
        if scope == 0x20:   # link-local: only meaningful with its interface
            addr = f"{addr}%{parts[5]}"
        if addr not in found:
            found.append(addr)
    return found


def local_addresses(family: int) -> List[str]:
    """The addresses of this machine's interfaces in ``family`` (AF_INET or
    AF_INET6), as text; empty when the system does not tell."""
    if family == socket.AF_INET:
        return _ipv4_from_fib_trie() or _ipv4_from_ioctl()
    if family == socket.AF_INET6:
        return _ipv6_from_proc()
    raise OSError(errno.EAFNOSUPPORT, f"no interface addresses in family {family!r}")
