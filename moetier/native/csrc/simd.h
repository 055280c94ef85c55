/* Vector helpers shared by the fmt_*.c kernels (target-attributed: usable from files built for
 * the baseline ISA). */
#ifndef MT_SIMD_H
#define MT_SIMD_H

#include <immintrin.h>

#include "mt.h"

MT_TARGET_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lanes [0, n) set (n <= 8) */
MT_TARGET_AVX2 static inline __m256i mask256(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 16 bytes -> their low nibbles then their high nibbles would be 32 values; these give 8
 * bytes' nibbles interleaved (b0 lo, b0 hi, b1 lo, ...) as 16 bytes: the "low nibble first"
 * order of MXFP4 (gpt-oss) and compressed-tensors int4 */
MT_TARGET_AVX2 static inline __m128i nibbles_interleaved(__m128i b8) {
    const __m128i m = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(b8, m), hi = _mm_and_si128(_mm_srli_epi16(b8, 4), m);
    return _mm_unpacklo_epi8(lo, hi);
}

MT_TARGET_AVX2 static inline float f16_to_f32_c(uint16_t h) { return _cvtsh_ss(h); }


/* A format's tile (mt_tile_fn) `name` from an inline body(W, x, xp, y, n, r0, r1): one copy per
 * token count, n a constant in each (the per-token accumulators stay in registers). */
_Static_assert(MT_TILE_T == 4, "MT_TILES instantiates n = 1..4");
#define MT_TILES(name, body, target)                                                                     \
    target static void name(const mt_weight *W, const float *const *x, const float *const *xp, float *const *y, \
                            int n, long r0, long r1) {                                                  \
        switch (n) {                                                                                    \
        case 1: body(W, x, xp, y, 1, r0, r1); break;                                                    \
        case 2: body(W, x, xp, y, 2, r0, r1); break;                                                    \
        case 3: body(W, x, xp, y, 3, r0, r1); break;                                                    \
        default: body(W, x, xp, y, 4, r0, r1); break;                                                   \
        }                                                                                               \
    }

/* ------------------------------------------------------------------------------------ */
/* GGUF block formats: one driver per ISA over a format's two pieces                     */
/*   scales(block, D, M): per 16-value chunk t of the block, w = D[t] * q + M[t]          */
/*     (M[t] = -(dmin * m) for "d * q - m" formats, 0 for "d * q" ones: the same value as */
/*     the reference dequantizer's, bit for bit);                                         */
/*   codes(block, t): chunk t's 16 signed codes q as int8, in value order.                */

typedef void (*mt_scales_fn)(const uint8_t *b, float *D, float *M);
typedef __m128i (*mt_codes_fn)(const uint8_t *b, int t);

MT_TARGET_AVX2 static inline void ggml_rows_avx2(const mt_weight *W, const float *x, float *y, long r0, long r1,
                                                 int bsz, int bbytes, mt_scales_fn scales, mt_codes_fn codes) {
    long nb = W->cols / bsz;
    int nch = bsz / 16;
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += bbytes) {
            float D[16], M[16];
            scales(b, D, M);
            const float *xb = x + i * bsz;
            for (int t = 0; t < nch; t++) {
                __m128i q = codes(b, t);
                __m256 d = _mm256_set1_ps(D[t]), m = _mm256_set1_ps(M[t]);
                __m256 w0 = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))), m);
                __m256 w1 = _mm256_add_ps(
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)))), m);
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + 16 * t), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 16 * t + 8), a1);
            }
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX512 static inline void ggml_rows_avx512(const mt_weight *W, const float *x, float *y, long r0,
                                                     long r1, int bsz, int bbytes, mt_scales_fn scales,
                                                     mt_codes_fn codes) {
    long nb = W->cols / bsz;
    int nch = bsz / 16;
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long i = 0; i < nb; i++, b += bbytes) {
            float D[16], M[16];
            scales(b, D, M);
            const float *xb = x + i * bsz;
            for (int t = 0; t < nch; t += 2) {
                __m128i q0 = codes(b, t), q1 = codes(b, t + 1);
                __m512 w0 = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(D[t]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))),
                                          _mm512_set1_ps(M[t]));
                __m512 w1 = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(D[t + 1]),
                                                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))),
                                          _mm512_set1_ps(M[t + 1]));
                a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + 16 * t), a0);
                a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16 * t + 16), a1);
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* 32 int8 codes q times x (float32), not yet reduced: sum over lanes = sum q[i] x[i]. For
 * blocks of 32 sharing one scale d (q8_0, q5_0): acc = fma(d, dot32, acc), one product with d
 * per block instead of one per weight. */
