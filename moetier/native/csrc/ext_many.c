/* Many tokens per call through the extended layers (gpt-oss, Llama-4; moetier/native/ext_prefill.py):
 * a prompt (one sequence, T causal positions), a batched step (N sequences, each its own KV
 * cache), or any mix, as one flat token batch -- the design of prefill.c for oss_desc layers.
 *
 * Per layer: norm, q / k / v (with biases) as multi-token products (gemm.c), per token the rope /
 * L2 norm / temperature and the KV write in place at its position in its own sequence's cache
 * (mt_oss_qkv_post), attention per (token, head) over that cache with the head's sink, sliding
 * window or attention chunk (mt_oss_attend_head), o_proj, residual; the router over every token
 * (mt_oss_topk per token), then the tokens grouped by expert (mt_group_slots) so each expert's
 * weights (any stored format, MXFP4 included) are read once per call for all its tokens.
 *
 * Every token's arithmetic is the single-token step's (sinks.c: the same row kernels, the same
 * per-token pieces of ext.h, the shared expert then the routed ones added in top-k order), so a
 * prefill or a batched step is bit-identical to stepping the tokens one at a time, whatever the
 * thread count or the batch mates.
 */
#include "ext.h"

/* buffers for up to `cap` tokens (grown by reserve); sizes are the largest over the layers */
typedef struct {
    long H, ldq, qdim, E, topk, I, SI;
    long cap;
    float *h, *qkv, *attn, *ao, *rlog, *gu, *act, *down, *xin, *sgu, *sact, *sh, *scores;
    long n_scores;
    int32_t *slot_tok, *slot_of; /* slot -> token; (token, j) -> slot */
    long *cnt, *off;             /* per expert: tokens routed to it, first slot */
    mt_gemm_item *items;         /* 3 E + 3 */
} ext_many;

void mt_ext_many_free(ext_many *M) {
    if (!M) return;
    free(M->h); free(M->qkv); free(M->attn); free(M->ao); free(M->rlog); free(M->gu); free(M->act);
    free(M->down); free(M->xin); free(M->sgu); free(M->sact); free(M->sh); free(M->scores);
    free(M->slot_tok); free(M->slot_of); free(M->cnt); free(M->off); free(M->items);
    free(M);
}

/* ldq: (nh + 2 nkv) D, qdim: nh D (the largest over the layers) */
ext_many *mt_ext_many_new(long H, long ldq, long qdim, long E, long topk, long I, long SI) {
    ext_many *M = (ext_many *)calloc(1, sizeof(ext_many));
    if (!M) return NULL;
    M->H = H, M->ldq = ldq, M->qdim = qdim, M->E = E > 0 ? E : 1;
    M->topk = topk > 0 ? topk : 1, M->I = I > 0 ? I : 1, M->SI = SI > 0 ? SI : 1;
    M->cnt = (long *)calloc(M->E, sizeof(long));
    M->off = (long *)calloc(M->E + 1, sizeof(long));
    M->items = (mt_gemm_item *)calloc(3 * M->E + 3, sizeof(mt_gemm_item));
    if (!M->cnt || !M->off || !M->items) {
        mt_ext_many_free(M);
        return NULL;
    }
    return M;
}

/* buffers for T tokens; 0 or -1 (out of memory) */
static int reserve(ext_many *M, long T) {
    if (T <= M->cap) return 0;
    long c = T > 2 * M->cap ? T : 2 * M->cap, S = c * M->topk;
    if (mt_grow(&M->h, c * M->H) || mt_grow(&M->qkv, c * M->ldq) || mt_grow(&M->attn, c * M->qdim) ||
        mt_grow(&M->ao, c * M->H) || mt_grow(&M->rlog, c * M->E) || mt_grow(&M->gu, S * 2 * M->I) ||
        mt_grow(&M->act, S * M->I) || mt_grow(&M->down, S * M->H) || mt_grow(&M->xin, S * M->H) ||
        mt_grow(&M->sgu, c * 2 * M->SI) || mt_grow(&M->sact, c * M->SI) || mt_grow(&M->sh, c * M->H))
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
    const oss_desc *L;
    const float *qkv; /* [T, ldq]: q at the start of each row */
    long ldq;
    const long *pos;
    const int32_t *seq;
    void *const *K, *const *V;
    const long *cap;
    int dt;
    long T, scores_per_thread;
    const double *cum; /* cost prefix sums over the T * nh (token, head) units */
    float *out, *scores;
} ext_attn_ctx;

