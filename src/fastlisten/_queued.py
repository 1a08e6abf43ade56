"""Serving what the kernel queued before a listening socket closes.

Closing a listening socket resets every connection the kernel had
completed and queued on it (the clients read ECONNRESET).  A graceful stop
takes them first: :func:`serve_queued` makes the kernel stop completing new
handshakes on the socket (:func:`close_door`), then hands each queued
connection to the server as its serving loop would.  ``fastlisten serve``
(one process) and :class:`fastlisten.Workers` (every stop that closes a
socket: SIGTERM/SIGINT, a reuse-port slot that goes away) both use it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct
from time import monotonic
from typing import Any, Optional

__all__ = ["close_door", "grace_left", "hand_over", "serve_queued"]

_log = logging.getLogger("fastlisten")

_SO_ATTACH_FILTER = 26

#: Seconds a stop's wait for the connections waiting in the accept filter
#: lasts at most in one accept_many call: the core returns when one becomes
#: ready, not when one is dropped (closed by its client, expired), so the
#: stop sees within this much that none waits any more.
_WAITING_TICK = 0.1

# A classic BPF socket filter (linux/filter.h) run on each segment that
# reaches the listening socket (skb data starts at the TCP header): drop a
# SYN without ACK (a new handshake: the client retries it, and once the
# socket is closed is refused), keep the rest, so that a handshake already
# under way completes into the queue and is served.  Children accepted later
# inherit the filter; a bare SYN means nothing to an established connection.
_BPF_LD_B_ABS = 0x00 | 0x10 | 0x20      # BPF_LD | BPF_B | BPF_ABS
_BPF_ALU_AND_K = 0x04 | 0x50 | 0x00     # BPF_ALU | BPF_AND | BPF_K
_BPF_JEQ_K = 0x05 | 0x10 | 0x00         # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06 | 0x00                # BPF_RET | BPF_K
_TH_SYN, _TH_ACK = 0x02, 0x10
_DROP_NEW_HANDSHAKES = (
    (_BPF_LD_B_ABS, 0, 0, 13),                  # A = TCP flags
    (_BPF_ALU_AND_K, 0, 0, _TH_SYN | _TH_ACK),
    (_BPF_JEQ_K, 0, 1, _TH_SYN),                # a bare SYN ? drop : keep
    (_BPF_RET_K, 0, 0, 0),
    (_BPF_RET_K, 0, 0, 0xFFFFFFFF),
)


def close_door(sock: socket.socket) -> bool:
    """Make the kernel complete no new connection on the listening TCP
    socket ``sock`` (which stays open): what is queued, and handshakes
    already under way, stay to be accepted.  True when done; False for a
    socket that is not TCP (a Unix socket's queue is emptied as it is) or
    when the kernel refuses the filter (logged)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
            sock.type != socket.SOCK_STREAM:
        return False
    prog = _DROP_NEW_HANDSHAKES
    insns = (ctypes.c_uint8 * (8 * len(prog)))()
    for i, insn in enumerate(prog):
        struct.pack_into("=HBBI", insns, 8 * i, *insn)
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(insns))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        _log.warning("cannot stop new connections before closing %s (%s): a connection "
                     "that completes while the queue is emptied is reset",
                     sock.getsockname(), exc)
        return False
    return True


def serve_queued(server: Any, door: bool = True, timeout: Optional[float] = None) -> int:
    """Hand every connection queued on ``server.socket`` to the server, as
    its serving loop would (``verify_request``, ``process_request``; their
    errors go to ``handle_error``), after :func:`close_door` (with
    ``door``); returns how many were taken.  Call it after the serving loop
    stopped and before the socket closes.  Other processes may accept from
    the same socket meanwhile (Workers): each takes what it gets, until the
    queue is empty.  An accept error other than an empty queue ends it
    (logged).
    Without ``door`` (new connections are kept away otherwise: a reuse-port
    socket steered around), at most as many as are queued now (TCP) are
    taken.
    A fastlisten server with an accept filter takes them through its
    Listener instead: those ready at once are served; those still waiting
    in the filter (a client between its connect and its request) are
    served as they become ready within ``timeout`` seconds (a graceful
    stop's grace: None or 0, not at all), then the rest are closed
    (counted ``dropped['shutdown']``): nothing waits for a loop that has
    stopped.  The wait ends early once the server's end_handlers() ran.
    Meanwhile it takes no new connection (Listener.set_accepting): on a
    socket that others accept from too (a successor worker), those are
    theirs."""
    sock = server.socket
    if sock is None or sock.fileno() < 0:
        return 0
    limit = None
    if door:
        close_door(sock)
    elif sock.family in (socket.AF_INET, socket.AF_INET6):
        limit = _queued_now(sock)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    filtering = getattr(server, "_fl_filtering", None)
    listener = filtering() if filtering is not None else None
    if listener is not None:
        deadline = monotonic() + (timeout or 0.0)
        return _serve_filtered(server, listener, sock, poller, limit, deadline)
    taken = 0
    while (limit is None or taken < limit) and poller.poll(0):
        try:
            request, client_address = server.get_request()
        except (BlockingIOError, InterruptedError):
            continue        # another process took it; poll again
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                continue    # the client gave up while queued
            _log.warning("emptying the accept queue of %s stopped: %s",
                         sock.getsockname(), exc)
            break
        taken += 1
        hand_over(server, request, client_address)
    return taken


