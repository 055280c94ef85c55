/* q8_0 (GGUF): 34-byte blocks of 32: float16 d, 32 int8 q; value = q * d. */
#include "simd.h"

#define QB 34

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i;
        const uint8_t *b = row + (c >> 5) * QB;
        uint16_t d;
        memcpy(&d, b, 2);
        out[i] = (float)(int8_t)b[2 + (c & 31)] * f16_to_f32(d);
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* Vector kernels: a block's dot product sum(q x) with the exact q (dot32_i8), then times d
 * (one product per block instead of one per weight; the summation differs from the reference's) */
MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long nb = W->cols / 32;
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            uint16_t dh;
            memcpy(&dh, b, 2);
            __m256 s = dot32_i8_avx2((const int8_t *)(b + 2), x + 32 * i), d = _mm256_set1_ps(f16_to_f32_c(dh));
            if (i & 1) a1 = _mm256_fmadd_ps(d, s, a1);
            else a0 = _mm256_fmadd_ps(d, s, a0);
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    long nb = W->cols / 32;
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            uint16_t dh;
            memcpy(&dh, b, 2);
            __m512 s = dot32_i8_avx512((const int8_t *)(b + 2), x + 32 * i), d = _mm512_set1_ps(f16_to_f32_c(dh));
            if (i & 1) a1 = _mm512_fmadd_ps(d, s, a1);
            else a0 = _mm512_fmadd_ps(d, s, a0);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* Tiles (mt_tile_fn): the row kernels above for n tokens at once (simd.h: i8_tile_*, the codes
 * converted to float once for the n tokens; the same bits) */
static inline const int8_t *codes(const uint8_t *b, int8_t *buf) {
    (void)buf;
    return (const int8_t *)(b + 2);
}

MT_TARGET_AVX2 static inline __attribute__((always_inline)) void tile_avx2_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1) {
    (void)xp;
    i8_tile_avx2(W, x, y, n, r0, r1, QB, codes);
}

MT_TARGET_AVX512 static inline __attribute__((always_inline)) void tile_avx512_n(const mt_weight *W,
                                                                                const float *const *x,
                                                                                const float *const *xp,
                                                                                float *const *y, const int n,
                                                                                long r0, long r1) {
    (void)xp;
    i8_tile_avx512(W, x, y, n, r0, r1, QB, codes);
}

MT_TILES(tile_avx2, tile_avx2_n, MT_TARGET_AVX2)
MT_TILES(tile_avx512, tile_avx512_n, MT_TARGET_AVX512)

const mt_fmt mt_fmt_q8_0 = {MT_FMT_Q8_0, "q8_0", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant,
                            {NULL, tile_avx2, tile_avx512}};
