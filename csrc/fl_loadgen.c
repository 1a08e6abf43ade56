/* fastlisten: the benchmark's load generator and reference server.
 * See fl_loadgen.h for the contracts. */
#define _GNU_SOURCE
#include "fl_loadgen.h"
#include "fl_net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define FL_LG_EVENTS 512
#define FL_LG_TICK_MS 10

enum { SLOT_FREE = 0, SLOT_CONNECTING = 1, SLOT_OPEN = 2 };

typedef struct {
    int fd;
    int state;
    size_t sent;
    size_t nread;
    long long t0_ns;
} fl_lg_slot;

static long long
fl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int
fl_is_loopback(const struct sockaddr *addr, socklen_t len)
{
    if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;
        return (ntohl(sin->sin_addr.s_addr) >> 24) == 127;
    }
    if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;
        if (IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr))
            return 1;
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr))
            return sin6->sin6_addr.s6_addr[12] == 127;
    }
    return 0;
}

typedef struct {
    const fl_lg_config *cfg;
    fl_lg_result *res;
    uint32_t *lat;
    long long lat_cap;
    int epfd;
    fl_lg_slot *slots;
    int *free_stack;
    int nfree;
    int in_flight;
    long long t_stop_launch;
} fl_lg_run;

static void
fl_lg_note_error(fl_lg_run *r, int err)
{
    r->res->errors++;
    if (r->res->first_errno == 0)
        r->res->first_errno = err;
}

static void
fl_lg_release(fl_lg_run *r, int i)
{
    fl_lg_slot *s = &r->slots[i];
    close(s->fd);  /* also leaves the epoll set: the fd is never dup'ed */
    s->fd = -1;
    s->state = SLOT_FREE;
    r->free_stack[r->nfree++] = i;
    r->in_flight--;
}

/* Start one connection; errors are counted, never fatal to the run. */
static void
fl_lg_launch(fl_lg_run *r)
{
    const fl_lg_config *cfg = r->cfg;
    struct epoll_event ev;
    int i, fd, rc;
    fl_lg_slot *s;

    r->res->started++;
    fd = socket(cfg->dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fl_lg_note_error(r, errno);
        return;
    }
    if (cfg->src_spread > 1 && cfg->dst.ss_family == AF_INET) {
        /* More source addresses, more 4-tuples: the port is still chosen at
         * connect() time thanks to IP_BIND_ADDRESS_NO_PORT. */
        struct sockaddr_in src;
        int one = 1;
        memset(&src, 0, sizeof(src));
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(r->res->started % cfg->src_spread));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0) {
            fl_lg_note_error(r, errno);
            close(fd);
            return;
        }
    }
    i = r->free_stack[--r->nfree];
    s = &r->slots[i];
    s->fd = fd;
    s->sent = 0;
    s->nread = 0;
    s->state = SLOT_CONNECTING;
    s->t0_ns = fl_now_ns();
    r->in_flight++;
    rc = connect(fd, (const struct sockaddr *)&cfg->dst, cfg->dstlen);
    if (rc < 0 && errno != EINPROGRESS) {
        fl_lg_note_error(r, errno);
        fl_lg_release(r, i);
        return;
    }
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = (uint64_t)i;
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        fl_lg_note_error(r, errno);
        fl_lg_release(r, i);
    }
}

static void
fl_lg_finish(fl_lg_run *r, int i)
{
    fl_lg_slot *s = &r->slots[i];
    if (s->nread < r->cfg->expect_min) {
        fl_lg_note_error(r, EPROTO);  /* a short reply */
    } else {
        long long now = fl_now_ns();
        r->res->completed++;
        if (now < r->t_stop_launch)
            r->res->window_completed++;
        if (r->res->nlat < r->lat_cap) {
            long long us = (now - s->t0_ns) / 1000;
            r->lat[r->res->nlat++] = us > 0xffffffffLL ? 0xffffffffu : (uint32_t)us;
        }
    }
    fl_lg_release(r, i);
}

