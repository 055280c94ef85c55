/* Many tokens per call through the DeepSeek MLA layers (moetier/native/mla_prefill.py): a prompt
 * (one sequence, T causal positions), one new token of each of N sequences, or a mix, as one flat
 * token batch:
 *
 *   norm1                         per token (rms_norm)
 *   q (or q_a -> norm -> q_b), kv_a   multi-token products (gemm.c), each weight read once per call
 *   c_kv norm, rope, cache write  per token into its own sequence's latent cache (mt_mla_post)
 *   per run of one sequence's consecutive tokens, the absorbed form (the single-token step's):
 *     W_UK absorbed into the query  per (head, token block) (mt_mla_absorb: W_UK rows converted
 *                                   once for the block, d ascending per element as for one token);
 *                                   this, the attention and W_UV run LATENT_CHUNK tokens at a time
 *                                   (their [nh, C] latents held for those tokens only)
 *     latent attention              per (token, 4 heads) over the positions up to the token's own
 *                                   (mt_mla_attend_rows; a prompt's tokens see the rows written
 *                                   before them in this call)
 *     W_UV                          multi-token products (one per head)
 *   or the plain form (plain_run, below: 2+ tokens, by cost)
 *   o_proj                        a multi-token product
 *   residual, norm2               per token, into the shared multi-token scratch (many.h)
 *
 * then the grouped router per token (mt_route_pick on a multi-token product of the router) and
 * the feed-forward through prefill.c's mt_moe_many (tokens grouped by expert, shared expert,
 * dense MLP). In the absorbed form every token runs the same functions in the same order as a
 * single-token step, so results are bit-identical to stepping the tokens one at a time, whatever
 * the thread count or the batch mates; the plain form is within float rounding of that.
 */
#include "many.h"
#include "mla.h"

#define ABSORB_BLOCK 16 /* tokens per absorb unit (their q_lat rows stay in L2 over the W_UK rows) */
#define LATENT_CHUNK 64 /* tokens whose q_lat / o_lat [nh, C] are held at once (bounds the scratch) */

/* buffers for up to `cap` tokens (grown by mla_reserve), sized for the largest layer */
typedef struct {
    long nh, C, dn, dr, dv, Rq, E;
    long cap;
    float *q, *qa, *kv, *qlat, *olat, *out, *choice, *scores;
    long n_scores;
    double *cum;  /* attention cost prefix sums over (token, head) units */
    long n_cum;
    float *kvd, *cf; /* the plain form: decompressed [k_nope | v] rows, c_kv rows as float32 */
    long n_kvd, n_cf;
    mt_gemm_item *items; /* nh (W_UV) */
} mla_many;

void mt_mla_many_free(mla_many *A) {
    if (!A) return;
    free(A->q); free(A->qa); free(A->kv); free(A->qlat); free(A->olat); free(A->out); free(A->choice);
    free(A->scores); free(A->cum); free(A->items); free(A->kvd); free(A->cf);
    free(A);
}

mla_many *mt_mla_many_new(long nh, long C, long dn, long dr, long dv, long Rq, long E) {
    mla_many *A = (mla_many *)calloc(1, sizeof(mla_many));
    if (!A) return NULL;
    A->nh = nh, A->C = C, A->dn = dn, A->dr = dr, A->dv = dv, A->Rq = Rq > 0 ? Rq : 1, A->E = E > 0 ? E : 1;
    A->items = (mt_gemm_item *)calloc(nh, sizeof(mt_gemm_item));
    A->choice = (float *)calloc(A->E, sizeof(float));
    if (!A->items || !A->choice) {
        mt_mla_many_free(A);
        return NULL;
    }
    return A;
}

