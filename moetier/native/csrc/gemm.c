/* The multi-token product engine (many.h: mt_run_gemms): the row kernels of gemv.c applied to
 * T activation rows per weight-row block, so each weight block is read from memory once per
 * call (per token block) instead of once per token. */
#include "many.h"

#include <stdio.h>

#define L1_BYTES (32L * 1024)     /* L1 data cache per core (Zen 4; Intel cores since Ice Lake have 48 KB) */
#define BLOCK_BYTES (16L * 1024) /* weight bytes per row block: stays in L1 across the tokens */
#define TOKEN_BLOCK 128          /* at most this many tokens per pass over a thread's row blocks */
/* Bytes of the tokens' activation rows (x and prepared x) one pass keeps in L2 while the row
 * blocks stream by: wide rows (a dense MLP's down projection, 10944 columns = 43 KB per token)
 * take fewer tokens per pass, so x stays in L2 instead of being re-read from L3 for every row
 * block. Each weight is read once per pass (from memory when it exceeds the caches). */
#define X_BLOCK_BYTES (384L * 1024)
/* rows per call of a quantized tile: a multiple of the 2-row q8_0 / q5_0 tiles and of the 16 rows
 * the VNNI tiles reduce together (simd.h: row_sums; called with 2 rows they paid a 16-row
 * reduction per pair: embedded Q4_K_M prefill ran at 0.4x), small enough that the prefetch of
 * the next unit stays spread over the pass */
#define QTILE_ROWS 16L

typedef struct {
    const mt_gemm_item *items;
    int n;
    long *unit_item, *unit_r0, *unit_r1; /* units: (item, rows [r0, r1)) */
    long n_units;
    double *cum; /* cost prefix sums over units (n_units + 1) */
    long tblock; /* tokens per pass (token_block) */
} gemm_batch;

/* ------------------------------------------------------------------------------------ */
/* register tiles of the float formats (quantized formats keep theirs next to their row kernels:
 * mt_fmt.tiles, 1 row x up to MT_TILE_T tokens, run first in run_unit): 2 weight rows x 2
 * or 3 tokens, each (row, token) summed exactly as the format's row kernel for this ISA sums it
 * (same accumulators, same column order, same final adds), so a tile gives the row kernel's
 * bits while reading each weight vector and each x vector once for two products. Keep in sync
 * with fmt_bf16.c / fmt_f32.c: rows_avx512 (tests/native/test_prefill.py checks the bits
 * against the row kernel for awkward shapes). */

#include <immintrin.h>

typedef void (*tile_fn)(const mt_weight *W, const float *const *p, float *const *y, int n, long r);

#define MT_INLINE static inline __attribute__((always_inline))
/* the token loops fully unrolled so the accumulator arrays live in registers (2 x 3 x 4 of the
 * 32 zmm; without the pragma GCC keeps them on the stack) */
#define FOR_T _Pragma("GCC unroll 3") for (int j = 0; j < NT; j++)

/* bfloat16, NT tokens: per (row, token) the accumulators e0 o0 e1 o1 of rows_avx512 (even /
 * odd columns, 64-column steps alternating sets 0 and 1; the 32-column rest and the masked tail
 * into set 0), combined as (e0 + o0) + (e1 + o1) */
MT_INLINE void bf16_tile_nt(const mt_weight *W, const float *const *p, float *const *y, long r, const int NT) {
    const __m512i himask = _mm512_set1_epi32((int)0xffff0000u);
    long cols = W->cols, cfull = cols & ~31L, rem = cols - cfull, half = mt_evenodd_half(cols);
    __mmask32 tail = rem ? (__mmask32)((1ull << rem) - 1) : 0;
    const bf16 *wa = (const bf16 *)mt_row(W, r), *wb = (const bf16 *)mt_row(W, r + 1);
    __m512 A[3][4], Bv[3][4]; /* [token][e0 o0 e1 o1] of rows a, b */
    FOR_T _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) A[j][k] = Bv[j][k] = _mm512_setzero_ps();
