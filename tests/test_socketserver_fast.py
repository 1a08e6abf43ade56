"""What fastlisten's socketserver does beyond (or differently from) the
standard library: the core's loop, immediate shutdown, reused threads, the
backlog, install()."""

import http.server
import os
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading

import pytest
from helpers import kernel_somaxconn, serve_in_thread, shutdown_within
from test_socketserver_diff import LIMIT, EchoLine, ask, serving, wait_for

import fastlisten
from fastlisten import server as flserver
from fastlisten._threadpool import WorkerPool


def test_names_match_the_running_stdlib():
    assert flserver.__all__ == socketserver.__all__
    for name in socketserver.__all__:
        ours = getattr(fastlisten, name)
        assert getattr(flserver, name) is ours
        if isinstance(ours, type) and name.endswith(("Server", "MixIn")):
            assert ours is not getattr(socketserver, name)
            assert issubclass(ours, getattr(socketserver, name)), name
    assert fastlisten.BaseRequestHandler is socketserver.BaseRequestHandler
    assert fastlisten.DatagramRequestHandler is socketserver.DatagramRequestHandler
    # the one handler of fastlisten's own: the stdlib's, with its files built in the core
    assert issubclass(fastlisten.StreamRequestHandler, socketserver.StreamRequestHandler)
    assert fastlisten.StreamRequestHandler is not socketserver.StreamRequestHandler


def test_isinstance_against_both_modules():
    with fastlisten.ThreadingTCPServer(("127.0.0.1", 0), EchoLine) as server:
        for module in (socketserver, fastlisten):
            assert isinstance(server, module.TCPServer)
            assert isinstance(server, module.BaseServer)
            assert isinstance(server, module.ThreadingMixIn)


def _backlog_of(sock):
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[28:32], "little")   # tcpi_sacked: the backlog


def test_request_queue_size_is_somaxconn_unless_a_subclass_sets_it():
    class Own(fastlisten.TCPServer):
        request_queue_size = 7

    class OwnStd(socketserver.TCPServer):
        request_queue_size = 9

    class Mixed(fastlisten.ThreadingMixIn, http.server.HTTPServer):
        pass

    class MixedOwn(fastlisten.ThreadingMixIn, OwnStd):
        pass

    expected = kernel_somaxconn()
    for cls, backlog in ((fastlisten.TCPServer, expected), (Own, 7),
                         (Mixed, expected), (MixedOwn, 9)):
        with cls(("127.0.0.1", 0), EchoLine) as server:
            assert server.request_queue_size == backlog
            assert _backlog_of(server.socket) == backlog, cls


def _loop_while_serving(server):
    with serving(server):
        wait_for(lambda: server._fl_loop is not None)
        loop = server._fl_loop
        assert ask(server.server_address) == b"ping\n"
    assert server._fl_waker is None and server._fl_loop is None
    return loop


def test_the_core_serves_stream_servers_and_mixins_over_stdlib_bases():
    class Mixed(fastlisten.ThreadingMixIn, socketserver.TCPServer):
        pass

    assert _loop_while_serving(fastlisten.TCPServer(("127.0.0.1", 0), EchoLine)) == "batches"
    for cls in (fastlisten.ThreadingTCPServer, Mixed):     # leader/follower: workers accept
        assert _loop_while_serving(cls(("127.0.0.1", 0), EchoLine)) == "leader"


def test_overridden_get_request_keeps_the_stdlib_loop():
    class Custom(fastlisten.TCPServer):
        def get_request(self):
            return super().get_request()

    assert _loop_while_serving(Custom(("127.0.0.1", 0), EchoLine)) == "selector"

    patched = fastlisten.TCPServer(("127.0.0.1", 0), EchoLine)
    stock = patched.get_request
    calls = []
    patched.get_request = lambda: (calls.append(1), stock())[1]
    assert _loop_while_serving(patched) == "selector"   # replaced on the instance
    assert calls == [1]


