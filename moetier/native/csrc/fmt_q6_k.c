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

/* Vector kernels: a super-block's 256 codes q - 32 are unpacked 32 at a time into int8 (the
 * same codes as the reference), then each 16 values become w = (d * sc) * (q - 32) (the
 * reference's product, so the same bits) and one FMA with x. */
MT_TARGET_AVX2 static inline void unpack_q6(const uint8_t *b, int8_t *q) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03), off = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; h++) { /* 128 values: ql[64h, 64h + 64), qh[32h, 32h + 32) */
        __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
        __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
        __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                         _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
        for (int s = 0; s < 4; s++) { /* values 128h + 32s + (0..31): 2-bit highs at bits 2s of qh */
            __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * s), m3), 4);
            _mm256_store_si256((__m256i *)(q + 128 * h + 32 * s), _mm256_sub_epi8(_mm256_or_si256(lo[s], hi), off));
        }
    }
}

/* the 16 scales d * sc of a super-block */
MT_TARGET_AVX2 static inline void scales16(const uint8_t *b, __m256 *lo, __m256 *hi) {
    uint16_t dh;
    memcpy(&dh, b + 208, 2);
    __m256 d = _mm256_set1_ps(f16_to_f32_c(dh));
    __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
    *lo = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    *hi = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long nb = W->cols / 256;
    int8_t q[256] __attribute__((aligned(32)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            unpack_q6(b, q);
            __m256 S[2];
            scales16(b, &S[0], &S[1]);
            const float *xb = x + 256 * i;
            for (int t = 0; t < 16; t++) { /* 16 values sharing one scale */
                __m256 D = _mm256_permutevar8x32_ps(S[t >> 3], _mm256_set1_epi32(t & 7));
                __m256 w0 = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * t)))));
                __m256 w1 = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * t + 8)))));
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
    int8_t q[256] __attribute__((aligned(64)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            unpack_q6(b, q);
            __m256 lo, hi;
            scales16(b, &lo, &hi);
            float Ds[16] __attribute__((aligned(64)));
            _mm256_store_ps(Ds, lo);
            _mm256_store_ps(Ds + 8, hi);
            const float *xb = x + 256 * i;
            for (int t = 0; t < 16; t += 2) {
                __m512 w0 = _mm512_mul_ps(_mm512_set1_ps(Ds[t]),
                                          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(q + 16 * t)))));
                __m512 w1 = _mm512_mul_ps(_mm512_set1_ps(Ds[t + 1]),
                                          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(q + 16 * t + 16)))));
                a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + 16 * t), a0);
                a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16 * t + 16), a1);
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* Tiles (mt_tile_fn): the row kernels above for n tokens at once, each token with its own
 * accumulators and the same operations in the same order (so the same bits); the unpacking and
 * the scaled weights w are computed once for the n tokens. Keep in sync with rows_avx2 /
 * rows_avx512 (tests/native/test_prefill.py compares the bits). */
MT_TARGET_AVX2 static inline __attribute__((always_inline)) void tile_avx2_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1) {
    (void)xp;
    long nb = W->cols / 256;
    int8_t q[256] __attribute__((aligned(32)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0[MT_TILE_T], a1[MT_TILE_T];
        for (int j = 0; j < n; j++) a0[j] = a1[j] = _mm256_setzero_ps();
        for (long i = 0; i < nb; i++, b += QB) {
            unpack_q6(b, q);
            __m256 S[2];
            scales16(b, &S[0], &S[1]);
            for (int t = 0; t < 16; t++) {
                __m256 D = _mm256_permutevar8x32_ps(S[t >> 3], _mm256_set1_epi32(t & 7));
                __m256 w0 = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * t)))));
                __m256 w1 = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * t + 8)))));
                for (int j = 0; j < n; j++) {
                    const float *xb = x[j] + 256 * i;
                    a0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + 16 * t), a0[j]);
                    a1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 16 * t + 8), a1[j]);
                }
            }
        }
        for (int j = 0; j < n; j++) y[j][r] = hsum256(_mm256_add_ps(a0[j], a1[j]));
    }
}

