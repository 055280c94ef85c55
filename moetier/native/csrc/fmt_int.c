/* int4_group / int8_group: compressed-tensors pack-quantized integers, one scale (and an
 * optional int8 zero point) per group of bcols values of a row.
 * int8: byte c holds u, value v = u - 128. int4: byte c/2 holds values c (low nibble) and c+1
 * (high nibble), value v = u - 8. Weight = (v - zero) * scale (zero = 0 when symmetric).
 * The vector kernels need groups of an even number of columns for int4 (checked in Python). */
#include "nibble.h"

static void dequant_int8(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    const void *srow = mt_srow(W, r);
    const int8_t *z = mt_zrow(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, g = c / W->bcols;
        int v = (int)row[c] - 128 - (z ? z[g] : 0);
        out[i] = (float)v * ld_scale(srow, W->sdt, g);
    }
}

static void dequant_int4(const mt_weight *W, long r, long c0, long n, float *out) {
    const uint8_t *row = (const uint8_t *)mt_row(W, r);
    const void *srow = mt_srow(W, r);
    const int8_t *z = mt_zrow(W, r);
    for (long i = 0; i < n; i++) {
        long c = c0 + i, g = c / W->bcols;
        int v = (int)((row[c >> 1] >> ((c & 1) * 4)) & 15) - 8 - (z ? z[g] : 0);
        out[i] = (float)v * ld_scale(srow, W->sdt, g);
    }
}

static void rows_scalar8(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant_int8);
}

static void rows_scalar4(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    mt_rows_dequant(W, x, y, r0, r1, dequant_int4);
}

/* ---- AVX2: 8 values per step ---- */

/* 8 unsigned values (bytes) -> 8 floats u - off (exact small integers; the group scale is
 * applied once to the group's partial sums) */
MT_TARGET_AVX2 static inline __m256 ints8(__m128i u8, __m256i off) {
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(u8), off));
}

MT_TARGET_AVX2 static inline void rows_avx2_bits(const mt_weight *W, const float *x, float *y, long r0, long r1,
                                                 int bits) {
    long cols = W->cols, g = W->bcols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        const int8_t *z = mt_zrow(W, r);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (long b0 = 0; b0 < cols; b0 += g) {
            long gi = b0 / g;
            __m256 s = _mm256_set1_ps(ld_scale(srow, W->sdt, gi));
            __m256i off = _mm256_set1_epi32((bits == 8 ? 128 : 8) + (z ? z[gi] : 0));
            long end = b0 + g < cols ? b0 + g : cols, c = b0;
            __m256 p0 = _mm256_setzero_ps(), p1 = p0; /* the group's unscaled partial sums */
            if (bits == 4) {
                const __m128i m4 = _mm_set1_epi8(0x0f);
                for (; c + 32 <= end; c += 32) { /* 32 values from one 16-byte load */
                    __m128i b = _mm_loadu_si128((const __m128i *)(row + c / 2));
                    __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
                    __m128i u0 = _mm_unpacklo_epi8(lo, hi), u1 = _mm_unpackhi_epi8(lo, hi);
                    p0 = _mm256_fmadd_ps(ints8(u0, off), _mm256_loadu_ps(x + c), p0);
                    p1 = _mm256_fmadd_ps(ints8(_mm_srli_si128(u0, 8), off), _mm256_loadu_ps(x + c + 8), p1);
                    p0 = _mm256_fmadd_ps(ints8(u1, off), _mm256_loadu_ps(x + c + 16), p0);
                    p1 = _mm256_fmadd_ps(ints8(_mm_srli_si128(u1, 8), off), _mm256_loadu_ps(x + c + 24), p1);
                }
            }
            for (; c + 16 <= end; c += 16) { /* 16 values: 16 bytes (int8) or 8 bytes (int4) */
                __m128i u = bits == 8 ? _mm_loadu_si128((const __m128i *)(row + c))
                                      : nibbles_interleaved(_mm_loadl_epi64((const __m128i *)(row + c / 2)));
                p0 = _mm256_fmadd_ps(ints8(u, off), _mm256_loadu_ps(x + c), p0);
                p1 = _mm256_fmadd_ps(ints8(_mm_srli_si128(u, 8), off), _mm256_loadu_ps(x + c + 8), p1);
            }
            for (; c < end; c += 8) {
                long n = end - c < 8 ? end - c : 8;
                __m128i u;
                if (bits == 8) {
                    if (n == 8) {
                        u = _mm_loadl_epi64((const __m128i *)(row + c));
                    } else {
                        uint8_t t[8] = {0};
                        memcpy(t, row + c, n);
                        u = _mm_loadl_epi64((const __m128i *)t);
                    }
                } else {
                    uint32_t t = 0;
                    if (n == 8) memcpy(&t, row + c / 2, 4); /* constant size: one load */
                    else memcpy(&t, row + c / 2, (n + 1) / 2);
                    u = nibbles_interleaved(_mm_cvtsi32_si128((int)t));
                }
                __m256 w = ints8(u, off);
                if (n == 8) {
                    if ((c - b0) & 8) p1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + c), p1);
                    else p0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + c), p0);
                } else {
                    p0 = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + c, mask256(n)), p0);
                }
            }
            a0 = _mm256_fmadd_ps(p0, s, a0);
            a1 = _mm256_fmadd_ps(p1, s, a1);
        }
        y[r] = hsum256(_mm256_add_ps(a0, a1));
    }
}

