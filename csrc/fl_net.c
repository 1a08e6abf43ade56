/* fastlisten: accept batches, wait-with-wakeup, TCP_INFO.  See fl_net.h. */
#define _GNU_SOURCE
#include "fl_net.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/tcp.h>
#ifdef __linux__
#include <sys/epoll.h>
#include <sys/eventfd.h>
#endif

int
fl_accept_error_class(int err)
{
    switch (err) {
    case ECONNABORTED:
    case ECONNRESET:
#ifdef EPROTO
    case EPROTO:
#endif
    case EPERM:        /* firewall rules (Linux accept(2)) */
    case ETIMEDOUT:
    /* accept(2): pending network errors passed on by Linux "should be
     * treated like EAGAIN by retrying" */
    case ENETDOWN:
    case ENOPROTOOPT:
    case EHOSTDOWN:
#ifdef ENONET
    case ENONET:
#endif
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
        return FL_ERR_IGNORE;
    case EMFILE:
    case ENFILE:
    case ENOBUFS:
    case ENOMEM:
        return FL_ERR_CAPACITY;
    case EBADF:
    case EINVAL:       /* not listening any more */
    case ENOTSOCK:
        return FL_ERR_CLOSED;
    default:
        return FL_ERR_OTHER;
    }
}

/* Mark fd close-on-exec, or close it (errno kept) and return -1. */
static int
fl_cloexec_or_close(int fd)
{
    if (fd >= 0 && fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int
fl_socket(int family, int type, int proto)
{
    int fd;
#ifdef SOCK_CLOEXEC
    fd = socket(family, type | SOCK_CLOEXEC, proto);
    if (fd >= 0 || errno != EINVAL)
        return fd;
    /* a kernel older than 2.6.27 rejects the flag: fall through */
#endif
    return fl_cloexec_or_close(socket(family, type, proto));
}

int
fl_set_nonblocking(int fd, int on)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return -1;
    flags = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
    return fcntl(fd, F_SETFL, flags);
}

/* Accepted descriptors are close-on-exec and *blocking*: a socket.socket
 * built on one then behaves like the stdlib's accept() result (timeout None,
 * or the default timeout, which socket.socket applies itself). */
int
fl_accept4(int lfd, struct sockaddr *addr, socklen_t *addrlen)
{
    int fd;
#if defined(__linux__) && defined(SOCK_CLOEXEC)
    static int have_accept4 = 1;   /* racy but idempotent: only ever 1 -> 0 */
    if (have_accept4) {
        fd = accept4(lfd, addr, addrlen, SOCK_CLOEXEC);
        if (fd >= 0 || errno != ENOSYS)
            return fd;
        have_accept4 = 0;          /* as CPython does: remember ENOSYS */
    }
#endif
    return fl_cloexec_or_close(accept(lfd, addr, addrlen));
}

int
fl_wakeup_open(int *rfd, int *wfd)
{
#ifdef __linux__
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd >= 0) {
        *rfd = *wfd = fd;
        return 0;
    }
#endif
    int p[2];
    if (pipe(p) < 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        if (fcntl(p[i], F_SETFD, FD_CLOEXEC) < 0 || fl_set_nonblocking(p[i], 1) < 0) {
            int saved = errno;
            close(p[0]);
            close(p[1]);
            errno = saved;
            return -1;
        }
    }
    *rfd = p[0];
    *wfd = p[1];
    return 0;
}

void
fl_wakeup_close(int *rfd, int *wfd)
{
    if (*rfd >= 0)
        close(*rfd);
    if (*wfd >= 0 && *wfd != *rfd)
        close(*wfd);
    *rfd = *wfd = -1;
}

/* Async-signal-safe; EAGAIN means a wake-up is already pending, which is
 * just as good. */
int
fl_wakeup_signal(int wfd)
{
    unsigned long long one = 1;
    ssize_t n;
    do {
        n = write(wfd, &one, sizeof one);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN)
        return -1;
    return 0;
}

void
fl_wakeup_drain(int rfd)
{
    char buf[64];
    ssize_t n;
    do {
        n = read(rfd, buf, sizeof buf);
    } while (n > 0 || (n < 0 && errno == EINTR));
}

