"""The ``fastlisten`` command (also ``python -m fastlisten``).

Each subcommand is a module in ``fastlisten.commands`` with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``.  Their descriptions
are their module docstrings, shown as plain text (without the
reStructuredText ````literal```` markup).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
import warnings
from typing import Any, List, Optional

from fastlisten.errors import speaking

#: Subcommands, in the order ``--help`` lists them.
COMMANDS = ["demo", "info", "serve", "bench", "reliability"]


def _version() -> str:
    from fastlisten import VERSION, compiled

    core = "compiled" if compiled else "pure-Python"
    return (f"fastlisten {VERSION} ({core} core, "
            f"{platform.python_implementation()} {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlisten",
        description="Fast, trustworthy TCP listeners: tools and benchmarks.")
    parser.add_argument("-V", "--version", action="version", version=_version(),
                        help="print the version and the core in use, then exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"fastlisten.commands.{name}")
        module.add_parser(sub)
        command = sub.choices[name]
        if command.description:
            command.description = command.description.replace("``", "")
    return parser


def _log_warning(message: Any, category: type, filename: str, lineno: int,
                 file: Any = None, line: Optional[str] = None) -> None:
    """warnings.showwarning for the command line: one log line naming the
    warning's class, not the source line of the library that issued it."""
    logging.getLogger("fastlisten").warning("%s: %s", category.__name__, message)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    shown = warnings.showwarning
    warnings.showwarning = _log_warning
    try:
        with speaking("command line"):      # explanations name the flags typed
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
