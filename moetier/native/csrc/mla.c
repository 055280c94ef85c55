/* DeepSeek Multi-head Latent Attention (MLA) of one new token, absorbed form, and the
 * DeepSeek grouped top-k router (softmax / sigmoid scores, greedy / group_limited_greedy /
 * noaux_tc with the correction bias, norm_topk_prob, routed_scaling_factor).
 *
 * The cache holds, per position, the normed latent c_kv [C] and the rotated shared key
 * k_rot [dr] (moetier/layers/mla.py; written by the torch path, this step and mla_many.c). Keys and
 * values are never expanded: W_UK (the first dn rows of each head's block of kv_b_proj) is
 * folded into the query, q_lat[h] = W_UK[h]^T q_nope[h] [C], and W_UV (the last dv rows)
 * is applied after the softmax to the attended latent, out[h] = W_UV[h] o_lat[h] [dv]:
 *
 *   score[h, s] = scale * (q_lat[h] . c_kv[s] + q_rot[h] . k_rot[s])
 *   o_lat[h]    = sum_s softmax(score[h])[s] c_kv[s]
 *
 * All heads share the latent keys: the attention runs MLA_ROWS heads per pass over the cache.
 * Every output element is computed by one thread in a fixed order (thread-count independent).
 * The per-token pieces (mla.h: mt_mla_post, mt_mla_absorb, mt_mla_attend_rows, mt_route_pick;
 * mt_mla_attend_plain, the plain form's attention) are shared with the multi-token step
 * (mla_many.c). mt_mla_layers runs every layer of a step in one call (experts in RAM).
 */
#include "ep.h"
#include "mla.h"
#include "simd.h"

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

#define ABSORB_COLS 256 /* latent columns per pass (their W_UK rows converted once for all tokens) */
#define ABSORB_ROWS 4   /* W_UK rows per pass over a token's q_lat columns */

/* o[c] = fmaf(a[k], w[k][c], o[c]) for k = 0 .. m - 1 in order, c < n (one FMA per term: the
 * same bits however the rows are grouped) */
static inline void absorb_rows(float *o, const float *a, const float *const *w, int m, long n) {
    if (m == ABSORB_ROWS) {
        const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
        for (long c = 0; c < n; c++)
            o[c] = fmaf(a[3], w3[c], fmaf(a[2], w2[c], fmaf(a[1], w1[c], fmaf(a[0], w0[c], o[c]))));
        return;
    }
    for (int k = 0; k < m; k++)
        for (long c = 0; c < n; c++) o[c] = fmaf(a[k], w[k][c], o[c]);
}

void mt_mla_absorb(const mla_desc *L, int dt, long h, const float *q, long ldq, float *ql, long ldl, long T) {
    long C = L->C, dn = L->dn, dr = L->dr, dv = L->dv;
    float wf[ABSORB_ROWS][ABSORB_COLS];
    for (long t = 0; t < T; t++) memset(ql + t * ldl, 0, C * sizeof(float));
    for (long c0 = 0; c0 < C; c0 += ABSORB_COLS) {
        long n = C - c0 < ABSORB_COLS ? C - c0 : ABSORB_COLS;
        for (long d0 = 0; d0 < dn; d0 += ABSORB_ROWS) {
            int m = dn - d0 < ABSORB_ROWS ? (int)(dn - d0) : ABSORB_ROWS;
            const float *w[ABSORB_ROWS];
            for (int k = 0; k < m; k++) {
                long row = (h * (dn + dv) + d0 + k) * C + c0;
                if (dt == DT_F32) {
                    w[k] = (const float *)L->kvb + row;
                } else {
                    for (long c = 0; c < n; c++) wf[k][c] = ld(L->kvb, dt, row + c);
                    w[k] = wf[k];
                }
            }
            for (long t = 0; t < T; t++)
                absorb_rows(ql + t * ldl + c0, q + t * ldq + h * (dn + dr) + d0, w, m, n);
        }
    }
}