@pytest.mark.parametrize("cls", [fastlisten.TCPServer, fastlisten.UDPServer])
def test_shutdown_does_not_wait_for_poll_interval(cls):
    # poll_interval=None: the loop would wait for ever for a connection;
    # shutdown() must still end it (the test's time limit catches a hang).
    server = cls(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    t = serve_in_thread(server, None)
    wait_for(lambda: server._fl_waker is not None)
    try:
        shutdown_within(server, t, LIMIT)
    finally:
        server.server_close()


def test_threads_are_reused():
    idents = []

    class Handler(EchoLine):
        def handle(self):
            idents.append(threading.get_ident())
            super().handle()

    class Handed(fastlisten.ThreadingTCPServer):
        def verify_request(self, request, client_address):  # today's hand-off path
            return True

    # the serving thread hands connections to the pool: one thread does
    server = Handed(("127.0.0.1", 0), Handler)
    with serving(server):
        for _ in range(5):
            assert ask(server.server_address) == b"ping\n"
            # the one thread is back in the pool before the next connection
            wait_for(lambda: server._fl_pool.busy == 0)
        assert len(server._fl_pool) == 1
        assert len(server._threads) == 0     # none busy
    assert len(set(idents)) == 1
    # leader/follower: one thread waits while another handles, so two do
    idents.clear()
    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    with serving(server):
        for _ in range(5):
            assert ask(server.server_address) == b"ping\n"
            wait_for(lambda: server._fl_pool.busy == 0)
        assert len(server._fl_pool) == 2
        assert len(server._threads) == 0
    assert len(set(idents)) <= 2


def test_idle_threads_retire():
    class S(fastlisten.ThreadingTCPServer):
        fl_thread_idle_timeout = 0.01

    class Handed(S):
        def verify_request(self, request, client_address):  # today's hand-off path
            return True

    server = Handed(("127.0.0.1", 0), EchoLine)
    with serving(server):
        assert ask(server.server_address) == b"ping\n"
        wait_for(lambda: len(server._fl_pool) == 0)
        assert ask(server.server_address) == b"ping\n"
    # (leader/follower keeps one thread waiting: test_leader_follower.py)


def test_daemon_threads():
    seen = []

    class Handler(EchoLine):
        def handle(self):
            seen.append(threading.current_thread().daemon)
            super().handle()

    class S(fastlisten.ThreadingTCPServer):
        daemon_threads = True

    server = S(("127.0.0.1", 0), Handler)
    with serving(server):
        assert ask(server.server_address) == b"ping\n"
    assert seen == [True]
    # daemon threads are not joined by server_close(); they retire on close
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("S-pool")])


def test_max_threads_queues_in_order_and_shutdown_drops_the_waiting_one():
    release = threading.Event()
    order = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            order.append(self.rfile.readline())
            release.wait(LIMIT)

    class Capped(fastlisten.ThreadingTCPServer):
        fl_max_threads = 1
        fl_max_queued = 1

        def verify_request(self, request, client_address):  # today's hand-off path
            return True     # (leader/follower queues nothing: test_leader_follower.py)

    server = Capped(("127.0.0.1", 0), Handler)
    clients = []
    with serving(server):
        for i in range(3):
            c = socket.create_connection(server.server_address, timeout=LIMIT)
            c.sendall(b"%d\n" % i)
            clients.append(c)
            if i == 0:
                wait_for(lambda: order == [b"0\n"])
            if i == 1:
                wait_for(lambda: server._fl_pool.queued == 1)
        # the loop took the third and waits for room for it (threading.Condition's waiters)
        wait_for(lambda: len(server._fl_pool._room._waiters) == 1)
        assert len(server._fl_pool) == 1 and len(server._threads) == 1
        # the loop is blocked waiting for room: shutdown() ends that wait at once
        # (well before the handler's release.wait(LIMIT) would make room)
        shutdown_within(server, limit=2.0)
        release.set()
    assert order == [b"0\n", b"1\n"]
    for c in clients:
        c.close()


