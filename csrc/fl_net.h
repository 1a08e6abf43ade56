/* fastlisten: the small portable C under the Cython core.
 *
 * Everything here is plain POSIX/Linux C that runs without the GIL and
 * never touches a Python object.  Feature probes and platform differences
 * (#ifdef) live here and nowhere else.  Every function reports failure the
 * way the kernel does: -1 with errno set (or an errno value in *err), never
 * by printing.
 */
#ifndef FL_NET_H
#define FL_NET_H

#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <signal.h>
#include <pthread.h>

/* errno values above this are counted in the last slot. */
#define FL_ERRNO_SLOTS 160

typedef struct {
    unsigned long long accepted;      /* connections handed to the caller */
    unsigned long long batches;       /* wake-ups that yielded >= 1 connection */
    unsigned long long max_batch;     /* largest such batch */
    unsigned long long capacity_episodes; /* runs of EMFILE/ENFILE/ENOBUFS/ENOMEM */
    int in_capacity_episode;
    int last_capacity_errno;
    unsigned long long errors[FL_ERRNO_SLOTS]; /* accept errors by errno */
} fl_stats;

/* Leader/follower waiters of one listener accept at the same time without
 * the GIL and count into the same fl_stats: every update is atomic (a lost
 * increment would make "accepted" lie, and a stop that waits for every
 * accepted connection to be in hand would stop waiting one too early).
 * Read the counters through fl_stats_read, never field by field. */
void fl_stats_read(const fl_stats *st, fl_stats *out);
/* An accept error (a capacity error begins an episode, unless one runs). */
void fl_stats_count_error(fl_stats *st, int err);
/* n >= 1 connections taken in one batch; err: the errno that ended it
 * early, 0 if none (a batch that ran dry ends a capacity episode). */
void fl_stats_count_batch(fl_stats *st, int n, int err);

typedef struct {
    int fd;
    socklen_t addrlen;
    struct sockaddr_storage addr;
} fl_conn;

/* How an accept() error should be treated (trio's classes). */
enum {
    FL_ERR_IGNORE = 0,   /* the peer gave up before we got to it: go on */
    FL_ERR_CAPACITY = 1, /* out of descriptors or memory: back off, never spin */
    FL_ERR_CLOSED = 2,   /* the listener is gone: stop */
    FL_ERR_OTHER = 3     /* anything else: raise */
};
int fl_accept_error_class(int err);

/* Results of fl_wait_accept besides the count. */
enum {
    FL_WAIT_READY = 0,    /* the listener was readable; the batch was drained */
    FL_WAIT_TIMEOUT = 1,
    FL_WAIT_WOKEN = 2,    /* the wake-up descriptor fired (left set for other waiters) */
    FL_WAIT_EINTR = 3,    /* poll() was interrupted by a signal: run handlers, retry */
    FL_WAIT_STOPPED = 4   /* a waiter's stop descriptor is readable (left set) */
};

int fl_socket(int family, int type, int proto);
int fl_set_nonblocking(int fd, int on);
int fl_accept4(int lfd, struct sockaddr *addr, socklen_t *addrlen);

int fl_wakeup_open(int *rfd, int *wfd);
void fl_wakeup_close(int *rfd, int *wfd);     /* both (one for an eventfd); -1 after */
int fl_wakeup_signal(int wfd);
void fl_wakeup_drain(int rfd);

int fl_wait_accept(int lfd, int wfd, int sig_fd, int timeout_ms, const sigset_t *wait_mask,
                   fl_conn *out, int max, fl_stats *st, int *status, int *err);
/* A gate over a listening descriptor shared by leader/follower waiters:
 * each waiter passes it (fl_gate_enter) before it touches the descriptor
 * (epoll_ctl, accept4) and leaves it (fl_gate_leave) after; once
 * fl_gate_close was called, nobody passes, and fl_gate_wait returns when
 * the last waiter inside has left.  So after close + wait, the descriptor
 * may be made blocking, closed or reused: no waiter of this gate touches it
 * again, whether it is in epoll_wait, on its way out of it or about to
 * start.  Passing costs two atomic operations; only close waits, and only
 * for waiters that are inside (a non-blocking accept4 stretch). */
typedef struct {
    int closed;
    int inside;
    pthread_mutex_t lock;     /* with cond: fl_gate_wait's sleep */
    pthread_cond_t cond;
} fl_gate;

int fl_gate_init(fl_gate *g);          /* 0, or an errno value */
void fl_gate_destroy(fl_gate *g);
void fl_gate_wake_closer(fl_gate *g);

/* 1: inside (fl_gate_leave later); 0: closed.  Inline: once per accepted
 * batch.  Sequentially consistent on both sides (a Dekker pair): either a
 * waiter's increment comes first and fl_gate_wait sees it inside, or the
 * close comes first and the waiter sees it closed. */
static inline void
fl_gate_leave(fl_gate *g)
{
    if (__atomic_sub_fetch(&g->inside, 1, __ATOMIC_SEQ_CST) == 0
            && __atomic_load_n(&g->closed, __ATOMIC_SEQ_CST))
        fl_gate_wake_closer(g);     /* a closer may sleep in fl_gate_wait */
}

static inline int
fl_gate_enter(fl_gate *g)
{
    __atomic_add_fetch(&g->inside, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&g->closed, __ATOMIC_SEQ_CST))
        return 1;
    fl_gate_leave(g);
    return 0;
}

static inline int
fl_gate_closed(const fl_gate *g)
{
    return __atomic_load_n(&g->closed, __ATOMIC_SEQ_CST);
}

int fl_gate_close(fl_gate *g);         /* 1 if it was open (this call closed it) */
int fl_gate_busy(const fl_gate *g);    /* waiters inside now */
void fl_gate_wait(fl_gate *g);         /* Contract: WITHOUT the GIL; after fl_gate_close */

/* Leader/follower: one epoll instance per waiting thread, watching the
 * listener (EPOLLEXCLUSIVE where the kernel has it, so that a connection
 * wakes one waiting thread, not all), the listener's wake-up descriptor and
 * an optional stop descriptor (stop_fd < 0: none).  With a gate (NULL:
 * none), the listener is registered only if the gate lets this thread in.
 * Returns the epoll descriptor (close-on-exec) or -1 with errno; *exclusive
 * says whether EPOLLEXCLUSIVE was accepted. */
int fl_waiter_open(int lfd, int wfd, int stop_fd, fl_gate *gate, int *exclusive);

int fl_wait_accept_ep(int epfd, int lfd, int wfd, int sig_fd, int stop_fd, fl_gate *gate,
                      int timeout_ms, const sigset_t *wait_mask, fl_conn *out, int max,
                      fl_stats *st, int *status, int *err);
int fl_epoll_watch(int epfd, int fd, int on);
int fl_block_signals(sigset_t *old);
int fl_restore_signals(const sigset_t *old);
void fl_capacity_backoff(int wfd, int ms);

int fl_tcp_queue(int fd, unsigned int *queued, unsigned int *backlog);

/* An IPv4 address in dotted-quad form (what inet_ntop gives, without its
 * sprintf per octet) into buf (16 bytes at least); returns the length. */
int fl_format_ipv4(const struct in_addr *addr, char *buf);

#endif
