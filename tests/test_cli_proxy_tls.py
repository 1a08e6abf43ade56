"""``fastlisten serve`` behind a load balancer and with TLS: the flags wire
the library's options (--proxy-protocol, --trusted-proxy, --tls-cert/--tls-key)."""

import socket
import textwrap

import pytest
from test_cli_info_serve import Served, run
from tlsutil import client_context, make_cert


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


WHO = textwrap.dedent("""
    import socketserver

    class Who(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            header = self.server.proxy_header
            self.wfile.write(f"{self.client_address[0]}:{self.client_address[1]} "
                             f"v{header.version if header else '-'}\\n".encode())
""")


def _talk(address, data, ctx=None):
    c = socket.create_connection(address, timeout=10)
    try:
        if ctx is not None:
            c.sendall(data[0])
            data = data[1:]
            c = ctx.wrap_socket(c, server_hostname="localhost")
        for chunk in data:
            c.sendall(chunk)
        out = b""
        while True:
            try:
                chunk = c.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return out
            out += chunk
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["--threads", "--processes"])
def test_serve_with_proxy_protocol_and_tls(tmp_path, cert, mode):
    (tmp_path / "who.py").write_text(WHO)
    server = Served("who:Who", "--bind", "127.0.0.1:0", mode, "4",
                    "--proxy-protocol", "v1+v2", "--trusted-proxy", "127.0.0.0/8",
                    "--tls-cert", cert[0], "--tls-key", cert[1], "--stats-interval", "0.2",
                    cwd=tmp_path)
    try:
        got = _talk(server.address, [b"PROXY TCP4 203.0.113.5 127.0.0.1 4242 443\r\n",
                                     b"hi\n"], ctx=client_context(cert[0]))
        assert got == b"203.0.113.5:4242 v1\n"
        assert _talk(server.address, [b"no header\r\n"]) == b""
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    # the header-less client never left the accept filter
    assert "proxy_accepted=1" in err and "proxy_rejected=0" in err
    assert "dropped={malformed=1}" in err
    assert "tls_handshakes=1" in err


@pytest.mark.parametrize("args, text", [
    (["--proxy-protocol", "v3"], "invalid choice"),
    (["--trusted-proxy", "10.0.0.0/8"], "without proxy_protocol"),
    (["--proxy-protocol", "v1", "--trusted-proxy", "10.0.0.1/8"], "host bits set"),
    (["--tls-key", "k.pem"], "--tls-key needs --tls-cert"),
    (["--tls-cert", "/nonexistent.pem"], "cannot use --tls-cert '/nonexistent.pem'"),
    (["--tls-cert", "x.pem", "--handshake-timeout", "0"], "--handshake-timeout"),
])
def test_serve_explains_bad_proxy_and_tls_options(args, text):
    out = run("serve", "echo", *args)
    assert out.returncode == 2, out.stderr
    assert text in out.stderr and "Traceback" not in out.stderr
