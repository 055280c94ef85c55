/* Two 4-bit codes per byte, value 2k in byte k's low nibble and 2k+1 in its high nibble
 * (compressed-tensors int4, gpt-oss MXFP4), decoded through a 16-entry table per group.
 *
 * x comes prepared in even and odd columns (mt_prep_evenodd, shared with bf16: xe[j] = x[2j],
 * xo[j] = x[2j + 1], zero past the end), so byte j's two codes multiply xe[j] and xo[j] and the
 * nibbles are never interleaved. A group of g values (g even) is g / 2 bytes; its table holds
 * the dequantized value of each code, computed exactly like the format's reference dequantizer
 * (one float multiply), and the weights come out of one register permute per 16 codes
 * (vpermps reads the low 4 bits of each index: the low nibble needs no mask, the high nibble
 * one shift).
 *
 * AVX-512 per 32 values: 1 widening load, 1 shift, 2 permutes, 2 FMAs (the previous kernels
 * unpacked the nibbles, subtracted the offset and converted to float: twice the work). */
#ifndef MT_NIBBLE_H
#define MT_NIBBLE_H

#include "simd.h"

/* the group's 16 code values as floats: t[code] */
typedef __m512 (*nib_table512_fn)(const mt_weight *W, const void *srow, const int8_t *zrow, long gi);

/* acc_e / acc_o += the group's bytes [j0, j1) decoded by table t, times xe / xo */
MT_TARGET_AVX512 static inline void nib_group512(const uint8_t *row, long j0, long j1, __m512 t, const float *xe,
                                                 const float *xo, __m512 *acc_e, __m512 *acc_o) {
    long j = j0;
    for (; j + 16 <= j1; j += 16) {
        __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j)));
        *acc_e = _mm512_fmadd_ps(_mm512_permutexvar_ps(d, t), _mm512_loadu_ps(xe + j), *acc_e);
        *acc_o = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), t), _mm512_loadu_ps(xo + j), *acc_o);
    }
    if (j < j1) {
        __mmask16 m = (__mmask16)((1u << (j1 - j)) - 1);
        __m512i d = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, row + j));
        *acc_e = _mm512_fmadd_ps(_mm512_permutexvar_ps(d, t), _mm512_maskz_loadu_ps(m, xe + j), *acc_e);
        *acc_o = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), t), _mm512_maskz_loadu_ps(m, xo + j),
                                 *acc_o);
    }
}

/* y[r] = W[r, :] . x for rows [r0, r1); groups of W->bcols values (even), tables from `table`
 * (inlined: each format passes its own static function). Groups go in pairs, one accumulator
 * pair each (4 independent FMA chains even when a group is a single 16-byte step); the group
 * bounds are plain multiples of the group's byte count (the last group may be partial). */
MT_TARGET_AVX512 static inline void nib_rows512(const mt_weight *W, const float *xp, float *y, long r0, long r1,
                                                nib_table512_fn table) {
    long cols = W->cols, g = W->bcols, gb = g / 2, half = mt_evenodd_half(cols);
    long nfull = cols / g, bytes = (cols + 1) / 2;
    const float *xe = xp, *xo = xp + half;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        const int8_t *z = mt_zrow(W, r);
        __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
        long gi = 0, j = 0;
        for (; gi + 2 <= nfull; gi += 2, j += 2 * gb) {
            __m512 t0 = table(W, srow, z, gi), t1 = table(W, srow, z, gi + 1);
            nib_group512(row, j, j + gb, t0, xe, xo, &e0, &o0);
            nib_group512(row, j + gb, j + 2 * gb, t1, xe, xo, &e1, &o1);
        }
        for (; j < bytes; gi++, j += gb) /* an odd last full group and / or the partial one */
            nib_group512(row, j, j + gb < bytes ? j + gb : bytes, table(W, srow, z, gi), xe, xo, &e0, &o0);
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(e0, o0), _mm512_add_ps(e1, o1)));
    }
}

#endif