static int mla_reserve(mla_many *A, long T) {
    if (T <= A->cap) return 0;
    long c = T > 2 * A->cap ? T : 2 * A->cap;
    if (mt_grow(&A->q, c * A->nh * (A->dn + A->dr)) || mt_grow(&A->qa, c * A->Rq) || mt_grow(&A->kv, c * (A->C + A->dr)) ||
        mt_grow(&A->out, c * A->nh * A->dv))
        return -1;
    long l = c < LATENT_CHUNK ? c : LATENT_CHUNK;
    if (mt_grow(&A->qlat, l * A->nh * A->C) || mt_grow(&A->olat, l * A->nh * A->C)) return -1;
    A->cap = c;
    return 0;
}

typedef struct {
    const mla_desc *L;
    mla_many *A;
    int dt;
    long T, ldq; /* T: tokens of this chunk, from t0 */
    long t0;
    const long *pos;
    const int32_t *seq;
    void *const *Ckv, *const *Kr;
    long scores_per_thread;
} mla_many_ctx;

/* units (head, block of ABSORB_BLOCK tokens), split evenly over the threads */
static void absorb_many_task(void *vctx, int tid, int nth) {
    const mla_many_ctx *X = (const mla_many_ctx *)vctx;
    const mla_desc *L = X->L;
    long C = L->C, nb = (X->T + ABSORB_BLOCK - 1) / ABSORB_BLOCK, n_units = L->nh * nb;
    for (long u = n_units * tid / nth; u < n_units * (tid + 1) / nth; u++) {
        long h = u / nb, t0 = (u % nb) * ABSORB_BLOCK, n = X->T - t0 < ABSORB_BLOCK ? X->T - t0 : ABSORB_BLOCK;
        mt_mla_absorb(L, X->dt, h, X->A->q + (X->t0 + t0) * X->ldq, X->ldq, X->A->qlat + (t0 * L->nh + h) * C,
                      L->nh * C, n);
    }
}

/* units (token, group of MLA_ROWS heads), split over the threads by cost (positions attended) */
static void attend_many_task(void *vctx, int tid, int nth) {
    const mla_many_ctx *X = (const mla_many_ctx *)vctx;
    const mla_desc *L = X->L;
    long nh = L->nh, C = L->C, dn = L->dn, ng = (nh + MLA_ROWS - 1) / MLA_ROWS, n_units = X->T * ng;
    const double *cum = X->A->cum;
    float *sc = X->A->scores + (long)tid * X->scores_per_thread;
    long u0, u1;
    mt_cum_range(cum, n_units, tid, nth, &u0, &u1);
    for (long u = u0; u < u1; u++) {
        long tl = u / ng, h = (u % ng) * MLA_ROWS, t = X->t0 + tl, s = X->seq[t];
        int R = nh - h < MLA_ROWS ? (int)(nh - h) : MLA_ROWS;
        mt_mla_attend_rows(L, X->dt, R, X->A->qlat + (tl * nh + h) * C, X->A->q + t * X->ldq + h * (dn + L->dr) + dn,
                           dn + L->dr, X->Ckv[s], X->Kr[s], X->pos[t] + 1, X->A->olat + (tl * nh + h) * C, sc);
    }
}

/* The plain (decompressed) form for a run of one sequence's tokens, as DeepSeek's and vLLM's
 * prefill do: the keys' and values' head parts decompressed from the cached latents with
 * kv_b_proj (k_nope = W_UK c_kv, v = W_UV c_kv, float32 scratch, never kept), then attention per
 * (token, head) over [k_nope | k_rot] and v: (dn + dr + dv) multiply-adds per (token, head,
 * position) instead of the absorbed form's (2 C + dr), plus the decompression of the n
 * positions attended (n (dn + dv) C per head) instead of the absorb and W_UV of the run's T
 * tokens (T (dn + dv) C). Chosen per run (use_plain) when that costs fewer multiply-adds: a
 * prompt's chunk over a context not much longer than itself, never a single token (a decode
 * step's token, alone or in a batch, keeps the single-token step's bits). A token's result
 * depends only on its query and the cache (not on the run, the call split or the threads), but
 * differs in rounding from the absorbed form. */
#define PLAIN_MAX_FLOATS (16L << 20) /* decompressed rows held at once (heads per pass bounded by it) */

