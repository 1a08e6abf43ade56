"""The documented HAProxy configuration (docs/guide/balancers.md) works as shown: the block after
``<!-- haproxy-config -->`` is checked by haproxy itself and then run (its
ports and stats socket moved to free ones) in front of two fastlisten
instances configured as the guide's example configures them."""

import json
import os
import re
import socket
import subprocess
import threading

import pytest
from test_socketserver_diff import LIMIT, wait_for

import fastlisten
from fastlisten.benchmark.balancer import find_haproxy, free_port

HAPROXY = find_haproxy()
README = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "guide", "balancers.md")

if HAPROXY is None:
    if os.environ.get("FASTLISTEN_REQUIRE_HAPROXY") == "1":
        raise RuntimeError("FASTLISTEN_REQUIRE_HAPROXY=1 but haproxy is not installed")
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)


def readme_config():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    block = text.split("<!-- haproxy-config -->", 1)[1]
    return block.split("```", 2)[1].lstrip("\n")


class Reporter(fastlisten.StreamRequestHandler):
    def handle(self):
        try:
            line = self.rfile.readline()
        except ConnectionResetError:
            return      # a health check: HAProxy resets it once connected
        if line:
            header = self.server.proxy_header
            self.wfile.write(json.dumps([list(self.client_address), header.version,
                                         self.server.server_address[1]]).encode() + b"\n")


class Instance(fastlisten.ThreadingTCPServer):
    daemon_threads = True
    listen_config = fastlisten.ListenConfig(proxy_protocol="v2")


def test_the_readme_haproxy_config_works_as_shown(tmp_path):
    config = readme_config()
    assert "send-proxy-v2" in config and "check" in config
    servers = [Instance(("127.0.0.1", 0), Reporter) for _ in range(2)]
    ports = {"8000": free_port(), "8001": servers[0].server_address[1],
             "8002": servers[1].server_address[1]}
    stats = str(tmp_path / "stats.sock")
    moved = re.sub(r"127\.0\.0\.1:(800[012])\b",
                   lambda m: f"127.0.0.1:{ports[m.group(1)]}", config)
    moved = moved.replace("/run/haproxy/fastlisten.sock", stats)
    path = tmp_path / "haproxy.cfg"
    path.write_text(moved)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True,
                           timeout=30)
    if check.returncode != 0:
        for server in servers:
            server.server_close()
    assert check.returncode == 0, check.stdout + check.stderr

    threads = [threading.Thread(target=s.serve_forever, args=(0.05,)) for s in servers]
    for t in threads:
        t.start()
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        # both instances see their health checks (a LOCAL header, then a
        # close or a reset: the accept filter drops each, no handler sees one)
        wait_for(lambda: all(sum(s.counters().get("dropped", {}).get(why, 0)
                                 for why in ("closed", "reset")) >= 1
                             for s in servers), LIMIT)
        seen = set()
        for i in range(2, 8):
            with socket.socket() as c:
                c.settimeout(LIMIT)
                c.bind((f"127.0.3.{i}", 0))
                c.connect(("127.0.0.1", ports["8000"]))
                c.sendall(b"hi\n")
                client, version, port = json.loads(c.makefile("rb").readline())
                assert client == list(c.getsockname()) and version == 2
                seen.add(port)
        assert seen == {ports["8001"], ports["8002"]}
    finally:
        proc.terminate()
        proc.wait(LIMIT)
        log.close()
        for s, t in zip(servers, threads):
            s.shutdown()
            t.join(LIMIT)
            s.server_close()
