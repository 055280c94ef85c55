/* gpt-oss decode step pieces (moetier/models/gpt_oss.py): GQA attention whose softmax has one
 * learned sink logit per head (the sink joins the softmax, its column is dropped), optional
 * sliding window; the router (top-k of the biased logits, softmax over those k); routed
 * experts with biases and the clamped SwiGLU (g = min(gate, l), u = clamp(up, -l, l),
 * a = (u + 1) * g * sigmoid(alpha g)).
 *
 * Every output element is computed by one thread in a fixed order (thread-count independent).
 */
#include "mt.h"

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
} oss_desc;

typedef struct {
    float *h, *q, *k, *v, *attn, *ao, *logits, *gu, *act, *down, *scores;
    long n_scores;
} oss_scratch;

void mt_oss_scratch_free(oss_scratch *s) {
    if (!s) return;
    free(s->h); free(s->q); free(s->k); free(s->v); free(s->attn); free(s->ao); free(s->logits);
    free(s->gu); free(s->act); free(s->down); free(s->scores);
    free(s);
}

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
    s->gu = (float *)calloc(topk * 2 * I, 4);
    s->act = (float *)calloc(topk * I, 4);
    s->down = (float *)calloc(topk * H, 4);
    if (!s->h || !s->q || !s->k || !s->v || !s->attn || !s->ao || !s->logits || !s->gu || !s->act || !s->down) {
        mt_oss_scratch_free(s);
        return NULL;
    }
    return s;
}

typedef struct {
    const oss_desc *L;
    oss_scratch *S;
    const void *K, *V;
    int dt;
    long cap, t0, t1;
} sink_ctx;

static void sink_attn_task(void *vctx, int tid, int nth) {
    const sink_ctx *A = (const sink_ctx *)vctx;
    const oss_desc *L = A->L;
    long D = L->D, nh = L->nh, group = L->nh / L->nkv, n = A->t1 - A->t0;
    long h0 = nh * tid / nth, h1 = nh * (tid + 1) / nth;
    float *sc = A->S->scores + (long)tid * n;
    for (long h = h0; h < h1; h++) {
        long kv = h / group;
        const float *q = A->S->q + h * D;
        float sink = ld(L->sinks, A->dt, h);
        float mx = sink;
        for (long t = 0; t < n; t++) {
            long row = (kv * A->cap + A->t0 + t) * D;
            float acc[8] = {0};
            long d = 0;
            for (; d + 8 <= D; d += 8)
                for (int j = 0; j < 8; j++) acc[j] += ld(A->K, A->dt, row + d + j) * q[d + j];
            for (; d < D; d++) acc[d & 7] += ld(A->K, A->dt, row + d) * q[d];
            float s = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) * L->scale;
            sc[t] = s;
            if (s > mx) mx = s;
        }
        float sum = expf(sink - mx);
        for (long t = 0; t < n; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        float inv = 1.0f / sum;
        float *o = A->S->attn + h * D;
        for (long d = 0; d < D; d++) o[d] = 0.0f;
        for (long t = 0; t < n; t++) {
            float p = sc[t] * inv;
            long row = (kv * A->cap + A->t0 + t) * D;
            for (long d = 0; d < D; d++) o[d] += p * ld(A->V, A->dt, row + d);
        }
    }
}

/* x += o_proj(sink attention(norm1(x))); S->h = norm2(x); writes k, v of `pos` into the
 * cache K, V [nkv, cap, D] (model dtype). cs/sn: rope cos/sin [D] for `pos`. -1: no memory. */
