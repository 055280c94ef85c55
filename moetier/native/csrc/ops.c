/* Small vector ops (caller thread): RMS norm, rotate-half rope, SwiGLU (exp: simd.h's mt_exp16). */
#include "mt.h"
#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

/* out = w * x / rms(x); the sum of squares in double (AVX-512: 8 double lanes, then the lanes) */
void rms_norm(const float *x, const void *w, int dt, float eps, float *out, long n) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    __m512d acc = _mm512_setzero_pd();
    for (long i = 0; i < n; i += 8) {
        __mmask8 m = n - i >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (n - i)) - 1);
        __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + i));
        acc = _mm512_fmadd_pd(v, v, acc);
    }
    double ss = _mm512_reduce_add_pd(acc);
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    __m512 iv = _mm512_set1_ps(inv);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 wv = dt == DT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const bf16 *)w + i)), 16))
                                  : _mm512_maskz_loadu_ps(m, (const float *)w + i);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(wv, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), iv)));
    }
#else
    double ss = 0.0;
    for (long i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (long i = 0; i < n; i++) out[i] = ld(w, dt, i) * (x[i] * inv);
#endif
}

/* rotate-half rope on one head vector v [D] with cos/sin [D] */
void rope(float *v, const float *cs, const float *sn, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i + h] + a * sn[i + h];
    }
}

static inline __attribute__((unused)) float silu(float v) { return v / (1.0f + expf(-v)); }

/* a = silu(g) * u; on AVX-512 16 at a time with simd.h's mt_exp16 (within 2 ulp of expf; for
 * g < -88.5 exp(-g) is held at exp(88.5), so silu(g) is a tiny negative number, not -0) */
void swiglu(const float *g, const float *u, float *a, long n) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        __m512 e = mt_exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(a + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
    }
#else
    for (long i = 0; i < n; i++) a[i] = silu(g[i]) * u[i];
#endif
}
