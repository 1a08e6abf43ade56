/* fastlisten: the accept filter (see fl_filter.h). */
#define _GNU_SOURCE
#include "fl_filter.h"
#include "fl_proxy.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

/* The largest TLS record a ClientHello may come in (RFC 8446 5.1: 2^14). */
#define FL_TLS_RECORD_MAX 16384
#define FL_EVENTS 64

static long long
fl_filter_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* -- the judge ------------------------------------------------------------ */

static int
fl_judge_line(const unsigned char *p, size_t m, int eof, size_t max_bytes)
{
    size_t look = m < max_bytes ? m : max_bytes;
    if (memchr(p, '\n', look) != NULL)
        return FL_JUDGE_READY;
    if (m >= max_bytes)
        return FL_JUDGE_OVERSIZE;
    if (eof)
        return m > 0 ? FL_JUDGE_READY : FL_JUDGE_CLOSED;
    return FL_JUDGE_WAIT;
}

/* An empty line ends the head: LF LF or LF CR LF (CRLF CRLF included, and
 * the bare-LF heads http.server accepts).  A first line without "HTTP/" is
 * an HTTP/0.9 request, complete by itself. */
static int
fl_judge_http(const unsigned char *p, size_t m, int eof, size_t max_bytes)
{
    size_t look = m < max_bytes ? m : max_bytes;
    const unsigned char *nl = memchr(p, '\n', look);
    size_t i;
    if (nl != NULL) {
        size_t first = (size_t)(nl - p);
        int versioned = 0;
        for (i = 0; i + 5 <= first; i++) {
            if (memcmp(p + i, "HTTP/", 5) == 0) {
                versioned = 1;
                break;
            }
        }
        if (!versioned)
            return FL_JUDGE_READY;
        for (i = first; i < look; i++) {
            if (p[i] != '\n')
                continue;
            if (i + 1 < look && p[i + 1] == '\n')
                return FL_JUDGE_READY;
            if (i + 2 < look && p[i + 1] == '\r' && p[i + 2] == '\n')
                return FL_JUDGE_READY;
        }
    }
    if (m >= max_bytes)
        return FL_JUDGE_OVERSIZE;
    if (eof)
        return m > 0 ? FL_JUDGE_READY : FL_JUDGE_CLOSED;
    return FL_JUDGE_WAIT;
}

/* A TLS record of type handshake (22), version 3.x, 1..2^14 bytes, whose
 * first handshake message is a ClientHello (1); ready once it is whole.
 * Checked byte by byte as they come: anything else is malformed at once. */
static int
fl_judge_tls(const unsigned char *p, size_t m, int eof)
{
    size_t len;
    if (m >= 1 && p[0] != 22)
        return FL_JUDGE_MALFORMED;
    if (m >= 2 && p[1] != 3)
        return FL_JUDGE_MALFORMED;
    if (m >= 5) {
        len = ((size_t)p[3] << 8) | p[4];
        if (len < 4 || len > FL_TLS_RECORD_MAX)
            return FL_JUDGE_MALFORMED;
        if (m >= 6 && p[5] != 1)
            return FL_JUDGE_MALFORMED;
        if (m >= 5 + len)
            return FL_JUDGE_READY;
    }
    return eof ? FL_JUDGE_CLOSED : FL_JUDGE_WAIT;
}

