# The benchmark's C load generator and reference server (csrc/fl_loadgen.c;
# csrc/fl_loadgen.h has their contracts).
from libc.stdint cimport uint32_t
from fastlisten.includes.system cimport sockaddr_storage, socklen_t

cdef extern from "fl_loadgen.h" nogil:
    enum:
        FL_LG_DAYTIME
        FL_LG_ECHO
        FL_LG_HTTP
        FL_LG_BURST

    ctypedef struct fl_lg_config:
        int scenario
        sockaddr_storage dst
        socklen_t dstlen
        int concurrency
        long long total
        int duration_ms
        int timeout_ms
        int src_spread
        const char *request
        size_t request_len
        size_t expect_min

    ctypedef struct fl_lg_result:
        long long started
        long long completed
        long long errors
        long long timeouts
        long long aborted
        long long bytes_in
        long long nlat
        int first_errno
        double elapsed_s
        long long window_completed
        double window_s

    int fl_loadgen_run(const fl_lg_config *cfg, fl_lg_result *res,
                       uint32_t *lat_us, long long lat_cap)

    ctypedef struct fl_ref_stats:
        unsigned long long accepted
        unsigned long long errors

    int fl_refserver_serve(int lfd, int stop_fd, int scenario,
                           const char *reply, size_t reply_len, fl_ref_stats *st)
