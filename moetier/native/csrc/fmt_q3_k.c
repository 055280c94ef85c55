/* q3_k (GGUF): 110-byte super-blocks of 256: 32 bytes of high-bit mask (value v: bit v/32 of
 * byte v%32; a CLEAR bit subtracts 4), 64 bytes of 2-bit q (as q2_k), 12 bytes of 6-bit scales
 * (minus 32, one per 16 values), float16 d; value = (d * sc) * q. */
#include "simd.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) {
        const uint8_t *b = row + ((c0 + i) >> 8) * 110, *hm = b, *qs = b + 32, *s = b + 96;
        uint16_t dh;
        memcpy(&dh, b + 108, 2);
        float d = f16_to_f32(dh), D[16];
        for (int j = 0; j < 16; j++) {
            int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4, hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
            D[j] = d * (float)((lo | (hi << 4)) - 32);
        }
        for (int v = 0; v < 256; v++) {
            int h = v >> 7, sh = (v >> 5) & 3, l = v & 31;
            int q = ((qs[32 * h + l] >> (2 * sh)) & 3) - (((hm[v & 31] >> (v >> 5)) & 1) ? 0 : 4);
            out[i + v] = D[v >> 4] * (float)q;
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* ---- vector kernels: the shared GGUF drivers (simd.h) over this format's scales and codes ---- */

MT_TARGET_AVX2 static void scales(const uint8_t *b, float *D, float *M) {
    const uint8_t *s = b + 96;
    uint16_t dh;
    memcpy(&dh, b + 108, 2);
    float d = f16_to_f32_c(dh);
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4, hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        D[j] = d * (float)((lo | (hi << 4)) - 32);
        M[j] = 0.0f;
    }
}

MT_TARGET_AVX2 static __m128i codes(const uint8_t *b, int t) {
    int h = t >> 3, s = (t >> 1) & 3, l0 = 16 * (t & 1);
    __m128i lo = _mm_and_si128(srl8(_mm_loadu_si128((const __m128i *)(b + 32 + 32 * h + l0)), 2 * s),
                               _mm_set1_epi8(3));
    __m128i hb = _mm_and_si128(srl8(_mm_loadu_si128((const __m128i *)(b + l0)), t >> 1), _mm_set1_epi8(1));
    return _mm_add_epi8(_mm_sub_epi8(lo, _mm_set1_epi8(4)), _mm_slli_epi16(hb, 2)); /* a clear bit subtracts 4 */
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    ggml_rows_avx2(W, x, y, r0, r1, 256, 110, scales, codes);
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    ggml_rows_avx512(W, x, y, r0, r1, 256, 110, scales, codes);
}

const mt_fmt mt_fmt_q3_k = {MT_FMT_Q3_K, "q3_k", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
