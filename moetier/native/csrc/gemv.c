/* The batched matrix-vector engine: one parallel region per batch of products, rows split
 * evenly over the threads, each row computed by its format's row kernel (fmt_*.c) for the
 * instruction set chosen at run time (cpuid; tests and MOETIER_ISA force one: mt_set_isa). */
#include "mt.h"

#include <stdio.h>

/* every format the kernels read, indexed by its code (MT_FMT_*, all < 256): mt_fmt_lookup is
 * one load (a decode step looks formats up ~100 times) */
static const mt_fmt *const BY_CODE[256] = {
    [MT_FMT_F32] = &mt_fmt_f32,   [MT_FMT_BF16] = &mt_fmt_bf16, [MT_FMT_F16] = &mt_fmt_f16, [MT_FMT_BF16_F32X] = &mt_fmt_bf16_f32x,
    [MT_FMT_FP8_E4M3_BLOCK] = &mt_fmt_fp8, [MT_FMT_MXFP4] = &mt_fmt_mxfp4, [MT_FMT_INT4_GROUP] = &mt_fmt_int4,
    [MT_FMT_INT8_GROUP] = &mt_fmt_int8, [MT_FMT_Q4_0] = &mt_fmt_q4_0, [MT_FMT_Q4_1] = &mt_fmt_q4_1,
    [MT_FMT_Q5_0] = &mt_fmt_q5_0, [MT_FMT_Q5_1] = &mt_fmt_q5_1, [MT_FMT_Q8_0] = &mt_fmt_q8_0,
    [MT_FMT_Q2_K] = &mt_fmt_q2_k, [MT_FMT_Q3_K] = &mt_fmt_q3_k, [MT_FMT_Q4_K] = &mt_fmt_q4_k,
    [MT_FMT_Q5_K] = &mt_fmt_q5_k, [MT_FMT_Q6_K] = &mt_fmt_q6_k, [MT_FMT_GGML_MXFP4] = &mt_fmt_ggml_mxfp4,
};

const mt_fmt *mt_fmt_lookup(int code) { return code >= 0 && code < 256 ? BY_CODE[code] : NULL; }

/* 1 when the kernels read weights of format `code` */
int mt_fmt_supported(int code) { return mt_fmt_lookup(code) != NULL; }

/* the ISA of the kernels format `code` runs when `isa` is chosen (-1: unknown format) */
int mt_fmt_isa(int code, int isa) {
    const mt_fmt *f = mt_fmt_lookup(code);
    return f && isa >= 0 && isa < MT_N_ISA ? mt_isa_of(f, isa) : -1;
}

/* ------------------------------------------------------------------------------------ */
/* instruction set                                                                       */

