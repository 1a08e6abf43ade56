"""A StreamRequestHandler's rfile and wfile: the core's SocketReader and
SocketWriter against the stdlib's own objects (``sock.makefile("rb")`` and
``socketserver._SocketWriter``), step by step, on both cores.

Each test runs a script of calls on the stdlib's pair and on the core's,
each over its own fresh loopback connection fed the same bytes, and wants
the same results: values, exception types and messages.
"""

import array
import gc
import io
import os
import select
import socket
import socketserver
import struct
import threading

import pytest

import fastlisten
from fastlisten import _corepy


def _cores():
    out = [pytest.param(_corepy, id="pure")]
    try:
        from fastlisten import _core
    except ImportError:
        return out
    return [pytest.param(_core, id="compiled")] + out


@pytest.fixture(params=_cores())
def core(request):
    return request.param


class Conn:
    """A connected TCP pair on loopback: ``sock`` is the server's side."""

    def __init__(self):
        with socket.create_server(("127.0.0.1", 0)) as lst:
            self.peer = socket.create_connection(lst.getsockname(), timeout=5)
            self.sock, _ = lst.accept()
        self.sock.settimeout(5)

    def send(self, data):
        self.peer.sendall(data)
        # the bytes are in the server's receive queue before the script reads
        select.select([self.sock], [], [], 5)

    def received(self):
        self.peer.settimeout(5)
        chunks = []
        while True:
            data = self.peer.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def close(self):
        self.peer.close()
        self.sock.close()


def stdlib_files(sock):
    return sock.makefile("rb"), socketserver._SocketWriter(sock)


def core_files(core):
    def make(sock):
        return io.BufferedReader(core.SocketReader(sock)), core.SocketWriter(sock)
    return make


def outcome(fn, *args):
    """What fn(*args) gives: ("ok", value) or ("raise", type, message)."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:    # noqa: BLE001 - the exception is the result
        return ("raise", type(exc), str(exc))


def run_both(core, script):
    """script(conn, rfile, wfile) -> list of outcomes, for the stdlib's
    files and the core's, each on a fresh connection."""
    results = []
    for make in (stdlib_files, core_files(core)):
        conn = Conn()
        try:
            rfile, wfile = make(conn.sock)
            try:
                results.append(script(conn, rfile, wfile))
            finally:
                wfile.close()
                if not detached(rfile):
                    rfile.close()
        finally:
            conn.close()
    return results


def detached(rfile):
    try:
        rfile.closed    # noqa: B018 - raises once detached
    except ValueError:
        return True
    return False


def test_reads_line_by_line_and_in_sizes(core):
    def script(conn, rfile, wfile):
        conn.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\nbody-bytes-0123456789")
        out = [rfile.readline(), rfile.readline(65537), rfile.peek(2)[:2], rfile.readline(),
               rfile.read(4), rfile.read1(3), bytearray(5)]
        out.append(rfile.readinto(out[-1]))
        conn.peer.shutdown(socket.SHUT_WR)
        out += [rfile.read(), rfile.read(), rfile.readline(), rfile.read1(10)]
        return out
    std, ours = run_both(core, script)
    assert std == ours
    assert std[0] == b"GET / HTTP/1.0\r\n" and std[-3:] == [b"", b"", b""]


def test_iteration_readlines_and_limits(core):
    def script(conn, rfile, wfile):
        conn.send(b"one\ntwo\nthree\nfour\nfive")
        conn.peer.shutdown(socket.SHUT_WR)
        return [rfile.readline(2), rfile.readline(), rfile.readlines(5), list(rfile)]
    std, ours = run_both(core, script)
    assert std == ours == [b"on", b"e\n", [b"two\n", b"three\n"], [b"four\n", b"five"]]


