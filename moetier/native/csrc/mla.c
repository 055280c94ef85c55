/* DeepSeek Multi-head Latent Attention (MLA) of one new token, absorbed form, and the
 * DeepSeek grouped top-k router (softmax / sigmoid scores, greedy / group_limited_greedy /
 * noaux_tc with the correction bias, norm_topk_prob, routed_scaling_factor).
 *
 * The cache holds, per position, the normed latent c_kv [C] and the rotated shared key
 * k_rot [dr] (moetier/layers/mla.py; written by the torch prefill and by this step). Keys and
 * values are never expanded: W_UK (the first dn rows of each head's block of kv_b_proj) is
 * folded into the query, q_lat[h] = W_UK[h]^T q_nope[h] [C], and W_UV (the last dv rows)
 * is applied after the softmax to the attended latent, out[h] = W_UV[h] o_lat[h] [dv]:
 *
 *   score[h, s] = scale * (q_lat[h] . c_kv[s] + q_rot[h] . k_rot[s])
 *   o_lat[h]    = sum_s softmax(score[h])[s] c_kv[s]
 *
 * Every output element is computed by one thread in a fixed order (thread-count independent).
 */
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
    const void *kvb;       /* kv_b_proj [nh (dn + dv), C], plain model dtype */
    const mt_weight *uv;   /* nh descriptors: W_UV[h] = rows h (dn + dv) + dn .. + dv of kv_b_proj */
    const mt_weight *o_w;  /* [H, nh dv] */
    const void *o_b;
} mla_desc;

typedef struct {
    float *q, *qa, *kv, *qlat, *olat, *out, *scores;
    long n_scores;
} mla_scratch;

void mt_mla_scratch_free(mla_scratch *m) {
    if (!m) return;
    free(m->q); free(m->qa); free(m->kv); free(m->qlat); free(m->olat); free(m->out); free(m->scores);
    free(m);
}

mla_scratch *mt_mla_scratch_new(long nh, long C, long dn, long dr, long dv, long Rq) {
    mla_scratch *m = (mla_scratch *)calloc(1, sizeof(mla_scratch));
    if (!m) return NULL;
    m->q = (float *)calloc(nh * (dn + dr), 4);
    m->qa = (float *)calloc(Rq > 0 ? Rq : 1, 4);
    m->kv = (float *)calloc(C + dr, 4);
    m->qlat = (float *)calloc(nh * C, 4);
    m->olat = (float *)calloc(nh * C, 4);
    m->out = (float *)calloc(nh * dv, 4);
    if (!m->q || !m->qa || !m->kv || !m->qlat || !m->olat || !m->out) {
        mt_mla_scratch_free(m);
        return NULL;
    }
    return m;
}

/* [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...] (the torch path's interleaved layout) */
static void deinterleave(float *v, long d) {
    float tmp[512];
    long h = d / 2;
    for (long i = 0; i < h; i++) {
        tmp[i] = v[2 * i];
        tmp[i + h] = v[2 * i + 1];
    }
    memcpy(v, tmp, d * 4);
}

typedef struct {
    const mla_desc *L;
    mla_scratch *M;
    int dt;
    const void *Ckv, *Kr;
    long n; /* positions attended: 0 .. n-1 */
} mla_ctx;

/* q_lat[h][c] = sum_d q_nope[h][d] * kvb[h (dn + dv) + d][c], heads split over threads */
static void absorb_task(void *vctx, int tid, int nth) {
    const mla_ctx *A = (const mla_ctx *)vctx;
    const mla_desc *L = A->L;
    long C = L->C, dn = L->dn, dr = L->dr, dv = L->dv;
    long h0 = L->nh * tid / nth, h1 = L->nh * (tid + 1) / nth;
    for (long h = h0; h < h1; h++) {
        const float *qn = A->M->q + h * (dn + dr);
        float *ql = A->M->qlat + h * C;
        for (long c = 0; c < C; c++) ql[c] = 0.0f;
        for (long d = 0; d < dn; d++) {
            long row = (h * (dn + dv) + d) * C;
            float a = qn[d];
            if (A->dt == DT_BF16) {
                const bf16 *w = (const bf16 *)L->kvb + row;
                for (long c = 0; c < C; c++) ql[c] += a * bf16_to_f32(w[c]);
            } else {
                const float *w = (const float *)L->kvb + row;
                for (long c = 0; c < C; c++) ql[c] += a * w[c];
            }
        }
    }
}

