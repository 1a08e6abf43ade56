"""Real peers for the load-balancer tests: an nginx ``stream`` proxy (the
Debian package, run from a directory of its own with the guide's
configuration) and a slow-client attack (silent and dribbling connections
held open against a server).

``find_nginx()`` is None where nginx or its stream module is missing; the
tests skip then, unless FASTLISTEN_REQUIRE_NGINX=1 (.ci/run sets it, and
installs nginx and libnginx-mod-stream).
"""

import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time

from test_socketserver_diff import LIMIT

#: The guide whose configurations the tests run.
GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "guide", "balancers.md")
#: Where Debian's nginx keeps its dynamic modules.
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")


def find_nginx():
    """(nginx executable, the load_module line its stream module needs or
    ""), or None without nginx or without its stream module."""
    exe = shutil.which("nginx")
    if exe is None:
        exe = next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                    if os.access(p, os.X_OK)), None)
    if exe is None:
        return None
    built = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=30).stderr
    if "--with-stream=dynamic" in built:
        found = re.search(r"--modules-path=(\S+)", built)
        dirs = ((found.group(1),) if found else ()) + MODULE_DIRS
        module = next((os.path.join(d, "ngx_stream_module.so") for d in dirs
                       if os.path.exists(os.path.join(d, "ngx_stream_module.so"))), None)
        if module is None:
            return None         # Debian: apt-get install libnginx-mod-stream
        return exe, f"load_module {module};"
    if "--with-stream" in built:
        return exe, ""
    return None


class NginxStream:
    """nginx in the foreground (``daemon off;``, one process) with
    ``stream``, the text of a ``stream { ... }`` block (the guide's, its
    ports moved), listening on ``port``; its configuration, pid and error
    log live in ``directory``.  Use as a context manager, or call close()."""

    def __init__(self, found, directory, port, stream):
        exe, load = found
        self.port = port
        self.directory = str(directory)
        self.pid_file = os.path.join(self.directory, "nginx.pid")
        self.error_log = os.path.join(self.directory, "nginx-error.log")
        self.config = os.path.join(self.directory, "nginx.conf")
        with open(self.config, "w") as f:
            f.write(f"""\
{load}
daemon off;
master_process off;
pid {self.pid_file};
error_log {self.error_log} notice;
events {{ worker_connections 1024; }}
{stream}
""")
        check = subprocess.run([exe, "-t", "-p", self.directory, "-e", self.error_log,
                                "-c", self.config], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused {self.config}: {check.stderr}")
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)    # (nginx -t writes one too)
        self.proc = subprocess.Popen([exe, "-p", self.directory, "-e", self.error_log,
                                      "-c", self.config], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            self._wait_listening()
        except BaseException:
            self.close()
            raise

    def _wait_listening(self):
        """Bounded wait for nginx to write its pid file, its own pid in it
        (it listens by then)."""
        deadline = time.monotonic() + LIMIT
        while not self._pid_written():
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): "
                                   f"{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start within {LIMIT} s: {self.log()}")
            time.sleep(0.01)

    def _pid_written(self):
        try:
            with open(self.pid_file, encoding="ascii") as f:
                return f.read().strip() == str(self.proc.pid)
        except FileNotFoundError:
            return False

    def log(self):
        """nginx's error log so far."""
        try:
            with open(self.error_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(LIMIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Attack:
    """``silent`` connections that send nothing and ``dribbling`` ones that
    send ``payload`` one byte per ``interval`` seconds, all to ``address``
    and kept open: one the server closes is opened again at the next tick,
    as a real attacker would.  start() returns once every first connection
    is made (or failed: counted in ``failed``); stop() closes them all.
    ``reopened`` counts the connections the server closed meanwhile."""

    def __init__(self, address, silent, dribbling, payload, interval=1.0):
        self.address = address
        self.payload = payload
        self.interval = interval
        self.silent = [None] * silent
        self.dribbling = [None] * dribbling
        self.sent = [0] * dribbling
        self.reopened = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attack")

    def _open(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(LIMIT)
        try:
            s.connect(self.address)
        except OSError:
            s.close()
            self.failed += 1
            return None
        s.setblocking(False)
        return s

    def start(self):
        for group in (self.silent, self.dribbling):
            for i in range(len(group)):
                group[i] = self._open()
        self._thread.start()
        return self

    def _closed_by_peer(self, s):
        try:
            return s.recv(1) == b""     # (a silent client never gets a byte)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _tick(self):
        for group in (self.silent, self.dribbling):
            socks = [s for s in group if s is not None]
            if not socks:
                continue
            poller = select.poll()
            for s in socks:
                poller.register(s, select.POLLIN)
            readable = {fd for fd, _ in poller.poll(0)}
            for i, s in enumerate(group):
                if self._stop.is_set():
                    return
                if s is None or (s.fileno() in readable and self._closed_by_peer(s)):
                    if s is not None:
                        s.close()
                        self.reopened += 1
                    group[i] = self._open()
                    if group is self.dribbling:
                        self.sent[i] = 0
        for i, s in enumerate(self.dribbling):
            if s is None:
                continue
            byte = self.payload[self.sent[i] % len(self.payload):][:1]
            try:
                s.send(byte)
                self.sent[i] += 1
            except OSError:
                pass        # closed: reopened at the next tick

    def _run(self):
        while not self._stop.wait(self.interval):
            self._tick()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * LIMIT)    # (at most one connect() under way)
            assert not self._thread.is_alive(), "the attack did not stop"
        for group in (self.silent, self.dribbling):
            for i, s in enumerate(group):
                if s is not None:
                    s.close()
                    group[i] = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def converse(port, line, source="127.0.0.1", limit=LIMIT):
    """One normal client: connect to ``port`` from ``source``, send
    ``line``, read one line back (each wait bounded by ``limit``); (the
    line, seconds it took)."""
    start = time.monotonic()
    with socket.socket() as c:
        c.settimeout(limit)
        c.bind((source, 0))
        c.connect(("127.0.0.1", port))
        c.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - start


def p99(times):
    """The 99th percentile of ``times`` (the largest below 100 samples)."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def guide_block(marker):
    """The code block after ``<!-- marker -->`` in docs/guide/balancers.md."""
    with open(GUIDE, encoding="utf-8") as f:
        text = f.read()
    block = text.split(f"<!-- {marker} -->", 1)[1]
    return block.split("```", 2)[1].partition("\n")[2]


def move_ports(config, ports):
    """``config`` with each ``127.0.0.1:PORT`` that ``ports`` maps (the
    guide's 8000-8002) moved to the port it maps to."""
    return re.sub(r"127\.0\.0\.1:(\d+)\b",
                  lambda m: f"127.0.0.1:{ports.get(m.group(1), m.group(1))}", config)
