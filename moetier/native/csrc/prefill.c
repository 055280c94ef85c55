/* Many tokens per call through the generic layers (moetier/native/prefill.py): a prompt
 * (one sequence, T causal positions) or a batched step (N sequences, each its own KV cache),
 * or any mix, as one flat token batch.
 *
 * Per layer: norms and the q/k/v projection as one multi-token product (gemm.c), per token the
 * q/k norm, rope and the KV write in place at its position in its own sequence's cache, then
 * attention per (token, head) over that cache (a prompt's tokens see the positions written
 * before them), o_proj, residual; the router over every token, then the tokens grouped by
 * expert so each expert's weights are read once per call for all the tokens routed to it.
 *
 * Every token's arithmetic is the single-token step's (the same row kernels, attention head and
 * top-k functions; expert outputs added in the token's top-k order, then the shared expert),
 * so a prefill or a batched step is bit-identical to stepping the tokens one at a time, and
 * results do not depend on the thread count or on who else is in the batch.
 */
#include "many.h"

#define MT_MANY_MAX_E 1024 /* experts per layer of the whole-step path (prefill.py: MAX_E) */

void mt_many_free(many *M) {
    if (!M) return;
    free(M->h); free(M->qkv); free(M->attn); free(M->ao); free(M->rlog); free(M->gu); free(M->act);
    free(M->down); free(M->sgu); free(M->sact); free(M->sh); free(M->sg); free(M->scores);
    free(M->slot_tok); free(M->slot_of); free(M->cnt); free(M->off); free(M->items);
    free(M);
}

many *mt_many_new(long H, long qkv_rows, long attn_dim, long E, long topk, long I, long SI) {
    many *M = (many *)calloc(1, sizeof(many));
    if (!M) return NULL;
    M->H = H, M->qkv_rows = qkv_rows, M->attn_dim = attn_dim, M->E = E > 0 ? E : 1;
    M->topk = topk > 0 ? topk : 1, M->I = I > 0 ? I : 1, M->SI = SI > 0 ? SI : 1;
    M->cnt = (long *)calloc(M->E, sizeof(long));
    M->off = (long *)calloc(M->E + 1, sizeof(long));
    M->items = (mt_gemm_item *)calloc(2 * M->E + 3, sizeof(mt_gemm_item));
    if (!M->cnt || !M->off || !M->items) {
        mt_many_free(M);
        return NULL;
    }
    return M;
}

int mt_grow(float **p, long n) {
    float *q = (float *)realloc(*p, (n > 0 ? n : 1) * sizeof(float));
    if (!q) return -1;
    *p = q;
    return 0;
}

