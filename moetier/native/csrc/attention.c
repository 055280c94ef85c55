/* Attention of one new token: norm, fused q/k/v, q/k norm, rope, cache write, attention
 * over the cache (parallel over query heads), o_proj, residual, post-attention norm. */
#include "mt.h"
#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MT_AVX512 1
#endif

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
/* Lane j: K's row base + j D (position j of a group of 16; zero for j >= m) dotted with q (qv:
 * its ND vectors of 16, dm their masks): one accumulator per position, then the 16 horizontal
 * sums as one transpose-add tree. Inlined with ND a constant for the common head sizes, so the
 * 16 accumulators stay in registers (the same operations, so the same bits, for every ND). */
static inline __attribute__((always_inline)) __m512 group_scores(const void *K, int kvdt, long base, long D, long m,
                                                                 const __m512 *qv, const __mmask16 *dm,
                                                                 const long ND) {
    __m512 a[16];
    for (int j = 0; j < 16; j++) {
        a[j] = _mm512_setzero_ps();
        if (j >= m) continue;
        for (long c = 0; c < ND; c++) a[j] = _mm512_fmadd_ps(ld16(K, kvdt, base + j * D + 16 * c, dm[c]), qv[c], a[j]);
    }
    return lanes16_sums(a);
}

/* o [NR x 16 columns, masks m] = sum over positions t < n of p_t V[base + t D] (t ascending, one
 * FMA per term), p_t = sc[t] * inv; inlined with NR a constant for the common head sizes, so
 * the accumulators stay in registers (the same operations, so the same bits, for every NR) */
static inline __attribute__((always_inline)) void attend_values(const void *V, int kvdt, long base, long D, long n,
                                                                const float *sc, float inv, float *o,
                                                                const __mmask16 *m, const long NR) {
    __m512 acc[8];
    for (long c = 0; c < NR; c++) acc[c] = _mm512_setzero_ps();
    for (long t = 0; t < n; t++) {
        __m512 p = _mm512_set1_ps(sc[t] * inv);
        for (long c = 0; c < NR; c++) acc[c] = _mm512_fmadd_ps(p, ld16(V, kvdt, base + t * D + 16 * c, m[c]), acc[c]);
    }
    for (long c = 0; c < NR; c++) _mm512_mask_storeu_ps(o + 16 * c, m[c], acc[c]);
}
#endif

static int ensure_scores(scratch *S, long cap, int nth) {
    long need = (cap > 0 ? cap : 1) * (long)nth;
    if (S->n_scores >= need) return 0;
    float *p = (float *)realloc(S->scores, need * 4);
    if (!p) return -1;
    S->scores = p;
    S->n_scores = need;
    return 0;
}

typedef struct {
    const layer_desc *L;
    const float *q;
    const void *K, *V;
    int kvdt;
    long cap, t0, t1;
    float *out, *scores;
} attn_ctx;

/* One query head over cache positions [t0, t0 + n) of kv head `kv`: o [D] = softmax(q . K^T *
 * scale) V; sc: n floats of scratch. Also the per-head body of the multi-token attention
 * (prefill.c), so a prefilled or batched token gets the bits of a single-token step. */
void mt_attend_head(const layer_desc *L, const float *q, const void *K, const void *V, int kvdt, long cap, long kv,
                    long t0, long n, float *o, float *sc) {
    long D = L->D;
    float mx = -INFINITY;
#ifdef MT_AVX512
    /* scores of 16 positions at a time: one accumulator per position (D / 16 FMAs each), then
     * the 16 horizontal sums as one transpose-add tree. Lane j's sum depends only on position
     * j's accumulator (the tree is the same for every lane), and positions past the end are
     * zero vectors, so each score has the same bits wherever its group starts. */
    long nd = (D + 15) / 16;
    __mmask16 dm[16];
    for (long c = 0; c < nd; c++) dm[c] = D - 16 * c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - 16 * c)) - 1);
    __m512 qv[16];
    if (nd <= 16) {
        for (long c = 0; c < nd; c++) qv[c] = _mm512_maskz_loadu_ps(dm[c], q + 16 * c);
        __m512 vmx = _mm512_set1_ps(-INFINITY), scale = _mm512_set1_ps(L->scale);
        for (long g = 0; g < n; g += 16) {
            long base = (kv * cap + t0 + g) * D, m = n - g;
            __m512 s = nd == 4 ? group_scores(K, kvdt, base, D, m, qv, dm, 4)    /* D = 64 */
                       : nd == 8 ? group_scores(K, kvdt, base, D, m, qv, dm, 8) /* D = 128 */
                                 : group_scores(K, kvdt, base, D, m, qv, dm, nd);
            s = _mm512_mul_ps(s, scale);
            __mmask16 live = n - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - g)) - 1);
            _mm512_mask_storeu_ps(sc + g, live, s);
            vmx = _mm512_mask_max_ps(vmx, live, vmx, s);
        }
        mx = _mm512_reduce_max_ps(vmx);
    } else
