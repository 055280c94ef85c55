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

/* the prepared x (even / odd columns) is read by the AVX-512 kernel only */
const mt_fmt mt_fmt_mxfp4 = {MT_FMT_MXFP4, "mxfp4", {rows_scalar, rows_avx2, rows_avx512}, mt_prep_evenodd_len,
                             mt_prep_evenodd, dequant};
const mt_fmt mt_fmt_ggml_mxfp4 = {MT_FMT_GGML_MXFP4, "ggml_mxfp4", {rows_scalar_ggml, rows_avx2_ggml,
                                  rows_avx512_ggml}, NULL, NULL, dequant_ggml};
