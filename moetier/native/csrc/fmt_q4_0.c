/* q4_0 (GGUF): 18-byte blocks of 32: float16 d, 16 bytes (values 0..15 in the low nibbles,
 * 16..31 in the high ones); value = d * (q - 8). Scalar reference only (vector ISAs fall back to it). */
#include "mt.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 18;
        uint16_t dh;
        memcpy(&dh, b, 2);
        int q = (j < 16 ? b[2 + j] & 15 : b[2 + j - 16] >> 4) - 8;
        out[i] = f16_to_f32(dh) * (float)q;
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

const mt_fmt mt_fmt_q4_0 = {MT_FMT_Q4_0, "q4_0", {rows_scalar, NULL, NULL}, NULL, NULL, dequant};