#endif
        for (long t = 0; t < n; t++) {
            long row = (kv * cap + t0 + t) * D;
            float s = 0.0f;
            for (long d = 0; d < D; d++) s += ld(K, kvdt, row + d) * q[d];
            s *= L->scale;
            sc[t] = s;
            if (s > mx) mx = s;
        }
    float inv = 1.0f / mt_softmax_exp(sc, n, mx);
#ifdef MT_AVX512
    /* o[d] = sum_t p_t V[t, d] (t ascending, one FMA per term): 16 columns per register, up
     * to 8 registers of o held across the positions */
    for (long d0 = 0; d0 < D; d0 += 128) {
        long nd = D - d0 < 128 ? D - d0 : 128, nr = (nd + 15) / 16, base = (kv * cap + t0) * D + d0;
        __mmask16 m[8];
        for (long c = 0; c < nr; c++) m[c] = nd - 16 * c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nd - 16 * c)) - 1);
        if (nr == 4) attend_values(V, kvdt, base, D, n, sc, inv, o + d0, m, 4); /* D = 64 */
        else if (nr == 8) attend_values(V, kvdt, base, D, n, sc, inv, o + d0, m, 8); /* D = 128, 256, ... */
        else attend_values(V, kvdt, base, D, n, sc, inv, o + d0, m, nr);
    }
#else
    for (long d = 0; d < D; d++) o[d] = 0.0f;
    for (long t = 0; t < n; t++) {
        float p = sc[t] * inv;
        long row = (kv * cap + t0 + t) * D;
        for (long d = 0; d < D; d++) o[d] = fmaf(p, ld(V, kvdt, row + d), o[d]);
    }
#endif
}

static void attn_task(void *vctx, int tid, int nth) {
    const attn_ctx *A = (const attn_ctx *)vctx;
    const layer_desc *L = A->L;
    long D = L->D, nh = L->nh, group = L->nh / L->nkv;
    long h0 = nh * tid / nth, h1 = nh * (tid + 1) / nth;
    float *sc = A->scores + (long)tid * (A->cap > 0 ? A->cap : 1);
    for (long h = h0; h < h1; h++)
        mt_attend_head(L, A->q + h * D, A->K, A->V, A->kvdt, A->cap, h / group, A->t0, A->t1 - A->t0, A->out + h * D, sc);
}

/* After the q/k/v projection of one token at `pos` (qkv = [q | k | v]): q/k norm, rope (cs/sn
 * its rows), k and v written into the cache K, V [nkv, cap, D] (model dtype dt). */
void mt_qkv_post(const layer_desc *L, int dt, float *qkv, void *K, void *V, long cap, long pos, const float *cs,
                 const float *sn) {
    long nh = L->nh, nkv = L->nkv, D = L->D;
    float *q = qkv, *k = qkv + nh * D, *v = qkv + (nh + nkv) * D;
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
}

/* x += o_proj(attn(norm1(x))); h = norm2(x); writes k, v of position `pos` into the cache.
 * K, V: [nkv, cap, D] in the model dtype; cs/sn: rope cos/sin [D] (float32) for `pos`. */
int mt_attention(const layer_desc *L, scratch *S, int dt, float *x, void *K, void *V, long cap, long pos,
                 const float *cs, const float *sn, int nth) {
    long H = L->H, nh = L->nh, nkv = L->nkv, D = L->D;
    rms_norm(x, L->ln1, dt, L->eps, S->h, H);
    float *q = S->qkv, *k = S->qkv + nh * D, *v = S->qkv + (nh + nkv) * D;
    if (L->qkv_w) {
        mt_gemv_item it = {L->qkv_w, L->qkv_b, dt, S->h, S->qkv, NULL, NULL};
        mt_run_gemvs(&it, 1, nth);
    } else {
        mt_gemv_item it[3] = {{L->q_w, L->q_b, dt, S->h, q, NULL, NULL},
                              {L->k_w, L->k_b, dt, S->h, k, NULL, NULL},
                              {L->v_w, L->v_b, dt, S->h, v, NULL, NULL}};
        mt_run_gemvs(it, 3, nth);
    }
    mt_qkv_post(L, dt, S->qkv, K, V, cap, pos, cs, sn);
    long t0 = 0;
    if (L->window > 0 && pos + 1 > L->window) t0 = pos + 1 - L->window;
    attn_ctx A = {L, q, K, V, dt, cap, t0, pos + 1, S->attn, S->scores};
    long work = (pos + 1 - t0) * nh * D;
    int ath = work < PARALLEL_MIN_ELEMS ? 1 : nth;
    if (ensure_scores(S, cap, ath)) return -1;
    A.scores = S->scores;
    parallel_run(attn_task, &A, ath);
    mt_gemv_item o = {L->o_w, L->o_b, dt, S->attn, S->ao, NULL, NULL};
    mt_run_gemvs(&o, 1, nth);
    for (long i = 0; i < H; i++) x[i] += S->ao[i];
    rms_norm(x, L->ln2, dt, L->eps, S->h, H);
    return 0;
}
