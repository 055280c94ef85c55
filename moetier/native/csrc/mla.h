/* DeepSeek MLA: the layer and router descriptors and the per-token pieces shared by the
 * single-token step (mla.c) and the multi-token one (mla_many.c), so both run every token
 * through the same code (bit-identical results). */
#ifndef MT_MLA_H
#define MT_MLA_H

#include "mt.h"

/* mirrors moetier/native/mla.py: MlaDesc (keep the field order in sync) */
typedef struct {
    long H, nh, C, dn, dr, dv, Rq; /* Rq = 0: queries straight from q_proj */
    float eps, eps_lat, scale;      /* eps: the layer norms; eps_lat: q_a / kv_a norms */
    int interleaved;                /* rope on adjacent pairs (de-interleaved first, like the torch path) */
    const void *ln1, *ln2;
    const mt_weight *q_w; /* q_proj [nh (dn + dr), H] or q_b_proj [nh (dn + dr), Rq] */
    const mt_weight *qa_w; /* q_a_proj [Rq, H] (NULL without q_lora) */
    const void *qa_b, *qa_norm;
    const mt_weight *kva_w; /* kv_a_proj_with_mqa [C + dr, H] */
    const void *kva_b, *kva_norm;
    const void *kvb;       /* kv_b_proj [nh (dn + dv), C], plain model dtype (NULL when uk is given) */
    const mt_weight *uv;   /* nh descriptors: W_UV[h] [dv, C] (rows h (dn + dv) + dn .. + dv of kv_b_proj) */
    const mt_weight *o_w;  /* [H, nh dv] */
    const void *o_b;
    const mt_weight *kvb_w; /* kv_b_proj (kvb) as one plain weight: the plain form's decompression (or NULL) */
    const mt_weight *uk;    /* NULL, or nh descriptors W_UK[h]^T [C, dn] in any weight format (GGUF attn_k_b,
                             * kept as stored): the absorb runs as products over them instead of kvb's rows */
} mla_desc;

/* mirrors moetier/native/mla.py: RouteDesc */
typedef struct {
    long E, topk, n_group, topk_group;
    int sigmoid; /* 0 softmax, 1 sigmoid */
    int method;  /* 0 greedy, 1 group_limited_greedy, 2 noaux_tc */
    int norm_topk, scale_after_norm;
    float scaling;
    const mt_weight *w; /* [E, H] */
    const void *corr;   /* e_score_correction_bias [E] (model dtype) or NULL */
} route_desc;

/* One token after its projections: kv [C + dr] (kv_a output) normed and its rotary key roped,
 * the query's rotary parts q [nh (dn + dr)] roped, c_kv / k_rot written at row `pos` of Ckv
 * [cap, C] / Kr [cap, dr] (model dtype). cs / sn: the rope row of `pos` [dr]. */
void mt_mla_post(const mla_desc *L, int dt, float *q, float *kv, void *Ckv, void *Kr, long pos, const float *cs,
                 const float *sn);

/* W_UK folded into the queries of head h for T tokens: ql[t][c] = sum_d q[t][h (dn + dr) + d] *
 * kvb[h (dn + dv) + d][c] (d ascending, per element). q rows ldq floats apart, ql rows ldl.
 * Plain kvb only: with L->uk the callers run the products over uk[h] (mt_run_gemvs / _gemms). */
void mt_mla_absorb(const mla_desc *L, int dt, long h, const float *q, long ldq, float *ql, long ldl, long T);

#define MLA_ROWS 4 /* heads of one token per pass over the cache (mt_mla_attend_rows) */

/* R heads of one token: softmax attention in the latent space over positions 0 .. n-1 of Ckv /
 * Kr. ql [R, C] the absorbed queries (rows C apart), qr the roped query parts (rows ldqr apart,
 * dr each), o [R, C] the attended latents, sc [R n] scratch. Each head's result depends only
 * on its own query and the cache (not on R or on the heads beside it): the single-token step
 * and the multi-token one group heads differently and get the same bits. */
void mt_mla_attend_rows(const mla_desc *L, int dt, int R, const float *ql, const float *qr, long ldqr,
                        const void *Ckv, const void *Kr, long n, float *o, float *sc);

/* The plain (decompressed) form for R <= MLA_ROWS tokens of one sequence and one head: q rows
 * ldq floats apart, [q_nope (dn) | q_rot (dr, roped)]; kv rows ldkv floats apart, the head's
 * decompressed [k_nope (dn) | v (dv)] per position (float32); Kr [positions, dr] the cache's
 * rotary keys. Row r attends positions 0 .. n[r] - 1; o rows [dv] ldo floats apart; sc
 * [R max n] scratch. A row's result depends only on its own query and the keys / values. */
void mt_mla_attend_plain(const mla_desc *L, int dt, int R, const float *q, long ldq, const float *kv, long ldkv,
                         const void *Kr, const long *n, float *o, long ldo, float *sc);

/* The routing of one token from its router logits `scores` [E] (overwritten by the scores):
 * ids[k] (descending choice value, ties to the lower id), w[k]; choice [E] scratch. */
void mt_route_pick(const route_desc *R, int dt, float *scores, float *choice, int64_t *ids, float *w);

#endif
