/* Decode-step entry points: scratch buffers, embedding, the output head, the whole-step path
 * (every layer in one call) and the whole decode step (embedding, every layer, head: mt_step).
 * The layer steps live in attention.c and moe.c. */
#include "ep.h"

void mt_scratch_free(scratch *s);

/* gu_len: floats for all gate_up outputs of one layer (k * 2I + 2 SI, or 2 * dense inter);
 * n_down: most expert outputs of one layer (top-k). Returns NULL when out of memory. */
scratch *mt_scratch_new(long H, long qkv_rows, long attn_dim, long gu_len, long n_down, long E) {
    scratch *s = (scratch *)calloc(1, sizeof(scratch));
    if (!s) return NULL;
    s->h = (float *)calloc(H, 4);
    s->qkv = (float *)calloc(qkv_rows, 4);
    s->attn = (float *)calloc(attn_dim, 4);
    s->ao = (float *)calloc(H, 4);
    s->gu = (float *)calloc(gu_len, 4);
    s->act = (float *)calloc(gu_len, 4);
    s->down = (float *)calloc(H * (n_down > 0 ? n_down : 1), 4);
    s->sh = (float *)calloc(H, 4);
    s->sg = (float *)calloc(16, 4);
    s->rlog = (float *)calloc(E > 0 ? E : 1, 4);
    if (!s->h || !s->qkv || !s->attn || !s->ao || !s->gu || !s->act || !s->down || !s->sh || !s->sg || !s->rlog) {
        mt_scratch_free(s);
        return NULL;
    }
    return s;
}

void mt_scratch_free(scratch *s) {
    if (!s) return;
    free(s->h); free(s->qkv); free(s->attn); free(s->ao); free(s->gu); free(s->act);
    free(s->down); free(s->sh); free(s->sg); free(s->scores); free(s->rlog);
    free(s);
}

