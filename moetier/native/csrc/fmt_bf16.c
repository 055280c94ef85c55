/* bfloat16 weights, two formats:
 *   bf16 (MT_FMT_BF16):          y[r] = W[r, :] . bf16(x)   the weights of a bfloat16 model
 *   bf16_f32x (MT_FMT_BF16_F32X): y[r] = W[r, :] . x         bf16 weights inside a float32 model
 *
 * bf16 rounds the activations to bf16 (nearest even) at the product's input, on every ISA: the
 * rule of torch's bf16 matmul and of llama.cpp's BF16 dot product. The products of two bf16 values
 * are exact in float32; the sums are float32. Rounding x once per product is what lets the
 * AVX512-BF16 kernels (vdpbf16ps: 32 products per instruction, 2x the float32 FMA's) give a
 * prompt or a batch the bits of single-token steps: decode and prefill run the same rule.
 *
 * The avx2 / avx512 kernels read 2 bf16 per dword: the low halves are the even columns
 * (dword << 16), the high halves the odd ones (dword & 0xffff0000), multiplied by x split into
 * even (xe) and odd (xo) columns, rounded to bf16 (`prep`, zero-padded past the end). The
 * avx512bf16 kernels take x as bf16 pairs, one dword per 2 columns, like the weights: vdpbf16ps
 * adds, per float32 lane, the odd column's product and then the even one's. */
#include "simd.h"

/* x split into even / odd columns (the nibble formats' preparation, unrounded) */
long mt_prep_evenodd_len(long cols, int isa) {
    (void)isa;
    return 2 * mt_evenodd_half(cols);
}

void mt_prep_evenodd(const float *x, long cols, float *xp, int isa) {
    (void)isa;
    long half = mt_evenodd_half(cols);
    float *xe = xp, *xo = xp + half;
    for (long j = 0; j < half; j++) {
        xe[j] = 2 * j < cols ? x[2 * j] : 0.0f;
        xo[j] = 2 * j + 1 < cols ? x[2 * j + 1] : 0.0f;
    }
}

static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

/* bf16's prep. avx512bf16: mt_evenodd_half(cols) dwords of bf16 pairs; below: even / odd float32 halves */
static long prep_len(long cols, int isa) { return isa >= MT_ISA_AVX512BF16 ? mt_evenodd_half(cols) : 2 * mt_evenodd_half(cols); }

/* 16 floats -> 16 bf16, f32_to_bf16's bits (nearest even; NaN quieted): integer ops, not
 * vcvtneps2bf16, which treats denormal inputs as zero */
MT_TARGET_AVX512 static inline __m256i bf16_16(__m512i u) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absmask), inf);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

