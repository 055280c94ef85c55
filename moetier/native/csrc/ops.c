/* Small vector ops (caller thread): RMS norm, rotate-half rope, exp (softmax), SwiGLU. */
#include "mt.h"

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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* exp of 16 floats (Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two parts, a degree-5
 * polynomial, times 2^n by vscalefps): measured within 1.01 ulp of exp over the normal range,
 * within one denormal step below it, inf above ln(FLT_MAX), NaN kept. One vector code for every
 * element (tails masked), so a value's exp does not depend on where it sits in its vector. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.5f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 tail16(long n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
#endif

/* v[i] = exp(v[i] - sub) for i < n; returns their sum (per lane of 16, then the lanes) */
float mt_exp_sum(float *v, long n, float sub) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    __m512 acc = _mm512_setzero_ps(), s = _mm512_set1_ps(sub);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail16(n - i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + i), s));
        _mm512_mask_storeu_ps(v + i, m, e);
        acc = _mm512_mask_add_ps(acc, m, acc, e);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float sum = 0.0f;
    for (long i = 0; i < n; i++) {
        v[i] = expf(v[i] - sub);
        sum += v[i];
    }
    return sum;
#endif
}

/* a = silu(g) * u = g / (1 + exp(-g)) * u */
void swiglu(const float *g, const float *u, float *a, long n) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail16(n - i);
        __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        __m512 sv = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(a + i, m, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(m, u + i)));
    }
#else
    for (long i = 0; i < n; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
#endif
}
