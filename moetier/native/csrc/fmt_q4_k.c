/* q4_k (GGUF): 144-byte super-blocks of 256: float16 d, float16 dmin, 12 bytes of packed 6-bit
 * (scale, min) for 8 sub-blocks of 32, 128 bytes of nibbles (bytes 32i..32i+31: sub-block 2i in
 * the low nibbles, 2i+1 in the high ones). value = (d * sc) * q - (dmin * m). */
#include "simd.h"

#define QB 144

/* the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4) */
static inline void scale_min(const uint8_t *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* the 8 (d * sc, dmin * m) pairs of a super-block */
static inline void block_scales(const uint8_t *b, float *D, float *M) {
    uint16_t dh, mh;
    memcpy(&dh, b, 2);
    memcpy(&mh, b + 2, 2);
    float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        scale_min(b + 4, j, &sc, &m);
        D[j] = d * (float)sc;
        M[j] = dmin * (float)m;
    }
}

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) { /* c0 and n are multiples of 256 */
        const uint8_t *b = row + ((c0 + i) >> 8) * QB;
        float D[8], M[8];
        block_scales(b, D, M);
        for (int v = 0; v < 256; v++) {
            int j = v >> 5, q = (b[16 + 32 * (j >> 1) + (v & 31)] >> (4 * (j & 1))) & 15;
            out[i + v] = D[j] * (float)q - M[j];
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long nb = W->cols / 256;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            float D[8], M[8];
            block_scales(b, D, M);
            const float *xb = x + 256 * i;
            for (int p = 0; p < 4; p++) { /* 32 bytes -> sub-blocks 2p (low) and 2p+1 (high) */
                __m128i q0 = _mm_loadu_si128((const __m128i *)(b + 16 + 32 * p));
                __m128i q1 = _mm_loadu_si128((const __m128i *)(b + 32 + 32 * p));
                for (int h = 0; h < 2; h++) {
                    int j = 2 * p + h;
                    __m256 d = _mm256_set1_ps(D[j]), m = _mm256_set1_ps(M[j]);
                    __m128i n0 = h ? _mm_and_si128(_mm_srli_epi16(q0, 4), m4) : _mm_and_si128(q0, m4);
                    __m128i n1 = h ? _mm_and_si128(_mm_srli_epi16(q1, 4), m4) : _mm_and_si128(q1, m4);
                    __m128i qs[4] = {n0, _mm_srli_si128(n0, 8), n1, _mm_srli_si128(n1, 8)};
                    const float *xs = xb + 32 * j;
                    for (int k = 0; k < 4; k++) {
                        __m256 w = _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(qs[k])), d), m);
                        if (k & 1) a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + 8 * k), a1);
                        else a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + 8 * k), a0);
                    }
                }
            }
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    long nb = W->cols / 256;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            float D[8], M[8];
            block_scales(b, D, M);
            const float *xb = x + 256 * i;
            for (int p = 0; p < 4; p++) {
                __m128i q0 = _mm_loadu_si128((const __m128i *)(b + 16 + 32 * p));
                __m128i q1 = _mm_loadu_si128((const __m128i *)(b + 32 + 32 * p));
                for (int h = 0; h < 2; h++) {
                    int j = 2 * p + h;
                    __m512 d = _mm512_set1_ps(D[j]), m = _mm512_set1_ps(M[j]);
                    __m128i n0 = h ? _mm_and_si128(_mm_srli_epi16(q0, 4), m4) : _mm_and_si128(q0, m4);
                    __m128i n1 = h ? _mm_and_si128(_mm_srli_epi16(q1, 4), m4) : _mm_and_si128(q1, m4);
                    __m512 w0 = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(n0)), d), m);
                    __m512 w1 = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(n1)), d), m);
                    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + 32 * j), a0);
                    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 32 * j + 16), a1);
                }
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

const mt_fmt mt_fmt_q4_k = {MT_FMT_Q4_K, "q4_k", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
