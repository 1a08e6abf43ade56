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

import contextlib
import errno
import importlib
import os
import socket
import stat
import traceback
from typing import Any, Iterator, Optional

from fastlisten import sysinfo
from fastlisten.address import format_address
from fastlisten.sysinfo import find_holders

__all__ = [
    "FastlistenWarning", "EphemeralPortWarning", "BacklogTruncatedWarning",
    "OptionIneffectiveWarning", "explain_bind_error", "stale_socket_hint", "format_address",
    "find_holders", "warn", "warn_if_ephemeral", "effective_backlog", "user_traceback",
    "user_error_line", "speaking", "spell", "reuse_hint", "explain_no_systemd_socket",
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


# -- the caller's vocabulary --------------------------------------------------

#: The vocabularies explanations speak: the keywords of fastlisten.listen()
#: and ListenConfig, or the flags of the ``fastlisten`` command.
VOCABULARIES = ("python", "command line")

_vocabulary = "python"


@contextlib.contextmanager
def speaking(vocabulary: str) -> Iterator[None]:
    """Within the block, explanations name options as ``vocabulary`` says:
    "python" (``fd='systemd'``, the default) or "command line" (``--fd
    systemd``), which the ``fastlisten`` command speaks, so that its users
    read the flags they type."""
    global _vocabulary
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {', '.join(VOCABULARIES)}, "
                         f"not {vocabulary!r}")
    previous, _vocabulary = _vocabulary, vocabulary
    try:
        yield
    finally:
        _vocabulary = previous


def spell(option: str, value: Any) -> str:
    """``option=value`` as the caller writes it: ``fd='systemd'`` in Python,
    ``--fd systemd`` on the command line, whose flags come from the
    ListenConfig fields (a flag that switches a default off stands alone:
    ``unlink_stale=False`` is ``--keep-stale``; the default itself is
    "without" that flag)."""
    if _vocabulary == "python":
        return f"{option}={value!r}"
    from fastlisten.config import option_fields

    field = next((f for f in option_fields() if f.name == option), None)
    if field is None:
        return f"{option}={value!r}"
    flag = field.metadata.get("flag", "--" + option.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value != field.default else f"without {flag}"
    return f"{flag} {value}"


def _either(python: str, command_line: str) -> str:
    """The words of the caller's vocabulary."""
    return python if _vocabulary == "python" else command_line


# -- the explanations -------------------------------------------------------

def stale_socket_hint(config: Any, server: bool = False) -> str:
    """What to do about a Unix socket file nobody listens on that blocks a
    bind, for the caller that met it: ``config`` is the ListenConfig the
    bind came from (None: none), ``server`` True for a socketserver class."""
    if config is None:
        if server:
            return ("socketserver's UnixStreamServer leaves it in place: remove it before "
                    "creating the server, or give the server class listen_config = "
                    "fastlisten.ListenConfig(), whose unlink_stale=True (the default) "
                    "removes a socket file nobody listens on")
        return ("remove it before binding, or bind with fastlisten.listen(), whose "
                "unlink_stale=True (the default) removes a socket file nobody listens on")
    if not config.unlink_stale:
        return (f"{spell('unlink_stale', False)} leaves it in place: remove it, or "
                f"{_either('leave unlink_stale at True (the default)', 'leave out --keep-stale')}"
                " to have fastlisten remove a socket file nobody listens on")
    return ("it still answered when fastlisten checked it (fastlisten removes only a "
            "socket nobody listens on): stop whatever uses it, or choose another path")


def _explain_addrinuse(family: int, address: Any, hint: Optional[str]) -> str:
    """``hint``: the caller's way out of a leftover Unix socket file (Unix)
    or of a port held by a connection in TIME_WAIT (TCP)."""
    where = format_address(address)
    holders = find_holders(family, address)
    if family == socket.AF_UNIX:
        path = address if isinstance(address, str) else os.fsdecode(address)
        if not holders:
            if os.path.lexists(path) and not _is_socket(path):
                return (f"{where} exists and is not a socket; fastlisten leaves it "
                        "alone: remove it or choose another path")
            return f"{where} exists; {hint or 'remove it before binding'}"
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
            f"(TIME_WAIT). {hint or reuse_hint()}; "
            "otherwise choose another port, or port 0")


def reuse_hint() -> str:
    """How fastlisten.listen() (and the command line) gets past a port held
    by TIME_WAIT connections (Linux lets a bind pass them only when both
    sockets set SO_REUSEADDR)."""
    return (f"SO_REUSEADDR ({spell('reuse_address', True)}, the default) rebinds over the "
            "TIME_WAIT connections of a socket that set it too (those of one that did not "
            "hold the port for up to 60 s)")


#: How a socketserver class gets past it (whose stdlib default is not to set
#: SO_REUSEADDR).
SERVER_REUSE_HINT = ("the server class sets no SO_REUSEADDR (allow_reuse_address = False, "
                     "the stdlib's default for TCPServer), so the connections a run leaves "
                     "in TIME_WAIT hold the port for up to 60 s after it ends: wait, and set "
                     "allow_reuse_address = True on the class (as http.server's servers do) "
                     "so that the next restart rebinds over them")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _explain_addrnotavail(family: int, address: Any, stale_hint: Optional[str]) -> str:
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