MT_TARGET_AVX2 static inline __m256 dot32_i8_avx2(const int8_t *q, const float *x) {
#define Q8(k) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * (k)))))
    __m256 s0 = _mm256_mul_ps(Q8(0), _mm256_loadu_ps(x)), s1 = _mm256_mul_ps(Q8(1), _mm256_loadu_ps(x + 8));
    s0 = _mm256_fmadd_ps(Q8(2), _mm256_loadu_ps(x + 16), s0);
    s1 = _mm256_fmadd_ps(Q8(3), _mm256_loadu_ps(x + 24), s1);
#undef Q8
    return _mm256_add_ps(s0, s1);
}

MT_TARGET_AVX512 static inline __m512 dot32_i8_avx512(const int8_t *q, const float *x) {
    __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))),
                             _mm512_loadu_ps(x));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))),
                           _mm512_loadu_ps(x + 16), s);
}

/* Multi-token tiles (mt_tile_fn bodies) of the formats whose row kernels are dot32_i8 per
 * 32-value block times the block's float16 d at its first two bytes, alternating two
 * accumulators (q8_0, q5_0): the row kernel's operations in its order for n tokens (so the same
 * bits), the block's codes (codes(b, buf): a pointer to its 32 int8 codes, unpacked into buf if
 * need be) unpacked and converted to float once for the n tokens. Keep in sync with
 * dot32_i8_* above and the formats' rows_avx2 / rows_avx512 (tests/native/test_prefill.py
 * compares the bits). */
typedef const int8_t *(*mt_codes32_fn)(const uint8_t *b, int8_t *buf);

MT_TARGET_AVX2 static inline __attribute__((always_inline)) void i8_tile_avx2(const mt_weight *W, const float *const *x,
                                                                             float *const *y, const int n, long r0,
                                                                             long r1, const long bbytes,
                                                                             mt_codes32_fn codes) {
    long nb = W->cols / 32;
    int8_t buf[32] __attribute__((aligned(32)));
    for (long r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)mt_row(W, r);
        __m256 a0[MT_TILE_T], a1[MT_TILE_T];
        for (int j = 0; j < n; j++) a0[j] = a1[j] = _mm256_setzero_ps();
        for (long i = 0; i < nb; i++, b += bbytes) {
            uint16_t dh;
            memcpy(&dh, b, 2);
            const int8_t *c = codes(b, buf);
            __m256 d = _mm256_set1_ps(f16_to_f32_c(dh)), q[4];
            for (int k = 0; k < 4; k++)
                q[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8 * k))));
            for (int j = 0; j < n; j++) {
                const float *xb = x[j] + 32 * i;
                __m256 s0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb)), s1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(xb + 8));
                s0 = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), s0);
                s1 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), s1);
                __m256 s = _mm256_add_ps(s0, s1);
                if (i & 1) a1[j] = _mm256_fmadd_ps(d, s, a1[j]);
                else a0[j] = _mm256_fmadd_ps(d, s, a0[j]);
            }
        }
        for (int j = 0; j < n; j++) y[j][r] = hsum256(_mm256_add_ps(a0[j], a1[j]));
    }
}

