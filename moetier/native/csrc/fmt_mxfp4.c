/* MXFP4 (OCP microscaling: e2m1 elements, one e8m0 exponent per 32), two layouts:
 *  mxfp4 (gpt-oss): row bytes = 16 per group, value 2k in byte k's low nibble, 2k+1 in its high
 *    nibble; the exponents in a separate uint8 [rows, groups] tensor (scale, sdt = DT_E8M0).
 *  ggml_mxfp4 (GGUF): 17-byte blocks (exponent, 16 bytes); values 0..15 are the low nibbles,
 *    16..31 the high nibbles.
 * value = E2M1[code] * 2^(e - 127) (e = 255: NaN). */
#include "nibble.h"

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    const uint8_t *e = (const uint8_t *)mt_srow(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i;
        out[i] = E2M1[(row[c >> 1] >> ((c & 1) * 4)) & 15] * e8m0_to_f32(e[c >> 5]);
    }
}

static void dequant_ggml(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 17;
        out[i] = E2M1[(j < 16 ? b[1 + j] : b[1 + j - 16] >> 4) & 15] * e8m0_to_f32(b[0]);
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

static void rows_scalar_ggml(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant_ggml);
}

/* ---- AVX2: 8 codes -> 8 floats: magnitude by an 8-entry permute, sign from bit 3 ---- */

MT_TARGET_AVX2 static inline __m256 e2m1x8(__m128i codes8, __m256 s) {
    const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    __m256i c = _mm256_cvtepu8_epi32(codes8);
    __m256 v = _mm256_permutevar8x32_ps(mag, c); /* uses the low 3 bits */
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(8)), 28);
    return _mm256_mul_ps(_mm256_xor_ps(v, _mm256_castsi256_ps(sign)), s);
}

/* one 32-value group: codes as 32 bytes in value order (lo16: values 0..15, hi16: 16..31) */
MT_TARGET_AVX2 static inline void group_avx2(__m128i lo16, __m128i hi16, __m256 s, const float *x, long n,
                                             __m256 *a0, __m256 *a1) {
    __m128i q[4] = {lo16, _mm_srli_si128(lo16, 8), hi16, _mm_srli_si128(hi16, 8)};
    for (int k = 0; k < 4; k++) {
        long c = 8 * k;
        if (c >= n) break;
        __m256 w = e2m1x8(q[k], s);
        __m256 xv = c + 8 <= n ? _mm256_loadu_ps(x + c) : _mm256_maskload_ps(x + c, mask256(n - c));
        if (k & 1) *a1 = _mm256_fmadd_ps(w, xv, *a1);
        else *a0 = _mm256_fmadd_ps(w, xv, *a0);
    }
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long cols = W->cols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const uint8_t *e = (const uint8_t *)mt_srow(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long c = 0; c < cols; c += 32) {
            __m256 s = _mm256_set1_ps(e8m0_to_f32(e[c >> 5]));
            __m128i lo = nibbles_interleaved(_mm_loadl_epi64((const __m128i *)(row + c / 2)));
            __m128i hi = nibbles_interleaved(_mm_loadl_epi64((const __m128i *)(row + c / 2 + 8)));
            group_avx2(lo, hi, s, x + c, cols - c, &a0, &a1);
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX2 static void rows_avx2_ggml(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                          long r1) {
    (void)xp;
    long cols = W->cols;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long c = 0; c < cols; c += 32) {
            const uint8_t *b = row + (c >> 5) * 17;
            __m256 s = _mm256_set1_ps(e8m0_to_f32(b[0]));
            __m128i q = _mm_loadu_si128((const __m128i *)(b + 1));
            group_avx2(_mm_and_si128(q, m4), _mm_and_si128(_mm_srli_epi16(q, 4), m4), s, x + c, cols - c, &a0, &a1);
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

/* ---- AVX-512: 16 codes -> 16 floats by one 16-entry permute ---- */

MT_TARGET_AVX512 static inline void group_avx512(__m128i lo16, __m128i hi16, __m512 s, const float *x, long n,
                                                 __m512 *a0, __m512 *a1) {
    const __m512 tab = _mm512_loadu_ps(E2M1);
    __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo16), tab), s);
    __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi16), tab), s);
    if (n >= 32) {
        *a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), *a0);
        *a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), *a1);
        return;
    }
    __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    *a0 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x), *a0);
    if (n > 16) *a1 = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps((__mmask16)((1u << (n - 16)) - 1), x + 16), *a1);
}

