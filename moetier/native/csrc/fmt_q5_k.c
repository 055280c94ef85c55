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

/* ---- vector kernels: the shared GGUF drivers (simd.h) over this format's scales and codes ---- */

MT_TARGET_AVX2 static void scales(const uint8_t *b, float *D, float *M) {
    const uint8_t *s = b + 4;
    uint16_t dh, mh;
    memcpy(&dh, b, 2);
    memcpy(&mh, b + 2, 2);
    float d = f16_to_f32_c(dh), dmin = f16_to_f32_c(mh);
    for (int j = 0; j < 8; j++) {
        int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        D[2 * j] = D[2 * j + 1] = d * (float)sc;
        M[2 * j] = M[2 * j + 1] = -(dmin * (float)m);
    }
}

MT_TARGET_AVX2 static __m128i codes(const uint8_t *b, int t) {
    int j = t >> 1, l0 = 16 * (t & 1);
    __m128i nib = _mm_and_si128(srl8(_mm_loadu_si128((const __m128i *)(b + 48 + 32 * (j >> 1) + l0)), 4 * (j & 1)),
                                _mm_set1_epi8(15));
    __m128i hb = _mm_and_si128(srl8(_mm_loadu_si128((const __m128i *)(b + 16 + l0)), j), _mm_set1_epi8(1));
    return _mm_or_si128(nib, _mm_slli_epi16(hb, 4));
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    ggml_rows_avx2(W, x, y, r0, r1, 256, 176, scales, codes);
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    ggml_rows_avx512(W, x, y, r0, r1, 256, 176, scales, codes);
}

const mt_fmt mt_fmt_q5_k = {MT_FMT_Q5_K, "q5_k", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