/* R (1 or 2) rows from r for n tokens: each x vector loaded once for the R rows */
MT_TARGET_AVX512 static inline __attribute__((always_inline)) void i8_rows_avx512(const mt_weight *W,
                                                                                 const float *const *x,
                                                                                 float *const *y, const int n,
                                                                                 long r, const int R,
                                                                                 const long bbytes,
                                                                                 mt_codes32_fn codes) {
    long nb = W->cols / 32;
    int8_t buf[2][32] __attribute__((aligned(32)));
    const uint8_t *b[2];
    __m512 a0[2][MT_TILE_T], a1[2][MT_TILE_T];
    for (int k = 0; k < R; k++) {
        b[k] = (const uint8_t *)mt_row(W, r + k);
        for (int j = 0; j < n; j++) a0[k][j] = a1[k][j] = _mm512_setzero_ps();
    }
    for (long i = 0; i < nb; i++) {
        __m512 d[2], q0[2], q1[2];
        for (int k = 0; k < R; k++) {
            uint16_t dh;
            memcpy(&dh, b[k], 2);
            const int8_t *c = codes(b[k], buf[k]);
            d[k] = _mm512_set1_ps(f16_to_f32_c(dh));
            q0[k] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c)));
            q1[k] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16))));
            b[k] += bbytes;
        }
        for (int j = 0; j < n; j++) {
            const float *xb = x[j] + 32 * i;
            __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
            for (int k = 0; k < R; k++) {
                __m512 s = _mm512_fmadd_ps(q1[k], x1, _mm512_mul_ps(q0[k], x0));
                if (i & 1) a1[k][j] = _mm512_fmadd_ps(d[k], s, a1[k][j]);
                else a0[k][j] = _mm512_fmadd_ps(d[k], s, a0[k][j]);
            }
        }
    }
    for (int k = 0; k < R; k++)
        for (int j = 0; j < n; j++) y[j][r + k] = _mm512_reduce_add_ps(_mm512_add_ps(a0[k][j], a1[k][j]));
}

MT_TARGET_AVX512 static inline __attribute__((always_inline)) void i8_tile_avx512(const mt_weight *W,
                                                                                 const float *const *x,
                                                                                 float *const *y, const int n,
                                                                                 long r0, long r1,
                                                                                 const long bbytes,
                                                                                 mt_codes32_fn codes) {
    long r = r0;
    for (; r + 2 <= r1; r += 2) i8_rows_avx512(W, x, y, n, r, 2, bbytes, codes);
    if (r < r1) i8_rows_avx512(W, x, y, n, r, 1, bbytes, codes);
}

/* 32 bits -> 32 bytes of 0x00 / 0xff (byte j: bit j) */
MT_TARGET_AVX2 static inline __m256i bytes_from_bits32(uint32_t bits) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i sel = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
}

/* 16 bytes >> s (per 16-bit lane; callers mask) */
MT_TARGET_AVX2 static inline __m128i srl8(__m128i v, int s) { return _mm_srl_epi16(v, _mm_cvtsi32_si128(s)); }

/* bits j0 .. j0+15 of a uint32 as 16 bytes of 0 / 1 */
MT_TARGET_AVX2 static inline __m128i bits16(uint32_t qh, int j0) {
    const __m128i sel = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, (char)128, 1, 2, 4, 8, 16, 32, 64, (char)128);
    uint32_t h = qh >> j0;
    __m128i bytes = _mm_unpacklo_epi64(_mm_set1_epi8((char)(h & 0xff)), _mm_set1_epi8((char)((h >> 8) & 0xff)));
    return _mm_min_epu8(_mm_and_si128(bytes, sel), _mm_set1_epi8(1));
}

/* ---- K-quant super-blocks with 8 sub-blocks of 32 (q4_k, q5_k): float16 d, float16 dmin,
 * 12 bytes of packed 6-bit (scale, min) at bytes 0..15 ---- */

/* the 8 D[j] = d * sc[j] and M[j] = dmin * m[j]: the 6-bit fields unpacked four at a time
 * (32-bit masks, ggml's get_scale_min_k4 layout), one vector multiply each; the reference's
 * products, so the same bits */
MT_TARGET_AVX2 static inline __m128i kq_scale_min_bytes(const uint8_t *b) { /* sc[0..8) then m[0..8) */
    uint32_t u0, u1, u2;
    memcpy(&u0, b + 4, 4);
    memcpy(&u1, b + 8, 4);
    memcpy(&u2, b + 12, 4);
    uint32_t sc_lo = u0 & 0x3f3f3f3fu, m_lo = u1 & 0x3f3f3f3fu;
    uint32_t sc_hi = (u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4);
    uint32_t m_hi = ((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4);
    return _mm_setr_epi32((int)sc_lo, (int)sc_hi, (int)m_lo, (int)m_hi);
}

/* the 8 M[j] = dmin * m[j] of the bytes above */
MT_TARGET_AVX2 static inline __m256 kq_mins8(const uint8_t *b, __m128i s) {
    uint16_t mh;
    memcpy(&mh, b + 2, 2);
    return _mm256_mul_ps(_mm256_set1_ps(f16_to_f32_c(mh)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(s, 8))));
}

