/* A leader/follower waiter woken by a connection after its Stop's gate was
 * closed must accept nothing (fl_wait_accept_ep's check after the wait):
 * once fence() returned, the listening descriptor may be blocking, closed
 * or reused.  The core also takes a fenced waiter off the listener
 * (Stop.fence), which leaves this check only a race to cover: here
 * the listener stays in the epoll set, so the wake-up comes for sure.
 * Built and run by tests/test_core_c.py.  Exit status 0: nothing accepted,
 * the connection still queued. */
#define _GNU_SOURCE
#include "fl_net.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int lfd, wfd, epfd;
static fl_gate gate;
static volatile pid_t tid;
static int n = -1, status, err;

static void *
wait_one(void *arg)
{
    fl_conn out[1];
    fl_stats st;
    (void)arg;
    memset(&st, 0, sizeof st);
    __atomic_store_n(&tid, (pid_t)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
    n = fl_wait_accept_ep(epfd, lfd, wfd, -1, -1, &gate, 20000, NULL, out, 1, &st,
                          &status, &err);
    return NULL;
}

/* Whether thread t is blocked in epoll_pwait (or epoll_wait). */
static int
in_epoll_wait(pid_t t)
{
    char path[64], buf[64];
    long nr = -1;
    FILE *f;
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", (int)t);
    f = fopen(path, "r");
    if (f == NULL)
        return 0;
    if (fgets(buf, sizeof buf, f) != NULL)
        nr = strtol(buf, NULL, 10);
    fclose(f);
#ifdef SYS_epoll_wait
    if (nr == SYS_epoll_wait)
        return 1;
#endif
    return nr == SYS_epoll_pwait;
}

int
main(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    pthread_t t;
    int wr, c, exclusive, i, got;
    struct timespec pause = {0, 1000000};

    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 8) < 0 ||
            getsockname(lfd, (struct sockaddr *)&a, &len) < 0) {
        perror("listener");
        return 2;
    }
    if (fl_gate_init(&gate) != 0 || fl_wakeup_open(&wfd, &wr) < 0) {
        perror("gate/wake-up");
        return 2;
    }
    epfd = fl_waiter_open(lfd, wfd, -1, &gate, &exclusive);
    if (epfd < 0) {
        perror("fl_waiter_open");
        return 2;
    }
    pthread_create(&t, NULL, wait_one, NULL);
    for (i = 0; i < 20000 && !(__atomic_load_n(&tid, __ATOMIC_SEQ_CST) &&
                               in_epoll_wait(__atomic_load_n(&tid, __ATOMIC_SEQ_CST))); i++)
        nanosleep(&pause, NULL);
    fl_gate_close(&gate);           /* fence(), without taking the listener off */
    c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("connect");
        return 2;
    }
    pthread_join(t, NULL);
    got = accept(lfd, NULL, NULL);  /* still queued */
    if (n != 0 || status != FL_WAIT_STOPPED || got < 0) {
        fprintf(stderr, "n=%d status=%d err=%d queued=%d\n", n, status, err, got >= 0);
        return 1;
    }
    close(got);
    close(c);
    close(epfd);
    fl_wakeup_close(&wfd, &wr);
    fl_gate_destroy(&gate);
    close(lfd);
    return 0;
}