int mt_many_reserve(many *M, long T) {
    if (T <= M->cap) return 0;
    long c = T > 2 * M->cap ? T : 2 * M->cap, S = c * M->topk;
    if (mt_grow(&M->h, c * M->H) || mt_grow(&M->qkv, c * M->qkv_rows) || mt_grow(&M->attn, c * M->attn_dim) ||
        mt_grow(&M->ao, c * M->H) || mt_grow(&M->rlog, c * M->E) || mt_grow(&M->gu, S * 2 * M->I) ||
        mt_grow(&M->act, S * M->I) || mt_grow(&M->down, S * M->H) || mt_grow(&M->sgu, c * 2 * M->SI) ||
        mt_grow(&M->sact, c * M->SI) || mt_grow(&M->sh, c * M->H) || mt_grow(&M->sg, c))
        return -1;
    int32_t *a = (int32_t *)realloc(M->slot_tok, S * sizeof(int32_t));
    if (!a) return -1;
    M->slot_tok = a;
    a = (int32_t *)realloc(M->slot_of, S * sizeof(int32_t));
    if (!a) return -1;
    M->slot_of = a;
    M->cap = c;
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* attention                                                                             */

typedef struct {
    const layer_desc *L;
    const float *qkv; /* [T, ldq]: q at the start of each row */
    long ldq;
    const long *pos;
    const int32_t *seq;
    void *const *K, *const *V;
    const long *cap;
    int kvdt;
    long T, scores_per_thread;
    const double *cum; /* cost prefix sums over the T * nh (token, head) units */
    float *out, *scores;
} attn_many_ctx;

static long window_start(const layer_desc *L, long pos) {
    return L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
}

static void attn_many_task(void *vctx, int tid, int nth) {
    const attn_many_ctx *A = (const attn_many_ctx *)vctx;
    const layer_desc *L = A->L;
    long nh = L->nh, D = L->D, group = L->nh / L->nkv, n_units = A->T * nh;
    float *sc = A->scores + (long)tid * A->scores_per_thread;
    long u0, u1;
    mt_cum_range(A->cum, n_units, tid, nth, &u0, &u1);
    for (long u = u0; u < u1; u++) {
        long t = u / nh, h = u % nh, s = A->seq[t], p = A->pos[t], t0 = window_start(L, p);
        mt_attend_head(L, A->qkv + t * A->ldq + h * D, A->K[s], A->V[s], A->kvdt, A->cap[s], h / group, t0,
                       p + 1 - t0, A->out + (t * nh + h) * D, sc);
    }
}

static __thread double *cum_buf = NULL;
static __thread long cum_cap = 0;

double *mt_cum_reserve(long n) {
    if (n > cum_cap) {
        free(cum_buf);
        cum_cap = 2 * n;
        cum_buf = (double *)malloc(cum_cap * sizeof(double));
        if (!cum_buf) {
            cum_cap = 0;
            return NULL;
        }
    }
    return cum_buf;
}

void mt_attn_out(const mt_weight *o_w, const void *o_b, int dt, const float *attn, long in_dim, long T, float *ao,
                 float *x, long H, const void *ln, float eps, float *h, int nth) {
    mt_gemm_item o = {o_w, o_b, dt, attn, in_dim, NULL, T, ao, H};
    mt_run_gemms(&o, 1, nth);
    for (long t = 0; t < T; t++) {
        float *xt = x + t * H;
        const float *a = ao + t * H;
        for (long i = 0; i < H; i++) xt[i] += a[i];
        rms_norm(xt, ln, dt, eps, h + t * H, H);
    }
}

/* For T tokens x [T, H] (token t at position pos[t] of sequence seq[t]; K[s], V[s] [nkv,
 * cap[s], D] that sequence's cache buffers, holding every position up to the batch's last):
 * x += o_proj(attn(norm1(x))); M->h = norm2(x); each token's k, v written at its position.
 * cs / sn: rope cos / sin tables [positions, D] (float32). Returns 0, or -1 out of memory. */
int mt_attention_many(const layer_desc *L, many *M, int dt, long T, float *x, const long *pos, const int32_t *seq,
                      void *const *K, void *const *V, const long *cap, const float *cs, const float *sn, int nth) {
    long H = L->H, nh = L->nh, nkv = L->nkv, D = L->D, ldq = (nh + 2 * nkv) * D;
    if (mt_many_reserve(M, T)) return -1;
    for (long t = 0; t < T; t++) rms_norm(x + t * H, L->ln1, dt, L->eps, M->h + t * H, H);
    if (L->qkv_w) {
        mt_gemm_item it = {L->qkv_w, L->qkv_b, dt, M->h, H, NULL, T, M->qkv, ldq};
        mt_run_gemms(&it, 1, nth);
    } else {
        mt_gemm_item it[3] = {{L->q_w, L->q_b, dt, M->h, H, NULL, T, M->qkv, ldq},
                              {L->k_w, L->k_b, dt, M->h, H, NULL, T, M->qkv + nh * D, ldq},
                              {L->v_w, L->v_b, dt, M->h, H, NULL, T, M->qkv + (nh + nkv) * D, ldq}};
        mt_run_gemms(it, 3, nth);
    }
    long smax = 1;
    for (long t = 0; t < T; t++) {
        long s = seq[t];
        mt_qkv_post(L, dt, M->qkv + t * ldq, K[s], V[s], cap[s], pos[t], cs + pos[t] * D, sn + pos[t] * D);
        if (cap[s] > smax) smax = cap[s];
    }
    long n_units = T * nh;
    double *cum = mt_cum_reserve(n_units + 1);
    if (!cum) return -1;
    cum[0] = 0;
    for (long u = 0; u < n_units; u++) {
        long p = pos[u / nh];
        cum[u + 1] = cum[u] + (double)(p + 1 - window_start(L, p)) + 8; /* + fixed cost per head */
    }
    int ath = cum[n_units] * D < PARALLEL_MIN_ELEMS ? 1 : nth;
    if (M->n_scores < smax * ath) {
        if (mt_grow(&M->scores, smax * ath)) return -1;
        M->n_scores = smax * ath;
    }
    attn_many_ctx A = {L, M->qkv, ldq, pos, seq, K, V, cap, dt, T, smax, cum, M->attn, M->scores};
    parallel_run(attn_many_task, &A, ath);
    mt_attn_out(L->o_w, L->o_b, dt, M->attn, nh * D, T, M->ao, x, H, L->ln2, L->eps, M->h, nth);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* feed-forward                                                                          */

/* router over M->h for T tokens: ids / w [T, topk] (mt_topk_softmax per token) */
void mt_route_many(const layer_desc *L, many *M, int dt, long T, int64_t *ids, float *w, int nth) {
    long E = L->E, k = L->topk;
    mt_gemm_item it = {L->router_w, L->router_b, dt, M->h, L->H, NULL, T, M->rlog, E};
    mt_run_gemms(&it, 1, nth);
    for (long t = 0; t < T; t++) mt_topk_softmax(L, M->rlog + t * E, ids + t * k, w + t * k);
}

void mt_group_slots(long E, long k, long T, const int64_t *ids, long *cnt, long *off, int32_t *slot_tok,
                    int32_t *slot_of) {
    memset(cnt, 0, E * sizeof(long));
    for (long i = 0; i < T * k; i++) cnt[ids[i]]++;
    off[0] = 0;
    for (long e = 0; e < E; e++) off[e + 1] = off[e] + cnt[e];
    memset(cnt, 0, E * sizeof(long));
    for (long t = 0; t < T; t++)
        for (long j = 0; j < k; j++) {
            long e = ids[t * k + j], s = off[e] + cnt[e]++;
            slot_tok[s] = (int32_t)t;
            slot_of[t * k + j] = (int32_t)s;
        }
}

/* The routed experts' gemm items over their slots (M->cnt / off / slot_tok from mt_group_slots):
 * gate (and up) of the listed experts on the rows X[slot_tok[s]] into M->gu, appended at items + m;
 * returns the new count. routed_down then applies SwiGLU per slot and adds the down items (into
 * M->down by slot). Shared by mt_moe_many (tokens, with the shared expert in the same batches) and
 * mt_rows_many (expert parallelism's rows): the same items, so the same bits per (row, expert). */
static int routed_gate_up(mt_gemm_item *items, int m, const layer_desc *L, many *M, int dt, const float *X, int n,
                          const int64_t *experts, const mt_weight *const *gate, const mt_weight *const *up) {
    long H = L->H, I = L->I;
    for (int j = 0; j < n; j++) {
        long e = experts[j], c = M->cnt[e], o = M->off[e];
        if (!c) continue;
        float *g = M->gu + o * 2 * I;
        items[m++] = (mt_gemm_item){gate[j], NULL, dt, X, H, M->slot_tok + o, c, g, 2 * I};
        if (up && up[j]) items[m++] = (mt_gemm_item){up[j], NULL, dt, X, H, M->slot_tok + o, c, g + I, 2 * I};
    }
    return m;
}

static int routed_down(mt_gemm_item *items, int m, const layer_desc *L, many *M, int dt, int n,
                       const int64_t *experts, const mt_weight *const *down) {
    long H = L->H, I = L->I;
    for (int j = 0; j < n; j++) {
        long e = experts[j], c = M->cnt[e], o = M->off[e];
        if (!c) continue;
        for (long s = o; s < o + c; s++) swiglu(M->gu + s * 2 * I, M->gu + s * 2 * I + I, M->act + s * I, I);
        items[m++] = (mt_gemm_item){down[j], NULL, dt, M->act + o * I, I, NULL, c, M->down + o * H, H};
    }
    return m;
}

/* The feed-forward of T tokens (h = M->h, routed by ids / w [T, topk] from mt_route_many):
 * the experts listed (experts[0..n): ids with descriptors gate / up (NULL: gate is the fused
 * gate_up [2I, H]) / down) run on all the tokens routed to them, their outputs kept per
 * (token, j). With `finish`: the shared expert (optionally sigmoid-gated) or the dense MLP,
 * then x[t] += sum_j w[t, j] * expert output (j ascending) + shared, the single-token order.
 * So experts may come in several calls (one per expert for providers whose weights are valid
 * only until the next get) and then one finishing call with n = 0: the same bits. */
int mt_moe_many(const layer_desc *L, many *M, int dt, long T, float *x, const int64_t *ids, const float *w, int n,
                const int64_t *experts, const mt_weight *const *gate, const mt_weight *const *up,
                const mt_weight *const *down, int finish, int nth) {
    long H = L->H, k = L->mlp ? L->topk : 0, SI = finish ? L->SI : 0;
    if (mt_many_reserve(M, T)) return -1;
    if (n > M->E) return -2;
    if (k) mt_group_slots(L->E, k, T, ids, M->cnt, M->off, M->slot_tok, M->slot_of);
    mt_gemm_item *items = M->items;
    int m = routed_gate_up(items, 0, L, M, dt, M->h, n, experts, gate, up);
    if (SI) {
        items[m++] = (mt_gemm_item){L->s_gate, NULL, dt, M->h, H, NULL, T, M->sgu, 2 * SI};
        items[m++] = (mt_gemm_item){L->s_up, NULL, dt, M->h, H, NULL, T, M->sgu + SI, 2 * SI};
        if (L->s_gate_gate) items[m++] = (mt_gemm_item){L->s_gate_gate, NULL, dt, M->h, H, NULL, T, M->sg, 1};
    }
    if (m) mt_run_gemms(items, m, nth);
    m = routed_down(items, 0, L, M, dt, n, experts, down);
    if (SI) {
        for (long t = 0; t < T; t++) swiglu(M->sgu + t * 2 * SI, M->sgu + t * 2 * SI + SI, M->sact + t * SI, SI);
        items[m++] = (mt_gemm_item){L->s_down, NULL, dt, M->sact, SI, NULL, T, M->sh, H};
    }
    if (m) mt_run_gemms(items, m, nth);
    if (!finish) return 0;
    for (long t = 0; t < T; t++) {
        float *xt = x + t * H;
        for (long j = 0; j < k; j++) {
            const float *d = M->down + (long)M->slot_of[t * k + j] * H;
            float wj = w[t * k + j];
            for (long i = 0; i < H; i++) xt[i] += wj * d[i];
        }
        if (SI) {
            float g = L->s_gate_gate ? 1.0f / (1.0f + expf(-M->sg[t])) : 1.0f;
            const float *sh = M->sh + t * H;
            for (long i = 0; i < H; i++) xt[i] += g * sh[i];
        }
    }
    return 0;
}

/* Expert parallelism's follower side of a multi-token layer: n rows h [n, H] (the MoE inputs rank 0
 * sent), row r for expert ids[r]; the experts listed (experts[0..ne), descriptors as for
 * mt_moe_many) run on their rows with mt_moe_many's routed items (routed_gate_up / routed_down):
 * out[r] = expert ids[r](h[r]), unweighted, for the rows of listed experts (others untouched, so
 * experts may come in several calls). Each (row, expert) gets the bits the single-process call
 * gives its (token, j). 0, -1 (out of memory) or -2 (more experts than E). */
int mt_rows_many(const layer_desc *L, many *M, int dt, long n, const float *h, const int64_t *ids, int ne,
                 const int64_t *experts, const mt_weight *const *gate, const mt_weight *const *up,
                 const mt_weight *const *down, float *out, int nth) {
    if (mt_many_reserve(M, n)) return -1;
    if (ne > M->E) return -2;
    mt_group_slots(L->E, 1, n, ids, M->cnt, M->off, M->slot_tok, M->slot_of);
    int m = routed_gate_up(M->items, 0, L, M, dt, h, ne, experts, gate, up);
    if (m) mt_run_gemms(M->items, m, nth);
    m = routed_down(M->items, 0, L, M, dt, ne, experts, down);
    if (m) mt_run_gemms(M->items, m, nth);
    mt_slots_out(ne, experts, M->cnt, M->off, M->slot_tok, M->down, L->H, out);
    return 0;
}

void mt_slots_out(int ne, const int64_t *experts, const long *cnt, const long *off, const int32_t *slot_tok,
                  const float *down, long H, float *out) {
    for (int j = 0; j < ne; j++)
        for (long s = off[experts[j]]; s < off[experts[j]] + cnt[experts[j]]; s++)
            memcpy(out + (long)slot_tok[s] * H, down + s * H, H * sizeof(float));
}

/* The scratch's MoE input rows (h: [cap, H], written by the attention / router calls), expert
 * output rows (down: [cap * topk, H], by slot) and (token, j) -> slot map of the last mt_moe_many,
 * for expert parallelism's rank 0 (valid until the next call that grows the scratch). */
void mt_many_bufs(const many *M, float **h, float **down, int32_t **slot_of) {
    *h = M->h, *down = M->down, *slot_of = M->slot_of;
}

/* ------------------------------------------------------------------------------------ */
/* embedding, head, the whole step                                                       */

void mt_embed(const mt_weight *table, long token, float *x);

/* x [T, H] = rows tokens[t] of the embedding table */
void mt_embed_many(const mt_weight *table, long T, const int64_t *tokens, float *x) {
    for (long t = 0; t < T; t++) mt_embed(table, tokens[t], x + t * table->cols);
}

/* M->h [R, H] = norm(x[rows[r]]) (the head's input); 0 or -1 (out of memory) */
int mt_norm_many(const void *norm_w, float eps, int dt, many *M, long R, const int32_t *rows, const float *x) {
    long H = M->H;
    if (mt_many_reserve(M, R)) return -1;
    for (long r = 0; r < R; r++) rms_norm(x + (long)rows[r] * H, norm_w, dt, eps, M->h + r * H, H);
    return 0;
}

/* logits [R, V] = out_w . norm(x[rows[r]]) */
int mt_head_many(const void *norm_w, const mt_weight *out_w, float eps, int dt, many *M, long R, const int32_t *rows,
                 const float *x, float *logits, int nth) {
    long H = out_w->cols;
    if (mt_norm_many(norm_w, eps, dt, M, R, rows, x)) return -1;
    mt_gemm_item it = {out_w, NULL, dt, M->h, H, NULL, R, logits, out_w->rows};
    mt_run_gemms(&it, 1, nth);
    return 0;
}

/* Every layer for T tokens in one call, for providers whose experts all stay in RAM (tables
 * of descriptors [n_layers * e_max] as for mt_layers; gate NULL for dense layers). K, V, cap:
 * [n_layers * n_seq] (layer-major); at most MT_MANY_MAX_E experts per layer. ids_out / w_out [n_layers * T * 64]: each MoE layer's
 * routing (for the caller's bookkeeping). The same functions in the same order as the
 * per-layer path. Returns 0, or -1 - i when layer i ran out of memory. */
int mt_layers_many(const layer_desc *const *L, int n_layers, many *M, int dt, long T, float *x, const long *pos,
                   const int32_t *seq, long n_seq, void *const *K, void *const *V, const long *cap, const float *cs,
                   const float *sn, const mt_weight *const *gate_table, const mt_weight *const *up_table,
                   const mt_weight *const *down_table, long e_max, int64_t *ids_out, float *w_out, int nth) {
    const mt_weight *g[MT_MANY_MAX_E], *u[MT_MANY_MAX_E], *d[MT_MANY_MAX_E];
    int64_t ex[MT_MANY_MAX_E];
    for (int i = 0; i < n_layers; i++) {
        const layer_desc *l = L[i];
        long o = (long)i * n_seq;
        if (mt_attention_many(l, M, dt, T, x, pos, seq, K + o, V + o, cap + o, cs, sn, nth)) return -1 - i;
        if (l->mlp == 0) {
            if (mt_moe_many(l, M, dt, T, x, NULL, NULL, 0, NULL, NULL, NULL, NULL, 1, nth)) return -1 - i;
            continue;
        }
        int64_t *ids = ids_out + (long)i * T * 64;
        float *w = w_out + (long)i * T * 64;
        mt_route_many(l, M, dt, T, ids, w, nth);
        int n = 0;
        char seen[MT_MANY_MAX_E] = {0};
        for (long j = 0; j < T * l->topk; j++)
            if (!seen[ids[j]]) seen[ids[j]] = 1;
        for (long e = 0; e < l->E && e < MT_MANY_MAX_E; e++)
            if (seen[e]) {
                long kk = (long)i * e_max + e;
                ex[n] = e, g[n] = gate_table[kk], u[n] = up_table[kk], d[n] = down_table[kk];
                n++;
            }
        if (mt_moe_many(l, M, dt, T, x, ids, w, n, ex, g, u, d, 1, nth)) return -1 - i;
    }
    return 0;
}