/* q_lat[h] = W_UK[h]^T q_nope[h], heads split over threads */
static void absorb_task(void *vctx, int tid, int nth) {
    const mla_ctx *A = (const mla_ctx *)vctx;
    const mla_desc *L = A->L;
    long h0 = L->nh * tid / nth, h1 = L->nh * (tid + 1) / nth;
    for (long h = h0; h < h1; h++) mt_mla_absorb(L, A->dt, h, A->M->q, 0, A->M->qlat + h * L->C, 0, 1);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MLA_AVX512 1

static inline __m512 ld16(const void *p, int dt, long i, __mmask16 m) {
    if (dt == DT_BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const bf16 *)p + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

static inline __mmask16 tail_mask(long left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

/* the 16 lanes summed as ((l[j] + l[j+8]) + (l[j+4] + l[j+12])) ... : hsum16's tree */
static inline float hsum16_v(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 1)));
}
#endif

/* 16 lane sums reduced: l[j] += l[j + 8], then + l[j + 4], + l[j + 2], + l[j + 1] */
static inline float hsum16(float *l) {
    for (int k = 8; k >= 1; k /= 2)
        for (int j = 0; j < k; j++) l[j] += l[j + k];
    return l[0];
}


/* rows of a matrix: row i at element i * ld of p (dtype dt), D columns */
typedef struct {
    const void *p;
    long ld;
    int dt;
    long D;
} mla_rows;

/* score[r][s] = scale * ([q1[r] | q2[r]] . [K1[s] | K2[s]]) for r < R <= MLA_ROWS, s < n (q1, q2
 * float rows ld1 / ld2 apart, as wide as K1 / K2): 16 lane accumulators (lane j takes the
 * elements j, j + 16, ... of the first part, then of the second, one FMA each), reduced by
 * hsum16's tree. Each score's bits depend only on its row and key. */
#ifdef MLA_AVX512
/* one block: R rows x NS keys from key s0; inlined with constant R, NS for the full blocks so the
 * accumulators stay in registers (with run-time bounds GCC kept them on the stack) */
