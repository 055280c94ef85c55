/* q6_k (GGUF): 210-byte super-blocks of 256: 128 bytes of low nibbles (ql), 64 bytes of 2-bit
 * highs (qh), 16 int8 scales (one per 16 values), float16 d. In each half h (128 values):
 * value h*128 + k takes the low nibble of ql[64h + k] (k < 64) or the high nibble of
 * ql[64h + k - 64], and bits 2s..2s+1 of qh[32h + k % 32] with s = k / 32.
 * value = (d * sc[v / 16]) * (q - 32). */
#include "simd.h"

#define QB 210

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) {
        const uint8_t *b = row + ((c0 + i) >> 8) * QB, *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        uint16_t dh;
        memcpy(&dh, b + 208, 2);
        float d = f16_to_f32(dh);
        for (int v = 0; v < 256; v++) {
            int h = v >> 7, k = v & 127;
            int lo = k < 64 ? ql[64 * h + k] & 15 : ql[64 * h + k - 64] >> 4;
            int hi = (qh[32 * h + (k & 31)] >> (2 * (k >> 5))) & 3;
            out[i + v] = (d * (float)sc[v >> 4]) * (float)((lo | (hi << 4)) - 32);
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* 16 bytes of 6-bit values (value order) for k = 16t .. 16t+15 of half h */
MT_TARGET_AVX2 static inline __m128i q6x16(const uint8_t *ql, const uint8_t *qh, int k) {
    const __m128i m4 = _mm_set1_epi8(0x0f), m2 = _mm_set1_epi8(0x03);
    __m128i l = _mm_loadu_si128((const __m128i *)(ql + (k & 63)));
    l = k < 64 ? _mm_and_si128(l, m4) : _mm_and_si128(_mm_srli_epi16(l, 4), m4);
    __m128i hb = _mm_loadu_si128((const __m128i *)(qh + (k & 31)));
    int s = 2 * (k >> 5);
    hb = _mm_and_si128(_mm_srl_epi16(hb, _mm_cvtsi32_si128(s)), m2);
    return _mm_or_si128(l, _mm_slli_epi16(hb, 4)); /* hb < 4: no carry across bytes */
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long nb = W->cols / 256;
    const __m256i off = _mm256_set1_epi32(32);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            const int8_t *sc = (const int8_t *)(b + 192);
            uint16_t dh;
            memcpy(&dh, b + 208, 2);
            float d = f16_to_f32_c(dh);
            const float *xb = x + 256 * i;
            for (int t = 0; t < 16; t++) { /* 16 values sharing one scale */
                int h = t >> 3, k = 16 * (t & 7);
                __m128i q = q6x16(b + 64 * h, b + 128 + 32 * h, k);
                __m256 D = _mm256_set1_ps(d * (float)sc[t]);
                __m256 w0 = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(q), off)));
                __m256 w1 = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_sub_epi32(
                                                 _mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)), off)));
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + 16 * t), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 16 * t + 8), a1);
            }
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    long nb = W->cols / 256;
    const __m512i off = _mm512_set1_epi32(32);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            const int8_t *sc = (const int8_t *)(b + 192);
            uint16_t dh;
            memcpy(&dh, b + 208, 2);
            float d = f16_to_f32_c(dh);
            const float *xb = x + 256 * i;
            for (int t = 0; t < 16; t += 2) {
                int h = t >> 3, k = 16 * (t & 7);
                __m128i q0 = q6x16(b + 64 * h, b + 128 + 32 * h, k);
                __m128i q1 = q6x16(b + 64 * h, b + 128 + 32 * h, k + 16);
                __m512 w0 = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[t]),
                                          _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q0), off)));
                __m512 w1 = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[t + 1]),
                                          _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q1), off)));
                a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + 16 * t), a0);
                a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16 * t + 16), a1);
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

const mt_fmt mt_fmt_q6_k = {MT_FMT_Q6_K, "q6_k", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
