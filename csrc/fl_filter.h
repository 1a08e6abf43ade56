/* fastlisten: the accept filter (issue 19).
 *
 * Connections accepted but not yet *ready* wait here, in an epoll set the
 * core owns: no thread, no GIL, no Python object per waiting connection,
 * only its descriptor, its address and a deadline (one slot, about 160
 * bytes).  Readiness is judged on what MSG_PEEK shows, so every byte stays
 * in the kernel for the handler.  A rule says what "ready" is:
 *
 *   NONE  at once (with a PROXY header required: once it is complete)
 *   DATA  at least one byte
 *   LINE  a complete line (LF) within max_bytes
 *   HTTP  a complete request head (an empty line: LF LF or LF CR LF)
 *         within max_bytes; a request line without "HTTP/" (HTTP/0.9)
 *         is complete by itself
 *   TLS   a complete first TLS record holding a ClientHello (its 5-byte
 *         header gives the length, at most 2^14)
 *
 * With a PROXY protocol version set, a complete, valid PROXY header
 * (fl_proxy_parse) must come first, and the rule applies to what follows it.
 * A LOCAL header (v2; what a balancer's health check sends before it closes
 * or resets) needs at least one byte after it whatever the rule, NONE
 * included: a health check is dropped as closed or reset, counted, never
 * handed over; a LOCAL connection that goes on to send data follows the
 * rule as any other.
 *
 * Every waiting connection has one deadline, `timeout_ms` after its accept;
 * all share the timeout, so accept order is deadline order and the waiting
 * set is a FIFO list: expiry costs O(1) per expired connection.  At the cap
 * (`cap` connections waiting), the OLDEST waiting connection is closed to
 * make room for a new one (counted "evicted"): a flood of silent clients
 * cannot keep a fresh, fast client out, and the cap bounds descriptors.
 *
 * A connection that expires, is malformed, exceeds max_bytes, is closed or
 * reset before it is ready, or is evicted, is closed and counted by reason,
 * never returned; runs of drops are counted too, so that the caller can log
 * one line per run (fl_filter_drop_runs).  One exception, for the data, line and http rules: a
 * peer that sent some bytes (after a complete PROXY header, if one is
 * required) and then shut its side (FIN) without completing the rule is
 * handed over: everything it will say has arrived, so its handler cannot
 * block on it.  An incomplete PROXY header or TLS record and a FIN: closed.
 *
 * Locking: every function that touches the waiting set takes f->lock (a
 * pthread mutex, never held across a blocking wait), so several threads of
 * one listener may call fl_filter_wait_accept at once.  The counters are
 * written under the lock with atomic stores and read lock-free through
 * fl_filter_stats_read.
 */
#ifndef FL_FILTER_H
#define FL_FILTER_H

#include <pthread.h>
#include <signal.h>
#include <stddef.h>

#include "fl_net.h"

enum { FL_RULE_NONE = 0, FL_RULE_DATA = 1, FL_RULE_LINE = 2, FL_RULE_HTTP = 3,
       FL_RULE_TLS = 4 };

/* fl_ready_judge's verdicts: >= 0 keep or hand over, < 0 drop (the negated
 * value is the index of the counter in fl_filter_stats.dropped). */
enum {
    FL_JUDGE_READY = 1,
    FL_JUDGE_WAIT = 0,
    FL_JUDGE_MALFORMED = -1,  /* a bad PROXY header, or not a TLS ClientHello */
    FL_JUDGE_OVERSIZE = -2,   /* no complete line/head within max_bytes */
    FL_JUDGE_CLOSED = -3      /* the peer closed before it said enough */
};