/* logits [V] = out_w . norm(x) */
void mt_head(const void *norm_w, const mt_weight *out_w, float eps, int dt, scratch *S, const float *x,
             float *logits, int nth) {
    rms_norm(x, norm_w, dt, eps, S->h, out_w->cols);
    mt_gemv_item it = {out_w, NULL, dt, S->h, logits, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
}

int mt_dequant_rows(const mt_weight *W, long r0, long r1, float *out);

/* x [H] = row `token` of the embedding table (any weight format) */
void mt_embed(const mt_weight *table, long token, float *x) {
    int dt = mt_plain_dt(table->fmt);
    if (dt >= 0) {
        const void *row = mt_row(table, token);
        for (long i = 0; i < table->cols; i++) x[i] = ld(row, dt, i);
    } else {
        mt_dequant_rows(table, token, token + 1, x);
    }
}

/* mt_layers; with `ep` (expert parallelism, ep.h) each MoE layer's experts are exchanged with
 * the other ranks (mt_ep_moe; the tables then hold only this rank's experts): -2000 when that
 * fails (ep->err says why). */
static int layers(const layer_desc *const *L, int n_layers, scratch *S, int dt, float *x, void *const *K,
                  void *const *V, const long *cap, long pos, const float *cs, const float *sn,
                  const mt_weight *const *gate_table, const mt_weight *const *up_table,
                  const mt_weight *const *down_table, long e_max, int64_t *ids_out, mt_ep *ep, int nth) {
    const mt_weight *g[64], *u[64], *d[64];
    float w[64];
    for (int i = 0; i < n_layers; i++) {
        const layer_desc *ld_ = L[i];
        if (mt_attention(ld_, S, dt, x, K[i], V[i], cap[i], pos, cs, sn, nth)) return -1 - i;
        if (ld_->mlp == 0) {
            mt_dense_mlp(ld_, S, dt, x, nth);
            continue;
        }
        int64_t *ids = ids_out + (long)i * 64;
        mt_route(ld_, S, dt, ids, w, nth);
        if (ep) { /* expert parallelism: this rank's experts here, the others' over the rings (ep.c) */
            long o = (long)i * e_max;
            if (mt_ep_moe(ep, ld_, S, dt, x, i, ids, w, gate_table + o, up_table + o, down_table + o, nth))
                return MT_EP_FAILED;
            continue;
        }
        for (long j = 0; j < ld_->topk; j++) {
            long k = (long)i * e_max + ids[j];
            g[j] = gate_table[k];
            u[j] = up_table[k];
            d[j] = down_table[k];
        }
        mt_moe(ld_, S, dt, x, (int)ld_->topk, g, u, d, w, 1, nth);
    }
    return 0;
}

/* Every layer of one decode step in one call, for providers whose experts all stay in RAM
 * (tables of gate / up / down descriptors per layer and expert, [n_layers * e_max], NULL for
 * dense layers; up NULL for fused gate_up). The same per-layer functions as the
 * Python-driven path, in the same order, so the result is bit-identical to it. K[i], V[i]:
 * layer i's cache buffers; cap[i] their capacity. ids_out [n_layers * 64]: each MoE layer's
 * chosen experts (for the caller's bookkeeping). Returns 0, or -1 - i when layer i could not
 * allocate attention scratch. */
int mt_layers(const layer_desc *const *L, int n_layers, scratch *S, int dt, float *x, void *const *K,
              void *const *V, const long *cap, long pos, const float *cs, const float *sn,
              const mt_weight *const *gate_table, const mt_weight *const *up_table,
              const mt_weight *const *down_table, long e_max, int64_t *ids_out, int nth) {
    return layers(L, n_layers, S, dt, x, K, V, cap, pos, cs, sn, gate_table, up_table, down_table, e_max, ids_out,
                  NULL, nth);
}

/* Everything a whole decode step reads, set up once by the decoder (native/decode.py:
 * StepDesc, keep the field order in sync) and updated only when a sequence's KV buffers or the
 * rope table change, so a step is one call with (token, position). */
typedef struct {
    const layer_desc *const *L;
    int n_layers, dt;
    scratch *S;
    float *x;                     /* residual stream [H] */
    void *const *K, *const *V;    /* per layer: cache buffers [nkv, cap, D] (model dtype) */
    const long *cap;              /* per layer: their capacity */
    const float *cos, *sin;       /* rope tables [rope_rows, rope_d] float32 */
    long rope_rows, rope_d;
    const mt_weight *const *gate_table, *const *up_table, *const *down_table; /* mt_layers' tables */
    long e_max;
    int64_t *ids_out;             /* [n_layers * 64] */
    const mt_weight *emb;         /* token embedding [V, H] */
    const void *norm_w;           /* final norm (model dtype) */
    const mt_weight *out_w;       /* LM head [V, H] */
    float norm_eps;
    mt_ep *ep;                    /* expert parallelism (ep.h), or NULL */
} step_desc;

/* One decode step of one token at `pos` (< every cap and < rope_rows): x = embedding row of
 * `token`, every layer (mt_layers: the same functions, the same bits), logits [V] = the head.
 * Returns 0, -1 - i when layer i could not allocate attention scratch, -1000 when pos is
 * outside the caches or the rope table, or -2000 when the expert-parallel exchange failed. */
int mt_step(const step_desc *P, long token, long pos, float *logits, int nth) {
    if (pos < 0 || pos >= P->rope_rows) return -1000;
    for (int i = 0; i < P->n_layers; i++)
        if (pos >= P->cap[i]) return -1000;
    mt_embed(P->emb, token, P->x);
    int rc = layers(P->L, P->n_layers, P->S, P->dt, P->x, P->K, P->V, P->cap, pos, P->cos + pos * P->rope_d,
                    P->sin + pos * P->rope_d, P->gate_table, P->up_table, P->down_table, P->e_max, P->ids_out, P->ep,
                    nth);
    if (rc) return rc;
    if (P->ep && P->ep->head_split) /* expert parallelism: the head's rows split over the ranks too */
        return mt_ep_head(P->ep, P->norm_w, P->norm_eps, P->dt, P->S, P->x, logits, nth);
    mt_head(P->norm_w, P->out_w, P->norm_eps, P->dt, P->S, P->x, logits, nth);
    return 0;
}
