/* The feed-forward half of a layer: the softmax top-k router, routed experts (SwiGLU) plus
 * the shared expert (optionally sigmoid-gated), and the dense gated MLP. */
#include "mt.h"
#include "simd.h"

#define MAX_ITEMS (2 * 64 + 3)

/* softmax top-k of one token's router logits p [E] (overwritten by the probabilities): ids
 * (descending weight, ties to the lower id), weights (normalised / scaled per the layer) */
void mt_topk_softmax(const layer_desc *L, float *p, int64_t *ids, float *w) {
    long E = L->E, k = L->topk;
    float mx = -INFINITY;
    for (long e = 0; e < E; e++)
        if (p[e] > mx) mx = p[e];
    float sum = mt_softmax_exp(p, E, mx);
    for (long e = 0; e < E; e++) p[e] /= sum;
    unsigned char taken[E]; /* experts already chosen */
    memset(taken, 0, (size_t)E);
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        taken[best] = 1;
        ids[j] = best;
        w[j] = p[best];
    }
    if (L->norm_topk) {
        float s = 0.0f;
        for (long j = 0; j < k; j++) s += w[j];
        for (long j = 0; j < k; j++) w[j] /= s;
    }
    if (L->route_scale != 1.0f)
        for (long j = 0; j < k; j++) w[j] *= L->route_scale;
}

/* softmax top-k router on S->h: ids, weights (mt_topk_softmax) */
void mt_route(const layer_desc *L, scratch *S, int dt, int64_t *ids, float *w, int nth) {
    mt_gemv_item it = {L->router_w, L->router_b, dt, S->h, S->rlog, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
    mt_topk_softmax(L, S->rlog, ids, w);
}

/* The routed experts j = 0..n-1 on h = S->h, unweighted: expert j's output row into
 * out + j * H (out NULL: S->down), and (if `shared`) the shared expert (optionally
 * sigmoid-gated) or the dense MLP into S->sh (its gate logit into S->sg). Expert j: gate[j]
 * [I, H] and up[j] [I, H], or (up[j] == NULL) gate[j] is the fused gate_up [2I, H] (gate rows
 * first); down[j] [H, I]; n <= top-k. Every output element is one gemv row: its bits do not
 * depend on which experts share the call (expert parallelism computes a token's experts on
 * several ranks, distributed/executor.py: native_one). */
void mt_moe_rows(const layer_desc *L, scratch *S, int dt, int n, const mt_weight *const *gate,
                 const mt_weight *const *up, const mt_weight *const *down, int shared, float *out, int nth) {
    long H = L->H, I = L->I, SI = shared ? L->SI : 0;
    mt_gemv_item items[MAX_ITEMS];
    int m = 0;
    if (!out) out = S->down;
    memset(items, 0, sizeof(items));
    for (int j = 0; j < n; j++) {
        float *g = S->gu + j * 2 * I;
        items[m++] = (mt_gemv_item){gate[j], NULL, dt, S->h, g, NULL, NULL};
        if (up && up[j]) items[m++] = (mt_gemv_item){up[j], NULL, dt, S->h, g + I, NULL, NULL};
    }
    if (SI) {
        items[m++] = (mt_gemv_item){L->s_gate, NULL, dt, S->h, S->gu + n * 2 * I, NULL, NULL};
        items[m++] = (mt_gemv_item){L->s_up, NULL, dt, S->h, S->gu + n * 2 * I + SI, NULL, NULL};
        if (L->s_gate_gate) items[m++] = (mt_gemv_item){L->s_gate_gate, NULL, dt, S->h, S->sg, NULL, NULL};
    }
    if (m == 0) return;
    mt_run_gemvs(items, m, nth);
    for (int j = 0; j < n; j++) {
        const float *g = S->gu + j * 2 * I;
        swiglu(g, g + I, S->act + j * I, I);
    }
    if (SI) {
        const float *g = S->gu + n * 2 * I;
        swiglu(g, g + SI, S->act + n * I, SI);
    }
    m = 0;
    for (int j = 0; j < n; j++) items[m++] = (mt_gemv_item){down[j], NULL, dt, S->act + j * I, out + j * H, NULL, NULL};
    if (SI) items[m++] = (mt_gemv_item){L->s_down, NULL, dt, S->act + n * I, S->sh, NULL, NULL};
    mt_run_gemvs(items, m, nth);
}

/* x += w[j] * rows[j] [H] for j = 0..n-1 in that order, then (if `shared` and the layer has
 * one) x += the shared expert S->sh (times sigmoid(S->sg[0]) when gated): the one combine
 * of a token's experts, wherever their rows were computed. */
void mt_moe_add(const layer_desc *L, scratch *S, float *x, int n, const float *const *rows, const float *w,
                int shared) {
    long H = L->H;
    for (int j = 0; j < n; j++) {
        const float *d = rows[j];
        float wj = w[j];
        for (long i = 0; i < H; i++) x[i] += wj * d[i];
    }
    if (shared && L->SI) {
        float g = L->s_gate_gate ? 1.0f / (1.0f + expf(-S->sg[0])) : 1.0f;
        for (long i = 0; i < H; i++) x[i] += g * S->sh[i];
    }
}

/* x += sum_j w[j] * expert_j(h), then (if `shared`) x += the shared expert (optionally
 * sigmoid-gated) or the dense MLP; h = S->h (mt_moe_rows, then mt_moe_add). n <= 64. The
 * additions into x happen in the order j = 0..n-1, then shared, so calling this once per
 * expert (n = 1) and then with n = 0 gives the same bits as one call with all experts (for
 * providers whose weights are valid only until the next get). */
void mt_moe(const layer_desc *L, scratch *S, int dt, float *x, int n, const mt_weight *const *gate,
            const mt_weight *const *up, const mt_weight *const *down, const float *w, int shared, int nth) {
    const float *rows[64];
    if (n == 0 && !(shared && L->SI)) return;
    mt_moe_rows(L, S, dt, n, gate, up, down, shared, NULL, nth);
    for (int j = 0; j < n; j++) rows[j] = S->down + j * L->H;
    mt_moe_add(L, S, x, n, rows, w, shared);
}

/* dense gated MLP: x += down(silu(gate(h)) * up(h)) with the layer's s_* weights */
void mt_dense_mlp(const layer_desc *L, scratch *S, int dt, float *x, int nth) {
    mt_moe(L, S, dt, x, 0, NULL, NULL, NULL, NULL, 1, nth);
}
