"""What the package says about itself: license, tested interpreters, typing."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _classifiers():
    block = re.search(r"^classifiers = \[(.*?)^\]", _read("pyproject.toml"), re.M | re.S)
    return re.findall(r'"([^"]+)"', block.group(1))


def test_the_license_file_matches_the_metadata():
    assert 'license = { text = "MIT" }' in _read("pyproject.toml")
    assert _read("LICENSE").startswith("MIT License\n")
    assert "License :: OSI Approved :: MIT License" in _classifiers()


def test_the_interpreter_running_the_tests_is_a_listed_one():
    versions = [c.rsplit(" :: ", 1)[1] for c in _classifiers()
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in versions
    # the README states the same range
    readme = " ".join(_read("README.md").split())
    assert f"CPython {versions[0]} to {versions[-1]}" in readme


def test_the_package_is_typed():
    assert "Typing :: Typed" in _classifiers()
    import fastlisten
    assert os.path.exists(os.path.join(os.path.dirname(fastlisten.__file__), "py.typed"))
