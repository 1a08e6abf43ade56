"""What this machine allows a listener: kernel limits, counters, features.

Everything here is read at call time (a sysctl can change under a running
program) from ``/proc`` on Linux; a value the system does not show is
``None``, never a guess.  ``fastlisten info`` prints :func:`report`.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

from fastlisten._version import VERSION
from fastlisten.address import format_address

__all__ = [
    "somaxconn", "tcp_max_syn_backlog", "syncookies", "tcp_abort_on_overflow",
    "ephemeral_port_range", "reserved_ports", "unprivileged_port_start",
    "tcp_fastopen", "listen_counters", "listener_drops", "features", "limits", "report",
    "local_addresses", "find_holders", "descriptor_headroom",
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


def tcp_migrate_req() -> Optional[int]:
    """``net.ipv4.tcp_migrate_req`` (Linux 5.14+): 1 moves the queue of a
    closing SO_REUSEPORT listener to another live one of its group, 0
    (default) resets those connections; None where the kernel lacks it."""
    return _read_int("ipv4/tcp_migrate_req")


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


#: getsockopt(SOL_SOCKET, SO_MEMINFO): nine u32, the last one sk_drops, which
#: on a listener counts the connections its full accept queue dropped (the
#: kernel's tcp_listendrop), for this socket alone, unlike /proc/net/netstat.
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8


def listener_drops(sock: Any) -> Optional[int]:
    """Connections the listening socket sock has dropped, or None if unknown.

    Unknown with TCP_DEFER_ACCEPT on (``ListenConfig(defer_accept=...)``):
    the kernel then drops the bare ACK that ends every handshake, to wait
    for the client's data, and counts each in the same sk_drops (and in
    TcpExt's TCPDeferAcceptDrop), so the figure no longer tells a full
    queue."""
    if deferring(sock):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
        return int.from_bytes(raw[4 * SK_MEMINFO_DROPS:4 * SK_MEMINFO_DROPS + 4],
                              sys.byteorder)
    except (OSError, AttributeError, TypeError, ValueError):
        return None


def deferring(sock: Any) -> bool:
    """True if the listening socket sock has TCP_DEFER_ACCEPT on."""
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT))
    except (OSError, AttributeError, TypeError, ValueError):
        return False     # a Unix socket, or no such option here


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used, in
    seconds, from /proc/PID/stat (clock-tick resolution)."""
    text = read_proc(f"/proc/{pid}/stat")
    if text is None:
        raise ProcessLookupError(f"no process {pid} (or no /proc)")
    # the command name (field 2) may hold spaces and parentheses: split after it
    fields = text.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _per_thread(pid: int, name: str) -> List[str]:
    """The text of /proc/PID/task/*/NAME for every thread of process pid
    (those that could be read)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    texts = (read_proc(f"/proc/{pid}/task/{task}/{name}") for task in tasks)
    return [text for text in texts if text is not None]


def context_switches(pid: int) -> int:
    """Context switches (voluntary and not, all threads) process ``pid``
    has made, from /proc/PID/task/*/status; 0 where unreadable."""
    return sum(int(line.split()[1]) for text in _per_thread(pid, "status")
               for line in text.splitlines()
               if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))


def open_sockets(pid: int) -> int:
    """How many sockets process ``pid`` has open (/proc/PID/fd); 0 where unreadable."""
    n = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass        # closed meanwhile
    return n


def children(pid: int) -> List[int]:
    """The child processes of process ``pid`` (forked by any of its
    threads), from /proc/PID/task/*/children."""
    return [int(child) for text in _per_thread(pid, "children") for child in text.split()]


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


def descriptor_headroom() -> Optional[int]:
    """How many more descriptors this process may open now: the soft
    RLIMIT_NOFILE minus those open (counted in /proc/self/fd).  None when
    either is unknown or there is no limit."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return None
        open_now = len(os.listdir("/proc/self/fd")) - 1     # less the listing's own
    except (ImportError, OSError):
        return None
    return max(soft - open_now, 0)


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

    return {
        "fastlisten": VERSION,
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


# -- who holds an address (for the explanations in fastlisten.errors) ---------

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
