/* moetier native kernels: the shared header (types, the weight descriptor, the GEMV batch API,
 * parallel regions, the layer descriptor and the per-file entry points).
 *
 * Called from Python through ctypes (moetier/native/). Activations are float32. Every matrix
 * is an `mt_weight` (any stored format, see MT_FMT_*); norm and bias vectors, the embedding
 * table and the KV cache are plain arrays in the model dtype (`dt`: DT_F32 or DT_BF16).
 *
 * Determinism: every output element is produced by exactly one thread with a fixed
 * summation order, so results do not depend on the thread count or on where the weights
 * live (RAM, cache slot, prefetch slot): tiered runs are bit-identical to in-RAM runs.
 *
 * Files: parallel.c (claim-based worker pool), gemv.c (batched row-split engine + ISA dispatch),
 * fmt_*.c (one per weight format: its row dot product, scalar reference + AVX2 + AVX-512, and for
 * the integer-weight formats AVX-512 VNNI),
 * ops.c (norm, rope, SwiGLU), attention.c, moe.c (router, experts, dense MLP), decode.c
 * (scratch, embedding, head, the whole-step path); many.h, gemm.c, prefill.c (many tokens per
 * call: prefill and batched steps); mla.c (DeepSeek MLA); ext.h, sinks.c, ext_many.c (gpt-oss /
 * Llama-4: single- and multi-token steps); ep.h, ep.c (expert parallelism: the decode step's
 * exchange over the shared-memory rings of moetier/distributed/shm.py).
 *
 * Build (moetier/native/__init__.py): fmt_*.c are compiled for the baseline ISA with
 * -ffp-contract=off (their vector variants carry target attributes and are chosen at run time
 * by cpuid); every other file with -march=native.
 */
#ifndef MT_H
#define MT_H

#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

/* element dtypes of plain vectors (norms, biases, KV cache) and of scale tensors */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_E8M0 = 3 };

/* weight formats: the codes of moetier/quant/__init__.py (keep in sync) */
enum {
    MT_FMT_F32 = 0, MT_FMT_BF16 = 1, MT_FMT_F16 = 2, MT_FMT_BF16_F32X = 3, /* fmt_bf16.c: x rounded / float32 */
    MT_FMT_FP8_E4M3_BLOCK = 10, MT_FMT_MXFP4 = 11, MT_FMT_INT4_GROUP = 12, MT_FMT_INT8_GROUP = 13,
    MT_FMT_Q4_0 = 102, MT_FMT_Q4_1 = 103, MT_FMT_Q5_0 = 106, MT_FMT_Q5_1 = 107, MT_FMT_Q8_0 = 108,
    MT_FMT_Q2_K = 110, MT_FMT_Q3_K = 111, MT_FMT_Q4_K = 112, MT_FMT_Q5_K = 113, MT_FMT_Q6_K = 114,
    MT_FMT_GGML_MXFP4 = 139,
};

/* instruction sets of the weight kernels (gemv.c picks one at run time). avx512vnni: AVX-512
 * plus VNNI (vpdpbusd: u8 x s8 dot products into int32); the integer-weight formats that have
 * kernels there multiply their codes with x decomposed into int8 digits (simd.h: digits of x)
 * in integer arithmetic; a format without them runs its avx512 kernels. avx512bf16: plus
 * AVX512-BF16 (vdpbf16ps: bf16 pair dot products into float32), used by the bf16 weights. */
enum { MT_ISA_SCALAR = 0, MT_ISA_AVX2 = 1, MT_ISA_AVX512 = 2, MT_ISA_AVX512VNNI = 3, MT_ISA_AVX512BF16 = 4, MT_N_ISA = 5 };

#define MT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define MT_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define MT_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")))
/* the AVX512-BF16 kernels need GCC >= 10 or clang >= 9 (Ubuntu 20.04's GCC 9 has no vdpbf16ps
 * intrinsics); built without them, the avx512bf16 level is absent and bf16 runs its avx512 kernels */
