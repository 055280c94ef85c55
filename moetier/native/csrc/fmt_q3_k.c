/* q3_k (GGUF): 110-byte super-blocks of 256: 32 bytes of high-bit mask (value v: bit v/32 of
 * byte v%32; a CLEAR bit subtracts 4), 64 bytes of 2-bit q (as q2_k), 12 bytes of 6-bit scales
 * (minus 32, one per 16 values), float16 d; value = (d * sc) * q. Scalar reference only. */
#include "mt.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i += 256) {
        const uint8_t *b = row + ((c0 + i) >> 8) * 110, *hm = b, *qs = b + 32, *s = b + 96;
        uint16_t dh;
        memcpy(&dh, b + 108, 2);
        float d = f16_to_f32(dh), D[16];
        for (int j = 0; j < 16; j++) {
            int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4, hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
            D[j] = d * (float)((lo | (hi << 4)) - 32);
        }
        for (int v = 0; v < 256; v++) {
            int h = v >> 7, sh = (v >> 5) & 3, l = v & 31;
            int q = ((qs[32 * h + l] >> (2 * sh)) & 3) - (((hm[v & 31] >> (v >> 5)) & 1) ? 0 : 4);
            out[i + v] = D[v >> 4] * (float)q;
        }
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

const mt_fmt mt_fmt_q3_k = {MT_FMT_Q3_K, "q3_k", {rows_scalar, NULL, NULL}, NULL, NULL, dequant};
