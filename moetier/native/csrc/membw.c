/* Memory read bandwidth for the planner's probe (planner/probe.py: measure_memory_bw).
 *
 * mt_read_bw(buf, bytes, nth, passes, cpu, wall): nth threads (the caller and nth - 1 new ones)
 * each read their own slice of buf (bytes / nth, whole 64-byte lines) `passes` times, every
 * pass started by all threads at once (a barrier), with plain sequential vector loads: the
 * decode kernels' access pattern (weights streamed once, the hardware prefetcher ahead). Each
 * pass is timed in the reading thread's CPU time (cpu[t * passes + p]: time the OS gave other
 * processes does not count, as the kernel rates of native/rates.py) and in wall time (wall[...]).
 * Returns the sum of the buffer's 64-bit words over every slice and pass (the caller checks it:
 * every byte was read). */
#include "mt.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

typedef struct {
    const uint64_t *p;
    long words;
    int passes;
    double *cpu, *wall;
    pthread_barrier_t *bar;
    _Atomic int *go; /* 0 until the barrier is set up for the threads that exist; then 1 (-1: give up) */
    uint64_t sum;
} reader_arg;

static double clock_s(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* sum of n 64-bit words (n a multiple of 8): 256-bit loads, four independent sums */
MT_TARGET_AVX2 static uint64_t sum_avx2(const uint64_t *p, long n) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(p + i + 12)));
    }
    for (; i < n; i += 4) s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(p + i)));
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
    return t[0] + t[1] + t[2] + t[3];
}

static uint64_t sum_scalar(const uint64_t *p, long n) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (long i = 0; i < n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    return s0 + s1 + s2 + s3;
}

static void *reader(void *v) {
    reader_arg *a = (reader_arg *)v;
    int go;
    while ((go = atomic_load(a->go)) == 0) sched_yield();
    if (go < 0) return NULL;
    int avx2 = __builtin_cpu_supports("avx2");
    for (int k = 0; k < a->passes; k++) {
        pthread_barrier_wait(a->bar);
        double c0 = clock_s(CLOCK_THREAD_CPUTIME_ID), w0 = clock_s(CLOCK_MONOTONIC);
        uint64_t s = avx2 ? sum_avx2(a->p, a->words) : sum_scalar(a->p, a->words);
        a->cpu[k] = clock_s(CLOCK_THREAD_CPUTIME_ID) - c0;
        a->wall[k] = clock_s(CLOCK_MONOTONIC) - w0;
        a->sum += s;
    }
    return NULL;
}

uint64_t mt_read_bw(const void *buf, long bytes, int nth, int passes, double *cpu, double *wall) {
    if (nth < 1) nth = 1;
    if (nth > 256) nth = 256;
    long lines = bytes / 64, per = lines / nth;
    pthread_barrier_t bar;
    _Atomic int go = 0;
    reader_arg args[256];
    pthread_t th[256];
    for (int t = 0; t < nth; t++)
        args[t] = (reader_arg){(const uint64_t *)buf + (long)t * per * 8, per * 8, passes, cpu + (long)t * passes,
                               wall + (long)t * passes, &bar, &go, 0};
    int started = 1;
    while (started < nth && pthread_create(&th[started], NULL, reader, &args[started]) == 0) started++;
    if (started < nth) { /* a thread could not start: nothing measured (the caller sees sum 0) */
        atomic_store(&go, -1);
        for (int t = 1; t < started; t++) pthread_join(th[t], NULL);
        return 0;
    }
    pthread_barrier_init(&bar, NULL, (unsigned)nth);
    atomic_store(&go, 1);
    reader(&args[0]);
    uint64_t sum = args[0].sum;
    for (int t = 1; t < nth; t++) {
        pthread_join(th[t], NULL);
        sum += args[t].sum;
    }
    pthread_barrier_destroy(&bar);
    return sum;
}
