# The accept filter in csrc/fl_filter.c (csrc/fl_filter.h has the contracts).
from posix.signal cimport sigset_t

from fastlisten.includes.fl_net cimport fl_conn, fl_stats, fl_gate

cdef extern from "fl_filter.h" nogil:
    enum:
        FL_RULE_NONE
        FL_RULE_DATA
        FL_RULE_LINE
        FL_RULE_HTTP
        FL_RULE_TLS
        FL_DROP_SHUTDOWN
        FL_DROP_SLOTS

    ctypedef struct fl_ready_rule:
        int rule
        size_t max_bytes
        int proxy
        size_t proxy_max_v2

    ctypedef struct fl_filter_stats:
        unsigned long long waiting
        unsigned long long peak
        unsigned long long entered
        unsigned long long ready
        unsigned long long dropped[FL_DROP_SLOTS]
        unsigned long long drop_runs
        unsigned long long run_drops
        unsigned long long run_reason
        unsigned long long run_open

    ctypedef struct fl_filter:
        pass

    int fl_ready_judge(const unsigned char *buf, size_t n, int eof, const fl_ready_rule *r)
    int fl_filter_init(fl_filter *f)
    int fl_filter_configure(fl_filter *f, const fl_ready_rule *r, long long timeout_ms, int cap)
    int fl_filter_clear(fl_filter *f, int why)
    void fl_filter_set_min_rate(fl_filter *f, unsigned long long rate)
    void fl_filter_shut(fl_filter *f)
    void fl_filter_destroy(fl_filter *f)
    int fl_filter_forget(fl_filter *f)
    void fl_filter_stats_read(const fl_filter *f, fl_filter_stats *out)
    unsigned long long fl_filter_drop_runs(const fl_filter *f)
    int fl_filter_wait_accept(fl_filter *f, int lfd, int wfd, int sig_fd, int timeout_ms,
                              const sigset_t *wait_mask, fl_conn *out, int max, fl_stats *st,
                              int *status, int *err)
    int fl_filter_watch(fl_filter *f, int epfd)
    int fl_filter_wait_accept_ep(fl_filter *f, int epfd, int lfd, int wfd, int sig_fd, int stop_fd,
                                 fl_gate *gate, int timeout_ms, const sigset_t *wait_mask,
                                 fl_conn *out, int max, fl_stats *st, int *status, int *err)
