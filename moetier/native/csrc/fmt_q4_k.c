/* q4_k (GGUF): 144-byte super-blocks of 256: float16 d, float16 dmin, 12 bytes of packed 6-bit
 * (scale, min) for 8 sub-blocks of 32, 128 bytes of nibbles (bytes 32i..32i+31: sub-block 2i in
 * the low nibbles, 2i+1 in the high ones). value = (d * sc) * q - (dmin * m). */
#include "simd.h"

#define QB 144

/* the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4) */
static inline void scale_min(const uint8_t *q, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* the 8 (d * sc, dmin * m) pairs of a super-block */
static inline void block_scales(const uint8_t *b, float *D, float *M) {
    uint16_t dh, mh;
    memcpy(&dh, b, 2);
    memcpy(&mh, b + 2, 2);
    float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        scale_min(b + 4, j, &sc, &m);
        D[j] = d * (float)sc;
        M[j] = dmin * (float)m;
    }
}

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) { /* c0 and n are multiples of 256 */
        const uint8_t *b = row + ((c0 + i) >> 8) * QB;
        float D[8], M[8];
        block_scales(b, D, M);
        for (int v = 0; v < 256; v++) {
            int j = v >> 5, q = (b[16 + 32 * (j >> 1) + (v & 31)] >> (4 * (j & 1))) & 15;
            out[i + v] = D[j] * (float)q - M[j];
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* Vector kernels: sub-block j's dot product is factored as D[j] * sum(q x) - M[j] * sum(x), the
 * q exact small integers and sum(x) over each 32 values prepared once per x (`prep`): per 16
 * weights one extension, one convert and one FMA, no per-weight scale arithmetic. The values
 * are the reference's (D, M, q bit for bit); only the rounding of the sum differs. */
MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    long nb = W->cols / 256;
    const __m256i m4 = _mm256_set1_epi32(15);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, am = a0;
        for (long i = 0; i < nb; i++, b += QB) {
            __m256 Dv, Mv;
            kq_scales8(b, &Dv, &Mv);
            am = _mm256_fmadd_ps(Mv, _mm256_loadu_ps(xp + 8 * i), am);
            const float *xb = x + 256 * i;
            for (int p = 0; p < 4; p++) { /* qs[32p, 32p + 32): sub-block 2p (low), 2p + 1 (high) */
                const uint8_t *q = b + 16 + 32 * p;
                const float *xs = xb + 64 * p;
                __m256 s0 = _mm256_setzero_ps(), s1 = s0;
                for (int k = 0; k < 4; k++) {
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * k)));
                    s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m4)), _mm256_loadu_ps(xs + 8 * k), s0);
                    s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xs + 32 + 8 * k), s1);
                }
                a0 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(Dv, _mm256_set1_epi32(2 * p)), s0, a0);
                a1 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(Dv, _mm256_set1_epi32(2 * p + 1)), s1, a1);
            }
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1)) - hsum256(am);
    }
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    long nb = W->cols / 256;
    const __m512i m4 = _mm512_set1_epi32(15);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        __m256 am = _mm256_setzero_ps();
        for (long i = 0; i < nb; i++, b += QB) {
            __m256 Dv, Mv;
            kq_scales8(b, &Dv, &Mv);
            am = _mm256_fmadd_ps(Mv, _mm256_loadu_ps(xp + 8 * i), am);
            __m512 Dz = _mm512_castps256_ps512(Dv);
            const float *xb = x + 256 * i;
            for (int p = 0; p < 4; p++) { /* qs[32p, 32p + 32): sub-block 2p (low), 2p + 1 (high) */
                const uint8_t *q = b + 16 + 32 * p;
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
                __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
                const float *xs = xb + 64 * p;
                __m512 s0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v0, m4)), _mm512_loadu_ps(xs));
                __m512 s1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), _mm512_loadu_ps(xs + 32));
                s0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v1, m4)), _mm512_loadu_ps(xs + 16), s0);
                s1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), _mm512_loadu_ps(xs + 48), s1);
                a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_set1_epi32(2 * p), Dz), s0, a0);
                a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_set1_epi32(2 * p + 1), Dz), s1, a1);
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) - hsum256(am);
    }
}

