/* fastlisten: the benchmark's native load generator and reference server.
 *
 * Plain C on epoll/poll: no Python objects, callable without the GIL.
 * Both talk to loopback only (127.0.0.0/8 or ::1): fl_loadgen_run refuses
 * any other destination with EADDRNOTAVAIL before it opens a socket.
 * Failures are reported the kernel's way: -1 with errno set.
 */
#ifndef FL_LOADGEN_H
#define FL_LOADGEN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>

/* What one connection does after connect() completes. */
enum {
    FL_LG_DAYTIME = 0, /* send nothing; read the server's reply until EOF */
    FL_LG_ECHO = 1,    /* send a line; read it back until EOF */
    FL_LG_HTTP = 2,    /* send an HTTP/1.0 request; read the response until EOF */
    FL_LG_BURST = 3    /* like daytime, but every connection is opened before
                          the first event is handled */
};

typedef struct {
    int scenario;                  /* FL_LG_* */
    struct sockaddr_storage dst;   /* the server: loopback only */
    socklen_t dstlen;
    int concurrency;               /* connections in flight at once (>= 1) */
    long long total;               /* connections to start, at most */
    int duration_ms;               /* stop starting new ones after this */
    int timeout_ms;                /* one connection's limit, connect to EOF */
    int src_spread;                /* IPv4: bind sources to 127.0.0.1..N (0, 1: no bind) */
    const char *request;           /* bytes sent once connected (may be NULL) */
    size_t request_len;
    size_t expect_min;             /* a reply shorter than this is an error */
} fl_lg_config;

typedef struct {
    long long started;        /* connect() calls made */
    long long completed;      /* full replies, EOF seen */
    long long errors;         /* refused, reset, short reply, ... */
    long long timeouts;       /* over timeout_ms */
    long long aborted;        /* still in flight when the run ended */
    long long bytes_in;
    long long nlat;           /* latencies written to lat_us */
    int first_errno;          /* errno of the first error, 0 if none */
    double elapsed_s;         /* first connect() to the last connection's end */
    long long window_completed; /* completed before duration_ms was up */
    double window_s;          /* first connect() to min(last end, duration_ms):
                                 window_completed / window_s is the steady rate,
                                 free of the tail of slow (SYN-retrying) ones */
} fl_lg_result;

/* Run a load.  Called without the GIL; blocks for at most about
 * duration_ms + timeout_ms.  Latencies (µs, connect() to EOF) of completed
 * connections go to lat_us, up to lat_cap of them.  Every descriptor it
 * opens is closed before it returns.  Returns 0, or -1 with errno set when
 * the run could not start (EADDRNOTAVAIL: not a loopback destination;
 * EINVAL: bad configuration; epoll/calloc failures). */
int fl_loadgen_run(const fl_lg_config *cfg, fl_lg_result *res,
                   uint32_t *lat_us, long long lat_cap);

/* 1 when addr is 127.0.0.0/8 or ::1 (or ::ffff:127.x), else 0. */
int fl_is_loopback(const struct sockaddr *addr, socklen_t len);

typedef struct {
    unsigned long long accepted;
    unsigned long long errors;
} fl_ref_stats;

/* The reference server: the whole exchange in C, the ceiling a Python
 * server is compared with.  lfd is a listening socket (the caller owns it;
 * it is made non-blocking here).  Waits on lfd and stop_fd with poll();
 * drains the accept queue with accept4() until EAGAIN; per connection:
 * FL_LG_DAYTIME/BURST write reply and close; FL_LG_ECHO read a line and
 * write it back; FL_LG_HTTP read the request head and write reply.
 * Reads use a blocking socket with a 1 s receive timeout.  Returns 0 as
 * soon as stop_fd is readable (nothing is read from it), -1 with errno on
 * a poll/accept failure other than the peer giving up.  Called without
 * the GIL; EINTR returns -1/EINTR so the caller can run signal handlers. */
int fl_refserver_serve(int lfd, int stop_fd, int scenario,
                       const char *reply, size_t reply_len, fl_ref_stats *st);

#endif