typedef struct {
    const mla_desc *L;
    mla_many *A;
    int dt;
    long a, T, h0, nhc; /* tokens a .. a + T - 1; heads h0 .. h0 + nhc - 1 */
    const long *pos;
    const void *Kr;
    long scores_per_thread;
} plain_ctx;

/* whether tokens a .. b - 1 (one sequence's run) take the plain form; mode: -1 by cost, 0 never,
 * 1 whenever allowed (runs of 2 tokens or more whose decompressed rows fit one head per pass) */
static int use_plain(const mla_desc *L, long a, long b, const long *pos, int mode) {
    long T = b - a, n = pos[b - 1] + 1, C = L->C, dn = L->dn, dr = L->dr, dv = L->dv;
    if (mode == 0 || !L->kvb_w || T < 2 || n * (dn + dv) > PLAIN_MAX_FLOATS) return 0;
    if (mode == 1) return 1;
    double P = 0;
    for (long t = a; t < b; t++) P += (double)(pos[t] + 1);
    double plain = (double)n * (dn + dv) * C + P * (dn + dr + dv), absorbed = (double)T * (dn + dv) * C + P * (2 * C + dr);
    return plain < absorbed;
}

/* units (head, block of MLA_ROWS tokens), split over the threads by cost (positions attended) */
static void plain_task(void *vctx, int tid, int nth) {
    const plain_ctx *X = (const plain_ctx *)vctx;
    const mla_desc *L = X->L;
    long nh = L->nh, dn = L->dn, dr = L->dr, dv = L->dv, nb = (X->T + MLA_ROWS - 1) / MLA_ROWS, n_units = X->nhc * nb;
    const double *cum = X->A->cum;
    float *sc = X->A->scores + (long)tid * X->scores_per_thread;
    long u0, u1;
    mt_cum_range(cum, n_units, tid, nth, &u0, &u1);
    for (long u = u0; u < u1; u++) {
        long h = X->h0 + u / nb, t = X->a + (u % nb) * MLA_ROWS, n[MLA_ROWS];
        int R = X->a + X->T - t < MLA_ROWS ? (int)(X->a + X->T - t) : MLA_ROWS;
        for (int r = 0; r < R; r++) n[r] = X->pos[t + r] + 1;
        long ldq = nh * (dn + dr), ldkv = X->nhc * (dn + dv);
        mt_mla_attend_plain(L, X->dt, R, X->A->q + t * ldq + h * (dn + dr), ldq, X->A->kvd + (h - X->h0) * (dn + dv),
                            ldkv, X->Kr, n, X->A->out + t * nh * dv + h * dv, nh * dv, sc);
    }
}