/* x as bf16 in column order (= mt_evenodd_half(cols) dwords of pairs), zero past the end */
MT_TARGET_AVX512 static void prep_pairs(const float *x, long cols, uint32_t *xw) {
    long half = mt_evenodd_half(cols); /* a multiple of 16 dwords: 32 columns per step */
    for (long c = 0; c < 2 * half; c += 32) {
        long n0 = cols - c, n1 = cols - c - 16;
        __mmask16 m0 = n0 >= 16 ? 0xffff : n0 > 0 ? (__mmask16)((1u << n0) - 1) : 0;
        __mmask16 m1 = n1 >= 16 ? 0xffff : n1 > 0 ? (__mmask16)((1u << n1) - 1) : 0;
        __m256i lo = bf16_16(_mm512_maskz_loadu_epi32(m0, x + c)), hi = bf16_16(_mm512_maskz_loadu_epi32(m1, x + c + 16));
        _mm512_storeu_si512((void *)(xw + c / 2), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    }
}

static void prep(const float *x, long cols, float *xp, int isa) {
    long half = mt_evenodd_half(cols);
    if (isa >= MT_ISA_AVX512BF16) {
        prep_pairs(x, cols, (uint32_t *)xp);
        return;
    }
    float *xe = xp, *xo = xp + half;
    for (long j = 0; j < half; j++) {
        xe[j] = 2 * j < cols ? round_bf16(x[2 * j]) : 0.0f;
        xo[j] = 2 * j + 1 < cols ? round_bf16(x[2 * j + 1]) : 0.0f;
    }
}

/* reference: 8 interleaved partial sums, combined pairwise (x rounded to bf16 when `rx`) */
static inline void rows_ref(const mt_weight *W, const float *x, float *y, long r0, long r1, int rx) {
    long cols = W->cols;
    for (long r = r0; r < r1; r++) {
        const bf16 *w = (const bf16 *)mt_row(W, r);
        float acc[8] = {0};
        long c = 0;
        for (; c + 8 <= cols; c += 8)
            for (int j = 0; j < 8; j++) acc[j] += bf16_to_f32(w[c + j]) * (rx ? round_bf16(x[c + j]) : x[c + j]);
        for (; c < cols; c++) acc[c & 7] += bf16_to_f32(w[c]) * (rx ? round_bf16(x[c]) : x[c]);
        y[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

static void rows_scalar(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    rows_ref(W, x, y, r0, r1, 1);
}

static void rows_scalar_f32x(const mt_weight *W, const float *x, const float *xp, float *y, long r0, long r1) {
    (void)xp;
    rows_ref(W, x, y, r0, r1, 0);
}

/* 16 weights per step (8 dwords) */
MT_TARGET_AVX2 static void rows_avx2(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                     long r1) {
    (void)x;
    long cols = W->cols, cfull = cols & ~15L, rem = cols - cfull, half = mt_evenodd_half(cols);
    const float *xe = xp, *xo = xp + half;
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
#define MT_BF16_STEP(acc_e, acc_o, wv, c)                                                                   \
    do {                                                                                                \
        __m256 xev_ = _mm256_loadu_ps(xe + (c) / 2), xov_ = _mm256_loadu_ps(xo + (c) / 2);              \
        acc_e = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), xev_, acc_e);           \
        acc_o = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, hi_mask)), xov_, acc_o);       \
    } while (0)
    for (long r = r0; r < r1; r++) {
        const bf16 *w = (const bf16 *)mt_row(W, r);
        __m256 e0 = _mm256_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
        long c = 0;
        for (; c + 32 <= cfull; c += 32) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + c));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + c + 16));
            MT_BF16_STEP(e0, o0, w0, c);
            MT_BF16_STEP(e1, o1, w1, c + 16);
        }
        for (; c < cfull; c += 16) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + c));
            MT_BF16_STEP(e0, o0, w0, c);
        }
        if (rem) {
            bf16 t[16] = {0};
            memcpy(t, w + c, rem * sizeof(bf16));
            __m256i w0 = _mm256_loadu_si256((const __m256i *)t);
            MT_BF16_STEP(e0, o0, w0, c);
        }
        y[r] = hsum256(_mm256_add_ps(_mm256_add_ps(e0, o0), _mm256_add_ps(e1, o1)));
    }
#undef MT_BF16_STEP
}

/* 32 weights per step (16 dwords); one row at a time: the weights are read as one sequential
 * stream (4 interleaved rows measured half the bandwidth: 12 vs 24 GB/s on one Zen 4 core) */