def test_a_timeout_leaves_the_buffer_and_then_refuses(core):
    def script(conn, rfile, wfile):
        conn.send(b"abc")
        conn.sock.settimeout(0.05)
        return [outcome(rfile.readline), outcome(rfile.read, 3), outcome(rfile.read, 1),
                outcome(rfile.readline)]
    std, ours = run_both(core, script)
    assert std == ours
    assert std[0][1] is socket.timeout
    assert std[1] == std[2] == ("raise", OSError, "cannot read from timed out object")


def test_non_blocking_with_nothing_to_read(core):
    def script(conn, rfile, wfile):
        conn.sock.setblocking(False)
        first = outcome(rfile.read, 10)
        conn.send(b"xy")
        return [first, outcome(rfile.read1, 10), outcome(rfile.read, 10),
                outcome(rfile.raw.readinto, bytearray(4)), outcome(rfile.raw.read, 4),
                outcome(rfile.raw.readall)]
    std, ours = run_both(core, script)
    assert std == ours
    assert std[0] == ("ok", None) and std[1] == ("ok", b"xy")


def test_the_raw_stream_answers_as_socket_io(core):
    def script(conn, rfile, wfile):
        raw = rfile.raw
        conn.send(b"line one\nline two\nrest")
        conn.peer.shutdown(socket.SHUT_WR)
        fd = conn.sock.fileno()
        out = [isinstance(raw, io.RawIOBase), raw.mode, raw.name == fd, raw.fileno() == fd,
               raw.readable(), raw.writable(), raw.seekable(), raw.isatty(), raw.closed,
               rfile.mode, rfile.name == fd, repr(rfile).replace(str(fd), "FD"),
               outcome(raw.tell), outcome(raw.seek, 0), outcome(raw.truncate),
               outcome(raw.write, b"x"), outcome(rfile.tell), outcome(rfile.seekable),
               outcome(raw.flush), outcome(rfile.flush), outcome(rfile.isatty),
               outcome(raw.readinto, b"read-only"), outcome(raw.readinto, "text"),
               raw.read(5), raw.readline(), raw.readline(3), raw.readlines(), raw.readall(),
               raw.read(2)]
        with raw as entered:
            out.append(entered is raw)
        out += [raw.closed, raw.name]
        for call in (raw.readable, raw.writable, raw.seekable, raw.fileno, raw.flush,
                     raw.isatty, raw.__iter__, raw.__enter__, raw.readall):
            out.append(outcome(call))
        out += [outcome(raw.readinto, bytearray(1)), outcome(raw.read, 1)]
        out += [rfile.closed, outcome(rfile.read, 1), outcome(rfile.readline),
                outcome(rfile.fileno), outcome(rfile.peek), outcome(rfile.readable)]
        return out
    std, ours = run_both(core, script)
    assert std == ours
    assert std[0] is True and std[12][1] is io.UnsupportedOperation


def test_detach_and_iterate_the_raw_stream(core):
    def script(conn, rfile, wfile):
        conn.send(b"a\nbb\nccc")
        conn.peer.shutdown(socket.SHUT_WR)
        raw = rfile.detach()
        try:
            return [list(raw), raw.read(), outcome(rfile.read), outcome(repr, rfile) != ""]
        finally:
            raw.close()
    std, ours = run_both(core, script)
    assert std == ours and std[0] == [b"a\n", b"bb\n", b"ccc"]