#ifndef MT_HAVE_BF16
#if defined(__clang__)
#define MT_HAVE_BF16 (__clang_major__ >= 9)
#elif defined(__GNUC__)
#define MT_HAVE_BF16 (__GNUC__ >= 10)
#else
#define MT_HAVE_BF16 0
#endif
#endif

/* One 2-D weight [rows, cols] in its stored format (built in Python: native/weights.py).
 * Row r's packed values start at data + r * stride (bytes). Formats with separate scales:
 * the scale of (row r, column c) is at scale + ((row0 + r) / brows) * sstride (bytes),
 * element c / bcols (dtype sdt); zero points likewise with zstride. GGUF formats keep their
 * scales inside the row's blocks (scale == NULL). Keep in sync with weights.py: MtWeight. */
typedef struct {
    int fmt;          /* MT_FMT_* */
    int sdt;          /* scale dtype (DT_*) */
    long rows, cols;
    const void *data;
    long stride;      /* bytes between consecutive rows of data */
    const void *scale;
    long sstride;     /* bytes between consecutive scale rows */
    const void *zero; /* zero points (NULL: symmetric) */
    long zstride;     /* bytes between consecutive zero-point rows */
    int brows, bcols; /* rows and columns one scale covers */
    int row0;         /* row offset of row 0 inside its scale block row */
    int flags;        /* format-specific */
} mt_weight;

static inline const void *mt_row(const mt_weight *w, long r) { return (const char *)w->data + r * w->stride; }

/* A format's row kernel: y[r] = W[r, :] . x for rows [r0, r1). xp: x prepared by the
 * format's `prep` for the kernel's ISA (NULL if it has none). */
typedef void (*mt_rows_fn)(const mt_weight *w, const float *x, const float *xp, float *y, long r0, long r1);

/* A format's reference dequantizer: out[0, n) = W[r, c0 : c0 + n) as float32, bit for bit the
 * values of the format's Python reference (moetier/quant). c0 is a multiple of 256 (every
 * GGUF block size divides it); c0 + n <= cols. */
typedef void (*mt_dequant_fn)(const mt_weight *w, long r, long c0, long n, float *out);

/* A format's multi-token tile (gemm.c): for n <= MT_TILE_T tokens j (MT_TILE_T_BF16 for bf16's
 * avx512bf16 tile), y[j][r] = W[r, :] . x[j]
 * for rows [r0, r1), each (row, token) summed exactly as the row kernel of the same ISA sums
 * it (same accumulators, same order, same final adds: the same bits), the weights read and
 * unpacked once for the n tokens. xp[j]: x[j] prepared (NULL entries if the format has no prep). */
#define MT_TILE_T 4
#define MT_TILE_T_BF16 6
typedef void (*mt_tile_fn)(const mt_weight *w, const float *const *x, const float *const *xp, float *const *y,
                           int n, long r0, long r1);

/* A format's kernels. rows[i] NULL: no variant for ISA i, the next lower ISA with one runs
 * (its row kernel, its tile and x prepared for it: mt_isa_of). `prep` prepares x once per
 * product for the kernels of ISA `isa` (the one mt_isa_of chose) into prep_len(cols, isa)
 * floats (64-byte aligned). */
typedef struct {
    int code;
    const char *name;
    mt_rows_fn rows[MT_N_ISA];
    long (*prep_len)(long cols, int isa);  /* NULL: the format needs no prepared x */
    void (*prep)(const float *x, long cols, float *xp, int isa);
    mt_dequant_fn dequant;        /* NULL for plain float formats */
    mt_tile_fn tiles[MT_N_ISA];   /* NULL: none for this ISA (gemm.c runs the row kernel per token) */
} mt_fmt;