#define BF16_TCHUNK(k, c, mask)                                                                          \
    do {                                                                                                \
        __m512i va = (mask) == 0xffffffffu ? _mm512_loadu_si512((const void *)(wa + (c)))               \
                                           : _mm512_maskz_loadu_epi16((mask), wa + (c));               \
        __m512i vb = (mask) == 0xffffffffu ? _mm512_loadu_si512((const void *)(wb + (c)))               \
                                           : _mm512_maskz_loadu_epi16((mask), wb + (c));               \
        __m512 alo = _mm512_castsi512_ps(_mm512_slli_epi32(va, 16));                                    \
        __m512 ahi = _mm512_castsi512_ps(_mm512_and_si512(va, himask));                                 \
        __m512 blo = _mm512_castsi512_ps(_mm512_slli_epi32(vb, 16));                                    \
        __m512 bhi = _mm512_castsi512_ps(_mm512_and_si512(vb, himask));                                 \
        FOR_T {                                                                                         \
            __m512 xe = _mm512_loadu_ps(p[j] + (c) / 2), xo = _mm512_loadu_ps(p[j] + half + (c) / 2);   \
            A[j][2 * (k)] = _mm512_fmadd_ps(alo, xe, A[j][2 * (k)]);                                    \
            A[j][2 * (k) + 1] = _mm512_fmadd_ps(ahi, xo, A[j][2 * (k) + 1]);                            \
            Bv[j][2 * (k)] = _mm512_fmadd_ps(blo, xe, Bv[j][2 * (k)]);                                  \
            Bv[j][2 * (k) + 1] = _mm512_fmadd_ps(bhi, xo, Bv[j][2 * (k) + 1]);                          \
        }                                                                                               \
    } while (0)
    long c = 0;
    for (; c + 64 <= cfull; c += 64) {
        BF16_TCHUNK(0, c, 0xffffffffu);
        BF16_TCHUNK(1, c + 32, 0xffffffffu);
    }
    for (; c < cfull; c += 32) BF16_TCHUNK(0, c, 0xffffffffu);
    if (tail) BF16_TCHUNK(0, c, tail);
#undef BF16_TCHUNK
    FOR_T {
        y[j][r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(A[j][0], A[j][1]), _mm512_add_ps(A[j][2], A[j][3])));
        y[j][r + 1] =
            _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(Bv[j][0], Bv[j][1]), _mm512_add_ps(Bv[j][2], Bv[j][3])));
    }
}

/* float32, NT tokens: mirrors fmt_f32.c: rows_avx512 (a0..a3 over 64-column steps, 16-column
 * steps into a0, the masked tail into a1, then (a0 + a1) + (a2 + a3)) */
MT_INLINE void f32_tile_nt(const mt_weight *W, const float *const *p, float *const *y, long r, const int NT) {
    long cols = W->cols, cfull = cols & ~15L;
    __mmask16 tail = (__mmask16)((1u << (cols & 15)) - 1), all = (__mmask16)0xffff;
    const float *wa = (const float *)mt_row(W, r), *wb = (const float *)mt_row(W, r + 1);
    __m512 A[3][4], Bv[3][4];
    FOR_T _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) A[j][k] = Bv[j][k] = _mm512_setzero_ps();
#define F32_TCHUNK(k, c, m)                                                                              \
    do {                                                                                                \
        __m512 va = _mm512_maskz_loadu_ps((m), wa + (c)), vb = _mm512_maskz_loadu_ps((m), wb + (c));     \
        FOR_T {                                                                                         \
            __m512 xv = _mm512_maskz_loadu_ps((m), p[j] + (c));                                         \
            A[j][k] = _mm512_fmadd_ps(va, xv, A[j][k]);                                                 \
            Bv[j][k] = _mm512_fmadd_ps(vb, xv, Bv[j][k]);                                               \
        }                                                                                               \
    } while (0)
    long c = 0;
    for (; c + 64 <= cfull; c += 64) {
        F32_TCHUNK(0, c, all);
        F32_TCHUNK(1, c + 16, all);
        F32_TCHUNK(2, c + 32, all);
        F32_TCHUNK(3, c + 48, all);
    }
    for (; c < cfull; c += 16) F32_TCHUNK(0, c, all);
    if (cols & 15) F32_TCHUNK(1, c, tail);