int
fl_ready_judge(const unsigned char *buf, size_t n, int eof, const fl_ready_rule *r)
{
    size_t off = 0, m;
    if (r->proxy) {
        fl_proxy_hdr h;
        long p = fl_proxy_parse(buf, n, r->proxy, r->proxy_max_v2, &h, NULL);
        if (p < 0)
            return FL_JUDGE_MALFORMED;
        if (p == 0)
            return eof ? FL_JUDGE_CLOSED : FL_JUDGE_WAIT;
        off = (size_t)p;
        /* A LOCAL header (a balancer's health check) is ready only with
         * something after it, whatever the rule: a check that closes or
         * resets next is dropped here, never handed to a handler. */
        if (h.command == FL_PROXY_LOCAL && n == off)
            return eof ? FL_JUDGE_CLOSED : FL_JUDGE_WAIT;
    }
    m = n - off;
    switch (r->rule) {
    case FL_RULE_DATA:
        if (m > 0)
            return FL_JUDGE_READY;
        return eof ? FL_JUDGE_CLOSED : FL_JUDGE_WAIT;
    case FL_RULE_LINE:
        return fl_judge_line(buf + off, m, eof, r->max_bytes);
    case FL_RULE_HTTP:
        return fl_judge_http(buf + off, m, eof, r->max_bytes);
    case FL_RULE_TLS:
        return fl_judge_tls(buf + off, m, eof);
    default:
        return FL_JUDGE_READY;
    }
}

size_t
fl_ready_peek_size(const fl_ready_rule *r)
{
    size_t head, proxy = 0;
    if (r->proxy)
        proxy = r->proxy_max_v2 > FL_PROXY_V1_MAX ? r->proxy_max_v2 : FL_PROXY_V1_MAX;
    switch (r->rule) {
    case FL_RULE_DATA: head = 1; break;
    case FL_RULE_LINE:
    case FL_RULE_HTTP: head = r->max_bytes; break;
    case FL_RULE_TLS: head = 5 + FL_TLS_RECORD_MAX; break;
    default: head = 0;
    }
    return proxy + head + 1;
}

/* -- the waiting set ------------------------------------------------------ */

static void
fl_count(unsigned long long *counter, unsigned long long n)
{
    __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + n,
                     __ATOMIC_RELAXED);
}

int
fl_filter_init(fl_filter *f)
{
    int r;
    memset(f, 0, sizeof *f);
    f->epfd = -1;
    f->head = f->tail = f->free = -1;
    f->cap = 1;
#ifdef __linux__
    f->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (f->epfd < 0)
        return errno;
#else
    return ENOSYS;
#endif
    r = pthread_mutex_init(&f->lock, NULL);
    if (r != 0) {
        close(f->epfd);
        f->epfd = -1;
    }
    return r;
}

int
fl_filter_configure(fl_filter *f, const fl_ready_rule *r, long long timeout_ms, int cap)
{
    size_t size = fl_ready_peek_size(r);
    unsigned char *peek;
    int ret = 0;
    pthread_mutex_lock(&f->lock);
    if (f->count > 0) {
        ret = EBUSY;
        goto out;
    }
    if (size != f->peek_size) {
        peek = realloc(f->peek, size);
        if (peek == NULL) {
            ret = ENOMEM;
            goto out;
        }
        f->peek = peek;
        f->peek_size = size;
    }
    f->rule = *r;
    f->timeout_ms = timeout_ms;
    f->cap = cap < 1 ? 1 : cap;
out:
    pthread_mutex_unlock(&f->lock);
    return ret;
}

/* Take slot i out of the epoll set, and from the FIFO list onto the free
 * list (lock held); its descriptor stays open, for the caller.  Out of the
 * epoll set before the caller closes it or hands it over: close() alone
 * would leave the registration in place while another descriptor of the
 * same file lives on (a process forked meanwhile, until fl_filter_forget
 * runs in it, or the handler's), and its later events (the peer's FIN, the
 * next request) would come under slot i, which a new connection may hold
 * by then. */
static void
fl_unlink(fl_filter *f, int i)
{
    fl_waiting *w = &f->slots[i];
#ifdef __linux__
    (void)epoll_ctl(f->epfd, EPOLL_CTL_DEL, w->c.fd, NULL);
#endif
    if (w->prev >= 0)
        f->slots[w->prev].next = w->next;
    else
        f->head = w->next;
    if (w->next >= 0)
        f->slots[w->next].prev = w->prev;
    else
        f->tail = w->prev;
    w->c.fd = -1;
    w->next = f->free;
    f->free = i;
    f->count--;
    __atomic_store_n(&f->st.waiting, (unsigned long long)f->count, __ATOMIC_RELAXED);
}