void
fl_stats_count_error(fl_stats *st, int err)
{
    int slot = err < 0 || err >= FL_ERRNO_SLOTS ? FL_ERRNO_SLOTS - 1 : err;
    __atomic_add_fetch(&st->errors[slot], 1, __ATOMIC_RELAXED);
    if (fl_accept_error_class(err) == FL_ERR_CAPACITY) {
        __atomic_store_n(&st->last_capacity_errno, err, __ATOMIC_RELAXED);
        if (!__atomic_exchange_n(&st->in_capacity_episode, 1, __ATOMIC_RELAXED))
            __atomic_add_fetch(&st->capacity_episodes, 1, __ATOMIC_RELAXED);
    }
}

void
fl_stats_count_batch(fl_stats *st, int n, int err)
{
    unsigned long long big = __atomic_load_n(&st->max_batch, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st->accepted, (unsigned long long)n, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st->batches, 1, __ATOMIC_RELAXED);
    while ((unsigned long long)n > big
           && !__atomic_compare_exchange_n(&st->max_batch, &big, (unsigned long long)n, 1,
                                           __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;   /* another batch raised it meanwhile: big is its value now */
    if (err == 0)
        __atomic_store_n(&st->in_capacity_episode, 0, __ATOMIC_RELAXED);
}

void
fl_stats_read(const fl_stats *st, fl_stats *out)
{
    int i;
    out->accepted = __atomic_load_n(&st->accepted, __ATOMIC_RELAXED);
    out->batches = __atomic_load_n(&st->batches, __ATOMIC_RELAXED);
    out->max_batch = __atomic_load_n(&st->max_batch, __ATOMIC_RELAXED);
    out->capacity_episodes = __atomic_load_n(&st->capacity_episodes, __ATOMIC_RELAXED);
    out->in_capacity_episode = __atomic_load_n(&st->in_capacity_episode, __ATOMIC_RELAXED);
    out->last_capacity_errno = __atomic_load_n(&st->last_capacity_errno, __ATOMIC_RELAXED);
    for (i = 0; i < FL_ERRNO_SLOTS; i++)
        out->errors[i] = __atomic_load_n(&st->errors[i], __ATOMIC_RELAXED);
}

/* accept4 until EAGAIN or max connections are in out[]; returns how many.
 * *err is 0 or the errno that ended the batch early (see fl_wait_accept);
 * ignorable errors are counted in st and skipped. */
static int
fl_drain_accept(int lfd, fl_conn *out, int max, fl_stats *st, int *err)
{
    int n = 0;

    while (n < max) {
        fl_conn *c = &out[n];
        c->addrlen = sizeof c->addr;
        int fd = fl_accept4(lfd, (struct sockaddr *)&c->addr, &c->addrlen);
        if (fd >= 0) {
            c->fd = fd;
            n++;
            continue;
        }
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
    if (n > 0)
        fl_stats_count_batch(st, n, *err);
    return n;
}

/* poll()'s or epoll_wait()'s result r: 1 when the wait ended without
 * events (a signal, an error, the timeout: *status and *err say which),
 * else 0.  errno is poll()'s. */
static int
fl_wait_ended(int r, int *status, int *err)
{
    if (r < 0) {
        if (errno == EINTR) {
            *status = FL_WAIT_EINTR;
            return 1;
        }
        *status = FL_WAIT_READY;
        *err = errno;
        return 1;
    }
    if (r == 0) {
        *status = FL_WAIT_TIMEOUT;
        return 1;
    }
    return 0;
}

/* Contract: called WITHOUT the GIL; touches no Python object.
 * lfd must be non-blocking.  Waits until lfd or wfd is readable or
 * timeout_ms passes (-1: forever), then accepts up to max connections into
 * out[] until EAGAIN.  Returns how many are in out[] (the caller owns those
 * descriptors).  *status says why the wait ended (FL_WAIT_*).  *err is 0, or
 * the errno that ended the batch early: a capacity, closed or other-class
 * error (ignorable ones are counted in st and skipped).  EINTR from poll()
 * is reported as FL_WAIT_EINTR so the caller can run signal handlers with
 * the GIL and call again with the remaining time.
 *
 * sig_fd, when not -1, is the read end of the pipe the caller made the
 * interpreter's signal wake-up fd (signal.set_wakeup_fd) before it last ran
 * the Python handlers: readable, it ends the wait as FL_WAIT_EINTR.  Python
 * writes it whichever thread the kernel gave the signal to, so a signal
 * that arrives after that check and before the wait still ends the wait.
 *
 * wait_mask, when not NULL, is the signal mask to wait with (ppoll), for a
 * caller that cannot own the wake-up fd (the application set its own): it
 * blocks signals, runs the handlers of any that already came, and passes
 * the mask it had.  That closes the gap for a signal the kernel gives this
 * thread; one sent to the process while the mask blocks it goes to another
 * thread if there is one, and does not end this wait: sig_fd has no such
 * gap. */
int
fl_wait_accept(int lfd, int wfd, int sig_fd, int timeout_ms, const sigset_t *wait_mask,
               fl_conn *out, int max, fl_stats *st, int *status, int *err)
{
    struct pollfd pfd[3];
    int r;

    *err = 0;
    pfd[0].fd = lfd;
    pfd[0].events = POLLIN;
    pfd[0].revents = 0;
    pfd[1].fd = wfd;
    pfd[1].events = POLLIN;
    pfd[1].revents = 0;
    pfd[2].fd = sig_fd;             /* poll() skips a negative fd */
    pfd[2].events = POLLIN;
    pfd[2].revents = 0;

    if (wait_mask != NULL) {
        struct timespec ts, *tsp = NULL;
        if (timeout_ms >= 0) {
            ts.tv_sec = timeout_ms / 1000;
            ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
            tsp = &ts;
        }
        r = ppoll(pfd, 3, tsp, wait_mask);
    } else {
        r = poll(pfd, 3, timeout_ms);
    }
    if (fl_wait_ended(r, status, err))
        return 0;
    if (pfd[2].revents) {
        *status = FL_WAIT_EINTR;    /* the caller runs the handlers, drains sig_fd */
        return 0;
    }
    if (pfd[1].revents) {
        /* a wake-up wins over pending connections: shutdown() means no
         * more accepts.  Left readable for the other waiters: the caller
         * drains it once the last of them is out. */
        *status = FL_WAIT_WOKEN;
        return 0;
    }
    *status = FL_WAIT_READY;
    if (pfd[0].revents & POLLNVAL) {
        *err = EBADF;
        return 0;
    }
    return fl_drain_accept(lfd, out, max, st, err);
}

int
fl_gate_init(fl_gate *g)
{
    int r;
    g->closed = 0;
    g->inside = 0;
    r = pthread_mutex_init(&g->lock, NULL);
    if (r != 0)
        return r;
    r = pthread_cond_init(&g->cond, NULL);
    if (r != 0)
        pthread_mutex_destroy(&g->lock);
    return r;
}

void
fl_gate_destroy(fl_gate *g)
{
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->lock);
}

void
fl_gate_wake_closer(fl_gate *g)
{
    /* under the lock, so that the wake-up cannot fall between fl_gate_wait's
     * check and its sleep */
    pthread_mutex_lock(&g->lock);
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

int
fl_gate_close(fl_gate *g)
{
    return !__atomic_exchange_n(&g->closed, 1, __ATOMIC_SEQ_CST);
}

int
fl_gate_busy(const fl_gate *g)
{
    return __atomic_load_n(&g->inside, __ATOMIC_SEQ_CST);
}

void
fl_gate_wait(fl_gate *g)
{
    pthread_mutex_lock(&g->lock);
    while (__atomic_load_n(&g->inside, __ATOMIC_SEQ_CST) > 0)
        pthread_cond_wait(&g->cond, &g->lock);
    pthread_mutex_unlock(&g->lock);
}

int
fl_waiter_open(int lfd, int wfd, int stop_fd, fl_gate *gate, int *exclusive)
{
#ifdef __linux__
    struct epoll_event ev;
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    int entered = 0;
    if (epfd < 0)
        return -1;
    memset(&ev, 0, sizeof ev);
    *exclusive = 0;
    if (gate != NULL) {
        entered = fl_gate_enter(gate);
        if (!entered)
            goto others;    /* closed: a waiter that only ever stops */
    }
#ifdef EPOLLEXCLUSIVE
    ev.events = EPOLLIN | EPOLLEXCLUSIVE;
    ev.data.fd = lfd;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) == 0)
        *exclusive = 1;
    else if (errno != EINVAL)
        goto fail;
#endif
    ev.events = EPOLLIN;
    ev.data.fd = lfd;
    if (!*exclusive && epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0)
        goto fail;
    if (entered) {
        fl_gate_leave(gate);
        entered = 0;
    }
others:
    ev.events = EPOLLIN;
    ev.data.fd = wfd;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, wfd, &ev) < 0)
        goto fail;
    if (stop_fd >= 0) {
        ev.data.fd = stop_fd;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, stop_fd, &ev) < 0)
            goto fail;
    }
    return epfd;