#undef F32_TCHUNK
    FOR_T {
        y[j][r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(A[j][0], A[j][1]), _mm512_add_ps(A[j][2], A[j][3])));
        y[j][r + 1] =
            _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(Bv[j][0], Bv[j][1]), _mm512_add_ps(Bv[j][2], Bv[j][3])));
    }
}

/* 2 weight rows x n (2 or 3) tokens */
MT_TARGET_AVX512 static void bf16_tile_avx512(const mt_weight *W, const float *const *p, float *const *y, int n,
                                              long r) {
    if (n == 3)
        bf16_tile_nt(W, p, y, r, 3);
    else
        bf16_tile_nt(W, p, y, r, 2);
}

MT_TARGET_AVX512 static void f32_tile_avx512(const mt_weight *W, const float *const *p, float *const *y, int n,
                                             long r) {
    if (n == 3)
        f32_tile_nt(W, p, y, r, 3);
    else
        f32_tile_nt(W, p, y, r, 2);
}

/* the tile kernel of a format for an ISA (NULL: none; the row kernel runs per token) */
static tile_fn tile_for(int fmt, int isa) {
    if (isa != MT_ISA_AVX512) return NULL;
    int dt = mt_plain_dt(fmt);
    return dt == DT_BF16 ? bf16_tile_avx512 : dt == DT_F32 ? f32_tile_avx512 : NULL;
}

/* software prefetch of the next unit's weights, spread over this unit's tile calls: a unit's
 * rows are a short stream the hardware prefetcher picks up late, and its first pass over them
 * waits on memory while the later passes compute from L1; this overlaps the two */
typedef struct {
    const char *p, *end; /* lines still to prefetch */
    long per_call;       /* lines per tile call */
    int l2;              /* prefetch into L2 (else L1) */
} prefetch_run;

static inline void prefetch_step(prefetch_run *pf) {
    if (pf->l2)
        for (long i = 0; i < pf->per_call && pf->p < pf->end; i++, pf->p += 64) _mm_prefetch(pf->p, _MM_HINT_T1);
    else
        for (long i = 0; i < pf->per_call && pf->p < pf->end; i++, pf->p += 64) _mm_prefetch(pf->p, _MM_HINT_T0);
}

/* How run_unit drives a format's own tile (mt_fmt.tiles; once per item in mt_run_gemms). bf16's (avx512bf16, 2 rows x up to
 * MT_TILE_T_BF16 tokens) differs from the quantized ones (1 row x up to MT_TILE_T tokens, called
 * QTILE_ROWS rows at a time), measured on the DeepSeek-V2-Lite-shaped bf16 prefill, 1 thread:
 * - called per row pair, so the next unit's prefetch is spread in small steps between calls: in
 *   one burst per pass it stalled the core on full miss queues (64 tokens ~1.1x);
 * - up to 6 tokens where their x fits L1 with the rows: an expert's ~6 tokens of a 64-token
 *   prompt in one pass over its rows instead of 3 + 3 (DeepSeek-V2-Lite's down projection);
 * - the next unit prefetched into L2, not L1: the tokens' prepared x and the unit's rows fill L1
 *   (64 tokens 150-160 -> 194 tok/s, 512 tokens 179-190 -> 231-234 when it came);
 * - it reads only the prepared bf16 pairs, not x itself (tokens per pass: X_BLOCK_BYTES). */
