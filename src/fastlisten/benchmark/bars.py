"""The performance bar fastlisten holds itself to (see docs/benchmarks.md), checked against
one run's figures.  Each bar is met, not met, or not measurable here (a
server or scenario missing from the run); never asserted by a test.  The
project's own tooling asks for them (``fastlisten bench --bars``, which
refreshes docs/benchmarks.md); a user's run does not show them."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from fastlisten.benchmark.results import Report

FL_SERVERS = ("fastlisten-tcp", "fastlisten-threading", "fastlisten-forking")
STD_SERVERS = ("stdlib-tcp", "stdlib-threading", "stdlib-forking")


def _x(ratio: Optional[float]) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _join(values: Any, spec: str) -> str:
    vals = list(values)
    return "/".join(_fmt(v, spec) for v in vals) if vals else "n/a"


def _get(report: "Report", scenario: str, server: str, key: str) -> Optional[float]:
    row = report.results.get(scenario, {}).get(server)
    return None if row is None else row.get(key)


def _bar(name: str, target: str, met: Optional[bool], figure: str) -> Dict[str, Any]:
    return {"bar": name, "target": target, "met": met, "figure": figure}


def _fmt(x: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


#: Scenarios whose threaded CPU bars are shown beside daytime's when run.
OTHER_SCENARIOS = ("echo", "http-close")


def _threading_cpu_bars(report: "Report", scenario: str) -> List[Dict[str, Any]]:
    """ThreadingTCPServer's CPU per connection against the stdlib's and
    against fastlisten's TCPServer, in ``scenario``."""
    g = lambda server, key: _get(report, scenario, server, key)  # noqa: E731
    cx, th, fl = (g("fastlisten-threading", "cpu_us_x"), g("fastlisten-threading", "cpu_us"),
                  g("fastlisten-tcp", "cpu_us"))
    tx = th / fl if th is not None and fl else None
    return [
        _bar(f"ThreadingTCPServer CPU per connection ({scenario})", "<= 0.2x stdlib",
             None if cx is None else cx <= 0.2,
             f"{_x(cx)} ({_fmt(th, '.1f')} vs {_fmt(g('stdlib-threading', 'cpu_us'), '.1f')} us)"),
        _bar(f"ThreadingTCPServer CPU per connection vs TCPServer ({scenario})", "<= 1.3x",
             None if tx is None else tx <= 1.3,
             f"{_x(tx)} ({_fmt(th, '.1f')} vs {_fmt(fl, '.1f')} us)"),
    ]


def _ratio_bar(name: str, target: str, limit: float, a: Optional[float],
               b: Optional[float], unit: str = "us") -> Dict[str, Any]:
    """A bar met when a / b <= limit."""
    r = a / b if a is not None and b else None
    return _bar(name, target, None if r is None else r <= limit,
                f"{_x(r)} ({_fmt(a, '.1f')} vs {_fmt(b, '.1f')} {unit})")


def _filter_bars(report: "Report") -> List[Dict[str, Any]]:
    """The accept filter's bars (issue 19), for the scenarios run with the
    ``+filter`` servers: with the rule that fits the request, the threaded
    server close to the synchronous one and ahead of the peers, the
    synchronous one hardly dearer, fewer context switches; where the server
    speaks first (daytime, rule none) nothing changes."""
    bars: List[Dict[str, Any]] = []
    thf, tcpf = "fastlisten-threading+filter", "fastlisten-tcp+filter"
    for scenario in OTHER_SCENARIOS:
        g = lambda server, key: _get(report, scenario, server, key)  # noqa: E731
        th = g(thf, "cpu_us")
        if th is None and g(tcpf, "cpu_us") is None:
            continue
        what = f"({scenario}, filter on)"
        bars.append(_ratio_bar(f"ThreadingTCPServer CPU per connection vs TCPServer {what}",
                               "<= 1.2x", 1.2, th, g("fastlisten-tcp", "cpu_us")))
        bars.append(_ratio_bar(f"ThreadingTCPServer CPU per connection {what}",
                               "<= 0.2x stdlib", 0.2, th, g("stdlib-threading", "cpu_us")))
        for peer in ("uvloop", "gevent"):
            p = g(peer, "cpu_us")
            bars.append(_bar(f"ThreadingTCPServer CPU per connection vs {peer} {what}", "less",
                             None if th is None or p is None else th < p,
                             f"{_fmt(th, '.1f')} vs {_fmt(p, '.1f')} us"))
        bars.append(_ratio_bar(f"TCPServer CPU per connection, filter on vs off ({scenario})",
                               "<= 1.05x", 1.05, g(tcpf, "cpu_us"), g("fastlisten-tcp", "cpu_us")))
        on, off = g(thf, "switches"), g("fastlisten-threading", "switches")
        bars.append(_bar(f"ThreadingTCPServer context switches per connection, filter on vs "
                         f"off ({scenario})", "fewer",
                         None if on is None or off is None else on < off,
                         f"{_fmt(on, '.2f')} vs {_fmt(off, '.2f')}"))
    for server, plain in ((thf, "fastlisten-threading"), (tcpf, "fastlisten-tcp")):
        a = _get(report, "daytime", server, "cpu_us")
        b = _get(report, "daytime", plain, "cpu_us")
        if a is not None:
            label = "ThreadingTCPServer" if server == thf else "TCPServer"
            bars.append(_ratio_bar(f"{label} CPU per connection, filter (rule none) on vs off "
                                   "(daytime)", "<= 1.05x", 1.05, a, b))
    return bars


