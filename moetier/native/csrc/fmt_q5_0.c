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

/* ---- AVX-512 VNNI: integer dot products on x's digits (simd.h: blk32_*) ----
 * The 5-bit codes' values q - 16 in [-16, 16) are vpdpbusd's signed operand, x's biased digits
 * (blk32_prep, BLK32_HALVES: q5_0's nibble layout) the unsigned one; a block's lanes are scaled
 * in float by d times the chunk's digit scale. Per chunk of 4 blocks: their 4 x 16 nibble bytes, the 5th bits set from
 * the 4 qh words (a byte mask each for the low / high nibbles' values). */

/* the values q - 16 of the ng (<= 4) blocks at b as vl / vh (blk32 layout; -16 past them) and
 * the per-lane block scales d (blk32_chunk's f before the digit scale) */
MT_TARGET_VNNI static inline __attribute__((always_inline)) void chunk_q5(const uint8_t *b, long ng, __m512i *ul,
                                                                         __m512i *uh, __m512 *fd) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), b4 = _mm512_set1_epi8(0x10);
    const __m512i lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    uint64_t klo = 0, khi = 0, d4 = 0;
    __m512i v;
    if (ng == 4) {
        uint32_t q0, q1, q2, q3;
        uint16_t h0, h1, h2, h3;
        memcpy(&q0, b + 2, 4), memcpy(&q1, b + 24, 4), memcpy(&q2, b + 46, 4), memcpy(&q3, b + 68, 4);
        memcpy(&h0, b, 2), memcpy(&h1, b + 22, 2), memcpy(&h2, b + 44, 2), memcpy(&h3, b + 66, 2);
        klo = (uint64_t)(q0 & 0xffffu) | (uint64_t)(q1 & 0xffffu) << 16 | (uint64_t)(q2 & 0xffffu) << 32 |
              (uint64_t)(q3 & 0xffffu) << 48;
        khi = (uint64_t)(q0 >> 16) | (uint64_t)(q1 >> 16) << 16 | (uint64_t)(q2 >> 16) << 32 | (uint64_t)(q3 >> 16) << 48;
        d4 = (uint64_t)h0 | (uint64_t)h1 << 16 | (uint64_t)h2 << 32 | (uint64_t)h3 << 48;
        v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(b + 6)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 28)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 50)), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 72)), 3);
    } else {
        v = _mm512_setzero_si512();
        for (long g = 0; g < ng; g++) {
            uint32_t qh;
            uint16_t h;
            memcpy(&qh, b + 22 * g + 2, 4);
            memcpy(&h, b + 22 * g, 2);
            klo |= (uint64_t)(qh & 0xffffu) << (16 * g);
            khi |= (uint64_t)(qh >> 16) << (16 * g);
            d4 |= (uint64_t)h << (16 * g);
            v = _mm512_mask_loadu_epi8(v, (__mmask64)0xffff << (16 * g), b + 22 * g + 6 - 16 * g);
        }
    }
    const __m512i m16 = _mm512_set1_epi8(-16);
    __m512i ln = _mm512_add_epi8(_mm512_and_si512(v, m4), m16), hn = _mm512_add_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), m16);
    *ul = _mm512_mask_add_epi8(ln, (__mmask64)klo, ln, b4);
    *uh = _mm512_mask_add_epi8(hn, (__mmask64)khi, hn, b4);
    *fd = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128((long long)d4))));
}

MT_TARGET_VNNI static inline __attribute__((always_inline)) void tile_vnni_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1) {
    (void)x;
    long cols = W->cols, nch = blk32_nchunks(cols), nblk = cols / 32;
    row_sums S = {.y = y, .n = n, .k = 0, .r = r0};
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        __m512 acc[MT_TILE_T][3];
        for (int j = 0; j < n; j++) acc[j][0] = acc[j][1] = acc[j][2] = _mm512_setzero_ps();
        for (long c = 0; c < nch; c++) {
            __m512i ul, uh;
            __m512 fd;
            chunk_q5(row + 22 * 4 * c, nblk - 4 * c < 4 ? nblk - 4 * c : 4, &ul, &uh, &fd);
            __m512i bias = blk32_bias(ul, uh);
            for (int j = 0; j < n; j++)
                blk32_chunk(ul, uh, bias, (const __m512i *)(xp[j] + blk32_head(cols)) + BLK32_VECS * c,
                            _mm512_mul_ps(fd, _mm512_set1_ps(xp[j][c])), acc[j]);
        }
        for (int j = 0; j < n; j++) S.v[j][S.k] = digits_combine(acc[j]);
        row_sums_next(&S, r + 1 == r1);
    }
}

MT_TILES(tile_vnni, tile_vnni_n, MT_TARGET_VNNI)

/* the row kernel is the tile for one token (the same code, so the same bits) */
MT_TARGET_VNNI static void rows_vnni(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    tile_vnni_n(W, &x, &xp, &y, 1, r0, r1);
}

/* x is prepared for the avx512vnni kernels only */
static long prep_len(long cols, int isa) { return isa >= MT_ISA_AVX512VNNI ? blk32_len(cols) : 0; }

MT_TARGET_VNNI static void prep_vnni(const float *x, long cols, float *xp) { blk32_prep(x, cols, xp, BLK32_HALVES, 1.0f); }

static void prep(const float *x, long cols, float *xp, int isa) {
    if (isa >= MT_ISA_AVX512VNNI) prep_vnni(x, cols, xp);
}

const mt_fmt mt_fmt_q5_0 = {MT_FMT_Q5_0, "q5_0", {rows_scalar, rows_avx2, rows_avx512, rows_vnni}, prep_len, prep,
                            dequant, {NULL, tile_avx2, tile_avx512, tile_vnni}};