static void
fl_lg_event(fl_lg_run *r, int i, uint32_t events)
{
    static __thread char buf[4096];
    const fl_lg_config *cfg = r->cfg;
    fl_lg_slot *s = &r->slots[i];
    ssize_t n;

    if (events & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err == 0)
            err = err ? err : ECONNRESET;
        /* data may still be readable (a reply, then a reset): count what the
         * server did deliver before deciding */
        if (s->state == SLOT_CONNECTING) {
            fl_lg_note_error(r, err);
            fl_lg_release(r, i);
            return;
        }
    }
    s->state = SLOT_OPEN;
    while (s->sent < cfg->request_len) {
        n = send(s->fd, cfg->request + s->sent, cfg->request_len - s->sent, MSG_NOSIGNAL);
        if (n > 0) {
            s->sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;  /* EPOLLOUT (edge) will come back */
        fl_lg_note_error(r, errno);
        fl_lg_release(r, i);
        return;
    }
    for (;;) {
        n = read(s->fd, buf, sizeof(buf));
        if (n > 0) {
            s->nread += (size_t)n;
            r->res->bytes_in += n;
            continue;
        }
        if (n == 0) {
            fl_lg_finish(r, i);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        fl_lg_note_error(r, errno);
        fl_lg_release(r, i);
        return;
    }
}

int
fl_loadgen_run(const fl_lg_config *cfg, fl_lg_result *res,
               uint32_t *lat_us, long long lat_cap)
{
    struct epoll_event events[FL_LG_EVENTS];
    fl_lg_run r;
    long long t_start, t_stop_launch, t_hard_end, t_next_scan, t_last = 0, now;
    int i, n, conc, saved;

    memset(res, 0, sizeof(*res));
    if (cfg->concurrency < 1 || cfg->total < 0 || cfg->timeout_ms < 1 ||
        cfg->duration_ms < 0 || (cfg->request_len && cfg->request == NULL)) {
        errno = EINVAL;
        return -1;
    }
    if (!fl_is_loopback((const struct sockaddr *)&cfg->dst, cfg->dstlen)) {
        errno = EADDRNOTAVAIL;
        return -1;
    }
    conc = cfg->concurrency;
    if (cfg->scenario == FL_LG_BURST)
        conc = cfg->total > 0 ? (int)(cfg->total < 1000000 ? cfg->total : 1000000) : 1;

    memset(&r, 0, sizeof(r));
    r.cfg = cfg;
    r.res = res;
    r.lat = lat_us;
    r.lat_cap = lat_us ? lat_cap : 0;
    r.slots = calloc((size_t)conc, sizeof(fl_lg_slot));
    r.free_stack = calloc((size_t)conc, sizeof(int));
    if (r.slots == NULL || r.free_stack == NULL) {
        free(r.slots);
        free(r.free_stack);
        errno = ENOMEM;
        return -1;
    }
    r.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r.epfd < 0) {
        saved = errno;
        free(r.slots);
        free(r.free_stack);
        errno = saved;
        return -1;
    }
    for (i = conc - 1; i >= 0; i--) {
        r.slots[i].fd = -1;
        r.free_stack[r.nfree++] = i;
    }

    t_start = fl_now_ns();
    t_stop_launch = t_start + (long long)cfg->duration_ms * 1000000LL;
    t_hard_end = t_stop_launch + (long long)cfg->timeout_ms * 1000000LL;
    t_next_scan = t_start + FL_LG_TICK_MS * 1000000LL;
    r.t_stop_launch = t_stop_launch;
    saved = 0;

    /* burst: every connection is opened before any event is handled */
    while (r.nfree > 0 && res->started < cfg->total)
        fl_lg_launch(&r);

    for (;;) {
        now = fl_now_ns();
        if (cfg->scenario != FL_LG_BURST) {
            while (r.nfree > 0 && res->started < cfg->total && now < t_stop_launch)
                fl_lg_launch(&r);
        }
        if (r.in_flight == 0)
            break;
        if (now >= t_hard_end)
            break;
        n = epoll_wait(r.epfd, events, FL_LG_EVENTS, FL_LG_TICK_MS);
        if (n < 0) {
            if (errno == EINTR) {
                saved = EINTR;  /* let the caller run signal handlers */
                break;
            }
            saved = errno;
            break;
        }
        for (i = 0; i < n; i++)
            fl_lg_event(&r, (int)events[i].data.u64, events[i].events);
        now = fl_now_ns();
        if (n > 0)
            t_last = now;
        if (now >= t_next_scan) {
            long long limit = (long long)cfg->timeout_ms * 1000000LL;
            for (i = 0; i < conc; i++) {
                if (r.slots[i].state != SLOT_FREE && now - r.slots[i].t0_ns > limit) {
                    res->timeouts++;
                    if (res->first_errno == 0)
                        res->first_errno = ETIMEDOUT;
                    fl_lg_release(&r, i);
                }
            }
            t_next_scan = now + FL_LG_TICK_MS * 1000000LL;
        }
    }
    for (i = 0; i < conc; i++) {
        if (r.slots[i].state != SLOT_FREE) {
            res->aborted++;
            fl_lg_release(&r, i);
        }
    }
    now = t_last > t_start ? t_last : fl_now_ns();
    res->elapsed_s = (double)(now - t_start) / 1e9;
    res->window_s = (double)((now < t_stop_launch ? now : t_stop_launch) - t_start) / 1e9;
    close(r.epfd);
    free(r.slots);
    free(r.free_stack);
    if (saved) {
        errno = saved;
        return -1;
    }
    return 0;
}