/* the formats (fmt_*.c) */
extern const mt_fmt mt_fmt_f32, mt_fmt_bf16, mt_fmt_bf16_f32x, mt_fmt_f16, mt_fmt_fp8, mt_fmt_int4, mt_fmt_int8, mt_fmt_mxfp4,
    mt_fmt_q8_0, mt_fmt_q4_0, mt_fmt_q4_1, mt_fmt_q5_0, mt_fmt_q5_1, mt_fmt_q2_k, mt_fmt_q3_k, mt_fmt_q4_k,
    mt_fmt_q5_k, mt_fmt_q6_k, mt_fmt_ggml_mxfp4;

/* x split into its even and odd columns, xp = [xe | xo], each mt_evenodd_half(cols) floats,
 * zero past the end: the `prep` of the 2-codes-per-byte nibble formats (int4_group, mxfp4;
 * nibble.h); bf16's own prep rounds the halves to bf16. Defined in fmt_bf16.c. */
static inline long mt_evenodd_half(long cols) { return (cols / 2 + 16 + 15) & ~15L; }
long mt_prep_evenodd_len(long cols, int isa);
void mt_prep_evenodd(const float *x, long cols, float *xp, int isa);

/* The scalar reference row kernel of a quantized format: each 256-column chunk of a row
 * dequantized by `dq` into a local buffer, then the f32 reference dot product (8 lane sums,
 * combined pairwise). */
void mt_rows_dequant(const mt_weight *W, const float *x, float *y, long r0, long r1, mt_dequant_fn dq);

/* ------------------------------------------------------------------------------------ */
/* scalar conversions                                                                    */