MT_TARGET_AVX2 static void rows_avx2_8(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                       long r1) {
    (void)xp;
    rows_avx2_bits(W, x, y, r0, r1, 8);
}

MT_TARGET_AVX2 static void rows_avx2_4(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                       long r1) {
    (void)xp;
    rows_avx2_bits(W, x, y, r0, r1, 4);
}

/* ---- AVX-512 ---- */

/* int8: 32 values per step, the group's unscaled integer-valued partial sums scaled once */
MT_TARGET_AVX512 static void rows_avx512_8(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                           long r1) {
    (void)xp;
    long cols = W->cols, g = W->bcols;
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        const int8_t *z = mt_zrow(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (long b0 = 0, gi = 0; b0 < cols; b0 += g, gi++) {
            __m512 s = _mm512_set1_ps(ld_scale(srow, W->sdt, gi));
            __m512i off = _mm512_set1_epi32(128 + (z ? z[gi] : 0));
            long end = b0 + g < cols ? b0 + g : cols, c = b0;
            __m512 p0 = _mm512_setzero_ps(), p1 = p0;
            for (; c + 32 <= end; c += 32) {
                __m512i v0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c))), off);
                __m512i v1 =
                    _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c + 16))), off);
                p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_loadu_ps(x + c), p0);
                p1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_loadu_ps(x + c + 16), p1);
            }
            for (; c < end; c += 16) { /* the group's tail: up to 16 values, masked */
                long n = end - c < 16 ? end - c : 16;
                __mmask16 m = (__mmask16)((1u << n) - 1);
                __m512i v = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, row + c)), off);
                p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_maskz_loadu_ps(m, x + c), p0);
            }
            a0 = _mm512_fmadd_ps(p0, s, a0);
            a1 = _mm512_fmadd_ps(p1, s, a1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* int4: the group's table t[u] = (u - 8 - zero) * scale (the reference's value, one rounding) */
MT_TARGET_AVX512 static inline __m512 int4_table(const mt_weight *W, const void *srow, const int8_t *z, long gi) {
    const __m512 v = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7); /* u - 8 */
    __m512 s = _mm512_set1_ps(ld_scale(srow, W->sdt, gi));
    return _mm512_mul_ps(z ? _mm512_sub_ps(v, _mm512_set1_ps((float)z[gi])) : v, s);
}

MT_TARGET_AVX512 static void rows_avx512_4(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                           long r1) {
    (void)x;
    nib_rows512(W, xp, y, r0, r1, int4_table);
}

/* ---- AVX-512 VNNI (int4): integer dot products on x's digits (simd.h), groups of a multiple
 * of 32 (others run the avx512 kernel) ----
 * x is prepared after the even / odd columns the avx512 kernel reads, in chunks of 128 columns
 * (zero past the end). A chunk's 64 code bytes are two byte vectors, the low nibbles (even
 * columns) and the high ones (odd columns), whose int32 lane l holds columns 8l .. 8l + 7. The
 * stored unsigned codes u (value u - 8 - zero) multiply the digits a (vpdpbusd), each lane
 * started at -8 sum(a) over its columns (prepared), so it ends at the exact sum of (u - 8) a
 * (|P| <= 8 * 8 * 127); per lane the digit sums are scaled in float by the group's scale times
 * the digit scale of the lane's 32 columns (digits 2 and 3 joined first: 256 P2 + P3). Zero
 * points subtract zero * sum(x) per lane in float (prepared sums). */
