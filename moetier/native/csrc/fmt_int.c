/* int4_group / int8_group: compressed-tensors pack-quantized integers, one scale (and an
 * optional int8 zero point) per group of bcols values of a row.
 * int8: byte c holds u, value v = u - 128. int4: byte c/2 holds values c (low nibble) and c+1
 * (high nibble), value v = u - 8. Weight = (v - zero) * scale (zero = 0 when symmetric).
 * The vector kernels need groups of an even number of columns for int4 (checked in Python). */
#include "nibble.h"

static void dequant_int8(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    const void *srow = mt_srow(W, r);
    const int8_t *z = mt_zrow(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, g = c / W->bcols;
        int v = (int)row[c] - 128 - (z ? z[g] : 0);
        out[i] = (float)v * ld_scale(srow, W->sdt, g);
    }
}

static void dequant_int4(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    const void *srow = mt_srow(W, r);
    const int8_t *z = mt_zrow(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, g = c / W->bcols;
        int v = (int)((row[c >> 1] >> ((c & 1) * 4)) & 15) - 8 - (z ? z[g] : 0);
        out[i] = (float)v * ld_scale(srow, W->sdt, g);
    }
}

static void rows_scalar8(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant_int8);
}

static void rows_scalar4(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant_int4);
}

/* ---- AVX2: 8 values per step ---- */

/* 8 unsigned values (bytes) -> 8 floats u - off (exact small integers; the group scale is
 * applied once to the group's partial sums) */
MT_TARGET_AVX2 static inline __m256 ints8(__m128i u8, __m256i off) {
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(u8), off));
}

MT_TARGET_AVX2 static inline void rows_avx2_bits(const mt_weight *W, const float *x, float *y, long r0, long r1,
                                                 int bits) {
    long cols = W->cols, g = W->bcols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        const int8_t *z = mt_zrow(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long b0 = 0; b0 < cols; b0 += g) {
            long gi = b0 / g;
            __m256 s = _mm256_set1_ps(ld_scale(srow, W->sdt, gi));
            __m256i off = _mm256_set1_epi32((bits == 8 ? 128 : 8) + (z ? z[gi] : 0));
            long end = b0 + g < cols ? b0 + g : cols, c = b0;
            __m256 p0 = _mm256_setzero_ps(), p1 = p0; /* the group's unscaled partial sums */
            if (bits == 4) {
                const __m128i m4 = _mm_set1_epi8(0x0f);
                for (; c + 32 <= end; c += 32) { /* 32 values from one 16-byte load */
                    __m128i b = _mm_loadu_si128((const __m128i *)(row + c / 2));
                    __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
                    __m128i u0 = _mm_unpacklo_epi8(lo, hi), u1 = _mm_unpackhi_epi8(lo, hi);
                    p0 = _mm256_fmadd_ps(ints8(u0, off), _mm256_loadu_ps(x + c), p0);
                    p1 = _mm256_fmadd_ps(ints8(_mm_srli_si128(u0, 8), off), _mm256_loadu_ps(x + c + 8), p1);
                    p0 = _mm256_fmadd_ps(ints8(u1, off), _mm256_loadu_ps(x + c + 16), p0);
                    p1 = _mm256_fmadd_ps(ints8(_mm_srli_si128(u1, 8), off), _mm256_loadu_ps(x + c + 24), p1);
                }
            }
            for (; c + 16 <= end; c += 16) { /* 16 values: 16 bytes (int8) or 8 bytes (int4) */
                __m128i u = bits == 8 ? _mm_loadu_si128((const __m128i *)(row + c))
                                      : nibbles_interleaved(_mm_loadl_epi64((const __m128i *)(row + c / 2)));
                p0 = _mm256_fmadd_ps(ints8(u, off), _mm256_loadu_ps(x + c), p0);
                p1 = _mm256_fmadd_ps(ints8(_mm_srli_si128(u, 8), off), _mm256_loadu_ps(x + c + 8), p1);
            }
            for (; c < end; c += 8) {
                long n = end - c < 8 ? end - c : 8;
                __m128i u;
                if (bits == 8) {
                    if (n == 8) {
                        u = _mm_loadl_epi64((const __m128i *)(row + c));
                    } else {
                        uint8_t t[8] = {0};
                        memcpy(t, row + c, n);
                        u = _mm_loadl_epi64((const __m128i *)t);
                    }
                } else {
                    uint32_t t = 0;
                    if (n == 8) memcpy(&t, row + c / 2, 4); /* constant size: one load */
                    else memcpy(&t, row + c / 2, (n + 1) / 2);
                    u = nibbles_interleaved(_mm_cvtsi32_si128((int)t));
                }
                __m256 w = ints8(u, off);
                if (n == 8) {
                    if ((c - b0) & 8) p1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + c), p1);
                    else p0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + c), p0);
                } else {
                    p0 = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + c, mask256(n)), p0);
                }
            }
            a0 = _mm256_fmadd_ps(p0, s, a0);
            a1 = _mm256_fmadd_ps(p1, s, a1);
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX2 static void rows_avx2_8(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                       long r1) {
    (void)xp;
    rows_avx2_bits(W, x, y, r0, r1, 8);
}

