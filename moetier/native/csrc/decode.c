/* moetier native decode kernels: one token of one sequence through the generic decoder.
 *
 * Called from Python through ctypes (moetier/native/decode.py). Activations are float32;
 * weights are float32 or bfloat16 (one dtype per model, `wdt`); the KV cache keeps the
 * model dtype so the torch prefill path and this decode path share it.
 *
 * Determinism: every output element is produced by exactly one thread with a fixed
 * summation order, so results do not depend on the thread count or on where the weights
 * live (RAM, cache slot, prefetch slot): tiered runs are bit-identical to in-RAM runs.
 *
 * Threads: OpenMP parallel regions on torch's own libgomp pool (see parallel_run).
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MT_AVX512 1
#endif

typedef uint16_t bf16;
enum { DT_F32 = 0, DT_BF16 = 1 };

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even, like torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float ld(const void *p, int dt, long i) {
    return dt == DT_BF16 ? bf16_to_f32(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

/* ------------------------------------------------------------------------------------ */
/* parallel regions                                                                      */

/* OpenMP, resolved at load time to the libgomp torch already loaded (same soname), so the
 * native kernels and torch share ONE pool of worker threads. A separate pool measured 2x
 * slower decode right after a torch prefill: torch's workers spin-wait for a few ms after
 * each parallel op and took the core from ours. After a fork() the child runs serially
 * (libgomp's pool does not survive fork; results do not depend on the thread count). */
typedef void (*task_fn)(void *ctx, int tid, int nth);

static pid_t pool_pid = 0;

static void parallel_run(task_fn fn, void *ctx, int nth) {
    if (nth > 1) {
        pid_t me = getpid();
        if (pool_pid == 0) pool_pid = me;
        if (pool_pid != me) nth = 1;
    }
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
#pragma omp parallel num_threads(nth)
    fn(ctx, omp_get_thread_num(), omp_get_num_threads());
}

/* ------------------------------------------------------------------------------------ */
/* matrix-vector products                                                               */

/* y[r] = W[r, :] . x  (+ b[r]) for rows [r0, r1); W row-major [rows, cols]. */
#ifdef MT_AVX512
static inline __m512 ld16(const void *p, int dt, long i, __mmask16 m) {
    if (dt == DT_BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const bf16 *)p + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}
#endif

#ifdef MT_AVX512
/* bf16 rows: 32 weights per step read as 16 dwords; the low halves are the even columns
 * (dword << 16), the high halves the odd ones (dword & 0xffff0000), multiplied by x split
 * into even (xe) and odd (xo) columns. xe/xo are zero-padded to a multiple of 16. */
static void gemv_rows_bf16(const bf16 *W, const float *xe, const float *xo, float *y, long cols, long r0, long r1) {
    const __m512i hi_mask = _mm512_set1_epi32((int)0xffff0000u);
    long cfull = cols & ~31L;
    long rem = cols - cfull;
    __mmask32 tail = rem ? (__mmask32)((1ull << rem) - 1) : 0;
    long r = r0;
#define MT_BF16_STEP(acc_e, acc_o, row, c, mask)                                                 \
    do {                                                                                         \
        __m512i w_ = (mask) == 0xffffffffu ? _mm512_loadu_si512((const void *)(W + (row) * cols + (c))) \
                                           : _mm512_maskz_loadu_epi16((mask), W + (row) * cols + (c)); \
        acc_e = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w_, 16)), xev, acc_e);     \
        acc_o = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w_, hi_mask)), xov, acc_o); \
    } while (0)
    /* one row at a time: the weights are read as one sequential stream (4 interleaved rows
     * measured half the bandwidth: 12 vs 24 GB/s on one Zen 4 core) */
    for (; r < r1; r++) {
        __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
        long c = 0;
        for (; c + 64 <= cfull; c += 64) {
            __m512 xev = _mm512_loadu_ps(xe + c / 2), xov = _mm512_loadu_ps(xo + c / 2);
            MT_BF16_STEP(e0, o0, r, c, 0xffffffffu);
            xev = _mm512_loadu_ps(xe + c / 2 + 16);
            xov = _mm512_loadu_ps(xo + c / 2 + 16);
            MT_BF16_STEP(e1, o1, r, c + 32, 0xffffffffu);
        }
        for (; c < cfull; c += 32) {
            __m512 xev = _mm512_loadu_ps(xe + c / 2), xov = _mm512_loadu_ps(xo + c / 2);
            MT_BF16_STEP(e0, o0, r, c, 0xffffffffu);
        }
        if (tail) {
            __m512 xev = _mm512_loadu_ps(xe + c / 2), xov = _mm512_loadu_ps(xo + c / 2);
            MT_BF16_STEP(e0, o0, r, c, tail);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(e0, o0), _mm512_add_ps(e1, o1)));
    }
