"""The documented HAProxy configuration (docs/guide/balancers.md) works as shown: the block after
``<!-- haproxy-config -->`` is checked by haproxy itself and then run (its
ports and stats socket moved to free ones) in front of two fastlisten
instances configured as the guide's example configures them."""

import csv
import io
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
        # and HAProxy saw them pass
        wait_for(lambda: passed_checks(stats), LIMIT)
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


def show_stat(path):
    """The servers' rows of HAProxy's ``show stat`` on the runtime API at ``path``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(LIMIT)
        s.connect(str(path))
        s.sendall(b"show stat\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    servers = [row for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")]
    for row in servers:
        # "* L4OK": a check is running now, and the last one passed
        row["check_status"] = row["check_status"].removeprefix("* ")
    return servers


def passed_checks(path):
    """True once HAProxy's runtime API at ``path`` answers and shows every
    server UP after a passed health check."""
    try:
        stat = show_stat(path)
    except OSError:
        return False
    return bool(stat) and all(r["status"] == "UP" and r["check_status"] == "L4OK"
                              for r in stat)


def test_the_readme_setup_serves_everyone_under_attack(tmp_path):
    """The guide's HAProxy configuration in front of two ``fastlisten serve
    --proxy-protocol v2`` instances with serve's defaults (a pool of 16),
    each attacked directly by 50 silent and 50 dribbling clients while
    HAProxy health-checks them every second: every normal client is
    answered, and the health checks (a LOCAL header, then a reset) leave no
    traceback in either server's log."""
    from peers import Attack
    from test_balancer_attack import normal_clients, serve, stopped_cleanly

    from fastlisten.benchmark.balancer import v2_header

    ports = {"8000": free_port()}
    servers = []
    try:
        for name in ("8001", "8002"):
            directory = tmp_path / name
            directory.mkdir()
            servers.append(serve(directory, "--proxy-protocol", "v2"))
            ports[name] = servers[-1].address[1]
        moved = re.sub(r"127\.0\.0\.1:(800[012])\b",
                       lambda m: f"127.0.0.1:{ports[m.group(1)]}", readme_config())
        moved = moved.replace("/run/haproxy/fastlisten.sock", str(tmp_path / "stats.sock"))
        (tmp_path / "haproxy.cfg").write_text(moved)
        with open(tmp_path / "haproxy.log", "wb") as log:
            proc = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                # listening once its runtime API socket is there
                wait_for(lambda: (tmp_path / "stats.sock").exists() or proc.poll() is not None)
                assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
                attacks = [Attack(s.address, 50, 50, v2_header()).start() for s in servers]
                try:
                    normal_clients(ports["8000"])
                    # the health checks went on meanwhile, and pass
                    stat = show_stat(tmp_path / "stats.sock")
                finally:
                    for attack in attacks:
                        attack.stop()
                assert all(a.failed == 0 for a in attacks)
                assert {(r["svname"], r["status"], r["check_status"]) for r in stat} == {
                    ("s1", "UP", "L4OK"), ("s2", "UP", "L4OK")}, stat
            finally:
                proc.terminate()
                proc.wait(LIMIT)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    for server in servers:
        err = stopped_cleanly(server)
        assert "ConnectionResetError" not in err, err
        # the drops are logged once per run, not once per health check or
        # attacker (before the accept filter: a traceback per check)
        assert err.count("\n") <= 30, err