MT_TARGET_AVX512 static void rows_avx512(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                         long r1) {
    (void)x;
    const __m512i hi_mask = _mm512_set1_epi32((int)0xffff0000u);
    long cols = W->cols, cfull = cols & ~31L, rem = cols - cfull, half = mt_evenodd_half(cols);
    const float *xe = xp, *xo = xp + half;
    __mmask32 tail = rem ? (__mmask32)((1ull << rem) - 1) : 0;
#define MT_BF16_STEP(acc_e, acc_o, c, mask)                                                                 \
    do {                                                                                                \
        __m512i w_ = (mask) == 0xffffffffu ? _mm512_loadu_si512((const void *)(w + (c)))                 \
                                           : _mm512_maskz_loadu_epi16((mask), w + (c));                  \
        acc_e = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w_, 16)), xev, acc_e);            \
        acc_o = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w_, hi_mask)), xov, acc_o);        \
    } while (0)
    for (long r = r0; r < r1; r++) {
        const bf16 *w = (const bf16 *)mt_row(W, r);
        __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
        long c = 0;
        for (; c + 64 <= cfull; c += 64) {
            __m512 xev = _mm512_loadu_ps(xe + c / 2), xov = _mm512_loadu_ps(xo + c / 2);
            MT_BF16_STEP(e0, o0, c, 0xffffffffu);
            xev = _mm512_loadu_ps(xe + c / 2 + 16);
            xov = _mm512_loadu_ps(xo + c / 2 + 16);
            MT_BF16_STEP(e1, o1, c + 32, 0xffffffffu);
        }
        for (; c < cfull; c += 32) {
            __m512 xev = _mm512_loadu_ps(xe + c / 2), xov = _mm512_loadu_ps(xo + c / 2);
            MT_BF16_STEP(e0, o0, c, 0xffffffffu);
        }
        if (tail) {
            __m512 xev = _mm512_loadu_ps(xe + c / 2), xov = _mm512_loadu_ps(xo + c / 2);
            MT_BF16_STEP(e0, o0, c, tail);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(e0, o0), _mm512_add_ps(e1, o1)));
    }
#undef MT_BF16_STEP
}

#if MT_HAVE_BF16
/* AVX512-BF16: 32 weights per vdpbf16ps; 64-column steps alternate accumulators a0 / a1, the
 * 32-column rest and the masked tail go into a0; y = sum(a0 + a1) */
#define MT_DPBF16(acc, w, x) _mm512_dpbf16_ps((acc), (__m512bh)(w), (__m512bh)(x))