#undef MT_BF16_STEP
}
#endif

/* y[r] = W[r, :] . x for rows [r0, r1); W row-major [rows, cols] in dtype dt.
 * xe/xo: x's even/odd columns (used by the AVX-512 bf16 kernel). */
static void gemv_rows(const void *W, int dt, const float *x, const float *xe, const float *xo, float *y, long cols,
                      long r0, long r1) {
    long r = r0;
#ifdef MT_AVX512
    if (dt == DT_BF16) {
        gemv_rows_bf16((const bf16 *)W, xe, xo, y, cols, r0, r1);
        return;
    }
    long cfull = cols & ~15L;
    __mmask16 tail = (__mmask16)((1u << (cols & 15)) - 1);
    for (; r < r1; r++) {
        const float *w = (const float *)W + r * cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        long c = 0;
        for (; c + 64 <= cfull; c += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), _mm512_loadu_ps(x + c + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 32), _mm512_loadu_ps(x + c + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 48), _mm512_loadu_ps(x + c + 48), a3);
        }
        for (; c < cfull; c += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a0);
        if (tail) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + c), _mm512_maskz_loadu_ps(tail, x + c), a1);
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
#else
    (void)xe;
    (void)xo;
    for (; r < r1; r++) {
        float acc[8] = {0};
        long c = 0;
        for (; c + 8 <= cols; c += 8)
            for (int j = 0; j < 8; j++) acc[j] += ld(W, dt, r * cols + c + j) * x[c + j];
        for (; c < cols; c++) acc[c & 7] += ld(W, dt, r * cols + c) * x[c];
        y[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
#endif
}

/* A batch of independent products run as one parallel region: the rows of all items are
 * concatenated and split into equal contiguous chunks (multiples of 4 rows). */
typedef struct {
    const void *W;
    const void *b; /* optional bias [rows], model dtype */
    const float *x;
    float *y;
    long rows, cols;
    const float *xe, *xo; /* x's even / odd columns, filled by run_gemvs */
} gemv_item;

typedef struct {
    const gemv_item *items;
    int n;
    int dt;
    long total;
} gemv_batch;

static void gemv_batch_task(void *vctx, int tid, int nth) {
    const gemv_batch *B = (const gemv_batch *)vctx;
    long per = (B->total + nth - 1) / nth;
    long lo = per * tid, hi = lo + per;
    if (hi > B->total) hi = B->total;
    long base = 0;
    for (int i = 0; i < B->n && lo < hi; i++) {
        const gemv_item *it = &B->items[i];
        long s = lo - base, e = hi - base;
        if (s < it->rows && e > 0) {
            if (s < 0) s = 0;
            if (e > it->rows) e = it->rows;
            gemv_rows(it->W, B->dt, it->x, it->xe, it->xo, it->y, it->cols, s, e);
            if (it->b)
                for (long r = s; r < e; r++) it->y[r] += ld(it->b, B->dt, r);
        }
        base += it->rows;
    }
}

#define PARALLEL_MIN_ELEMS (48L * 1024)

/* split buffer for x's even/odd columns (caller thread only) */
static float *split_buf = NULL;
static long split_len = 0;

static void run_gemvs(gemv_item *items, int n, int dt, int nth) {
    gemv_batch B = {items, n, dt, 0};
    if (dt == DT_BF16) {
        long need = 0;
        for (int i = 0; i < n; i++) need += 2 * ((items[i].cols / 2 + 16 + 15) & ~15L);
        if (need > split_len) {
            free(split_buf);
            split_buf = (float *)aligned_alloc(64, need * 4);
            split_len = split_buf ? need : 0;
            if (!split_buf) abort();
        }
        float *p = split_buf;
        for (int i = 0; i < n; i++) {
            if (i > 0 && items[i].x == items[i - 1].x && items[i].cols == items[i - 1].cols) {
                items[i].xe = items[i - 1].xe;
                items[i].xo = items[i - 1].xo;
                continue;
            }
            long half = (items[i].cols / 2 + 16 + 15) & ~15L, cols = items[i].cols;
            float *xe = p, *xo = p + half;
            for (long j = 0; j < half; j++) {
                xe[j] = 2 * j < cols ? items[i].x[2 * j] : 0.0f;
                xo[j] = 2 * j + 1 < cols ? items[i].x[2 * j + 1] : 0.0f;
            }
            items[i].xe = xe;
            items[i].xo = xo;
            p += 2 * half;
        }
    }
    long elems = 0;
    for (int i = 0; i < n; i++) {
        B.total += items[i].rows;
        elems += items[i].rows * items[i].cols;
    }
    parallel_run(gemv_batch_task, &B, elems < PARALLEL_MIN_ELEMS ? 1 : nth);
}

/* ------------------------------------------------------------------------------------ */
/* small ops (caller thread)                                                             */

static void rms_norm(const float *x, const void *w, int dt, float eps, float *out, long n) {
    double ss = 0.0;
    for (long i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (long i = 0; i < n; i++) out[i] = ld(w, dt, i) * (x[i] * inv);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* rotate-half rope on one head vector v [D] with cos/sin [D] */
static void rope(float *v, const float *cs, const float *sn, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i + h] + a * sn[i + h];
    }
}

/* ------------------------------------------------------------------------------------ */
/* the layer description (mirrors moetier/native/decode.py: LayerDesc)                   */

typedef struct {
    /* attention */
    long H, nh, nkv, D;
    int qk_norm; /* 0 none, 1 per head, 2 full width */
    int window;  /* 0 = none, else attend to the last `window` positions */
    float eps, scale;
    const void *ln1, *qkv_w, *qkv_b, *q_norm, *k_norm, *o_w, *o_b, *ln2;
    /* feed-forward */
    int mlp; /* 0 dense gated MLP, 1 MoE */
    long E, topk, I;
    int norm_topk;
    float route_scale;
    const void *router_w, *router_b;
    long SI; /* dense or shared-expert intermediate size (0 = none) */
    const void *s_gate, *s_up, *s_down, *s_gate_gate; /* shared/dense MLP; sigmoid gate [1, H] */
} layer_desc;

typedef struct scratch scratch;
void mt_scratch_free(scratch *s);
struct scratch {
    long n_scores; /* floats in `scores` */
    float *h, *qkv, *attn, *ao, *gu, *act, *down, *sh, *sg, *scores, *rlog;
};

/* gu_len: floats for all gate_up outputs of one layer (k * 2I + 2 SI, or 2 * dense inter);
 * n_down: most expert outputs of one layer (top-k). Returns NULL when out of memory. */
scratch *mt_scratch_new(long H, long qkv_rows, long attn_dim, long gu_len, long n_down, long E) {
    scratch *s = (scratch *)calloc(1, sizeof(scratch));
    if (!s) return NULL;
    s->h = (float *)calloc(H, 4);
    s->qkv = (float *)calloc(qkv_rows, 4);
    s->attn = (float *)calloc(attn_dim, 4);
    s->ao = (float *)calloc(H, 4);
    s->gu = (float *)calloc(gu_len, 4);
    s->act = (float *)calloc(gu_len, 4);
    s->down = (float *)calloc(H * (n_down > 0 ? n_down : 1), 4);
    s->sh = (float *)calloc(H, 4);
    s->sg = (float *)calloc(16, 4);
    s->rlog = (float *)calloc(E > 0 ? E : 1, 4);
    if (!s->h || !s->qkv || !s->attn || !s->ao || !s->gu || !s->act || !s->down || !s->sh || !s->sg || !s->rlog) {
        mt_scratch_free(s);
        return NULL;
    }
    return s;
}

static int ensure_scores(scratch *S, long cap, int nth) {
    long need = (cap > 0 ? cap : 1) * (long)nth;
    if (S->n_scores >= need) return 0;
    float *p = (float *)realloc(S->scores, need * 4);
    if (!p) return -1;
    S->scores = p;
    S->n_scores = need;
    return 0;
}

void mt_scratch_free(scratch *s) {
    if (!s) return;
    free(s->h); free(s->qkv); free(s->attn); free(s->ao); free(s->gu); free(s->act);
    free(s->down); free(s->sh); free(s->sg); free(s->scores); free(s->rlog);
    free(s);
}

/* attention over the cache for all heads: parallel over query heads */
typedef struct {
    const layer_desc *L;
    const float *q;
    const void *K, *V;
    int kvdt;
    long cap, t0, t1;
    float *out, *scores;
} attn_ctx;

static void attn_task(void *vctx, int tid, int nth) {
    const attn_ctx *A = (const attn_ctx *)vctx;
    const layer_desc *L = A->L;
    long D = L->D, nh = L->nh, group = L->nh / L->nkv, n = A->t1 - A->t0;
    long h0 = nh * tid / nth, h1 = nh * (tid + 1) / nth;
    float *sc = A->scores + (long)tid * (A->cap > 0 ? A->cap : 1);
    for (long h = h0; h < h1; h++) {
        long kv = h / group;
        const float *q = A->q + h * D;
        float mx = -INFINITY;
        for (long t = 0; t < n; t++) {
            long row = (kv * A->cap + A->t0 + t) * D;
            float s = 0.0f;
#ifdef MT_AVX512
            __m512 acc = _mm512_setzero_ps();
            long d = 0;
            for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(ld16(A->K, A->kvdt, row + d, 0xffff), _mm512_loadu_ps(q + d), acc);
            if (d < D) {
                __mmask16 m = (__mmask16)((1u << (D - d)) - 1);
                acc = _mm512_fmadd_ps(ld16(A->K, A->kvdt, row + d, m), _mm512_maskz_loadu_ps(m, q + d), acc);
            }
            s = _mm512_reduce_add_ps(acc);
#else
            for (long d = 0; d < D; d++) s += ld(A->K, A->kvdt, row + d) * q[d];
#endif
            s *= L->scale;
            sc[t] = s;
            if (s > mx) mx = s;
        }
        float sum = 0.0f;
        for (long t = 0; t < n; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        float inv = 1.0f / sum;
        float *o = A->out + h * D;
        for (long d = 0; d < D; d++) o[d] = 0.0f;
        for (long t = 0; t < n; t++) {
            float p = sc[t] * inv;
            long row = (kv * A->cap + A->t0 + t) * D;
            for (long d = 0; d < D; d++) o[d] += p * ld(A->V, A->kvdt, row + d);
        }
    }
}

/* x += o_proj(attn(norm1(x))); h = norm2(x); writes k, v of position `pos` into the cache.
 * K, V: [nkv, cap, D] in the model dtype; cs/sn: rope cos/sin [D] (float32) for `pos`. */
int mt_attention(const layer_desc *L, scratch *S, int dt, float *x, void *K, void *V, long cap, long pos,
                  const float *cs, const float *sn, int nth) {
    long H = L->H, nh = L->nh, nkv = L->nkv, D = L->D;
    long qrows = (nh + 2 * nkv) * D;
    rms_norm(x, L->ln1, dt, L->eps, S->h, H);
    gemv_item it = {L->qkv_w, L->qkv_b, S->h, S->qkv, qrows, H, NULL, NULL};
    run_gemvs(&it, 1, dt, nth);
    float *q = S->qkv, *k = S->qkv + nh * D, *v = S->qkv + (nh + nkv) * D;
    if (L->qk_norm == 1) {
        for (long i = 0; i < nh; i++) rms_norm(q + i * D, L->q_norm, dt, L->eps, q + i * D, D);
        for (long i = 0; i < nkv; i++) rms_norm(k + i * D, L->k_norm, dt, L->eps, k + i * D, D);
    } else if (L->qk_norm == 2) {
        rms_norm(q, L->q_norm, dt, L->eps, q, nh * D);
        rms_norm(k, L->k_norm, dt, L->eps, k, nkv * D);
    }
    for (long i = 0; i < nh; i++) rope(q + i * D, cs, sn, D);
    for (long i = 0; i < nkv; i++) rope(k + i * D, cs, sn, D);
    for (long i = 0; i < nkv; i++) {
        long row = (i * cap + pos) * D;
        if (dt == DT_BF16) {
            for (long d = 0; d < D; d++) {
                ((bf16 *)K)[row + d] = f32_to_bf16(k[i * D + d]);
                ((bf16 *)V)[row + d] = f32_to_bf16(v[i * D + d]);
            }
        } else {
            memcpy((float *)K + row, k + i * D, D * 4);
            memcpy((float *)V + row, v + i * D, D * 4);
        }
    }
    long t0 = 0;
    if (L->window > 0 && pos + 1 > L->window) t0 = pos + 1 - L->window;
    attn_ctx A = {L, q, K, V, dt, cap, t0, pos + 1, S->attn, S->scores};
    long work = (pos + 1 - t0) * nh * D;
    int ath = work < PARALLEL_MIN_ELEMS ? 1 : nth;
    if (ensure_scores(S, cap, ath)) return -1;
    A.scores = S->scores;
    parallel_run(attn_task, &A, ath);
    gemv_item o = {L->o_w, L->o_b, S->attn, S->ao, H, nh * D, NULL, NULL};
    run_gemvs(&o, 1, dt, nth);
    for (long i = 0; i < H; i++) x[i] += S->ao[i];
    rms_norm(x, L->ln2, dt, L->eps, S->h, H);
    return 0;
}

/* softmax top-k router on S->h: ids (descending weight, ties to the lower id), weights */
void mt_route(const layer_desc *L, scratch *S, int dt, int64_t *ids, float *w, int nth) {
    long E = L->E, k = L->topk;
    gemv_item it = {L->router_w, L->router_b, S->h, S->rlog, E, L->H, NULL, NULL};
    run_gemvs(&it, 1, dt, nth);
    float mx = -INFINITY, sum = 0.0f;
    for (long e = 0; e < E; e++)
        if (S->rlog[e] > mx) mx = S->rlog[e];
    for (long e = 0; e < E; e++) {
        S->rlog[e] = expf(S->rlog[e] - mx);
        sum += S->rlog[e];
    }
    for (long e = 0; e < E; e++) S->rlog[e] /= sum;
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || S->rlog[e] > S->rlog[best])) best = e;
        }
        ids[j] = best;
        w[j] = S->rlog[best];
    }
    if (L->norm_topk) {
        float s = 0.0f;
        for (long j = 0; j < k; j++) s += w[j];
        for (long j = 0; j < k; j++) w[j] /= s;
    }
    if (L->route_scale != 1.0f)
        for (long j = 0; j < k; j++) w[j] *= L->route_scale;
}