_Static_assert(MT_TILE_T_BF16 >= MT_TILE_T, "run_unit's token arrays hold the larger tile");
static mt_tile_use tile_use_of(const mt_weight *W) {
    if (W->fmt == MT_FMT_BF16) {
        /* as many tokens (4 to 6) as keep the pass's x and the 2 rows (2 bytes per column each)
         * within 3/4 of L1: mt_gemm of 1408 x 2048 at 6 tokens ran 0.8x of 3 + 3 (32 KB: all of
         * L1), 2048 x 1408 1.3x (22.5 KB), 4096 x 2560 0.64x; 2048 x 10944 at 128 tokens 0.88x of 4 */
        long t = L1_BYTES * 3 / 4 / (2 * (W->cols > 0 ? W->cols : 1)) - 2;
        return (mt_tile_use){2, t < MT_TILE_T ? MT_TILE_T : t > MT_TILE_T_BF16 ? MT_TILE_T_BF16 : t, 1, 1};
    }
    return (mt_tile_use){QTILE_ROWS, MT_TILE_T, 0, 0};
}

static void run_unit(const mt_gemm_item *it, long r0, long r1, long t0, long t1, const char *next, long next_bytes) {
    if (it->qtile && t0 + 1 < t1) { /* the format's tile: passes of up to qu.tokens tokens, qu.rows rows per call */
        /* the tokens in passes of equal size (4-token tiles: 6 as 3 + 3, 5 as 3 + 2, not 4 + 2 / 4 + 1) */
        long passes = (t1 - t0 + it->qu.tokens - 1) / it->qu.tokens, calls = passes * ((r1 - r0 + it->qu.rows - 1) / it->qu.rows);
        prefetch_run pf = {next, next + (next ? next_bytes : 0), calls ? ((next_bytes + 63) / 64 + calls - 1) / calls : 0,
                           it->qu.pf_l2};
        for (; t0 < t1; passes--) {
            int n = (int)((t1 - t0 + passes - 1) / passes);
            const float *x[MT_TILE_T_BF16], *xp[MT_TILE_T_BF16];
            float *y[MT_TILE_T_BF16];
            for (int j = 0; j < n; j++) {
                x[j] = it->X + (it->idx ? it->idx[t0 + j] : t0 + j) * it->ldx;
                xp[j] = it->XP ? it->XP + (t0 + j) * it->ldxp : NULL;
                y[j] = it->Y + (t0 + j) * it->ldy;
            }
            for (long r = r0; r < r1; r += it->qu.rows) {
                it->qtile(it->W, x, xp, y, n, r, r + it->qu.rows < r1 ? r + it->qu.rows : r1);
                prefetch_step(&pf);
            }
            if (it->b)
                for (int j = 0; j < n; j++)
                    for (long q = r0; q < r1; q++) y[j][q] += ld(it->b, it->bdt, q);
            t0 += n;
        }
    }
    if (it->tile) { /* on prepared rows when the format prepares x, else on x itself; 3 tokens a pass, then 2 */
        long calls = ((t1 - t0 + 2) / 3) * ((r1 - r0) / 2);
        prefetch_run pf = {next, next + (next ? next_bytes : 0), calls ? ((next_bytes + 63) / 64 + calls - 1) / calls : 0};
        while (t0 + 2 <= t1) {
            int n = t1 - t0 == 2 || t1 - t0 == 4 ? 2 : 3;
            const float *x[3], *p[3];
            float *y[3];
            for (int j = 0; j < n; j++) {
                x[j] = it->X + (it->idx ? it->idx[t0 + j] : t0 + j) * it->ldx;
                p[j] = it->XP ? it->XP + (t0 + j) * it->ldxp : x[j];
                y[j] = it->Y + (t0 + j) * it->ldy;
            }
            long r = r0;
            for (; r + 2 <= r1; r += 2) {
                it->tile(it->W, p, y, n, r);
                prefetch_step(&pf);
            }
            for (int j = 0; j < n; j++) {
                if (r < r1) it->fn(it->W, x[j], it->XP ? p[j] : NULL, y[j], r, r1);
                if (it->b)
                    for (long q = r0; q < r1; q++) y[j][q] += ld(it->b, it->bdt, q);
            }
            t0 += n;
        }
    }
    for (long t = t0; t < t1; t++) {
        const float *x = it->X + (it->idx ? it->idx[t] : t) * it->ldx;
        const float *xp = it->XP ? it->XP + t * it->ldxp : NULL;
        float *y = it->Y + t * it->ldy;
        it->fn(it->W, x, xp, y, r0, r1);
        if (it->b)
            for (long r = r0; r < r1; r++) y[r] += ld(it->b, it->bdt, r);
    }
}

