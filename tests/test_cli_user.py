"""The command line as a new user meets it: real ``fastlisten`` processes
(``python -m fastlisten``), real signals, bounded waits."""

import os
import subprocess
import sys
import textwrap

import pytest

FL = [sys.executable, "-m", "fastlisten"]


def run(*args, **kwargs):
    return subprocess.run(FL + list(args), capture_output=True, text=True, timeout=30,
                          **kwargs)


# -- a handler module that fails at import ------------------------------------------

@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_handler_module_that_raises_at_import_shows_its_own_traceback(tmp_path, verbose):
    (tmp_path / "app.py").write_text("import settings\nclass Handler: pass\n")
    (tmp_path / "settings.py").write_text(textwrap.dedent("""\
        def load():
            raise ValueError("config missing")
        load()
    """))
    out = run(*verbose, "serve", "app:Handler", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert err.startswith("fastlisten serve: error: handler 'app:Handler': importing 'app' "
                          "raised ValueError:\nTraceback (most recent call last):\n"), err
    app, settings = tmp_path / "app.py", tmp_path / "settings.py"
    for frame in (f'File "{app}", line 1, in <module>', f'File "{settings}", line 3, in <module>',
                  f'File "{settings}", line 2, in load'):
        assert frame in err, err
    assert err.rstrip().endswith("ValueError: config missing"), err
    # the user's frames only: nothing of importlib's or fastlisten's
    assert "importlib" not in err and "frozen" not in err, err
    assert os.path.dirname(__import__("fastlisten").__file__) not in err, err
    assert err.count('File "') == 3, err


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_syntax_error_in_the_handler_module_is_its_file_line_and_caret(tmp_path, verbose):
    (tmp_path / "app.py").write_text("import socketserver\n"
                                     "class Handler(socketserver.BaseRequestHandler)\n"
                                     "    pass\n")
    out = run(*verbose, "serve", "app:Handler", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == ("fastlisten serve: error: handler 'app:Handler': importing 'app' "
                        "raised SyntaxError:"), out.stderr
    assert lines[1] == f'  File "{tmp_path / "app.py"}", line 2', out.stderr
    assert lines[2].strip() == "class Handler(socketserver.BaseRequestHandler)"
    assert lines[-1].startswith("SyntaxError: ")
    assert len(lines) <= 6, out.stderr       # not twenty lines of importlib


def test_a_handler_module_that_does_not_exist_is_one_line(tmp_path):
    out = run("serve", "nosuchmodule:Handler", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == ("fastlisten serve: error: handler 'nosuchmodule:Handler': cannot "
                          "import 'nosuchmodule': No module named 'nosuchmodule'\n")


def test_a_missing_dependency_of_the_handler_module_points_at_its_import(tmp_path):
    (tmp_path / "app.py").write_text("import os\nimport nosuchdependency\n")
    out = run("serve", "app:Handler", cwd=tmp_path)
    assert out.returncode == 2
    assert f'File "{tmp_path / "app.py"}", line 2, in <module>' in out.stderr, out.stderr
    assert out.stderr.rstrip().endswith("No module named 'nosuchdependency'"), out.stderr
