/* float16 weights (GGUF F16 tensors): y[r] = W[r, :] . x */
#include "simd.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint16_t *w = (const uint16_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) out[i] = f16_to_f32(w[c0 + i]);
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)xp;
    long cols = W->cols;
    for (long r = r0; r < r1; r++) {
        const uint16_t *w = (const uint16_t *)mt_row(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        long c = 0;
        for (; c + 16 <= cols; c += 16) {
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + c))), _mm256_loadu_ps(x + c), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + c + 8))),
                                 _mm256_loadu_ps(x + c + 8), a1);
        }
        for (; c < cols; c += 8) {
            long n = cols - c < 8 ? cols - c : 8;
            uint16_t t[8] = {0};
            memcpy(t, w + c, n * 2);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t)),
                                 _mm256_maskload_ps(x + c, mask256(n)), a0);
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)xp;
    long cols = W->cols;
    for (long r = r0; r < r1; r++) {
        const uint16_t *w = (const uint16_t *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        long c = 0;
        for (; c + 32 <= cols; c += 32) {
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + c))), _mm512_loadu_ps(x + c), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + c + 16))),
                                 _mm512_loadu_ps(x + c + 16), a1);
        }
        for (; c < cols; c += 16) {
            long n = cols - c < 16 ? cols - c : 16;
            __mmask16 m = (__mmask16)((1u << n) - 1);
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w + c)), _mm512_maskz_loadu_ps(m, x + c), a0);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

const mt_fmt mt_fmt_f16 = {MT_FMT_F16, "f16", {rows_scalar, rows_avx2, rows_avx512}, NULL, NULL, dequant};
