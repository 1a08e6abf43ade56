"""The report's forms: a terminal table, Markdown, JSON and a chart.

A run shows what its user asked about, fastlisten against the others on
their machine, in tables that fit :data:`WIDTH` columns; ``wide`` adds every
figure (the tables of docs/benchmarks.md), and the project's own bars are shown only
when the report carries them (``fastlisten bench --bars``)."""

from __future__ import annotations

import json
import logging
import textwrap
from typing import Any, List, Optional, Sequence, Tuple

from fastlisten.benchmark.results import Report

#: The terminal's width the text report keeps to.
WIDTH = 100

#: A run's columns: rate and CPU per connection, each against the stdlib's,
#: the latency tail, and what went wrong.
HEADERS = ("server", "conn/s", "x std", "CPU us/conn", "x std", "p99 ms", "drops", "failed")

#: ``wide``: every figure.
WIDE_HEADERS = ("server", "conn/s", "x std", "CPU us/conn", "x std", "user us", "x std",
                "sys us", "cs/conn", "p50 ms", "p99 ms", "max ms", "queue drops", "overflows*",
                "errors", "timeouts")


def _num(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _spread(x: Optional[float]) -> str:
    return "" if x is None else f" ±{x * 50:.0f}%"   # half the (max-min)/median range


def _ratio(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def rows(report: Report, scenario: str, wide: bool = False) -> List[Tuple[str, ...]]:
    """One table's rows (strings), in the order the servers were declared:
    HEADERS' columns, or with ``wide`` WIDE_HEADERS'."""
    out: List[Tuple[str, ...]] = []
    for name, row in report.results.get(scenario, {}).items():
        label = report.servers.get(name, {}).get("label", name)
        if not wide:
            out.append((
                label,
                _num(row["rate"], ",.0f") + _spread(row["rate_spread"]),
                _ratio(row["rate_x"]),
                _num(row["cpu_us"], ".1f") + _spread(row["cpu_us_spread"]),
                _ratio(row["cpu_us_x"]),
                _num(row["p99_ms"], ".2f"),
                _num(row.get("listener_drops"), "g"),
                str(row["errors"] + row["timeouts"]),
            ))
            continue
        out.append((
            label,
            _num(row["rate"], ",.0f") + _spread(row["rate_spread"]),
            _ratio(row["rate_x"]),
            _num(row["cpu_us"], ".1f") + _spread(row["cpu_us_spread"]),
            _ratio(row["cpu_us_x"]),
            _num(row["cpu_user_us"], ".1f"),
            _ratio(row["cpu_user_us_x"]),
            _num(row["cpu_sys_us"], ".1f"),
            _num(row.get("switches"), ".2f"),
            _num(row["p50_ms"], ".2f"),
            _num(row["p99_ms"], ".2f"),
            _num(row["max_ms"], ".1f"),
            _num(row.get("listener_drops"), "g"),
            _num(row["listen_overflows"], "g"),
            str(row["errors"]),
            str(row["timeouts"]),
        ))
    return out


def _scenario_title(report: Report, scenario: str) -> str:
    o = report.options
    if scenario == "burst":
        return f"{scenario}: {o['burst']} connections opened at once, x{o['repeats']} repeats"
    return (f"{scenario}: {o['concurrency']} concurrent connections, started for "
            f"{o['duration']:g} s per run (at most {o['total']:,}), x{o['repeats']} repeats")


def machine_line(report: Report) -> str:
    """The machine, on one line."""
    m = report.machine
    pins = report.options.get("pinned_cpus") or [None, None]
    pin = (f"load generator on CPU {pins[0]}, server on CPU {pins[1]}"
           if pins[0] is not None else "not pinned (fewer than 2 CPUs)")
    return (f"{m['cpu']} ({m['cpus']} CPUs), {m['kernel']}, {m['python']}, "
            f"fastlisten {m['fastlisten']} ({m['fastlisten_core']} core), "
            f"somaxconn {m['somaxconn']}; {pin}")


def _shutdown_rows(report: Report) -> List[Tuple[str, ...]]:
    out: List[Tuple[str, ...]] = []
    for name, row in report.shutdown.items():
        label = report.servers.get(name, {}).get("label", name)
        if "error" in row:
            out.append((label, "error", "", "", "", "", ""))
            continue
        out.append((label, str(row["cycles"]), _num(row["p50_ms"], ".3f"),
                    _num(row["p99_ms"], ".3f"), _num(row["max_ms"], ".3f"), _ratio(row["p99_x"]),
                    _num(row.get("p99_on_cpu_ms"), ".3f")))
    return out


SHUTDOWN_HEADERS = ("server", "cycles", "p50 ms", "p99 ms", "max ms", "p99 x std",
                    "p99 ms less CPU wait")
BAR_HEADERS = ("bar", "target", "result", "measured")


def _bar_rows(report: Report) -> List[Tuple[str, ...]]:
    verdict = {True: "met", False: "NOT met", None: "n/a"}
    return [(b["bar"], b["target"], verdict[b["met"]], b["figure"]) for b in report.bars]


#: Columns of text, left-aligned (the others are figures, right-aligned).
_TEXT_COLUMNS = {"server", "bar", "measured"}


def _text_table(headers: Sequence[str], body: List[Tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    left = [h in _TEXT_COLUMNS for h in headers]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if left[i] else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in body])


def _md_table(headers: Sequence[str], body: List[Tuple[str, ...]]) -> str:
    head = "| " + " | ".join(headers) + " |"
    sep = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(headers))) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in body])


