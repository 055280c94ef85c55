/* fp8_e4m3_block: float8 e4m3fn weights, one scale per (brows x bcols) block
 * (DeepSeek-V3 / Kimi-K2 / Qwen3-FP8). value = e4m3(W[r, c]) * scale[(row0 + r) / brows][c / bcols].
 *
 * Vector decode: the 7 magnitude bits shifted into a float16 ((b & 0x7f) << 7, sign to bit 15)
 * are the e4m3 value * 2^-8 exactly, subnormals included; F16C converts, and the 2^8 is folded
 * into the block scale (exact) (AVX2; AVX-512 builds the float32 bits directly, below). The NaN
 * code (0x7f / 0xff) decodes as 480: checkpoints carry none. */
#include "simd.h"

static inline float e4m3_to_f32(uint8_t b) {
    uint32_t s = (uint32_t)(b & 0x80) << 24, e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7) return f32_from_bits(s | 0x7fc00000u);
    if (e == 0) { /* subnormal: m * 2^-9 */
        float v = (float)m * 0.001953125f;
        return s ? -v : v;
    }
    return f32_from_bits(s | ((e + 120) << 23) | (m << 20));
}

static float E4M3[256];

__attribute__((constructor)) static void init_table(void) {
    for (int b = 0; b < 256; b++) E4M3[b] = e4m3_to_f32((uint8_t)b);
}

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    const void *srow = mt_srow(W, r);
    long bc = W->bcols;
    for (long i = 0; i < n;) { /* one scale block at a time */
        long c = c0 + i, end = (c / bc + 1) * bc - c0;
        float s = ld_scale(srow, W->sdt, c / bc);
        if (end > n) end = n;
        for (; i < end; i++) out[i] = E4M3[row[c0 + i]] * s;
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

/* e4m3 bytes widened to 16-bit lanes -> the float16 bits of (value * 2^-8): byte << 8 puts the
 * sign at bit 15 and the 7 magnitude bits at 8..14; an arithmetic shift right by one moves
 * the magnitude to 7..13 (copying the sign into bit 14, which the mask clears). 3 operations
 * per vector instead of 5. */
#define FP8_TO_F16(SLLI, SRAI, AND, SET1, w) AND(SRAI(SLLI(w, 8), 1), SET1((short)0xbfff))

/* AVX2: 16 values per step, each block's partial sums scaled once */
MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long cols = W->cols, bc = W->bcols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long b0 = 0; b0 < cols; b0 += bc) {
            __m256 s = _mm256_set1_ps(ld_scale(srow, W->sdt, b0 / bc) * 256.0f);
            long end = b0 + bc < cols ? b0 + bc : cols, c = b0;
            __m256 p0 = _mm256_setzero_ps(), p1 = p0;
            for (; c < end; c += 16) {
                long n = end - c < 16 ? end - c : 16;
                __m128i b;
                if (n == 16) {
                    b = _mm_loadu_si128((const __m128i *)(row + c));
                } else {
                    uint8_t t[16] = {0};
                    memcpy(t, row + c, n);
                    b = _mm_loadu_si128((const __m128i *)t);
                }
                __m256i h = FP8_TO_F16(_mm256_slli_epi16, _mm256_srai_epi16, _mm256_and_si256, _mm256_set1_epi16,
                                       _mm256_cvtepu8_epi16(b));
                __m256 w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h)), w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                if (n == 16) {
                    p0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c), p0);
                    p1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c + 8), p1);
                } else {
                    p0 = _mm256_fmadd_ps(w0, _mm256_maskload_ps(x + c, mask256(n)), p0);
                    if (n > 8) p1 = _mm256_fmadd_ps(w1, _mm256_maskload_ps(x + c + 8, mask256(n - 8)), p1);
                }
            }
            a0 = _mm256_fmadd_ps(p0, s, a0);
            a1 = _mm256_fmadd_ps(p1, s, a1);
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

/* AVX-512: the float32 bits of e4m3 code b by one shift and mask: the sign-extended byte << 20
 * puts the 7 magnitude bits at the float's exponent LSBs and mantissa MSBs (20..26) and the
 * sign at 31; masked (0x87f00000) that is the float e4m3(b) * 2^-120 exactly, subnormal codes
 * included (they become float32 subnormals: e = 0 on both sides). x is prepared as x * 2^60 and
 * 2^60 is folded into the block scale (powers of two: the same products and sums as with
 * unscaled values, so the bits of the earlier F16C kernel, 2^-8 and 256, exactly), so no product
 * is a subnormal. 3 operations per 16 values, no conversion instruction (the F16C decode ran
 * at 28 Gweights/s per core on Zen 4, this one at 45, weights in L2). Under MXCSR.DAZ (denormal
 * inputs read as zero) subnormal codes would vanish: then the AVX2 kernel runs (F16C ignores
 * DAZ). */
#define FP8_X_SCALE 0x1p60f

static long prep_len(long cols, int isa) { return isa >= MT_ISA_AVX512 ? (cols + 31) / 32 * 32 : 0; }

static void prep(const float *x, long cols, float *xp, int isa) {
    long n = prep_len(cols, isa);
    for (long i = 0; i < n; i++) xp[i] = i < cols ? x[i] * FP8_X_SCALE : 0.0f; /* exact (|x| < 2^68) */
}

MT_TARGET_AVX512 static inline __m512 fp8_f32_bits(__m128i b) { /* 16 codes -> e4m3 * 2^-120 */
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(_mm512_cvtepi8_epi32(b), 20),
                                                _mm512_set1_epi32((int)0x87f00000u)));
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    if (_mm_getcsr() & 0x40) { /* DAZ */
        rows_avx2(W, x, xp, y, r0, r1);
        return;
    }
    long cols = W->cols, bc = W->bcols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long b0 = 0, bi = 0; b0 < cols; b0 += bc, bi++) {
            __m512 s = _mm512_set1_ps(ld_scale(srow, W->sdt, bi) * FP8_X_SCALE);
            long end = b0 + bc < cols ? b0 + bc : cols, c = b0;
            __m512 p0 = _mm512_setzero_ps(), p1 = p0;
            for (; c + 32 <= end; c += 32) {
                p0 = _mm512_fmadd_ps(fp8_f32_bits(_mm_loadu_si128((const __m128i *)(row + c))), _mm512_loadu_ps(xp + c), p0);
                p1 = _mm512_fmadd_ps(fp8_f32_bits(_mm_loadu_si128((const __m128i *)(row + c + 16))),
                                     _mm512_loadu_ps(xp + c + 16), p1);
            }
            if (c < end) { /* the block's tail: up to 31 values, masked (xp is zero past cols) */
                __mmask32 m = (__mmask32)((1u << (end - c)) - 1);
                __m256i b = _mm256_maskz_loadu_epi8(m, row + c);
                __m512 x0 = _mm512_maskz_loadu_ps((__mmask16)m, xp + c), x1 = _mm512_maskz_loadu_ps((__mmask16)(m >> 16), xp + c + 16);
                p0 = _mm512_fmadd_ps(fp8_f32_bits(_mm256_castsi256_si128(b)), x0, p0);
                p1 = _mm512_fmadd_ps(fp8_f32_bits(_mm256_extracti128_si256(b, 1)), x1, p1);
            }
            a0 = _mm512_fmadd_ps(p0, s, a0);
            a1 = _mm512_fmadd_ps(p1, s, a1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

const mt_fmt mt_fmt_fp8 = {MT_FMT_FP8_E4M3_BLOCK, "fp8_e4m3_block", {rows_scalar, rows_avx2, rows_avx512}, prep_len,
                           prep, dequant};