MT_TARGET_AVX2 static inline void kq_scales8(const uint8_t *b, __m256 *D, __m256 *M) {
    uint16_t dh;
    memcpy(&dh, b, 2);
    __m128i s = kq_scale_min_bytes(b);
    *D = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32_c(dh)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(s)));
    *M = kq_mins8(b, s);
}

/* a format's `prep` of x for kernels that factor a sub-block's "- dmin * m" out of its sum:
 * the sum of each 32 values of x (fixed order) */
static inline long sum32_len(long cols, int isa) {
    (void)isa;
    return cols / 32;
}

static inline void sum32(const float *x, long cols, float *xp, int isa) {
    (void)isa;
    for (long j = 0; j < cols / 32; j++) {
        float s = 0.0f;
        for (int i = 0; i < 32; i++) s += x[32 * j + i];
        xp[j] = s;
    }
}

/* ------------------------------------------------------------------------------------ */
/* x as int8 digits (the avx512vnni kernels)                                              */
/*   A block of x (16 or more values sharing one scale s = max |x| / 127) as three signed  */
/*   int8 digits per value: x = s * (a1 + a2 / 254 + a3 / (254 * 256)) + e, |a1|, |a2| <=  */
/*   127, -128 <= a3 <= 127, |e| <= s / (254 * 256) (plus float rounding of the residuals):  */
/*   max |x| * 1.2e-7, float32 grade (not a lossy quantization of x as llama.cpp's q8      */
/*   activations). A kernel's integer codes q times the digits are exact in int32          */
/*   (vpdpbusd: 64 u8 x s8 products per instruction), one lane sum P per digit, scaled     */
/*   once per block and combined in float: P1 + P2 / 254 + P3 / (254 * 256) (or P2 and P3   */
/*   joined exactly first, 256 P2 + P3, when that fits).                                    */

#define MT_DIGIT_R2 254.0f
#define MT_DIGIT_R3 256.0f
#define MT_DIGIT_UNIT (1.0f / (MT_DIGIT_R2 * MT_DIGIT_R3)) /* the value of V = 1 in units of s */

/* the scale s of a block whose largest |x| is amax, and 1 / s (0 for an all-zero block) */
static inline float digit_scale(float amax) { return amax / 127.0f; }
static inline float digit_rinv(float amax) { return amax > 0.0f ? 127.0f / amax : 0.0f; }

/* the three digits of 16 values of a block with scale s (rinv = digit_rinv), as int8 */
MT_TARGET_VNNI static inline void digits16(__m512 x, float s, float rinv, __m128i *a1, __m128i *a2, __m128i *a3) {
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f), lo3 = _mm512_set1_ps(-128.0f);
#define ROUND(t) _mm512_roundscale_ps((t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
    __m512 d1 = _mm512_min_ps(_mm512_max_ps(ROUND(_mm512_mul_ps(x, _mm512_set1_ps(rinv))), lo), hi);
    __m512 r1 = _mm512_fnmadd_ps(d1, _mm512_set1_ps(s), x); /* x - s a1, one rounding */
    __m512 d2 = _mm512_min_ps(_mm512_max_ps(ROUND(_mm512_mul_ps(r1, _mm512_set1_ps(rinv * MT_DIGIT_R2))), lo), hi);
    __m512 r2 = _mm512_fnmadd_ps(d2, _mm512_set1_ps(s / MT_DIGIT_R2), r1);
    __m512 d3 = _mm512_min_ps(_mm512_max_ps(ROUND(_mm512_mul_ps(r2, _mm512_set1_ps(rinv * (MT_DIGIT_R2 * MT_DIGIT_R3)))), lo3), hi);
#undef ROUND
    *a1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(d1));
    *a2 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(d2));
    *a3 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(d3));
}

