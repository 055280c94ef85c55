/* Expert parallelism in the native decode step: the shared-memory rings of
 * moetier/distributed/shm.py driven from C (ep.c), so a decode step's per-layer exchange
 * (rank 0) and a follower's answers run without Python. The structs mirror
 * moetier/distributed/native_ep.py (keep the field order in sync). */
#ifndef MT_EP_H
#define MT_EP_H

#include "mt.h"

#define MT_EP_SLOTS 4 /* shm.py: SLOTS */

/* One end of a one-writer one-reader ring (shm.py: Ring keeps its counters here, so the
 * Python and C ends of a rank agree). Slot i: seq word at seq[i], its byte count at seq[i] + 1,
 * the payload one 64-byte line after seq[i]. */
typedef struct {
    int64_t *acked;              /* the reader's acknowledged message count */
    int64_t *seq[MT_EP_SLOTS];
    long slot_bytes;
    int64_t sent, got;           /* messages written (writer) / taken (reader) */
    double no_spin_until;        /* CLOCK_MONOTONIC s (= Python's perf_counter): no polling until then */
    double spin_s;               /* poll this long before sleeping */
    int id;                      /* the ring's number for the liveness callback */
} mt_ring;

/* Called every 20 ms of waiting on ring `ring` (waited: seconds so far): nonzero ends the wait
 * (the peer is gone or the step timeout passed; the Python side keeps the error). */
typedef int (*mt_ep_check_fn)(int ring, double waited_s);

/* what a call whose exchange failed returns (mt_step, mt_mla_layers, mt_ep_head) */
#define MT_EP_FAILED (-2000)

/* errors (mt_ep.err) */
enum { MT_EP_OK = 0, MT_EP_E_SEQ = 1, MT_EP_E_CHECK = 2, MT_EP_E_EXPERT = 3 };

typedef struct {
    int world, rank;
    long H, e_max;               /* hidden size; experts per layer in the tables */
    long ctrl_bytes, answer_bytes;
    mt_ring *const *ctrl;        /* [world]: rank 0: the control ring to each follower; a follower: [0] from rank 0 */
    mt_ring *const *ans;         /* [world]: rank 0: each follower's answer ring; a follower: [0] its own */
    const int32_t *own_n;        /* [e_max]: copies of expert e */
    const int32_t *own;          /* [e_max * world]: their ranks */
    int64_t *rr;                 /* [n_layers * e_max]: pairs of (layer, e) routed so far (replicas: round robin) */
    double *told;                /* [world]: when rank 0 last sent each follower a message */
    double ping_s;               /* rank 0 sends a follower an empty message when it has not for this long */
    int64_t answers_sent;        /* a follower: answers sent (each carries its number) */
    mt_ep_check_fn check;
    /* counters since the Python side last folded them into EPStats (distributed/executor.py) */
    double comm_s, compute_s;
    int64_t collectives, meta_bytes, dispatch_sent, dispatch_recv, combine_sent, combine_recv;
    int64_t remote_pairs, local_pairs, moe_calls, native_calls;
    int64_t sleeps;              /* waits that went to sleep (futex / nap) after or instead of polling */
    /* the LM head split over the ranks (head_split): rank r computes rows [head_off[r], + head_n[r])
     * of it (head_mine: a descriptor of those rows) from rank 0's normed hidden state */
    int head_split;
    mt_ring *const *head;        /* [world]: rank 0: each follower's head-answer ring; a follower: [0] its own */
    const mt_weight *head_mine;
    const long *head_off, *head_n;
    int64_t head_bytes;          /* logits moved between ranks */
    /* the failure (err != 0): ring, and for MT_EP_E_SEQ the slot's seq and the expected one,
     * for MT_EP_E_EXPERT the layer and the expert not held */
    int err, err_ring;
    int64_t err_a, err_b;
} mt_ep;

/* Rank 0: one MoE layer of a decode step with the token's MoE input in S->h, routing ids/w:
 * the followers' pairs sent, this rank's pairs and the shared expert computed, the answers
 * awaited, then x += the rows in pair order (mt_moe_add): the bits of one process. gate / up /
 * down: this layer's descriptor rows of the tables ([e_max], NULL for experts not held here).
 * Returns 0 or -1 (ep->err says why). */
int mt_ep_moe(mt_ep *ep, const layer_desc *L, scratch *S, int dt, float *x, int layer, const int64_t *ids,
              const float *w, const mt_weight *const *gate, const mt_weight *const *up,
              const mt_weight *const *down, int nth);

/* Rank 0: logits [V] = out_w . norm(x) with the rows split over the ranks (the followers' from
 * the normed x sent to them, answered into their head rings): the same gemv rows as mt_head, the
 * same bits. Returns 0 or MT_EP_FAILED (ep->err). */
int mt_ep_head(mt_ep *ep, const void *norm_w, float eps, int dt, scratch *S, const float *x, float *logits, int nth);

#endif