/* Tiles (mt_tile_fn): the row kernels above for n tokens at once, each token with its own
 * accumulators and the same operations in the same order (so the same bits); the scales, the
 * nibble unpacking and the conversion to float are done once for the n tokens. Keep in sync
 * with rows_avx2 / rows_avx512 (tests/native/test_prefill.py compares the bits). */
MT_TARGET_AVX2 static inline __attribute__((always_inline)) void tile_avx2_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1) {
    long nb = W->cols / 256;
    const __m256i m4 = _mm256_set1_epi32(15);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0[MT_TILE_T], a1[MT_TILE_T], am[MT_TILE_T];
        for (int j = 0; j < n; j++) a0[j] = a1[j] = am[j] = _mm256_setzero_ps();
        for (long i = 0; i < nb; i++, b += QB) {
            __m256 Dv, Mv;
            kq_scales8(b, &Dv, &Mv);
            for (int j = 0; j < n; j++) am[j] = _mm256_fmadd_ps(Mv, _mm256_loadu_ps(xp[j] + 8 * i), am[j]);
            for (int p = 0; p < 4; p++) {
                const uint8_t *q = b + 16 + 32 * p;
                __m256 s0[MT_TILE_T], s1[MT_TILE_T];
                for (int j = 0; j < n; j++) s0[j] = s1[j] = _mm256_setzero_ps();
                for (int k = 0; k < 4; k++) {
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * k)));
                    __m256 wl = _mm256_cvtepi32_ps(_mm256_and_si256(v, m4)), wh = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                    for (int j = 0; j < n; j++) {
                        const float *xs = x[j] + 256 * i + 64 * p;
                        s0[j] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xs + 8 * k), s0[j]);
                        s1[j] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xs + 32 + 8 * k), s1[j]);
                    }
                }
                __m256 D0 = _mm256_permutevar8x32_ps(Dv, _mm256_set1_epi32(2 * p));
                __m256 D1 = _mm256_permutevar8x32_ps(Dv, _mm256_set1_epi32(2 * p + 1));
                for (int j = 0; j < n; j++) {
                    a0[j] = _mm256_fmadd_ps(D0, s0[j], a0[j]);
                    a1[j] = _mm256_fmadd_ps(D1, s1[j], a1[j]);
                }
            }
        }
        for (int j = 0; j < n; j++) y[j][r] = hsum256(_mm256_add_ps(a0[j], a1[j])) - hsum256(am[j]);
    }
}

MT_TARGET_AVX512 static inline __attribute__((always_inline)) void tile_avx512_n(const mt_weight *W,
                                                                                const float *const *x,
                                                                                const float *const *xp,
                                                                                float *const *y, const int n,
                                                                                long r0, long r1) {
    long nb = W->cols / 256;
    const __m512i m4 = _mm512_set1_epi32(15);
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0[MT_TILE_T], a1[MT_TILE_T];
        __m256 am[MT_TILE_T];
        for (int j = 0; j < n; j++) {
            a0[j] = a1[j] = _mm512_setzero_ps();
            am[j] = _mm256_setzero_ps();
        }
        for (long i = 0; i < nb; i++, b += QB) {
            __m256 Dv, Mv;
            kq_scales8(b, &Dv, &Mv);
            for (int j = 0; j < n; j++) am[j] = _mm256_fmadd_ps(Mv, _mm256_loadu_ps(xp[j] + 8 * i), am[j]);
            __m512 Dz = _mm512_castps256_ps512(Dv);
            for (int p = 0; p < 4; p++) { /* qs[32p, 32p + 32): sub-block 2p (low), 2p + 1 (high) */
                const uint8_t *q = b + 16 + 32 * p;
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
                __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
                __m512 w0l = _mm512_cvtepi32_ps(_mm512_and_si512(v0, m4)), w0h = _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4));
                __m512 w1l = _mm512_cvtepi32_ps(_mm512_and_si512(v1, m4)), w1h = _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4));
                __m512 D0 = _mm512_permutexvar_ps(_mm512_set1_epi32(2 * p), Dz);
                __m512 D1 = _mm512_permutexvar_ps(_mm512_set1_epi32(2 * p + 1), Dz);
                for (int j = 0; j < n; j++) {
                    const float *xs = x[j] + 256 * i + 64 * p;
                    __m512 s0 = _mm512_mul_ps(w0l, _mm512_loadu_ps(xs));
                    __m512 s1 = _mm512_mul_ps(w0h, _mm512_loadu_ps(xs + 32));
                    s0 = _mm512_fmadd_ps(w1l, _mm512_loadu_ps(xs + 16), s0);
                    s1 = _mm512_fmadd_ps(w1h, _mm512_loadu_ps(xs + 48), s1);
                    a0[j] = _mm512_fmadd_ps(D0, s0, a0[j]);
                    a1[j] = _mm512_fmadd_ps(D1, s1, a1[j]);
                }
            }
        }
        for (int j = 0; j < n; j++) y[j][r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j])) - hsum256(am[j]);
    }
}