MT_TARGET_AVX512 static inline __attribute__((always_inline)) void tile_avx512_n(const mt_weight *W,
                                                                                const float *const *x,
                                                                                const float *const *xp,
                                                                                float *const *y, const int n,
                                                                                long r0, long r1) {
    (void)xp;
    long nb = W->cols / 256;
    int8_t q[256] __attribute__((aligned(64)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0[MT_TILE_T], a1[MT_TILE_T];
        for (int j = 0; j < n; j++) a0[j] = a1[j] = _mm512_setzero_ps();
        for (long i = 0; i < nb; i++, b += QB) {
            unpack_q6(b, q);
            __m256 lo, hi;
            scales16(b, &lo, &hi);
            float Ds[16] __attribute__((aligned(64)));
            _mm256_store_ps(Ds, lo);
            _mm256_store_ps(Ds + 8, hi);
            for (int t = 0; t < 16; t += 2) {
                __m512 w0 = _mm512_mul_ps(_mm512_set1_ps(Ds[t]),
                                          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(q + 16 * t)))));
                __m512 w1 = _mm512_mul_ps(_mm512_set1_ps(Ds[t + 1]),
                                          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(q + 16 * t + 16)))));
                for (int j = 0; j < n; j++) {
                    const float *xb = x[j] + 256 * i;
                    a0[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + 16 * t), a0[j]);
                    a1[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16 * t + 16), a1[j]);
                }
            }
        }
        for (int j = 0; j < n; j++) y[j][r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
    }
}

MT_TILES(tile_avx2, tile_avx2_n, MT_TARGET_AVX2)
MT_TILES(tile_avx512, tile_avx512_n, MT_TARGET_AVX512)

/* ---- AVX-512 VNNI: integer dot products on x's digits (simd.h) ----
 * A super-block's sum of (d sc_j) (q - 32) x = d sum_j sc_j sum_{i in j} q_i x_i - 32 sum_j D_j
 * sum_{i in j} x_i (D_j = d * sc_j, the reference's product): the unsigned 6-bit codes q, in
 * value order, multiply x's digits (vpdpbusd: 16 lane sums of 4 products, |P| <= 4 * 63 * 127,
 * an int16), weighted by their 16-value sub-block's int8 scale in integer (vpdpwssd); per
 * super-block and digit the total T is scaled once in float by d * s. Prepared x: the sums of
 * each 16 values, then one digit scale s per super-block, then per super-block the 3 digits of
 * its 256 values (value order; digit k of values 64v .. 64v + 63 at bytes 64 (3v + k)).
 * (Starting each lane at -32 times its digit sums instead, exact sums of (q - 32) a without the
 * float "- 32 D sum x" term, halves the heavy-tailed-x error but measured 10% slower: 12 more
 * 64-byte loads per super-block.) */

static long vnni_digits_at(long cols) { return (cols / 16 + cols / 256 + 15) & ~15L; } /* floats */

static long prep_len(long cols, int isa) { return isa >= MT_ISA_AVX512VNNI ? vnni_digits_at(cols) + 3 * cols / 4 : 0; }

MT_TARGET_VNNI static void prep_vnni(const float *x, long cols, float *xp, int isa) {
    (void)isa;
    for (long j = 0; j < cols / 16; j++) { /* fixed order */
        float t = 0.0f;
        for (int i = 0; i < 16; i++) t += x[16 * j + i];
        xp[j] = t;
    }
    float *S = xp + cols / 16;
    __m128i *A = (__m128i *)(xp + vnni_digits_at(cols));
    for (long i = 0; i < cols / 256; i++, x += 256, A += 48) {
        float amax = absmax(x, 256), s = digit_scale(amax), rinv = digit_rinv(amax);
        S[i] = s;
        for (int v = 0; v < 4; v++)
            for (int q = 0; q < 4; q++) {
                __m128i a[3];
                digits16(_mm512_loadu_ps(x + 64 * v + 16 * q), s, rinv, &a[0], &a[1], &a[2]);
                for (int k = 0; k < 3; k++) _mm_store_si128(A + 4 * (3 * v + k) + q, a[k]);
            }
    }
}

