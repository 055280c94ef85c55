/* The multi-token product engine (many.h: mt_run_gemms): the row kernels of gemv.c applied to
 * T activation rows per weight-row block, so each weight block is read from memory once per
 * call (per token block) instead of once per token. */
#include "many.h"

#include <stdio.h>

#define BLOCK_BYTES (16L * 1024) /* weight bytes per row block: stays in L1 across the tokens */
#define TOKEN_BLOCK 128          /* tokens per pass over a thread's row blocks (their x in L2) */

typedef struct {
    const mt_gemm_item *items;
    int n;
    long *unit_item, *unit_r0, *unit_r1; /* units: (item, rows [r0, r1)) */
    long n_units;
    double *cum; /* cost prefix sums over units (n_units + 1) */
} gemm_batch;

static void run_unit(const mt_gemm_item *it, long r0, long r1, long t0, long t1) {
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
    for (long tb = 0; tb < tmax; tb += TOKEN_BLOCK)
        for (long u = u0; u < u1; u++) {
            const mt_gemm_item *it = &B->items[B->unit_item[u]];
            if (tb >= it->T) continue;
            run_unit(it, B->unit_r0[u], B->unit_r1[u], tb, tb + TOKEN_BLOCK < it->T ? tb + TOKEN_BLOCK : it->T);
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
        items[i].fn = mt_rows_for(f, isa);
        items[i].XP = NULL;
        items[i].ldxp = f->prep ? (f->prep_len(items[i].W->cols) + 15) & ~15L : 0;
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
        const mt_gemm_item *prev = i > 0 ? &items[i - 1] : NULL;
        if (prev && prev->XP && prev->X == it->X && prev->ldx == it->ldx && prev->idx == it->idx &&
            prev->T == it->T && prev->W->cols == it->W->cols && mt_fmt_lookup(prev->W->fmt)->prep == f->prep) {
            it->XP = prev->XP;
            continue;
        }
        for (long t = 0; t < it->T; t++) f->prep(it->X + (it->idx ? it->idx[t] : t) * it->ldx, it->W->cols, p + t * it->ldxp);
        it->XP = p;
        p += it->ldxp * it->T;
    }
    gemm_batch B = {items, n, unit_buf, unit_buf + unit_cap, unit_buf + 2 * unit_cap, 0, cum_buf};
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