typedef struct {
    float s[16], sum[16]; /* per lane: the digit scale of its columns, the sum of x over them */
    int32_t init[3][16];  /* per digit and lane: -8 times the sum of its columns' digits */
    int8_t a[3][128];     /* per digit: the 64 even columns, then the 64 odd ones */
} chunk4;
_Static_assert(sizeof(chunk4) == 11 * 64, "chunks are whole 64-byte lines");

static long prep_len4(long cols, int isa) {
    return mt_prep_evenodd_len(cols, isa) + (isa >= MT_ISA_AVX512VNNI ? (cols + 127) / 128 * (long)(sizeof(chunk4) / 4) : 0);
}

/* the digits of 32 columns v[0, 32) (one digit scale): digit k of the 16 values i0 picks at
 * a + k * stride + off0, of those i1 picks at a + k * stride + off1; returns the digit scale */
MT_TARGET_VNNI static inline float digits32(const float *v, __m512i i0, __m512i i1, int8_t *a, int stride, int off0,
                                            int off1) {
    float amax = absmax(v, 32), s = digit_scale(amax), rinv = digit_rinv(amax);
    __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
    __m128i d[2][3];
    digits16(_mm512_permutex2var_ps(lo, i0, hi), s, rinv, &d[0][0], &d[0][1], &d[0][2]);
    digits16(_mm512_permutex2var_ps(lo, i1, hi), s, rinv, &d[1][0], &d[1][1], &d[1][2]);
    for (int k = 0; k < 3; k++) {
        _mm_storeu_si128((__m128i *)(a + k * stride + off0), d[0][k]);
        _mm_storeu_si128((__m128i *)(a + k * stride + off1), d[1][k]);
    }
    return s;
}

/* x's columns [c0, c0 + n) zero-padded to n floats in buf (or x itself when all exist) */
static inline const float *padded(const float *x, long cols, long c0, long n, float *buf) {
    if (c0 + n <= cols) return x + c0;
    memset(buf, 0, n * sizeof(float));
    memcpy(buf, x + c0, (cols - c0) * sizeof(float));
    return buf;
}

MT_TARGET_VNNI static void prep4_vnni(const float *x, long cols, chunk4 *C) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1)), o = _mm512_set1_epi8(8);
    float buf[128];
    for (long c0 = 0; c0 < cols; c0 += 128, C++) {
        const float *v = padded(x, cols, c0, 128, buf);
        for (int b = 0; b < 4; b++) { /* 32 columns: lanes 4b .. 4b + 3, bytes 16b .. 16b + 15 of each half */
            float s = digits32(v + 32 * b, even, odd, C->a[0], 128, 16 * b, 64 + 16 * b);
            for (int l = 4 * b; l < 4 * b + 4; l++) {
                float t = 0.0f;
                for (int i = 0; i < 8; i++) t += v[8 * l + i];
                C->s[l] = s;
                C->sum[l] = t;
            }
        }
        for (int k = 0; k < 3; k++) {
            __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), o, _mm512_load_si512((const void *)C->a[k]));
            t = _mm512_dpbusd_epi32(t, o, _mm512_load_si512((const void *)(C->a[k] + 64)));
            _mm512_store_si512((void *)C->init[k], _mm512_sub_epi32(_mm512_setzero_si512(), t));
        }
    }
}

static void prep4(const float *x, long cols, float *xp, int isa) {
    mt_prep_evenodd(x, cols, xp, isa);
    if (isa >= MT_ISA_AVX512VNNI) prep4_vnni(x, cols, (chunk4 *)(xp + mt_prep_evenodd_len(cols, isa)));
}

