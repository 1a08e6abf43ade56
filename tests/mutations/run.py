"""Mutation runner: does the suite fail when the code breaks?

    python tests/mutations/run.py [--list | --check] [--only TEXT ...] [--no-baseline] [--keep]

Copies the working tree (tracked and untracked, not ignored files: your
uncommitted edits included) to a scratch directory, builds the extension
there once (``setup.py build_ext --inplace``), checks that the relevant
test files pass there unmutated (the baseline), then applies each mutation
of ``mutations.py`` (beside this file) in turn: rebuilds the extension only
when the mutation touches it, runs only that mutation's test files, on
each core it applies to (``FASTLISTEN_NO_EXTENSIONS=1`` for the pure one),
and restores the file (and the unmutated extension).

A mutation is *killed* when the tests fail.  It *survives* when they pass,
which means a test is missing or too weak.  A mutation whose ``find``
snippet no longer occurs exactly once (the code moved on) is *stale*; one
that does not build is *broken*; a run that exceeds --timeout *hung* (the
suite must fail, not hang).  The runner exits 0 only when every mutation
was killed on every core it applies to, and names all the others.

Needs the test dependencies and Cython in the interpreter that runs it (the
project's venv: ``.venv/bin/python tests/mutations/run.py``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mutations import MUTATIONS, Mutation  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
COMPILED_SUFFIXES = (".pyx", ".pxd", ".pxi", ".c", ".h")


def _log(message: str) -> None:
    print(message, flush=True)


def scratch_copy(root: str) -> str:
    """Copy the working tree (git's tracked and untracked, not ignored files)
    into a new temporary directory; return its path."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    dest = tempfile.mkdtemp(prefix="fastlisten-mutations-")
    for rel in filter(None, listed):
        src = os.path.join(root, rel)
        if not os.path.isfile(src):
            continue        # deleted in the working tree
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    return dest


def build(scratch: str) -> Tuple[bool, str]:
    """Build the extension in place; (ok, output)."""
    env = dict(os.environ, FASTLISTEN_REQUIRE_EXTENSION="1")
    env.pop("FASTLISTEN_NO_EXTENSIONS", None)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"],
                          cwd=scratch, env=env, capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def extension_files(scratch: str) -> List[str]:
    """The built extensions (the core and the benchmark's share .pxd files)."""
    return glob.glob(os.path.join(scratch, "src", "fastlisten", "**", "*.so"), recursive=True)


def test_env(scratch: str, core: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.path.join(scratch, "src"))
    env.pop("FASTLISTEN_NO_EXTENSIONS", None)
    if core == "pure":
        env["FASTLISTEN_NO_EXTENSIONS"] = "1"
    return env


def check_imports(scratch: str) -> None:
    """The tests must import the scratch copy, not an installed fastlisten."""
    for core in ("compiled", "pure"):
        out = subprocess.run(
            [sys.executable, "-c", "import fastlisten; print(fastlisten.__file__, "
             "fastlisten.compiled)"],
            cwd=scratch, env=test_env(scratch, core), capture_output=True, text=True)
        where = out.stdout.split()
        if out.returncode != 0 or not where or not where[0].startswith(scratch):
            raise SystemExit(f"the scratch copy is not what the tests import ({core} core): "
                             f"{out.stdout}{out.stderr}")
        if where[1] != str(core == "compiled"):
            raise SystemExit(f"fastlisten.compiled is {where[1]} for the {core} core")


def run_tests(scratch: str, core: str, tests: Iterable[str], timeout: float,
              stop_early: bool) -> Tuple[str, str]:
    """Run pytest; ('passed' | 'failed' | 'hung', what failed or the tail)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           "--no-header"]
    if stop_early:
        cmd.append("-x")
    cmd += list(tests)
    # A session of its own, so that a hung run is ended with everything it
    # started; output to files, not pipes, so that a process the tests
    # forked and left behind (holding the pipes) cannot stall the runner.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=scratch, env=test_env(scratch, core),
                                stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "hung", f"no result within {timeout:.0f} s"
        finally:        # also when the runner itself is interrupted
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # whatever the tests left behind
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode == 0:
        return "passed", ""
    failed = [line for line in stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    tail = failed[0] if failed else "\n".join(stdout.splitlines()[-5:] +
                                              stderr.splitlines()[-5:])
    return "failed", tail


def _count(root: str, m: Mutation) -> int:
    with open(os.path.join(root, m.path)) as f:
        return f.read().count(m.find)


def apply(scratch: str, m: Mutation) -> Optional[str]:
    """Apply m in the scratch copy; return the original text, or None when
    its snippet does not occur exactly once."""
    path = os.path.join(scratch, m.path)
    with open(path) as f:
        original = f.read()
    if original.count(m.find) != 1:
        return None
    with open(path, "w") as f:
        f.write(original.replace(m.find, m.replace))
    return original


def restore(scratch: str, m: Mutation, original: str, pristine: Dict[str, bytes]) -> None:
    with open(os.path.join(scratch, m.path), "w") as f:
        f.write(original)
    if m.path.endswith(COMPILED_SUFFIXES):
        for path, data in pristine.items():
            with open(path, "wb") as f:
                f.write(data)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check that every snippet occurs exactly once")
    parser.add_argument("--only", nargs="+", action="extend", metavar="TEXT",
                        help="run the mutations whose name contains one of these "
                             "(repeatable)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip checking that the tests pass unmutated")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one pytest run may take (default 300)")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS
              if not args.only or any(t.lower() in m.name.lower() for t in args.only)]
    if args.list:
        for m in chosen:
            _log(f"{m.name}  [{m.path}; {', '.join(m.cores)}]")
        return 0
    if not chosen:
        _log("no mutation matches")
        return 2
    if args.check:
        stale = [m for m in chosen if _count(ROOT, m) != 1]
        for m in stale:
            _log(f"STALE     {m.name}: {m.find!r} occurs {_count(ROOT, m)} times in {m.path}")
        _log(f"{len(chosen) - len(stale)} of {len(chosen)} snippets found exactly once")
        return 1 if stale else 0

    started = time.monotonic()
    scratch = scratch_copy(ROOT)
    _log(f"scratch copy: {scratch}")
    problems: List[str] = []
    try:
        ok, output = build(scratch)
        if not ok:
            _log(output)
            _log("the unmutated extension does not build")
            return 2
        check_imports(scratch)
        pristine = {p: open(p, "rb").read() for p in extension_files(scratch)}

        if not args.no_baseline:
            for core in ("compiled", "pure"):
                files = sorted({t for m in chosen if core in m.cores for t in m.tests})
                if not files:
                    continue
                status, detail = run_tests(scratch, core, files, args.timeout * 2, False)
                _log(f"baseline ({core} core, {len(files)} files): {status} {detail}")
                if status != "passed":
                    _log("the tests fail without any mutation: fix that first")
                    return 2

        for i, m in enumerate(chosen, 1):
            t0 = time.monotonic()
            original = apply(scratch, m)
            if original is None:
                problems.append(f"STALE     {m.name}: {m.find!r} does not occur exactly once "
                                f"in {m.path}; update tests/mutations/mutations.py")
                _log(problems[-1])
                continue
            try:
                results = []
                if m.path.endswith(COMPILED_SUFFIXES):
                    ok, output = build(scratch)
                    if not ok:
                        problems.append(f"BROKEN    {m.name}: does not build\n"
                                        + "\n".join(output.splitlines()[-8:]))
                        _log(problems[-1])
                        continue
                for core in m.cores:
                    status, detail = run_tests(scratch, core, m.tests, args.timeout, True)
                    results.append((core, status, detail))
            finally:
                restore(scratch, m, original, pristine)
            took = time.monotonic() - t0
            for core, status, detail in results:
                if status == "failed":
                    _log(f"[{i}/{len(chosen)}] killed    {m.name} ({core}, {took:.0f} s): "
                         f"{detail}")
                elif status == "passed":
                    problems.append(f"SURVIVED  {m.name} ({core} core): {', '.join(m.tests)} "
                                    "still pass")
                    _log(f"[{i}/{len(chosen)}] {problems[-1]}")
                else:
                    problems.append(f"HUNG      {m.name} ({core} core): {detail}; the tests "
                                    "must fail, not hang")
                    _log(f"[{i}/{len(chosen)}] {problems[-1]}")
    finally:
        if args.keep:
            _log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    minutes = (time.monotonic() - started) / 60
    if problems:
        _log(f"\n{len(problems)} of {len(chosen)} mutations not killed ({minutes:.1f} min):")
        for p in problems:
            _log("  " + p)
        return 1
    _log(f"\nall {len(chosen)} mutations killed ({minutes:.1f} min)")
    return 0


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt     # unwind: the current test run and the scratch copy are cleaned up


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
