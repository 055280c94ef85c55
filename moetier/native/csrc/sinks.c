/* gpt-oss decode step pieces (moetier/models/gpt_oss.py): GQA attention whose softmax has one
 * learned sink logit per head (the sink joins the softmax, its column is dropped), optional
 * sliding window; the router (top-k of the biased logits, softmax over those k); routed
 * experts with biases and the clamped SwiGLU (g = min(gate, l), u = clamp(up, -l, l),
 * a = (u + 1) * g * sigmoid(alpha g)).
 *
 * Every output element is computed by one thread in a fixed order (thread-count independent).
 * The per-token pieces (the mt_oss_* functions marked NOINLINE, declared in ext.h) are shared
 * with the multi-token steps (ext_many.c): one definition, the same machine code for both.
 */
#include "ext.h"
#include "simd.h"

typedef struct {
    float *h, *q, *k, *v, *attn, *ao, *logits, *gu, *act, *down, *xin, *scores;
    long n_scores;
} oss_scratch;

void mt_oss_scratch_free(oss_scratch *s) {
    if (!s) return;
    free(s->h); free(s->q); free(s->k); free(s->v); free(s->attn); free(s->ao); free(s->logits);
    free(s->gu); free(s->act); free(s->down); free(s->xin); free(s->scores);
    free(s);
}

/* I: the largest of k * I (routed) and SI (shared / dense) */
oss_scratch *mt_oss_scratch_new(long H, long qdim, long kvdim, long E, long topk, long I) {
    oss_scratch *s = (oss_scratch *)calloc(1, sizeof(oss_scratch));
    if (!s) return NULL;
    s->h = (float *)calloc(H, 4);
    s->q = (float *)calloc(qdim, 4);
    s->k = (float *)calloc(kvdim, 4);
    s->v = (float *)calloc(kvdim, 4);
    s->attn = (float *)calloc(qdim, 4);
    s->ao = (float *)calloc(H, 4);
    s->logits = (float *)calloc(E, 4);
    s->gu = (float *)calloc(2 * I, 4);
    s->act = (float *)calloc(I, 4);
    s->down = (float *)calloc(topk * H, 4);
    s->xin = (float *)calloc(topk * H, 4);
    if (!s->h || !s->q || !s->k || !s->v || !s->attn || !s->ao || !s->logits || !s->gu || !s->act || !s->down ||
        !s->xin) {
        mt_oss_scratch_free(s);
        return NULL;
    }
    return s;
}

/* [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...] (the torch path's interleaved rope layout) */
static void deinterleave_pairs(float *v, long d) {
    float tmp[1024];
    long h = d / 2;
    for (long i = 0; i < h; i++) {
        tmp[i] = v[2 * i];
        tmp[i + h] = v[2 * i + 1];
    }
    memcpy(v, tmp, d * 4);
}

/* v / rms(v) (no weight; sum of squares in double like ops.c: rms_norm) */
static void l2_norm(float *v, float eps, long n) {
    double ss = 0.0;
    for (long i = 0; i < n; i++) ss += (double)v[i] * v[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (long i = 0; i < n; i++) v[i] *= inv;
}

typedef struct {
    const oss_desc *L;
    oss_scratch *S;
    const void *K, *V;
    int dt;
    long cap, t0, t1;
} sink_ctx;

#define NOINLINE __attribute__((noinline)) /* ext.h pieces: the same code from every caller */

static void sink_attn_task(void *vctx, int tid, int nth) {
    const sink_ctx *A = (const sink_ctx *)vctx;
    const oss_desc *L = A->L;
    long D = L->D, nh = L->nh, n = A->t1 - A->t0;
    long h0 = nh * tid / nth, h1 = nh * (tid + 1) / nth;
    float *sc = A->S->scores + (long)tid * n;
    for (long h = h0; h < h1; h++)
        mt_oss_attend_head(L, A->S->q + h * D, A->K, A->V, A->dt, A->cap, h, A->t0, n, A->S->attn + h * D, sc);
}

NOINLINE void mt_oss_attend_head(const oss_desc *L, const float *q, const void *K, const void *V, int dt, long cap,
                                 long h, long t0, long n, float *o, float *sc) {
    long D = L->D, kv = h / (L->nh / L->nkv);
    float sink = L->sinks ? ld(L->sinks, dt, h) : -INFINITY;
    float mx = sink;
    for (long t = 0; t < n; t++) {
        long row = (kv * cap + t0 + t) * D;
        float acc[8] = {0};
        long d = 0;
        for (; d + 8 <= D; d += 8)
            for (int j = 0; j < 8; j++) acc[j] += ld(K, dt, row + d + j) * q[d + j];
        for (; d < D; d++) acc[d & 7] += ld(K, dt, row + d) * q[d];
        float s = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) * L->scale;
        sc[t] = s;
        if (s > mx) mx = s;
    }
    float sum = (L->sinks ? expf(sink - mx) : 0.0f) + mt_softmax_exp(sc, n, mx);
    float inv = 1.0f / sum;
    for (long d = 0; d < D; d++) o[d] = 0.0f;
    for (long t = 0; t < n; t++) {
        float p = sc[t] * inv;
        long row = (kv * cap + t0 + t) * D;
        for (long d = 0; d < D; d++) o[d] += p * ld(V, dt, row + d);
    }
}