def _sections(report: Report, table: Any, heading: Any, para: Any = str,
              wide: bool = False) -> List[str]:
    parts = []
    for scenario in report.results:
        parts += [heading(_scenario_title(report, scenario)),
                  table(WIDE_HEADERS if wide else HEADERS, rows(report, scenario, wide)), ""]
        timed_out = [report.servers.get(name, {}).get("label", name)
                     for name, r in report.results[scenario].items() if r.get("timeouts")]
        if timed_out:
            parts += [para(f"(timeouts: connections that took longer than "
                           f"{report.options.get('timeout', 5):g} s (--timeout) and were given "
                           f"up, here for {', '.join(timed_out)}: a handshake dropped from a "
                           f"full accept queue is retried after 1 s, 3 s, ..., and a server "
                           f"that forks per connection works through a burst slowly)"), ""]
        others = [r["other_cpus"] for r in report.results[scenario].values()
                  if r.get("other_cpus") is not None]
        if others and max(others) >= 0.1:
            parts += [para(f"(CPU used by other processes while these loads ran: median "
                           f"{sorted(others)[len(others) // 2]:.2f}, max {max(others):.2f} "
                           f"CPUs; rates are disturbed by it more than CPU per connection "
                           f"is)"), ""]
    if report.shutdown:
        parts += [heading("shutdown(): the call to serve_forever returning "
                          "(idle server, one process per server)"),
                  table(SHUTDOWN_HEADERS, _shutdown_rows(report)), ""]
    if report.bars:
        parts += [heading("the performance bar fastlisten holds itself to (its README), "
                          "from the runs above (daytime unless named)"),
                  table(BAR_HEADERS, _bar_rows(report)), ""]
    if report.skipped:
        parts.append(para("Skipped: " + "; ".join(f"{k} ({v})"
                                                 for k, v in report.skipped.items())))
    if report.failures:
        parts.append("FAILURES:\n" + "\n".join("  " + f for f in report.failures))
    return parts


