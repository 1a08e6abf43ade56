"""``fastlisten bench`` end to end on a small count: every scenario, every
installed server, the JSON shape, no errors.  Timing is never asserted."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fastlisten.benchmark import bars, runner
from fastlisten.benchmark.protocol import SCENARIOS
from fastlisten.benchmark.results import Report
from fastlisten.benchmark.servers import SERVERS, unavailable_reason

SMALL = ["--quick", "--count", "300", "--duration", "0.2", "--concurrency", "4",
         "--burst", "5", "--shutdown-cycles", "1", "--timeout", "10"]
# (4 clients and a burst of 5 fit socketserver's backlog of 5: no SYN is
# dropped, so no run waits for a retransmission; a slow CI machine gets 10 s
# per connection before anything counts as a timeout.)


# A whole run in a child: seconds on a quiet machine, but a busy shared
# one (CI, other builds) can stretch it; bounded all the same.
@pytest.mark.timeout(240)
def test_bench_quick_end_to_end(tmp_path):
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    cmd = [sys.executable, "-m", "fastlisten", "bench", *SMALL,
           "--json", str(out_json), "--markdown", str(out_md)]
    plotting = importlib.util.find_spec("matplotlib") is not None
    if plotting:
        cmd += ["--plot", str(out_png)]
    # a matplotlib that has never run here: it builds its font cache, and says so
    env = dict(os.environ, MPLCONFIGDIR=str(tmp_path / "mpl"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== daytime" in proc.stdout and "== burst" in proc.stdout
    assert "[1/" in proc.stderr        # the progress display
    # a user's run: what they asked about, in 100 columns; not the project's bars
    assert "performance bar" not in proc.stdout and "met" not in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 100, proc.stdout
    assert "matplotlib" not in proc.stderr and "fontManager" not in proc.stderr, proc.stderr

    report = json.loads(out_json.read_text())
    assert set(report) >= {"machine", "options", "servers", "skipped", "results",
                           "shutdown", "bars", "failures"}
    assert report["failures"] == []
    assert {"cpu", "kernel", "python", "somaxconn"} <= set(report["machine"])
    available = [s.name for s in SERVERS if unavailable_reason(s) is None]
    assert sorted(report["servers"]) == sorted(available)
    assert sorted(report["skipped"]) == sorted(s.name for s in SERVERS if s.name not in available)
    assert list(report["results"]) == list(SCENARIOS)
    for scenario, table in report["results"].items():
        assert sorted(table) == sorted(available), scenario
        for name, row in table.items():
            where = f"{scenario}/{name}"
            assert row["repeats"] == 1 and len(row["runs"]) == 1, where
            assert row["completed"] > 0 and row["errors"] == 0 and row["timeouts"] == 0, where
            for key in ("rate", "cpu_us", "cpu_user_us", "cpu_sys_us", "switches", "p50_ms",
                        "p99_ms", "max_ms", "listener_drops", "listen_overflows", "listen_drops"):
                assert isinstance(row[key], (int, float)), (where, key)
            assert "rate_x" in row and "cpu_us_x" in row, where
    # each ratio is the server's figure over its stdlib baseline's, from the same run
    compared = 0
    for scenario, table in report["results"].items():
        for name, row in table.items():
            base = table.get(report["servers"][name]["baseline"])
            if base is None or base is row:
                continue
            for key in ("rate", "cpu_us"):
                assert row[key + "_x"] == pytest.approx(row[key] / base[key]), \
                    (scenario, name, key)
            compared += 1
    assert compared > 0, "no server was compared with a baseline"
    socketservers = [s.name for s in SERVERS if s.cls and s.name in available]
    assert sorted(report["shutdown"]) == sorted(socketservers)
    for row in report["shutdown"].values():
        assert row["cycles"] == 1 and row["p99_ms"] >= 0
    assert report["bars"] == []

    md = out_md.read_text()
    assert "| server | conn/s | x std | CPU us/conn | x std | p99 ms | drops | failed |" in md
    assert "Machine:" in md
    if plotting:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved report shows again without measuring anything
    again = tmp_path / "again.md"
    proc = subprocess.run([sys.executable, "-m", "fastlisten", "bench", "--from-json",
                           str(out_json), "--markdown", str(again)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert again.read_text() == md and "[1/" not in proc.stderr

    # the project's own run (its README): every figure, and its bars judged
    readme = tmp_path / "readme.md"
    proc = subprocess.run([sys.executable, "-m", "fastlisten", "bench", "--from-json",
                           str(out_json), "--wide", "--bars", "--markdown", str(readme)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "the performance bar fastlisten holds itself to" in proc.stdout
    text = readme.read_text()
    assert "with `fastlisten bench --quick --wide --bars`" in text
    assert ("| server | conn/s | x std | CPU us/conn | x std | user us | x std | sys us | "
            "cs/conn |") in text
    verdicts = [line for line in text.splitlines() if line.startswith("| ") and
                (" | met | " in line or " | NOT met | " in line or " | n/a | " in line)]
    # all scenarios ran, with the accept filter's servers: their own bars too
    assert len(verdicts) == 11 + 2 * len(bars.OTHER_SCENARIOS) + 6 * len(bars.OTHER_SCENARIOS) + 2


def test_bench_rejects_unknown_server():
    proc = subprocess.run([sys.executable, "-m", "fastlisten", "bench", "--server", "nosuch"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("bad", [["--count", "0"], ["--burst", "70000"], ["--duration", "-1"],
                                 ["--repeats", "0"]])
def test_bench_rejects_out_of_range(bad, capsys):
    from fastlisten.cli import main
    assert main(["bench", *bad]) == 2
    assert f"{bad[0]} must be" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("total", 0), ("timeout", 601.0), ("repeats", 101)])
def test_options_hold_their_limits_for_library_callers_too(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        runner.Options(**{field: value})


def _row(**kw):
    base = dict(rate=1000.0, cpu_us=10.0, cpu_user_us=5.0, cpu_sys_us=5.0, p50_ms=0.1,
                p99_ms=1.0, listen_overflows=0, listener_drops=0)
    base.update(kw)
    return base


def _report(results, shutdown):
    for table in results.values():
        runner.add_ratios(table)
    return Report(machine={}, options={"burst": 1024}, servers={}, skipped={},
                  results=results, shutdown=shutdown)


@pytest.mark.parametrize("good", [True, False])
def test_bars_verdicts(good):
    k = 1 if good else 3          # good: every target met; bad: every one missed
    daytime = {
        "native": _row(cpu_us=8.0),
        "fastlisten-tcp": _row(cpu_us=8.5 * k, cpu_user_us=1.0 * k),
        "stdlib-tcp": _row(cpu_us=12.0, cpu_user_us=5.0),
        "fastlisten-threading": _row(rate=30000.0 / k, cpu_us=(10.0 if good else 40.0)),
        "stdlib-threading": _row(rate=10000.0, cpu_us=80.0),
        "uvloop": _row(cpu_us=20.0),
        "gevent": _row(cpu_us=24.0),
    }
    burst = {"fastlisten-tcp": _row(listen_overflows=7, listener_drops=0 if good else 3),
             "stdlib-tcp": _row(listener_drops=900)}
    shutdown = {"fastlisten-tcp": {"p99_ms": 0.1 if good else 2.0},
                "stdlib-tcp": {"p99_ms": 490.0}}
    verdicts = [b["met"] for b in bars.evaluate(_report({"daytime": daytime, "burst": burst},
                                                        shutdown))]
    assert verdicts == [good] * 11


def test_bars_not_measurable_without_fastlisten_servers():
    daytime = {"stdlib-tcp": _row(), "stdlib-threading": _row()}
    assert all(b["met"] is None for b in bars.evaluate(_report({"daytime": daytime}, {})))


def test_summarise_median_and_spread():
    runs = [dict(_row(rate=r), started=1, completed=1, errors=0, timeouts=0, aborted=0,
                 max_ms=float(r), first_errno=0, cpu_us=None) for r in (100.0, 300.0, 200.0)]
    s = runner.summarise(runs)
    assert s["rate"] == 200.0 and s["rate_spread"] == 1.0
    assert s["cpu_us"] is None and s["max_ms"] == 300.0 and s["completed"] == 3


def _run(rate, **kw):
    return dict(_row(rate=rate), started=1, completed=1, errors=0, timeouts=0, aborted=0,
                max_ms=1.0, first_errno=0, **kw)


def test_one_repeat_shows_no_spread():
    from fastlisten.benchmark import report as rep

    one = runner.summarise([_run(100.0)])
    assert one["rate_spread"] is None and one["cpu_us_spread"] is None
    two = runner.summarise([_run(100.0), _run(100.0)])
    assert two["rate_spread"] == 0.0          # two equal repeats: a measured ±0%
    for summary, shown in ((one, False), (two, True)):
        row = dict(summary, rate_x=1.0, cpu_us_x=1.0, cpu_user_us_x=1.0)
        r = _report({"daytime": {"stdlib-tcp": row}}, {})
        r.options.update(repeats=1, concurrency=1, duration=1, total=1)
        assert ("±" in rep.rows(r, "daytime")[0][1]) is shown


def test_the_tables_say_what_timeouts_are_and_pad_no_text_column():
    from fastlisten.benchmark import report as rep

    row = dict(runner.summarise([_run(100.0)]), rate_x=1.0, cpu_us_x=1.0, cpu_user_us_x=1.0)
    slow = dict(row, timeouts=300)
    r = _report({"burst": {"stdlib-tcp": row, "fastlisten-forking": slow}}, {})
    r.options.update(repeats=1, timeout=1.2)
    r.servers = {"fastlisten-forking": {"label": "fastlisten ForkingTCPServer"}}
    r.bars = [{"bar": "short", "target": "x", "met": True, "figure": "1x"},
              {"bar": "long", "target": "x", "met": True, "figure": "y" * 100}]
    text = "\n".join(rep._sections(r, rep._text_table, str))
    assert "longer than 1.2 s (--timeout)" in text
    assert "here for fastlisten ForkingTCPServer:" in text
    short = next(line for line in text.splitlines() if line.startswith("short "))
    assert short.endswith("met  1x")           # not right-aligned to the long figure
    assert "timeouts: connections not completed within --timeout seconds" in rep.NOTES


def test_bench_help_explains_every_column():
    proc = subprocess.run([sys.executable, "-m", "fastlisten", "bench", "--help"],
                          capture_output=True, text=True, timeout=30)
    text = " ".join(proc.stdout.split())
    for column in ("conn/s:", "CPU us/conn:", "x std:", "p99 ms:", "drops:", "failed:",
                   "--wide", "user us", "p50/p99/max ms:", "queue drops:", "overflows*:",
                   "errors:", "timeouts:", "--bars", "cs/conn:", "+filter:"):
        assert column in text, column


def test_bars_for_echo_and_http_close_when_run():
    """The threaded CPU bars are repeated for the scenarios whose handlers
    read a request first, when the run has them, with their own verdicts."""
    def scenario(threading_cpu):
        return {"fastlisten-tcp": _row(cpu_us=20.0),
                "fastlisten-threading": _row(cpu_us=threading_cpu),
                "stdlib-threading": _row(cpu_us=150.0)}
    daytime = {"fastlisten-tcp": _row(cpu_us=10.0), "fastlisten-threading": _row(cpu_us=12.0),
               "stdlib-threading": _row(cpu_us=100.0)}
    report = _report({"daytime": daytime, "echo": scenario(25.0),
                      "http-close": scenario(40.0)}, {})
    named = {b["bar"]: b for b in bars.evaluate(report)}
    assert named["ThreadingTCPServer CPU per connection vs TCPServer (echo)"]["met"] is True
    assert named["ThreadingTCPServer CPU per connection (echo)"]["met"] is True
    assert named["ThreadingTCPServer CPU per connection vs TCPServer (http-close)"]["met"] is False
    assert "2.00x (40.0 vs 20.0 us)" in named[
        "ThreadingTCPServer CPU per connection vs TCPServer (http-close)"]["figure"]
    only_daytime = [b["bar"] for b in bars.evaluate(_report({"daytime": daytime}, {}))]
    assert not [name for name in only_daytime if "(" in name and "echo" in name]


def _full_report(scenarios=("daytime", "burst")):
    """A report of every server, with the widest figures a run may show."""
    from fastlisten.benchmark.servers import SERVERS

    big = dict(rate=1_234_567.0, cpu_us=98_765.4, cpu_user_us=54_321.0, cpu_sys_us=44_444.4,
               switches=123.45, p50_ms=12_345.67, p99_ms=12_345.67, listener_drops=123_456,
               listen_overflows=123_456, listen_drops=123_456, other_cpus=0.0)
    results = {}
    for scenario in scenarios:
        table = {}
        for i, spec in enumerate(SERVERS):
            runs = [dict(_run(1.0), **big, timeouts=99_999, errors=99_999),
                    dict(_run(1.0), **dict(big, rate=big["rate"] / (i + 2),
                                           cpu_us=big["cpu_us"] / (i + 2)))]
            table[spec.name] = runner.summarise(runs)
        runner.add_ratios(table)
        results[scenario] = table
    r = _report(results, {})
    r.servers = {s.name: {"label": s.label, "group": s.group} for s in SERVERS}
    r.machine = {"cpu": "a CPU with a long name, of the kind /proc/cpuinfo gives " * 2,
                 "cpus": 2, "kernel": "Linux 6.18", "python": "CPython 3.13.0",
                 "fastlisten": "0.1.0", "fastlisten_core": "compiled", "somaxconn": 4096}
    r.options.update(repeats=3, concurrency=32, duration=3.0, total=1_000_000, timeout=5.0)
    r.seconds = 1.0
    return r


def test_a_runs_text_fits_100_columns_even_with_the_widest_figures():
    from fastlisten.benchmark import report as rep

    r = _full_report()
    text = rep.to_text(r)
    widest = max(text.splitlines(), key=len)
    assert len(widest) <= rep.WIDTH == 100, widest
    assert "fastlisten ThreadingTCPServer" in text and "performance bar" not in text
    header = next(line for line in text.splitlines() if line.startswith("server "))
    assert header.split() == ["server", "conn/s", "x", "std", "CPU", "us/conn", "x", "std",
                              "p99", "ms", "drops", "failed"]
    assert len(max(rep.to_text(r, wide=True).splitlines(), key=len)) > 100   # --wide is wide


FIGURE = """
import json, sys
import matplotlib.pyplot as plt
from fastlisten.benchmark import report as rep
with open(sys.argv[1]) as f:
    fig = rep.figure(rep.Report.from_json(json.load(f)))