/* tokens a .. b - 1 of one sequence (latent cache Ckv, Kr) through the plain form into A->out */
static int plain_run(const mla_desc *L, mla_many *A, int dt, long a, long b, const long *pos, const void *Ckv,
                     const void *Kr, int nth) {
    long nh = L->nh, C = L->C, dn = L->dn, dr = L->dr, dv = L->dv, T = b - a, n = pos[b - 1] + 1;
    const float *X = (const float *)Ckv;
    if (dt != DT_F32) { /* the latents as float32 rows (the products' activations) */
        if (A->n_cf < n * C) {
            if (mt_grow(&A->cf, n * C)) return -1;
            A->n_cf = n * C;
        }
        for (long i = 0; i < n * C; i++) A->cf[i] = bf16_to_f32(((const bf16 *)Ckv)[i]);
        X = A->cf;
    }
    long nhc = PLAIN_MAX_FLOATS / (n * (dn + dv));
    if (nhc > nh) nhc = nh;
    if (A->n_kvd < n * nhc * (dn + dv)) {
        if (mt_grow(&A->kvd, n * nhc * (dn + dv))) return -1;
        A->n_kvd = n * nhc * (dn + dv);
    }
    long nb = (T + MLA_ROWS - 1) / MLA_ROWS;
    for (long h0 = 0; h0 < nh; h0 += nhc) {
        long hc = nh - h0 < nhc ? nh - h0 : nhc;
        mt_weight W = *L->kvb_w; /* rows of heads h0 .. h0 + hc - 1 (a plain weight) */
        W.data = (const char *)W.data + h0 * (dn + dv) * W.stride;
        W.rows = hc * (dn + dv);
        mt_gemm_item it = {&W, NULL, dt, X, C, NULL, n, A->kvd, nhc * (dn + dv)};
        mt_run_gemms(&it, 1, nth);
        long n_units = hc * nb;
        if (n_units + 1 > A->n_cum) {
            double *c = (double *)realloc(A->cum, (n_units + 1) * sizeof(double));
            if (!c) return -1;
            A->cum = c, A->n_cum = n_units + 1;
        }
        A->cum[0] = 0;
        for (long u = 0; u < n_units; u++) {
            long t0 = a + (u % nb) * MLA_ROWS, t1 = t0 + MLA_ROWS < b ? t0 + MLA_ROWS : b;
            double c = 8;
            for (long t = t0; t < t1; t++) c += (double)(pos[t] + 1);
            A->cum[u + 1] = A->cum[u] + c;
        }
        int ath = A->cum[n_units] * (dn + dr + dv) < PARALLEL_MIN_ELEMS ? 1 : nth;
        if (A->n_scores < n * MLA_ROWS * ath) {
            if (mt_grow(&A->scores, n * MLA_ROWS * ath)) return -1;
            A->n_scores = n * MLA_ROWS * ath;
        }
        plain_ctx P = {L, A, dt, a, T, h0, hc, pos, Kr, n * MLA_ROWS};
        parallel_run(plain_task, &P, ath);
    }
    return 0;
}

/* For T tokens x [T, H] (token t at position pos[t] of sequence seq[t]; Ckv[s] [cap, C], Kr[s]
 * [cap, dr] that sequence's latent cache, holding a row for every position up to the batch's
 * last): x += o_proj(MLA(norm1(x))); M->h = norm2(x); each token's c_kv, k_rot written at its
 * position. cs / sn: rope tables [positions, dr] (float32). Returns 0, or -1 out of memory. */
