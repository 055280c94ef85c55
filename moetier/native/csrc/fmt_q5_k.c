/* q5_k (GGUF): 176-byte super-blocks of 256: float16 d, float16 dmin, 12 bytes of 6-bit
 * (scale, min) as q4_k, 32 bytes of high bits (value v: bit v/32 of byte v%32), 128 bytes of
 * nibbles as q4_k; value = (d * sc) * q - (dmin * m). */
#include "simd.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) {
        const uint8_t *b = row + ((c0 + i) >> 8) * 176, *s = b + 4, *qh = b + 16, *qs = b + 48;
        uint16_t dh, mh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        float d = f16_to_f32(dh), dmin = f16_to_f32(mh), D[8], M[8];
        for (int j = 0; j < 8; j++) {
            int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
            int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
            D[j] = d * (float)sc;
            M[j] = dmin * (float)m;
        }
        for (int v = 0; v < 256; v++) {
            int j = v >> 5;
            int q = ((qs[32 * (j >> 1) + (v & 31)] >> (4 * (j & 1))) & 15) | (((qh[v & 31] >> j) & 1) << 4);
            out[i + v] = D[j] * (float)q - M[j];
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* ---- vector kernels: as q4_k's (D[j] * sum(q x) - M[j] * sum(x) per sub-block, the 32-value
 * sums of x prepared once per x); the 5-bit codes of the super-block are assembled 32 at a
 * time into a stack buffer (the reference's codes) ---- */

MT_TARGET_AVX2 static inline void codes256(const uint8_t *b, uint8_t *c) {
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    for (int p = 0; p < 4; p++) { /* qs[32p, 32p + 32): sub-blocks 2p (low nibbles) and 2p + 1 (high) */
        __m256i l = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * p));
        __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p), one), 4);
        __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p + 1), one), 4);
        _mm256_store_si256((__m256i *)(c + 64 * p), _mm256_or_si256(_mm256_and_si256(l, m4), h0));
        _mm256_store_si256((__m256i *)(c + 64 * p + 32), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, 4), m4), h1));
    }
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    long nb = W->cols / 256;
    uint8_t c[256] __attribute__((aligned(32)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, am = a0;
        for (long i = 0; i < nb; i++, b += 176) {
            __m256 Dv, Mv;
            kq_scales8(b, &Dv, &Mv);
            am = _mm256_fmadd_ps(Mv, _mm256_loadu_ps(xp + 8 * i), am);
            codes256(b, c);
            const float *xb = x + 256 * i;
            for (int j = 0; j < 8; j++) {
                __m256 s = _mm256_setzero_ps();
                for (int k = 0; k < 4; k++)
                    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + 32 * j + 8 * k)))),
                                        _mm256_loadu_ps(xb + 32 * j + 8 * k), s);
                __m256 d = _mm256_permutevar8x32_ps(Dv, _mm256_set1_epi32(j));
                if (j & 1) a1 = _mm256_fmadd_ps(d, s, a1);
                else a0 = _mm256_fmadd_ps(d, s, a0);
            }
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1)) - hsum256(am);
    }
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    long nb = W->cols / 256;
    uint8_t c[256] __attribute__((aligned(32)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        __m256 am = _mm256_setzero_ps();
        for (long i = 0; i < nb; i++, b += 176) {
            __m256 Dv, Mv;
            kq_scales8(b, &Dv, &Mv);
            am = _mm256_fmadd_ps(Mv, _mm256_loadu_ps(xp + 8 * i), am);
            codes256(b, c);
            __m512 Dz = _mm512_castps256_ps512(Dv);
            const float *xb = x + 256 * i;
            for (int j = 0; j < 8; j++) {
#define C16(o) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(c + (o)))))
                __m512 s = _mm512_mul_ps(C16(32 * j), _mm512_loadu_ps(xb + 32 * j));
                s = _mm512_fmadd_ps(C16(32 * j + 16), _mm512_loadu_ps(xb + 32 * j + 16), s);
#undef C16
                __m512 d = _mm512_permutexvar_ps(_mm512_set1_epi32(j), Dz);
                if (j & 1) a1 = _mm512_fmadd_ps(d, s, a1);
                else a0 = _mm512_fmadd_ps(d, s, a0);
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) - hsum256(am);
    }
}

const mt_fmt mt_fmt_q5_k = {MT_FMT_Q5_K, "q5_k", {rows_scalar, rows_avx2, rows_avx512}, sum32_len, sum32, dequant};
