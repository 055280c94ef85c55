/* q4_0 (GGUF): 18-byte blocks of 32: float16 d, 16 bytes (values 0..15 in the low nibbles,
 * 16..31 in the high ones); value = d * (q - 8). */
#include "simd.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 18;
        uint16_t dh;
        memcpy(&dh, b, 2);
        int q = (j < 16 ? b[2 + j] & 15 : b[2 + j - 16] >> 4) - 8;
        out[i] = f16_to_f32(dh) * (float)q;
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* ---- vector kernels: the shared GGUF drivers (simd.h) over this format's scales and codes ---- */

MT_TARGET_AVX2 static void scales(const uint8_t *b, float *D, float *M) {
    uint16_t dh;
    memcpy(&dh, b, 2);
    D[0] = D[1] = f16_to_f32_c(dh);
    M[0] = M[1] = 0.0f;
}

MT_TARGET_AVX2 static __m128i codes(const uint8_t *b, int t) {
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 2));
    return _mm_sub_epi8(_mm_and_si128(srl8(q, 4 * t), _mm_set1_epi8(15)), _mm_set1_epi8(8));
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    ggml_rows_avx2(W, x, y, r0, r1, 32, 18, scales, codes);
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    ggml_rows_avx512(W, x, y, r0, r1, 32, 18, scales, codes);
}

const mt_fmt mt_fmt_q4_0 = {MT_FMT_Q4_0, "q4_0", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