static inline float dot_dt(const float *a, const void *b, int dt, long off, long n) {
    float acc[8] = {0};
    long i = 0;
    if (dt == DT_BF16) {
        const bf16 *p = (const bf16 *)b + off;
        for (; i + 8 <= n; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += a[i + j] * bf16_to_f32(p[i + j]);
        for (; i < n; i++) acc[i & 7] += a[i] * bf16_to_f32(p[i]);
    } else {
        const float *p = (const float *)b + off;
        for (; i + 8 <= n; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += a[i + j] * p[i + j];
        for (; i < n; i++) acc[i & 7] += a[i] * p[i];
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* softmax attention in the latent space, heads split over threads */
static void mla_attn_task(void *vctx, int tid, int nth) {
    const mla_ctx *A = (const mla_ctx *)vctx;
    const mla_desc *L = A->L;
    long C = L->C, dn = L->dn, dr = L->dr, n = A->n;
    long h0 = L->nh * tid / nth, h1 = L->nh * (tid + 1) / nth;
    float *sc = A->M->scores + (long)tid * n;
    for (long h = h0; h < h1; h++) {
        const float *ql = A->M->qlat + h * C, *qr = A->M->q + h * (dn + dr) + dn;
        float mx = -INFINITY;
        for (long t = 0; t < n; t++) {
            float s = (dot_dt(ql, A->Ckv, A->dt, t * C, C) + dot_dt(qr, A->Kr, A->dt, t * dr, dr)) * L->scale;
            sc[t] = s;
            if (s > mx) mx = s;
        }
        float sum = 0.0f;
        for (long t = 0; t < n; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        float inv = 1.0f / sum;
        float *o = A->M->olat + h * C;
        for (long c = 0; c < C; c++) o[c] = 0.0f;
        for (long t = 0; t < n; t++) {
            float p = sc[t] * inv;
            if (A->dt == DT_BF16) {
                const bf16 *v = (const bf16 *)A->Ckv + t * C;
                for (long c = 0; c < C; c++) o[c] += p * bf16_to_f32(v[c]);
            } else {
                const float *v = (const float *)A->Ckv + t * C;
                for (long c = 0; c < C; c++) o[c] += p * v[c];
            }
        }
    }
}

/* x += o_proj(MLA(norm1(x))); S->h = norm2(x). Writes c_kv and k_rot of position `pos` into
 * Ckv [cap, C] and Kr [cap, dr] (model dtype). cs/sn: rope cos/sin [dr] for `pos`.
 * Returns -1 when out of memory. */
int mt_mla_attention(const mla_desc *L, mla_scratch *M, scratch *S, int dt, float *x, void *Ckv, void *Kr,
                     long pos, const float *cs, const float *sn, int nth) {
    long H = L->H, nh = L->nh, C = L->C, dn = L->dn, dr = L->dr, dv = L->dv;
    if (dr > 512) return -1;
    rms_norm(x, L->ln1, dt, L->eps, S->h, H);
    mt_gemv_item it[2] = {
        {L->Rq ? L->qa_w : L->q_w, L->Rq ? L->qa_b : NULL, dt, S->h, L->Rq ? M->qa : M->q, NULL, NULL},
        {L->kva_w, L->kva_b, dt, S->h, M->kv, NULL, NULL},
    };
    mt_run_gemvs(it, 2, nth);
    if (L->Rq) {
        rms_norm(M->qa, L->qa_norm, dt, L->eps_lat, M->qa, L->Rq);
        mt_gemv_item qb = {L->q_w, NULL, dt, M->qa, M->q, NULL, NULL};
        mt_run_gemvs(&qb, 1, nth);
    }
    rms_norm(M->kv, L->kva_norm, dt, L->eps_lat, M->kv, C);
    float *kr = M->kv + C;
    for (long h = 0; h < nh; h++) {
        float *qr = M->q + h * (dn + dr) + dn;
        if (L->interleaved) deinterleave(qr, dr);
        rope(qr, cs, sn, (int)dr);
    }
    if (L->interleaved) deinterleave(kr, dr);
    rope(kr, cs, sn, (int)dr);
    if (dt == DT_BF16) {
        for (long c = 0; c < C; c++) ((bf16 *)Ckv)[pos * C + c] = f32_to_bf16(M->kv[c]);
        for (long r = 0; r < dr; r++) ((bf16 *)Kr)[pos * dr + r] = f32_to_bf16(kr[r]);
    } else {
        memcpy((float *)Ckv + pos * C, M->kv, C * 4);
        memcpy((float *)Kr + pos * dr, kr, dr * 4);
    }
    long n = pos + 1;
    mla_ctx A = {L, M, dt, Ckv, Kr, n};
    int ath = nh * dn * C < PARALLEL_MIN_ELEMS ? 1 : nth;
    parallel_run(absorb_task, &A, ath);
    ath = n * nh * (2 * C + dr) < PARALLEL_MIN_ELEMS ? 1 : nth;
    long need = n * ath;
    if (M->n_scores < need) {
        float *p = (float *)realloc(M->scores, need * 4);
        if (!p) return -1;
        M->scores = p;
        M->n_scores = need;
    }
    parallel_run(mla_attn_task, &A, ath);
    mt_gemv_item uv[256];
    for (long h0 = 0; h0 < nh; h0 += 256) { /* W_UV[h] o_lat[h], heads in batches of 256 */
        int m = 0;
        for (long h = h0; h < nh && m < 256; h++, m++)
            uv[m] = (mt_gemv_item){&L->uv[h], NULL, dt, M->olat + h * C, M->out + h * dv, NULL, NULL};
        mt_run_gemvs(uv, m, nth);
    }
    mt_gemv_item o = {L->o_w, L->o_b, dt, M->out, S->ao, NULL, NULL};
    mt_run_gemvs(&o, 1, nth);
    for (long i = 0; i < H; i++) x[i] += S->ao[i];
    rms_norm(x, L->ln2, dt, L->eps, S->h, H);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* DeepSeek grouped top-k router (moetier/layers/routing.py: grouped_topk)               */

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

/* ids[k] (descending choice value, ties to the lower id), w[k]; scores/choice: [E] scratch */
void mt_route_grouped(const route_desc *R, const float *h, int dt, float *scores, float *choice, int64_t *ids,
                      float *w, int nth) {
    long E = R->E, k = R->topk, G = R->n_group > 0 ? R->n_group : 1;
    mt_gemv_item it = {R->w, NULL, dt, h, scores, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
    if (R->sigmoid) {
        for (long e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    } else {
        float mx = -INFINITY, sum = 0.0f;
        for (long e = 0; e < E; e++)
            if (scores[e] > mx) mx = scores[e];
        for (long e = 0; e < E; e++) {
            scores[e] = expf(scores[e] - mx);
            sum += scores[e];
        }
        for (long e = 0; e < E; e++) scores[e] /= sum;
    }
    for (long e = 0; e < E; e++) choice[e] = scores[e] + (R->corr ? ld(R->corr, dt, e) : 0.0f);
    unsigned char keep[1024];
    int grouped = R->method != 0 && G > 1 && G <= 1024;
    if (grouped) {
        long per = E / G;
        float gs[1024];
        for (long g = 0; g < G; g++) {
            const float *c = choice + g * per;
            if (R->method == 2) { /* sum of the two best */
                float b1 = -INFINITY, b2 = -INFINITY;
                for (long i = 0; i < per; i++) {
                    if (c[i] > b1) {
                        b2 = b1;
                        b1 = c[i];
                    } else if (c[i] > b2) {
                        b2 = c[i];
                    }
                }
                gs[g] = per >= 2 ? b1 + b2 : b1;
            } else {
                float b = -INFINITY;
                for (long i = 0; i < per; i++)
                    if (c[i] > b) b = c[i];
                gs[g] = b;
            }
            keep[g] = 0;
        }
        for (long j = 0; j < R->topk_group && j < G; j++) {
            long best = -1;
            for (long g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1;
        }
        float fill = R->method == 2 ? -INFINITY : 0.0f;
        for (long e = 0; e < E; e++)
            if (!keep[e / per]) choice[e] = fill;
    }
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
        }
        ids[j] = best;
        w[j] = scores[best];
        if (grouped && R->method == 1 && !keep[best / (E / G)]) w[j] = 0.0f;
    }
    if (R->norm_topk && k > 1) {
        float s = 0.0f;
        for (long j = 0; j < k; j++) s += w[j];
        for (long j = 0; j < k; j++) w[j] = w[j] / (s + 1e-20f);
        if (R->scale_after_norm)
            for (long j = 0; j < k; j++) w[j] *= R->scaling;
    } else {
        for (long j = 0; j < k; j++) w[j] *= R->scaling;
    }
}