MT_TARGET_AVX2 static void rows_avx2_4(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                       long r1) {
    (void)xp;
    rows_avx2_bits(W, x, y, r0, r1, 4);
}

/* ---- AVX-512 ---- */

/* int8: 32 values per step, the group's unscaled integer-valued partial sums scaled once */
MT_TARGET_AVX512 static void rows_avx512_8(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                           long r1) {
    (void)xp;
    long cols = W->cols, g = W->bcols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        const int8_t *z = mt_zrow(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long b0 = 0; b0 < cols; b0 += g) {
            long gi = b0 / g;
            __m512 s = _mm512_set1_ps(ld_scale(srow, W->sdt, gi));
            __m512i off = _mm512_set1_epi32(128 + (z ? z[gi] : 0));
            long end = b0 + g < cols ? b0 + g : cols, c = b0;
            __m512 p0 = _mm512_setzero_ps(), p1 = p0;
            for (; c + 32 <= end; c += 32) {
                __m512i v0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c))), off);
                __m512i v1 =
                    _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c + 16))), off);
                p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_loadu_ps(x + c), p0);
                p1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_loadu_ps(x + c + 16), p1);
            }
            for (; c < end; c += 16) { /* the group's tail: up to 16 values, masked */
                long n = end - c < 16 ? end - c : 16;
                __mmask16 m = (__mmask16)((1u << n) - 1);
                __m512i v = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, row + c)), off);
                p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_maskz_loadu_ps(m, x + c), p0);
            }
            a0 = _mm512_fmadd_ps(p0, s, a0);
            a1 = _mm512_fmadd_ps(p1, s, a1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* int4: the group's table t[u] = (u - 8 - zero) * scale (the reference's value, one rounding) */
MT_TARGET_AVX512 static inline __m512 int4_table(const mt_weight *W, const void *srow, const int8_t *z, long gi) {
    const __m512 v = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7); /* u - 8 */
    __m512 s = _mm512_set1_ps(ld_scale(srow, W->sdt, gi));
    return _mm512_mul_ps(z ? _mm512_sub_ps(v, _mm512_set1_ps((float)z[gi])) : v, s);
}

MT_TARGET_AVX512 static void rows_avx512_4(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                           long r1) {
    (void)x;
    nib_rows512(W, xp, y, r0, r1, int4_table);
}

const mt_fmt mt_fmt_int8 = {MT_FMT_INT8_GROUP, "int8_group", {rows_scalar8, rows_avx2_8, rows_avx512_8}, NULL, NULL,
                            dequant_int8};
/* int4's prepared x (even / odd columns) is read by the AVX-512 kernel only */
const mt_fmt mt_fmt_int4 = {MT_FMT_INT4_GROUP, "int4_group", {rows_scalar4, rows_avx2_4, rows_avx512_4},
                            mt_prep_evenodd_len, mt_prep_evenodd, dequant_int4};
