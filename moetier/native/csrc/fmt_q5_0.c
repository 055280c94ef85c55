/* q5_0 (GGUF): 22-byte blocks of 32: float16 d, uint32 high bits (bit j = value j's 5th bit),
 * 16 bytes of nibbles (as q4_0); value = d * (q - 16). Scalar reference only. */
#include "mt.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 22;
        uint16_t dh;
        uint32_t qh;
        memcpy(&dh, b, 2);
        memcpy(&qh, b + 2, 4);
        int q = (j < 16 ? b[6 + j] & 15 : b[6 + j - 16] >> 4) | (int)(((qh >> j) & 1) << 4);
        out[i] = f16_to_f32(dh) * (float)(q - 16);
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

const mt_fmt mt_fmt_q5_0 = {MT_FMT_Q5_0, "q5_0", {rows_scalar, NULL, NULL}, NULL, NULL, dequant};
