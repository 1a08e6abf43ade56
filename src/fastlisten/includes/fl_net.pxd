# The C helpers in csrc/fl_net.c (see csrc/fl_net.h for their contracts).
from posix.signal cimport sigset_t

from fastlisten.includes.system cimport sockaddr, sockaddr_storage, socklen_t

cdef extern from "fl_net.h" nogil:
    enum: FL_ERRNO_SLOTS

    ctypedef struct fl_stats:
        unsigned long long accepted
        unsigned long long batches
        unsigned long long max_batch
        unsigned long long capacity_episodes
        int in_capacity_episode
        int last_capacity_errno
        unsigned long long errors[FL_ERRNO_SLOTS]
    void fl_stats_read(const fl_stats *st, fl_stats *out)

    ctypedef struct fl_conn:
        int fd
        socklen_t addrlen
        sockaddr_storage addr

    enum:
        FL_ERR_IGNORE
        FL_ERR_CAPACITY
        FL_ERR_CLOSED
        FL_ERR_OTHER

    enum:
        FL_WAIT_READY
        FL_WAIT_TIMEOUT
        FL_WAIT_WOKEN
        FL_WAIT_EINTR
        FL_WAIT_STOPPED

    int fl_accept_error_class(int err)
    int fl_socket(int family, int type, int proto)
    int fl_set_nonblocking(int fd, int on)
    int fl_accept4(int lfd, sockaddr *addr, socklen_t *addrlen)
    int fl_wakeup_open(int *rfd, int *wfd)
    void fl_wakeup_close(int *rfd, int *wfd)
    int fl_wakeup_signal(int wfd)
    void fl_wakeup_drain(int rfd)
    int fl_wait_accept(int lfd, int wfd, int sig_fd, int timeout_ms, const sigset_t *wait_mask,
                       fl_conn *out, int max, fl_stats *st, int *status, int *err)
    ctypedef struct fl_gate:
        pass
    int fl_gate_init(fl_gate *g)
    void fl_gate_destroy(fl_gate *g)
    int fl_gate_close(fl_gate *g)
    int fl_gate_closed(const fl_gate *g)
    int fl_gate_busy(const fl_gate *g)
    void fl_gate_wait(fl_gate *g)
    int fl_waiter_open(int lfd, int wfd, int stop_fd, fl_gate *gate, int *exclusive)
    int fl_wait_accept_ep(int epfd, int lfd, int wfd, int sig_fd, int stop_fd, fl_gate *gate,
                          int timeout_ms, const sigset_t *wait_mask, fl_conn *out, int max,
                          fl_stats *st, int *status, int *err)
    int fl_epoll_watch(int epfd, int fd, int on)
    int fl_block_signals(sigset_t *old)
    int fl_restore_signals(const sigset_t *old)
    void fl_capacity_backoff(int wfd, int ms)
    int fl_tcp_queue(int fd, unsigned int *queued, unsigned int *backlog)
    int fl_format_ipv4(const void *addr, char *buf)
