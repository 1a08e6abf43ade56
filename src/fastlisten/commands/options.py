"""Listener options on the command line, generated from ListenConfig's fields.

Each listener option is defined once, as a field of
:class:`fastlisten.ListenConfig` with its help text and spelling in the
field's metadata; this module turns those into argparse flags
(``--backlog``, ``--no-reuse-address``, ``--unix-mode`` ...) and the parsed
flags back into a ListenConfig, which validates them.  Where to listen is
``--bind ADDR`` (parsed by :func:`fastlisten.address.parse`) or ``--fd``.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Mapping, Optional, Union

from fastlisten.config import ListenConfig, option_fields

__all__ = ["add_arguments", "from_args"]

#: Fields that --bind stands for.
_WHERE = ("host", "port", "path")


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r}") from None


_TYPES = {"octal": _octal, "float": float, "str": str}


def add_arguments(parser: argparse.ArgumentParser, default_bind: str = "127.0.0.1:0",
                  helps: Optional[Mapping[str, str]] = None) -> None:
    """Add ``--bind`` and a flag for every listener option to ``parser``;
    :func:`from_args` turns the parsed arguments into a ListenConfig.
    ``helps`` replaces the help text of some options (by field name), for
    a command whose defaults differ from the library's."""
    g = parser.add_argument_group("listener")
    g.add_argument("--bind", metavar="ADDR", default=None,
                   help=f"HOST:PORT, [IPv6]:PORT, :PORT or 0.0.0.0:PORT (every interface), "
                        f"PORT alone (no host: loopback only, 127.0.0.1, as in the library), "
                        f"or a Unix socket path (unix:PATH or anything with a /); not a URL; "
                        f"default {default_bind}")
    for f in option_fields():
        if f.name in _WHERE:
            continue
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kwargs: Dict[str, Any] = {"dest": f.name,
                                  "help": (helps or {}).get(f.name, meta["help"])}
        if f.default is False:
            kwargs["action"] = "store_true"
        elif f.default is True:
            kwargs["action"] = "store_false"
        else:
            kwargs["default"] = None
            kwargs["metavar"] = meta.get("metavar", "N")
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
                del kwargs["metavar"]
            elif f.name != "fd":
                kwargs["type"] = _TYPES.get(meta.get("type", ""), int)
        g.add_argument(flag, **kwargs)
    parser.set_defaults(_default_bind=default_bind)


def from_args(args: argparse.Namespace) -> ListenConfig:
    """A ListenConfig from arguments added by :func:`add_arguments` (raises
    what ListenConfig raises for a bad value)."""
    from fastlisten import address

    options = {f.name: getattr(args, f.name) for f in option_fields() if f.name not in _WHERE}
    fd: Optional[Union[int, str]] = options.pop("fd")
    if fd is not None:
        if args.bind is not None:
            raise ValueError("give --bind or --fd, not both")
        return ListenConfig(fd=fd if fd == "systemd" else _cli_int("--fd", str(fd)), **options)
    where = address.parse(args.bind if args.bind is not None else args._default_bind)
    return ListenConfig(**where, **options)


def _cli_int(option: str, text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"{option} must be a number or 'systemd', not {text!r}") from None