/* the 256 unsigned codes of a super-block as 4 byte vectors of 64 values each, in value order */
MT_TARGET_VNNI static inline void codes_vnni(const uint8_t *b, __m512i *w) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m3 = _mm512_set1_epi8(0x03);
    for (int h = 0; h < 2; h++) { /* values 128h + k: low nibble of ql[64h + k] (k < 64) or high of ql[64h + k - 64] */
        __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * h));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        /* 2-bit highs: qh[k % 32] >> 2 (k / 32) for k < 64, then >> 4, >> 6 for k >= 64 */
        __m512i h01 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
        __m512i hi0 = _mm512_slli_epi16(_mm512_and_si512(h01, m3), 4);
        __m512i hi1 = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h01, 4), m3), 4);
        w[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), hi0);
        w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), hi1);
    }
}

MT_TARGET_VNNI static inline __attribute__((always_inline)) void tile_vnni_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1) {
    (void)x;
    long nb = W->cols / 256, cols = W->cols;
    /* lanes 4t .. 4t + 3 of vector v (128-bit lane t): sub-block 4v + t */
    const __m512i idx[2] = {VSUB_INDEX(0, 4, 1, 5, 2, 6, 3, 7), VSUB_INDEX(8, 12, 9, 13, 10, 14, 11, 15)};
    row_sums S = {.y = y, .n = n, .k = 0, .r = r0};
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 acc[MT_TILE_T][3], am[MT_TILE_T];
        for (int j = 0; j < n; j++) acc[j][0] = acc[j][1] = acc[j][2] = am[j] = _mm512_setzero_ps();
        for (long i = 0; i < nb; i++, b += QB) {
            uint16_t dh;
            memcpy(&dh, b + 208, 2);
            float d = f16_to_f32_c(dh);
            __m128i sc8 = _mm_loadu_si128((const __m128i *)(b + 192));
            __m512i SCP[2], w[4];
            __m512 D = _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8)));
            vsub_scales(_mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8)), idx, SCP);
            codes_vnni(b, w);
            for (int j = 0; j < n; j++) {
                am[j] = _mm512_fmadd_ps(D, _mm512_loadu_ps(xp[j] + 16 * i), am[j]);
                const __m512i *A = (const __m512i *)(xp[j] + vnni_digits_at(cols)) + 12 * i;
                __m512 ds = _mm512_set1_ps(d * xp[j][cols / 16 + i]);
                vnni_scaled_digits4(w, A, SCP, ds, acc[j]);
            }
        }
        for (int j = 0; j < n; j++)
            S.v[j][S.k] = _mm512_fnmadd_ps(_mm512_set1_ps(32.0f), am[j], digits_combine(acc[j]));
        row_sums_next(&S, r + 1 == r1);
    }
}

MT_TILES(tile_vnni, tile_vnni_n, MT_TARGET_VNNI)

/* the row kernel is the tile for one token (the same code, so the same bits) */
MT_TARGET_VNNI static void rows_vnni(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    tile_vnni_n(W, &x, &xp, &y, 1, r0, r1);
}

/* x is prepared for the avx512vnni kernels only */
static void prep(const float *x, long cols, float *xp, int isa) {
    if (isa >= MT_ISA_AVX512VNNI) prep_vnni(x, cols, xp, isa);
}

const mt_fmt mt_fmt_q6_k = {MT_FMT_Q6_K, "q6_k", {rows_scalar, rows_avx2, rows_avx512, rows_vnni}, prep_len, prep,
                            dequant, {NULL, tile_avx2, tile_avx512, tile_vnni}};
