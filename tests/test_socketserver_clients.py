"""Real clients: http.server, xmlrpc.server and wsgiref.simple_server served
through fastlisten's mixins answer urllib.request and xmlrpc.client."""

import http.server
import os
import subprocess
import sys
import urllib.request
import wsgiref.simple_server
import xmlrpc.client
import xmlrpc.server

import pytest
from test_socketserver_diff import LIMIT, serving, wait_for

import fastlisten


def _url(server, path="/"):
    return "http://127.0.0.1:%d%s" % (server.server_address[1], path)


def _served_by_core(server):
    wait_for(lambda: server._fl_loop is not None)
    return server._fl_loop in ("batches", "leader")


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = ("hello " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mixin", [fastlisten.ThreadingMixIn, fastlisten.ForkingMixIn])
def test_http_server(mixin):
    class Server(mixin, http.server.HTTPServer):
        pass

    with serving(Server(("127.0.0.1", 0), Hello)) as server:
        assert _served_by_core(server)
        for i in range(5):
            with urllib.request.urlopen(_url(server, f"/{i}"), timeout=LIMIT) as r:
                assert r.status == 200
                assert r.read() == f"hello /{i}".encode()


class Quiet(xmlrpc.server.SimpleXMLRPCRequestHandler):
    def log_message(self, *args):
        pass


def test_xmlrpc_server():
    class Server(fastlisten.ThreadingMixIn, xmlrpc.server.SimpleXMLRPCServer):
        pass

    server = Server(("127.0.0.1", 0), requestHandler=Quiet, logRequests=False)
    server.register_function(lambda a, b: a + b, "add")
    server.register_introspection_functions()
    with serving(server):
        assert _served_by_core(server)
        with xmlrpc.client.ServerProxy(_url(server)) as proxy:
            assert proxy.add(2, 3) == 5
            assert "add" in proxy.system.listMethods()
            with pytest.raises(xmlrpc.client.Fault):
                proxy.add("a", 1)     # the function raises: a fault, server goes on
            assert proxy.add(40, 2) == 42


class QuietWSGI(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_wsgiref_simple_server():
    def app(environ, start_response):
        body = ("wsgi " + environ["PATH_INFO"]).encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    class Server(fastlisten.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
        pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, server_class=Server,
                                               handler_class=QuietWSGI)
    with serving(server):
        assert _served_by_core(server)
        for path in ("/a", "/b"):
            with urllib.request.urlopen(_url(server, path), timeout=LIMIT) as r:
                assert r.read() == b"wsgi " + path.encode()


INSTALLED_FIRST = r'''
import fastlisten
fastlisten.install()            # before http.server & co. import socketserver
import http.client, http.server, threading, wsgiref.simple_server, xmlrpc.client, xmlrpc.server
from fastlisten import _backend

assert issubclass(http.server.BaseHTTPRequestHandler, fastlisten.StreamRequestHandler)
seen = set()

class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        seen.add((type(self.rfile.raw), type(self.wfile)))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.upper())
    def log_message(self, *args):
        pass

def serving(server):
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 5})
    t.start()
    return t

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
t = serving(server)
try:
    # one keep-alive connection, several requests: rfile's buffer carries over
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    for body in (b"one", b"two " * 5000, b"three"):
        conn.request("POST", "/", body=body)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == body.upper(), body[:10]
    conn.close()
finally:
    server.shutdown(); t.join(); server.server_close()
assert seen == {(_backend.SocketReader, _backend.SocketWriter)}, seen

def app(environ, start_response):
    data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Length", str(len(data)))])
    return [data[::-1]]

class QuietWSGI(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass

server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=QuietWSGI)
t = serving(server)
try:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request("POST", "/", body=b"abc")
    assert conn.getresponse().read() == b"cba"
    conn.close()
finally:
    server.shutdown(); t.join(); server.server_close()

server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
server.register_function(lambda a, b: a + b, "add")
t = serving(server)
try:
    with xmlrpc.client.ServerProxy("http://127.0.0.1:%d/" % server.server_address[1]) as proxy:
        assert proxy.add(2, 3) == 5 and proxy.add("x" * 100000, "y") == "x" * 100000 + "y"
finally:
    server.shutdown(); t.join(); server.server_close()
print("ok")
'''


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_stdlib_servers_on_fastlisten_handlers_after_install(pure):
    """install() before http.server is imported: BaseHTTPRequestHandler (and
    so wsgiref's and xmlrpc's handlers) builds on fastlisten's
    StreamRequestHandler, whose files carry keep-alive requests, bodies
    read by length, WSGI input and XML-RPC calls."""
    env = dict(os.environ)
    if pure:
        env["FASTLISTEN_NO_EXTENSIONS"] = "1"
    elif not fastlisten.compiled:
        pytest.skip("the compiled core is not in use here")
    out = subprocess.run([sys.executable, "-c", INSTALLED_FIRST], env=env,
                         capture_output=True, text=True, timeout=LIMIT * 4)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