fail:
    {
        int saved = errno;
        if (entered)
            fl_gate_leave(gate);
        close(epfd);
        errno = saved;
    }
    return -1;
#else
    (void)lfd; (void)wfd; (void)stop_fd; (void)gate;
    *exclusive = 0;
    errno = ENOSYS;
    return -1;
#endif
}

static long long
fl_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Contract: called WITHOUT the GIL; touches no Python object.  As
 * fl_wait_accept, but waits on epfd (from fl_waiter_open), and a readable
 * stop_fd ends the wait with FL_WAIT_STOPPED (before the wake-up descriptor
 * and the listener: a stopped waiter accepts nothing).  When the listener
 * was readable but another waiter took the connection first (EAGAIN at
 * once), it waits again, still without the GIL, for the time left.  With a
 * gate (NULL: none), accept4 runs only inside it: a closed gate ends the
 * wait with FL_WAIT_STOPPED too, even when stop_fd is not readable yet; and
 * what is queued already is accepted before any wait.  sig_fd (-1: none)
 * and wait_mask as in fl_wait_accept; the caller has added sig_fd to epfd. */
int
fl_wait_accept_ep(int epfd, int lfd, int wfd, int sig_fd, int stop_fd, fl_gate *gate,
                  int timeout_ms, const sigset_t *wait_mask, fl_conn *out, int max,
                  fl_stats *st, int *status, int *err)
{
#ifdef __linux__
    struct epoll_event ev[4];
    long long end = timeout_ms >= 0 ? fl_now_ms() + timeout_ms : 0;
    int ms = timeout_ms;

    *err = 0;
    if (gate != NULL) {
        /* A connection already queued is taken at once, without a wait: a
         * worker back from a request finds the next one with one system
         * call instead of two, and without sleeping.  Inside the gate, as
         * every accept4 (so never once the waiters' stop is set). */
        int n;
        if (!fl_gate_enter(gate)) {
            *status = FL_WAIT_STOPPED;
            return 0;
        }
        n = fl_drain_accept(lfd, out, max, st, err);
        fl_gate_leave(gate);
        if (n > 0 || *err != 0) {
            *status = FL_WAIT_READY;
            return n;
        }
    }
    for (;;) {
        int r, i, listener = 0, woken = 0;
        r = epoll_pwait(epfd, ev, 4, ms, wait_mask);
        if (fl_wait_ended(r, status, err))
            return 0;
        for (i = 0; i < r; i++) {
            if (ev[i].data.fd == stop_fd && stop_fd >= 0) {
                *status = FL_WAIT_STOPPED;
                return 0;
            }
            if (ev[i].data.fd == sig_fd && sig_fd >= 0) {
                *status = FL_WAIT_EINTR;
                return 0;
            }
            if (ev[i].data.fd == wfd)
                woken = 1;
            else if (ev[i].data.fd == lfd)
                listener = 1;
        }
        if (woken) {
            *status = FL_WAIT_WOKEN;   /* left set, as in fl_wait_accept */
            return 0;
        }
        *status = FL_WAIT_READY;
        if (listener) {
            int n;
            if (gate != NULL && !fl_gate_enter(gate)) {
                /* closed since epoll_pwait returned: the descriptor may be
                 * blocking, closed or reused by now */
                *status = FL_WAIT_STOPPED;
                return 0;
            }
            n = fl_drain_accept(lfd, out, max, st, err);
            if (gate != NULL)
                fl_gate_leave(gate);
            if (n > 0 || *err != 0)
                return n;
        }
        if (timeout_ms >= 0) {
            long long left = end - fl_now_ms();
            if (left <= 0) {
                *status = FL_WAIT_TIMEOUT;
                return 0;
            }
            ms = (int)left;
        }
    }
#else
    (void)epfd; (void)lfd; (void)wfd; (void)sig_fd; (void)stop_fd; (void)gate; (void)timeout_ms;
    (void)wait_mask; (void)out; (void)max; (void)st;
    *status = FL_WAIT_READY;
    *err = ENOSYS;
    return 0;
#endif
}