NOINLINE long mt_oss_first(const oss_desc *L, long pos) {
    long t0 = (L->window > 0 && pos + 1 > L->window) ? pos + 1 - L->window : 0;
    if (L->chunk > 0) t0 = (pos / L->chunk) * L->chunk;
    return t0;
}

NOINLINE void mt_oss_qkv_post(const oss_desc *L, int dt, float *q, float *k, const float *v, void *K, void *V,
                              long cap, long pos, const float *cs, const float *sn) {
    long nh = L->nh, nkv = L->nkv, D = L->D;
    for (long i = 0; i < nh + nkv; i++) {
        float *u = i < nh ? q + i * D : k + (i - nh) * D;
        if (L->rope == 2) deinterleave_pairs(u, D);
        if (L->rope) rope(u, cs, sn, (int)D);
        if (L->qk_l2) l2_norm(u, L->eps, D);
    }
    if (L->attn_scale > 0.0f) {
        float t = 1.0f + L->attn_scale * logf(1.0f + floorf((float)(pos + 1) / L->floor_scale));
        for (long i = 0; i < nh * D; i++) q[i] *= t;
    }
    for (long i = 0; i < nkv; i++) {
        long row = (i * cap + pos) * D;
        if (dt == DT_BF16) {
            for (long d = 0; d < D; d++) {
                ((bf16 *)K)[row + d] = f32_to_bf16(k[i * D + d]);
                ((bf16 *)V)[row + d] = f32_to_bf16(v[i * D + d]);
            }
        } else {
            memcpy((float *)K + row, k + i * D, D * 4);
            memcpy((float *)V + row, v + i * D, D * 4);
        }
    }
}

/* x += o_proj(sink attention(norm1(x))); S->h = norm2(x); writes k, v of `pos` into the
 * cache K, V [nkv, cap, D] (model dtype). cs/sn: rope cos/sin [D] for `pos`. -1: no memory. */
int mt_oss_attention(const oss_desc *L, oss_scratch *S, int dt, float *x, void *K, void *V, long cap, long pos,
                     const float *cs, const float *sn, int nth) {
    long H = L->H, nh = L->nh, D = L->D;
    rms_norm(x, L->ln1, dt, L->eps, S->h, H);
    mt_gemv_item it[3] = {
        {L->q_w, L->q_b, dt, S->h, S->q, NULL, NULL},
        {L->k_w, L->k_b, dt, S->h, S->k, NULL, NULL},
        {L->v_w, L->v_b, dt, S->h, S->v, NULL, NULL},
    };
    mt_run_gemvs(it, 3, nth);
    mt_oss_qkv_post(L, dt, S->q, S->k, S->v, K, V, cap, pos, cs, sn);
    long t0 = mt_oss_first(L, pos);
    int ath = (pos + 1 - t0) * nh * D < PARALLEL_MIN_ELEMS ? 1 : nth;
    long need = (pos + 1 - t0) * ath;
    if (S->n_scores < need) {
        float *p = (float *)realloc(S->scores, need * 4);
        if (!p) return -1;
        S->scores = p;
        S->n_scores = need;
    }
    sink_ctx A = {L, S, K, V, dt, cap, t0, pos + 1};
    parallel_run(sink_attn_task, &A, ath);
    mt_gemv_item o = {L->o_w, L->o_b, dt, S->attn, S->ao, NULL, NULL};
    mt_run_gemvs(&o, 1, nth);
    for (long i = 0; i < H; i++) x[i] += S->ao[i];
    rms_norm(x, L->ln2, dt, L->eps, S->h, H);
    return 0;
}

/* router on S->h: ids = top-k of the biased logits (descending, ties to the lower id),
 * w = softmax over those k logits */
void mt_oss_route(const oss_desc *L, oss_scratch *S, int dt, int64_t *ids, float *w, int nth) {
    mt_gemv_item it = {L->router_w, L->router_b, dt, S->h, S->logits, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
    mt_oss_topk(L, S->logits, ids, w);
}

NOINLINE void mt_oss_topk(const oss_desc *L, const float *logits, int64_t *ids, float *w) {
    long E = L->E, k = L->topk;
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        ids[j] = best;
        w[j] = logits[best];
    }
    if (L->route == 1) {
        for (long j = 0; j < k; j++) w[j] = 1.0f / (1.0f + expf(-w[j]));
        return;
    }
    float mx = w[0], sum = 0.0f; /* w[0] is the largest */
    for (long j = 0; j < k; j++) {
        w[j] = expf(w[j] - mx);
        sum += w[j];
    }
    for (long j = 0; j < k; j++) w[j] /= sum;
}

