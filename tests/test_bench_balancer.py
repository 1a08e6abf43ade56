"""``fastlisten bench --balancer`` end to end with tiny counts: both
measurements run and report numbers (their size is not asserted)."""

import subprocess
import sys

from fastlisten import proxy_parse as parse
from fastlisten.benchmark.balancer import find_haproxy, run_balancer_bench, to_text, v2_header


def test_the_header_the_bench_sends_is_what_haproxy_sends():
    header = parse(v2_header(("192.0.2.9", 1234), ("127.0.0.1", 80)))
    assert (header.version, header.command, header.source) == (2, "PROXY", ("192.0.2.9", 1234))
    assert header.length == len(v2_header())


def test_balancer_bench_runs_and_reports():
    # enough connections that the server's CPU time is more than a few of
    # the kernel's 10 ms accounting ticks (300 once measured 0.0)
    report = run_balancer_bench(total=2000, repeats=1, concurrency=4, timeout=5.0)
    cpu = report["cpu_us_per_connection"]
    assert cpu["off"] > 0 and cpu["on"] > 0 and cpu["ratio"] > 0
    if find_haproxy() is None:
        assert "skipped" in report["haproxy"]
    else:
        rates = report["haproxy"]["connections_per_s"]
        assert all(rates[k] > 0 for k in ("direct", "haproxy_1", "haproxy_2"))
    text = to_text(report)
    assert "PROXY v2 on" in text and "on/off" in text


def test_bench_balancer_flag():
    out = subprocess.run([sys.executable, "-m", "fastlisten", "bench", "--balancer", "--quick",
                          "--count", "200", "--repeats", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "server CPU per connection" in out.stdout