/* Contract: called with or without the GIL.  Adds fd to (on) or removes
 * it from (!on) the epoll set epfd, for reading: the signal wake-up pipe a
 * main-thread wait watches (fl_wait_accept_ep's sig_fd).  Returns 0, or -1
 * with errno (ENOSYS without epoll). */
int
fl_epoll_watch(int epfd, int fd, int on)
{
#ifdef __linux__
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    return epoll_ctl(epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, fd, &ev);
#else
    (void)epfd; (void)fd; (void)on;
    errno = ENOSYS;
    return -1;
#endif
}

/* Block every signal that can be blocked and is not synchronous (a fault
 * must still kill the process at once); *old receives the mask before.
 * Returns 0, or an errno value (pthread_sigmask's convention). */
int
fl_block_signals(sigset_t *old)
{
    sigset_t all;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    return pthread_sigmask(SIG_BLOCK, &all, old);
}

int
fl_restore_signals(const sigset_t *old)
{
    return pthread_sigmask(SIG_SETMASK, old, NULL);
}

/* Contract: called WITHOUT the GIL.  After a capacity error the pending
 * connection stays queued and the listener stays readable, so polling it
 * again would spin.  Sleep on the wake-up descriptor alone instead, so that
 * a shutdown still ends the pause at once.  errno is preserved. */