def test_the_writer_answers_as_the_stdlibs(core):
    def script(conn, rfile, wfile):
        ints = array.array("i", [1, 2, 3])
        out = [isinstance(wfile, io.BufferedIOBase), wfile.write(b"hello "),
               wfile.write(memoryview(ints)), wfile.write(bytearray(b"!")),
               outcome(wfile.writelines, [b" a", b" b"]),
               wfile.writable(), wfile.readable(), wfile.seekable(), wfile.isatty(),
               wfile.fileno() == conn.sock.fileno(), wfile.closed, outcome(wfile.flush)]
        for call, args in ((wfile.read, ()), (wfile.read1, ()), (wfile.readinto, (bytearray(2),)),
                           (wfile.readinto1, (bytearray(2),)), (wfile.detach, ()),
                           (wfile.tell, ()), (wfile.seek, (0,)), (wfile.truncate, ()),
                           (wfile.write, ("text",))):
            out.append(outcome(call, *args))
        with wfile as entered:
            out.append(entered is wfile)
        out += [wfile.closed, outcome(wfile.flush), outcome(wfile.isatty),
                outcome(wfile.writelines, [b"x"]), outcome(wfile.__enter__),
                outcome(wfile.write, b" after close"), outcome(wfile.close)]
        conn.sock.shutdown(socket.SHUT_WR)
        out.append(conn.received())
        return out
    std, ours = run_both(core, script)
    assert std == ours
    assert std[1:4] == [6, 12, 1] and std[-1].endswith(b" a b after close")


def test_a_reset_connection_raises_alike(core):
    """The first try (without waiting) meets the reset: the same exception
    as the socket's own recv_into and sendall raise."""
    def script(conn, rfile, wfile):
        conn.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.peer.close()       # RST
        select.select([conn.sock], [], [], 5)
        out = [outcome(rfile.read1, 10), outcome(rfile.read1, 10)]
        out += [outcome(wfile.write, b"x") for _ in range(3)]
        return out
    std, ours = run_both(core, script)
    assert std == ours
    assert std[0][1] is ConnectionResetError


def test_large_writes_go_out_whole(core):
    """A write larger than the socket's buffers: what the first try could
    not send goes through sendall, bytes and other buffers alike."""
    payload = bytes(range(256)) * 16384                  # 4 MiB
    ints = array.array("i", range(1 << 20))              # 4 MiB, item size 4

    def script(conn, rfile, wfile):
        got = []
        reader = threading.Thread(target=lambda: got.append(conn.received()))
        reader.start()
        try:
            counts = [wfile.write(payload), wfile.write(memoryview(ints)),
                      wfile.write(bytearray(b"end"))]
            conn.sock.shutdown(socket.SHUT_WR)
        finally:
            reader.join(10)
        return counts, got[0] == payload + ints.tobytes() + b"end"
    std, ours = run_both(core, script)
    assert std == ours == ([len(payload), len(ints) * ints.itemsize, 3], True)


def test_socket_subclasses_keep_their_own_methods(core):
    """For anything but a plain socket.socket (an SSLSocket, a subclass),
    the socket's own recv_into and sendall do the work."""
    class Shouting(socket.socket):
        def recv_into(self, buf, *args):
            n = super().recv_into(buf, *args)
            buf[:n] = bytes(buf[:n]).upper()
            return n

        def sendall(self, data, *args):
            return super().sendall(bytes(data).upper(), *args)

    def script(conn, rfile, wfile):
        fd = conn.sock.detach()
        conn.sock = Shouting(fileno=fd)
        conn.sock.settimeout(5)
        return [conn.sock]

    for make in (stdlib_files, core_files(core)):
        conn = Conn()
        try:
            script(conn, None, None)
            rfile, wfile = make(conn.sock)
            conn.send(b"quiet line\n")
            assert rfile.readline() == b"QUIET LINE\n"
            assert wfile.write(b"reply") == 5
            conn.sock.shutdown(socket.SHUT_WR)
            assert conn.received() == b"REPLY"
            wfile.close()
            rfile.close()
        finally:
            conn.close()


def test_a_detached_socket_fails_alike(core):
    def script(conn, rfile, wfile):
        fd = conn.sock.detach()
        try:
            return [outcome(rfile.read1, 1), outcome(wfile.write, b"x"),
                    outcome(rfile.raw.fileno)]
        finally:
            os.close(fd)
    std, ours = run_both(core, script)
    assert std == ours and std[0][1] is OSError


