/* Threads waiting through one accept filter at once, as several threads of
 * a listener may (and leader/follower waiters will), while clients connect,
 * some silent, some speaking at once, some after a pause: every speaking
 * connection comes out of exactly one thread, no silent one ever does, and
 * the counters add up; fl_filter_clear (close_waiting) closes the silent
 * ones while the threads still wait.  Built and run by tests/test_core_c.py, under
 * ThreadSanitizer where the compiler has it.  Exit status 0: all as said. */
#define _GNU_SOURCE
#include "fl_filter.h"
#include "fl_proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define THREADS 3
#define SPEAKING 300
#define SILENT 20

static fl_filter filt;
static fl_stats st;
static int lfd, wake_r, wake_w;
static int taken[65536];        /* by descriptor number: times handed over */
static int handed;              /* total, under the lock below */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *
waiter(void *arg)
{
    fl_conn out[8];
    (void)arg;
    for (;;) {
        int status = 0, err = 0, i;
        int n = fl_filter_wait_accept(&filt, lfd, wake_r, -1, 1000, NULL, out, 8, &st,
                                      &status, &err);
        if (status == FL_WAIT_WOKEN)
            return NULL;
        pthread_mutex_lock(&lock);
        for (i = 0; i < n; i++) {
            char c;
            if (out[i].fd >= 0 && out[i].fd < 65536)
                taken[out[i].fd]++;
            /* the byte is still there: the filter only peeked */
            if (recv(out[i].fd, &c, 1, MSG_DONTWAIT) != 1 || c != 'x')
                taken[0] = -1000;
            close(out[i].fd);
            handed++;
        }
        pthread_mutex_unlock(&lock);
    }
}

int
main(void)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof sin;
    fl_ready_rule rule = {FL_RULE_DATA, 0, 0, 0};
    pthread_t t[THREADS];
    int silent[SILENT], i, k, bad = 0, got, cleared;
    fl_filter_stats fs;

    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(lfd, 4096) < 0
            || getsockname(lfd, (struct sockaddr *)&sin, &len) < 0)
        return 2;
    if (fl_wakeup_open(&wake_r, &wake_w) < 0 || fl_filter_init(&filt) != 0
            || fl_filter_configure(&filt, &rule, 60000, 1000) != 0)
        return 2;
    for (k = 0; k < THREADS; k++)
        if (pthread_create(&t[k], NULL, waiter, NULL) != 0)
            return 2;
    for (i = 0; i < SILENT; i++) {
        silent[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(silent[i], (struct sockaddr *)&sin, sizeof sin) < 0)
            return 2;
    }
    for (i = 0; i < SPEAKING; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&sin, sizeof sin) < 0)
            return 2;
        if (i % 3 == 1)
            poll(NULL, 0, 1);       /* some wait in the filter first */
        if (send(c, "x", 1, 0) != 1)
            return 2;
        close(c);
    }
    for (k = 0; k < 10000; k++) {   /* at most 10 s */
        pthread_mutex_lock(&lock);
        got = handed;
        pthread_mutex_unlock(&lock);
        if (got >= SPEAKING)
            break;
        poll(NULL, 0, 1);
    }
    poll(NULL, 0, 50);              /* a silent one handed over would show now */
    fl_filter_stats_read(&filt, &fs);
    if (fs.waiting != SILENT) {
        fprintf(stderr, "waiting %llu, not %d\n", fs.waiting, SILENT);
        bad = 1;
    }
    cleared = fl_filter_clear(&filt, FL_DROP_SHUTDOWN);     /* the threads still wait */
    if (cleared != SILENT) {
        fprintf(stderr, "fl_filter_clear closed %d, not %d\n", cleared, SILENT);
        bad = 1;
    }
    fl_wakeup_signal(wake_w);
    for (k = 0; k < THREADS; k++)
        pthread_join(t[k], NULL);
    fl_filter_stats_read(&filt, &fs);
    if (handed != SPEAKING) {
        fprintf(stderr, "handed over %d of %d\n", handed, SPEAKING);
        bad = 1;
    }
    if (taken[0] < 0) {
        fprintf(stderr, "a connection's byte was consumed\n");
        bad = 1;
    }
    if (fs.ready != SPEAKING || st.accepted != SPEAKING || fs.waiting != 0) {
        fprintf(stderr, "counters: ready %llu accepted %llu waiting %llu\n",
                fs.ready, st.accepted, fs.waiting);
        bad = 1;
    }
    fl_filter_destroy(&filt);
    fl_filter_stats_read(&filt, &fs);
    if (fs.dropped[FL_DROP_SHUTDOWN] != SILENT) {
        fprintf(stderr, "shutdown closed %llu, not %d\n", fs.dropped[FL_DROP_SHUTDOWN], SILENT);
        bad = 1;
    }
    if (fs.drop_runs != 0 || fl_filter_drop_runs(&filt) != 0) {
        fprintf(stderr, "a shutdown began a run of drops\n");
        bad = 1;
    }
    for (i = 0; i < SILENT; i++) {
        char c;
        struct pollfd p = {silent[i], POLLIN, 0};
        if (poll(&p, 1, 5000) != 1 || recv(silent[i], &c, 1, 0) > 0) {
            fprintf(stderr, "silent client %d not closed\n", i);
            bad = 1;
        }
        close(silent[i]);
    }
    close(lfd);
    fl_wakeup_close(&wake_r, &wake_w);
    return bad;
}