/* x += sum_j w[j] * expert_j(h), then (if `shared`) x += the shared expert (optionally
 * sigmoid-gated) or the dense MLP; h = S->h. gu[j]: expert j's gate_up [2I, H]; dn[j]: its
 * down [H, I]; n <= 64. The additions into x happen in the order j = 0..n-1, then shared,
 * so calling this once per expert (n = 1) and then with n = 0 gives the same bits as one
 * call with all experts (for providers whose weights are valid only until the next get). */
void mt_moe(const layer_desc *L, scratch *S, int dt, float *x, int n, const void *const *gu,
            const void *const *dn, const float *w, int shared, int nth) {
    long H = L->H, I = L->I, SI = shared ? L->SI : 0;
    gemv_item items[68];
    int m = 0;
    memset(items, 0, sizeof(items));
    for (int j = 0; j < n; j++) items[m++] = (gemv_item){gu[j], NULL, S->h, S->gu + j * 2 * I, 2 * I, H, NULL, NULL};
    if (SI) {
        items[m++] = (gemv_item){L->s_gate, NULL, S->h, S->gu + n * 2 * I, SI, H, NULL, NULL};
        items[m++] = (gemv_item){L->s_up, NULL, S->h, S->gu + n * 2 * I + SI, SI, H, NULL, NULL};
        if (L->s_gate_gate) items[m++] = (gemv_item){L->s_gate_gate, NULL, S->h, S->sg, 1, H, NULL, NULL};
    }
    if (m == 0) return;
    run_gemvs(items, m, dt, nth);
    for (int j = 0; j < n; j++) {
        const float *g = S->gu + j * 2 * I, *u = g + I;
        float *a = S->act + j * I;
        for (long i = 0; i < I; i++) a[i] = silu(g[i]) * u[i];
    }
    if (SI) {
        const float *g = S->gu + n * 2 * I, *u = g + SI;
        float *a = S->act + n * I;
        for (long i = 0; i < SI; i++) a[i] = silu(g[i]) * u[i];
    }
    m = 0;
    for (int j = 0; j < n; j++) items[m++] = (gemv_item){dn[j], NULL, S->act + j * I, S->down + j * H, H, I, NULL, NULL};
    if (SI) items[m++] = (gemv_item){L->s_down, NULL, S->act + n * I, S->sh, H, SI, NULL, NULL};
    run_gemvs(items, m, dt, nth);
    for (int j = 0; j < n; j++) {
        const float *d = S->down + j * H;
        float wj = w[j];
        for (long i = 0; i < H; i++) x[i] += wj * d[i];
    }
    if (SI) {
        float gate = L->s_gate_gate ? 1.0f / (1.0f + expf(-S->sg[0])) : 1.0f;
        for (long i = 0; i < H; i++) x[i] += gate * S->sh[i];
    }
}

