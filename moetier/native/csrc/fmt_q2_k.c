/* q2_k (GGUF): 84-byte super-blocks of 256: 16 scale bytes (low nibble scale, high nibble min,
 * one per 16 values), 64 bytes of 2-bit q (value 128h + 32s + l in bits 2s of byte 32h + l),
 * float16 d, float16 dmin; value = (d * sc) * q - (dmin * m). */
#include "simd.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) {
        const uint8_t *b = row + ((c0 + i) >> 8) * 84, *sc = b, *qs = b + 16;
        uint16_t dh, mh;
        memcpy(&dh, b + 80, 2);
        memcpy(&mh, b + 82, 2);
        float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
        for (int v = 0; v < 256; v++) {
            int h = v >> 7, s = (v >> 5) & 3, l = v & 31;
            int q = (qs[32 * h + l] >> (2 * s)) & 3;
            out[i + v] = (d * (float)(sc[v >> 4] & 15)) * (float)q - dmin * (float)(sc[v >> 4] >> 4);
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* ---- vector kernels: the shared GGUF drivers (simd.h) over this format's scales and codes ---- */

MT_TARGET_AVX2 static void scales(const uint8_t *b, float *D, float *M) {
    uint16_t dh, mh;
    memcpy(&dh, b + 80, 2);
    memcpy(&mh, b + 82, 2);
    float d = f16_to_f32_c(dh), dmin = f16_to_f32_c(mh);
    for (int t = 0; t < 16; t++) {
        D[t] = d * (float)(b[t] & 15);
        M[t] = -(dmin * (float)(b[t] >> 4));
    }
}

/* 2-bit fields of chunk t (values 16t ..): bits 2s of bytes 32h + l0 .. of qs */
MT_TARGET_AVX2 static inline __m128i low2(const uint8_t *qs, int t) {
    int h = t >> 3, s = (t >> 1) & 3, l0 = 16 * (t & 1);
    return _mm_and_si128(srl8(_mm_loadu_si128((const __m128i *)(qs + 32 * h + l0)), 2 * s), _mm_set1_epi8(3));
}

MT_TARGET_AVX2 static __m128i codes(const uint8_t *b, int t) { return low2(b + 16, t); }

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    ggml_rows_avx2(W, x, y, r0, r1, 256, 84, scales, codes);
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    ggml_rows_avx512(W, x, y, r0, r1, 256, 84, scales, codes);
}

const mt_fmt mt_fmt_q2_k = {MT_FMT_Q2_K, "q2_k", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
