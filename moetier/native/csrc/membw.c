/* Memory read bandwidth for the planner's probe (planner/probe.py: measure_memory_bw).
 *
 * mt_read_bw(buf, words, nth, streams, passes, cpu, wall): nth threads (the caller and nth - 1
 * new ones) each read their own slice of buf's `words` 64-bit words `passes` times, every pass
 * started by all threads at once (a barrier). A slice is read as `streams` sequential streams
 * side by side (its lines cut into `streams` equal runs, one line of each per step; any words
 * past the last whole run read after), with the loads of the instruction set the weight kernels
 * run (mt_get_isa, which mt_set_isa / MOETIER_ISA force): 64-byte AVX-512 loads at avx512 and
 * avx512vnni, 32-byte AVX2 loads at avx2, 8-byte loads at scalar. The decode kernels' pattern:
 * weights read once, in order, by the kernels' loads, the hardware prefetcher ahead. Each pass is
 * timed in the reading thread's CPU time (cpu[t * passes + p]: time the OS gave other processes
 * does not count, as the kernel rates of native/rates.py) and in wall time (wall[...]).
 * Returns the sum (mod 2^64) of the buffer's words over every slice and pass (the caller checks
 * it: every word was read, whatever the size, thread count, streams or ISA). */
#include "mt.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define MT_READ_MAX_STREAMS 8

typedef struct {
    const uint64_t *p;
    long words;
    int streams, passes, isa;
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

/* Each sum_<isa>(p, n, streams): the sum of words [0, n) of p, read as `streams` runs of `run`
 * whole lines each (one line of every run per step, one accumulator per run), then the words
 * past the runs (sum_tail). */
static uint64_t sum_tail(const uint64_t *p, long from, long n) {
    uint64_t s = 0;
    for (long i = from; i < n; i++) s += p[i];
    return s;
}

static uint64_t sum_scalar(const uint64_t *p, long n, int streams) {
    long run = n / 8 / streams * 8; /* words per stream */
    uint64_t acc[MT_READ_MAX_STREAMS] = {0}, s = 0;
    for (long i = 0; i < run; i += 8)
        for (int k = 0; k < streams; k++) {
            const uint64_t *q = p + k * run + i;
            acc[k] += ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
        }
    for (int k = 0; k < streams; k++) s += acc[k];
    return s + sum_tail(p, streams * run, n);
}

MT_TARGET_AVX2 static uint64_t sum_avx2(const uint64_t *p, long n, int streams) {
    long run = n / 8 / streams * 8;
    __m256i acc[MT_READ_MAX_STREAMS];
    for (int k = 0; k < streams; k++) acc[k] = _mm256_setzero_si256();
    for (long i = 0; i < run; i += 8)
        for (int k = 0; k < streams; k++) {
            const __m256i *q = (const __m256i *)(p + k * run + i);
            acc[k] = _mm256_add_epi64(acc[k], _mm256_add_epi64(_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)));
        }
    __m256i a = _mm256_setzero_si256();
    for (int k = 0; k < streams; k++) a = _mm256_add_epi64(a, acc[k]);
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, a);
    return t[0] + t[1] + t[2] + t[3] + sum_tail(p, streams * run, n);
}

MT_TARGET_AVX512 static uint64_t sum_avx512(const uint64_t *p, long n, int streams) {
    long run = n / 8 / streams * 8;
    __m512i acc[MT_READ_MAX_STREAMS];
    for (int k = 0; k < streams; k++) acc[k] = _mm512_setzero_si512();
    for (long i = 0; i < run; i += 8)
        for (int k = 0; k < streams; k++) acc[k] = _mm512_add_epi64(acc[k], _mm512_loadu_si512(p + k * run + i));
    __m512i a = _mm512_setzero_si512();
    for (int k = 0; k < streams; k++) a = _mm512_add_epi64(a, acc[k]);
    return (uint64_t)_mm512_reduce_add_epi64(a) + sum_tail(p, streams * run, n);
}

/* the stream count as a constant in each call, so the compiler unrolls the inner loop */
static uint64_t sum_words(const uint64_t *p, long n, int streams, int isa) {
#define MT_READ_CASES(fn)                                                                                 \
    switch (streams) {                                                                                \
    case 1: return fn(p, n, 1);                                                                       \
    case 2: return fn(p, n, 2);                                                                       \
    case 4: return fn(p, n, 4);                                                                       \
    default: return fn(p, n, MT_READ_MAX_STREAMS);                                                    \
    }
    streams = streams >= 8 ? 8 : streams >= 4 ? 4 : streams >= 2 ? 2 : 1;
    if (isa >= MT_ISA_AVX512) MT_READ_CASES(sum_avx512)
    if (isa == MT_ISA_AVX2) MT_READ_CASES(sum_avx2)
    MT_READ_CASES(sum_scalar)
#undef MT_READ_CASES
}

static void *reader(void *v) {
    reader_arg *a = (reader_arg *)v;
    int go;
    while ((go = atomic_load(a->go)) == 0) sched_yield();
    if (go < 0) return NULL;
    for (int k = 0; k < a->passes; k++) {
        pthread_barrier_wait(a->bar);
        double c0 = clock_s(CLOCK_THREAD_CPUTIME_ID), w0 = clock_s(CLOCK_MONOTONIC);
        uint64_t s = sum_words(a->p, a->words, a->streams, a->isa);
        a->cpu[k] = clock_s(CLOCK_THREAD_CPUTIME_ID) - c0;
        a->wall[k] = clock_s(CLOCK_MONOTONIC) - w0;
        a->sum += s;
    }
    return NULL;
}

/* streams: 1, 2, 4 or 8 (others round down to one of them). Thread t's slice: whole lines,
 * the last thread's also the words past them. */
uint64_t mt_read_bw(const void *buf, long words, int nth, int streams, int passes, double *cpu, double *wall) {
    if (nth < 1) nth = 1;
    if (nth > 256) nth = 256;
    long per = words / 8 / nth * 8;
    int isa = mt_get_isa();
    pthread_barrier_t bar;
    _Atomic int go = 0;
    reader_arg args[256];
    pthread_t th[256];
    for (int t = 0; t < nth; t++)
        args[t] = (reader_arg){(const uint64_t *)buf + (long)t * per, t == nth - 1 ? words - (long)t * per : per,
                               streams, passes, isa, cpu + (long)t * passes, wall + (long)t * passes, &bar, &go, 0};
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