/* the element dtype (DT_F32 / DT_BF16) of a plain float weight format, -1 for the others */
static inline int mt_plain_dt(int fmt) {
    return fmt == MT_FMT_F32 ? DT_F32 : fmt == MT_FMT_BF16 || fmt == MT_FMT_BF16_F32X ? DT_BF16 : -1;
}

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even, like torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float ld(const void *p, int dt, long i) {
    return dt == DT_BF16 ? bf16_to_f32(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE half -> float, exact (subnormals, inf, NaN) */
static inline float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return f32_from_bits(s | 0x7f800000u | (m << 13));
    if (e == 0) { /* zero or subnormal: m * 2^-24 */
        float v = (float)m * 5.9604644775390625e-8f;
        return s ? -v : v;
    }
    return f32_from_bits(s | ((e + 112) << 23) | (m << 13));
}

/* e8m0 scale byte -> 2^(e - 127) (255 = NaN) */
static inline float e8m0_to_f32(uint8_t e) {
    if (e == 255) return f32_from_bits(0x7fc00000u);
    return e ? f32_from_bits((uint32_t)e << 23) : f32_from_bits(0x00400000u);
}

/* element i of a scale row of dtype sdt */
static inline float ld_scale(const void *p, int sdt, long i) {
    switch (sdt) {
    case DT_BF16: return bf16_to_f32(((const bf16 *)p)[i]);
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    case DT_E8M0: return e8m0_to_f32(((const uint8_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* the scale / zero-point row of weight row r */
static inline const void *mt_srow(const mt_weight *w, long r) {
    return (const char *)w->scale + ((w->row0 + r) / w->brows) * w->sstride;
}
static inline const int8_t *mt_zrow(const mt_weight *w, long r) {
    return w->zero ? (const int8_t *)((const char *)w->zero + ((w->row0 + r) / w->brows) * w->zstride) : NULL;
}

/* ------------------------------------------------------------------------------------ */
/* parallel regions (parallel.c)                                                         */

typedef void (*task_fn)(void *ctx, int tid, int nth);
void parallel_run(task_fn fn, void *ctx, int nth);

/* below this many multiply-adds a product runs on the caller thread */
#define PARALLEL_MIN_ELEMS (48L * 1024)

/* ------------------------------------------------------------------------------------ */
/* matrix-vector products (gemv.c)                                                       */

/* y[r] = W[r, :] . x (+ b[r]) for r in [0, W->rows); b optional, dtype bdt. */
typedef struct {
    const mt_weight *W;
    const void *b;
    int bdt;
    const float *x;
    float *y;
    /* filled by mt_run_gemvs */
    const float *xp;
    mt_rows_fn fn;
} mt_gemv_item;

/* A batch of independent products as one parallel region: the rows of all items are
 * concatenated and split into equal contiguous chunks, one per thread. */
void mt_run_gemvs(mt_gemv_item *items, int n, int nth);
const mt_fmt *mt_fmt_lookup(int code);
int mt_isa_of(const mt_fmt *f, int isa); /* the ISA of the kernels f runs when `isa` is chosen */
int mt_get_isa(void);

/* ------------------------------------------------------------------------------------ */
/* small ops (ops.c, caller thread)                                                      */

void rms_norm(const float *x, const void *w, int dt, float eps, float *out, long n);
void rope(float *v, const float *cs, const float *sn, int D);
void swiglu(const float *g, const float *u, float *a, long n); /* a = silu(g) * u */

/* ------------------------------------------------------------------------------------ */
/* the layer description (mirrors moetier/native/decode.py: LayerDesc)                   */

typedef struct {
    /* attention */
    long H, nh, nkv, D;
    int qk_norm; /* 0 none, 1 per head, 2 full width */
    int window;  /* 0 = none, else attend to the last `window` positions */
    float eps, scale;
    const void *ln1;
    const mt_weight *qkv_w; /* [(nh + 2 nkv) D, H] */
    const void *qkv_b, *q_norm, *k_norm;
    const mt_weight *o_w; /* [H, nh D] */
    const void *o_b, *ln2;
    /* feed-forward */
    int mlp; /* 0 dense gated MLP, 1 MoE */
    long E, topk, I;
    int norm_topk;
    float route_scale;
    const mt_weight *router_w; /* [E, H] */
    const void *router_b;
    long SI; /* dense or shared-expert intermediate size (0 = none) */
    const mt_weight *s_gate, *s_up, *s_down, *s_gate_gate; /* shared/dense MLP; sigmoid gate [1, H] */
    /* separate q / k / v projections (quantized ones stay unfused): used when qkv_w is NULL */
    const mt_weight *q_w, *k_w, *v_w;
    const void *q_b, *k_b, *v_b;
} layer_desc;

typedef struct scratch {
    long n_scores; /* floats in `scores` */
    float *h, *qkv, *attn, *ao, *gu, *act, *down, *sh, *sg, *scores, *rlog;
} scratch;

/* entry points (also called across files) */
int mt_attention(const layer_desc *L, scratch *S, int dt, float *x, void *K, void *V, long cap, long pos,
                 const float *cs, const float *sn, int nth);
void mt_route(const layer_desc *L, scratch *S, int dt, int64_t *ids, float *w, int nth);
void mt_moe(const layer_desc *L, scratch *S, int dt, float *x, int n, const mt_weight *const *gate,
            const mt_weight *const *up, const mt_weight *const *down, const float *w, int shared, int nth);
void mt_moe_rows(const layer_desc *L, scratch *S, int dt, int n, const mt_weight *const *gate,
                 const mt_weight *const *up, const mt_weight *const *down, int shared, float *out, int nth);
void mt_moe_add(const layer_desc *L, scratch *S, float *x, int n, const float *const *rows, const float *w,
                int shared);
void mt_dense_mlp(const layer_desc *L, scratch *S, int dt, float *x, int nth);
/* pieces the multi-token steps (prefill.c) share with the single-token ones */
void mt_qkv_post(const layer_desc *L, int dt, float *qkv, void *K, void *V, long cap, long pos, const float *cs,
                 const float *sn);
void mt_attend_head(const layer_desc *L, const float *q, const void *K, const void *V, int kvdt, long cap, long kv,
                    long t0, long n, float *o, float *sc);
void mt_topk_softmax(const layer_desc *L, float *p, int64_t *ids, float *w);

#endif
