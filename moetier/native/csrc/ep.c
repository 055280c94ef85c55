/* Expert parallelism in the native decode step (ep.h): rank 0's per-layer exchange inside
 * mt_step, and a follower's serve loop, over the shared-memory rings of
 * moetier/distributed/shm.py (its docstring is the protocol: slots, seq last, acknowledgement,
 * adaptive wait). The messages are those of distributed/executor.py's native path
 * (CMD_MOE_NATIVE: header (command, layer, n) as int64, then n rows of the float32 MoE input
 * [H], each followed by its expert id; an answer: its number (int64), then n float32 rows),
 * so either end may be Python or C. x86-64 only (shm.py: stores are not reordered; the
 * acquire / release below keep the compiler from reordering them). */
#include "ep.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LINE_WORDS 8          /* shm.py LINE = 64 bytes */
#define CMD_MOE_NATIVE 7      /* executor.py */
#define CMD_HEAD_NATIVE 8     /* executor.py */
#define HEADER 24             /* executor.py HEADER: (command, layer, rows) */
#define ANSWER_HEADER 8       /* executor.py ANSWER_HEADER */
#define CHECK_EVERY_S 0.02    /* shm.py CHECK_EVERY_S */
#define LOST_CPU_S 200e-6     /* shm.py LOST_CPU_S */
#define NO_SPIN_S 0.5         /* shm.py NO_SPIN_S */
#define SLEEP_FIRST_S 50e-6   /* shm.py SLEEP_FIRST_S, SLEEP_MAX_S */
#define SLEEP_MAX_S 1e-3

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int64_t load(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static char *payload(const mt_ring *R, int i) { return (char *)(R->seq[i] + LINE_WORDS); }

static void futex_wait(int64_t *word, int64_t old, double timeout_s) {
    struct timespec ts = {(time_t)timeout_s, (long)((timeout_s - (double)(time_t)timeout_s) * 1e9)};
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, (uint32_t)old, &ts, NULL, 0); /* low half: x86-64 */
}

static void futex_wake(int64_t *word) { syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0); }

/* Wait (shm.py Ring._await) until ring R's `word` holds `want` (reader: the slot's seq; any
 * other value than `want` or `old` is out of sequence) or reaches it (writer: the acknowledged
 * count, room for a message). Poll with sched_yield for spin_s unless a yield came back late
 * (then sleep at once, and for NO_SPIN_S more), then sleep: the reader on the futex, the
 * writer in doubling naps; every CHECK_EVERY_S ask ep->check. 0, or -1 with ep->err set. */
static int ring_wait(mt_ep *ep, mt_ring *R, int64_t *word, int64_t want, int64_t old, int reader) {
    double t0 = now_s();
    double spin_end = t0 >= R->no_spin_until ? t0 + R->spin_s : t0, check = t0 + CHECK_EVERY_S, nap = SLEEP_FIRST_S;
    int slept = 0;
    for (;;) {
        int64_t s = load(word);
        if (reader ? s == want : s >= want) return 0;
        if (reader && s != old) {
            ep->err = MT_EP_E_SEQ, ep->err_ring = R->id, ep->err_a = s, ep->err_b = want;
            return -1;
        }
        double now = now_s();
        if (now < spin_end) {
            sched_yield(); /* whoever waits for this CPU runs first */
            if (now_s() - now > LOST_CPU_S) spin_end = now, R->no_spin_until = now + NO_SPIN_S;
            continue;
        }
        if (now >= check) {
            if (ep->check(R->id, now - t0)) {
                ep->err = MT_EP_E_CHECK, ep->err_ring = R->id;
                return -1;
            }
            check = now + CHECK_EVERY_S;
        }
        if (!slept) slept = 1, ep->sleeps++;
        if (reader) {
            futex_wait(word, old, CHECK_EVERY_S);
        } else {
            struct timespec ts = {0, (long)(nap * 1e9)};
            nanosleep(&ts, NULL);
            nap = nap * 2 < SLEEP_MAX_S ? nap * 2 : SLEEP_MAX_S;
        }
    }
}