void
fl_capacity_backoff(int wfd, int ms)
{
    int saved = errno;
    struct pollfd pfd;
    pfd.fd = wfd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    (void)poll(&pfd, 1, ms);   /* EINTR just ends the pause early */
    errno = saved;
}

/* The accept queue of a listening TCP socket, as `ss -lnt` shows it:
 * tcpi_unacked is the number queued now, tcpi_sacked the effective backlog.
 * Returns -1 with errno ENOPROTOOPT where TCP_INFO does not exist. */
int
fl_tcp_queue(int fd, unsigned int *queued, unsigned int *backlog)
{
#if defined(__linux__) && defined(TCP_INFO)
    struct tcp_info info;
    socklen_t len = sizeof info;
    memset(&info, 0, sizeof info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) < 0)
        return -1;
    *queued = info.tcpi_unacked;
    *backlog = info.tcpi_sacked;
    return 0;
#else
    (void)fd; (void)queued; (void)backlog;
    errno = ENOPROTOOPT;
    return -1;
#endif
}

int
fl_format_ipv4(const struct in_addr *addr, char *buf)
{
    const unsigned char *b = (const unsigned char *)&addr->s_addr;
    int i, n = 0;
    for (i = 0; i < 4; i++) {
        unsigned v = b[i];
        if (i)
            buf[n++] = '.';
        if (v >= 100)
            buf[n++] = (char)('0' + v / 100);
        if (v >= 10)
            buf[n++] = (char)('0' + v / 10 % 10);
        buf[n++] = (char)('0' + v % 10);
    }
    buf[n] = '\0';
    return n;
}
