"""CPython's own socketserver tests, from the installed standard library,
run with fastlisten standing in for ``socketserver``; then the tests of the
standard library's modules built on socketserver (http.server, xmlrpc,
wsgiref, logging.config's listener), with ``fastlisten.install()`` first so
that their servers are fastlisten's.

Every test must pass except ``test_all``, which compares ``__all__`` with
the names whose ``__module__`` is ``socketserver`` (fastlisten's classes
live in ``fastlisten.server``).  Each runs in a subprocess so that the
stand-in never leaks into this interpreter's ``sys.modules``.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

_RUNNER = textwrap.dedent("""
    import json, sys, unittest
    import fastlisten
    sys.modules["socketserver"] = fastlisten       # before the test module imports it
    from test import test_socketserver
    assert test_socketserver.socketserver is fastlisten
    suite = unittest.defaultTestLoader.loadTestsFromModule(test_socketserver)
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    print()   # the module prints its own progress on stdout (test.support.verbose)
    print(json.dumps({
        "run": result.testsRun,
        "failed": sorted(t.id().rsplit(".", 1)[1] for t, _ in result.failures + result.errors),
        "skipped": sorted(t.id().rsplit(".", 1)[1] for t, _ in result.skipped),
    }))
""")


def _has_cpython_tests(name: str = "test_socketserver") -> bool:
    try:
        return importlib.util.find_spec(f"test.{name}") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not _has_cpython_tests(),
                    reason="this interpreter has no test package (test.test_socketserver)")
def test_cpython_socketserver_suite_passes_with_fastlisten():
    proc = subprocess.run([sys.executable, "-c", _RUNNER], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ))
    assert proc.stdout, proc.stderr[-5000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["run"] >= 20, result
    assert set(result["failed"]) <= {"test_all"}, proc.stderr[-5000:]
    # The servers themselves must really run here, not be skipped.
    assert not {"test_TCPServer", "test_ThreadingTCPServer", "test_UDPServer",
                "test_shutdown"} & set(result["skipped"]), result


_DEPENDENT_RUNNER = textwrap.dedent("""
    import importlib, json, sys, unittest
    import fastlisten
    fastlisten.install()      # before the test module imports http.server & co.
    test_module = importlib.import_module("test." + sys.argv[1])
    import http.server, logging.config, socketserver, wsgiref.simple_server, xmlrpc.server
    assert socketserver is fastlisten.server
    for server in (http.server.HTTPServer, xmlrpc.server.SimpleXMLRPCServer,
                   wsgiref.simple_server.WSGIServer):
        assert issubclass(server, fastlisten.TCPServer), server
    suite = unittest.defaultTestLoader.loadTestsFromModule(test_module)
    def ids(tests):
        for t in tests:
            yield from ids(t) if isinstance(t, unittest.TestSuite) else [t.id()]
    loaded = sorted(ids(suite))
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    print()
    print(json.dumps({
        "run": result.testsRun,
        "loaded": loaded,
        "failed": sorted(t.id() for t, _ in result.failures + result.errors),
        "skipped": sorted(t.id() for t, _ in result.skipped),
    }))
""")

#: The stdlib's tests of modules whose servers are socketserver's, and a test
#: each that must run (not be skipped): one that serves through that module.
DEPENDENTS = {
    "test_httpservers": "test_get",
    "test_xmlrpc": "test_simple1",
    "test_wsgiref": "test_plain_hello",
    "test_logging": "test_listen_config_10_ok",
}


#: The suites that mostly wait (about 25 s each): where the compiled core is
#: built, the pure run leaves them to the compiled one, which the README's
#: command runs first (CI's time budget: see .ci/run).
WAITING = {"test_xmlrpc", "test_logging"}


def _left_to_the_compiled_run(name):
    return (name in WAITING and os.environ.get("FASTLISTEN_NO_EXTENSIONS") == "1"
            and importlib.util.find_spec("fastlisten._core") is not None)


@pytest.mark.timeout(300)     # test_logging alone takes most of a minute
@pytest.mark.parametrize("name", sorted(DEPENDENTS))
def test_cpython_suites_of_modules_built_on_socketserver_pass_on_fastlisten(name):
    if not _has_cpython_tests(name):
        pytest.skip(f"this interpreter has no test package (test.{name})")
    if _left_to_the_compiled_run(name):
        pytest.skip(f"test.{name} mostly waits: run on the compiled core, which is built here")
    proc = subprocess.run([sys.executable, "-c", _DEPENDENT_RUNNER, name], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.stdout, proc.stderr[-5000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["run"] >= 20, result
    assert result["failed"] == [], proc.stderr[-5000:]
    ran = {t.rsplit(".", 1)[1] for t in set(result["loaded"]) - set(result["skipped"])}
    assert DEPENDENTS[name] in ran, result["skipped"]