/* Writer: the payload of the next message (its slot, free once acknowledged), or NULL (ep->err). */
static char *ring_reserve(mt_ep *ep, mt_ring *R) {
    int64_t m = R->sent + 1;
    if (load(R->acked) < m - MT_EP_SLOTS && ring_wait(ep, R, R->acked, m - MT_EP_SLOTS, 0, 0)) return NULL;
    return payload(R, (int)((m - 1) % MT_EP_SLOTS));
}

/* Writer: publish the reserved message (`nbytes`), seq last, and wake a sleeping reader. */
static void ring_publish(mt_ring *R, long nbytes) {
    int64_t m = R->sent + 1;
    int64_t *seq = R->seq[(m - 1) % MT_EP_SLOTS];
    seq[1] = nbytes;
    store(seq, m);
    futex_wake(seq);
    R->sent = m;
}

/* Reader: acknowledge the message taken last (its payload is released), then wait for the next
 * one: its payload (valid until the next take), or NULL (ep->err). `peek`: do not take it. */
static char *ring_next(mt_ep *ep, mt_ring *R, int peek) {
    if (R->got) store(R->acked, R->got);
    int64_t m = R->got + 1;
    int i = (int)((m - 1) % MT_EP_SLOTS);
    int64_t old = m - MT_EP_SLOTS > 0 ? m - MT_EP_SLOTS : 0;
    if (load(R->seq[i]) != m && ring_wait(ep, R, R->seq[i], m, old, 1)) return NULL;
    if (!peek) R->got = m;
    return payload(R, i);
}

/* rank owning the next pair of (layer, e): its only copy, or replicas in turn */
static int owner(mt_ep *ep, int layer, int64_t e) {
    int n = ep->own_n[e];
    const int32_t *o = ep->own + e * ep->world;
    if (n == 1) return o[0];
    int64_t *c = ep->rr + (long)layer * ep->e_max + e;
    return o[(*c)++ % n];
}