static inline __attribute__((always_inline)) void scores_blk(float scale, const float *q1, long ld1, const float *q2,
                                                             long ld2, const int R, mla_rows K1, mla_rows K2, long s0,
                                                             const int NS, float *sc, long ldsc) {
    __m512 acc[MLA_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int k = 0; k < NS; k++) acc[r][k] = _mm512_setzero_ps();
    for (int part = 0; part < 2; part++) {
        mla_rows K = part ? K2 : K1;
        const float *q = part ? q2 : q1;
        long ldq = part ? ld2 : ld1;
        for (long c = 0; c < K.D; c += 16) {
            __mmask16 m = tail_mask(K.D - c);
            __m512 kv[4];
            for (int k = 0; k < NS; k++) kv[k] = ld16(K.p, K.dt, (s0 + k) * K.ld + c, m);
            for (int r = 0; r < R; r++) {
                __m512 qv = _mm512_maskz_loadu_ps(m, q + r * ldq + c);
                for (int k = 0; k < NS; k++) acc[r][k] = _mm512_fmadd_ps(qv, kv[k], acc[r][k]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int k = 0; k < NS; k++) sc[r * ldsc + s0 + k] = hsum16_v(acc[r][k]) * scale;
}
#endif

static void mla_scores(float scale, const float *q1, long ld1, const float *q2, long ld2, int R, mla_rows K1,
                       mla_rows K2, long n, float *sc, long ldsc) {
#ifdef MLA_AVX512
    for (long s0 = 0; s0 < n; s0 += 4) {
        int ns = n - s0 < 4 ? (int)(n - s0) : 4;
        if (R == MLA_ROWS && ns == 4)
            scores_blk(scale, q1, ld1, q2, ld2, MLA_ROWS, K1, K2, s0, 4, sc, ldsc);
        else
            scores_blk(scale, q1, ld1, q2, ld2, R, K1, K2, s0, ns, sc, ldsc);
    }
#else
    for (int r = 0; r < R; r++)
        for (long s = 0; s < n; s++) {
            float l[16] = {0};
            for (long c = 0; c < K1.D; c++) l[c & 15] = fmaf(q1[r * ld1 + c], ld(K1.p, K1.dt, s * K1.ld + c), l[c & 15]);
            for (long c = 0; c < K2.D; c++) l[c & 15] = fmaf(q2[r * ld2 + c], ld(K2.p, K2.dt, s * K2.ld + c), l[c & 15]);
            sc[r * ldsc + s] = hsum16(l) * scale;
        }
#endif
}

#ifdef MLA_AVX512
/* the 16-column chunks c0 .. c0 + 16 NC of R rows' outputs: keys s < nmin for every row, then
 * row r's up to n[r]. Inlined with constant R, NC for the full blocks so the accumulators stay in
 * registers (as scores_blk) */
static inline __attribute__((always_inline)) void values_blk(const int R, const float *p, long ldp, const long *n,
                                                             long nmin, long nmax, mla_rows V, long c0, const int NC,
                                                             const __mmask16 *m, float *o, long ldo) {
    __m512 acc[MLA_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = _mm512_setzero_ps();
    for (long s = 0; s < nmax; s++) {
        __m512 v[4];
        for (int c = 0; c < NC; c++) v[c] = ld16(V.p, V.dt, s * V.ld + c0 + 16 * c, m[c]);
        for (int r = 0; r < R; r++) {
            if (s >= nmin && s >= n[r]) continue;
            __m512 pv = _mm512_set1_ps(p[r * ldp + s]);
            for (int c = 0; c < NC; c++) acc[r][c] = _mm512_fmadd_ps(pv, v[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) _mm512_mask_storeu_ps(o + r * ldo + c0 + 16 * c, m[c], acc[r][c]);
}
#endif

/* o[r][c] = sum_{s < n[r]} p[r][s] V[s][c] (s ascending, one FMA per term) for r < R */
static void mla_values(int R, const float *p, long ldp, const long *n, mla_rows V, float *o, long ldo) {
    long nmin = n[0], nmax = n[0];
    for (int r = 1; r < R; r++) {
        if (n[r] < nmin) nmin = n[r];
        if (n[r] > nmax) nmax = n[r];
    }
#ifdef MLA_AVX512
    for (long c0 = 0; c0 < V.D; c0 += 64) {
        int nc = (int)((V.D - c0 + 15) / 16 < 4 ? (V.D - c0 + 15) / 16 : 4);
        __mmask16 m[4];
        for (int c = 0; c < nc; c++) m[c] = tail_mask(V.D - c0 - 16 * c);
        if (R == MLA_ROWS && nc == 4)
            values_blk(MLA_ROWS, p, ldp, n, nmin, nmax, V, c0, 4, m, o, ldo);
        else
            values_blk(R, p, ldp, n, nmin, nmax, V, c0, nc, m, o, ldo);
    }
#else
    (void)nmin;
    (void)nmax;
    for (int r = 0; r < R; r++) {
        float *orow = o + r * ldo;
        for (long c = 0; c < V.D; c++) orow[c] = 0.0f;
        for (long s = 0; s < n[r]; s++) {
            float pr = p[r * ldp + s];
            for (long c = 0; c < V.D; c++) orow[c] = fmaf(pr, ld(V.p, V.dt, s * V.ld + c), orow[c]);
        }
    }
#endif
}

/* R <= MLA_ROWS query rows over keys s < n[r]: scores, softmax per row, values */
static void attend(float scale, int R, const float *q1, long ld1, const float *q2, long ld2, mla_rows K1, mla_rows K2,
                   mla_rows V, const long *n, float *o, long ldo, float *sc) {
    long nmax = n[0];
    for (int r = 1; r < R; r++)
        if (n[r] > nmax) nmax = n[r];
    mla_scores(scale, q1, ld1, q2, ld2, R, K1, K2, nmax, sc, nmax);
    for (int r = 0; r < R; r++) {
        float *s = sc + r * nmax, mx = -INFINITY;
        for (long t = 0; t < n[r]; t++)
            if (s[t] > mx) mx = s[t];
        float inv = 1.0f / mt_softmax_exp(s, n[r], mx);
        for (long t = 0; t < n[r]; t++) s[t] *= inv;
    }
    mla_values(R, sc, nmax, n, V, o, ldo);
}

void mt_mla_attend_rows(const mla_desc *L, int dt, int R, const float *ql, const float *qr, long ldqr,
                        const void *Ckv, const void *Kr, long n, float *o, float *sc) {
    long C = L->C, ns[MLA_ROWS] = {n, n, n, n};
    mla_rows ckv = {Ckv, C, dt, C}, kr = {Kr, L->dr, dt, L->dr};
    for (int r0 = 0; r0 < R; r0 += MLA_ROWS) {
        int nr = R - r0 < MLA_ROWS ? R - r0 : MLA_ROWS;
        attend(L->scale, nr, ql + r0 * C, C, qr + r0 * ldqr, ldqr, ckv, kr, ckv, ns, o + r0 * C, C, sc);
    }
}

void mt_mla_attend_plain(const mla_desc *L, int dt, int R, const float *q, long ldq, const float *kv, long ldkv,
                         const void *Kr, const long *n, float *o, long ldo, float *sc) {
    long dn = L->dn, dr = L->dr;
    mla_rows k = {kv, ldkv, DT_F32, dn}, kr = {Kr, dr, dt, dr}, v = {kv + dn, ldkv, DT_F32, L->dv};
    attend(L->scale, R, q, ldq, q + dn, ldq, k, kr, v, n, o, ldo, sc);
}

/* softmax attention in the latent space, groups of MLA_ROWS heads split over threads */
static void mla_attn_task(void *vctx, int tid, int nth) {
    const mla_ctx *A = (const mla_ctx *)vctx;
    const mla_desc *L = A->L;
    long C = L->C, dn = L->dn, dr = L->dr, ng = (L->nh + MLA_ROWS - 1) / MLA_ROWS;
    float *sc = A->M->scores + (long)tid * MLA_ROWS * A->n;
    for (long g = ng * tid / nth; g < ng * (tid + 1) / nth; g++) {
        long h = g * MLA_ROWS;
        int R = L->nh - h < MLA_ROWS ? (int)(L->nh - h) : MLA_ROWS;
        mt_mla_attend_rows(L, A->dt, R, A->M->qlat + h * C, A->M->q + h * (dn + dr) + dn, dn + dr, A->Ckv, A->Kr,
                           A->n, A->M->olat + h * C, sc);
    }
}

void mt_mla_post(const mla_desc *L, int dt, float *q, float *kv, void *Ckv, void *Kr, long pos, const float *cs,
                 const float *sn) {
    long C = L->C, dn = L->dn, dr = L->dr;
    rms_norm(kv, L->kva_norm, dt, L->eps_lat, kv, C);
    float *kr = kv + C;
    for (long h = 0; h < L->nh; h++) {
        float *qr = q + h * (dn + dr) + dn;
        if (L->interleaved) deinterleave(qr, dr);
        rope(qr, cs, sn, (int)dr);
    }
    if (L->interleaved) deinterleave(kr, dr);
    rope(kr, cs, sn, (int)dr);
    if (dt == DT_BF16) {
        for (long c = 0; c < C; c++) ((bf16 *)Ckv)[pos * C + c] = f32_to_bf16(kv[c]);
        for (long r = 0; r < dr; r++) ((bf16 *)Kr)[pos * dr + r] = f32_to_bf16(kr[r]);
    } else {
        memcpy((float *)Ckv + pos * C, kv, C * 4);
        memcpy((float *)Kr + pos * dr, kr, dr * 4);
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
    mt_mla_post(L, dt, M->q, M->kv, Ckv, Kr, pos, cs, sn);
    long n = pos + 1;
    mla_ctx A = {L, M, dt, Ckv, Kr, n};
    int ath = nh * dn * C < PARALLEL_MIN_ELEMS ? 1 : nth;
    mt_gemv_item items[256];
    if (L->uk) { /* q_lat[h] = W_UK[h]^T q_nope[h] through the stored format's products */
        for (long h0 = 0; h0 < nh; h0 += 256) {
            int m = 0;
            for (long h = h0; h < nh && m < 256; h++, m++)
                items[m] = (mt_gemv_item){&L->uk[h], NULL, dt, M->q + h * (dn + dr), M->qlat + h * C, NULL, NULL};
            mt_run_gemvs(items, m, nth);
        }
    } else {
        parallel_run(absorb_task, &A, ath);
    }
    ath = n * nh * (2 * C + dr) < PARALLEL_MIN_ELEMS ? 1 : nth;
    long need = n * MLA_ROWS * ath;
    if (M->n_scores < need) {
        float *p = (float *)realloc(M->scores, need * 4);
        if (!p) return -1;
        M->scores = p;
        M->n_scores = need;
    }
    parallel_run(mla_attn_task, &A, ath);
    for (long h0 = 0; h0 < nh; h0 += 256) { /* W_UV[h] o_lat[h], heads in batches of 256 */
        int m = 0;
        for (long h = h0; h < nh && m < 256; h++, m++)
            items[m] = (mt_gemv_item){&L->uv[h], NULL, dt, M->olat + h * C, M->out + h * dv, NULL, NULL};
        mt_run_gemvs(items, m, nth);
    }
    mt_gemv_item o = {L->o_w, L->o_b, dt, M->out, S->ao, NULL, NULL};
    mt_run_gemvs(&o, 1, nth);
    for (long i = 0; i < H; i++) x[i] += S->ao[i];
    rms_norm(x, L->ln2, dt, L->eps, S->h, H);
    return 0;
}

void mt_route_grouped(const route_desc *R, const float *h, int dt, float *scores, float *choice, int64_t *ids,
                      float *w, int nth);

/* Every layer of one decode step in one call, for providers whose experts all stay in RAM (the
 * MLA counterpart of decode.c: mt_layers): per layer mt_mla_attention, then mt_dense_mlp (R[i]
 * NULL) or mt_route_grouped and mt_moe with the chosen experts' descriptors from the tables
 * ([n_layers * e_max]). The same functions in the same order as the Python-driven step (the
 * same bits). Ckv[i], Kr[i]: layer i's latent cache; scores / choice: [E] scratch; ids_out
 * [n_layers * 64]. With `ep` (expert parallelism, ep.h) each MoE layer's experts are exchanged
 * with the other ranks (mt_ep_moe; the tables hold this rank's experts). Returns 0, -1 - i when
 * layer i could not allocate attention scratch, or -2000 when the exchange failed (ep->err). */
int mt_mla_layers(const mla_desc *const *A, const layer_desc *const *F, const route_desc *const *R, int n_layers,
                  mla_scratch *M, scratch *S, int dt, float *x, void *const *Ckv, void *const *Kr, long pos,
                  const float *cs, const float *sn, float *scores, float *choice,
                  const mt_weight *const *gate_table, const mt_weight *const *up_table,
                  const mt_weight *const *down_table, long e_max, int64_t *ids_out, mt_ep *ep, int nth) {
    const mt_weight *g[64], *u[64], *d[64];
    float w[64];
    for (int i = 0; i < n_layers; i++) {
        if (mt_mla_attention(A[i], M, S, dt, x, Ckv[i], Kr[i], pos, cs, sn, nth)) return -1 - i;
        if (!R[i]) {
            mt_dense_mlp(F[i], S, dt, x, nth);
            continue;
        }
        int64_t *ids = ids_out + (long)i * 64;
        mt_route_grouped(R[i], S->h, dt, scores, choice, ids, w, nth);
        if (ep) {
            long o = (long)i * e_max;
            if (mt_ep_moe(ep, F[i], S, dt, x, i, ids, w, gate_table + o, up_table + o, down_table + o, nth))
                return MT_EP_FAILED;
            continue;
        }
        for (long j = 0; j < R[i]->topk; j++) {
            long k = (long)i * e_max + ids[j];
            g[j] = gate_table[k];
            u[j] = up_table[k];
            d[j] = down_table[k];
        }
        mt_moe(F[i], S, dt, x, (int)R[i]->topk, g, u, d, w, 1, nth);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* DeepSeek grouped top-k router (moetier/layers/routing.py: grouped_topk)               */

/* ids[k] (descending choice value, ties to the lower id), w[k]; scores/choice: [E] scratch */
void mt_route_grouped(const route_desc *R, const float *h, int dt, float *scores, float *choice, int64_t *ids,
                      float *w, int nth) {
    mt_gemv_item it = {R->w, NULL, dt, h, scores, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
    mt_route_pick(R, dt, scores, choice, ids, w);
}

void mt_route_pick(const route_desc *R, int dt, float *scores, float *choice, int64_t *ids, float *w) {
    long E = R->E, k = R->topk, G = R->n_group > 0 ? R->n_group : 1;
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