/* dense gated MLP: x += down(silu(gate(h)) * up(h)) with the layer's s_* weights */
void mt_dense_mlp(const layer_desc *L, scratch *S, int dt, float *x, int nth) {
    mt_moe(L, S, dt, x, 0, NULL, NULL, NULL, 1, nth);
}

/* logits [V] = out_w . norm(x) */
void mt_head(const void *norm_w, const void *out_w, long V, long H, float eps, int dt, scratch *S, const float *x,
             float *logits, int nth) {
    rms_norm(x, norm_w, dt, eps, S->h, H);
    gemv_item it = {out_w, NULL, S->h, logits, V, H, NULL, NULL};
    run_gemvs(&it, 1, dt, nth);
}

void mt_embed(const void *table, long H, long token, int dt, float *x) {
    for (long i = 0; i < H; i++) x[i] = ld(table, dt, token * H + i);
}

/* test hook: y = W x for rows [0, rows) with nth threads */
void mt_gemv(const void *W, const void *b, int dt, const float *x, float *y, long rows, long cols, int nth) {
    gemv_item it = {W, b, x, y, rows, cols, NULL, NULL};
    run_gemvs(&it, 1, dt, nth);
}

/* Every layer of one decode step in one call, for providers whose experts all stay in RAM
 * (a table of gate_up / down pointers per layer and expert, [n_layers * E_max], NULL for
 * dense layers). The same per-layer functions as the Python-driven path, in the same order,
 * so the result is bit-identical to it. K[i], V[i]: layer i's cache buffers; cap[i] their
 * capacity. ids_out [n_layers * 64]: each MoE layer's chosen experts (for the caller's
 * bookkeeping). Returns 0, or -1 - i when layer i could not allocate attention scratch. */
int mt_layers(const layer_desc *const *L, int n_layers, scratch *S, int dt, float *x, void *const *K,
              void *const *V, const long *cap, long pos, const float *cs, const float *sn,
              const void *const *gu_table, const void *const *dn_table, long e_max, int64_t *ids_out, int nth) {
    const void *gu[64], *dn[64];
    float w[64];
    for (int i = 0; i < n_layers; i++) {
        const layer_desc *d = L[i];
        if (mt_attention(d, S, dt, x, K[i], V[i], cap[i], pos, cs, sn, nth)) return -1 - i;
        if (d->mlp == 0) {
            mt_dense_mlp(d, S, dt, x, nth);
            continue;
        }
        int64_t *ids = ids_out + (long)i * 64;
        mt_route(d, S, dt, ids, w, nth);
        for (long j = 0; j < d->topk; j++) {
            gu[j] = gu_table[(long)i * e_max + ids[j]];
            dn[j] = dn_table[(long)i * e_max + ids[j]];
        }
        mt_moe(d, S, dt, x, (int)d->topk, gu, dn, w, 1, nth);
    }
    return 0;
}
