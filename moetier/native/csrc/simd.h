/* Vector helpers shared by the fmt_*.c kernels (target-attributed: usable from files built for
 * the baseline ISA). */
#ifndef MT_SIMD_H
#define MT_SIMD_H

#include <immintrin.h>

#include "mt.h"

MT_TARGET_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lanes [0, n) set (n <= 8) */
MT_TARGET_AVX2 static inline __m256i mask256(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 16 bytes -> their low nibbles then their high nibbles would be 32 values; these give 8
 * bytes' nibbles interleaved (b0 lo, b0 hi, b1 lo, ...) as 16 bytes: the "low nibble first"
 * order of MXFP4 (gpt-oss) and compressed-tensors int4 */
MT_TARGET_AVX2 static inline __m128i nibbles_interleaved(__m128i b8) {
    const __m128i m = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(b8, m), hi = _mm_and_si128(_mm_srli_epi16(b8, 4), m);
    return _mm_unpacklo_epi8(lo, hi);
}

MT_TARGET_AVX2 static inline float f16_to_f32_c(uint16_t h) { return _cvtsh_ss(h); }

#endif