int mt_ep_moe(mt_ep *ep, const layer_desc *L, scratch *S, int dt, float *x, int layer, const int64_t *ids,
              const float *w, const mt_weight *const *gate, const mt_weight *const *up,
              const mt_weight *const *down, int nth) {
    int k = (int)L->topk, P = ep->world;
    long H = L->H, h4 = 4 * H, rb = h4 + 8;
    int dest[64], where_r[64], where_i[64], order[64];
    const float *rows[64];
    const mt_weight *g[64], *u[64], *d[64];
    double t0 = now_s(), comm = 0.0;
    for (int j = 0; j < k; j++) dest[j] = owner(ep, layer, ids[j]), where_r[j] = 0;
    /* pairs in (expert, pair) order: a follower's rows go out grouped by expert */
    for (int j = 0; j < k; j++) {
        int a = j;
        while (a > 0 && (ids[order[a - 1]] > ids[j])) order[a] = order[a - 1], a--;
        order[a] = j;
    }
    int msgs = 0, asked = 0, remote = 0;
    for (int r = 1; r < P; r++) {
        int n = 0;
        for (int a = 0; a < k; a++) n += dest[order[a]] == r;
        if (n == 0 && t0 - ep->told[r] < ep->ping_s) continue; /* heard from rank 0 recently */
        ep->told[r] = t0;
        mt_ring *R = ep->ctrl[r];
        char *p = ring_reserve(ep, R);
        if (!p) return -1;
        int64_t hdr[3] = {CMD_MOE_NATIVE, layer, n};
        memcpy(p, hdr, sizeof(hdr));
        int i = 0;
        for (int a = 0; a < k; a++) {
            int j = order[a];
            if (dest[j] != r) continue;
            memcpy(p + HEADER + i * rb, S->h, (size_t)h4);
            memcpy(p + HEADER + i * rb + h4, &ids[j], 8);
            where_r[j] = r, where_i[j] = i++;
        }
        ring_publish(R, ep->ctrl_bytes);
        msgs++, asked += n > 0, remote += n;
    }
    double t1 = now_s();
    int nl = 0;
    for (int j = 0; j < k; j++) {
        if (dest[j] != 0) continue;
        long e = (long)ids[j];
        if (!gate[e]) {
            ep->err = MT_EP_E_EXPERT, ep->err_ring = -1, ep->err_a = layer, ep->err_b = e;
            return -1;
        }
        g[nl] = gate[e], u[nl] = up[e], d[nl] = down[e];
        rows[j] = S->down + nl++ * H;
    }
    mt_moe_rows(L, S, dt, nl, g, u, d, 1, NULL, nth); /* own pairs and the shared expert */
    double t2 = now_s();
    for (int r = 1; r < P; r++) {
        int n = 0;
        for (int j = 0; j < k; j++) n += where_r[j] == r;
        if (!n) continue;
        const char *a = ring_next(ep, ep->ans[r], 0);
        if (!a) return -1;
        for (int j = 0; j < k; j++)
            if (where_r[j] == r) rows[j] = (const float *)(a + ANSWER_HEADER + where_i[j] * h4);
    }
    double t3 = now_s();
    mt_moe_add(L, S, x, k, rows, w, 1); /* answers stay valid until the next take */
    comm += (t1 - t0) + (t3 - t2);
    ep->comm_s += comm, ep->compute_s += t2 - t1;
    ep->collectives += msgs + asked;
    ep->meta_bytes += msgs * ep->ctrl_bytes + remote * 8 - remote * h4 + asked * ep->answer_bytes - remote * h4;
    ep->dispatch_sent += remote * h4, ep->combine_recv += remote * h4;
    ep->remote_pairs += remote, ep->local_pairs += nl;
    ep->moe_calls++, ep->native_calls++;
    return 0;
}

int mt_ep_head(mt_ep *ep, const void *norm_w, float eps, int dt, scratch *S, const float *x, float *logits, int nth) {
    int P = ep->world;
    long H = ep->H, moved = 0;
    rms_norm(x, norm_w, dt, eps, S->h, H); /* as mt_head */
    double t0 = now_s();
    for (int r = 1; r < P; r++) {
        mt_ring *R = ep->ctrl[r];
        char *p = ring_reserve(ep, R);
        if (!p) return MT_EP_FAILED;
        int64_t hdr[3] = {CMD_HEAD_NATIVE, 0, 0};
        memcpy(p, hdr, sizeof(hdr));
        memcpy(p + HEADER, S->h, (size_t)(4 * H));
        ring_publish(R, ep->ctrl_bytes);
        ep->told[r] = t0;
    }
    double t1 = now_s();
    mt_gemv_item it = {ep->head_mine, NULL, dt, S->h, logits, NULL, NULL};
    mt_run_gemvs(&it, 1, nth);
    double t2 = now_s();
    for (int r = 1; r < P; r++) {
        const char *a = ring_next(ep, ep->head[r], 0);
        if (!a) return MT_EP_FAILED;
        memcpy(logits + ep->head_off[r], a + ANSWER_HEADER, (size_t)(4 * ep->head_n[r]));
        moved += 4 * ep->head_n[r];
    }
    ep->comm_s += (t1 - t0) + (now_s() - t2);
    ep->collectives += 2 * (P - 1), ep->meta_bytes += (P - 1) * ep->ctrl_bytes;
    ep->head_bytes += moved;
    return 0;
}

/* A follower: serve rank 0's CMD_MOE_NATIVE messages (executor.py: EPGroup._compute_native,
 * the same rows: mt_moe_rows, written straight into the answer's slot) until a message of
 * another kind or for a layer this loop does not serve arrives (left untaken, for the Python
 * loop), or `limit` messages were served (limit < 0: no limit). L: every layer's descriptor,
 * tables [n_layers * e_max] as for mt_layers (NULL: an expert not held here). Returns the
 * messages served, or -1 (ep->err says why). */