/* n consecutive scales of a scale row from group gi (n <= 4), as floats (the values ld_scale reads) */
MT_TARGET_VNNI static inline __m128 scales_n(const void *srow, int sdt, long gi, int n) {
    __mmask8 m = (__mmask8)((1u << n) - 1);
    switch (sdt) {
    case DT_BF16: return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_maskz_loadu_epi16(m, (const bf16 *)srow + gi)), 16));
    case DT_F16: return _mm_cvtph_ps(_mm_maskz_loadu_epi16(m, (const uint16_t *)srow + gi));
    case DT_F32: return _mm_maskz_loadu_ps(m, (const float *)srow + gi);
    default: {
        float t[4] = {0, 0, 0, 0};
        for (int i = 0; i < n; i++) t[i] = ld_scale(srow, sdt, gi + i);
        return _mm_loadu_ps(t);
    }
    }
}

/* The scales S and zero points Z of the four 32-column blocks from column c0 of a row, each in
 * the 4 lanes that hold it; Z only when the row has zero points; blocks past the end get 0.
 * gi: the group of column c0 (kept by the caller: no division per chunk). */
MT_TARGET_VNNI static inline void group_lanes(const mt_weight *W, const void *srow, const int8_t *z, long c0, long gi,
                                              __m512 *S, __m512 *Z) {
    const int nblk = 4;
    long g = W->bcols, cols = W->cols;
    if (g % 128 == 0) { /* the chunk lies in one group */
        *S = _mm512_set1_ps(ld_scale(srow, W->sdt, gi));
        if (z) *Z = _mm512_set1_ps((float)z[gi]);
        return;
    }
    if (g == 32 && W->sdt == DT_BF16 && !z && c0 + 128 <= cols) {
        /* the common case (compressed-tensors int4 g32: bf16 scales, symmetric), a whole chunk:
         * its 4 scales broadcast to every 128-bit lane, one in-lane byte shuffle puts scale b's
         * bf16 bits in the high half of lane b's 4 dwords (bf16 -> float as ld_scale: bits << 16) */
        const __m512i sel = _mm512_setr_epi32(0x01008080, 0x01008080, 0x01008080, 0x01008080, 0x03028080, 0x03028080,
                                              0x03028080, 0x03028080, 0x05048080, 0x05048080, 0x05048080, 0x05048080,
                                              0x07068080, 0x07068080, 0x07068080, 0x07068080);
        long long four;
        memcpy(&four, (const bf16 *)srow + gi, 8);
        *S = _mm512_castsi512_ps(_mm512_shuffle_epi8(_mm512_set1_epi64(four), sel));
        return;
    }
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    long nb = (cols - c0 + 31) / 32 < nblk ? (cols - c0 + 31) / 32 : nblk; /* blocks that exist */
    __m128 s4, z4 = _mm_setzero_ps();
    if (g == 32) { /* consecutive groups */
        s4 = scales_n(srow, W->sdt, gi, (int)nb);
        if (z) z4 = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << nb) - 1), z + gi)));
    } else { /* a few groups: block b's is gi or one after it */
        float st[4] = {0, 0, 0, 0}, zt[4] = {0, 0, 0, 0};
        for (int b = 0; b < nb; b++) {
            long gb = gi + ((c0 + 32 * b) >= (gi + 1) * g);
            st[b] = ld_scale(srow, W->sdt, gb);
            if (z) zt[b] = (float)z[gb];
        }
        s4 = _mm_loadu_ps(st);
        z4 = _mm_loadu_ps(zt);
    }
    *S = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s4));
    if (z) *Z = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(z4));
}

