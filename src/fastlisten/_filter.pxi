# The accept filter: bindings over csrc/fl_filter.c, included into
# fastlisten._core (RawListener.set_accept_filter holds one per listener).
# fastlisten._corepy has the pure-Python twin; fastlisten._coreshared the
# argument checks and the tables both share.

from fastlisten.includes.fl_filter cimport (
    fl_ready_judge, fl_filter_stats, fl_filter_stats_read, FL_DROP_SLOTS,
)
from fastlisten._coreshared import VERDICTS as _VERDICTS, DROP_REASONS as _DROP_REASONS

if len(_DROP_REASONS) != FL_DROP_SLOTS - 1:
    raise ImportError("fastlisten._core was built with another FL_DROP_SLOTS than "
                      "fastlisten._coreshared.DROP_REASONS: rebuild")


def ready_check(data, rule, max_bytes=DEFAULT_READY_MAX_BYTES, proxy=0,
                proxy_max_v2=_PROXY_DEFAULT_MAX_V2, eof=False):
    """The accept filter's verdict on ``data``, the first bytes a connection
    sent: 'ready', 'wait' (more is needed), 'malformed', 'oversize' or
    'closed' (``eof``: the peer shut its side, nothing more will come).
    ``rule``, ``max_bytes``, ``proxy`` and ``proxy_max_v2`` as for
    ``RawListener.set_accept_filter``."""
    cdef fl_ready_rule r
    cdef bytes buf = data if type(data) is bytes else bytes(data)
    code, _, mb, _, versions, max_v2 = _check_filter(rule, 1.0, max_bytes, 1, proxy,
                                                     proxy_max_v2)
    r.rule = code
    r.max_bytes = mb
    r.proxy = versions
    r.proxy_max_v2 = max_v2
    return _VERDICTS[fl_ready_judge(<const unsigned char *><const char *>buf, len(buf),
                                    1 if eof else 0, &r)]


cdef dict _filter_counters(fl_filter *f):
    """The filter's counters for stats() (zeros without a filter)."""
    cdef fl_filter_stats now
    cdef int i
    if f == NULL:
        memset(&now, 0, sizeof(now))
    else:
        fl_filter_stats_read(f, &now)
    return {
        'waiting': now.waiting,
        'waiting_peak': now.peak,
        'waited': now.entered,
        'made_ready': now.ready,
        'dropped': {_DROP_REASONS[i - 1]: now.dropped[i]
                    for i in range(1, FL_DROP_SLOTS) if now.dropped[i]},
    }


cdef tuple _filter_drop_episode(fl_filter *f):
    """RawListener.last_drop_episode(): (episodes, reason, ongoing, drops)."""
    cdef fl_filter_stats now
    if f == NULL:
        return (0, None, False, 0)
    fl_filter_stats_read(f, &now)
    if now.drop_runs == 0:
        return (0, None, False, 0)
    return (now.drop_runs, _DROP_REASONS[now.run_reason - 1], now.run_open != 0,
            now.run_drops)