int mt_mla_attention_many(const mla_desc *L, mla_many *A, many *M, int dt, long T, float *x, const long *pos,
                          const int32_t *seq, void *const *Ckv, void *const *Kr, const float *cs, const float *sn,
                          int mode, int nth) {
    long H = L->H, nh = L->nh, C = L->C, dn = L->dn, dr = L->dr, dv = L->dv, Rq = L->Rq;
    long ldq = nh * (dn + dr), ldkv = C + dr;
    if (dr > 512 || nh > A->nh || C > A->C || dn > A->dn || dr > A->dr || dv > A->dv || Rq > A->Rq) return -1;
    if (mt_many_reserve(M, T) || mla_reserve(A, T)) return -1;
    for (long t = 0; t < T; t++) rms_norm(x + t * H, L->ln1, dt, L->eps, M->h + t * H, H);
    mt_gemm_item it[2] = {
        {Rq ? L->qa_w : L->q_w, Rq ? L->qa_b : NULL, dt, M->h, H, NULL, T, Rq ? A->qa : A->q, Rq ? Rq : ldq},
        {L->kva_w, L->kva_b, dt, M->h, H, NULL, T, A->kv, ldkv},
    };
    mt_run_gemms(it, 2, nth);
    if (Rq) {
        for (long t = 0; t < T; t++) rms_norm(A->qa + t * Rq, L->qa_norm, dt, L->eps_lat, A->qa + t * Rq, Rq);
        mt_gemm_item qb = {L->q_w, NULL, dt, A->qa, Rq, NULL, T, A->q, ldq};
        mt_run_gemms(&qb, 1, nth);
    }
    long nmax = 1;
    for (long t = 0; t < T; t++) {
        long s = seq[t], p = pos[t];
        mt_mla_post(L, dt, A->q + t * ldq, A->kv + t * ldkv, Ckv[s], Kr[s], p, cs + p * dr, sn + p * dr);
        if (p + 1 > nmax) nmax = p + 1;
    }
    for (long a = 0, b; a < T; a = b) { /* runs of one sequence's consecutive tokens */
        for (b = a + 1; b < T && seq[b] == seq[a]; b++) {}
        if (use_plain(L, a, b, pos, mode)) {
            if (plain_run(L, A, dt, a, b, pos, Ckv[seq[a]], Kr[seq[a]], nth)) return -1;
            continue;
        }
        for (long c0 = a; c0 < b; c0 += LATENT_CHUNK) { /* absorb, attend, W_UV: LATENT_CHUNK tokens at a time */
            long n = b - c0 < LATENT_CHUNK ? b - c0 : LATENT_CHUNK;
            mla_many_ctx X = {L, A, dt, n, ldq, c0, pos, seq, Ckv, Kr, nmax * MLA_ROWS};
            double macs = (double)n * nh * dn * C;
            if (L->uk) { /* q_lat[t, h] = W_UK[h]^T q_nope[t, h] through the stored format's products */
                for (long h = 0; h < nh; h++)
                    A->items[h] = (mt_gemm_item){&L->uk[h], NULL, dt, A->q + c0 * ldq + h * (dn + dr), ldq, NULL, n,
                                                 A->qlat + h * C, nh * C};
                mt_run_gemms(A->items, (int)nh, nth);
            } else {
                parallel_run(absorb_many_task, &X, macs < PARALLEL_MIN_ELEMS ? 1 : nth);
            }
            long ng = (nh + MLA_ROWS - 1) / MLA_ROWS, n_units = n * ng;
            if (n_units + 1 > A->n_cum) {
                double *c = (double *)realloc(A->cum, (n_units + 1) * sizeof(double));
                if (!c) return -1;
                A->cum = c, A->n_cum = n_units + 1;
            }
            A->cum[0] = 0;
            for (long u = 0; u < n_units; u++) /* positions attended + a fixed cost per head group */
                A->cum[u + 1] = A->cum[u] + (double)(pos[c0 + u / ng] + 1) + 8;
            int ath = A->cum[n_units] * MLA_ROWS * (2 * C + dr) < PARALLEL_MIN_ELEMS ? 1 : nth;
            if (A->n_scores < nmax * MLA_ROWS * ath) {
                if (mt_grow(&A->scores, nmax * MLA_ROWS * ath)) return -1;
                A->n_scores = nmax * MLA_ROWS * ath;
            }
            parallel_run(attend_many_task, &X, ath);
            for (long h = 0; h < nh; h++) /* out[t, h] = W_UV[h] o_lat[t, h] */
                A->items[h] = (mt_gemm_item){&L->uv[h], NULL, dt, A->olat + h * C, nh * C, NULL, n,
                                             A->out + (c0 * nh + h) * dv, nh * dv};
            mt_run_gemms(A->items, (int)nh, nth);
        }
    }
    mt_attn_out(L->o_w, L->o_b, dt, A->out, nh * dv, T, M->ao, x, H, L->ln2, L->eps, M->h, nth);
    return 0;
}

/* the grouped router over M->h for T tokens: ids / w [T, topk] (mt_route_pick per token) */
int mt_route_grouped_many(const route_desc *R, mla_many *A, many *M, int dt, long T, int64_t *ids, float *w,
                          int nth) {
    long E = R->E, k = R->topk;
    if (E > A->E || E > M->E || mt_many_reserve(M, T)) return -1;
    mt_gemm_item it = {R->w, NULL, dt, M->h, M->H, NULL, T, M->rlog, E};
    mt_run_gemms(&it, 1, nth);
    for (long t = 0; t < T; t++) mt_route_pick(R, dt, M->rlog + t * E, A->choice, ids + t * k, w + t * k);
    return 0;
}