def evaluate(report: "Report", scenario: str = "daytime") -> List[Dict[str, Any]]:
    """The bars, each as {bar, target, met (True/False/None), figure}."""
    bars: List[Dict[str, Any]] = []
    g = lambda server, key: _get(report, scenario, server, key)  # noqa: E731

    # ThreadingTCPServer: rate and CPU per connection against the stdlib's
    rx, cx = g("fastlisten-threading", "rate_x"), g("fastlisten-threading", "cpu_us_x")
    bars.append(_bar("ThreadingTCPServer connections/s", ">= 2.5x stdlib",
                     None if rx is None else rx >= 2.5,
                     f"{_x(rx)} ({_fmt(g('fastlisten-threading', 'rate'), ',.0f')} vs "
                     f"{_fmt(g('stdlib-threading', 'rate'), ',.0f')} conn/s)"))
    bars.append(_bar("ThreadingTCPServer CPU per connection", "<= 0.2x stdlib",
                     None if cx is None else cx <= 0.2,
                     f"{_x(cx)} ({_fmt(g('fastlisten-threading', 'cpu_us'), '.1f')} vs "
                     f"{_fmt(g('stdlib-threading', 'cpu_us'), '.1f')} us)"))
    # ... and against fastlisten's own synchronous server (the hand-off's cost)
    th, fl = g("fastlisten-threading", "cpu_us"), g("fastlisten-tcp", "cpu_us")
    tx = th / fl if th is not None and fl else None
    bars.append(_bar("ThreadingTCPServer CPU per connection vs TCPServer", "<= 1.3x",
                     None if tx is None else tx <= 1.3,
                     f"{_x(tx)} ({_fmt(th, '.1f')} vs {_fmt(fl, '.1f')} us)"))
    # the same two CPU bars for handlers that read a request first (when run)
    for other in OTHER_SCENARIOS:
        if other != scenario and other in report.results:
            bars += _threading_cpu_bars(report, other)

    # TCPServer: against the native reference loop, and user CPU against the stdlib's
    nat = g("native", "cpu_us")
    ratio = fl / nat if fl is not None and nat else None
    bars.append(_bar("TCPServer CPU per connection", "<= 1.1x the C loop",
                     None if ratio is None else ratio <= 1.1,
                     f"{_x(ratio)} ({_fmt(fl, '.1f')} vs {_fmt(nat, '.1f')} us)"))
    ux = g("fastlisten-tcp", "cpu_user_us_x")
    bars.append(_bar("TCPServer user CPU per connection", "<= 1/3 of stdlib",
                     None if ux is None else ux <= 1 / 3,
                     f"{_x(ux)} ({_fmt(g('fastlisten-tcp', 'cpu_user_us'), '.1f')} vs "
                     f"{_fmt(g('stdlib-tcp', 'cpu_user_us'), '.1f')} us)"))

    # burst: no listen-queue overflow for any fastlisten server
    burst = report.results.get("burst", {})
    n = report.options.get("burst")
    # The listener's own drop count (a superset of its overflows) when the
    # kernel gives it; else the machine-wide ListenOverflows.
    def drops(s: str) -> Optional[float]:
        own = burst[s].get("listener_drops")
        return own if own is not None else burst[s].get("listen_overflows")
    flows = {s: drops(s) for s in FL_SERVERS if s in burst}
    std = {s: drops(s) for s in STD_SERVERS if s in burst}
    bars.append(_bar(f"ListenOverflows in a {n}-connection burst", "0 for every fastlisten server",
                     None if not flows or None in flows.values()
                     else all(v == 0 for v in flows.values()),
                     f"fastlisten {_join(flows.values(), 'g')}; stdlib {_join(std.values(), 'g')}"
                     " (TCP/Threading/Forking; the listener's own drops)"))

    # shutdown() latency
    sd = {s: report.shutdown[s].get("p99_ms") for s in FL_SERVERS if s in report.shutdown}
    met = None if not sd or None in sd.values() else all(v is not None and v < 1.0 for v in sd.values())
    oc = {s: report.shutdown[s].get("p99_on_cpu_ms") for s in sd}
    std_sd = {s: report.shutdown[s].get("p99_ms") for s in STD_SERVERS if s in report.shutdown}
    bars.append(_bar("shutdown() to serve_forever returning, p99", "< 1 ms", met,
                     f"fastlisten {_join(sd.values(), '.3f')} ms "
                     f"(less CPU wait {_join(oc.values(), '.3f')}); "
                     f"stdlib {_join(std_sd.values(), '.0f')} ms (TCP/Threading/Forking)"))

    # against the peers
    for label, mine in (("TCPServer", fl), ("ThreadingTCPServer", th)):
        for peer in ("uvloop", "gevent"):
            p = g(peer, "cpu_us")
            bars.append(_bar(f"{label} CPU per connection vs {peer}", "less",
                             None if mine is None or p is None else mine < p,
                             f"{_fmt(mine, '.1f')} vs {_fmt(p, '.1f')} us"))
    return bars + _filter_bars(report)
