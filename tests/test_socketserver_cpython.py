"""CPython's own socketserver tests, from the installed standard library,
run with fastlisten standing in for ``socketserver``.

Every test must pass except ``test_all``, which compares ``__all__`` with
the names whose ``__module__`` is ``socketserver`` (fastlisten's classes
live in ``fastlisten.server``).  Runs in a subprocess so that the stand-in
never leaks into this interpreter's ``sys.modules``.
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


def _has_cpython_tests() -> bool:
    try:
        return importlib.util.find_spec("test.test_socketserver") is not None
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
