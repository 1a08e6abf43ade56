"""Pieces both cores share: argument checks and conversions that are not on
the per-connection path.  Kept in one place so that the compiled core and
its pure-Python twin cannot drift apart on them."""

from __future__ import annotations

import errno
import math
import operator
from time import monotonic
from typing import Any, Optional

#: Largest batch one accept_many call takes (bounds the core's buffer).
MAX_BATCH = 65536
#: Connections accept_many takes per call unless told otherwise.
DEFAULT_BATCH = 64

#: Accept errors are counted by errno; errno values from ERRNO_SLOTS - 1 up
#: share the last slot.  (csrc/fl_net.h: FL_ERRNO_SLOTS; the compiled core
#: refuses to import if the two disagree.)
ERRNO_SLOTS = 160

#: After a capacity error (EMFILE, ...) accept_many pauses this long, doubling
#: on each further one up to BACKOFF_MAX_MS, instead of spinning on a
#: listener that stays readable.
BACKOFF_FIRST_MS = 10
BACKOFF_MAX_MS = 1000

#: errno values of accept() that mean "the peer gave up, go on" and "out of
#: resources, back off"; every other errno is raised.  (The C core has the
#: same table in csrc/fl_net.c:fl_accept_error_class.)
IGNORABLE = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED", "ECONNRESET", "EPROTO", "EPERM", "ETIMEDOUT",
        "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH",
    )
    if hasattr(errno, name)
)
CAPACITY = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


#: The range of a C int, which the system calls take.
INT_MIN, INT_MAX = -2**31, 2**31 - 1


def c_int(value: Any, name: str) -> int:
    """``value`` as the C int a system call takes, checked as the socket
    module checks it: TypeError for anything but an integer (a float
    included, never truncated), OverflowError outside the C int range."""
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}: "
                        f"{value!r}") from None
    if not INT_MIN <= n <= INT_MAX:
        raise OverflowError(f"{name} {n} does not fit a C int")
    return n


def check_max(n: Any) -> int:
    """accept_many's ``max``, checked: an integer 1 to MAX_BATCH."""
    n = c_int(n, "max")
    if not 1 <= n <= MAX_BATCH:
        raise ValueError(f"max must be between 1 and {MAX_BATCH}, not {n}")
    return n


#: The longest single poll() wait, in ms (about 24.8 days; poll takes an
#: int).  A longer timeout waits in steps of this until its deadline.
MAX_WAIT_MS = 2**31 - 2
#: Timeouts from this many seconds up (inf included; some 31 million years)
#: wait for ever: no clock reaches their deadline, and beyond it a float
#: deadline would be too coarse or overflow.
FOREVER_S = 1e15


def timeout_ms(timeout: Optional[float]) -> int:
    """Seconds (None, inf or at least FOREVER_S: for ever, -1) as poll()'s
    milliseconds, rounded up so that a wait never ends before its deadline
    and at most MAX_WAIT_MS (the caller waits again until its deadline)."""
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if timeout != timeout or timeout < 0:      # NaN, or negative
        raise ValueError(f"timeout must be non-negative, not {timeout!r}")
    if timeout >= FOREVER_S:
        return -1
    ms = math.ceil(timeout * 1000)
    return ms if ms < MAX_WAIT_MS else MAX_WAIT_MS


def remaining(deadline: float) -> float:
    """Seconds left until a monotonic deadline, never negative."""
    left = deadline - monotonic()
    return left if left > 0 else 0.0


def closed_error() -> OSError:
    """What using a closed listener raises: EBADF, as a closed socket does."""
    return OSError(errno.EBADF, "Bad file descriptor: the listener is closed")


# -- the accept filter (csrc/fl_filter.h; both cores) -----------------------

#: The readiness rules of ``RawListener.set_accept_filter`` and their codes
#: (csrc/fl_filter.h: FL_RULE_*).
RULES = {"none": 0, "data": 1, "line": 2, "http": 3, "tls": 4}
#: ready_check's verdicts by code (csrc/fl_filter.h: FL_JUDGE_*).
VERDICTS = {1: "ready", 0: "wait", -1: "malformed", -2: "oversize", -3: "closed"}
#: Why a waiting connection was closed: the keys of stats()["dropped"], in
#: the order of csrc/fl_filter.h's FL_DROP_* (from 1).
DROP_REASONS = ("malformed", "oversize", "closed", "reset", "expired", "evicted",
                "shutdown", "error", "slow")
#: Defaults of set_accept_filter: the total deadline from accept to ready,
#: the longest line or request head, the most connections waiting at once.
DEFAULT_READY_TIMEOUT = 10.0
DEFAULT_READY_MAX_BYTES = 16384
DEFAULT_MAX_WAITING = 1024
#: Bounds: a deadline fits poll()'s int milliseconds; a head fits 1 MiB.
MAX_READY_TIMEOUT = 1e6
MAX_READY_MAX_BYTES = 1 << 20
#: The largest first TLS record (a ClientHello): RFC 8446 5.1, 2^14 bytes.
TLS_RECORD_MAX = 16384


def check_filter(rule: Any, timeout: Any, max_bytes: Any, max_waiting: Any, proxy: Any,
                 proxy_max_v2: Any) -> tuple:
    """set_accept_filter's arguments, checked: (rule code, timeout in ms,
    max_bytes, max_waiting, proxy versions, proxy_max_v2)."""
    from fastlisten import proxy as _proxy

    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 < timeout <= MAX_READY_TIMEOUT:     # (NaN fails too)
        raise ValueError(f"timeout must be more than 0 and at most {MAX_READY_TIMEOUT:g} "
                         f"seconds, not {timeout!r}")
    max_bytes = c_int(max_bytes, "max_bytes")
    if not 1 <= max_bytes <= MAX_READY_MAX_BYTES:
        raise ValueError(f"max_bytes must be between 1 and {MAX_READY_MAX_BYTES}, "
                         f"not {max_bytes}")
    max_waiting = c_int(max_waiting, "max_waiting")
    if max_waiting < 1:
        raise ValueError(f"max_waiting must be at least 1, not {max_waiting}")
    proxy = c_int(proxy, "proxy")
    if not 0 <= proxy <= 3:
        raise ValueError(f"proxy must be 0 (off), V1, V2 or V1 | V2, not {proxy}")
    if proxy:
        _proxy.check_args(proxy, proxy_max_v2)
    else:
        proxy_max_v2 = c_int(proxy_max_v2, "proxy_max_v2")
    return (RULES[rule], max(1, math.ceil(timeout * 1000)), max_bytes, max_waiting, proxy,
            proxy_max_v2)


def check_min_rate(min_rate: Any) -> int:
    """set_accept_filter's ``min_rate``, checked: bytes per second, 0 for none."""
    if isinstance(min_rate, bool) or not isinstance(min_rate, int):
        raise TypeError(f"min_rate must be an int (bytes per second), not "
                        f"{type(min_rate).__name__}")
    if not 0 <= min_rate <= MAX_READY_MAX_BYTES:
        raise ValueError(f"min_rate must be between 0 (none) and {MAX_READY_MAX_BYTES} bytes "
                         f"per second, not {min_rate}")
    return min_rate
