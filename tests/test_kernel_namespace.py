"""Kernel values read from a kernel that differs from the constants.

On most hosts net.core.somaxconn equals socket.SOMAXCONN (4096), so a
default backlog taken from the constant instead of /proc would pass every
other test.  Here a child process runs in a new network namespace (as
root: ``unshare -n``), where net.core.somaxconn is the namespace's own, set
to a value no constant has.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

#: Not socket.SOMAXCONN, not 128 (the old default), not 4096 (the new one).
SOMAXCONN = 8191 if socket.SOMAXCONN != 8191 else 8190

_CHILD = textwrap.dedent("""
    import json, sys, warnings
    with open("/proc/sys/net/core/somaxconn", "w") as f:
        f.write(sys.argv[1])
    warnings.simplefilter("error")      # a truncated default backlog would warn
    import fastlisten                   # after the write: classes read it at import
    with fastlisten.listen(("127.0.0.1", 0)) as lst:
        listened = lst.backlog, lst.queue()[1]
    server = fastlisten.TCPServer(("127.0.0.1", 0), fastlisten.BaseRequestHandler)
    try:
        kernel_server = server.socket.getsockopt(6, 11, 104)[28:32]   # TCP_INFO tcpi_sacked
    finally:
        server.server_close()
    print(json.dumps({
        "default_backlog": fastlisten.default_backlog(),
        "listened": listened,
        "request_queue_size": fastlisten.TCPServer.request_queue_size,
        "server_backlog": int.from_bytes(kernel_server, "little"),
    }))
""")


def _namespaces_unavailable():
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "unshare -n needs root here"
    if shutil.which("unshare") is None:
        return "no unshare(1) on this host"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        return f"unshare -n is not allowed here: {probe.stderr.strip()}"
    return None


def test_the_default_backlog_follows_the_namespaces_somaxconn():
    why = _namespaces_unavailable()
    if why is not None:
        pytest.skip(why)
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", _CHILD, str(SOMAXCONN)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {
        "default_backlog": SOMAXCONN,
        "listened": [SOMAXCONN, SOMAXCONN],
        "request_queue_size": SOMAXCONN,
        "server_backlog": SOMAXCONN,
    }