def _explain_acces(family: int, address: Any, stale_hint: Optional[str]) -> str:
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
                f"open the socket and pass it in ({spell('fd', 'systemd')})")
    return (f"{where}: permission denied by the system (a security module or "
            "firewall policy, not the port number)")


def _explain_no_directory(family: int, address: Any, stale_hint: Optional[str]) -> str:
    path = address if isinstance(address, str) else os.fsdecode(address)
    parent = os.path.dirname(path) or "."
    if os.path.lexists(parent):
        problem, fix = f"{parent} is not a directory", "choose another path"
    else:
        problem = f"directory {parent} does not exist"
        fix = f"create it first ({_either('os.makedirs', f'mkdir -p {parent}')})"
        if not os.path.isabs(parent):
            problem += f" (in {os.getcwd()})"
    return (f"{format_address(address)}: {problem}; a Unix socket is created in an "
            f"existing directory: {fix}")


_EXPLAINERS = {
    errno.EADDRINUSE: _explain_addrinuse,
    errno.EADDRNOTAVAIL: _explain_addrnotavail,
    errno.EACCES: _explain_acces,
    errno.ENOENT: _explain_no_directory,
    errno.ENOTDIR: _explain_no_directory,
}

#: Errors explained only for a Unix socket path.
_UNIX_ONLY = (errno.ENOENT, errno.ENOTDIR)


def explain_no_systemd_socket() -> OSError:
    """OSError(EBADF) for ``fd='systemd'`` (``--fd systemd``) in a process
    that systemd passed no socket."""
    return OSError(errno.EBADF,
                   f"{os.strerror(errno.EBADF)}: {spell('fd', 'systemd')} but no socket was "
                   f"passed to this process (pid {os.getpid()}): LISTEN_PID and LISTEN_FDS "
                   "are unset or name another process. Run it under systemd socket "
                   "activation (or systemd-socket-activate)")


def explain_bind_error(exc: OSError, family: int, address: Any,
                       stale_hint: Optional[str] = None,
                       reuse_hint: Optional[str] = None) -> OSError:
    """The same error with a message that explains it.

    For EADDRINUSE, EADDRNOTAVAIL and EACCES from bind() (and, for a Unix
    path, ENOENT and ENOTDIR), returns a new exception of ``type(exc)`` with
    ``errno`` intact and a message naming ``address``, the holder, this
    machine's addresses or the way out; any other error comes back
    unchanged.  ``stale_hint`` says what to do about a leftover Unix socket
    file (see stale_socket_hint()), ``reuse_hint`` about a TCP port held by
    connections in TIME_WAIT (default: reuse_hint()).  Use as
    ``raise explain_bind_error(e, family, addr) from None``.
    """
    explainer = _EXPLAINERS.get(exc.errno)  # type: ignore[arg-type]
    if explainer is None or (family != socket.AF_UNIX and exc.errno in _UNIX_ONLY):
        return exc
    try:
        detail = explainer(family, address,
                           stale_hint if family == socket.AF_UNIX else reuse_hint)
    except Exception:  # noqa: BLE001 - an explanation must never hide the error
        return exc
    strerror = exc.strerror or os.strerror(exc.errno)  # type: ignore[arg-type]
    new = type(exc)(exc.errno, f"{strerror}: {detail}")
    new.__traceback__ = exc.__traceback__
    return new


# -- the caller's own traceback --------------------------------------------------

#: Where the frames of fastlisten and of the import system come from.
_MACHINERY_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep
                        for path in (importlib.__file__, __file__))


def _machinery(filename: str) -> bool:
    """True for a frame of fastlisten or of the import system."""
    return filename.startswith("<frozen importlib") or \
        os.path.abspath(filename).startswith(_MACHINERY_DIRS)


def _only_callers_frames(te: Any) -> None:
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if not _machinery(f.filename)])
    for chained in (te.__cause__, te.__context__):
        if chained is not None:
            _only_callers_frames(chained)


def user_traceback(exc: BaseException) -> str:
    """``exc`` as Python prints it, with the caller's own frames only: those
    of fastlisten and of the import system (importlib, ``<frozen ...>``),
    which say nothing about the caller's code, are left out.  The type, file
    and line stay (a SyntaxError's with its caret); so do chained exceptions,
    filtered alike.  No trailing newline."""
    te = traceback.TracebackException.from_exception(exc)
    _only_callers_frames(te)
    return "".join(te.format()).rstrip("\n")


def user_error_line(exc: BaseException) -> str:
    """``exc`` on one line: its type, the first line of its message, and
    where in the caller's own code it was raised (file name, line), as in
    ``SyntaxError: expected ':' (app.py, line 2)``."""
    if isinstance(exc, SyntaxError) and exc.filename:
        message: Any = exc.msg
        where: Optional[str] = f"{os.path.basename(exc.filename)}, line {exc.lineno}"
    else:
        message = str(exc)
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if not _machinery(f.filename)]
        where = (f"{os.path.basename(frames[-1].filename)}, line {frames[-1].lineno}"
                 if frames else None)
    first = (str(message).splitlines() or [""])[0]
    line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{line} ({where})" if where else line


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