MT_TILES(tile_avx2, tile_avx2_n, MT_TARGET_AVX2)
MT_TILES(tile_avx512, tile_avx512_n, MT_TARGET_AVX512)

/* ---- AVX-512 VNNI: integer dot products on x's digits (simd.h) ----
 * Prepared x: the 32-value sums (as above), then one digit scale s per super-block, then per
 * super-block 768 bytes of digits: for each of its 4 nibble vectors (qs[0, 64) low / high
 * nibbles = sub-blocks (0, 2) / (1, 3), qs[64, 128) = (4, 6) / (5, 7)) the 3 digits of the 64
 * values they multiply, in that order.
 * Per nibble vector and digit one vpdpbusd gives 16 lane sums P of 4 products (|P| <= 4 * 15 *
 * 127: an int16), weighted by their sub-block's 6-bit scale sc in integer (vpdpwssd: the low
 * int16 of P times sc); per super-block and digit the int32 total T (|T| <= 4 * 63 * 7620) is
 * scaled once in float: acc += (d * s) * T, the three digits' accumulators combined at the end
 * (digits_reduce). The "- dmin * m" term uses the float sums of x, as the kernels above.
 * (Measured on Zen 4, where the vector-op count per super-block decides: joining the three
 * digit sums in integer first (shifts and adds), packing two vectors' P per vpdpwssd or
 * vpmaddubsw instead of vpdpbusd were all slower.) */

static long vnni_digits_at(long cols) { return (cols / 32 + cols / 256 + 15) & ~15L; } /* floats */

static long prep_len(long cols, int isa) { return isa >= MT_ISA_AVX512VNNI ? vnni_digits_at(cols) + 3 * cols / 4 : cols / 32; }

MT_TARGET_VNNI static void prep_vnni(const float *x, long cols, float *xp) {
    float *S = xp + cols / 32;
    __m128i *A = (__m128i *)(xp + vnni_digits_at(cols));
    for (long i = 0; i < cols / 256; i++, x += 256) {
        float amax = absmax(x, 256), s = digit_scale(amax), rinv = digit_rinv(amax);
        S[i] = s;
        for (int v = 0; v < 4; v++) /* nibble vector v: sub-blocks 4 (v / 2) + (v % 2) and the one 2 above */
            for (int q = 0; q < 4; q++) { /* its 16-value quarter q */
                __m128i a[3];
                digits16(_mm512_loadu_ps(x + 128 * (v >> 1) + 32 * (v & 1) + 64 * (q >> 1) + 16 * (q & 1)), s, rinv,
                         &a[0], &a[1], &a[2]);
                for (int k = 0; k < 3; k++) _mm_store_si128(A + 4 * (3 * v + k) + q, a[k]);
            }
        A += 48;
    }
}

