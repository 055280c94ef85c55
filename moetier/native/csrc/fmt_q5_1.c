/* q5_1 (GGUF): 24-byte blocks of 32: float16 d, float16 m, uint32 high bits, 16 bytes of
 * nibbles; value = d * q + m. */
#include "simd.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 24;
        uint16_t dh, mh;
        uint32_t qh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        memcpy(&qh, b + 4, 4);
        int q = (j < 16 ? b[8 + j] & 15 : b[8 + j - 16] >> 4) | (int)(((qh >> j) & 1) << 4);
        out[i] = f16_to_f32(dh) * (float)q + f16_to_f32(mh);
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* ---- vector kernels: the shared GGUF drivers (simd.h) over this format's scales and codes ---- */

MT_TARGET_AVX2 static void scales(const uint8_t *b, float *D, float *M) {
    uint16_t dh, mh;
    memcpy(&dh, b, 2);
    memcpy(&mh, b + 2, 2);
    D[0] = D[1] = f16_to_f32_c(dh);
    M[0] = M[1] = f16_to_f32_c(mh);
}

MT_TARGET_AVX2 static __m128i codes(const uint8_t *b, int t) {
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    __m128i lo = _mm_and_si128(srl8(_mm_loadu_si128((const __m128i *)(b + 8)), 4 * t), _mm_set1_epi8(15));
    return _mm_or_si128(lo, _mm_slli_epi16(bits16(qh, 16 * t), 4));
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    ggml_rows_avx2(W, x, y, r0, r1, 32, 24, scales, codes);
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    ggml_rows_avx512(W, x, y, r0, r1, 32, 24, scales, codes);
}

const mt_fmt mt_fmt_q5_1 = {MT_FMT_Q5_1, "q5_1", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