def test_the_socket_closes_when_its_last_file_does(core):
    """makefile()'s reference: sock.close() leaves the descriptor open until
    rfile is closed (or collected)."""
    def script(conn, rfile, wfile):
        conn.sock.close()
        out = [conn.sock.fileno() >= 0]
        rfile.close()
        out.append(conn.sock.fileno())
        return out

    assert run_both(core, script) == [[True, -1], [True, -1]]
    for make in (stdlib_files, core_files(core)):
        conn = Conn()
        try:
            rfile, wfile = make(conn.sock)
            conn.sock.close()
            assert conn.sock.fileno() >= 0
            del rfile
            gc.collect()
            assert conn.sock.fileno() == -1
            wfile.close()
        finally:
            conn.close()


def test_the_reader_needs_a_socket(core):
    with pytest.raises(AttributeError):
        core.SocketReader(object())


# -- through a server -----------------------------------------------------

def _echo_through(handler_class, payload=b"ping\n", also=None):
    seen = {}

    class Handler(handler_class):
        def handle(self):
            seen["rfile"], seen["wfile"] = type(self.rfile), type(self.wfile)
            seen["raw"] = type(getattr(self.rfile, "raw", None))
            seen["timeout"] = self.connection.gettimeout()
            seen["nodelay"] = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            if also is not None:
                also(self)
            self.wfile.write(self.rfile.readline())

    with fastlisten.TCPServer(("127.0.0.1", 0), Handler) as server:
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 5})
        t.start()
        try:
            with socket.create_connection(server.server_address, timeout=5) as c:
                c.sendall(payload)
                reply = c.makefile("rb").read()
        finally:
            server.shutdown()
            t.join()
    return reply, seen


@pytest.mark.parametrize("rbufsize, wbufsize, fast_reader, fast_writer", [
    (-1, 0, True, True), (1, 0, True, True), (4096, 0, True, True),
    (-1, 8192, True, False), (0, 0, False, False), (0, 8192, False, False)])
def test_handler_builds_what_its_settings_ask(rbufsize, wbufsize, fast_reader, fast_writer):
    class Handler(fastlisten.StreamRequestHandler):
        pass
    Handler.rbufsize, Handler.wbufsize = rbufsize, wbufsize
    Handler.timeout, Handler.disable_nagle_algorithm = 7.0, True
    reply, seen = _echo_through(Handler)
    assert reply == b"ping\n"
    reader, writer = fastlisten._backend.SocketReader, fastlisten._backend.SocketWriter
    if fast_reader:
        assert seen["rfile"] is io.BufferedReader and seen["raw"] is reader
    else:
        assert seen["rfile"] is socket.SocketIO     # rbufsize 0: unbuffered, as the stdlib's
    if fast_writer:
        assert seen["wfile"] is writer
    else:
        assert seen["wfile"] is (io.BufferedWriter if wbufsize else socketserver._SocketWriter)
    assert seen["timeout"] == 7.0 and seen["nodelay"] != 0


def test_handler_is_the_stdlibs_class_underneath():
    assert issubclass(fastlisten.StreamRequestHandler, socketserver.StreamRequestHandler)
    assert fastlisten.StreamRequestHandler.finish is socketserver.StreamRequestHandler.finish
    reply, seen = _echo_through(socketserver.StreamRequestHandler)
    assert reply == b"ping\n" and seen["raw"] is socket.SocketIO


def test_handler_leaves_the_socket_open_while_a_file_holds_it():
    """finish() closes rfile and wfile; the server's close of the request
    waits for a file the handler kept (the stdlib's _io_refs)."""
    kept = {}

    def keep(handler):
        kept["extra"] = handler.connection.makefile("rb")

    reply, _ = _echo_through(fastlisten.StreamRequestHandler, also=keep)
    assert reply == b"ping\n"
    extra = kept.pop("extra")
    assert extra.raw._sock.fileno() >= 0          # still open: a file holds it
    sock = extra.raw._sock
    extra.close()
    assert sock.fileno() == -1
