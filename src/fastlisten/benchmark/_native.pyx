# cython: language_level=3, embedsignature=True
"""The benchmark's native load generator and reference server: thin
bindings over csrc/fl_loadgen.c, in an extension of their own so that the
runtime core (fastlisten._core) carries no benchmark code.  Both run their
whole loop without the GIL.

fastlisten.benchmark.loadgen is the public face; fastlisten.benchmark._pyloadgen
is the pure-Python twin of loadgen_run.
"""

from libc.stdint cimport uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport isnan
from cpython.exc cimport PyErr_CheckSignals

from fastlisten.includes.system cimport AF_INET, AF_INET6, errno, EINTR
from fastlisten.includes.shared cimport raise_errno, addr_from_py
from fastlisten.includes.fl_loadgen cimport (
    fl_lg_config, fl_lg_result, fl_loadgen_run, fl_ref_stats,
    fl_refserver_serve, FL_LG_DAYTIME, FL_LG_ECHO, FL_LG_HTTP, FL_LG_BURST,
)
from array import array as _array

#: The longest duration or timeout the C loop takes, in seconds (a day; its
#: milliseconds must fit an int).
MAX_SECONDS = 86400.0


cdef int _ms(double seconds, str name) except -1:
    """Seconds as the C loop's milliseconds, checked (a cast of an
    out-of-range double to int is undefined behaviour in C)."""
    if isnan(seconds) or not 0.0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"{name} must be 0 to {MAX_SECONDS:g} seconds, not {seconds!r}")
    return <int>(seconds * 1000.0)


#: Scenario names to the C enum (fastlisten.benchmark.loadgen.SCENARIOS).
LOADGEN_SCENARIOS = {
    'daytime': FL_LG_DAYTIME, 'echo': FL_LG_ECHO,
    'http-close': FL_LG_HTTP, 'burst': FL_LG_BURST,
}


def loadgen_run(address, str scenario, int concurrency, long long total,
                double duration, double timeout, int src_spread=0,
                bytes request=b'', Py_ssize_t expect_min=1):
    """Run one load against a loopback (host, port) with numeric host.

    Returns a dict: started, completed, errors, timeouts, aborted, bytes_in,
    first_errno, elapsed (s), window_completed and window (s: completions
    before ``duration`` was up, and that span), latencies_us (array('I'), connect to EOF, in
    completion order), interrupted.  The loop runs without the GIL.
    """
    cdef fl_lg_config cfg
    cdef fl_lg_result res
    cdef uint32_t *lat = NULL
    cdef long long cap = total if total > 0 else 0
    cdef int rc, err
    cdef int family = AF_INET6 if ':' in str(address[0]) else AF_INET
    if scenario not in LOADGEN_SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {sorted(LOADGEN_SCENARIOS)}")
    memset(&cfg, 0, sizeof(cfg))
    addr_from_py(family, address, &cfg.dst, &cfg.dstlen)
    cfg.scenario = LOADGEN_SCENARIOS[scenario]
    cfg.concurrency = concurrency
    cfg.total = total
    cfg.duration_ms = _ms(duration, "duration")
    cfg.timeout_ms = _ms(timeout, "timeout")
    cfg.src_spread = src_spread
    cfg.request = <const char *>request if len(request) else NULL
    cfg.request_len = len(request)
    cfg.expect_min = <size_t>expect_min
    if cap:
        lat = <uint32_t *>malloc(<size_t>cap * sizeof(uint32_t))
        if lat == NULL:
            raise MemoryError()
    try:
        with nogil:
            rc = fl_loadgen_run(&cfg, &res, lat, cap)
            err = errno
        interrupted = False
        if rc < 0:
            if err != EINTR:
                raise_errno(err)
            PyErr_CheckSignals()
            interrupted = True
        lats = _array('I')
        if res.nlat:
            lats.frombytes((<char *>lat)[:res.nlat * sizeof(uint32_t)])
    finally:
        free(lat)
    return {
        'started': res.started, 'completed': res.completed,
        'errors': res.errors, 'timeouts': res.timeouts,
        'aborted': res.aborted, 'bytes_in': res.bytes_in,
        'first_errno': res.first_errno, 'elapsed': res.elapsed_s,
        'window_completed': res.window_completed, 'window': res.window_s,
        'latencies_us': lats, 'interrupted': interrupted,
    }


def refserver_serve(int lfd, int stop_fd, str scenario, bytes reply):
    """Serve connections on listening descriptor lfd entirely in C until
    stop_fd is readable (nothing is read from it); returns
    {'accepted': n, 'errors': n} for this call.  Runs without the GIL;
    signal handlers run between waits (Ctrl-C works)."""
    cdef fl_ref_stats st
    cdef int rc, err
    cdef int sc
    cdef const char *p = reply
    cdef size_t n = len(reply)
    if scenario not in LOADGEN_SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {sorted(LOADGEN_SCENARIOS)}")
    sc = LOADGEN_SCENARIOS[scenario]
    memset(&st, 0, sizeof(st))
    while True:
        with nogil:
            rc = fl_refserver_serve(lfd, stop_fd, sc, p, n, &st)
            err = errno
        if rc == 0:
            break
        if err != EINTR:
            raise_errno(err)
        PyErr_CheckSignals()
    return {'accepted': st.accepted, 'errors': st.errors}