NOINLINE void mt_oss_activate(const oss_desc *L, const float *g, const float *u, float *a, long n) {
    if (L->act == 1) {
        swiglu(g, u, a, n);
        return;
    }
    float l = L->limit, alpha = L->alpha;
    for (long i = 0; i < n; i++) {
        float gv = g[i] < l ? g[i] : l;
        float uv = u[i] < -l ? -l : (u[i] > l ? l : u[i]);
        a[i] = (uv + 1.0f) * (gv / (1.0f + expf(-gv * alpha)));
    }
}

/* The routed experts j = 0..n-1, unweighted: expert j's output row [H] into out + j * H (out NULL:
 * S->down), its input S->h, or (scale_input and `scale`) S->h * w[j] (expert parallelism sends a
 * Llama-4 pair's input already scaled: scale 0). gate[j] [I, H] + up[j] [I, H], or (up[j] NULL)
 * gate[j] = gate_up [2I, H]; gub[j]: gate_up bias [2I] (gate then up) or NULL, down[j] [H, I] with
 * bias db[j] [H] or NULL. Every output element is one gemv row: the same bits wherever it runs. */
void mt_oss_rows(const oss_desc *L, oss_scratch *S, int dt, int n, const mt_weight *const *gate,
                 const mt_weight *const *up, const void *const *gub, const mt_weight *const *down,
                 const void *const *db, const float *w, int scale, float *out, int nth) {
    long H = L->H, I = L->I;
    mt_gemv_item items[2 * 64];
    int m = 0;
    if (n <= 0) return;
    if (!out) out = S->down;
    for (int j = 0; j < n; j++) {
        float *g = S->gu + j * 2 * I;
        const float *in = S->h;
        if (L->scale_input && scale) {
            float *xi = S->xin + j * H;
            for (long i = 0; i < H; i++) xi[i] = S->h[i] * w[j];
            in = xi;
        }
        items[m++] = (mt_gemv_item){gate[j], gub[j], dt, in, g, NULL, NULL};
        if (up[j]) {
            const void *ub = gub[j] ? (const char *)gub[j] + I * (dt == DT_BF16 ? 2 : 4) : NULL;
            items[m++] = (mt_gemv_item){up[j], ub, dt, in, g + I, NULL, NULL};
        }
    }
    mt_run_gemvs(items, m, nth);
    for (int j = 0; j < n; j++) {
        const float *g = S->gu + j * 2 * I;
        mt_oss_activate(L, g, g + I, S->act + j * I, I);
    }
    m = 0;
    for (int j = 0; j < n; j++) items[m++] = (mt_gemv_item){down[j], db[j], dt, S->act + j * I, out + j * H, NULL, NULL};
    mt_run_gemvs(items, m, nth);
}

/* x += c_j * rows[j] [H] for j = 0..n-1 in that order, c_j = w[j] (1 with scale_input: the weight
 * went into the input): the one combine of a token's experts, wherever their rows were computed. */
void mt_oss_add(const oss_desc *L, float *x, int n, const float *const *rows, const float *w) {
    long H = L->H;
    for (int j = 0; j < n; j++) {
        const float *d = rows[j];
        float wj = L->scale_input ? 1.0f : w[j];
        for (long i = 0; i < H; i++) x[i] += wj * d[i];
    }
}

/* S->h *= w[0]: a Llama-4 (scale_input, top-1) pair's expert input, before expert parallelism
 * sends it (the same product mt_oss_rows forms) */
void mt_oss_scale_h(const oss_desc *L, oss_scratch *S, const float *w) {
    for (long i = 0; i < L->H; i++) S->h[i] = S->h[i] * w[0];
}

/* x += sum_j w[j] * expert_j(S->h) for n experts (scale_input: x += expert_j(w[j] * S->h)):
 * mt_oss_rows then mt_oss_add. Additions into x in the order j = 0..n-1 (one call per expert
 * gives the same bits as one call for all). */
void mt_oss_experts(const oss_desc *L, oss_scratch *S, int dt, float *x, int n, const mt_weight *const *gate,
                    const mt_weight *const *up, const void *const *gub, const mt_weight *const *down,
                    const void *const *db, const float *w, int nth) {
    const float *rows[64];
    if (n <= 0) return;
    mt_oss_rows(L, S, dt, n, gate, up, gub, down, db, w, 1, NULL, nth);
    for (int j = 0; j < n; j++) rows[j] = S->down + j * L->H;
    mt_oss_add(L, x, n, rows, w);
}

/* x += down(silu(gate(h)) * up(h)) with the layer's shared-expert / dense-MLP weights */
void mt_oss_mlp(const oss_desc *L, oss_scratch *S, int dt, float *x, int nth) {
    long H = L->H, SI = L->SI;
    if (!SI) return;
    mt_gemv_item it[2] = {{L->s_gate, NULL, dt, S->h, S->gu, NULL, NULL}, {L->s_up, NULL, dt, S->h, S->gu + SI, NULL, NULL}};
    mt_run_gemvs(it, 2, nth);
    swiglu(S->gu, S->gu + SI, S->act, SI);
    mt_gemv_item d = {L->s_down, NULL, dt, S->act, S->down, NULL, NULL};
    mt_run_gemvs(&d, 1, nth);
    for (long i = 0; i < H; i++) x[i] += S->down[i];
}