static void prep(const float *x, long cols, float *xp, int isa) {
    sum32(x, cols, xp, isa);
    if (isa >= MT_ISA_AVX512VNNI) prep_vnni(x, cols, xp);
}

MT_TARGET_VNNI static inline __attribute__((always_inline)) void tile_vnni_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1) {
    (void)x;
    long nb = W->cols / 256, cols = W->cols;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    /* nibble vector v's lanes 0-7 / 8-15: sub-blocks (0, 2), (1, 3), (4, 6), (5, 7) for v = 0..3 */
    const __m512i idx[2] = {VSUB_INDEX(0, 1, 0, 1, 2, 3, 2, 3), VSUB_INDEX(4, 5, 4, 5, 6, 7, 6, 7)};
    row_sums S = {.y = y, .n = n, .k = 0, .r = r0};
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 acc[MT_TILE_T][2];
        __m256 am[MT_TILE_T];
        for (int j = 0; j < n; j++) {
            acc[j][0] = acc[j][1] = _mm512_setzero_ps();
            am[j] = _mm256_setzero_ps();
        }
        for (long i = 0; i < nb; i++, b += QB) {
            /* the scales unpacked in general registers (kq_scale_min_bytes' fields as two words), then
             * few vector ops: Zen 4 runs this kernel at its vector-op count */
            uint32_t dd, u0, u1, u2;
            memcpy(&dd, b, 4), memcpy(&u0, b + 4, 4), memcpy(&u1, b + 8, 4), memcpy(&u2, b + 12, 4);
            uint64_t sc8 = (u0 & 0x3f3f3f3fu) | (uint64_t)((u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4)) << 32;
            uint64_t m8 = (u1 & 0x3f3f3f3fu) | (uint64_t)(((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4)) << 32;
            __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dd)); /* d, dmin */
            __m512 dz = _mm512_broadcastss_ps(dm);
            __m256 Mv = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), _mm256_set1_epi32(1)),
                                      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m8))));
            __m512i SCP[2], SCP256[2], w[4];
            vsub_scales(_mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc8))), idx, SCP);
            SCP256[0] = _mm512_slli_epi16(SCP[0], 8);
            SCP256[1] = _mm512_slli_epi16(SCP[1], 8);
            __m512i v0 = _mm512_loadu_si512((const void *)(b + 16)), v1 = _mm512_loadu_si512((const void *)(b + 80));
            w[0] = _mm512_and_si512(v0, m4);
            w[1] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
            w[2] = _mm512_and_si512(v1, m4);
            w[3] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
            for (int j = 0; j < n; j++) {
                am[j] = _mm256_fmadd_ps(Mv, _mm256_loadu_ps(xp[j] + 8 * i), am[j]);
                const __m512i *A = (const __m512i *)(xp[j] + vnni_digits_at(cols)) + 12 * i;
                __m512 ds = _mm512_mul_ps(dz, _mm512_set1_ps(xp[j][cols / 32 + i]));
                vnni_scaled_digits4_join(w, A, SCP, SCP256, ds, acc[j]);
            }
        }
        for (int j = 0; j < n; j++) S.v[j][S.k] = _mm512_sub_ps(digits_combine2(acc[j]), _mm512_zextps256_ps512(am[j]));
        row_sums_next(&S, r + 1 == r1);
    }
}

MT_TILES(tile_vnni, tile_vnni_n, MT_TARGET_VNNI)

/* the row kernel is the tile for one token (the same code, so the same bits) */
MT_TARGET_VNNI static void rows_vnni(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    tile_vnni_n(W, &x, &xp, &y, 1, r0, r1);
}

const mt_fmt mt_fmt_q4_k = {MT_FMT_Q4_K, "q4_k", {rows_scalar, rows_avx2, rows_avx512, rows_vnni}, prep_len, prep,
                            dequant, {NULL, tile_avx2, tile_avx512, tile_vnni}};
