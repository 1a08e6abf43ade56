"""Sphinx configuration for fastlisten's documentation.

Build: ``pip install '.[docs]' && sphinx-build -W -b html docs docs/_build``
(``.ci/run`` does, warnings as errors).  The pages are Markdown (MyST); the API
reference comes from the docstrings (autodoc).
"""
import os

project = "fastlisten"
author = "the fastlisten authors"
copyright = "fastlisten authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "restarts.json", "bench.png"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Public names only, in source order, with their signatures from the code.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

# Python's own objects.inv: no network is needed at build time.  Debian's
# python3-doc package puts one on disk; FASTLISTEN_PYTHON_INV names another.
_python_inv = os.environ.get("FASTLISTEN_PYTHON_INV")
if not _python_inv:
    for candidate in ("/usr/share/doc/python3/html/objects.inv",
                      "/usr/share/doc/python3.11/html/objects.inv"):
        if os.path.exists(candidate):
            _python_inv = candidate
            break
intersphinx_mapping = {"python": ("https://docs.python.org/3", _python_inv)}
intersphinx_disabled_reftypes = ["*"]

html_theme = "alabaster"
html_static_path: list = []
