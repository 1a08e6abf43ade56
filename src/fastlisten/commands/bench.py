"""``fastlisten bench``: fastlisten against the standard library and its
peers, side by side in one run, on this machine."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from fastlisten.benchmark.protocol import SCENARIOS
from fastlisten.benchmark.runner import Options
from fastlisten.benchmark.servers import SERVERS


def add_parser(subparsers: Any) -> None:
    """Register the ``bench`` subcommand."""
    from fastlisten.benchmark.report import NOTES

    p = subparsers.add_parser(
        "bench", help="compare fastlisten with the stdlib and its peers on this machine",
        description=__doc__, epilog="The columns: " + NOTES)
    p.add_argument("--quick", action="store_true",
                   help="small counts and one repeat: under a minute")
    p.add_argument("--scenario", action="append", choices=SCENARIOS, dest="scenarios",
                   help="run only this scenario (repeatable; default: all)")
    p.add_argument("--server", action="append", choices=[s.name for s in SERVERS],
                   dest="servers", help="run only this server (repeatable; default: all installed)")
    numbers = [
        ("repeats", "--repeats", int, "runs per server and scenario"),
        ("total", "--count", int, "connections per run at most"),
        ("duration", "--duration", float, "seconds during which each run starts connections"),
        ("concurrency", "--concurrency", int, "concurrent connections"),
        ("burst", "--burst", int, "connections opened at once in 'burst'"),
        ("timeout", "--timeout", float,
         "seconds one connection may take before it counts as a timeout"),
        ("shutdown_cycles", "--shutdown-cycles", int,
         "shutdown() measurements per server (the stdlib's at most 20)"),
    ]
    for dest, flag, kind, text in numbers:
        lo, hi = Options.LIMITS[dest]
        default = f"default {getattr(Options, dest):,}"
        if dest in Options.QUICK:
            default += f"; quick {Options.QUICK[dest]:,}"
        p.add_argument(flag, dest=dest, type=kind, metavar="N" if kind is int else "SECONDS",
                       help=f"{text} ({default}; {lo:,} to {hi:,})")
    p.set_defaults(flags={dest: flag for dest, flag, _, _ in numbers})
    p.add_argument("--no-pin", action="store_false", dest="pin",
                   help="do not pin the server and the load generator to different CPUs")
    p.add_argument("--balancer", action="store_true",
                   help="instead: CPU per connection with PROXY protocol v2 on vs off, and "
                        "connections/s through HAProxy to one and two instances")
    p.add_argument("--restarts", action="store_true",
                   help="instead: reloads, recycling, scaling and killed workers of "
                        "'serve --workers' under a steady load (both port-sharing modes, "
                        "beside a naive stop-then-start), and balance over 1, 2, 4 workers; "
                        "20 events per row (quick: 5), --duration seconds of load per "
                        "scenario (default 8; quick 3), --concurrency (default 16)")
    p.add_argument("--wide", action="store_true",
                   help="tables with every figure (user and system CPU, p50 and max latency, "
                        "the machine-wide ListenOverflows, errors and timeouts apart), wider "
                        "than 100 columns")
    p.add_argument("--bars", action="store_true",
                   help="for the project's own runs (docs/benchmarks.md): also judge the run against "
                        "the performance bar fastlisten holds itself to")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    p.add_argument("--plot", metavar="PNG", help="draw the chart (needs matplotlib: fastlisten[bench])")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: show (and --markdown/--plot) a report saved with --json")
    p.set_defaults(run=run)


def _progress_printer() -> Any:
    tty = sys.stderr.isatty()
    t0 = time.monotonic()

    def progress(done: int, total: int, what: str) -> None:
        line = f"[{done}/{total}] {time.monotonic() - t0:5.0f}s  {what}"
        if tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish() -> None:
        if tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    progress.finish = finish  # type: ignore[attr-defined]
    return progress


def run(args: argparse.Namespace) -> int:
    """Run the comparison; print the table; write the files asked for."""
    from fastlisten.benchmark import report as rep
    from fastlisten.benchmark.bars import evaluate
    from fastlisten.benchmark.runner import run_benchmark

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fastlisten bench: --plot needs matplotlib: pip install 'fastlisten[bench]'",
                  file=sys.stderr)
            return 2
    kw = {dest: getattr(args, dest) for dest in ("scenarios", "servers", *Options.LIMITS)
          if getattr(args, dest) is not None}
    try:
        for dest, flag in args.flags.items():
            if dest in kw:
                Options.check(dest, kw[dest], flag)
    except ValueError as exc:
        print(f"fastlisten bench: {exc}", file=sys.stderr)
        return 2
    if args.balancer:
        return _run_balancer(args)
    kw["pin"] = args.pin
    if args.restarts:
        return _run_restarts(args)
    opts = Options.quick(**kw) if args.quick else Options(**kw)
    if args.from_json:
        import json
        with open(args.from_json) as f:
            report = rep.Report.from_json(json.load(f))
    else:
        progress = _progress_printer()
        try:
            report = run_benchmark(opts, progress)
        finally:
            progress.finish()
    # The project's bars are the project's business: judged only when asked.
    report.bars = evaluate(report) if args.bars else []
    print(rep.to_text(report, wide=args.wide))
    quick = report.options.get("repeats") == 1 if args.from_json else args.quick
    command = "fastlisten bench" + (" --quick" if quick else "") + \
        (" --wide" if args.wide else "") + (" --bars" if args.bars else "")
    if args.json:
        rep.write_json(report, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(rep.to_markdown(report, command, wide=args.wide))
    if args.plot:
        rep.plot(report, args.plot)
    return 1 if report.failures else 0


def _say(text: str) -> None:
    """Progress of --balancer/--restarts, a line on stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _run_balancer(args: argparse.Namespace) -> int:
    """``fastlisten bench --balancer``: see fastlisten.benchmark.balancer."""
    import json

    from fastlisten.benchmark.balancer import run_balancer_bench, to_text

    kw: "dict[str, Any]" = {"total": args.total or (2000 if args.quick else 20000),
          "repeats": args.repeats or (1 if args.quick else 3),
          "concurrency": args.concurrency or 16,
          "timeout": args.timeout or 5.0}

    report = run_balancer_bench(progress=_say, **kw)
    print(to_text(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _run_restarts(args: argparse.Namespace) -> int:
    """``--restarts``: benchmark.restarts, printed (and --json/--markdown)."""
    import json

    from fastlisten.benchmark import restarts

    cycles = 5 if args.quick else 20
    duration = args.duration or (3.0 if args.quick else 8.0)
    result = restarts.run_restarts(cycles, duration, args.concurrency or 16,
                                   _say)
    text = restarts.to_text(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0
