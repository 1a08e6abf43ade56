"""``fastlisten reliability``: fastlisten's threading server and the
standard library's, side by side, under abort storms, a soak, an EMFILE
storm, handler faults and SIGINT (see fastlisten.benchmark.reliability)."""

from __future__ import annotations

import argparse
import json
import sys

from fastlisten.benchmark import reliability


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("reliability", help="fastlisten and the stdlib under hostile loads",
                       description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="small counts (seconds instead of minutes)")
    p.add_argument("--scenario", action="append", choices=list(reliability.SCENARIOS),
                   help="run only this scenario (repeatable; default: all)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    results = reliability.run(args.scenario, quick=args.quick,
                              progress=lambda what: print(f"... {what}", file=sys.stderr))
    table = reliability.markdown(results)
    print(table, end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0