static void gemm_task(void *vctx, int tid, int nth) {
    const gemm_batch *B = (const gemm_batch *)vctx;
    double total = B->cum[B->n_units];
    double lo = total * tid / nth, hi = total * (tid + 1) / nth;
    /* this thread's units: those whose cost midpoint falls in [lo, hi) */
    long u0 = 0, u1;
    while (u0 < B->n_units && (B->cum[u0] + B->cum[u0 + 1]) / 2 < lo) u0++;
    u1 = u0;
    while (u1 < B->n_units && ((B->cum[u1] + B->cum[u1 + 1]) / 2 < hi || tid == nth - 1)) u1++;
    long tmax = 0;
    for (long u = u0; u < u1; u++) {
        long T = B->items[B->unit_item[u]].T;
        if (T > tmax) tmax = T;
    }
    long TB = B->tblock;
    for (long tb = 0; tb < tmax; tb += TB)
        for (long u = u0; u < u1; u++) {
            const mt_gemm_item *it = &B->items[B->unit_item[u]];
            if (tb >= it->T) continue;
            long v = u + 1; /* the next unit this thread runs in this token block: its rows to prefetch */
            while (v < u1 && tb >= B->items[B->unit_item[v]].T) v++;
            const char *next = NULL;
            long next_bytes = 0;
            if (v < u1) {
                const mt_weight *W = B->items[B->unit_item[v]].W;
                next = (const char *)mt_row(W, B->unit_r0[v]);
                next_bytes = (B->unit_r1[v] - B->unit_r0[v]) * W->stride;
            }
            run_unit(it, B->unit_r0[u], B->unit_r1[u], tb, tb + TB < it->T ? tb + TB : it->T,
                     next, next_bytes);
        }
}

/* caller-thread buffers: prepared rows and the unit table */
static __thread float *prep_buf = NULL;
static __thread long prep_cap = 0;
static __thread long *unit_buf = NULL;
static __thread double *cum_buf = NULL;
static __thread long unit_cap = 0;

static long block_rows(const mt_weight *W) {
    long row_bytes = W->stride > 0 ? W->stride : 1;
    long rb = BLOCK_BYTES / row_bytes;
    rb &= ~1L; /* even: the 2-row tiles leave no row to the row kernel (2816-byte rows: 5 -> 4) */
    return rb < 4 ? 4 : rb > 64 ? 64 : rb;
}