/* Count a drop for `why`, and the run of drops it begins or extends
 * (lock held; see fl_filter_stats). */
static void
fl_count_drop(fl_filter *f, int why)
{
    fl_count(&f->st.dropped[why], 1);
    if (why == FL_DROP_CLOSED || why == FL_DROP_RESET || why == FL_DROP_SHUTDOWN)
        return;
    if (!f->dropping) {
        f->dropping = 1;
        __atomic_store_n(&f->st.run_drops, 0ULL, __ATOMIC_RELAXED);
        __atomic_store_n(&f->st.run_reason, (unsigned long long)why, __ATOMIC_RELAXED);
        __atomic_store_n(&f->st.run_open, 1ULL, __ATOMIC_RELAXED);
        /* last, released: a reader that sees the new run sees its reason */
        __atomic_store_n(&f->st.drop_runs,
                         __atomic_load_n(&f->st.drop_runs, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELEASE);
    }
    fl_count(&f->st.run_drops, 1);
}

/* Close fd, counted as `why` (lock held).  Counted first: a peer that
 * sees its connection closed finds the drop in the counters already. */
static void
fl_drop_fd(fl_filter *f, int fd, int why)
{
    fl_count_drop(f, why);
    close(fd);
}

/* Drop waiting slot i (lock held; out of the epoll set first: see
 * fl_unlink). */
static void
fl_drop(fl_filter *f, int i, int why)
{
    int fd = f->slots[i].c.fd;
    fl_unlink(f, i);
    fl_drop_fd(f, fd, why);
}

/* A free slot (lock held; count < cap): -1 if memory ran out. */
static int
fl_slot(fl_filter *f)
{
    int i;
    if (f->free < 0) {
        int n = f->nslots ? f->nslots * 2 : 16;
        fl_waiting *s;
        if (n > f->cap)
            n = f->cap;
        if (n <= f->nslots)
            return -1;
        s = realloc(f->slots, (size_t)n * sizeof *s);
        if (s == NULL)
            return -1;
        f->slots = s;
        for (i = n - 1; i >= f->nslots; i--) {
            s[i].c.fd = -1;
            s[i].next = f->free;
            f->free = i;
        }
        f->nslots = n;
    }
    i = f->free;
    f->free = f->slots[i].next;
    return i;
}

/* Peek at fd and judge it (lock held).  eof: the peer's FIN was seen;
 * *seen: how many bytes the peek showed. */
static int
fl_judge_fd(fl_filter *f, int fd, int eof, int *sock_err, size_t *seen)
{
    ssize_t n;
    *sock_err = 0;
    *seen = 0;
    do {
        n = recv(fd, f->peek, f->peek_size, MSG_PEEK | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return eof ? FL_JUDGE_CLOSED : FL_JUDGE_WAIT;
        *sock_err = errno;
        return FL_JUDGE_CLOSED;
    }
    if (n == 0)
        return FL_JUDGE_CLOSED;
    *seen = (size_t)n;
    return fl_ready_judge(f->peek, (size_t)n, eof, &f->rule);
}

/* A verdict below zero: which counter. */
static int
fl_drop_reason(int verdict, int sock_err)
{
    if (sock_err)
        return FL_DROP_RESET;
    return -verdict;        /* MALFORMED 1, OVERSIZE 2, CLOSED 3 */
}

/* A new connection that must wait: into the set, evicting the oldest at
 * the cap (lock held).  The connection is closed if it cannot be watched. */
static void
fl_enter(fl_filter *f, const fl_conn *c, long long now)
{
#ifdef __linux__
    struct epoll_event ev;
    int i;
    if (f->count >= f->cap && f->head >= 0)
        fl_drop(f, f->head, FL_DROP_EVICTED);
    i = fl_slot(f);
    if (i < 0) {
        fl_drop_fd(f, c->fd, FL_DROP_ERROR);
        return;
    }
    memset(&ev, 0, sizeof ev);
    /* Edge-triggered: the bytes stay unread (MSG_PEEK), so a level-triggered
     * entry would be reported again at once, forever; an edge comes with
     * every new segment and with the FIN. */
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
    ev.data.u32 = (unsigned)i;
    if (epoll_ctl(f->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        f->slots[i].next = f->free;
        f->free = i;
        fl_drop_fd(f, c->fd, FL_DROP_ERROR);
        return;
    }
    f->slots[i].c = *c;
    f->slots[i].deadline = now + f->timeout_ms;
    f->slots[i].next = -1;
    f->slots[i].prev = f->tail;
    if (f->tail >= 0)
        f->slots[f->tail].next = i;
    else
        f->head = i;
    f->tail = i;
    f->count++;
    __atomic_store_n(&f->st.waiting, (unsigned long long)f->count, __ATOMIC_RELAXED);
    if ((unsigned long long)f->count > __atomic_load_n(&f->st.peak, __ATOMIC_RELAXED))
        __atomic_store_n(&f->st.peak, (unsigned long long)f->count, __ATOMIC_RELAXED);
    fl_count(&f->st.entered, 1);
#else
    (void)now;
    fl_drop_fd(f, c->fd, FL_DROP_ERROR);
#endif
}

/* Below the minimum rate: slot i, which has sent `seen` bytes and is not
 * ready, has waited a second or more and sent fewer than min_rate bytes a
 * second (lock held). */
static int
fl_too_slow(const fl_filter *f, int i, size_t seen, long long now)
{
    long long waited = now - (f->slots[i].deadline - f->timeout_ms);
    if (f->min_rate == 0 || waited < 1000)
        return 0;
    return (unsigned long long)seen * 1000ULL < f->min_rate * (unsigned long long)waited;
}

/* Judge the waiting connections epoll reports; ready ones go to out[n...]
 * (lock held).  Returns the new n. */
static int
fl_filter_events(fl_filter *f, fl_conn *out, int n, int max, long long now)
{
#ifdef __linux__
    struct epoll_event ev[FL_EVENTS];
    while (n < max) {
        int want = max - n < FL_EVENTS ? max - n : FL_EVENTS;
        int r = epoll_wait(f->epfd, ev, want, 0), k;
        if (r <= 0)
            break;          /* (EINTR: the next round sees them again) */
        for (k = 0; k < r; k++) {
            int i = (int)ev[k].data.u32, verdict, sock_err = 0;
            int fd;
            size_t seen;
            if (i < 0 || i >= f->nslots || f->slots[i].c.fd < 0)
                continue;   /* dropped earlier in this round */
            fd = f->slots[i].c.fd;
            if (ev[k].events & EPOLLERR) {
                fl_drop(f, i, FL_DROP_RESET);
                continue;
            }
            verdict = fl_judge_fd(f, fd, (ev[k].events & (EPOLLRDHUP | EPOLLHUP)) != 0,
                                  &sock_err, &seen);
            if (verdict == FL_JUDGE_WAIT) {
                if (fl_too_slow(f, i, seen, now))
                    fl_drop(f, i, FL_DROP_SLOW);
                continue;
            }
            if (verdict < 0) {
                fl_drop(f, i, fl_drop_reason(verdict, sock_err));
                continue;
            }
            out[n++] = f->slots[i].c;
            fl_unlink(f, i);
        }
        if (r < want)
            break;
    }
#else
    (void)f; (void)out; (void)max; (void)now;
#endif
    return n;
}

/* Close every connection whose deadline passed (lock held). */
static void
fl_expire(fl_filter *f, long long now)
{
    while (f->head >= 0 && f->slots[f->head].deadline <= now)
        fl_drop(f, f->head, FL_DROP_EXPIRED);
}

/* accept4 until EAGAIN, max ready connections in out[] or an error; each
 * new connection is judged at once (lock held).  As fl_net.c's
 * fl_drain_accept otherwise. */
static int
fl_filter_accept(fl_filter *f, int lfd, fl_conn *out, int n, int max, fl_stats *st,
                 int *err, long long now)
{
    fl_conn c;
    while (n < max) {
        int fd, verdict, sock_err;
        size_t seen;
        c.addrlen = sizeof c.addr;
        fd = fl_accept4(lfd, (struct sockaddr *)&c.addr, &c.addrlen);
        if (fd < 0) {
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK)
                break;
            if (e == EINTR)
                continue;
            fl_stats_count_error(st, e);
            if (fl_accept_error_class(e) == FL_ERR_IGNORE)
                continue;
            *err = e;
            break;
        }
        c.fd = fd;
        verdict = fl_judge_fd(f, fd, 0, &sock_err, &seen);
        if (verdict == FL_JUDGE_READY)
            out[n++] = c;
        else if (verdict == FL_JUDGE_WAIT)
            fl_enter(f, &c, now);
        else
            fl_drop_fd(f, fd, fl_drop_reason(verdict, sock_err));
    }
    return n;
}

int
fl_filter_watch(fl_filter *f, int epfd)
{
#ifdef __linux__
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.fd = f->epfd;
    return epoll_ctl(epfd, EPOLL_CTL_ADD, f->epfd, &ev);
#else
    (void)f; (void)epfd;
    errno = ENOSYS;
    return -1;
#endif
}

/* One round of work once a wait returned (lock taken here): judge what
 * the filter reports, accept what is queued (inside the gate, if any),
 * expire what is overdue.  Returns how many are ready in out[]. */
static int
fl_filter_round(fl_filter *f, int filt_ready, int lfd, int listener_ready, fl_gate *gate,
                fl_conn *out, int max, fl_stats *st, int *err)
{
    long long now = fl_filter_now_ms();
    int n = 0;
    pthread_mutex_lock(&f->lock);
    if (filt_ready)
        n = fl_filter_events(f, out, n, max, now);
    if (listener_ready && n < max) {
        if (gate == NULL || fl_gate_enter(gate)) {
            n = fl_filter_accept(f, lfd, out, n, max, st, err, now);
            if (gate != NULL)
                fl_gate_leave(gate);
        }
    }
    if (n > 0) {
        fl_count(&f->st.ready, (unsigned long long)n);
        if (f->dropping) {
            /* a connection made ready ends a run of drops (before this
             * round's expiries, which begin the next one) */
            f->dropping = 0;
            __atomic_store_n(&f->st.run_open, 0ULL, __ATOMIC_RELAXED);
        }
    }
    fl_expire(f, now);
    pthread_mutex_unlock(&f->lock);
    if (n > 0)
        fl_stats_count_batch(st, n, *err);
    return n;
}

/* poll()'s timeout for a wait that ends at `end` (timeout_ms < 0: none)
 * or at the oldest waiting connection's deadline, whichever comes first. */
static int
fl_filter_wait_ms(fl_filter *f, int timeout_ms, long long end)
{
    long long now = fl_filter_now_ms(), left;
    int ms = timeout_ms;
    if (timeout_ms >= 0) {
        left = end - now;
        ms = left > 0 ? (int)left : 0;
    }
    pthread_mutex_lock(&f->lock);
    if (f->head >= 0) {
        left = f->slots[f->head].deadline - now;
        if (left < 0)
            left = 0;
        if (ms < 0 || left < ms)
            ms = (int)left;
    }
    pthread_mutex_unlock(&f->lock);
    return ms;
}

int
fl_filter_wait_accept_ep(fl_filter *f, int epfd, int lfd, int wfd, int sig_fd, int stop_fd,
                         fl_gate *gate, int timeout_ms, const sigset_t *wait_mask,
                         fl_conn *out, int max, fl_stats *st, int *status, int *err)
{
#ifdef __linux__
    long long end = timeout_ms >= 0 ? fl_filter_now_ms() + timeout_ms : 0;
    int n;
    *err = 0;
    if (gate != NULL) {
        /* what is queued or ready already is taken before any wait, as
         * fl_wait_accept_ep does */
        if (fl_gate_closed(gate)) {
            *status = FL_WAIT_STOPPED;
            return 0;
        }
        n = fl_filter_round(f, 1, lfd, 1, gate, out, max, st, err);
        if (n > 0 || *err != 0) {
            *status = FL_WAIT_READY;
            return n;
        }
    }
    for (;;) {
        struct epoll_event ev[5];
        int r, i, listener = 0, filt = 0, woken = 0;
        r = epoll_pwait(epfd, ev, 5, fl_filter_wait_ms(f, timeout_ms, end), wait_mask);
        if (r < 0) {
            *status = errno == EINTR ? FL_WAIT_EINTR : FL_WAIT_READY;
            if (errno != EINTR)
                *err = errno;
            return 0;
        }
        for (i = 0; i < r; i++) {
            if (ev[i].data.fd == stop_fd && stop_fd >= 0) {
                *status = FL_WAIT_STOPPED;
                return 0;
            }
            if (ev[i].data.fd == sig_fd && sig_fd >= 0) {
                *status = FL_WAIT_EINTR;    /* as in fl_wait_accept_ep */
                return 0;
            }
            if (ev[i].data.fd == wfd)
                woken = 1;
            else if (ev[i].data.fd == lfd)
                listener = 1;
            else if (ev[i].data.fd == f->epfd)
                filt = 1;
        }
        if (woken) {
            *status = FL_WAIT_WOKEN;   /* left set, as in fl_wait_accept */
            return 0;
        }
        if (gate != NULL && fl_gate_closed(gate)) {
            *status = FL_WAIT_STOPPED;
            return 0;
        }
        n = fl_filter_round(f, filt, lfd, listener, gate, out, max, st, err);
        if (n > 0 || *err != 0) {
            *status = FL_WAIT_READY;
            return n;
        }
        if (timeout_ms >= 0 && fl_filter_now_ms() >= end) {
            *status = FL_WAIT_TIMEOUT;
            return 0;
        }
    }
#else
    (void)f; (void)epfd; (void)lfd; (void)wfd; (void)sig_fd; (void)stop_fd; (void)gate;
    (void)timeout_ms;
    (void)wait_mask; (void)out; (void)max; (void)st;
    *status = FL_WAIT_READY;
    *err = ENOSYS;
    return 0;
#endif
}

int
fl_filter_wait_accept(fl_filter *f, int lfd, int wfd, int sig_fd, int timeout_ms,
                      const sigset_t *wait_mask, fl_conn *out, int max, fl_stats *st,
                      int *status, int *err)
{
    long long end = timeout_ms >= 0 ? fl_filter_now_ms() + timeout_ms : 0;
    *err = 0;
    for (;;) {
        struct pollfd pfd[4];
        int ms = fl_filter_wait_ms(f, timeout_ms, end), r, n;
        pfd[0].fd = lfd;
        pfd[1].fd = wfd;
        pfd[2].fd = f->epfd;
        pfd[3].fd = sig_fd;             /* poll() skips a negative fd */
        pfd[0].events = pfd[1].events = pfd[2].events = pfd[3].events = POLLIN;
        pfd[0].revents = pfd[1].revents = pfd[2].revents = pfd[3].revents = 0;
        if (wait_mask != NULL) {
            struct timespec ts, *tsp = NULL;
            if (ms >= 0) {
                ts.tv_sec = ms / 1000;
                ts.tv_nsec = (long)(ms % 1000) * 1000000L;
                tsp = &ts;
            }
            r = ppoll(pfd, 4, tsp, wait_mask);
        } else {
            r = poll(pfd, 4, ms);
        }
        if (r < 0) {
            if (errno == EINTR) {
                *status = FL_WAIT_EINTR;
                return 0;
            }
            *status = FL_WAIT_READY;
            *err = errno;
            return 0;
        }
        if (pfd[3].revents) {
            *status = FL_WAIT_EINTR;    /* the caller runs the handlers, drains sig_fd */
            return 0;
        }
        if (pfd[1].revents) {
            *status = FL_WAIT_WOKEN;    /* left set, as in fl_wait_accept */
            return 0;
        }
        if (pfd[0].revents & POLLNVAL) {
            *status = FL_WAIT_READY;
            *err = EBADF;
            return 0;
        }
        n = fl_filter_round(f, pfd[2].revents != 0, lfd, pfd[0].revents != 0, NULL,
                            out, max, st, err);
        if (n > 0 || *err != 0) {
            *status = FL_WAIT_READY;
            return n;
        }
        if (timeout_ms >= 0 && fl_filter_now_ms() >= end) {
            *status = FL_WAIT_TIMEOUT;
            return 0;
        }
    }
}

int
fl_filter_clear(fl_filter *f, int why)
{
    int n = 0;
    pthread_mutex_lock(&f->lock);
    while (f->head >= 0) {
        fl_drop(f, f->head, why);
        n++;
    }
    pthread_mutex_unlock(&f->lock);
    return n;
}

void
fl_filter_set_min_rate(fl_filter *f, unsigned long long rate)
{
    pthread_mutex_lock(&f->lock);
    f->min_rate = rate;
    pthread_mutex_unlock(&f->lock);
}

void
fl_filter_shut(fl_filter *f)
{
    fl_filter_clear(f, FL_DROP_SHUTDOWN);
    if (f->epfd >= 0)
        close(f->epfd);
    f->epfd = -1;
}

void
fl_filter_destroy(fl_filter *f)
{
    fl_filter_shut(f);
    free(f->slots);
    free(f->peek);
    f->slots = NULL;
    f->peek = NULL;
    f->nslots = 0;
    f->peek_size = 0;
    pthread_mutex_destroy(&f->lock);
}

int
fl_filter_forget(fl_filter *f)
{
    int i, n = 0;
    for (i = 0; i < f->nslots; i++) {
        if (f->slots[i].c.fd >= 0) {
            close(f->slots[i].c.fd);
            n++;
        }
        f->slots[i].c.fd = -1;
        f->slots[i].next = i + 1 < f->nslots ? i + 1 : -1;
    }
    f->free = f->nslots > 0 ? 0 : -1;
    f->head = f->tail = -1;
    f->count = 0;
    f->dropping = 0;
    __atomic_store_n(&f->st.waiting, 0ULL, __ATOMIC_RELAXED);
    __atomic_store_n(&f->st.run_open, 0ULL, __ATOMIC_RELAXED);
    if (f->epfd >= 0) {
        close(f->epfd);
#ifdef __linux__
        f->epfd = epoll_create1(EPOLL_CLOEXEC);
#else
        f->epfd = -1;
#endif
    }
    /* the parent's thread that held it is not in this process */
    (void)pthread_mutex_init(&f->lock, NULL);
    return n;
}

void
fl_filter_stats_read(const fl_filter *f, fl_filter_stats *out)
{
    int i;
    out->waiting = __atomic_load_n(&f->st.waiting, __ATOMIC_RELAXED);
    out->peak = __atomic_load_n(&f->st.peak, __ATOMIC_RELAXED);
    out->entered = __atomic_load_n(&f->st.entered, __ATOMIC_RELAXED);
    out->ready = __atomic_load_n(&f->st.ready, __ATOMIC_RELAXED);
    for (i = 0; i < FL_DROP_SLOTS; i++)
        out->dropped[i] = __atomic_load_n(&f->st.dropped[i], __ATOMIC_RELAXED);
    out->drop_runs = __atomic_load_n(&f->st.drop_runs, __ATOMIC_ACQUIRE);
    out->run_drops = __atomic_load_n(&f->st.run_drops, __ATOMIC_RELAXED);
    out->run_reason = __atomic_load_n(&f->st.run_reason, __ATOMIC_RELAXED);
    out->run_open = __atomic_load_n(&f->st.run_open, __ATOMIC_RELAXED);
}

unsigned long long
fl_filter_drop_runs(const fl_filter *f)
{
    return __atomic_load_n(&f->st.drop_runs, __ATOMIC_ACQUIRE);
}