/* max |x[i]| over n values (n a multiple of 16); NaN if one is NaN (the product is then NaN) */
MT_TARGET_VNNI static inline float absmax(const float *x, long n) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (long i = 0; i < n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        m = _mm512_max_ps(m, _mm512_abs_ps(v));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    return nan ? f32_from_bits(0x7fc00000u) : _mm512_reduce_max_ps(m);
}

/* acc1 + acc2 / 254 + acc3 / (254 * 256), summed over the lanes (the digit sums combined in float) */
/* k-quant super-block step on x's three digits (q4_k, q6_k): for each digit k, the unsigned codes
 * w[v] times digit vectors A[3 v + k] (vpdpbusd, 4 products per int32 lane: |P| <= 4 * 63 * 128,
 * an int16), the lane sums of vectors (0, 1) and (2, 3) packed pairwise into int16 (vpackssdw,
 * exact: per 128-bit lane the 4 sums of the first, then the 4 of the second), times their
 * sub-blocks' int scales SCP[0] / SCP[1] (the same word layout, vsub_scales) and summed in
 * int32 (vpdpwssd: two words per lane), then acc[k] += ds * float(sum) (|sum| < 2^24: exact).
 * 12 vpdpbusd + 6 vpdpwssd per super-block and token (one vpdpwssd per vector measured slower:
 * Zen 4 runs VNNI at one 512-bit op per cycle, vpackssdw on other pipes). */
MT_TARGET_VNNI static inline __attribute__((always_inline)) void vnni_scaled_digits4(const __m512i w[4], const __m512i *A,
                                                                                    const __m512i SCP[2], __m512 ds,
                                                                                    __m512 acc[3]) {
    const __m512i zero = _mm512_setzero_si512();
    for (int k = 0; k < 3; k++) {
        __m512i P0 = _mm512_dpbusd_epi32(zero, w[0], _mm512_load_si512(A + k));
        __m512i P1 = _mm512_dpbusd_epi32(zero, w[1], _mm512_load_si512(A + 3 + k));
        __m512i P2 = _mm512_dpbusd_epi32(zero, w[2], _mm512_load_si512(A + 6 + k));
        __m512i P3 = _mm512_dpbusd_epi32(zero, w[3], _mm512_load_si512(A + 9 + k));
        __m512i T = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(P0, P1), SCP[0]);
        T = _mm512_dpwssd_epi32(T, _mm512_packs_epi32(P2, P3), SCP[1]);
        acc[k] = _mm512_fmadd_ps(ds, _mm512_cvtepi32_ps(T), acc[k]);
    }
}

/* vnni_scaled_digits4 with digits 2 and 3 joined in integer (q4_k: |P| <= 4 * 15 * 128, sc <= 63):
 * T23 = sum sc (256 P2 + P3) in one vpdpwssd chain (digit 2's scales times 256: SCP256, still
 * int16; |T23| <= 257 * 4 * 63 * 7680 < 2^31, exact), so one int32 total, one conversion and one
 * FMA for both: acc[0] += ds * T1, acc[1] += ds * float(T23) (rounded to float's 24 bits: a
 * relative 6e-8 of digit 3's unit sum, far below float32 grade). Not for q6_k: its 6-bit codes
 * and int8 scales could overflow T23. Combine with digits_combine2. */
MT_TARGET_VNNI static inline __attribute__((always_inline)) void vnni_scaled_digits4_join(
    const __m512i w[4], const __m512i *A, const __m512i SCP[2], const __m512i SCP256[2], __m512 ds, __m512 acc[2]) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i P[3][4];
    for (int k = 0; k < 3; k++)
        for (int v = 0; v < 4; v++) P[k][v] = _mm512_dpbusd_epi32(zero, w[v], _mm512_load_si512(A + 3 * v + k));
    __m512i T1 = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(P[0][0], P[0][1]), SCP[0]);
    T1 = _mm512_dpwssd_epi32(T1, _mm512_packs_epi32(P[0][2], P[0][3]), SCP[1]);
    __m512i T23 = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(P[1][0], P[1][1]), SCP256[0]);
    T23 = _mm512_dpwssd_epi32(T23, _mm512_packs_epi32(P[1][2], P[1][3]), SCP256[1]);
    T23 = _mm512_dpwssd_epi32(T23, _mm512_packs_epi32(P[2][0], P[2][1]), SCP[0]);
    T23 = _mm512_dpwssd_epi32(T23, _mm512_packs_epi32(P[2][2], P[2][3]), SCP[1]);
    acc[0] = _mm512_fmadd_ps(ds, _mm512_cvtepi32_ps(T1), acc[0]);
    acc[1] = _mm512_fmadd_ps(ds, _mm512_cvtepi32_ps(T23), acc[1]);
}

