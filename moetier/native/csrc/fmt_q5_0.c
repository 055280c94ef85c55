/* q5_0 (GGUF): 22-byte blocks of 32: float16 d, uint32 high bits (bit j = value j's 5th bit),
 * 16 bytes of nibbles (as q4_0); value = d * (q - 16). */
#include "simd.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 22;
        uint16_t dh;
        uint32_t qh;
        memcpy(&dh, b, 2);
        memcpy(&qh, b + 2, 4);
        int q = (j < 16 ? b[6 + j] & 15 : b[6 + j - 16] >> 4) | (int)(((qh >> j) & 1) << 4);
        out[i] = f16_to_f32(dh) * (float)(q - 16);
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* ---- vector kernels: a block's 32 codes (q - 16) unpacked at once into int8 (the reference's
 * codes), then dot32_i8 and one product with d per block (simd.h) ---- */

MT_TARGET_AVX2 static inline void codes32(const uint8_t *b, int8_t *q) {
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    __m128i qs = _mm_loadu_si128((const __m128i *)(b + 6));
    const __m128i m4 = _mm_set1_epi8(15);
    __m256i lo = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), _mm_and_si128(qs, m4));
    __m256i hi = _mm256_and_si256(bytes_from_bits32(qh), _mm256_set1_epi8(16));
    _mm256_store_si256((__m256i *)q, _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(16)));
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long nb = W->cols / 32;
    int8_t q[32] __attribute__((aligned(32)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += 22) {
            uint16_t dh;
            memcpy(&dh, b, 2);
            codes32(b, q);
            __m256 s = dot32_i8_avx2(q, x + 32 * i), d = _mm256_set1_ps(f16_to_f32_c(dh));
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
    int8_t q[32] __attribute__((aligned(32)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += 22) {
            uint16_t dh;
            memcpy(&dh, b, 2);
            codes32(b, q);
            __m512 s = dot32_i8_avx512(q, x + 32 * i), d = _mm512_set1_ps(f16_to_f32_c(dh));
            if (i & 1) a1 = _mm512_fmadd_ps(d, s, a1);
            else a0 = _mm512_fmadd_ps(d, s, a0);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* Tiles (mt_tile_fn): the row kernels above for n tokens at once (simd.h: i8_tile_*, each
 * block's codes unpacked and converted to float once for the n tokens; the same bits) */
MT_TARGET_AVX2 static inline const int8_t *codes(const uint8_t *b, int8_t *buf) {
    codes32(b, buf);
    return buf;
}

MT_TARGET_AVX2 static inline __attribute__((always_inline)) void tile_avx2_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1) {
    (void)xp;
    i8_tile_avx2(W, x, y, n, r0, r1, 22, codes);
}

MT_TARGET_AVX512 static inline __attribute__((always_inline)) void tile_avx512_n(const mt_weight *W,
                                                                                const float *const *x,
                                                                                const float *const *xp,
                                                                                float *const *y, const int n,
                                                                                long r0, long r1) {
    (void)xp;
    i8_tile_avx512(W, x, y, n, r0, r1, 22, codes);
}

MT_TILES(tile_avx2, tile_avx2_n, MT_TARGET_AVX2)
MT_TILES(tile_avx512, tile_avx512_n, MT_TARGET_AVX512)

const mt_fmt mt_fmt_q5_0 = {MT_FMT_Q5_0, "q5_0", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant,
                            {NULL, tile_avx2, tile_avx512}};
