"""One server under test, in its own process: ``python -m fastlisten.benchmark.serve``.

Usage: ``python -m fastlisten.benchmark.serve NAME SCENARIO`` starts server
NAME (see ``fastlisten.benchmark.servers``) on 127.0.0.1, port 0, with its
default settings, prints ``READY <port>`` and serves until told to stop.
Commands arrive one per line on stdin:

``mark``   answer ``MARK <user_s> <sys_s> <drops or -> <switches>``: CPU
           time of this process and its reaped children so far (getrusage),
           the connections its listener has dropped (SO_MEMINFO), and the
           context switches of this process's threads and its reaped
           children, voluntary and not (getrusage's nvcsw + nivcsw: what
           ``perf stat -e context-switches`` counts);
``stop``   stop the server (socketserver kinds: ``shutdown()``, timed from the
           call to ``serve_forever`` returning), close it (which reaps forked
           children), answer ``DONE <user_s> <sys_s> <shutdown_s or ->`` and exit.

EOF on stdin means stop.  ``--shutdown NAME CYCLES`` instead starts and
shuts down an idle server CYCLES times and prints the latencies as JSON.
``FASTLISTEN_BENCH_CPU`` pins the process (and so its threads and children)
to one CPU before anything else runs.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import resource
import socket
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from fastlisten.benchmark.protocol import HTTP_RESPONSE, REPLY
from fastlisten.benchmark.servers import READY_RULES, ServerSpec, by_name
from fastlisten.sysinfo import listener_drops

HOST = "127.0.0.1"


def cpu_times() -> Tuple[float, float]:
    """User and system CPU seconds of this process and its reaped children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Commands:
    """Lines from stdin, read with os.read (no buffering surprises)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buf = b""

    def next(self) -> str:
        """The next command; "stop" at EOF."""
        while b"\n" not in self.buf:
            data = os.read(self.fd, 4096)
            if not data:
                return "stop"
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().strip()

    def pending(self) -> bool:
        return b"\n" in self.buf


def context_switches() -> int:
    """Context switches so far of this process (every thread, those gone
    too) and its reaped children, voluntary and involuntary."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_nvcsw + me.ru_nivcsw + kids.ru_nvcsw + kids.ru_nivcsw


def _mark(listener: Any) -> None:
    u, s = cpu_times()
    drops = listener_drops(listener)
    _say(f"MARK {u:.6f} {s:.6f} {'-' if drops is None else drops} {context_switches()}")


def _done(shutdown_s: Optional[float]) -> None:
    u, s = cpu_times()
    _say(f"DONE {u:.6f} {s:.6f} {'-' if shutdown_s is None else f'{shutdown_s:.9f}'}")


# --- socketserver kinds (fastlisten and the standard library) ---------------

def handler_for(module: Any, scenario: str) -> type:
    """A request handler for scenario built on module's handler classes."""
    base = getattr(module, "BaseRequestHandler", None) or importlib.import_module(
        "socketserver").BaseRequestHandler
    stream = getattr(module, "StreamRequestHandler", None) or importlib.import_module(
        "socketserver").StreamRequestHandler

    if scenario == "echo":
        class EchoHandler(stream):  # type: ignore[misc, valid-type]
            def handle(self) -> None:
                self.wfile.write(self.rfile.readline())
        return EchoHandler
    if scenario == "http-close":
        class HttpHandler(stream):  # type: ignore[misc, valid-type]
            def handle(self) -> None:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                self.wfile.write(HTTP_RESPONSE)
        return HttpHandler

    class DaytimeHandler(base):  # type: ignore[misc, valid-type]
        def handle(self) -> None:
            self.request.sendall(REPLY)
    return DaytimeHandler


def _server_class(spec: ServerSpec, scenario: str = "daytime") -> Tuple[Any, type]:
    """The module and server class spec names; a ``filtered`` spec's with
    its accept filter set to the scenario's rule (READY_RULES)."""
    module = importlib.import_module(spec.module or "socketserver")
    cls = getattr(module, spec.cls or "")
    if spec.filtered:
        config = module.ListenConfig(ready_rule=READY_RULES[scenario])
        cls = type(cls.__name__, (cls,), {"listen_config": config})
    return module, cls


def serve_socketserver(spec: ServerSpec, scenario: str) -> None:
    module, cls = _server_class(spec, scenario)
    server = cls((HOST, 0), handler_for(module, scenario))
    returned: List[float] = []
    called: List[float] = []
    cmds = _Commands()

    def control() -> None:
        while True:
            cmd = cmds.next()
            if cmd == "mark":
                _mark(server.socket)
            elif cmd == "stop":
                called.append(time.perf_counter())
                server.shutdown()
                return

    _say(f"READY {server.server_address[1]}")
    ctl = threading.Thread(target=control, name="bench-control")
    ctl.start()
    try:
        server.serve_forever()
        returned.append(time.perf_counter())
    finally:
        ctl.join()
        server.server_close()
    _done(returned[0] - called[0] if returned and called else None)


