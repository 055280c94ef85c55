/* Many tokens per call (gemm.c, prefill.c): prefill (one sequence, T positions) and batched
 * steps (N sequences, one or more tokens each) through the same per-format row kernels as the
 * single-token path, so every token's result is bit for bit what a single-token step gives.
 */
#ifndef MT_MANY_H
#define MT_MANY_H

#include "mt.h"

/* How gemm.c's run_unit drives a format's own tile (gemm.c: tile_use_of) */
typedef struct {
    long rows, tokens; /* rows per call, most tokens per pass */
    int pf_l2, only_xp; /* the next row block prefetched into L2 (else L1); the tile reads only prepared x */
} mt_tile_use;

/* Y[t, r] = W[r, :] . X[idx[t], :] (+ b[r]) for t < T, r < W->rows. X rows are ldx floats
 * apart (idx NULL: row t); Y rows ldy floats apart. */
typedef struct {
    const mt_weight *W;
    const void *b;
    int bdt;
    const float *X;
    long ldx;
    const int32_t *idx;
    long T;
    float *Y;
    long ldy;
    /* filled by mt_run_gemms */
    const float *XP; /* prepared rows (format's prep), one per t, ldxp floats apart; NULL: none */
    long ldxp;
    mt_rows_fn fn;
    void (*tile)(const mt_weight *W, const float *const *p, float *const *y, int n, long r); /* 2 rows x n = 2, 3 tokens */
    mt_tile_fn qtile; /* the format's own tile (mt_fmt.tiles) */
    mt_tile_use qu;   /* how run_unit drives qtile */
} mt_gemm_item;

/* A batch of independent products as one parallel region. Each weight is read in blocks of
 * rows small enough to stay in L1 while every token of the item passes over them; (item, row
 * block) units are split over the threads by cost. Each (t, r) is summed by the format's row
 * kernel on row r (the same call a single-token product makes) or by a register tile doing that
 * kernel's operations in its order for several tokens (gemm.c: tile_for, mt_fmt.tiles):
 * bit-identical to mt_run_gemvs for every token, whatever T, the thread count or the grouping. */
void mt_run_gemms(mt_gemm_item *items, int n, int nth);

/* The multi-token scratch of prefill.c (also used by mla_many.c for its norms, router and
 * feed-forward): buffers for up to `cap` tokens, grown by mt_many_reserve. */
typedef struct {
    long H, qkv_rows, attn_dim, E, topk, I, SI; /* the largest over the layers */
    long cap;
    float *h, *qkv, *attn, *ao, *rlog, *gu, *act, *down, *sgu, *sact, *sh, *sg, *scores;
    long n_scores;
    int32_t *slot_tok, *slot_of; /* slot -> token; (token, j) -> slot */
    long *cnt, *off;             /* per expert: tokens routed to it, first slot */
    mt_gemm_item *items;         /* 2 E + 3 */
} many;

/* buffers for T tokens; returns 0 or -1 (out of memory) */
int mt_many_reserve(many *M, long T);

/* the feed-forward of T tokens (prefill.c; see there) */
int mt_moe_many(const layer_desc *L, many *M, int dt, long T, float *x, const int64_t *ids, const float *w, int n,
                const int64_t *experts, const mt_weight *const *gate, const mt_weight *const *up,
                const mt_weight *const *down, int finish, int nth);

/* expert parallelism (prefill.c; see there): a follower's rows of several experts, and rank 0's
 * view of the scratch's h / down / slot_of */
int mt_rows_many(const layer_desc *L, many *M, int dt, long n, const float *h, const int64_t *ids, int ne,
                 const int64_t *experts, const mt_weight *const *gate, const mt_weight *const *up,
                 const mt_weight *const *down, float *out, int nth);
void mt_many_bufs(const many *M, float **h, float **down, int32_t **slot_of);
/* out[slot_tok[s]] = down[s] for every slot s of the listed experts (cnt / off / slot_tok of
 * mt_group_slots): a rows call's outputs back in row order (mt_rows_many, mt_ext_rows_many) */
void mt_slots_out(int ne, const int64_t *experts, const long *cnt, const long *off, const int32_t *slot_tok,
                  const float *down, long H, float *out);

/* Tokens grouped by expert (prefill.c): the T * k (token, j) routings ids [T, k] as slots sorted
 * by expert, tokens ascending within an expert: cnt[e] slots from off[e] (off [E + 1]),
 * slot_tok[slot] its token, slot_of[t * k + j] the slot of (t, j). */
void mt_group_slots(long E, long k, long T, const int64_t *ids, long *cnt, long *off, int32_t *slot_tok,
                    int32_t *slot_of);

/* Shared by the multi-token steps (prefill.c, ext_many.c, mla_many.c; defined in prefill.c). */
/* *p grown (realloc) to n floats; 0 or -1 (out of memory, *p unchanged) */
int mt_grow(float **p, long n);
/* this thread's buffer of at least n doubles (the attention cost prefix sums), or NULL */
double *mt_cum_reserve(long n);
/* the units [*u0, *u1) thread tid of nth runs when units are split by cost: cum[0..n] their cost
 * prefix sums, a unit goes to the thread whose share of the total holds the unit's midpoint */
static inline void mt_cum_range(const double *cum, long n, int tid, int nth, long *u0, long *u1) {
    double total = cum[n], lo = total * tid / nth, hi = total * (tid + 1) / nth;
    long u = 0;
    while (u < n && (cum[u] + cum[u + 1]) / 2 < lo) u++;
    *u0 = u;
    if (tid == nth - 1) u = n;
    else
        while (u < n && (cum[u] + cum[u + 1]) / 2 < hi) u++;
    *u1 = u;
}
/* after attention: ao = o_proj(attn) [T, H] (attn rows in_dim wide), x += ao, h = norm(x) per token */
void mt_attn_out(const mt_weight *o_w, const void *o_b, int dt, const float *attn, long in_dim, long T, float *ao,
                 float *x, long H, const void *ln, float eps, float *h, int nth);

#endif