MT_TARGET_BF16 static void rows_avx512bf16(const mt_weight *W, const float *x, const float *xp, float *y, long r0,
                                           long r1) {
    (void)x;
    long cols = W->cols, cfull = cols & ~31L, rem = cols - cfull;
    const uint32_t *xw = (const uint32_t *)xp;
    __mmask32 tail = rem ? (__mmask32)((1ull << rem) - 1) : 0;
    for (long r = r0; r < r1; r++) {
        const bf16 *w = (const bf16 *)mt_row(W, r);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        long c = 0;
        for (; c + 64 <= cfull; c += 64) {
            a0 = MT_DPBF16(a0, _mm512_loadu_si512((const void *)(w + c)), _mm512_loadu_si512((const void *)(xw + c / 2)));
            a1 = MT_DPBF16(a1, _mm512_loadu_si512((const void *)(w + c + 32)),
                           _mm512_loadu_si512((const void *)(xw + c / 2 + 16)));
        }
        for (; c < cfull; c += 32)
            a0 = MT_DPBF16(a0, _mm512_loadu_si512((const void *)(w + c)), _mm512_loadu_si512((const void *)(xw + c / 2)));
        if (tail)
            a0 = MT_DPBF16(a0, _mm512_maskz_loadu_epi16(tail, w + c), _mm512_loadu_si512((const void *)(xw + c / 2)));
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* The multi-token tile: 2 rows x NT (<= MT_TILE_T_BF16 = 6) tokens per pass, each (row, token)
 * summed as rows_avx512bf16 sums it (same accumulators, same steps: the same bits), each weight
 * vector loaded once for the NT tokens. 2 x 6 x 2 accumulators, 24 of the 32 zmm (6 tokens, not
 * 4: an expert's ~6 tokens of a 64-token prompt in one pass; fewer x loads per product). */
MT_TARGET_BF16 static inline __attribute__((always_inline)) void tile2_nt(const mt_weight *W, const float *const *xp, float *const *y, long r, const int NT) {
    long cols = W->cols, cfull = cols & ~31L, rem = cols - cfull;
    __mmask32 tail = rem ? (__mmask32)((1ull << rem) - 1) : 0;
    const bf16 *wa = (const bf16 *)mt_row(W, r), *wb = (const bf16 *)mt_row(W, r + 1);
    __m512 A[MT_TILE_T_BF16][2], B[MT_TILE_T_BF16][2];
    _Pragma("GCC unroll 6") for (int j = 0; j < NT; j++) A[j][0] = A[j][1] = B[j][0] = B[j][1] = _mm512_setzero_ps();
#define BF16_STEP(k, c, va, vb)                                                                          \
    _Pragma("GCC unroll 6") for (int j = 0; j < NT; j++) {                                              \
        __m512i xv = _mm512_loadu_si512((const void *)((const uint32_t *)xp[j] + (c) / 2));              \
        A[j][k] = MT_DPBF16(A[j][k], va, xv);                                                           \
        B[j][k] = MT_DPBF16(B[j][k], vb, xv);                                                           \
    }
    long c = 0;
    for (; c + 64 <= cfull; c += 64) {
        __m512i va = _mm512_loadu_si512((const void *)(wa + c)), vb = _mm512_loadu_si512((const void *)(wb + c));
        BF16_STEP(0, c, va, vb);
        va = _mm512_loadu_si512((const void *)(wa + c + 32));
        vb = _mm512_loadu_si512((const void *)(wb + c + 32));
        BF16_STEP(1, c + 32, va, vb);
    }
    for (; c < cfull; c += 32) {
        __m512i va = _mm512_loadu_si512((const void *)(wa + c)), vb = _mm512_loadu_si512((const void *)(wb + c));
        BF16_STEP(0, c, va, vb);
    }
    if (tail) {
        __m512i va = _mm512_maskz_loadu_epi16(tail, wa + c), vb = _mm512_maskz_loadu_epi16(tail, wb + c);
        BF16_STEP(0, c, va, vb);
    }
#undef BF16_STEP
    _Pragma("GCC unroll 6") for (int j = 0; j < NT; j++) {
        y[j][r] = _mm512_reduce_add_ps(_mm512_add_ps(A[j][0], A[j][1]));
        y[j][r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(B[j][0], B[j][1]));
    }
}

MT_TARGET_BF16 static void tile_avx512bf16(const mt_weight *W, const float *const *x, const float *const *xp,
                                           float *const *y, int n, long r0, long r1) {
    long r = r0;
    for (; r + 2 <= r1; r += 2) switch (n) {
        case 6: tile2_nt(W, xp, y, r, 6); break;
        case 5: tile2_nt(W, xp, y, r, 5); break;
        case 4: tile2_nt(W, xp, y, r, 4); break;
        case 3: tile2_nt(W, xp, y, r, 3); break;
        case 2: tile2_nt(W, xp, y, r, 2); break;
        default: tile2_nt(W, xp, y, r, 1); break;
        }
    if (r < r1)
        for (int j = 0; j < n; j++) rows_avx512bf16(W, x[j], xp[j], y[j], r, r1);
}
#undef MT_DPBF16
#define BF16_ROWS rows_avx512bf16
#define BF16_TILE tile_avx512bf16
#else
#define BF16_ROWS NULL
#define BF16_TILE NULL
#endif

/* the avx2 / avx512 row kernels serve both formats: their prepared halves are rounded for bf16
 * (prep), not for bf16_f32x (mt_prep_evenodd); gemm.c's bf16 tile likewise */
const mt_fmt mt_fmt_bf16 = {MT_FMT_BF16, "bf16", {rows_scalar, rows_avx2, rows_avx512, NULL, BF16_ROWS}, prep_len,
                            prep, NULL, {NULL, NULL, NULL, NULL, BF16_TILE}};
const mt_fmt mt_fmt_bf16_f32x = {MT_FMT_BF16_F32X, "bf16_f32x", {rows_scalar_f32x, rows_avx2, rows_avx512},
                                 mt_prep_evenodd_len, mt_prep_evenodd, NULL, {NULL}};
