/* q4_1 (GGUF): 20-byte blocks of 32: float16 d, float16 m, 16 bytes of nibbles (as q4_0);
 * value = d * q + m. Scalar reference only. */
#include "mt.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 20;
        uint16_t dh, mh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        int q = j < 16 ? b[4 + j] & 15 : b[4 + j - 16] >> 4;
        out[i] = f16_to_f32(dh) * (float)q + f16_to_f32(mh);
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

const mt_fmt mt_fmt_q4_1 = {MT_FMT_Q4_1, "q4_1", {rows_scalar, NULL, NULL}, NULL, NULL, dequant};
