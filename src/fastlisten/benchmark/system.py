"""What the benchmark reads from the machine: its description, the kernel's
listen-queue counters, and which CPUs to pin the two sides to."""

from __future__ import annotations

import os
import platform
import sys
from typing import Dict, Optional, Tuple

import fastlisten
from fastlisten import sysinfo


def _read(path: str) -> Optional[str]:
    text = sysinfo.read_proc(path)
    return None if text is None else text.strip()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess otherwise)."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> Dict[str, object]:
    """The machine a result came from: written beside every result."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "fastlisten": fastlisten.VERSION,
        "fastlisten_core": "compiled" if fastlisten.compiled else "pure Python",
        "somaxconn": sysinfo.somaxconn(),
        "tcp_tw_reuse": _int(_read("/proc/sys/net/ipv4/tcp_tw_reuse")),
        "ip_local_port_range": "-".join(map(str, sysinfo.ephemeral_port_range() or ())),
        "executable": sys.executable,
        "loadavg_1min": loadavg(),
    }


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def listen_counters() -> Dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops (0 where unreadable): take deltas."""
    return {key: value or 0 for key, value in sysinfo.listen_counters().items()}


def busy_seconds() -> Optional[float]:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat), or None."""
    text = _read("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    f = [int(x) for x in text.splitlines()[0].split()[1:]]
    busy = sum(f[:3]) + sum(f[5:8])   # user nice system + irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def loadavg() -> Optional[float]:
    """The 1-minute load average."""
    text = _read("/proc/loadavg")
    return float(text.split()[0]) if text else None


def pick_cpus() -> Tuple[Optional[int], Optional[int]]:
    """(load generator CPU, server CPU), or (None, None) with fewer than two."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]