/* acc[0] + acc[1] / (254 * 256) per lane (the sums of vnni_scaled_digits4_join) */
MT_TARGET_VNNI static inline __m512 digits_combine2(const __m512 acc[2]) {
    return _mm512_fmadd_ps(acc[1], _mm512_set1_ps(MT_DIGIT_UNIT), acc[0]);
}

/* the packed sub-block scales of vnni_scaled_digits4 from a super-block's int16 scales sc16 (words
 * 0 .. 15): sub(v, L) = the sub-block of vector v's lanes in 128-bit lane L; SCP[p] word 8 L + i =
 * sc of sub(2 p, L) for i < 4, of sub(2 p + 1, L) for i >= 4 */
#define VSUB_INDEX(s00, s01, s10, s11, s20, s21, s30, s31) \
    _mm512_set_epi16(s31, s31, s31, s31, s30, s30, s30, s30, s21, s21, s21, s21, s20, s20, s20, s20, \
                     s11, s11, s11, s11, s10, s10, s10, s10, s01, s01, s01, s01, s00, s00, s00, s00)
MT_TARGET_VNNI static inline void vsub_scales(__m512i sc16, const __m512i idx[2], __m512i SCP[2]) {
    SCP[0] = _mm512_permutexvar_epi16(idx[0], sc16);
    SCP[1] = _mm512_permutexvar_epi16(idx[1], sc16);
}

MT_TARGET_VNNI static inline float digits_reduce(__m512 acc1, __m512 acc2, __m512 acc3) {
    __m512 t = _mm512_fmadd_ps(acc3, _mm512_set1_ps(1.0f / MT_DIGIT_R3), acc2);
    return _mm512_reduce_add_ps(_mm512_fmadd_ps(t, _mm512_set1_ps(1.0f / MT_DIGIT_R2), acc1));
}

/* acc1 + acc2 / 254 + acc3 / (254 * 256) per lane (digits_reduce before its lane sum) */
MT_TARGET_VNNI static inline __m512 digits_combine(const __m512 acc[3]) {
    __m512 t = _mm512_fmadd_ps(acc[2], _mm512_set1_ps(1.0f / MT_DIGIT_R3), acc[1]);
    return _mm512_fmadd_ps(t, _mm512_set1_ps(1.0f / MT_DIGIT_R2), acc[0]);
}

/* Lane j of the result: the sum of a[j]'s 16 lanes, for 16 vectors at once (a transpose-add
 * tree, the same for every j: each sum has the same bits whichever vectors share its group) */