MT_TARGET_VNNI static void rows_vnni4(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                      long r1) {
    if (W->bcols % 32) { /* groups the digit kernel does not take */
        rows_avx512_4(W, x, xp, y, r0, r1);
        return;
    }
    long cols = W->cols, bytes = (cols + 1) / 2;
    const chunk4 *C0 = (const chunk4 *)(xp + mt_prep_evenodd_len(cols, MT_ISA_AVX512VNNI));
    const __m512i m4 = _mm512_set1_epi8(0x0f), c256 = _mm512_set1_epi32(256);
    int gshift = (W->bcols & (W->bcols - 1)) ? -1 : __builtin_ctzl((unsigned long)W->bcols); /* power-of-two groups */
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        const int8_t *z = mt_zrow(W, r);
        __m512 acc1 = _mm512_setzero_ps(), acc23 = acc1, az = acc1;
        const chunk4 *C = C0;
        long gi = 0; /* the group of column 2j */
        for (long j = 0; j < bytes; j += 64, C++) { /* code bytes [j, j + 64): columns 2j .. 2j + 127 */
            if (gshift >= 0) gi = (2 * j) >> gshift;
            else
                while (2 * j >= (gi + 1) * W->bcols) gi++;
            __m512i v = j + 64 <= bytes ? _mm512_loadu_si512((const void *)(row + j))
                                        : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (bytes - j)) - 1), row + j);
            __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            __m512 S, Z;
            group_lanes(W, srow, z, 2 * j, gi, &S, &Z);
            if (z) az = _mm512_fmadd_ps(_mm512_mul_ps(S, Z), _mm512_load_ps(C->sum), az);
            __m512i P[3];
            for (int k = 0; k < 3; k++) /* |P| <= 8 * 8 * 127 */
                P[k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_load_si512((const void *)C->init[k]), lo,
                                                               _mm512_load_si512((const void *)C->a[k])),
                                           hi, _mm512_load_si512((const void *)(C->a[k] + 64)));
            __m512 L = _mm512_mul_ps(S, _mm512_load_ps(C->s));
            acc1 = _mm512_fmadd_ps(L, _mm512_cvtepi32_ps(P[0]), acc1);
            acc23 = _mm512_fmadd_ps(L, _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(P[2], P[1], c256)), acc23);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(acc23, _mm512_set1_ps(MT_DIGIT_UNIT), acc1)) - _mm512_reduce_add_ps(az);
    }
}

/* ---- AVX-512 VNNI (int8): integer dot products on x's digits (simd.h), groups of a multiple
 * of 128 columns (g128, g256, per channel; others run the avx512 kernel) ----
 * x is prepared in chunks of 128 columns (zero past the end), one digit scale each. A chunk's
 * 128 stored bytes u (value u - 128 - zero) are two byte vectors whose int32 lane l holds
 * columns 4l .. 4l + 3 and 64 + 4l .. 64 + 4l + 3; they multiply the digits a in column order
 * (vpdpbusd: u unsigned, a signed), each lane started at -128 times the sum of its 8 digits
 * (prepared), so it ends at the exact sum of (u - 128) a (|P| <= 8 * 128 * 127). Digits 2 and
 * 3 are joined in integer (256 P2 + P3, |.| < 2^26) and both sums scaled in float by the group
 * scale times the chunk's digit scale. Zero points subtract scale * zero * sum(x) (prepared
 * sums). Per 128 weights: 6 vpdpbusd, a shift and an add, 2 conversions and 2 FMAs, where the
 * avx512 kernel converts and multiplies every weight (4 ops per 16). */
typedef struct {
    float s, sum, pad[14]; /* the chunk's digit scale and the sum of x over it */
    int32_t init[3][16];   /* per digit and lane: -128 times the sum of its 8 columns' digits */
    int8_t a[3][128];      /* per digit: the chunk's 128 columns in order */
} chunk8;
_Static_assert(sizeof(chunk8) == 10 * 64, "chunks are whole 64-byte lines");

static long prep_len8(long cols, int isa) {
    return isa >= MT_ISA_AVX512VNNI ? (cols + 127) / 128 * (long)(sizeof(chunk8) / 4) : 0;
}

MT_TARGET_VNNI static void prep8_vnni(const float *x, long cols, chunk8 *C) {
    const __m512i o = _mm512_set1_epi8((char)128);
    float buf[128];
    for (long c0 = 0; c0 < cols; c0 += 128, C++) {
        const float *v = padded(x, cols, c0, 128, buf);
        float amax = absmax(v, 128), s = digit_scale(amax), rinv = digit_rinv(amax), t = 0.0f;
        for (int b = 0; b < 8; b++) {
            __m128i d[3];
            digits16(_mm512_loadu_ps(v + 16 * b), s, rinv, &d[0], &d[1], &d[2]);
            for (int k = 0; k < 3; k++) _mm_storeu_si128((__m128i *)(C->a[k] + 16 * b), d[k]);
        }
        for (int i = 0; i < 128; i++) t += v[i];
        C->s = s;
        C->sum = t;
        for (int k = 0; k < 3; k++) {
            __m512i q = _mm512_dpbusd_epi32(_mm512_setzero_si512(), o, _mm512_load_si512((const void *)C->a[k]));
            q = _mm512_dpbusd_epi32(q, o, _mm512_load_si512((const void *)(C->a[k] + 64)));
            _mm512_store_si512((void *)C->init[k], _mm512_sub_epi32(_mm512_setzero_si512(), q));
        }
    }
}

