"""Real clients: http.server, xmlrpc.server and wsgiref.simple_server served
through fastlisten's mixins answer urllib.request and xmlrpc.client."""

import http.server
import urllib.request
import wsgiref.simple_server
import xmlrpc.client
import xmlrpc.server

import pytest

import fastlisten

from test_socketserver_diff import LIMIT, serving, wait_for


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