def _idle_in_kernel(tid: int, limit: float = 0.2) -> None:
    """Wait (bounded) until thread tid is asleep in a system call other than
    futex (a GIL or lock wait), i.e. the server is idle in its wait."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open(f"/proc/self/task/{tid}/syscall") as f:
                nr = f.read().split()[0]
        except (OSError, IndexError):
            return  # no such interface here: the jitter below still applies
        if state == "S" and nr not in ("202", "running"):  # 202: futex (x86-64)
            return
        time.sleep(0.001)


def _runq_wait_s(path: str) -> float:
    """Seconds a thread has spent runnable but waiting for a CPU (schedstat)."""
    try:
        with open(path) as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def shutdown_latencies(spec: ServerSpec, cycles: int) -> List[Tuple[float, float]]:
    """(seconds from shutdown() to serve_forever returning, seconds of it the
    two threads involved spent waiting for a CPU other processes held), for
    an idle server, cycles times (each on a fresh server)."""
    module, cls = _server_class(spec)
    handler = handler_for(module, "daytime")
    out: List[Tuple[float, float]] = []
    for _ in range(cycles):
        server = cls((HOST, 0), handler)
        ready = threading.Event()
        tids: List[int] = []
        returned: List[float] = []

        def run() -> None:
            tids.append(threading.get_native_id())
            ready.set()
            server.serve_forever()
            returned.append(time.perf_counter())
            returned.append(_runq_wait_s("/proc/thread-self/schedstat"))

        t = threading.Thread(target=run, name="bench-serve")
        t.start()
        try:
            ready.wait(5.0)
            _idle_in_kernel(tids[0])
            # a random phase inside the server's wait, as a real caller has
            time.sleep(random.uniform(0.0, 0.02))
            serve_wait0 = _runq_wait_s(f"/proc/self/task/{tids[0]}/schedstat")
            my_wait0 = _runq_wait_s("/proc/thread-self/schedstat")
            t0 = time.perf_counter()
            server.shutdown()
            t.join()
            waited = (returned[1] - serve_wait0) + (
                _runq_wait_s("/proc/thread-self/schedstat") - my_wait0)
            out.append((returned[0] - t0, max(0.0, waited)))
        finally:
            t.join()
            server.server_close()
    return out


# --- asyncio and uvloop -------------------------------------------------------

def serve_asyncio(scenario: str, use_uvloop: bool) -> None:
    import asyncio

    async def daytime(reader: Any, writer: Any) -> None:
        writer.write(REPLY)
        await writer.drain()
        writer.close()

    async def echo(reader: Any, writer: Any) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    async def http(reader: Any, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HTTP_RESPONSE)
        await writer.drain()
        writer.close()

    handler = {"echo": echo, "http-close": http}.get(scenario, daytime)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        cmds = _Commands()

        def on_stdin() -> None:
            while True:
                cmd = cmds.next()
                if cmd == "mark":
                    _mark(server.sockets[0])
                elif cmd == "stop":
                    loop.remove_reader(0)
                    stop.set()
                    return
                if not cmds.pending():
                    return

        server = await asyncio.start_server(handler, HOST, 0)
        _say(f"READY {server.sockets[0].getsockname()[1]}")
        loop.add_reader(0, on_stdin)
        await stop.wait()
        server.close()
        await server.wait_closed()

    if use_uvloop:
        import uvloop
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    else:
        asyncio.run(main())
    _done(None)


# --- gevent -------------------------------------------------------------------

def serve_gevent(scenario: str) -> None:
    import gevent
    import gevent.event
    import gevent.server
    import gevent.socket

    end = b"\n" if scenario == "echo" else b"\r\n\r\n"

    def handle(sock: Any, addr: Any) -> None:
        if scenario in ("echo", "http-close"):
            data = b""
            while end not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                data += chunk
            sock.sendall(data[:data.index(b"\n") + 1] if scenario == "echo" else HTTP_RESPONSE)
        else:
            sock.sendall(REPLY)

    server = gevent.server.StreamServer((HOST, 0), handle)
    server.start()
    stop = gevent.event.Event()
    cmds = _Commands()

    def control() -> None:
        while True:
            if not cmds.pending():
                gevent.socket.wait_read(0)
            cmd = cmds.next()
            if cmd == "mark":
                _mark(server.socket)
            elif cmd == "stop":
                stop.set()
                return

    _say(f"READY {server.server_port}")
    g = gevent.spawn(control)
    stop.wait()
    g.join()
    server.stop()
    _done(None)


# --- the native reference loop ----------------------------------------------

def serve_native(scenario: str) -> None:
    from fastlisten.benchmark.loadgen import native_module
    from fastlisten.listener import default_backlog

    reply = HTTP_RESPONSE if scenario == "http-close" else REPLY
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
        lst.bind((HOST, 0))
        lst.listen(default_backlog())
        _say(f"READY {lst.getsockname()[1]}")
        cmds = _Commands()
        while True:
            if not cmds.pending():
                native_module().refserver_serve(lst.fileno(), 0, scenario, reply)
            cmd = cmds.next()
            if cmd == "mark":
                _mark(lst)
            elif cmd == "stop":
                break
    _done(None)


RUNNERS: dict = {
    "asyncio": lambda sc: serve_asyncio(sc, False),
    "uvloop": lambda sc: serve_asyncio(sc, True),
    "gevent": serve_gevent,
    "native": serve_native,
}


def serve(name: str, scenario: str) -> None:
    """Run server name for scenario until stdin says stop (see module doc)."""
    spec = by_name(name)
    scen = "daytime" if scenario == "burst" else scenario
    runner: Optional[Callable[[str], None]] = RUNNERS.get(spec.name)
    if runner is not None:
        runner(scen)
    else:
        serve_socketserver(spec, scen)


def _pin_from_env() -> None:
    cpu = os.environ.get("FASTLISTEN_BENCH_CPU")
    if cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu)})


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _pin_from_env()
    if argv and argv[0] == "--shutdown":
        print(json.dumps(shutdown_latencies(by_name(argv[1]), int(argv[2]))))
        return 0
    if len(argv) != 2:
        sys.stderr.write(__doc__ or "")
        return 2
    serve(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
