"""What the package says about itself: license, tested interpreters, typing."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _classifiers():
    block = re.search(r"^classifiers = \[(.*?)^\]", _read("pyproject.toml"), re.M | re.S)
    return re.findall(r'"([^"]+)"', block.group(1))


def test_the_license_file_matches_the_metadata():
    """PEP 639: an SPDX expression and the file, no license classifier
    (setuptools deprecates both the TOML table and the classifiers)."""
    pyproject = _read("pyproject.toml")
    assert re.search(r'^license = "MIT"$', pyproject, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.M)
    assert _read("LICENSE").startswith("MIT License\n")
    assert not [c for c in _classifiers() if c.startswith("License ::")]
    # what the installed distribution says of itself
    from importlib.metadata import metadata
    meta = metadata("fastlisten")
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in meta.get_all("License-File")


def test_setuptools_reads_the_metadata_without_a_deprecation_warning(tmp_path):
    """The project table as the build reads it (setuptools' egg_info, no
    compiling), every warning an error: a deprecated field fails here
    instead of scrolling past in a build's output."""
    env = dict(os.environ, FASTLISTEN_NO_EXTENSIONS="1")
    proc = subprocess.run(
        [sys.executable, "-W", "error", "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    with open(tmp_path / "fastlisten.egg-info" / "PKG-INFO", encoding="utf-8") as f:
        assert "License-Expression: MIT\n" in f.read()


def test_the_interpreter_running_the_tests_is_a_listed_one():
    versions = [c.rsplit(" :: ", 1)[1] for c in _classifiers()
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in versions
    # the README states the same range
    readme = " ".join(_read("README.md").split())
    assert f"CPython {versions[0]} to {versions[-1]}" in readme
    # requires-python: the lowest tested version (no upper bound)
    assert re.search(rf'^requires-python = ">={re.escape(versions[0])}"$',
                     _read("pyproject.toml"), re.M)


def test_the_package_is_typed():
    assert "Typing :: Typed" in _classifiers()
    import fastlisten
    assert os.path.exists(os.path.join(os.path.dirname(fastlisten.__file__), "py.typed"))


def test_ci_runs_every_listed_interpreter():
    """.ci/run takes 3.9-3.13 from pyenv and the rest from debian-python:
    between them, every version the classifiers list, and no other."""
    run = _read(os.path.join(".ci", "run"))
    pyenv = re.search(r"for v in \$\(pyenv versions --bare \| grep -E '([^']+)'\)", run).group(1)
    debian = re.search(r'^DEBIAN_VERSIONS="([^"]*)"$', run, re.M).group(1).split()
    listed = [c.rsplit(" :: ", 1)[1] for c in _classifiers()
              if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    ci = [v for v in (f"3.{minor}" for minor in range(0, 30))
          if re.search(pyenv, v + ".0") or v in debian]
    assert ci == listed