print(json.dumps({"titles": [ax.get_title(loc="left") for ax in fig.axes],
                  "legends": [[t.get_text() for t in lg.get_texts()] for lg in fig.legends]}))
plt.close(fig)
"""


def test_the_chart_shows_every_scenario_with_a_legend(tmp_path):
    pytest.importorskip("matplotlib")
    scenarios = ("daytime", "echo", "http-close", "burst")
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(_full_report(scenarios).to_json()))
    # in a child: matplotlib keeps its font files open for the process's life
    proc = subprocess.run([sys.executable, "-c", FIGURE, str(saved)], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, MPLCONFIGDIR=str(tmp_path / "mpl")))
    assert proc.returncode == 0, proc.stderr
    drawn = json.loads(proc.stdout)
    titles = [t for t in drawn["titles"] if t]
    assert [t.split(":")[0] for t in titles] == list(scenarios)     # every workload
    assert len(drawn["titles"]) == 2 * len(scenarios)               # CPU and rate for each
    assert len(drawn["legends"]) == 1
    assert {"fastlisten", "standard library", "user CPU", "system CPU"} <= \
        set(drawn["legends"][0])


def test_filtered_servers_serve_with_the_rule_that_fits_each_scenario():
    """The ``+filter`` servers: their class's listen_config carries the
    scenario's ready_rule (the request's shape; 'none' where the server
    speaks first); the plain ones have no listen_config of their own."""
    from fastlisten.benchmark import serve
    from fastlisten.benchmark.servers import READY_RULES, by_name

    assert READY_RULES == {"echo": "line", "http-close": "http", "daytime": "none",
                           "burst": "none"}
    for name, base in (("fastlisten-threading+filter", "ThreadingTCPServer"),
                       ("fastlisten-tcp+filter", "TCPServer")):
        spec = by_name(name)
        assert spec.filtered and spec.baseline == by_name(name.split("+")[0]).baseline
        for scenario, rule in READY_RULES.items():
            module, cls = serve._server_class(spec, scenario)
            assert issubclass(cls, getattr(module, base))
            assert cls.listen_config.ready_rule == rule, (name, scenario)
    for name in ("fastlisten-threading", "fastlisten-tcp", "stdlib-threading"):
        _, cls = serve._server_class(by_name(name), "echo")
        assert getattr(cls, "listen_config", None) is None


def test_mark_counts_the_servers_context_switches():
    """context_switches() grows when this process sleeps (a voluntary
    switch each time), whichever thread sleeps; never shrinks."""
    import threading
    import time

    from fastlisten.benchmark import serve

    before = serve.context_switches()
    t = threading.Thread(target=lambda: [time.sleep(0.001) for _ in range(5)])
    t.start()
    t.join()
    assert serve.context_switches() >= before + 5


@pytest.mark.parametrize("good", [True, False])
def test_filter_bars_verdicts(good):
    """The accept filter's bars (issue 19), each met with figures that
    meet every target and missed with ones that miss every one."""
    k = 1.0 if good else 3.0

    def scenario():
        return {"fastlisten-tcp": _row(cpu_us=20.0),
                "fastlisten-tcp+filter": _row(cpu_us=20.5 * k),
                "fastlisten-threading": _row(cpu_us=36.0, switches=3.0),
                "fastlisten-threading+filter": _row(cpu_us=22.0 * k, switches=1.0 * k * k),
                "stdlib-threading": _row(cpu_us=150.0),
                "uvloop": _row(cpu_us=30.0), "gevent": _row(cpu_us=33.0)}
    daytime = {"fastlisten-tcp": _row(cpu_us=10.0), "fastlisten-tcp+filter": _row(cpu_us=10 * k),
               "fastlisten-threading": _row(cpu_us=12.0),
               "fastlisten-threading+filter": _row(cpu_us=12.0 * k)}
    report = _report({"daytime": daytime, "echo": scenario(), "http-close": scenario()}, {})
    filter_bars = bars._filter_bars(report)
    assert len(filter_bars) == 6 * 2 + 2
    assert [b["met"] for b in filter_bars] == [good] * len(filter_bars)
    named = {b["bar"]: b for b in filter_bars}
    assert named["ThreadingTCPServer CPU per connection vs TCPServer (echo, filter on)"][
        "figure"] == ("1.10x (22.0 vs 20.0 us)" if good else "3.30x (66.0 vs 20.0 us)")
    # the filter's bars are part of the project's bars, and only when it ran
    assert all(b in bars.evaluate(report) for b in filter_bars)
    plain = {name: row for name, row in scenario().items() if "+" not in name}
    assert bars._filter_bars(_report({"echo": plain}, {})) == []