void mt_run_gemms(mt_gemm_item *items, int n, int nth) {
    int isa = mt_get_isa();
    long need = 0, n_units = 0;
    double elems = 0;
    for (int i = 0; i < n; i++) {
        const mt_fmt *f = mt_fmt_lookup(items[i].W->fmt);
        if (!f) {
            fprintf(stderr, "moetier native: weight format %d has no kernel\n", items[i].W->fmt);
            abort();
        }
        int fi = mt_isa_of(f, isa); /* the ISA of this format's kernels: its row kernel, tile, prepared x */
        items[i].fn = f->rows[fi];
        items[i].tile = tile_for(f->code, fi);
        items[i].qtile = f->tiles[fi]; /* a tile mirrors the row kernel of its ISA */
        items[i].qu = tile_use_of(items[i].W);
        items[i].XP = NULL;
        items[i].ldxp = f->prep ? (f->prep_len(items[i].W->cols, fi) + 15) & ~15L : 0;
        need += items[i].ldxp * items[i].T;
        if (items[i].T > 0) {
            long rb = block_rows(items[i].W);
            n_units += (items[i].W->rows + rb - 1) / rb;
        }
        elems += (double)items[i].W->rows * items[i].W->cols * items[i].T;
    }
    if (need > prep_cap) {
        free(prep_buf);
        prep_buf = (float *)aligned_alloc(64, ((need * 4 + 63) / 64) * 64);
        prep_cap = prep_buf ? need : 0;
        if (!prep_buf) abort();
    }
    if (n_units + 1 > unit_cap) {
        free(unit_buf);
        free(cum_buf);
        unit_cap = 2 * (n_units + 1);
        unit_buf = (long *)malloc(3 * unit_cap * sizeof(long));
        cum_buf = (double *)malloc(unit_cap * sizeof(double));
        if (!unit_buf || !cum_buf) abort();
    }
    /* prepared rows; consecutive items over the same rows with the same preparation share them */
    float *p = prep_buf;
    for (int i = 0; i < n; i++) {
        mt_gemm_item *it = &items[i];
        const mt_fmt *f = mt_fmt_lookup(it->W->fmt);
        if (!f->prep || it->T == 0) continue;
        int fi = mt_isa_of(f, isa);
        const mt_gemm_item *prev = i > 0 ? &items[i - 1] : NULL;
        const mt_fmt *pf = prev ? mt_fmt_lookup(prev->W->fmt) : NULL;
        if (prev && prev->XP && prev->X == it->X && prev->ldx == it->ldx && prev->idx == it->idx &&
            prev->T == it->T && prev->W->cols == it->W->cols && pf->prep == f->prep && mt_isa_of(pf, isa) == fi) {
            it->XP = prev->XP;
            continue;
        }
        for (long t = 0; t < it->T; t++)
            f->prep(it->X + (it->idx ? it->idx[t] : t) * it->ldx, it->W->cols, p + t * it->ldxp, fi);
        it->XP = p;
        p += it->ldxp * it->T;
    }
    gemm_batch B = {items, n, unit_buf, unit_buf + unit_cap, unit_buf + 2 * unit_cap, 0, cum_buf, TOKEN_BLOCK};
    for (int i = 0; i < n; i++) { /* tokens per pass: the widest item's activation rows fit X_BLOCK_BYTES */
        /* only what the tile reads: counting x too gave bf16's dense down projection (10944
         * columns) 8 tokens per pass, its 45 MB weight re-read from memory every 8 tokens (1.5x) */
        int only_xp = items[i].qtile && items[i].qu.only_xp;
        long tb = X_BLOCK_BYTES / (4 * ((only_xp ? 0 : items[i].W->cols) + items[i].ldxp));
        tb -= tb % (items[i].qtile ? items[i].qu.tokens : MT_TILE_T);
        if (tb < 2 * MT_TILE_T) tb = 2 * MT_TILE_T;
        if (items[i].T > 0 && tb < B.tblock) B.tblock = tb;
    }
    B.cum[0] = 0;
    for (int i = 0; i < n; i++) {
        if (items[i].T == 0) continue;
        long rb = block_rows(items[i].W);
        for (long r = 0; r < items[i].W->rows; r += rb) {
            long u = B.n_units++;
            B.unit_item[u] = i;
            B.unit_r0[u] = r;
            B.unit_r1[u] = r + rb < items[i].W->rows ? r + rb : items[i].W->rows;
            B.cum[u + 1] = B.cum[u] + (double)(B.unit_r1[u] - r) * items[i].W->cols * items[i].T;
        }
    }
    if (B.n_units == 0) return;
    parallel_run(gemm_task, &B, elems < PARALLEL_MIN_ELEMS ? 1 : nth);
}

/* Y [T, W->rows] = X [T, W->cols] W^T (+ b) with nth threads (tests, benchmarks) */
void mt_gemm(const mt_weight *W, const void *b, int bdt, const float *X, long T, float *Y, int nth) {
    mt_gemm_item it = {W, b, bdt, X, W->cols, NULL, T, Y, W->rows, NULL, 0, NULL, NULL, NULL};
    mt_run_gemms(&it, 1, nth);
}