MT_TARGET_AVX512 static inline __m512 lanes16_sums(const __m512 a[16]) {
    __m512 x[4];
    for (int k = 0; k < 4; k++) { /* block b of x[k]: partial sums of vectors 4k..4k+3 */
        __m512 p0 = _mm512_add_ps(_mm512_unpacklo_ps(a[4 * k], a[4 * k + 1]), _mm512_unpackhi_ps(a[4 * k], a[4 * k + 1]));
        __m512 p1 = _mm512_add_ps(_mm512_unpacklo_ps(a[4 * k + 2], a[4 * k + 3]),
                                  _mm512_unpackhi_ps(a[4 * k + 2], a[4 * k + 3]));
        x[k] = _mm512_add_ps(_mm512_shuffle_ps(p0, p1, 0x44), _mm512_shuffle_ps(p0, p1, 0xEE));
    }
    __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
    __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

/* A row kernel's outputs as lane sums of one vector per (token, row), summed 16 rows at a time
 * (lanes16_sums: ~1 vector op per row instead of a horizontal reduction each). put(j, v) after
 * row r's vectors, then done(r) after each row. */
typedef struct {
    __m512 v[MT_TILE_T][16];
    float *const *y;
    int n, k;
    long r; /* the first pending row */
} row_sums;

MT_TARGET_AVX512 static inline __attribute__((always_inline)) void row_sums_flush(row_sums *S) {
    for (int j = 0; j < S->n; j++) {
        for (int i = S->k; i < 16; i++) S->v[j][i] = _mm512_setzero_ps();
        _mm512_mask_storeu_ps(S->y[j] + S->r, (__mmask16)((1u << S->k) - 1), lanes16_sums(S->v[j]));
    }
    S->r += S->k;
    S->k = 0;
}

/* row done (call with last = 1 for the kernel's last row) */
MT_TARGET_AVX512 static inline __attribute__((always_inline)) void row_sums_next(row_sums *S, int last) {
    if (++S->k == 16 || last) row_sums_flush(S);
}

/* ---- 32-value blocks with one float scale each (ggml_mxfp4, mxfp4, q5_0) on x's digits ----
 * The codes' signed values v (q5_0: q - 16, mxfp4: 2 * e2m1) are vpdpbusd's signed operand, x's
 * digits a biased by 128 (a + 128 in [0, 255]) its unsigned one, so a lane's int32 sum is
 * sum (a + 128) v = sum a v + 128 sum v; the second term depends on the weights only: computed
 * once per row chunk (blk32_bias: -128 sum v per lane) it starts the accumulators of every token
 * and digit, and each lane's sum is sum v a exactly. A chunk is 128 values = 4 blocks = 64 code
 * bytes, byte b holding codes of block b / 16: lane l of a vpdpbusd belongs to block l / 4, its 16
 * lane sums are scaled in float per lane (the block's scale times the chunk's digit scale). Per
 * chunk and digit k: D = bias + A_k . v_lo + B_k . v_hi (A / B: the biased digits of the values
 * under the low / high code bytes; |D| <= 8 * 128 * 16, exact in float), acc_k += f * D;
 * y = digits_reduce(acc).
 * Prepared x (floats): one digit scale s * sfac per chunk (padded to 16), then per chunk 6 x 64
 * bytes: A_0, B_0, A_1, B_1, A_2, B_2. Values past cols have digit 0, so they add 0 whatever
 * code bytes a kernel reads there (the bias is computed from the same bytes). Layouts:
 * BLK32_EVEN_ODD (gpt-oss mxfp4): A = the chunk's even values, B = its odd ones; BLK32_HALVES
 * (GGUF blocks): block g's bytes hold values 32 g + j (low) and 32 g + 16 + j (high), j < 16. */

enum { BLK32_EVEN_ODD = 0, BLK32_HALVES = 1 };

#define BLK32_VECS 6 /* 64-byte vectors of digits per prepared chunk */

static inline long blk32_nchunks(long cols) { return (cols + 127) / 128; }
static inline long blk32_head(long cols) { return (blk32_nchunks(cols) + 15) & ~15L; }
static inline long blk32_len(long cols) { return blk32_head(cols) + 16 * BLK32_VECS * blk32_nchunks(cols); }

MT_TARGET_VNNI static inline void blk32_prep(const float *x, long cols, float *xp, int layout, float sfac) {
    float *S = xp;
    __m512i *P = (__m512i *)(xp + blk32_head(cols));
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    const __m128i bias = _mm_set1_epi8((char)0x80); /* a + 128 (mod 256) = a ^ 0x80 */
    for (long c = 0; c < blk32_nchunks(cols); c++, x += 128, P += BLK32_VECS) {
        __m512 v[8], m = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int q = 0; q < 8; q++) {
            long n = cols - 128 * c - 16 * q;
            __mmask16 k = n >= 16 ? 0xffff : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
            v[q] = _mm512_maskz_loadu_ps(k, x + 16 * q);
            m = _mm512_max_ps(m, _mm512_abs_ps(v[q]));
            nan |= _mm512_cmp_ps_mask(v[q], v[q], _CMP_UNORD_Q);
        }
        float amax = nan ? f32_from_bits(0x7fc00000u) : _mm512_reduce_max_ps(m);
        float s = digit_scale(amax), rinv = digit_rinv(amax);
        S[c] = sfac * s;
        __m128i *D = (__m128i *)P;
        for (int q = 0; q < 4; q++) { /* block q: its 16 low-byte values, its 16 high-byte ones */
            __m512 lo, hi;
            if (layout == BLK32_EVEN_ODD) {
                lo = _mm512_permutex2var_ps(v[2 * q], ev, v[2 * q + 1]);
                hi = _mm512_permutex2var_ps(v[2 * q], od, v[2 * q + 1]);
            } else {
                lo = v[2 * q];
                hi = v[2 * q + 1];
            }
            __m128i a[3], b[3];
            digits16(lo, s, rinv, &a[0], &a[1], &a[2]);
            digits16(hi, s, rinv, &b[0], &b[1], &b[2]);
            for (int k = 0; k < 3; k++) {
                _mm_store_si128(D + 4 * (2 * k) + q, _mm_xor_si128(a[k], bias));
                _mm_store_si128(D + 4 * (2 * k + 1) + q, _mm_xor_si128(b[k], bias));
            }
        }
    }
}

