"""``fastlisten serve`` with its defaults behind a real HAProxy and a real
nginx ``stream`` proxy (configured as docs/guide/balancers.md shows) while slow clients attack the instance itself: 200
that connect and send nothing and 200 that send a PROXY header one byte a
second (a port scanner, a half-open health check, slowloris), all kept
open (one the server closes is opened again).  The instance has its default
pool of 16 threads, far fewer than the attackers; every normal client
going through the balancer must still get its answer (each wait bounded).

Before the accept filter, each attacker held a thread for --proxy-timeout
and the normal clients queued behind them: none was answered within 10 s.

Skipped where haproxy (or nginx with its stream module) is not installed,
unless FASTLISTEN_REQUIRE_HAPROXY=1 (FASTLISTEN_REQUIRE_NGINX=1): .ci/run
installs both and sets both.
"""

import os
import textwrap
import time

import pytest
from peers import Attack, NginxStream, converse, find_nginx, guide_block, move_ports
from test_cli_info_serve import Served
from test_socketserver_diff import LIMIT

from fastlisten.benchmark.balancer import HAProxy, find_haproxy, free_port, v2_header

HAPROXY = find_haproxy()
NGINX = find_nginx()

#: The attack on the instance: silent and dribbling clients.
SILENT = DRIBBLING = 200
#: How long normal clients keep coming under attack (a few dribbled bytes).
SPAN = 4.0
#: At least this many normal clients are served, however slow the machine.
NORMAL = 20
#: Seconds between two normal clients: a few hundred in SPAN, not the
#: thousands that would use up the balancer's local ports to the instance.
PACE = 0.01

V1_HEADER = b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 80\r\n"

HANDLER = textwrap.dedent("""
    import socketserver

    class Line(socketserver.StreamRequestHandler):
        # Reads one line; answers with who the client is and the line.
        def handle(self):
            line = self.rfile.readline()
            if line:
                self.wfile.write(f"{self.client_address[0]} {line.decode()}".encode())
""")


def need(found, what, variable, install):
    if found is None:
        if os.environ.get(variable) == "1":
            raise RuntimeError(f"{variable}=1 but {what} is not installed ({install})")
        pytest.skip(f"{what} is not installed ({install}); {variable}=1 makes this a failure")


def serve(tmp_path, *args):
    """``fastlisten serve line:Line`` with serve's defaults and ``args``."""
    (tmp_path / "line.py").write_text(HANDLER)
    return Served("line:Line", "--bind", "127.0.0.1:0", *args, cwd=tmp_path)


def normal_clients(port, span=SPAN, least=NORMAL):
    """Normal clients one after another through the balancer on ``port``,
    each from its own loopback address, for ``span`` seconds and at least
    ``least`` of them: every one must be answered (each wait bounded by
    LIMIT).  Their times, in seconds."""
    times = []
    start = time.monotonic()
    i = 0
    while len(times) < least or time.monotonic() - start < span:
        source = f"127.0.4.{i % 250 + 1}"
        reply, took = converse(port, b"hello\n", source)
        assert reply == f"{source} hello\n".encode(), \
            f"client {i} ({source}) got {reply!r} after {took:.1f} s (limit {LIMIT} s)"
        times.append(took)
        i += 1
        time.sleep(PACE)        # (pacing, not waiting for anything)
    return times


def stopped_cleanly(server):
    rc, err = server.stop()
    assert rc == 0, err
    assert "Traceback" not in err, err
    return err


def test_serve_behind_haproxy_answers_everyone_under_attack(tmp_path):
    need(HAPROXY, "haproxy", "FASTLISTEN_REQUIRE_HAPROXY", "apt-get install haproxy")
    server = serve(tmp_path, "--proxy-protocol", "v2")
    try:
        with HAProxy(HAPROXY, str(tmp_path), {free_port(): [("s1", server.address[1])]},
                     "send-proxy-v2 check inter 1s") as haproxy:
            haproxy.wait_up(LIMIT)
            with Attack(server.address, SILENT, DRIBBLING, v2_header()) as attack:
                normal_clients(haproxy.port)
            assert attack.failed == 0
    except BaseException:
        server.stop()
        raise
    err = stopped_cleanly(server)
    assert "ready rule 'data'" in err


def test_serve_behind_nginx_answers_everyone_under_attack(tmp_path):
    need(NGINX, "nginx with its stream module", "FASTLISTEN_REQUIRE_NGINX",
         "apt-get install nginx libnginx-mod-stream")
    server = serve(tmp_path, "--proxy-protocol", "v1")
    try:
        port = free_port()
        # the guide's stream block, both of its instances here this one
        stream = move_ports(guide_block("nginx-config"),
                            {"8000": port, "8001": server.address[1],
                             "8002": server.address[1]})
        with NginxStream(NGINX, tmp_path, port, stream) as nginx:
            with Attack(server.address, SILENT, DRIBBLING, V1_HEADER) as attack:
                normal_clients(nginx.port)
            assert attack.failed == 0
            assert "[emerg]" not in nginx.log() and "[crit]" not in nginx.log()
    except BaseException:
        server.stop()
        raise
    stopped_cleanly(server)
