"""Pure-Python twin of the C load generator (``fastlisten.benchmark._native.loadgen_run``).

Used when the compiled core is absent or ``FASTLISTEN_NO_EXTENSIONS=1``:
same arguments, same result dict, built on ``selectors`` and non-blocking
sockets.  It is much slower than the C loop (it holds the GIL and makes a
Python object per connection), so it measures the tool, not the servers.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from array import array
from typing import Any, Dict, List, Tuple

_TICK = 0.01


class _Conn:
    __slots__ = ("sock", "t0", "sent", "nread")

    def __init__(self, sock: socket.socket, t0: int) -> None:
        self.sock = sock
        self.t0 = t0
        self.sent = 0
        self.nread = 0


def loadgen_run(address: Tuple[str, int], scenario: str, concurrency: int, total: int,
                duration: float, timeout: float, src_spread: int = 0,
                request: bytes = b"", expect_min: int = 1) -> Dict[str, Any]:
    """See ``fastlisten.benchmark.loadgen.run_load`` (which checks arguments)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    res: Dict[str, Any] = {"started": 0, "completed": 0, "errors": 0, "timeouts": 0, "aborted": 0,
           "bytes_in": 0, "first_errno": 0, "window_completed": 0}
    lats = array("I")
    sel = selectors.DefaultSelector()
    live: List[_Conn] = []
    conc = max(1, total) if scenario == "burst" else concurrency
    now = time.monotonic_ns
    t_start = now()
    t_stop_launch = t_start + int(duration * 1e9)
    t_hard_end = t_stop_launch + int(timeout * 1e9)
    limit = int(timeout * 1e9)
    t_last = 0

    def error(err: int) -> None:
        res["errors"] += 1
        if not res["first_errno"]:
            res["first_errno"] = err

    def release(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()
        live.remove(c)

    def launch() -> None:
        res["started"] += 1
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if src_spread > 1 and family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
                sock.bind((f"127.0.0.{1 + res['started'] % src_spread}", 0))
            err = sock.connect_ex(address)
        except OSError as exc:
            sock.close()
            error(exc.errno or errno.EIO)
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            error(err)
            return
        c = _Conn(sock, now())
        live.append(c)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    def event(c: _Conn, mask: int) -> None:
        if c.sent < len(request):
            if mask & selectors.EVENT_WRITE:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    error(err)
                    release(c)
                    return
                try:
                    c.sent += c.sock.send(request[c.sent:])
                except BlockingIOError:
                    return
                except OSError as exc:
                    error(exc.errno or errno.EIO)
                    release(c)
                    return
            if c.sent >= len(request):
                sel.modify(c.sock, selectors.EVENT_READ, c)
            if not mask & selectors.EVENT_READ:
                return
        elif mask == selectors.EVENT_WRITE:
            sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        while True:
            try:
                data = c.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as exc:
                error(exc.errno or errno.EIO)
                release(c)
                return
            if not data:
                break
            c.nread += len(data)
            res["bytes_in"] += len(data)
        if c.nread < expect_min:
            error(errno.EPROTO)
        else:
            res["completed"] += 1
            if now() < t_stop_launch:
                res["window_completed"] += 1
            lats.append(min(0xFFFFFFFF, (now() - c.t0) // 1000))
        release(c)

    try:
        while len(live) < conc and res["started"] < total:
            launch()
        t_next_scan = t_start + int(_TICK * 1e9)
        while True:
            t = now()
            if scenario != "burst":
                while len(live) < conc and res["started"] < total and t < t_stop_launch:
                    launch()
            if not live or t >= t_hard_end:
                break
            events = sel.select(_TICK)
            for key, mask in events:
                event(key.data, mask)
            if events:
                t_last = now()
            t = now()
            if t >= t_next_scan:
                for c in [c for c in live if t - c.t0 > limit]:
                    res["timeouts"] += 1
                    if not res["first_errno"]:
                        res["first_errno"] = errno.ETIMEDOUT
                    release(c)
                t_next_scan = t + int(_TICK * 1e9)
    finally:
        res["aborted"] = len(live)
        for c in list(live):
            release(c)
        sel.close()
    t_end = t_last if t_last > t_start else now()
    res["elapsed"] = (t_end - t_start) / 1e9
    res["window"] = (min(t_end, t_stop_launch) - t_start) / 1e9
    res["latencies_us"] = lats
    res["interrupted"] = False
    return res
