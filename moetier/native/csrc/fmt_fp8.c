/* fp8_e4m3_block: float8 e4m3fn weights, one scale per (brows x bcols) block
 * (DeepSeek-V3 / Kimi-K2 / Qwen3-FP8). value = e4m3(W[r, c]) * scale[(row0 + r) / brows][c / bcols].
 *
 * Vector decode: the 7 magnitude bits shifted into a float16 ((b & 0x7f) << 7, sign to bit 15)
 * are the e4m3 value * 2^-8 exactly, subnormals included; F16C converts, and the 2^8 is folded
 * into the block scale (exact). The NaN code (0x7f / 0xff) decodes as 480: checkpoints carry none. */
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

/* 8 e4m3 bytes -> 8 floats (value * 2^-8) */
MT_TARGET_AVX2 static inline __m256 fp8x8(__m128i b8) {
    __m128i b = _mm_cvtepu8_epi16(b8);
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7),
                             _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
    return _mm256_cvtph_ps(h);
}

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
            for (; c + 16 <= end; c += 16) {
                __m256 w0 = _mm256_mul_ps(fp8x8(_mm_loadl_epi64((const __m128i *)(row + c))), s);
                __m256 w1 = _mm256_mul_ps(fp8x8(_mm_loadl_epi64((const __m128i *)(row + c + 8))), s);
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c + 8), a1);
            }
            for (; c < end; c += 8) {
                long n = end - c < 8 ? end - c : 8;
                uint8_t t[8] = {0};
                memcpy(t, row + c, n);
                __m256 w = _mm256_mul_ps(fp8x8(_mm_loadl_epi64((const __m128i *)t)), s);
                a0 = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + c, mask256(n)), a0);
            }
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

/* 16 e4m3 bytes -> 16 floats (value * 2^-8) */
MT_TARGET_AVX512 static inline __m512 fp8x16(__m128i b16) {
    __m256i b = _mm256_cvtepu8_epi16(b16);
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7),
                                _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
    return _mm512_cvtph_ps(h);
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    long cols = W->cols, bc = W->bcols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long b0 = 0; b0 < cols; b0 += bc) {
            __m512 s = _mm512_set1_ps(ld_scale(srow, W->sdt, b0 / bc) * 256.0f);
            long end = b0 + bc < cols ? b0 + bc : cols, c = b0;
            for (; c + 32 <= end; c += 32) {
                __m512 w0 = _mm512_mul_ps(fp8x16(_mm_loadu_si128((const __m128i *)(row + c))), s);
                __m512 w1 = _mm512_mul_ps(fp8x16(_mm_loadu_si128((const __m128i *)(row + c + 16))), s);
                a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + c), a0);
                a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + c + 16), a1);
            }
            for (; c < end; c += 16) {
                long n = end - c < 16 ? end - c : 16;
                __mmask16 m = (__mmask16)((1u << n) - 1);
                __m512 w = _mm512_mul_ps(fp8x16(_mm_maskz_loadu_epi8(m, row + c)), s);
                a0 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + c), a0);
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

const mt_fmt mt_fmt_fp8 = {MT_FMT_FP8_E4M3_BLOCK, "fp8_e4m3_block", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL,
                           dequant};
