/* q5_k (GGUF): 176-byte super-blocks of 256: float16 d, float16 dmin, 12 bytes of 6-bit
 * (scale, min) as q4_k, 32 bytes of high bits (value v: bit v/32 of byte v%32), 128 bytes of
 * nibbles as q4_k; value = (d * sc) * q - (dmin * m). Scalar reference only. */
#include "mt.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) {
        const uint8_t *b = row + ((c0 + i) >> 8) * 176, *s = b + 4, *qh = b + 16, *qs = b + 48;
        uint16_t dh, mh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        float d = f16_to_f32(dh), dmin = f16_to_f32(mh), D[8], M[8];
        for (int j = 0; j < 8; j++) {
            int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
            int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
            D[j] = d * (float)sc;
            M[j] = dmin * (float)m;
        }
        for (int v = 0; v < 256; v++) {
            int j = v >> 5;
            int q = ((qs[32 * (j >> 1) + (v & 31)] >> (4 * (j & 1))) & 15) | (((qh[v & 31] >> j) & 1) << 4);
            out[i + v] = D[j] * (float)q - M[j];
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

const mt_fmt mt_fmt_q5_k = {MT_FMT_Q5_K, "q5_k", {rows_scalar, NULL, NULL}, NULL, NULL, dequant};
