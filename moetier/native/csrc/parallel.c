/* Parallel regions: a small pool of worker threads that CLAIM the parts of a region.
 *
 * parallel_run(fn, ctx, n) runs fn(ctx, k, n) once for every part k in [0, n): the caller and
 * up to n - 1 workers take parts from a shared counter until none is left; the caller returns
 * when every claimed part has finished. Which thread runs a part does not change its result
 * (every part writes its own outputs in a fixed order), so results do not depend on timing.
 *
 * Why not an OpenMP team (this file used libgomp's, shared with torch, before): a team's
 * region starts and ends with barriers that every team thread must reach, so a worker that the
 * OS has not scheduled (another process on its core, torch's own spinning workers after a
 * prefill) stalls every region for a scheduler time slice. A decode step has ~5 regions per
 * layer: on the shared 2-core machine under load, 2-thread decode measured 20x slower than
 * 1-thread (2.0 vs 41 tok/s, int8 wide model, load average 13). Here a worker that is late
 * finds the parts already taken and the caller never waits for it; a caller waits only for
 * parts another thread has claimed and is running.
 *
 * Workers spin for SPIN_NS after a region (the gaps inside a decode step are microseconds),
 * then sleep on a futex; the caller wakes sleepers when it publishes a region. Nested calls
 * (a part calling parallel_run), concurrent callers and a forked child run serially. */
#include "mt.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 63
#define SPIN_NS 200000L /* 0.2 ms */

/* the region: state = generation (32 bits) | parts (16) | next unclaimed part (16) */
static _Atomic uint64_t state;
static _Atomic uint32_t gen32; /* futex word: the generation of the latest region */
static _Atomic int done;       /* parts of the current region finished */
static _Atomic int sleepers;
static task_fn cur_fn;
static void *cur_ctx;

static int workers = 0;
static pid_t pool_pid = 0;
static pthread_mutex_t caller_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int in_part = 0;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* claim and run parts of region `g` until none is left */
static void run_parts(uint32_t g) {
    for (;;) {
        uint64_t s = atomic_load_explicit(&state, memory_order_acquire);
        if ((uint32_t)(s >> 32) != g) return;
        int n = (int)((s >> 16) & 0xffff), k = (int)(s & 0xffff);
        if (k >= n) return;
        task_fn fn = cur_fn;
        void *ctx = cur_ctx;
        if (!atomic_compare_exchange_weak_explicit(&state, &s, s + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        in_part = 1;
        fn(ctx, k, n);
        in_part = 0;
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint32_t seen = atomic_load(&gen32);
    for (;;) {
        long t0 = now_ns();
        int spins = 0;
        while (atomic_load_explicit(&gen32, memory_order_acquire) == seen) {
            cpu_relax();
            if (++spins == 64) {
                spins = 0;
                if (now_ns() - t0 > SPIN_NS) {
                    atomic_fetch_add(&sleepers, 1);
                    syscall(SYS_futex, &gen32, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                    atomic_fetch_sub(&sleepers, 1);
                    t0 = now_ns();
                }
            }
        }
        seen = atomic_load_explicit(&gen32, memory_order_acquire);
        run_parts(seen);
    }
    return NULL;
}

/* start workers until there are `want` (fewer if thread creation fails) */
static void grow(int want) {
    if (want > MAX_WORKERS) want = MAX_WORKERS;
    while (workers < want) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &a, worker, NULL);
        pthread_attr_destroy(&a);
        if (rc) break;
        workers++;
    }
}

static void serial(task_fn fn, void *ctx, int n) {
    for (int k = 0; k < n; k++) fn(ctx, k, n);
}

void parallel_run(task_fn fn, void *ctx, int nth) {
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    if (nth > 0xffff) nth = 0xffff;
    pid_t me = getpid();
    if (pool_pid == 0) pool_pid = me;
    if (in_part || pool_pid != me || pthread_mutex_trylock(&caller_lock)) {
        serial(fn, ctx, nth); /* nested, forked child, or another caller has the pool */
        return;
    }
    grow(nth - 1);
    if (workers == 0) {
        pthread_mutex_unlock(&caller_lock);
        serial(fn, ctx, nth);
        return;
    }
    uint32_t g = atomic_load(&gen32) + 1;
    cur_fn = fn;
    cur_ctx = ctx;
    atomic_store(&done, 0);
    atomic_store_explicit(&state, ((uint64_t)g << 32) | ((uint64_t)nth << 16), memory_order_release);
    atomic_store(&gen32, g); /* seq_cst: a worker going to sleep sees it, or we see the sleeper */
    if (atomic_load(&sleepers) > 0) syscall(SYS_futex, &gen32, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    run_parts(g);
    int spins = 0;
    while (atomic_load_explicit(&done, memory_order_acquire) < nth) {
        cpu_relax();
        if (++spins >= 4096) sched_yield(); /* a worker was descheduled inside its part */
    }
    pthread_mutex_unlock(&caller_lock);
}