def test_worker_pool_survives_a_job_raising_system_exit(monkeypatch):
    hooked = []
    monkeypatch.setattr(threading, "excepthook", lambda args: hooked.append(args.exc_type))
    done = []
    gate = threading.Event()
    pool = WorkerPool(max_threads=1, max_queued=5)

    def exiting():
        gate.wait(LIMIT)
        raise SystemExit

    assert pool.submit(exiting)
    assert pool.submit(done.append, 1)     # queued behind the exiting job
    gate.set()
    pool.join(LIMIT)
    assert done == [1] and hooked == [SystemExit]
    assert not pool.submit(done.append, 2)  # closed


def test_install_makes_later_imports_use_fastlisten():
    code = textwrap.dedent("""
        import sys
        import fastlisten
        fastlisten.install()
        import socketserver, http.server, threading, urllib.request
        assert socketserver is fastlisten.server
        assert issubclass(http.server.ThreadingHTTPServer, fastlisten.ThreadingMixIn)

        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"hello")
            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
        t = threading.Thread(target=server.serve_forever)
        t.start()
        url = "http://127.0.0.1:%d/" % server.server_address[1]
        with urllib.request.urlopen(url, timeout=10) as r:
            print(r.read().decode())
        server.shutdown()
        t.join()
        server.server_close()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello"


def test_install_after_a_module_built_on_socketserver_warns_naming_it():
    code = textwrap.dedent("""
        import warnings
        import http.server, xmlrpc.server
        import fastlisten
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fastlisten.install()
            fastlisten.install()            # once is enough
            import logging.config           # imported after: built on fastlisten
        assert issubclass(logging.config.ThreadingTCPServer, fastlisten.TCPServer)
        assert not issubclass(http.server.HTTPServer, fastlisten.TCPServer)
        for w in caught:
            print(w.category.__name__, w.filename, w.message)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("FastlistenWarning <string> ")    # points at the call
    assert "after http.server, xmlrpc.server imported" in lines[0]
    assert "logging" not in lines[0]


def test_server_close_from_a_handler_thread():
    # The stdlib raises RuntimeError here (it joins the current thread).
    closed = threading.Event()

    class Closing(socketserver.BaseRequestHandler):
        def handle(self):
            self.server.server_close()
            closed.set()

    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Closing)
    c = socket.create_connection(server.server_address, timeout=LIMIT)
    server.handle_request()
    assert closed.wait(LIMIT)
    assert server.socket.fileno() == -1
    c.close()


def test_a_base_with_its_own_loop_keeps_it():
    calls = []

    class OwnLoop(socketserver.TCPServer):
        def serve_forever(self, poll_interval=0.5):
            calls.append("serve_forever")
            super().serve_forever(poll_interval)

        def shutdown(self):
            calls.append("shutdown")
            super().shutdown()

    class Mixed(fastlisten.ThreadingMixIn, OwnLoop):
        pass

    server = Mixed(("127.0.0.1", 0), EchoLine)
    with serving(server, poll_interval=0.01):
        assert ask(server.server_address) == b"ping\n"
        assert server._fl_waker is None       # the stdlib's loop, not the core's
    assert calls == ["serve_forever", "shutdown"]
    assert not fastlisten.ThreadingTCPServer._fl_defer