/* Drop reasons: the slots of fl_filter_stats.dropped. */
enum {
    FL_DROP_MALFORMED = 1,
    FL_DROP_OVERSIZE = 2,
    FL_DROP_CLOSED = 3,
    FL_DROP_RESET = 4,        /* an error on the connection (ECONNRESET ...) */
    FL_DROP_EXPIRED = 5,      /* its deadline passed */
    FL_DROP_EVICTED = 6,      /* the oldest, closed to make room at the cap */
    FL_DROP_SHUTDOWN = 7,     /* still waiting when the listener was closed */
    FL_DROP_ERROR = 8,        /* the core could not watch it (epoll_ctl failed) */
    FL_DROP_SLOW = 9,         /* below the minimum rate (fl_filter_set_min_rate) */
    FL_DROP_SLOTS = 10
};

/* What the judge needs to know; plain values, no descriptor. */
typedef struct {
    int rule;                 /* FL_RULE_* */
    size_t max_bytes;         /* LINE, HTTP: the longest line/head, terminator included */
    int proxy;                /* 0, or FL_PROXY_V1 | FL_PROXY_V2 bits */
    size_t proxy_max_v2;      /* largest PROXY v2 header */
} fl_ready_rule;

/* Judge buf[0:n], the first n bytes a connection has sent; eof: the peer
 * shut its side, no more will come.  Returns FL_JUDGE_*.  Pure: touches
 * nothing but its arguments (the Python twin is _corepy.ready_check). */
int fl_ready_judge(const unsigned char *buf, size_t n, int eof, const fl_ready_rule *r);

/* How many bytes of a connection fl_ready_judge may need to see. */
size_t fl_ready_peek_size(const fl_ready_rule *r);

typedef struct {
    unsigned long long waiting;     /* connections in the filter now */
    unsigned long long peak;        /* the most at once */
    unsigned long long entered;     /* connections that had to wait */
    unsigned long long ready;       /* connections handed over (waited or not) */
    unsigned long long dropped[FL_DROP_SLOTS];   /* by FL_DROP_* (slot 0 unused) */
    /* Runs of drops, for a log line per run: a run begins with a drop for
     * MALFORMED, OVERSIZE, EXPIRED, EVICTED or ERROR while none is on, and
     * ends when a round hands a connection over (CLOSED and RESET are
     * what health checks and port scanners do, SHUTDOWN is asked for:
     * they neither begin nor end one). */
    unsigned long long drop_runs;   /* runs begun */
    unsigned long long run_drops;   /* drops of the latest run so far */
    unsigned long long run_reason;  /* the FL_DROP_* that began it */
    unsigned long long run_open;    /* 1 while it is on */
} fl_filter_stats;

typedef struct {
    fl_conn c;
    long long deadline;       /* CLOCK_MONOTONIC ms */
    int prev, next;           /* the FIFO list, or the free list (next) */
} fl_waiting;

typedef struct {
    pthread_mutex_t lock;
    int epfd;                 /* the waiting connections; data.u32 = slot */
    fl_ready_rule rule;
    long long timeout_ms;     /* accept -> ready */
    unsigned long long min_rate;  /* bytes per second, 0: none (fl_filter_set_min_rate) */
    int cap;                  /* most connections waiting at once (>= 1) */
    fl_waiting *slots;        /* grown on demand up to cap */
    int nslots;
    int head, tail;           /* oldest, newest waiting; -1: none */
    int free;                 /* free slots' list; -1: none */
    int count;
    int dropping;             /* a run of drops is on (st.run_open, under lock) */
    unsigned char *peek;      /* fl_ready_peek_size bytes, used under lock */
    size_t peek_size;
    fl_filter_stats st;
} fl_filter;

/* Contract: any thread, GIL or not.  Sets up f (epoll descriptor
 * close-on-exec).  Returns 0, or an errno value (nothing left to free). */
int fl_filter_init(fl_filter *f);
/* Contract: as init; nothing may be waiting (else EBUSY) and no thread be
 * inside fl_filter_wait_accept.  The counters are kept.  0 or an errno. */
int fl_filter_configure(fl_filter *f, const fl_ready_rule *r, long long timeout_ms, int cap);
/* Contract: any thread, GIL or not, even while others are inside
 * fl_filter_wait_accept (it takes f->lock).  Close every waiting
 * connection, counted with reason `why`; returns how many. */
