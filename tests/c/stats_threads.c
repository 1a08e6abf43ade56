/* Threads counting into one fl_stats at once, as leader/follower waiters
 * do without the GIL, while another reads it: no update may be lost.
 * Built and run by tests/test_core_c.py, under ThreadSanitizer where the
 * compiler has it (which reports any unsynchronised access as a race).
 * Exit status 0: every count is exact. */
#include "fl_net.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>

#define THREADS 4
#define ROUNDS 200000

static fl_stats st;
static volatile int counting = THREADS;

static void *
count(void *arg)
{
    long i, k = (long)arg;
    for (i = 0; i < ROUNDS; i++) {
        fl_stats_count_batch(&st, 1 + (int)((i + k) % 5), 0);
        if (i % 10 == 0)
            fl_stats_count_error(&st, ECONNABORTED);
        if (i % 1000 == 0)
            fl_stats_count_error(&st, EMFILE);
    }
    __atomic_sub_fetch(&counting, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void *
read_meanwhile(void *arg)
{
    fl_stats now;
    (void)arg;
    while (__atomic_load_n(&counting, __ATOMIC_SEQ_CST) > 0)
        fl_stats_read(&st, &now);
    return NULL;
}

int
main(void)
{
    pthread_t t[THREADS + 1];
    unsigned long long want_accepted = 0;
    fl_stats now;
    long i, k;
    int bad = 0;

    for (k = 0; k < THREADS; k++)
        for (i = 0; i < ROUNDS; i++)
            want_accepted += 1 + (unsigned long long)((i + k) % 5);
    for (k = 0; k < THREADS; k++)
        if (pthread_create(&t[k], NULL, count, (void *)k) != 0)
            return 2;
    if (pthread_create(&t[THREADS], NULL, read_meanwhile, NULL) != 0)
        return 2;
    for (k = 0; k <= THREADS; k++)
        pthread_join(t[k], NULL);

    fl_stats_read(&st, &now);
#define EXPECT(what, got, want) \
    if ((got) != (want)) { \
        fprintf(stderr, "%s: %llu, expected %llu\n", what, \
                (unsigned long long)(got), (unsigned long long)(want)); \
        bad = 1; \
    }
    EXPECT("accepted", now.accepted, want_accepted);
    EXPECT("batches", now.batches, (unsigned long long)THREADS * ROUNDS);
    EXPECT("max_batch", now.max_batch, 5ULL);
    EXPECT("errors[ECONNABORTED]", now.errors[ECONNABORTED],
           (unsigned long long)THREADS * (ROUNDS / 10));
    EXPECT("errors[EMFILE]", now.errors[EMFILE], (unsigned long long)THREADS * (ROUNDS / 1000));
    EXPECT("last_capacity_errno", now.last_capacity_errno, EMFILE);
    return bad;
}
