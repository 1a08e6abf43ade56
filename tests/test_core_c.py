"""The C under the core, tested as C: small programs in tests/c/ built
against csrc/ with the system's compiler and run.  Under ThreadSanitizer
where the compiler and kernel have it (a race is reported however the
threads happen to interleave); plainly otherwise."""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _compiler():
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc")


def _build_and_run(program, tmp_path, extra=()):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler")
    sources = [str(ROOT / "tests" / "c" / program), str(CSRC / "fl_net.c"),
               *(str(CSRC / c) for c in extra)]
    for flags in (["-fsanitize=thread"], []):
        exe = tmp_path / (program + ("-tsan" if flags else ""))
        built = subprocess.run([cc, "-O1", "-g", "-pthread", *flags, f"-I{CSRC}", *sources,
                                "-o", str(exe)], capture_output=True, text=True, timeout=120)
        if built.returncode != 0:
            if flags:
                continue            # no ThreadSanitizer here: build it plainly
            pytest.fail(f"{program} did not build:\n{built.stderr}")
        ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1"))
        if flags and ran.returncode != 0 and "FATAL: ThreadSanitizer" in ran.stderr:
            continue                # its runtime cannot start on this kernel
        return ran
    raise AssertionError("unreachable")


def test_waiters_counting_at_once_lose_no_count(tmp_path):
    ran = _build_and_run("stats_threads.c", tmp_path)
    assert ran.returncode == 0, ran.stderr


def test_threads_waiting_through_one_accept_filter_hand_each_connection_over_once(tmp_path):
    ran = _build_and_run("filter_threads.c", tmp_path, extra=("fl_filter.c", "fl_proxy.c"))
    assert ran.returncode == 0, ran.stderr


def test_a_waiter_woken_after_its_gate_closed_accepts_nothing(tmp_path):
    ran = _build_and_run("gate_after_wake.c", tmp_path)
    assert ran.returncode == 0, ran.stderr