/* gpt-oss layout: the nibble-table kernel (nibble.h) on x's even / odd columns; the table of
 * group gi is E2M1 * 2^(e - 127), the reference's single multiply */
MT_TARGET_AVX512 static inline __m512 mxfp4_table(const mt_weight *W, const void *srow, const int8_t *z, long gi) {
    (void)W;
    (void)z;
    return _mm512_mul_ps(_mm512_loadu_ps(E2M1), _mm512_set1_ps(e8m0_to_f32(((const uint8_t *)srow)[gi])));
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)x;
    nib_rows512(W, xp, y, r0, r1, mxfp4_table);
}

MT_TARGET_AVX512 static void rows_avx512_ggml(const mt_weight *W, const float *x, const float *xp, float *y,
                                              long r0, long r1) {
    (void)xp;
    long cols = W->cols;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long c = 0; c < cols; c += 32) {
            const uint8_t *b = row + (c >> 5) * 17;
            __m512 s = _mm512_set1_ps(e8m0_to_f32(b[0]));
            __m128i q = _mm_loadu_si128((const __m128i *)(b + 1));
            group_avx512(_mm_and_si128(q, m4), _mm_and_si128(_mm_srli_epi16(q, 4), m4), s, x + c, cols - c, &a0,
                         &a1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* ---- AVX-512 VNNI: integer dot products on x's digits (simd.h: blk32_*) ----
 * 2 * e2m1 is an integer in [-12, 12] and 2^(e - 127) / 2 a power of two, so a 32-value group
 * times x's int8 digits is exact in int32. The weights enter vpdpbusd as its signed operand
 * (one vpshufb of the nibble: 2 * E2M1[code] in [-12, 12]), x's biased digits as the unsigned
 * one (prepared by blk32_prep with the digit scale halved); each lane's
 * sum scaled in float by its group's 2^(e - 127) times s / 2. Layouts: mxfp4 (gpt-oss) is
 * BLK32_EVEN_ODD (byte k: values 2k, 2k + 1), ggml_mxfp4 BLK32_HALVES. */

enum { VNNI_GPT_OSS = BLK32_EVEN_ODD, VNNI_GGML = BLK32_HALVES };

MT_TARGET_VNNI static void prep_vnni(const float *x, long cols, float *xp, int layout) {
    blk32_prep(x, cols, xp, layout, 0.5f);
}

/* 16 e8m0 bytes (n < 16: the first n, zeros after) -> 2^(e - 127) as floats, e8m0_to_f32's values */
MT_TARGET_VNNI static inline __m512 e8m0x16(const uint8_t *e, long n) {
    __mmask16 k = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, e));
    __m512i f = _mm512_slli_epi32(v, 23);
    f = _mm512_mask_mov_epi32(f, _mm512_cmpeq_epi32_mask(v, _mm512_setzero_si512()), _mm512_set1_epi32(0x00400000));
    f = _mm512_mask_mov_epi32(f, _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(255)), _mm512_set1_epi32(0x7fc00000));
    return _mm512_castsi512_ps(f);
}

/* the 64 code bytes of chunk c (n of them stored in the row; zeros after), group g in bytes [16 g, 16 g + 16) */
MT_TARGET_VNNI static inline __m512i chunk_codes(const uint8_t *row, long c, long n, int layout) {
    if (layout == VNNI_GPT_OSS) {
        if (n >= 64) return _mm512_loadu_si512((const void *)(row + 64 * c));
        return _mm512_maskz_loadu_epi8(n > 0 ? ((__mmask64)1 << n) - 1 : 0, row + 64 * c);
    }
    const uint8_t *b = row + 17 * 4 * c + 1; /* ggml: n is a multiple of 16 */
    __m512i v = _mm512_setzero_si512();
    if (n >= 16) v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)b));
    if (n >= 32) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 17)), 1);
    if (n >= 48) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 34)), 2);
    if (n >= 64) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 51)), 3);
    return v;
}