/* -128 * (the 4 low-byte + 4 high-byte values) per lane: the accumulator start of blk32_chunk */
MT_TARGET_VNNI static inline __m512i blk32_bias(__m512i vl, __m512i vh) {
    const __m512i b = _mm512_set1_epi8((char)0x80);
    __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), b, vl);
    return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(t, b, vh));
}

/* one chunk of one token: the signed values vl / vh (low / high bytes' values) times the biased
 * digits of prepared chunk P (BLK32_VECS vectors, above), from start bias (blk32_bias of vl, vh),
 * each lane scaled by f, into acc[3] */
MT_TARGET_VNNI static inline __attribute__((always_inline)) void blk32_chunk(__m512i vl, __m512i vh, __m512i bias,
                                                                            const __m512i *P, __m512 f, __m512 acc[3]) {
    for (int k = 0; k < 3; k++) {
        __m512i D = _mm512_dpbusd_epi32(bias, _mm512_load_si512(P + 2 * k), vl);
        D = _mm512_dpbusd_epi32(D, _mm512_load_si512(P + 2 * k + 1), vh);
        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(D), f, acc[k]);
    }
}

/* lane l of a chunk's vpdpbusd belongs to block l / 4: the per-lane scales of chunk c from the
 * scales F of blocks [4 (c - c % 4), + 16) */
MT_TARGET_VNNI static inline __m512 blk32_lane_scales(__m512 F, long c) {
    const __m512i lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(_mm512_add_epi32(lane_block, _mm512_set1_epi32(4 * (int)(c & 3))), F);
}


/* ------------------------------------------------------------------------------------ */
/* exponentials (softmax in attention.c, mla.c, sinks.c, moe.c's router; SwiGLU in ops.c: */
/* the single- and multi-token steps share these, so both give the same bits)             */

/* exp of 16 floats: 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 in two parts),
 * exp(r) by Cephes' degree-7 expf polynomial, 2^k applied by vscalefps: within 2 ulp of
 * expf; x <= -104 (and -inf) gives 0, NaN stays NaN */
MT_TARGET_AVX512 static inline __m512 mt_exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* NaN: the second operand, x */
    x = _mm512_min_ps(_mm512_set1_ps(88.5f), x);
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

/* s[t] = exp(s[t] - mx) for t < n, returning their sum (per lane in t order, then the 16 lanes
 * in a fixed tree): the softmax numerators. Built for AVX-512 where the including file is
 * (-march=native files), else expf in t order. */
static inline float mt_softmax_exp(float *s, long n, float mx) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    __m512 m = _mm512_set1_ps(mx), acc = _mm512_setzero_ps();
    for (long t = 0; t < n; t += 16) {
        __mmask16 live = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
        __m512 e = mt_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), m));
        _mm512_mask_storeu_ps(s + t, live, e);
        acc = _mm512_mask_add_ps(acc, live, acc, e);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float sum = 0.0f;
    for (long t = 0; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
#endif
}

#endif
