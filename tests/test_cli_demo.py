import subprocess
import sys

from fastlisten.cli import main


def test_demo_serves_real_connections(capsys):
    assert main(["demo", "-n", "40", "-c", "4"]) == 0
    out = capsys.readouterr().out
    assert "served 40 of 40 connections" in out
    assert "accepted 40 in" in out


def test_demo_rejects_unbounded_loads(capsys):
    for bad in (["demo", "-n", "0"], ["demo", "-n", "100000"], ["demo", "-c", "1000"]):
        try:
            main(bad)
        except SystemExit as exc:
            assert "must be" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_python_dash_m_fastlisten():
    out = subprocess.run([sys.executable, "-m", "fastlisten", "demo", "-n", "5", "-c", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "served 5 of 5" in out.stdout