_COMMON_NOTES = (
    "conn/s: connections completed per second while new ones were being started. "
    "CPU us/conn: the server process's user+system CPU time (getrusage, children "
    "included) over the run, divided by the connections it completed. "
    "x std: ratio to the standard-library server of the same kind in this run "
    "(peers and the C loop: to stdlib TCPServer). ±: half the spread of the repeats "
    "around their median (shown only with 2 or more repeats). "
    "+filter: fastlisten's accept filter on (listen_config's ready_rule 'line' for echo, "
    "'http' for http-close, 'none' where the server speaks first). ")
_LEAN_NOTES = (
    "p99 ms: connect-to-reply latency, 99th percentile. "
    "drops: connections the server's own listening socket dropped because its accept "
    "queue was full (SO_MEMINFO sk_drops). "
    "failed: connections that failed (refused, reset, or a reply shorter than the "
    "scenario's) or were not completed within --timeout seconds. "
    "--wide shows every figure.")
_WIDE_NOTES = (
    "user us and sys us: the CPU time's two parts. "
    "cs/conn: the server process's context switches per connection (getrusage nvcsw + "
    "nivcsw: every thread, children included; what perf stat -e context-switches "
    "counts). "
    "p50/p99/max ms: connect-to-reply latency. "
    "queue drops: connections the server's own listening socket dropped "
    "because its accept queue was full (SO_MEMINFO sk_drops). overflows*: TcpExt "
    "ListenOverflows during the run, for the whole machine (other processes count too). "
    "errors: connections that failed (refused, reset, or a reply shorter than the "
    "scenario's). timeouts: connections not completed within --timeout seconds, "
    "given up by the load generator.")
_SHUTDOWN_NOTE = (
    " shutdown 'less CPU wait': the latency minus the time its two threads were runnable "
    "but waiting for a CPU held by other processes (/proc/.../schedstat).")


def notes(wide: bool = False) -> str:
    """What the columns are (those of ``wide`` tables, or of a run's)."""
    return _COMMON_NOTES + (_WIDE_NOTES if wide else _LEAN_NOTES) + _SHUTDOWN_NOTE


#: Every column explained (``fastlisten bench --help``).
NOTES = (_COMMON_NOTES + _LEAN_NOTES + " With --wide: " + _WIDE_NOTES + _SHUTDOWN_NOTE)


def _fill(text: str) -> str:
    return textwrap.fill(text, WIDTH, break_on_hyphens=False)


def to_text(report: Report, wide: bool = False) -> str:
    """The report as the terminal shows it: WIDTH columns (``wide``: every
    figure, in wider tables)."""
    parts = [_fill(f"fastlisten bench: {machine_line(report)}"), ""]
    parts += _sections(report, _text_table, lambda t: _fill(f"== {t}"), _fill, wide)
    parts += ["", _fill(notes(wide)), f"({report.seconds:.0f} s)"]
    return "\n".join(parts)


def to_markdown(report: Report, command: str = "fastlisten bench", wide: bool = False) -> str:
    """The report as Markdown (``wide``: what docs/benchmarks.md shows)."""
    parts = [f"Machine: {machine_line(report)}.  ",
             f"Run {report.started_at}, {report.seconds:.0f} s, with `{command}`.", ""]
    parts += _sections(report, _md_table, lambda t: f"**{t}**\n", wide=wide)
    parts += ["", notes(wide)]
    return "\n".join(parts) + "\n"


def write_json(report: Report, path: str) -> None:
    """The whole report, raw runs included, as JSON."""
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1, default=str)
        f.write("\n")


