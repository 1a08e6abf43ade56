"""Every Python example in the README and in docs/ runs as shown.

Each ```python block runs as a script in a fresh interpreter, from an empty
folder.  A block that cannot end by itself (a server's ``serve_forever()``, a
handler from the reader's own package) follows an HTML comment
``<!-- example: not run (why) -->`` and is only compiled, so a typo still
fails.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<mark><!-- example: not run[^>]*-->\n)?```python\n(?P<code>.*?)^```",
                   re.M | re.S)


def _pages():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))


def _examples():
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start("code")) + 1
            name = f"{page.relative_to(ROOT)}:{line}"
            yield pytest.param(match.group("code"), not match.group("mark"), id=name)


EXAMPLES = list(_examples())


def test_the_pages_have_examples():
    # the pattern above still finds the blocks (a changed fence would skip them all)
    assert sum(1 for p in EXAMPLES if p.values[1]) >= 5


@pytest.mark.parametrize("code, run", EXAMPLES)
def test_example(code, run, tmp_path):
    compile(code, "<example>", "exec")
    if not run:
        return
    env = dict(os.environ, PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