int mt_oss_attention(const oss_desc *L, oss_scratch *S, int dt, float *x, void *K, void *V, long cap, long pos,
                     const float *cs, const float *sn, int nth) {
    long H = L->H, nh = L->nh, nkv = L->nkv, D = L->D;
    rms_norm(x, L->ln1, dt, L->eps, S->h, H);
    mt_gemv_item it[3] = {
        {L->q_w, L->q_b, dt, S->h, S->q, NULL, NULL},
        {L->k_w, L->k_b, dt, S->h, S->k, NULL, NULL},
        {L->v_w, L->v_b, dt, S->h, S->v, NULL, NULL},
    };
    mt_run_gemvs(it, 3, nth);
    for (long i = 0; i < nh; i++) rope(S->q + i * D, cs, sn, (int)D);
    for (long i = 0; i < nkv; i++) rope(S->k + i * D, cs, sn, (int)D);
    for (long i = 0; i < nkv; i++) {
        long row = (i * cap + pos) * D;
        if (dt == DT_BF16) {
            for (long d = 0; d < D; d++) {
                ((bf16 *)K)[row + d] = f32_to_bf16(S->k[i * D + d]);
                ((bf16 *)V)[row + d] = f32_to_bf16(S->v[i * D + d]);
            }
        } else {
            memcpy((float *)K + row, S->k + i * D, D * 4);
            memcpy((float *)V + row, S->v + i * D, D * 4);
        }
    }
    long t0 = (L->window > 0 && pos + 1 > L->window) ? pos + 1 - L->window : 0;
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
    long E = L->E, k = L->topk;
    mt_gemv_item it = {L->router_w, L->router_b, dt, S->h, S->logits, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || S->logits[e] > S->logits[best])) best = e;
        }
        ids[j] = best;
        w[j] = S->logits[best];
    }
    float mx = w[0], sum = 0.0f; /* w[0] is the largest */
    for (long j = 0; j < k; j++) {
        w[j] = expf(w[j] - mx);
        sum += w[j];
    }
    for (long j = 0; j < k; j++) w[j] /= sum;
}

/* x += sum_j w[j] * expert_j(S->h) for n experts: gate[j] [I, H] + up[j] [I, H], or (up[j]
 * NULL) gate[j] = gate_up [2I, H]; gub[j]: gate_up bias [2I] (gate then up), down[j] [H, I]
 * with bias db[j] [H]. Additions into x in the order j = 0..n-1 (one call per expert gives
 * the same bits as one call for all). */
void mt_oss_experts(const oss_desc *L, oss_scratch *S, int dt, float *x, int n, const mt_weight *const *gate,
                    const mt_weight *const *up, const void *const *gub, const mt_weight *const *down,
                    const void *const *db, const float *w, int nth) {
    long H = L->H, I = L->I;
    mt_gemv_item items[2 * 64];
    int m = 0;
    if (n <= 0) return;
    for (int j = 0; j < n; j++) {
        float *g = S->gu + j * 2 * I;
        if (up[j]) {
            items[m++] = (mt_gemv_item){gate[j], gub[j], dt, S->h, g, NULL, NULL};
            const void *ub = gub[j] ? (const char *)gub[j] + I * (dt == DT_BF16 ? 2 : 4) : NULL;
            items[m++] = (mt_gemv_item){up[j], ub, dt, S->h, g + I, NULL, NULL};
        } else {
            items[m++] = (mt_gemv_item){gate[j], gub[j], dt, S->h, g, NULL, NULL};
        }
    }
    mt_run_gemvs(items, m, nth);
    float l = L->limit, alpha = L->alpha;
    for (int j = 0; j < n; j++) {
        const float *g = S->gu + j * 2 * I, *u = g + I;
        float *a = S->act + j * I;
        for (long i = 0; i < I; i++) {
            float gv = g[i] < l ? g[i] : l;
            float uv = u[i] < -l ? -l : (u[i] > l ? l : u[i]);
            a[i] = (uv + 1.0f) * (gv / (1.0f + expf(-gv * alpha)));
        }
    }
    m = 0;
    for (int j = 0; j < n; j++) items[m++] = (mt_gemv_item){down[j], db[j], dt, S->act + j * I, S->down + j * H, NULL, NULL};
    mt_run_gemvs(items, m, nth);
    for (int j = 0; j < n; j++) {
        const float *d = S->down + j * H;
        for (long i = 0; i < H; i++) x[i] += w[j] * d[i];
    }
}