COLORS = {"fastlisten": "#1f77b4", "stdlib": "#9e9e9e", "peer": "#ff7f0e", "native": "#2ca02c"}
GROUPS = {"fastlisten": "fastlisten", "stdlib": "standard library", "peer": "peers",
          "native": "C loop (reference)"}


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files (Agg), with its own log lines
    (such as 'generated new fontManager' at its first run) kept out of the
    report's output."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(report: Report) -> Any:
    """The chart: one row per scenario (workload), each with the server CPU
    per connection (user and system, stacked) and the connections per
    second of every server, in the same order in every row; a legend names
    the colours (fastlisten, the standard library, the peers, the C loop)
    and the two shades of CPU.  Needs matplotlib (the ``bench`` extra);
    close it with ``matplotlib.pyplot.close(fig)``."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    thousands = FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}")

    scenarios = [s for s in report.results if report.results[s]]
    first = report.results[scenarios[0]] if scenarios else {}
    names = [n for n in report.servers if any(n in report.results[s] for s in scenarios)]
    # the most expensive on top, as measured in the first scenario
    names.sort(key=lambda n: (first.get(n) or {}).get("cpu_us") or 0.0)
    labels = [report.servers[n]["label"] for n in names]
    colors = [COLORS.get(report.servers[n]["group"], "#777") for n in names]
    rows = max(len(scenarios), 1)
    height = 0.32 * len(names) + 1.0
    fig, axes = plt.subplots(rows, 2, figsize=(12, rows * height + 1.4), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(names)))
    for (ax1, ax2), scenario in zip(axes, scenarios):
        table = report.results[scenario]
        get = lambda n, key: (table.get(n) or {}).get(key) or 0.0  # noqa: E731
        user = [get(n, "cpu_user_us") for n in names]
        system = [get(n, "cpu_sys_us") for n in names]
        totals = [get(n, "cpu_us") for n in names]
        ax1.barh(y, user, color=colors)
        ax1.barh(y, system, left=user, color=colors, alpha=0.45)
        # A forking server costs 100x the others: clip it rather than squash the rest.
        measured = sorted(t for t in totals if t > 0)
        middle = measured[len(measured) // 2] if measured else 0.0
        small = [t for t in measured if t <= 10 * middle]
        cap = max(small) * 1.25 if small else None
        clipped = cap is not None and max(totals) > 2 * cap
        if clipped:
            ax1.set_xlim(0, cap)
        for i, (t, u, s_) in enumerate(zip(totals, user, system)):
            if not t:
                ax1.text(0, i, " n/a", va="center", fontsize=7)
                continue
            off = clipped and cap is not None and t > cap
            ax1.text(cap if off else max(t, u + s_), i,
                     f" {t:,.1f}" + (" (off scale)" if off else ""),
                     va="center", ha="right" if off else "left", fontsize=7,
                     color="white" if off else "black")
        rate = [get(n, "rate") for n in names]
        ax2.barh(y, rate, color=colors)
        for i, r in enumerate(rate):
            ax2.text(r, i, f" {r:,.0f}" if r else " n/a", va="center", fontsize=7)
        ax1.set_yticks(y)
        ax1.set_yticklabels(labels, fontsize=8)
        ax2.set_yticks(y)
        ax2.set_yticklabels([])
        ax2.xaxis.set_major_locator(MaxNLocator(4))
        ax2.xaxis.set_major_formatter(thousands)
        ax1.set_title(f"{_scenario_title(report, scenario)}", loc="left", fontsize=9)
        for ax in (ax1, ax2):
            ax.spines[["top", "right"]].set_visible(False)
            ax.margins(x=0.2)
    axes[-1][0].set_xlabel("server CPU per connection, µs — lower is better")
    axes[-1][1].set_xlabel("connections per second — higher is better")
    groups = [g for g in COLORS if any(report.servers[n]["group"] == g for n in names)]
    handles = [Patch(color=COLORS[g], label=GROUPS[g]) for g in groups]
    handles += [Patch(facecolor="#555", label="user CPU"),
                Patch(facecolor="#555", alpha=0.45, label="system CPU")]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8,
               frameon=False)
    m = report.machine
    fig.suptitle(f"fastlisten bench: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('kernel')}, "
                 f"{m.get('python')}", fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (rows * height + 1.4)))
    return fig


def plot(report: Report, path: str) -> None:
    """Draw :func:`figure` into ``path`` (PNG).  Needs matplotlib."""
    plt = _pyplot()
    fig = figure(report)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