def grace_left(timeout: Optional[float], start: float) -> Optional[float]:
    """What is left now of a grace of ``timeout`` seconds that began at
    the monotonic ``start`` (at least 0); None or 0 (no grace) as given."""
    if not timeout:
        return timeout
    return max(0.0, timeout - (monotonic() - start))


def _serve_filtered(server: Any, listener: Any, sock: socket.socket, poller: Any,
                    limit: Optional[int], deadline: float) -> int:
    """serve_queued() through the server's filtering Listener over
    ``sock``: each round accepts what is queued (at least one connection:
    the socket polled readable); the ready ones are handed over, the rest
    wait in the filter.  Then, until the monotonic ``deadline``, the core
    waits (accept_many's timeout: no thread spins) for those to become
    ready and each is handed over as it does, until none waits (the core
    returns only with a ready connection: one that its client closes
    meanwhile is seen within _WAITING_TICK); the filter is emptied
    ('shutdown') at the end."""
    taken = rounds = 0
    # the core relies on EAGAIN (the socket is blocking again once the
    # serving loop returned); its mode is restored at the end
    os.set_blocking(sock.fileno(), False)
    try:
        while (limit is None or rounds < limit) and poller.poll(0):
            rounds += 1
            try:
                batch = listener.accept_many(64, 0)
            except OSError as exc:
                _log.warning("emptying the accept queue of %s stopped: %s",
                             listener.address, exc)
                break
            taken += _hand_batch(server, batch)
        # the connections accepted before the stop but still waiting for
        # their first bytes: served if they come within the grace
        count = listener.stats()["waiting"]
        if count and deadline > monotonic():
            _log.info("stopping: %d connection(s) waiting in the accept filter of %s get up "
                      "to %.3g s to become ready", count, listener.address,
                      deadline - monotonic())
        # (taking no new connection: where they keep coming, that would
        # take them from whoever else accepts on the socket, and the wait
        # would never see none waiting)
        listener.set_accepting(False)
        while listener.stats()["waiting"] and not getattr(server, "_fl_abandoned", False):
            left = deadline - monotonic()
            if left <= 0:
                break
            try:
                batch = listener.accept_many(64, min(left, _WAITING_TICK))
            except OSError as exc:
                _log.warning("serving the connections waiting in the accept filter of %s "
                             "stopped: %s", listener.address, exc)
                break
            taken += _hand_batch(server, batch)
    finally:
        listener.set_accepting(True)
        listener.close_waiting()
        sock.settimeout(sock.gettimeout())
    return taken


def _hand_batch(server: Any, batch: Any) -> int:
    """hand_over() each connection of ``batch``; returns how many.  On an
    exception the rest are closed."""
    for i, (request, client_address) in enumerate(batch):
        try:
            hand_over(server, request, client_address)
        except BaseException:
            for rest, _ in batch[i + 1:]:
                rest.close()
            raise
    return len(batch)


def _queued_now(sock: socket.socket) -> int:
    """Connections in the accept queue of the listening TCP socket now
    (TCP_INFO, as ``ss -lnt``); 0 when it cannot tell."""
    from fastlisten.listener import Listener

    try:
        probe = Listener(sock.family, fileno=sock.fileno(), proto=sock.proto, owned=False)
    except (OSError, TypeError):
        return 0
    try:
        return probe.queue()[0]
    except OSError:
        return 0
    finally:
        probe.close()


def hand_over(server: Any, request: Any, client_address: Any, verified: bool = False) -> None:
    """What the stdlib's serving loop does with an accepted connection:
    ``verify_request`` (unless ``verified``), then ``process_request``;
    its exception goes to ``handle_error``.  Once a fastlisten server's
    end_handlers() ran (a stop's grace is over), the connection is closed
    instead."""
    if getattr(server, "_fl_abandoned", False):
        server.shutdown_request(request)
        return
    if not verified:
        # (a fastlisten server: the PROXY header its accept filter waited
        # for is read first, so that verify_request sees the real client)
        front = getattr(server, "_fl_front", None)
        if front is not None:
            client_address = front(request, client_address)
            if client_address is None:
                server.shutdown_request(request)
                return
    if verified or server.verify_request(request, client_address):
        try:
            server.process_request(request, client_address)
        except Exception:
            server.handle_error(request, client_address)
            server.shutdown_request(request)
        except BaseException:
            server.shutdown_request(request)
            raise
    else:
        server.shutdown_request(request)