long mt_ep_serve(mt_ep *ep, const layer_desc *const *L, int n_layers, scratch *S, int dt,
                 const mt_weight *const *gate_table, const mt_weight *const *up_table,
                 const mt_weight *const *down_table, long limit, int nth) {
    mt_ring *C = ep->ctrl[0], *A = ep->ans[0];
    long served = 0;
    const mt_weight *g[64], *u[64], *d[64];
    while (limit < 0 || served < limit) {
        double t0 = now_s();
        const char *p = ring_next(ep, C, 1);
        if (!p) return -1;
        int64_t hdr[3];
        memcpy(hdr, p, sizeof(hdr));
        if (hdr[0] == CMD_HEAD_NATIVE && ep->head_split) { /* this rank's rows of the LM head (mt_ep_head) */
            C->got++;
            memcpy(S->h, p + HEADER, (size_t)(4 * ep->H));
            char *a = ring_reserve(ep, ep->head[0]);
            if (!a) return -1;
            double t1 = now_s();
            mt_gemv_item it = {ep->head_mine, NULL, dt, S->h, (float *)(a + ANSWER_HEADER), NULL, NULL};
            mt_run_gemvs(&it, 1, nth);
            double t2 = now_s();
            int64_t num = ep->head[0]->sent + 1;
            memcpy(a, &num, 8);
            ring_publish(ep->head[0], ANSWER_HEADER + 4 * ep->head_n[ep->rank]);
            ep->comm_s += (t1 - t0) + (now_s() - t2);
            ep->collectives += 2, ep->meta_bytes += ep->ctrl_bytes;
            ep->head_bytes += 4 * ep->head_n[ep->rank];
            continue;
        }
        long layer = (long)hdr[1], n = (long)hdr[2];
        if (hdr[0] != CMD_MOE_NATIVE || layer < 0 || layer >= n_layers || L[layer]->mlp != 1 || n < 0 ||
            n > L[layer]->topk)
            break; /* the Python loop takes it (and names what is wrong) */
        C->got++;
        const layer_desc *ld_ = L[layer];
        long H = ld_->H, h4 = 4 * H, rb = h4 + 8;
        double t1 = now_s();
        ep->comm_s += t1 - t0;
        ep->collectives++, ep->meta_bytes += ep->ctrl_bytes;
        ep->moe_calls++, ep->native_calls++, served++;
        if (n == 0) continue;
        for (long i = 0; i < n; i++) {
            int64_t e;
            memcpy(&e, p + HEADER + i * rb + h4, 8);
            long t = layer * ep->e_max + (long)e;
            if (e < 0 || e >= ep->e_max || !gate_table[t]) {
                ep->err = MT_EP_E_EXPERT, ep->err_ring = -1, ep->err_a = layer, ep->err_b = e;
                return -1;
            }
            g[i] = gate_table[t], u[i] = up_table[t], d[i] = down_table[t];
        }
        memcpy(S->h, p + HEADER, (size_t)h4); /* the MoE input: the first row */
        char *a = ring_reserve(ep, A);
        if (!a) return -1;
        double t2 = now_s();
        mt_moe_rows(ld_, S, dt, (int)n, g, u, d, 0, (float *)(a + ANSWER_HEADER), nth);
        double t3 = now_s();
        int64_t num = ++ep->answers_sent;
        memcpy(a, &num, 8);
        ring_publish(A, ep->answer_bytes);
        ep->comm_s += (t2 - t1) + (now_s() - t3), ep->compute_s += t3 - t2;
        ep->collectives++;
        ep->dispatch_recv += n * h4, ep->combine_sent += n * h4;
        ep->meta_bytes += n * 8 - n * h4 + (ep->answer_bytes - n * h4);
        ep->local_pairs += n;
    }
    return served;
}