/* Read until the buffer holds `end` (a blocking socket, SO_RCVTIMEO set);
 * returns the bytes read, or -1. */
static ssize_t
fl_ref_read_until(int fd, char *buf, size_t cap, const char *end)
{
    size_t got = 0;
    size_t elen = strlen(end);
    while (got < cap) {
        ssize_t n = read(fd, buf + got, cap - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
        if (got >= elen && memmem(buf, got, end, elen) != NULL)
            return (ssize_t)got;
    }
    return -1;
}

static void
fl_ref_write_all(int fd, const char *p, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        p += n;
        len -= (size_t)n;
    }
}

static void
fl_ref_serve_one(int fd, int scenario, const char *reply, size_t reply_len)
{
    char buf[4096];
    ssize_t n;
    if (scenario == FL_LG_ECHO || scenario == FL_LG_HTTP) {
        struct timeval tv = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        n = fl_ref_read_until(fd, buf, sizeof(buf), scenario == FL_LG_ECHO ? "\n" : "\r\n\r\n");
        if (n < 0)
            return;
        if (scenario == FL_LG_ECHO) {
            char *nl = memchr(buf, '\n', (size_t)n);
            fl_ref_write_all(fd, buf, (size_t)(nl - buf) + 1);
            return;
        }
    }
    fl_ref_write_all(fd, reply, reply_len);
}

int
fl_refserver_serve(int lfd, int stop_fd, int scenario,
                   const char *reply, size_t reply_len, fl_ref_stats *st)
{
    struct pollfd pfd[2];
    int backoff = 0;

    if (fl_set_nonblocking(lfd, 1) < 0)
        return -1;
    pfd[0].fd = lfd;
    pfd[0].events = POLLIN;
    pfd[1].fd = stop_fd;
    pfd[1].events = POLLIN;
    for (;;) {
        int rc;
        if (backoff) {
            /* out of descriptors: the connection stays queued and the
             * listener readable, so wait on stop_fd alone, never spin */
            fl_capacity_backoff(stop_fd, 10);
            backoff = 0;
        }
        rc = poll(pfd, 2, -1);
        if (rc < 0)
            return -1;  /* EINTR included: the caller runs signal handlers */
        if (pfd[1].revents)
            return 0;
        if (!(pfd[0].revents & POLLIN))
            continue;
        for (;;) {
            /* blocking accepted socket: the reads below wait for the client */
            int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0) {
                int err = errno;
                if (err == EAGAIN || err == EWOULDBLOCK)
                    break;
                if (err == EINTR)
                    return -1;
                st->errors++;
                switch (fl_accept_error_class(err)) {
                case FL_ERR_IGNORE:
                    continue;
                case FL_ERR_CAPACITY:
                    backoff = 1;
                    break;
                default:
                    errno = err;
                    return -1;
                }
                break;
            }
            st->accepted++;
            fl_ref_serve_one(c, scenario, reply, reply_len);
            close(c);
        }
    }
}
