"""``fastlisten info``: this machine's listen limits, counters and features.

Prints what decides how a listener behaves here -- the backlog ceiling
(somaxconn), the SYN queue, SYN cookies, what a full queue does, the
ephemeral and privileged port ranges -- the kernel's ListenOverflows /
ListenDrops counters, and which options (SO_REUSEPORT, TCP_DEFER_ACCEPT,
TCP_FASTOPEN) and which core are available.  ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

from fastlisten import sysinfo


def add_parser(subparsers: Any) -> None:
    """Register ``info``."""
    p = subparsers.add_parser(
        "info", help="show this machine's listen limits, counters and features",
        description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _yes(value: Any) -> str:
    if value is None:
        return "unknown"
    return "yes" if value else "no"


def _unknown(value: Any) -> str:
    return "unknown" if value is None else str(value)


def _lines(report: Dict[str, Any]) -> List[str]:
    lim, cnt, feat = report["limits"], report["counters"], report["features"]
    eph = lim["ip_local_port_range"]
    eph_text = f"{eph[0]}-{eph[1]}" if eph else "unknown"
    reserved = ", ".join(f"{a}" if a == b else f"{a}-{b}"
                         for a, b in lim["ip_local_reserved_ports"]) or "none"
    cookies = {0: "off", 1: "on when the SYN queue overflows", 2: "always"}.get(
        lim["tcp_syncookies"], _unknown(lim["tcp_syncookies"]))
    overflow = {0: "drop the handshake (clients retry after 1 s, 3 s, ...)",
                1: "reset the client"}.get(lim["tcp_abort_on_overflow"],
                                           _unknown(lim["tcp_abort_on_overflow"]))
    tfo = lim["tcp_fastopen"]
    tfo_text = "unknown" if tfo is None else (
        f"{tfo} (client {'on' if tfo & 1 else 'off'}, server {'on' if tfo & 2 else 'off'})")
    start = lim["ip_unprivileged_port_start"]
    return [
        f"fastlisten {report['fastlisten']}  Python {report['python']}  "
        f"Linux {report['kernel']}",
        "",
        "Listen limits",
        f"  somaxconn (largest backlog)      {_unknown(lim['somaxconn'])}",
        f"  tcp_max_syn_backlog (SYN queue)  {_unknown(lim['tcp_max_syn_backlog'])}",
        f"  tcp_syncookies                   {cookies}",
        f"  tcp_abort_on_overflow            {overflow}",
        f"  ip_local_port_range (ephemeral)  {eph_text}",
        f"  ip_local_reserved_ports          {reserved}",
        f"  ip_unprivileged_port_start       {_unknown(start)}"
        + (" (ports below need root or CAP_NET_BIND_SERVICE)" if start else ""),
        f"  tcp_fastopen                     {tfo_text}",
        "",
        "Counters since boot (this network namespace)",
        f"  ListenOverflows (accept queue full)  {_unknown(cnt['ListenOverflows'])}",
        f"  ListenDrops (SYNs dropped)           {_unknown(cnt['ListenDrops'])}",
        "",
        "Features",
        f"  compiled core                    {_yes(feat['compiled_core'])}",
        f"  SO_REUSEPORT                     {_yes(feat['SO_REUSEPORT'])}",
        f"  TCP_DEFER_ACCEPT                 {_yes(feat['TCP_DEFER_ACCEPT'])}",
        f"  TCP_FASTOPEN                     {_yes(feat['TCP_FASTOPEN'])}"
        + ("" if feat["TCP_FASTOPEN_server_enabled"] in (None, True)
           else " (server side off: sysctl -w net.ipv4.tcp_fastopen=3)"),
        f"  TCP_INFO (queue())               {_yes(feat['TCP_INFO'])}",
        f"  IPv6                             {_yes(feat['IPv6'])}",
    ]


def run(args: argparse.Namespace) -> int:
    """Print the report, as text or JSON."""
    report = sysinfo.report()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print("\n".join(_lines(report)))
    return 0