int fl_filter_clear(fl_filter *f, int why);
/* Contract: as fl_filter_configure.  A minimum rate, in bytes per second
 * (0: none, the default): a connection that has waited at least a second
 * and has sent fewer than rate * seconds waited bytes so far is dropped
 * (FL_DROP_SLOW) when it sends more without becoming ready.  Judged as it
 * sends, so a client that dribbles is closed long before its deadline; one
 * that stops sending is left to the deadline. */
void fl_filter_set_min_rate(fl_filter *f, unsigned long long rate);
/* fl_filter_clear(SHUTDOWN) and the epoll descriptor closed (the
 * counters stay readable).  No thread may be inside the filter. */
void fl_filter_shut(fl_filter *f);
/* fl_filter_shut, and memory freed.  No thread may be inside the filter. */
void fl_filter_destroy(fl_filter *f);
/* Contract: in a process just forked (only the forking thread runs), GIL
 * held.  The descriptors of the connections waiting in the parent's filter
 * and of its epoll set are copies: close them with close() alone, never
 * EPOLL_CTL_DEL (the epoll instance is the parent's too: a DEL here would
 * take the parent's registration away), so that a connection the parent
 * drops is closed for its peer at once, not when this process exits.  The
 * filter is left empty, its lock new, with an epoll set of its own (epfd
 * -1 if none could be made: a connection that must wait is then dropped
 * as "error"); settings and counters stay.  Returns how many connections
 * were let go (not counted as drops: the parent owns them). */
int fl_filter_forget(fl_filter *f);
void fl_filter_stats_read(const fl_filter *f, fl_filter_stats *out);
/* Contract: any thread, lock-free.  st.drop_runs alone: what a caller
 * checks after every accept, as fl_stats' capacity_episodes. */
unsigned long long fl_filter_drop_runs(const fl_filter *f);

/* Contract: called WITHOUT the GIL; touches no Python object.  As
 * fl_wait_accept (fl_net.h), for a listener with this filter: waits until
 * lfd, wfd or a waiting connection is readable, or the oldest waiting
 * connection's deadline, or timeout_ms (-1: for ever; the wait continues,
 * without the GIL, through events that make nothing ready), then accepts
 * until EAGAIN, max ready connections or an error.  A connection that is
 * ready at once goes straight to out[]; the others wait in the filter.
 * Returns how many ready connections are in out[] (the caller owns them:
 * blocking, close-on-exec, every byte they sent still unread).  *status,
 * *err, sig_fd, wait_mask and st as for fl_wait_accept; st->accepted counts the
 * connections handed over, not those that wait or are dropped. */
int fl_filter_wait_accept(fl_filter *f, int lfd, int wfd, int sig_fd, int timeout_ms,
                          const sigset_t *wait_mask, fl_conn *out, int max, fl_stats *st,
                          int *status, int *err);

/* Contract: any thread.  Add the filter's epoll descriptor to a
 * leader/follower waiter's epoll set (fl_waiter_open), so that its waits
 * see waiting connections too.  0, or -1 with errno. */
int fl_filter_watch(fl_filter *f, int epfd);

/* Contract: called WITHOUT the GIL; touches no Python object.  As
 * fl_filter_wait_accept, for a leader/follower waiter (fl_wait_accept_ep's
 * epfd, sig_fd, stop_fd and gate, its epfd watching this filter: fl_filter_watch).
 * Every waiting thread wakes when a waiting connection has news (an epoll
 * descriptor cannot be watched EPOLLEXCLUSIVE); the first to take f->lock
 * judges it, the others find nothing and wait again. */
int fl_filter_wait_accept_ep(fl_filter *f, int epfd, int lfd, int wfd, int sig_fd, int stop_fd,
                             fl_gate *gate, int timeout_ms, const sigset_t *wait_mask,
                             fl_conn *out, int max, fl_stats *st, int *status, int *err);

#endif