static void prep8(const float *x, long cols, float *xp, int isa) {
    if (isa >= MT_ISA_AVX512VNNI) prep8_vnni(x, cols, (chunk8 *)xp);
}

/* software prefetch distance of rows_vnni8 (bytes ahead in the row, into the next rows): without
 * it the kernel read weights streamed from memory at 0.6-0.7x the avx512 kernel's rate (fewer,
 * wider loads per line leave the hardware prefetcher behind); 512 / 1024 / 2048 bytes measured
 * 1.0-1.4x / 1.0-1.3x / 1.2-1.5x the avx512 kernel on 16-128 MB weights */
#define VNNI8_PREFETCH 2048
MT_TARGET_VNNI static void rows_vnni8(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                      long r1) {
    if (W->bcols % 128) { /* groups the digit kernel does not take */
        rows_avx512_8(W, x, xp, y, r0, r1);
        return;
    }
    long cols = W->cols, per_group = W->bcols / 128; /* chunks per group */
    for (long r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)mt_row(W, r);
        const void *srow = mt_srow(W, r);
        const int8_t *z = mt_zrow(W, r);
        __m512 acc1 = _mm512_setzero_ps(), acc23 = acc1;
        float az = 0.0f;
        const chunk8 *C = (const chunk8 *)xp;
        for (long gi = 0, c0 = 0; c0 < cols; gi++) {
            float sw = ld_scale(srow, W->sdt, gi), swz = z ? sw * (float)z[gi] : 0.0f;
            for (long j = 0; j < per_group && c0 < cols; j++, c0 += 128, C++) {
                __m512i u0, u1;
                _mm_prefetch((const char *)(row + c0 + VNNI8_PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(row + c0 + VNNI8_PREFETCH + 64), _MM_HINT_T0);
                if (c0 + 128 <= cols) {
                    u0 = _mm512_loadu_si512((const void *)(row + c0));
                    u1 = _mm512_loadu_si512((const void *)(row + c0 + 64));
                } else { /* the last chunk: bytes past the row are 0 (their digits are 0 too) */
                    long n = cols - c0;
                    u0 = _mm512_maskz_loadu_epi8(n >= 64 ? ~0ull : (1ull << n) - 1, row + c0);
                    u1 = n > 64 ? _mm512_maskz_loadu_epi8((1ull << (n - 64)) - 1, row + c0 + 64) : _mm512_setzero_si512();
                }
                __m512i P[3];
                for (int k = 0; k < 3; k++) /* |P| <= 8 * 128 * 127 */
                    P[k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_load_si512((const void *)C->init[k]), u0,
                                                                   _mm512_load_si512((const void *)C->a[k])),
                                               u1, _mm512_load_si512((const void *)(C->a[k] + 64)));
                __m512 L = _mm512_set1_ps(sw * C->s);
                acc1 = _mm512_fmadd_ps(L, _mm512_cvtepi32_ps(P[0]), acc1);
                acc23 = _mm512_fmadd_ps(L, _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(P[1], 8), P[2])), acc23);
                if (z) az += swz * C->sum;
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_fmadd_ps(acc23, _mm512_set1_ps(MT_DIGIT_UNIT), acc1)) - az;
    }
}

const mt_fmt mt_fmt_int8 = {MT_FMT_INT8_GROUP, "int8_group", {rows_scalar8, rows_avx2_8, rows_avx512_8, rows_vnni8},
                            prep_len8, prep8, dequant_int8};
const mt_fmt mt_fmt_int4 = {MT_FMT_INT4_GROUP, "int4_group", {rows_scalar4, rows_avx2_4, rows_avx512_4, rows_vnni4},
                            prep_len4, prep4, dequant_int4};
