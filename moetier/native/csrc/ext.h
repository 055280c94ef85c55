/* The extended decoder layers (gpt-oss, Llama-4; moetier/native/gpt_oss.py, llama4.py): the layer
 * descriptor and the per-token pieces that the single-token step (sinks.c) and the multi-token
 * step (ext_many.c) share, so both give every token the same bits. The pieces are defined once,
 * in sinks.c, and not inlined: both paths run the same machine code.
 */
#ifndef MT_EXT_H
#define MT_EXT_H

#include "many.h"

/* mirrors moetier/native/gpt_oss.py: OssDesc (keep the field order in sync) */
typedef struct {
    long H, nh, nkv, D;
    int window; /* 0 = none, else attend to the last `window` positions */
    float eps, scale;
    const void *ln1, *ln2, *sinks; /* sinks [nh] (model dtype) */
    const mt_weight *q_w, *k_w, *v_w, *o_w;
    const void *q_b, *k_b, *v_b, *o_b;
    long E, topk, I;
    float limit, alpha;
    const mt_weight *router_w;
    const void *router_b;
    /* Llama-4 variants (gpt-oss: rope 1, the rest 0) */
    int rope;        /* 0 none (NoPE), 1 rotate-half, 2 adjacent pairs (de-interleaved first) */
    int qk_l2;       /* q and k L2-normed per head after the rotation (no weight, eps) */
    int chunk;       /* > 0: attend only within the query's chunk of this many positions */
    float floor_scale, attn_scale; /* attn_scale > 0: q *= 1 + attn_scale log(1 + floor((pos+1)/floor_scale)) */
    int route;       /* 0: softmax over the k chosen logits (gpt-oss); 1: sigmoid of each (Llama-4) */
    int act;         /* 0: clamped SwiGLU (limit, alpha); 1: SiLU SwiGLU */
    int scale_input; /* experts see h * w[j] and their outputs add with weight 1 (Llama-4) */
    long SI;         /* shared expert / dense MLP intermediate size (0: none) */
    const mt_weight *s_gate, *s_up, *s_down;
} oss_desc;

/* first position the query at `pos` attends to (sliding window or attention chunk) */
long mt_oss_first(const oss_desc *L, long pos);

/* after the q/k/v products of the token at `pos`: q [nh D] and k [nkv D] rotated (cs / sn: the
 * rope row of pos), L2-normed, q scaled by the temperature; k, v written at pos into the cache
 * K, V [nkv, cap, D] (model dtype dt) */
void mt_oss_qkv_post(const oss_desc *L, int dt, float *q, float *k, const float *v, void *K, void *V, long cap,
                     long pos, const float *cs, const float *sn);

/* head h's attention output o [D] for query q [D] over cache positions [t0, t0 + n) of its kv
 * head (softmax with the head's sink logit, if any); sc: n floats of scratch */
void mt_oss_attend_head(const oss_desc *L, const float *q, const void *K, const void *V, int dt, long cap, long h,
                        long t0, long n, float *o, float *sc);

/* router logits [E] (biased) -> ids [k] (descending, ties to the lower id), weights w [k] */
void mt_oss_topk(const oss_desc *L, const float *logits, int64_t *ids, float *w);

/* a [n] = the layer's expert activation of gate g [n] and up u [n] */
void mt_oss_activate(const oss_desc *L, const float *g, const float *u, float *a, long n);

#endif