int mt_isa_supported(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case MT_ISA_SCALAR:
        return 1;
    case MT_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case MT_ISA_AVX512:
        return mt_isa_supported(MT_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq");
    case MT_ISA_AVX512VNNI:
        return mt_isa_supported(MT_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
    case MT_ISA_AVX512BF16:
#if MT_HAVE_BF16
        return mt_isa_supported(MT_ISA_AVX512VNNI) && __builtin_cpu_supports("avx512bf16");
#else
        return 0;
#endif
    default:
        return 0;
    }
}

static int isa_best(void) {
    for (int i = MT_N_ISA - 1; i > 0; i--)
        if (mt_isa_supported(i)) return i;
    return MT_ISA_SCALAR;
}

static int cur_isa = -1;

/* the ISA the weight kernels use (the best the CPU supports unless mt_set_isa chose one) */
int mt_get_isa(void) {
    if (cur_isa < 0) cur_isa = isa_best();
    return cur_isa;
}

/* force an ISA (-1: back to the best); returns 0, or -1 when the CPU does not support it */
int mt_set_isa(int isa) {
    if (isa < 0) {
        cur_isa = isa_best();
        return 0;
    }
    if (!mt_isa_supported(isa)) return -1;
    cur_isa = isa;
    return 0;
}

/* the ISA whose kernels (row kernel, tile, prepared x) format f runs when `isa` is chosen: the
 * highest one up to `isa` with a row kernel */
int mt_isa_of(const mt_fmt *f, int isa) {
    while (isa > 0 && !f->rows[isa]) isa--;
    return isa;
}

/* ------------------------------------------------------------------------------------ */
/* the batch engine                                                                      */

typedef struct {
    const mt_gemv_item *items;
    int n;
    long total;
} gemv_batch;

static void gemv_batch_task(void *vctx, int tid, int nth) {
    const gemv_batch *B = (const gemv_batch *)vctx;
    long per = (B->total + nth - 1) / nth;
    long lo = per * tid, hi = lo + per;
    if (hi > B->total) hi = B->total;
    long base = 0;
    for (int i = 0; i < B->n && lo < hi; i++) {
        const mt_gemv_item *it = &B->items[i];
        long rows = it->W->rows;
        long s = lo - base, e = hi - base;
        if (s < rows && e > 0) {
            if (s < 0) s = 0;
            if (e > rows) e = rows;
            it->fn(it->W, it->x, it->xp, it->y, s, e);
            if (it->b)
                for (long r = s; r < e; r++) it->y[r] += ld(it->b, it->bdt, r);
        }
        base += rows;
    }
}

/* prepared-x buffer (per calling thread) */
static __thread float *prep_buf = NULL;
static __thread long prep_cap = 0;

void mt_run_gemvs(mt_gemv_item *items, int n, int nth) {
    int isa = mt_get_isa();
    long need = 0;
    for (int i = 0; i < n; i++) {
        const mt_fmt *f = mt_fmt_lookup(items[i].W->fmt);
        if (!f) {
            fprintf(stderr, "moetier native: weight format %d has no kernel\n", items[i].W->fmt);
            abort();
        }
        items[i].fn = f->rows[mt_isa_of(f, isa)];
        items[i].xp = NULL;
        if (f->prep) need += (f->prep_len(items[i].W->cols, mt_isa_of(f, isa)) + 15) & ~15L;
    }
    if (need > prep_cap) {
        free(prep_buf);
        prep_buf = (float *)aligned_alloc(64, need * 4);
        prep_cap = prep_buf ? need : 0;
        if (!prep_buf) abort();
    }
    float *p = prep_buf;
    for (int i = 0; i < n; i++) {
        const mt_fmt *f = mt_fmt_lookup(items[i].W->fmt);
        if (!f->prep) continue;
        int fi = mt_isa_of(f, isa);
        const mt_gemv_item *prev = i > 0 ? &items[i - 1] : NULL;
        const mt_fmt *pf = prev ? mt_fmt_lookup(prev->W->fmt) : NULL;
        if (prev && prev->xp && prev->x == items[i].x && prev->W->cols == items[i].W->cols && pf->prep == f->prep &&
            mt_isa_of(pf, isa) == fi) {
            items[i].xp = prev->xp; /* same x, same preparation: reuse */
            continue;
        }
        f->prep(items[i].x, items[i].W->cols, p, fi);
        items[i].xp = p;
        p += (f->prep_len(items[i].W->cols, fi) + 15) & ~15L;
    }
    gemv_batch B = {items, n, 0};
    long elems = 0;
    for (int i = 0; i < n; i++) {
        B.total += items[i].W->rows;
        elems += items[i].W->rows * items[i].W->cols;
    }
    parallel_run(gemv_batch_task, &B, elems < PARALLEL_MIN_ELEMS ? 1 : nth);
}

/* y = W x (+ b) with nth threads (tests, benchmarks) */
void mt_gemv(const mt_weight *W, const void *b, int bdt, const float *x, float *y, int nth) {
    mt_gemv_item it = {W, b, bdt, x, y, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
}

/* ------------------------------------------------------------------------------------ */
/* the scalar reference of the quantized formats                                         */

#define DQ_CHUNK 256

void mt_rows_dequant(const mt_weight *W, const float *x, float *y, long r0, long r1, mt_dequant_fn dq) {
    float buf[DQ_CHUNK];
    long cols = W->cols;
    for (long r = r0; r < r1; r++) {
        float acc[8] = {0};
        for (long c0 = 0; c0 < cols; c0 += DQ_CHUNK) {
            long n = cols - c0 < DQ_CHUNK ? cols - c0 : DQ_CHUNK;
            dq(W, r, c0, n, buf);
            for (long i = 0; i < n; i++) acc[(c0 + i) & 7] += buf[i] * x[c0 + i];
        }
        y[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

/* out [r1 - r0, W->cols] = rows [r0, r1) of W dequantized (reference; tests, embeddings) */
int mt_dequant_rows(const mt_weight *W, long r0, long r1, float *out) {
    const mt_fmt *f = mt_fmt_lookup(W->fmt);
    if (!f) return -1;
    for (long r = r0; r < r1; r++) {
        float *o = out + (r - r0) * W->cols;
        if (f->dequant) {
            for (long c0 = 0; c0 < W->cols; c0 += DQ_CHUNK)
                f->dequant(W, r, c0, W->cols - c0 < DQ_CHUNK ? W->cols - c0 : DQ_CHUNK, o + c0);
        } else {
            for (long c = 0; c < W->cols; c++) o[c] = ld(mt_row(W, r), mt_plain_dt(W->fmt) == DT_BF16 ? DT_BF16 : DT_F32, c);
        }
    }
    return 0;
}
