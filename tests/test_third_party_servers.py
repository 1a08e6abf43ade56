"""Real third-party programs built on socketserver, run under
``fastlisten.install()`` against real clients, on both cores: werkzeug's
dev server (Flask's ``app.run``: synchronous, threaded and
``processes=2``, each with and without TLS, and ``run_simple`` stopped by
Ctrl-C), ``prometheus_client.start_http_server`` (with and without TLS),
``xmlrpc.server`` and ``wsgiref``.

Each runs in a fresh interpreter, since install() must come before the
program imports socketserver.  werkzeug and prometheus_client are in the
``test`` extra: they are imported here unconditionally, so a missing one
fails the run instead of skipping it (CI installs the extra).
"""

import os
import subprocess
import sys

import prometheus_client  # noqa: F401  (missing: the run fails, never skips)
import pytest
import werkzeug  # noqa: F401
from tlsutil import make_cert

import fastlisten

LIMIT = 60      # seconds for one scenario's interpreter, start to finish

PROGRAM = r'''
import os, signal, ssl, sys, threading, time, urllib.request

import fastlisten
fastlisten.install()                    # first thing, before anything imports socketserver
import socketserver
assert socketserver is fastlisten.server

scenario, cert, key = sys.argv[1:4]
tls = scenario.endswith("-tls")
server_ctx = None
if tls:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_ctx.load_verify_locations(cert)


def get(port, path="/"):
    scheme = "https" if tls else "http"
    url = "%s://127.0.0.1:%d%s" % (scheme, port, path)
    with urllib.request.urlopen(url, context=client_ctx if tls else None, timeout=10) as r:
        return r.status, r.read()


def fast_loop(server):
    """The loop serve_forever runs (None until it started)."""
    deadline = time.monotonic() + 10
    while server._fl_loop is None:
        assert time.monotonic() < deadline, "serve_forever never started"
        time.sleep(0.005)
    return server._fl_loop


def wsgi_app(environ, start_response):
    body = ("%s %s %s" % (environ["wsgi.url_scheme"], environ["PATH_INFO"],
                          os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def served_by_core(server):
    # a TLS-wrapped listening socket keeps the stdlib's loop (its accept()
    # runs the handshake); a plain one is served by the core
    assert fast_loop(server) == ("selector" if tls else "batches") or \
        (not tls and server._fl_loop == "leader"), server._fl_loop


if scenario.startswith("werkzeug-"):
    from werkzeug.serving import make_server
    mode = scenario.split("-")[1]
    context = "adhoc" if scenario.endswith("-adhoc-tls") else server_ctx
    if context == "adhoc":
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE      # adhoc: a throw-away certificate
    server = make_server("127.0.0.1", 0, wsgi_app, threaded=mode == "threaded",
                         processes=2 if mode == "processes" else 1, ssl_context=context)
    assert isinstance(server, fastlisten.TCPServer), type(server).__mro__
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        served_by_core(server)
        pids = set()
        for i in range(4):
            status, body = get(server.port, "/%d" % i)
            scheme, path, pid = body.decode().split()
            assert (status, scheme, path) == (200, "https" if tls else "http", "/%d" % i), body
            pids.add(int(pid))
        assert (pids != {os.getpid()}) == (mode == "processes"), pids
    finally:
        server.shutdown()           # werkzeug's serve_forever closes the server itself
        t.join(10)
    assert not t.is_alive()

elif scenario.startswith("run_simple"):
    # werkzeug.serving.run_simple as `flask run` calls it, stopped by Ctrl-C
    import socket
    from werkzeug.serving import run_simple
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = []

    def client():
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    outcome.append(get(port, "/simple"))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)        # not listening yet
        finally:
            os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=client, daemon=True).start()
    run_simple("127.0.0.1", port, wsgi_app, threaded=True, ssl_context=server_ctx)
    assert outcome and outcome[0][0] == 200, outcome
    assert outcome[0][1].startswith(b"https /simple" if tls else b"http /simple"), outcome

elif scenario.startswith("prometheus"):
    import prometheus_client
    hits = prometheus_client.Counter("fastlisten_test_hits", "hits")
    hits.inc(3)
    kwargs = {"certfile": cert, "keyfile": key} if tls else {}
    server, t = prometheus_client.start_http_server(0, "127.0.0.1", **kwargs)
    assert isinstance(server, fastlisten.ThreadingMixIn), type(server).__mro__
    try:
        served_by_core(server)
        status, body = get(server.server_port, "/metrics")
        assert status == 200 and b"fastlisten_test_hits_total 3.0" in body, body[:200]
    finally:
        server.shutdown()
        server.server_close()
        t.join(10)

elif scenario == "xmlrpc":
    import xmlrpc.client, xmlrpc.server
    server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
    assert isinstance(server, fastlisten.TCPServer)
    server.register_function(pow)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        served_by_core(server)
        with xmlrpc.client.ServerProxy("http://127.0.0.1:%d/" % server.server_address[1]) as p:
            assert p.pow(2, 10) == 1024
    finally:
        server.shutdown(); t.join(10); server.server_close()

elif scenario == "wsgiref":
    import http.client, wsgiref.simple_server

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, wsgi_app, handler_class=Quiet)
    assert isinstance(server, fastlisten.TCPServer)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        served_by_core(server)
        c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        c.request("GET", "/ref")
        r = c.getresponse()
        assert r.status == 200 and r.read().startswith(b"http /ref")
        c.close()
    finally:
        server.shutdown(); t.join(10); server.server_close()
else:
    raise SystemExit("unknown scenario " + scenario)
print("ok", scenario)
'''

SCENARIOS = [f"werkzeug-{mode}{tls}" for mode in ("plain", "threaded", "processes")
             for tls in ("", "-tls")]
SCENARIOS += ["run_simple", "run_simple-tls", "prometheus", "prometheus-tls",
              "xmlrpc", "wsgiref"]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


def run(scenario, pure, cert):
    env = dict(os.environ)
    env.pop("FASTLISTEN_NO_EXTENSIONS", None)
    if pure:
        env["FASTLISTEN_NO_EXTENSIONS"] = "1"
    elif not fastlisten.compiled:
        pytest.skip("the compiled core is not in use here")
    out = subprocess.run([sys.executable, "-c", PROGRAM, scenario, *cert], env=env,
                         capture_output=True, text=True, timeout=LIMIT)
    assert out.returncode == 0 and out.stdout.strip() == f"ok {scenario}", (
        out.stdout[-2000:], out.stderr[-4000:])
    # a TLS error anywhere (werkzeug logs them) is a failure even if the
    # client got its answer
    assert "SSLError" not in out.stderr and "TLS handshake" not in out.stderr, out.stderr


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_third_party_server(scenario, pure, cert):
    run(scenario, pure, cert)


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_werkzeug_adhoc_tls(pure, cert):
    """Flask's app.run(ssl_context="adhoc"): werkzeug makes a throw-away
    certificate with the optional ``cryptography`` package."""
    import cryptography  # noqa: F401  (the test extra has it: a missing one fails)
    run("werkzeug-threaded-adhoc-tls", pure, cert)