def test_install_serves_logging_config_listen():
    code = textwrap.dedent("""
        import json, logging, socket, struct
        import fastlisten
        fastlisten.install()
        import logging.config
        assert issubclass(logging.config.ThreadingTCPServer, fastlisten.ThreadingTCPServer)

        t = logging.config.listen(0)
        t.start()
        assert t.ready.wait(10)
        config = json.dumps({"version": 1, "incremental": True,
                             "loggers": {"probe": {"level": "ERROR"}}}).encode()
        with socket.create_connection(("127.0.0.1", t.port), timeout=10) as c:
            c.sendall(struct.pack(">L", len(config)) + config)
            c.shutdown(socket.SHUT_WR)
            c.recv(1)          # the server closes once it has applied the config
        logging.config.stopListening()
        t.join(10)
        assert not t.is_alive()
        print(logging.getLevelName(logging.getLogger("probe").level))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ERROR"


def test_a_submit_waiting_for_room_goes_on_when_a_replacement_takes_a_job(monkeypatch):
    # The only thread ends by SystemExit while the queue is full; the thread
    # that replaces it takes the queued job, and the submit waiting for room
    # must go on.
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    gate, ran, dying = threading.Event(), [], []
    pool = WorkerPool(max_threads=1, max_queued=1, idle_timeout=30)

    def exiting():
        dying.append(threading.current_thread())
        gate.wait(LIMIT)
        raise SystemExit

    assert pool.submit(exiting)
    assert pool.submit(ran.append, 2)              # fills the queue
    third = threading.Thread(target=pool.submit, args=(ran.append, 3))
    third.start()
    wait_for(lambda: pool.queued == 1 and third.is_alive())
    gate.set()
    third.join(LIMIT)
    assert not third.is_alive()
    wait_for(lambda: ran == [2, 3])
    pool.close()
    pool.join(LIMIT)
    # The pool no longer counts the dying thread, so its join does not wait
    # for it; it must be gone (its excepthook run) before monkeypatch undoes.
    dying[0].join(LIMIT)
    assert not dying[0].is_alive()


def test_worker_pool_arguments():
    with pytest.raises(ValueError):
        WorkerPool(max_threads=0)
    with pytest.raises(ValueError):
        WorkerPool(max_threads=2, max_queued=0)
    assert WorkerPool(max_threads=3).max_queued == 3


def test_idle_threads_do_not_hold_the_interpreter_at_exit():
    # An unclosed server: at exit the interpreter joins non-daemon threads;
    # idle pool threads must leave then, not after thread_idle_timeout.
    code = textwrap.dedent("""
        import socket
        import fastlisten

        class S(fastlisten.ThreadingTCPServer):
            fl_thread_idle_timeout = 3600

        server = S(("127.0.0.1", 0), fastlisten.StreamRequestHandler)
        with socket.create_connection(server.server_address):
            server.handle_request()
        print(len(server._fl_pool))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_bind_failure_explains_itself_and_keeps_errno(host):
    import errno as _errno
    import os as _os

    holder = fastlisten.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    try:
        port = holder.server_address[1]

        class NoReuse(fastlisten.TCPServer):
            allow_reuse_address = False

        with pytest.raises(OSError) as info:
            NoReuse((host, port), socketserver.BaseRequestHandler)
        assert info.value.errno == _errno.EADDRINUSE
        assert type(info.value) is OSError        # the stdlib has no subclass for it
        assert f"127.0.0.1:{port}" in str(info.value)
        assert f"pid {_os.getpid()} " in str(info.value)
    finally:
        holder.server_close()


def test_stock_hooks_take_the_inline_path_with_the_same_behaviour():
    """A server that overrides no per-connection hook skips their chain; the
    handler, handle_error and the socket see what the hooks would do."""
    errors = []

    class Boom(socketserver.BaseRequestHandler):
        def handle(self):
            data = self.request.recv(10)
            if data == b"boom":
                raise ValueError("handler failed")
            self.request.sendall(b"ok")

    class Server(fastlisten.TCPServer):
        def handle_error(self, request, client_address):
            errors.append((request.fileno() >= 0, client_address))

    server = Server(("127.0.0.1", 0), Boom)
    assert server._fl_stock_hooks()
    with serving(server):
        assert ask(server.server_address, b"boom") == b""     # closed after handle_error
        assert ask(server.server_address, b"fine") == b"ok"   # and serving goes on
    assert len(errors) == 1 and errors[0][0]                   # called before the close

    class Hooked(Server):
        def verify_request(self, request, client_address):
            return True

    hooked = Hooked(("127.0.0.1", 0), Boom, bind_and_activate=False)
    patched = Server(("127.0.0.1", 0), Boom, bind_and_activate=False)
    patched.shutdown_request = lambda request: None
    try:
        assert not hooked._fl_stock_hooks()
        assert not patched._fl_stock_hooks()
    finally:
        hooked.server_close()
        patched.server_close()


def test_the_package_and_fastlisten_server_are_one_drop_in():
    """`import fastlisten as socketserver` and install()'s fastlisten.server
    give the same object for every name the stdlib module has."""
    import socketserver as std

    from fastlisten import server
    names = [n for n in dir(std) if not n.startswith("__")]
    assert "_ServerSelector" in names
    for name in names:
        assert getattr(fastlisten, name) is getattr(server, name), name
    with pytest.raises(AttributeError):
        fastlisten.NoSuchServer  # noqa: B018


def _read_version(module):
    """``module.__version__``, and the warnings reading it raised."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = module.__version__
    return value, [(w.category, str(w.message), w.filename) for w in caught]


@pytest.mark.parametrize("module", ["fastlisten", "fastlisten.server"])
def test_version_is_the_stdlib_socketserver_s_deprecations_included(module):
    """socketserver.__version__ reads the same through either drop-in name:
    the same value, and the same DeprecationWarning (CPython 3.15 on),
    attributed to the line that read it; fastlisten's own version is
    fastlisten.VERSION."""
    import importlib.metadata
    import socketserver as std
    drop_in = importlib.import_module(module)
    expected_value, expected = _read_version(std)
    value, warned = _read_version(drop_in)
    assert value == expected_value == "0.4"
    assert warned == expected
    assert [c for c, _, _ in warned] == ([DeprecationWarning] if sys.version_info >= (3, 15) else [])
    assert all(filename == __file__ for _, _, filename in warned)
    assert fastlisten.VERSION == importlib.metadata.version("fastlisten")
    with pytest.raises(AttributeError):
        drop_in.__no_such_dunder__  # noqa: B018


def test_one_loop_choice_follows_the_overridden_hooks():
    # _fl_choose_loop's table, row by row: the loop and the per-connection call
    Loop = flserver.Loop

    class OwnLoop(socketserver.TCPServer):
        def serve_forever(self, poll_interval=0.5):
            pass

    class Deferring(fastlisten.ThreadingMixIn, OwnLoop):
        pass

    class OwnGet(fastlisten.ThreadingTCPServer):
        def get_request(self):
            return super().get_request()

    class OwnFinish(fastlisten.ThreadingTCPServer):
        def finish_request(self, request, client_address):
            super().finish_request(request, client_address)

    class OwnVerify(fastlisten.ThreadingTCPServer):
        def verify_request(self, request, client_address):
            return True

    class OwnProcess(fastlisten.TCPServer):
        def process_request(self, request, client_address):
            super().process_request(request, client_address)

    rows = [
        (Deferring, Loop.BASE, None),
        (fastlisten.UDPServer, Loop.SELECTOR, None),
        (OwnGet, Loop.SELECTOR, None),
        (fastlisten.ThreadingTCPServer, Loop.LEADER, "_fl_handle_inline"),
        (OwnFinish, Loop.LEADER, "process_request_thread"),
        (fastlisten.TCPServer, Loop.BATCHES, "_fl_handle_inline"),
        (OwnVerify, Loop.BATCHES, "_fl_handle_accepted"),
        (OwnProcess, Loop.BATCHES, "_fl_handle_accepted"),
        (fastlisten.ForkingTCPServer, Loop.BATCHES, "_fl_handle_accepted"),
    ]
    for cls, loop, call in rows:
        server = cls(("127.0.0.1", 0), EchoLine, bind_and_activate=False)
        try:
            choice = server._fl_choose_loop()
            assert choice.loop is loop, (cls, choice)
            if call is None:
                assert choice.per_connection is None, (cls, choice)
            else:
                assert choice.per_connection == getattr(server, call), (cls, choice)
        finally:
            server.server_close()
    # a hook replaced on the instance counts as overridden
    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), EchoLine, bind_and_activate=False)
    try:
        server.verify_request = lambda request, client_address: True
        choice = server._fl_choose_loop()
        assert (choice.loop, choice.per_connection) == (Loop.BATCHES, server._fl_handle_accepted)
    finally:
        server.server_close()
