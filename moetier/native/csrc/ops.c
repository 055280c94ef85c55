/* Small vector ops (caller thread): RMS norm, rotate-half rope, SwiGLU. */
#include "mt.h"

/* out = w * x / rms(x); the sum of squares in double */
void rms_norm(const float *x, const void *w, int dt, float eps, float *out, long n) {
    double ss = 0.0;
    for (long i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (long i = 0; i < n; i++) out[i] = ld(w, dt, i) * (x[i] * inv);
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

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

void swiglu(const float *g, const float *u, float *a, long n) {
    for (long i = 0; i < n; i++) a[i] = silu(g[i]) * u[i];
}
