/* q5_1 (GGUF): 24-byte blocks of 32: float16 d, float16 m, uint32 high bits, 16 bytes of
 * nibbles; value = d * q + m. Scalar reference only. */
#include "mt.h"

static void dequant(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, j = c & 31;
        const uint8_t *b = row + (c >> 5) * 24;
        uint16_t dh, mh;
        uint32_t qh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        memcpy(&qh, b + 4, 4);
        int q = (j < 16 ? b[8 + j] & 15 : b[8 + j - 16] >> 4) | (int)(((qh >> j) & 1) << 4);
        out[i] = f16_to_f32(dh) * (float)q + f16_to_f32(mh);
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant);
}

const mt_fmt mt_fmt_q5_1 = {MT_FMT_Q5_1, "q5_1", {rows_scalar, NULL, NULL}, NULL, NULL, dequant};