static void ext_attn_task(void *vctx, int tid, int nth) {
    const ext_attn_ctx *A = (const ext_attn_ctx *)vctx;
    const oss_desc *L = A->L;
    long nh = L->nh, D = L->D, n_units = A->T * nh;
    float *sc = A->scores + (long)tid * A->scores_per_thread;
    long u0, u1;
    mt_cum_range(A->cum, n_units, tid, nth, &u0, &u1);
    for (long u = u0; u < u1; u++) {
        long t = u / nh, h = u % nh, s = A->seq[t], p = A->pos[t], t0 = mt_oss_first(L, p);
        mt_oss_attend_head(L, A->qkv + t * A->ldq + h * D, A->K[s], A->V[s], A->dt, A->cap[s], h, t0, p + 1 - t0,
                           A->out + (t * nh + h) * D, sc);
    }
}


/* For T tokens x [T, H] (token t at position pos[t] of sequence seq[t]; K[s], V[s] [nkv, cap[s],
 * D] that sequence's cache buffers, holding every position up to the batch's last):
 * x += o_proj(attn(norm1(x))); M->h = norm2(x); each token's k, v written at its position.
 * cs / sn: rope cos / sin tables [positions, D] (float32). Returns 0, or -1 out of memory. */
int mt_ext_attention_many(const oss_desc *L, ext_many *M, int dt, long T, float *x, const long *pos,
                          const int32_t *seq, void *const *K, void *const *V, const long *cap, const float *cs,
                          const float *sn, int nth) {
    long H = L->H, nh = L->nh, nkv = L->nkv, D = L->D, ldq = (nh + 2 * nkv) * D;
    if (reserve(M, T)) return -1;
    for (long t = 0; t < T; t++) rms_norm(x + t * H, L->ln1, dt, L->eps, M->h + t * H, H);
    mt_gemm_item it[3] = {{L->q_w, L->q_b, dt, M->h, H, NULL, T, M->qkv, ldq},
                          {L->k_w, L->k_b, dt, M->h, H, NULL, T, M->qkv + nh * D, ldq},
                          {L->v_w, L->v_b, dt, M->h, H, NULL, T, M->qkv + (nh + nkv) * D, ldq}};
    mt_run_gemms(it, 3, nth);
    long smax = 1, n_units = T * nh;
    for (long t = 0; t < T; t++) {
        long s = seq[t], p = pos[t];
        float *row = M->qkv + t * ldq;
        mt_oss_qkv_post(L, dt, row, row + nh * D, row + (nh + nkv) * D, K[s], V[s], cap[s], p, cs + p * D,
                        sn + p * D);
        if (p + 1 - mt_oss_first(L, p) > smax) smax = p + 1 - mt_oss_first(L, p);
    }
    double *cum = mt_cum_reserve(n_units + 1);
    if (!cum) return -1;
    cum[0] = 0;
    for (long u = 0; u < n_units; u++) {
        long p = pos[u / nh];
        cum[u + 1] = cum[u] + (double)(p + 1 - mt_oss_first(L, p)) + 8; /* + fixed cost per head */
    }
    int ath = cum[n_units] * D < PARALLEL_MIN_ELEMS ? 1 : nth;
    if (M->n_scores < smax * ath) {
        if (mt_grow(&M->scores, smax * ath)) return -1;
        M->n_scores = smax * ath;
    }
    ext_attn_ctx A = {L, M->qkv, ldq, pos, seq, K, V, cap, dt, T, smax, cum, M->attn, M->scores};
    parallel_run(ext_attn_task, &A, ath);
    mt_attn_out(L->o_w, L->o_b, dt, M->attn, nh * D, T, M->ao, x, H, L->ln2, L->eps, M->h, nth);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* feed-forward                                                                          */

/* router over M->h for T tokens: ids / w [T, topk] (mt_oss_topk per token) */
void mt_ext_route_many(const oss_desc *L, ext_many *M, int dt, long T, int64_t *ids, float *w, int nth) {
    long E = L->E, k = L->topk;
    mt_gemm_item it = {L->router_w, L->router_b, dt, M->h, L->H, NULL, T, M->rlog, E};
    mt_run_gemms(&it, 1, nth);
    for (long t = 0; t < T; t++) mt_oss_topk(L, M->rlog + t * E, ids + t * k, w + t * k);
}

/* The routed experts' gemm items over their slots (mt_group_slots), appended at items + m; returns
 * the new count. Inputs: `scaled` -- slot s reads X + s H (Llama-4's per-slot h[t] * w[t, j], xin);
 * else row X[slot_tok[s]]. routed_down applies the layer's activation per slot and adds the down
 * items (with bias) into M->down by slot. Shared by mt_ext_moe_many and mt_ext_rows_many (expert
 * parallelism's rows): the same items, the same bits per (row, expert). */
static int routed_gate_up(mt_gemm_item *items, int m, const oss_desc *L, ext_many *M, int dt, const float *X,
                          int scaled, int n, const int64_t *experts, const mt_weight *const *gate,
                          const mt_weight *const *up, const void *const *gub) {
    long H = L->H, I = L->I, bsz = dt == DT_BF16 ? 2 : 4;
    for (int j = 0; j < n; j++) {
        long e = experts[j], c = M->cnt[e], o = M->off[e];
        if (!c) continue;
        float *g = M->gu + o * 2 * I;
        const float *Xe = scaled ? X + o * H : X;
        const int32_t *idx = scaled ? NULL : M->slot_tok + o;
        items[m++] = (mt_gemm_item){gate[j], gub[j], dt, Xe, H, idx, c, g, 2 * I};
        if (up[j]) {
            const void *ub = gub[j] ? (const char *)gub[j] + I * bsz : NULL;
            items[m++] = (mt_gemm_item){up[j], ub, dt, Xe, H, idx, c, g + I, 2 * I};
        }
    }
    return m;
}

static int routed_down(mt_gemm_item *items, int m, const oss_desc *L, ext_many *M, int dt, int n,
                       const int64_t *experts, const mt_weight *const *down, const void *const *db) {
    long H = L->H, I = L->I;
    for (int j = 0; j < n; j++) {
        long e = experts[j], c = M->cnt[e], o = M->off[e];
        if (!c) continue;
        for (long s = o; s < o + c; s++)
            mt_oss_activate(L, M->gu + s * 2 * I, M->gu + s * 2 * I + I, M->act + s * I, I);
        items[m++] = (mt_gemm_item){down[j], db[j], dt, M->act + o * I, I, NULL, c, M->down + o * H, H};
    }
    return m;
}

/* The feed-forward of T tokens (h = M->h, routed by ids / w [T, topk] from mt_ext_route_many;
 * ids NULL for a dense layer): the experts listed (experts[0..n): ids with descriptors gate /
 * up (NULL: gate is the fused gate_up [2I, H]), gate_up bias gub (gate then up, or NULL), down
 * with bias db) run on all the tokens routed to them (scale_input: on h[t] * w[t, j]), their
 * outputs kept per (token, j). With `finish`: the shared expert / dense MLP, then x[t] +=
 * shared + sum_j w[t, j] * expert output (j ascending; weight 1 with scale_input), the
 * single-token order. Experts may come in several calls (one per expert for providers whose
 * weights are valid only until the next get) and then one finishing call with n = 0: the same
 * bits. Returns 0, -1 out of memory, -2 more experts than the scratch was made for. */
int mt_ext_moe_many(const oss_desc *L, ext_many *M, int dt, long T, float *x, const int64_t *ids, const float *w,
                    int n, const int64_t *experts, const mt_weight *const *gate, const mt_weight *const *up,
                    const void *const *gub, const mt_weight *const *down, const void *const *db, int finish,
                    int nth) {
    long H = L->H, k = ids ? L->topk : 0, SI = finish ? L->SI : 0;
    if (reserve(M, T)) return -1;
    if (n > M->E) return -2;
    if (k) mt_group_slots(L->E, k, T, ids, M->cnt, M->off, M->slot_tok, M->slot_of);
    if (k && n && L->scale_input) /* each slot's input: h[t] * w[t, j] */
        for (long t = 0; t < T; t++)
            for (long j = 0; j < k; j++) {
                float *xi = M->xin + (long)M->slot_of[t * k + j] * H;
                const float *ht = M->h + t * H;
                float wj = w[t * k + j];
                for (long i = 0; i < H; i++) xi[i] = ht[i] * wj;
            }
    mt_gemm_item *items = M->items;
    int m = L->scale_input ? routed_gate_up(items, 0, L, M, dt, M->xin, 1, n, experts, gate, up, gub)
                           : routed_gate_up(items, 0, L, M, dt, M->h, 0, n, experts, gate, up, gub);
    if (SI) {
        items[m++] = (mt_gemm_item){L->s_gate, NULL, dt, M->h, H, NULL, T, M->sgu, 2 * SI};
        items[m++] = (mt_gemm_item){L->s_up, NULL, dt, M->h, H, NULL, T, M->sgu + SI, 2 * SI};
    }
    if (m) mt_run_gemms(items, m, nth);
    m = routed_down(items, 0, L, M, dt, n, experts, down, db);
    if (SI) {
        for (long t = 0; t < T; t++) swiglu(M->sgu + t * 2 * SI, M->sgu + t * 2 * SI + SI, M->sact + t * SI, SI);
        items[m++] = (mt_gemm_item){L->s_down, NULL, dt, M->sact, SI, NULL, T, M->sh, H};
    }
    if (m) mt_run_gemms(items, m, nth);
    if (!finish) return 0;
    for (long t = 0; t < T; t++) {
        float *xt = x + t * H;
        if (SI) {
            const float *sh = M->sh + t * H;
            for (long i = 0; i < H; i++) xt[i] += sh[i];
        }
        for (long j = 0; j < k; j++) {
            const float *d = M->down + (long)M->slot_of[t * k + j] * H;
            float wj = L->scale_input ? 1.0f : w[t * k + j];
            for (long i = 0; i < H; i++) xt[i] += wj * d[i];
        }
    }
    return 0;
}

/* Expert parallelism's follower side (ext_prefill.py: ExtManyStepper.expert_rows; prefill.c's
 * mt_rows_many for these layers): n rows h [n, H] (the pairs' expert inputs rank 0 sent: a Llama-4
 * pair's already scaled by its weight, as the slot input mt_ext_moe_many forms), row r for expert
 * ids[r]; the experts listed run on their rows with mt_ext_moe_many's routed items (routed_gate_up /
 * routed_down: biases, activation): out[r] = expert ids[r](h[r]), unweighted, for the rows of listed experts (others
 * untouched). Each (row, expert) gets the bits the single-process call gives its (token, j).
 * 0, -1 (out of memory) or -2 (more experts than the scratch was made for). */
int mt_ext_rows_many(const oss_desc *L, ext_many *M, int dt, long n, const float *h, const int64_t *ids, int ne,
                     const int64_t *experts, const mt_weight *const *gate, const mt_weight *const *up,
                     const void *const *gub, const mt_weight *const *down, const void *const *db, float *out,
                     int nth) {
    if (reserve(M, n)) return -1;
    if (ne > M->E) return -2;
    mt_group_slots(L->E, 1, n, ids, M->cnt, M->off, M->slot_tok, M->slot_of);
    int m = routed_gate_up(M->items, 0, L, M, dt, h, 0, ne, experts, gate, up, gub);
    if (m) mt_run_gemms(M->items, m, nth);
    m = routed_down(M->items, 0, L, M, dt, ne, experts, down, db);
    if (m) mt_run_gemms(M->items, m, nth);
    mt_slots_out(ne, experts, M->cnt, M->off, M->slot_tok, M->down, L->H, out);
    return 0;
}

/* rank 0's view of the scratch (prefill.c: mt_many_bufs): h [cap, H], down [cap * topk, H] by slot */
void mt_ext_many_bufs(const ext_many *M, float **h, float **down, int32_t **slot_of) {
    *h = M->h, *down = M->down, *slot_of = M->slot_of;
}