MT_TARGET_VNNI static inline __attribute__((always_inline)) void tile_vnni_n(const mt_weight *W, const float *const *x,
                                                                            const float *const *xp, float *const *y,
                                                                            const int n, long r0, long r1,
                                                                            const int layout) {
    (void)x;
    long cols = W->cols, nch = blk32_nchunks(cols), ngroups = (cols + 31) / 32;
    long bytes = layout == VNNI_GPT_OSS ? (cols + 1) / 2 : 16 * ngroups;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i tab = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12));
    row_sums S = {.y = y, .n = n, .k = 0, .r = r0};
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        __m512 acc[MT_TILE_T][3], F = _mm512_setzero_ps();
        for (int j = 0; j < n; j++) acc[j][0] = acc[j][1] = acc[j][2] = _mm512_setzero_ps();
        for (long c = 0; c < nch; c++) {
            if ((c & 3) == 0) { /* the exponents of groups [4 c, 4 c + 16) */
                long ng = ngroups - 4 * c < 16 ? ngroups - 4 * c : 16;
                if (layout == VNNI_GPT_OSS) {
                    F = e8m0x16((const uint8_t *)mt_srow(W, r) + 4 * c, ng);
                } else {
                    uint8_t e[16];
                    for (long g = 0; g < ng; g++) e[g] = row[17 * (4 * c + g)];
                    F = e8m0x16(e, ng);
                }
            }
            __m512 fw = blk32_lane_scales(F, c);
            __m512i v = chunk_codes(row, c, bytes - 64 * c, layout);
            __m512i ul = _mm512_shuffle_epi8(tab, _mm512_and_si512(v, m4));
            __m512i uh = _mm512_shuffle_epi8(tab, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
            __m512i bias = blk32_bias(ul, uh);
            for (int j = 0; j < n; j++)
                blk32_chunk(ul, uh, bias, (const __m512i *)(xp[j] + blk32_head(cols)) + BLK32_VECS * c,
                            _mm512_mul_ps(fw, _mm512_set1_ps(xp[j][c])), acc[j]);
        }
        for (int j = 0; j < n; j++) S.v[j][S.k] = digits_combine(acc[j]);
        row_sums_next(&S, r + 1 == r1);
    }
}

#define TILE_GPT_OSS(W, x, xp, y, n, r0, r1) tile_vnni_n(W, x, xp, y, n, r0, r1, VNNI_GPT_OSS)
#define TILE_GGML(W, x, xp, y, n, r0, r1) tile_vnni_n(W, x, xp, y, n, r0, r1, VNNI_GGML)
MT_TILES(tile_vnni, TILE_GPT_OSS, MT_TARGET_VNNI)
MT_TILES(tile_vnni_ggml, TILE_GGML, MT_TARGET_VNNI)

/* the row kernels are the tiles for one token (the same code, so the same bits) */
MT_TARGET_VNNI static void rows_vnni(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    tile_vnni_n(W, &x, &xp, &y, 1, r0, r1, VNNI_GPT_OSS);
}

MT_TARGET_VNNI static void rows_vnni_ggml(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                          long r1) {
    tile_vnni_n(W, &x, &xp, &y, 1, r0, r1, VNNI_GGML);
}

/* prepared x: even / odd columns for the AVX-512 kernel (nibble.h), digits for VNNI; none below */
static long prep_len(long cols, int isa) { return isa >= MT_ISA_AVX512VNNI ? blk32_len(cols) : mt_prep_evenodd_len(cols, isa); }

static void prep(const float *x, long cols, float *xp, int isa) {
    if (isa >= MT_ISA_AVX512VNNI) prep_vnni(x, cols, xp, VNNI_GPT_OSS);
    else mt_prep_evenodd(x, cols, xp, isa);
}

static long prep_len_ggml(long cols, int isa) { return isa >= MT_ISA_AVX512VNNI ? blk32_len(cols) : 0; }

static void prep_ggml(const float *x, long cols, float *xp, int isa) {
    if (isa >= MT_ISA_AVX512VNNI) prep_vnni(x, cols, xp, VNNI_GGML);
}

const mt_fmt mt_fmt_mxfp4 = {MT_FMT_MXFP4, "mxfp4", {rows_scalar, rows_avx2, rows_avx512, rows_vnni}, prep_len, prep,
                             dequant, {NULL, NULL, NULL, tile_vnni}};
const mt_fmt mt_fmt_ggml_mxfp4 = {MT_FMT_GGML_MXFP4, "ggml_mxfp4", {rows_scalar_ggml, rows_avx2_ggml,
                                  rows_avx512_ggml, rows_vnni_ggml}, prep_len_ggml, prep_ggml, dequant_ggml,
                                  {NULL, NULL, NULL, tile_vnni_ggml}};
