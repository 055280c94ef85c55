"""Expert-parallel MoE execution over ``torch.distributed`` (gloo on CPU), in one of two
exchange patterns (``EPGroup.exchange``; docs/expert-parallel.md):

``"direct"`` (default; batch-1 layout "rank 0 alone"): rank 0 runs embeddings, attention,
routers, shared experts and the LM head and holds only its share of the routed experts;
ranks 1..P-1 hold their experts and run :meth:`EPGroup.serve`. At every MoE layer rank 0
exchanges point-to-point messages (gloo ``isend`` / ``irecv``, tags ``TAG_*``) with each follower:

1. control: one fixed-size message to every follower: ``(command, layer, rows)`` (3 int64)
   followed by room for ``inline_rows`` (= top-k) dispatch rows. When every follower's rows
   fit (decode of one sequence), they travel here ("counts sent with the data") and step 2 is
   skipped: two messages per follower per MoE layer instead of three;
2. dispatch (larger batches): the hidden row of every token-expert pair to the rank owning
   that expert, its expert id (int64) appended to the row's bytes (:func:`pack`);
3. each rank (rank 0 too, for its own share, while the followers compute theirs) runs its
   experts on its rows, grouped by expert (:func:`moetier.layers.moe.dispatch`, k = 1, weight 1);
4. combine: the unweighted expert outputs go back to rank 0 (its receives are posted before it
   computes), which applies the top-k weights and sums them exactly like the single-process
   dispatch (same order). Decode of one token answers into a receive posted one answer ahead
   (``TAG_ANSWER``, fixed size, two tags alternating: :meth:`EPGroup._post_answer`), and both
   ranks poll the buffer of the message they wait for (:meth:`EPGroup._spin`, up to
   ``MOETIER_EP_SPIN_US``) before sleeping in gloo's wait.

Transport (``MOETIER_EP_TRANSPORT`` gloo | shm | auto, picked once in
:meth:`EPGroup._setup_transport`): the control messages and decode answers go through
:class:`GlooTransport` (gloo point-to-point, any hosts) or :class:`moetier.distributed.shm.ShmTransport`
(shared-memory rings, ranks on one x86-64 machine: auto's choice there for ``direct``); the
group above them is the same. Batched rows, the replicated exchange and start-up stay on gloo.

``"replicated"``: every rank runs the whole forward on the same inputs (rank 0's ``model.step``
is :meth:`EPGroup.mirrored`: one ``CMD_STEP`` control message per step tells the followers the
sequences and tokens; :meth:`EPGroup._serve_replicated` runs them on copies). The always-on
compute is deterministic, so routing is identical everywhere; at each MoE layer every rank runs
its own pairs and sends their unweighted outputs to every other rank, one message per ordered
pair of ranks (:meth:`EPGroup._exchange`; receives posted one exchange ahead), then every rank
sums all pairs in the single-process order.

Point-to-point, not ``all_to_all_single``: c10d hands every gloo collective to its worker
thread and waits for it (a thread hand-off each way), while gloo posts a send or receive from
the calling thread; the decode round trip (control out, row back) measured 275-380 us with two
collectives vs 95-140 us with isend/irecv (bench/bench_ep.py loopback). Decode of one token
(``CMD_MOE_ONE``, the same bytes as ``CMD_MOE_INLINE``) has its own short path on both sides
(:meth:`EPGroup._dispatch_one`, :meth:`EPGroup._compute_one`): messages built with ``struct``,
each expert run on the token's row as the single-process decode path does. Measured per MoE
layer (one decode step, 2 ranks on this 2-core VM): a gloo send on loopback costs its sender
40-50 us and a posted receive (its notice to the sender) 10-30 us; a rank asleep in ``wait``
cost another 20-40 us to wake, and a receive posted just before the peer's send disturbed the
peer. So the decode path keeps exactly one send per rank on the critical path: the answer's
receive is posted right after the control message goes out (its notice rides behind it),
the follower posts its next control receive after answering, and the waiting rank polls.
:func:`init` pins each local rank to its own CPUs (:func:`pin_local_rank`).

Top-k weights are applied at the source: this is the planner's ``direct`` all-to-all (one
row per remote pair each way, DeepEP low-latency style), where applying them at the owner
saves no combine bytes -- the owner would still return one row per pair -- and would cost a
weight per pair in the dispatch; at the source the sum happens in the single-process order,
so float32 logits match bit for bit without replication. Weighting at the owner pays only
with per-(token, rank) dedup (summing a token's pairs on one rank before the combine), which
saves ``k - distinct ranks`` rows per token: not done yet.

Bytes counted (per rank): hidden rows sent to / received from *other* ranks, equal to
``moetier.planner.cluster.ep_step_rows(exchange, ...) x pair_bytes(H, dtype)`` (in ``direct``,
whether they travel inline in the control message or in the dispatch); everything else on the
wire (headers, expert ids, step descriptions, the unused room of fixed-size messages) is
``meta_bytes``.

The dispatch is plugged in without touching the model code: :func:`moetier.distributed.rank.install` wraps the
module-level ``dispatch`` of :mod:`moetier.layers.moe` (and llama4's import of it); the
wrapper forwards to :meth:`ExpertParallelProvider.dispatch` when a block's provider is one,
and to the original otherwise. Native decode steps hand each MoE layer to :meth:`EPGroup.native_one`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import sys
import threading
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moetier.distributed.placement import EPPlacement
from moetier.errors import MoetierError
from moetier.planner.cluster import EP_EXCHANGES as EXCHANGES

CMD_MOE, CMD_STOP, CMD_PING, CMD_MOE_INLINE, CMD_MOE_ONE = 1, 2, 3, 4, 5  # ONE: inline, decode of one token
CMD_STEP = 6  # replicated: (CMD_STEP, words, all_logits) + the step's description (int64 words)
CMD_MOE_NATIVE = 7  # direct, native decode of one token: CMD_MOE_ONE's layout with float32 rows (native/decode.py)
CMD_HEAD_NATIVE = 8  # direct, native exchange: the normed hidden state [H] float32 -> a follower's rows of the LM head
CMD_MOE_NATIVE_MANY = 9  # direct, native multi-token step: CMD_MOE's layout with float32 rows (inline when n <= top-k)
CMD_HEAD_MANY = 10  # direct, native exchange: n normed hidden rows (shm buffer) -> a follower's logits of them (buffer)
HEADER = 24  # bytes: (command, layer, rows) as int64
TAG_CTRL, TAG_ROWS, TAG_COMBINE = 1, 2, 3  # point-to-point message tags (rank 0 <-> a follower)
TAG_EXCHANGE = 4  # replicated: one message per (rank, other rank) per MoE layer
TAG_ANSWER = 5  # direct, decode of one token: a follower's answer i travels on TAG_ANSWER + i % 2 (see _post_answer)
DEFAULT_EXCHANGE = "direct"  # --ep-exchange (EXCHANGES: moetier.planner.cluster.EP_EXCHANGES); measured best, see docs
STEP_INLINE_WORDS = 32  # replicated: a step description this short travels in the control message
SLOT_HEADER = 16  # replicated: an exchange message starts with (rows, routing check) as int64
DEFAULT_TIMEOUT_S = 60.0  # step messages (MOETIER_EP_TIMEOUT): a dead or hung peer -> an error after this
DEFAULT_START_TIMEOUT_S = 600.0  # start-up (MOETIER_EP_START_TIMEOUT): joining, hash check, loading
DEFAULT_BULK_MB = 16.0  # MOETIER_EP_SHM_BULK_MB: shm buffers per follower and direction for multi-token rows
DEFAULT_SPIN_US = 2000.0  # MOETIER_EP_SPIN_US: direct decode, a rank polls this long before sleeping (> a step gap)
ANSWER_HEADER = 8  # direct decode answer: its number (int64, from 1), then top-k rows


class DistributedError(MoetierError):
    """A rank could not start, or a peer rank died / hung / disagrees (one line, exit 2)."""


@dataclass
class EPStats:
    """Per-rank counters (bytes: hidden rows to/from *other* ranks; seconds: wall time)."""

    dispatch_bytes_sent: int = 0
    dispatch_bytes_recv: int = 0
    combine_bytes_sent: int = 0
    combine_bytes_recv: int = 0
    meta_bytes: int = 0  # control + expert ids, both directions
    remote_pairs: int = 0  # token-expert pairs computed on another rank (rank 0) / for rank 0
    local_pairs: int = 0  # pairs computed where their token lives / here for rank 0
    moe_calls: int = 0
    collectives: int = 0  # step messages posted (point-to-point: control, dispatch, combine, pings)
    native_calls: int = 0  # MoE layers whose exchange ran inside the native step (native_ep.py)
    sleeps: int = 0  # native exchange: waits for a message or a slot that went to sleep (not only polled)
    head_bytes: int = 0  # native exchange: LM-head logits moved between ranks (the head's rows are split)
    head_rows: int = 0  # native exchange: the LM head's rows this rank computes (native_ep.head_rows)
    comm_s: float = 0.0  # posting and waiting for step messages (includes waiting for the peers)
    compute_s: float = 0.0  # expert FFNs on this rank
    cpu_s: float = 0.0  # this process's CPU time (all threads) when the figures were gathered

    def vector(self) -> torch.Tensor:
        return torch.tensor([float(getattr(self, f.name)) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_vector(cls, v: Seq[float]) -> dict[str, Any]:
        return {f.name: (int(x) if f.type in ("int", int) else float(x)) for f, x in zip(fields(cls), v)}


def bulk_bytes(hidden: int, top_k: int, mb: str | None) -> int:
    """Bytes of each shm buffer (per follower and direction) for a native multi-token step's rows
    beyond the control message (a prompt's, a server batch's): enough for the largest native call
    (``MAX_CALL_TOKENS`` tokens x top-k float32 rows with their ids), at most ``mb`` MiB
    (``MOETIER_EP_SHM_BULK_MB``, default :data:`DEFAULT_BULK_MB`; 0: none, those rows travel on
    gloo). Less than a control message's rows is no use: 0."""
    from moetier.native.prefill import MAX_CALL_TOKENS

    text = (mb or "").strip() or str(DEFAULT_BULK_MB)
    try:
        cap = float(text)
    except ValueError:
        cap = -1.0
    if not cap >= 0 or cap == float("inf"):
        raise DistributedError(f"MOETIER_EP_SHM_BULK_MB={text!r}: expected a number of MiB >= 0 (0: off)")
    row = 4 * hidden + 8
    got = min(MAX_CALL_TOKENS * top_k * row, int(cap * 2**20))
    return got if got >= top_k * row else 0


def pack(x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Rows x [n, H] and their expert ids [n] (int64) as one byte tensor [n, H*bytes + 8]:
    one dispatch message instead of two (the bytes of x are sent unchanged)."""
    return torch.cat([x.contiguous().view(torch.uint8),  # [n, H*bytes]
                      experts.to(torch.long)[:, None].contiguous().view(torch.uint8)], dim=1)  # [n, 8]


def unpack(b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: ([n, H] in ``dtype``, [n] int64)."""
    return b[:, :-8].contiguous().view(dtype), b[:, -8:].reshape(-1).clone().view(torch.long)  # fresh: offset 0


class _Enough(Exception):
    """A replicated follower served the MoE layers it was asked to (``serve(max_calls=...)``)."""


def _original_dispatch_k1(x: torch.Tensor, experts: torch.Tensor, layer: int, provider: Any,
                          glu: Any) -> torch.Tensor:
    """Rows x [n, H] with their expert ids [n] -> unweighted outputs [n, H], grouped by expert
    like the single-process dispatch (the same row batches per expert)."""
    from moetier.distributed.rank import _original_dispatch

    return _original_dispatch(x, experts[:, None], torch.ones(x.shape[0], 1, dtype=x.dtype), layer, provider, glu)


def model_digest(model_dir: str | Path, dtype: torch.dtype, placement: EPPlacement,
                 exchange: str = DEFAULT_EXCHANGE, native: bool = False) -> bytes:
    """sha256 of config.json, every safetensors file's name, size and header, the dtype, the
    placement, the exchange and whether decode runs natively: ranks started with a different
    model or placement disagree here."""
    d = Path(model_dir)
    h = hashlib.sha256()
    h.update((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(f.name.encode() + str(f.stat().st_size).encode() + head + fh.read(min(n, 1 << 24)))
    h.update(str(dtype).encode())
    h.update(placement.digest().encode())
    h.update(exchange.encode())
    if native:
        h.update(b"native")
    return h.digest()


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


class GlooTransport:
    """The step messages as gloo point-to-point messages on the group's step group (any hosts,
    both exchanges). The interface the group calls (:class:`moetier.distributed.shm.ShmTransport`
    has the same): rank 0 ``send`` s control messages (handles for ``done``), ``expect`` s the
    answers of the followers it gave pairs and takes each with ``answer``, and at stop
    ``finish`` es (the answers still owed; returns how many); a follower ``recv_ctrl`` s, makes
    the next control message receivable with ``ctrl_read`` and answers with ``reply``.

    gloo holds a send until the receiver has announced its receive, so receives are posted
    ahead: the follower's next control receive (:meth:`ctrl_read`), and rank 0's answer
    receives one answer ahead (:meth:`_post_answer`); a waiting rank polls the receive buffer
    (:meth:`EPGroup._spin`) before sleeping in gloo's ``wait``."""

    name = "gloo"

    def __init__(self, group: EPGroup):
        self.g = group
        self._ctrl_next: tuple[torch.Tensor, Any] | None = None  # follower: the next control message's receive
        self._answers: dict[int, list[tuple[torch.Tensor, Any]]] = {}  # direct, rank 0: posted answer receives
        self._answer_no: dict[int, int] = {}  # direct: answers posted (rank 0, per follower) / sent (follower)

    def start(self) -> None:
        g = self.g
        if g.rank != 0:
            self.ctrl_read()
        elif g.exchange == "direct":
            for r in range(1, g.world):
                self._post_answer(r)

    # rank 0
    def send(self, msgs: list[tuple[int, torch.Tensor]]) -> list[Any]:
        return [self.g._p2p(b, r, TAG_CTRL, send=True, wait=False) for r, b in msgs]

    def done(self, pending: list[Any]) -> None:
        for w in pending:
            self.g._wait(w)

    def expect(self, asked: list[int]) -> dict[int, Any]:
        """The answer receives already posted for the followers ``asked``; their next ones are
        posted now (the notices follow the control messages just sent)."""
        answers = {r: self._answers[r].pop(0) for r in asked}
        for r in asked:
            self._post_answer(r)
        return answers

    def answer(self, a: tuple[torch.Tensor, Any]) -> torch.Tensor:
        b, w = a
        self.g._spin(b[:8].numpy().view("<i8"))
        self.g._wait(w)
        return b

    def finish(self) -> int:
        n = 0
        for posted in self._answers.values():  # direct: every follower answers the receive posted last
            for _, w in posted:
                self.g._wait(w)
                n += 1
        self._answers = {}
        return n

    def _post_answer(self, r: int) -> None:
        """Rank 0 (direct): post the receive of follower ``r``'s next decode answer (fixed size:
        top-k rows). Receives are posted ahead -- one from :meth:`start` on, the next while rank 0's
        own experts have run and it would wait anyway -- so the follower's answer never waits for
        a receive-ready notice (gloo holds a send until the receiver announced its receive), and
        the notice leaves when neither rank is on the critical path. Two may be outstanding, so
        consecutive answers alternate between two tags (an answer matches its own receive)."""
        buf = torch.zeros(self.g._answer_bytes(), dtype=torch.uint8)  # zeros: see _spin
        i = self._answer_no.get(r, 0)
        self._answer_no[r] = i + 1
        self._answers.setdefault(r, []).append(
            (buf, self.g._p2p(buf, r, TAG_ANSWER + i % 2, send=False, wait=False)))

    # a follower
    def recv_ctrl(self) -> torch.Tensor:
        if self._ctrl_next is None:
            self.ctrl_read()
        recv, work = self._ctrl_next
        self._ctrl_next = None
        if self.g.exchange == "direct":
            self.g._spin(recv[:8].numpy().view("<i8"))  # the command: nonzero
        self.g._wait(work)
        return recv

    def ctrl_read(self) -> None:
        buf = torch.zeros(self.g.ctrl_bytes, dtype=torch.uint8)  # zeros: see _spin
        self._ctrl_next = (buf, self.g._p2p(buf, 0, TAG_CTRL, send=False, wait=False))

    def reply(self, ans: torch.Tensor) -> None:
        """Answer i (numbered i + 1 in its header) on TAG_ANSWER + i % 2 (rank 0 posted its receive)."""
        i = self._answer_no.get(0, 0)
        self._answer_no[0] = i + 1
        self.g._p2p(ans, 0, TAG_ANSWER + i % 2, send=True)


_groups_made = 0  # EPGroups set up by this process: part of a shm segment's name (same order on every rank)


@dataclass
class EPGroup:
    """This process's place in the expert-parallel job."""

    rank: int
    world: int
    placement: EPPlacement
    timeout_s: float | None = None  # step messages; None: MOETIER_EP_TIMEOUT or DEFAULT_TIMEOUT_S
    exchange: str = DEFAULT_EXCHANGE  # "replicated" or "direct" (see the module docstring)
    stats: EPStats = field(default_factory=EPStats)
    _rr: dict[tuple[int, int], int] = field(default_factory=dict)
    _owners: list[list[int]] = field(default_factory=list)
    _sole: torch.Tensor | None = None  # native_many: each expert's only rank, -1 when it has copies

    def __post_init__(self) -> None:
        if self.exchange not in EXCHANGES:
            raise DistributedError(f"expert-parallel exchange {self.exchange!r}: expected one of "
                                   f"{', '.join(EXCHANGES)}")
        self._owners = self.placement.owners()
        self._calls_left: int | None = None  # replicated follower: stop after this many MoE layers (tests)
        self._next_seq = 0  # replicated, rank 0: the id the next new sequence gets
        self._freed: list[int] = []  # replicated, rank 0: ids of sequences gone since the last step
        self._mirrors: dict[int, Any] = {}  # replicated follower: rank 0's sequences (id -> this rank's copy)
        self._slots: dict[int, tuple[torch.Tensor, Any]] = {}  # replicated: posted receives (peer -> buffer, work)
        self._answers_sent = 0  # direct, a follower: answers sent (each carries its number)
        self._ctrl_bufs: dict[int, tuple[torch.Tensor, Any, int]] = {}  # direct, native decode: rank 0's control
        # message per follower (tensor, its numpy view, its address)
        self._told: dict[int, float] = {}  # direct, native decode: when rank 0 last sent each follower a message
        self._ans_buf: torch.Tensor | None = None  # direct, native decode: a follower's answer (reused)
        if self.timeout_s is None:
            self.timeout_s = float(os.environ.get("MOETIER_EP_TIMEOUT", DEFAULT_TIMEOUT_S))
        self.spin_s = float(os.environ.get("MOETIER_EP_SPIN_US", DEFAULT_SPIN_US)) * 1e-6
        # the step messages run on their own group: its timeout is the fault detector (a dead or
        # stopped peer), while start-up (loading, hash check) waits on the default group's longer one
        self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s)) \
            if dist.is_initialized() else None
        self._lock = threading.Lock()  # one MoE layer's messages (control, dispatch, combine) or a ping at a time
        self._last = time.monotonic()
        self._beat: threading.Thread | None = None
        self._beat_stop = threading.Event()
        self.fault: str | None = None  # the first step-message failure (then every rank exits)
        self._tr: Any = GlooTransport(self)  # the step messages' transport (:meth:`_setup_transport`, in ready)
        self.transport, self.transport_why = "gloo", "not set up"
        self.shm_name: str | None = None  # shm: the segment's name (unlinked once every rank mapped it)
        # direct + shm + native decode: the exchange inside the native step (native_ep.py), or None and why
        self.native_exchange: Any = None
        self.head_answer_bytes = 0  # shm: a head ring's slot (configure)
        self.bulk_bytes = 0  # shm: each follower's multi-token buffers (configure)
        self.native_exchange_why = "not set up"

    # ----- messages (every failure becomes one clear line) -----
    def _p2p(self, t: torch.Tensor, peer: int, tag: int, send: bool, wait: bool = True) -> Any:
        """One point-to-point ``isend`` / ``irecv`` of ``t`` on the step group (gloo posts it from
        this thread: no hand-off to c10d's worker thread, as a collective has); ``wait=False``
        returns a handle for :meth:`_wait` (this rank computes meanwhile)."""
        if self.fault is not None:
            raise DistributedError(self.fault)
        t0 = time.perf_counter()
        try:
            op = dist.isend if send else dist.irecv
            work = op(t, peer, group=self._pg, tag=tag)
        except (RuntimeError, dist.DistBackendError) as e:
            self._failed(e)
        self.stats.comm_s += time.perf_counter() - t0
        self.stats.collectives += 1
        if wait:
            self._wait(work)
            return None
        return work

    def _spin(self, first: Any) -> None:
        """Poll a posted receive's first word (``first``: a numpy int64 view of its buffer, zeroed
        before posting; every message polled for starts with a nonzero word) for up to ``spin_s``
        before :meth:`_wait` sleeps. gloo's loop thread reads a message straight into the buffer;
        a rank that sleeps instead leaves its CPU idle, and on this VM waking an idle CPU costs
        the sender 30-50 us per message (bench/bench_ep.py loopback, docs/expert-parallel.md).
        Each poll yields the CPU: a rank pinned to one CPU must not keep gloo's thread (which
        fills the buffer) or another process off it while it waits (a 2 ms spin without the
        yield stalled a round at 816 us per message)."""
        if self.spin_s <= 0:
            return
        t0 = time.perf_counter()
        end = t0 + self.spin_s
        while first[0] == 0 and time.perf_counter() < end:
            os.sched_yield()  # a thread waiting for this CPU (gloo's own, another job) runs first
        self.stats.comm_s += time.perf_counter() - t0

    def _wait(self, work: Any) -> None:
        t0 = time.perf_counter()
        try:
            work.wait()
        except (RuntimeError, dist.DistBackendError) as e:
            self._failed(e)
        self._last = time.monotonic()
        self.stats.comm_s += time.perf_counter() - t0

    def _failed(self, e: BaseException) -> None:
        why = "timed out" if "Timed out" in str(e) else "failed"
        self.fault = (f"rank {self.rank}: all-to-all with the other ranks {why} ({_first_line(e)}); "
                      f"a peer rank died, hung or was stopped (step timeout {self.timeout_s:g} s)")
        raise DistributedError(self.fault) from None

    def configure(self, hidden: int, dtype: torch.dtype, top_k: int, native: Any = None) -> None:
        """The row format (every rank, after loading): a dispatch row is H values + an int64 id.
        ``native``: this rank's native decoder (``direct`` only; every rank has one or none): decode
        steps then run through :meth:`native_one` and move float32 rows (the native activations),
        so the fixed-size messages have room for k float32 rows."""
        self.hidden, self.dtype, self.native = hidden, dtype, native
        self.row_bytes = hidden * torch.empty(0, dtype=dtype).element_size() + 8
        self.room_row = max(self.row_bytes - 8, 4 * hidden if native is not None else 0)  # a row's room in messages
        self.inline_rows = top_k
        self.ctrl_bytes = HEADER + (STEP_INLINE_WORDS * 8 if self.exchange == "replicated"
                                    else self.inline_rows * (self.room_row + 8))
        # the native exchange splits the LM head's rows over the ranks (native_ep.py): a follower's
        # answer holds its slice of the logits (shm only)
        from moetier.distributed.native_ep import head_rows

        many = native is not None and self.exchange == "direct"  # native multi-token steps (every decoder)
        self.bulk_bytes = bulk_bytes(hidden, top_k, os.environ.get("MOETIER_EP_SHM_BULK_MB")) if many else 0
        V = getattr(native, "V", 0) if native is not None and self.exchange == "direct" else 0
        self.head_answer_bytes = ANSWER_HEADER + 4 * max(head_rows(V, self.world)[1:]) if V and self.world > 1 else 0

    def _send_ctrl(self, cmd: int, layer: int = 0, counts: Seq[int] | None = None,
                   rows: list[torch.Tensor] | None = None, wait: bool = True) -> list[Any]:
        """Rank 0: one fixed-size control message to each follower, with its rows if inline;
        returns the sends' handles (``wait=False``; :meth:`GlooTransport.done`)."""
        P, W = self.world, self.ctrl_bytes
        buf = torch.zeros(P - 1, W, dtype=torch.uint8)  # [followers, W]
        hdr = torch.tensor([[cmd, layer, (counts[r] if counts else 0)] for r in range(1, P)], dtype=torch.long)
        buf[:, :HEADER] = hdr.view(torch.uint8).view(P - 1, HEADER)
        if rows is not None:
            for r in range(1, P):
                b = rows[r].reshape(-1)
                buf[r - 1, HEADER:HEADER + b.numel()] = b
        works = self._tr.send([(r, buf[r - 1]) for r in range(1, P)])
        self.stats.meta_bytes += (P - 1) * W
        if wait:
            self._tr.done(works)
            return []
        return works

    def _recv_ctrl(self, post_next: bool = True) -> tuple[int, int, int, torch.Tensor]:
        """Follower: (command, layer, rows, the message's bytes [ctrl_bytes]). ``post_next``: make
        the next control message's receive ready now (gloo: post it; else the caller does,
        :meth:`_post_ctrl`, once its answer is out: posting sends the peer a notice, off the
        critical path then)."""
        recv = self._tr.recv_ctrl()
        self.stats.meta_bytes += self.ctrl_bytes
        cmd, layer, n = struct.unpack_from("<3q", recv.numpy())
        if cmd != CMD_STOP and post_next:
            self._post_ctrl()  # rank 0's next control message finds its receive posted (see _post_slots)
        return cmd, layer, n, recv

    def _post_ctrl(self) -> None:
        self._tr.ctrl_read()

    def _answer_bytes(self) -> int:
        return ANSWER_HEADER + self.inline_rows * self.room_row  # its number, room for top-k hidden rows

    def _send_steps(self, msgs: list, asked: list[int]) -> tuple[list, dict]:
        """Rank 0 (direct, under ``_lock``): send each follower its step message without waiting
        and note the answers of the followers ``asked``: (pending sends, answer handles by rank:
        :meth:`GlooTransport.answer`)."""
        return self._tr.send(msgs), self._tr.expect(asked)

    def _send_answer(self, ans: torch.Tensor) -> None:
        """Follower (direct): answer i of this job (``ans``: its bytes [answer_bytes], the header
        free) as number i + 1."""
        self._answers_sent += 1
        struct.pack_into("<q", ans.numpy(), 0, self._answers_sent)
        self._tr.reply(ans)

    # ----- the transport (gloo or shared memory), picked in one place -----
    def _setup_transport(self) -> None:
        """Every rank, after loading (collectives on the default group): pick the transport of
        the step messages (``MOETIER_EP_TRANSPORT`` gloo | shm | auto, default auto:
        :func:`moetier.distributed.shm.choose`) and, for shm, map the segment: rank 0 creates it,
        the followers map it, rank 0 unlinks it once all have."""
        from moetier.distributed import shm

        global _groups_made
        _groups_made += 1
        requested = os.environ.get("MOETIER_EP_TRANSPORT", "auto").strip().lower() or "auto"
        mine = shm.identity()
        ids: list[Any] = [None] * self.world
        try:
            if self.world > 1:
                dist.all_gather_object(ids, mine)
            else:
                ids = [mine]
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {self.rank}: transport agreement failed ({_first_line(e)})") from None
        try:
            self.transport, self.transport_why = shm.choose(requested, ids, self.exchange)
        except ValueError as e:
            raise DistributedError(str(e)) from None
        if self.transport == "gloo":
            self._tr = GlooTransport(self)
            return
        name = self.shm_name = shm.segment_name(shm.job_key(_groups_made))
        size = shm.ShmTransport.size(self.world, self.ctrl_bytes, self._answer_bytes(),
                                     self.head_answer_bytes, self.bulk_bytes)
        err = ""
        mm = None
        try:
            if self.rank == 0:
                mm = shm.create(name, size)
        except (OSError, shm.ShmError) as e:
            err = (f"rank 0: could not create the shm segment /dev/shm/{name} of {size / 2**20:.1f} MiB "
                   f"({_first_line(e)}; MOETIER_EP_SHM_BULK_MB sets its multi-token buffers, "
                   f"MOETIER_EP_TRANSPORT=gloo avoids it)")
        self._agree(err)
        try:
            try:
                if self.rank != 0:
                    mm = shm.attach(name, size)
            except (OSError, shm.ShmError) as e:
                err = f"rank {self.rank}: could not map the shm segment /dev/shm/{name} ({_first_line(e)})"
            self._agree(err)
        finally:
            if self.rank == 0:
                shm.unlink(name)  # every rank has mapped it (or set-up failed): nothing stays in /dev/shm
        peers = {r: shm.Peer(r, d["pid"], d["start"]) for r, d in enumerate(ids)}
        self._tr = shm.ShmTransport(self, mm, peers, self._failed)

    def _agree(self, err: str) -> None:
        """A start-up step every rank passes or every rank leaves with the first rank's error."""
        got: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(got, err)
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {self.rank}: shm set-up with the other ranks failed "
                                   f"({_first_line(e)})") from None
        bad = [e for e in got if e]
        if bad:
            raise DistributedError(bad[0])

    # ----- liveness (rank 0 pings idle followers, so their wait never reaches the timeout) -----
    def ready(self) -> None:
        """After loading: wait for every rank (start-up timeout), then rank 0 starts pinging."""
        try:
            dist.barrier()
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {self.rank}: waiting for the other ranks to load failed "
                                   f"({_first_line(e)})") from None
        self._setup_transport()
        self._last = time.monotonic()
        if self.exchange == "replicated" and self.world > 1:
            self._post_slots()
        if self.world > 1:
            self._tr.start()
        if self.exchange == "direct" and self.world > 1 and getattr(self, "native", None) is not None:
            from moetier.distributed.native_ep import NativeExchange

            self.native_exchange, self.native_exchange_why = NativeExchange.make(self, self.native)
            ex = self.native_exchange
            # the LM head's rows split over the ranks: only when every rank answers in C (and agrees)
            split = os.environ.get("MOETIER_EP_SPLIT_HEAD", "1").strip() != "0" and ex is not None
            t = torch.tensor([int(split)], dtype=torch.long)
            try:
                dist.all_reduce(t, op=dist.ReduceOp.MIN)
            except (RuntimeError, dist.DistBackendError) as e:
                raise DistributedError(f"rank {self.rank}: native exchange agreement failed ({_first_line(e)})") \
                    from None
            if ex is not None:
                ex.set_head_split(bool(t.item()))
                if self.rank == 0:
                    self.native.bind_exchange(ex)  # whole steps exchange inside mt_step
        if self.rank == 0 and self.world > 1 and self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="moetier-ep-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        every = max(0.05, self.timeout_s / 4)
        while not self._beat_stop.wait(every / 2):
            if time.monotonic() - self._last < every or self.fault is not None:
                continue
            with self._lock:
                if self._beat_stop.is_set():
                    return
                try:
                    self._send_ctrl(CMD_PING)
                except DistributedError:
                    return  # the engine's next step reports it

    def _stop_heartbeat(self) -> None:
        self._beat_stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            with self._lock:
                pass
            self._beat.join(5)
        self._beat = None

    def check_same(self, digest: bytes) -> None:
        """Every rank must load the same model, dtype and placement (all-gather of the hash)."""
        mine = torch.tensor(list(digest), dtype=torch.uint8)
        got = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            dist.all_gather(got, mine)
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {self.rank}: start-up hash exchange failed ({_first_line(e)})") from None
        bad = [r for r, g in enumerate(got) if not torch.equal(g, got[0])]
        if bad:
            raise DistributedError(
                f"rank {self.rank}: ranks {bad} were started with a different model, dtype or placement than rank 0 "
                f"(hash {bytes(got[bad[0]].tolist()).hex()[:12]} vs {bytes(got[0].tolist()).hex()[:12]}); "
                "start every rank with the same model directory, --dtype, placement, --ep-exchange and native setting")

    # ----- expert compute (any rank) -----
    def compute(self, x: torch.Tensor, experts: torch.Tensor, layer: int, provider: Any, glu: Any) -> torch.Tensor:
        """Rows x [n, H] with their expert ids [n] -> unweighted expert outputs [n, H]."""
        if x.shape[0] == 0:
            return x
        t0 = time.perf_counter()
        y = _original_dispatch_k1(x, experts, layer, provider, glu)
        self.stats.compute_s += time.perf_counter() - t0
        return y

    def _compute_one(self, msg: torch.Tensor, n: int, layer: int, provider: Any, glu: Any) -> torch.Tensor:
        """Follower, decode of one token: the n rows of a ``CMD_MOE_ONE`` message all carry that
        token's hidden row; each expert runs on it as the single-process decode path does ->
        the answer's bytes: a header (:meth:`_send_answer` numbers it), then [top-k, H]: row i
        the i-th pair's output, the rows past n zero (none when n = 0: no answer)."""
        from moetier.layers.moe import expert_forward

        if n == 0:
            return torch.empty(ANSWER_HEADER, dtype=torch.uint8)
        rb, hb = self.row_bytes, self.row_bytes - 8
        mv = msg.numpy()
        ids = [struct.unpack_from("<q", mv, HEADER + i * rb + hb)[0] for i in range(n)]
        x = msg[HEADER:HEADER + hb].view(self.dtype)[None].clone()  # [1, H], a fresh (aligned) copy
        t0 = time.perf_counter()
        ans = torch.zeros(self._answer_bytes(), dtype=torch.uint8)  # header, then the rows
        y = ans[ANSWER_HEADER:ANSWER_HEADER + self.inline_rows * hb].view(self.dtype).view(-1, self.hidden)  # [k, H]
        with torch.inference_mode():
            provider.require(layer, sorted(set(ids)))
            for i, e in enumerate(ids):
                y[i:i + 1] = expert_forward(x, provider.get(layer, e), glu)
        self.stats.compute_s += time.perf_counter() - t0
        return ans

    def _compute_native(self, msg: torch.Tensor, n: int, layer: int, provider: Any) -> torch.Tensor:
        """Follower, native decode of one token (``CMD_MOE_NATIVE``: n float32 rows of the token's MoE
        input, each with an expert id): the experts run through this rank's native decoder on that
        row, as the single-process native step runs them (``mt_moe_rows``) -> the answer's bytes
        (header, then row i = the i-th pair's unweighted float32 output)."""
        if n == 0:
            return torch.empty(ANSWER_HEADER, dtype=torch.uint8)
        dec, h4 = self.native, 4 * self.hidden
        rb, mv = h4 + 8, msg.numpy()
        ids = [struct.unpack_from("<q", mv, HEADER + i * rb + h4)[0] for i in range(n)]
        t0 = time.perf_counter()
        ctypes.memmove(dec.h_ptr, msg.data_ptr() + HEADER, h4)  # the MoE input h: the first row
        dec.expert_rows(layer, provider, ids, False, torch.get_num_threads())
        if self._ans_buf is None:  # reused: its send is waited for before the next control message
            self._ans_buf = torch.zeros(self._answer_bytes(), dtype=torch.uint8)
        ans = self._ans_buf
        ctypes.memmove(ans.data_ptr() + ANSWER_HEADER, dec.down_ptr, n * h4)  # rows past n: unused room
        self.stats.compute_s += time.perf_counter() - t0
        return ans

    def _compute_native_many(self, recv: torch.Tensor, layer: int, provider: Any) -> torch.Tensor:
        """Follower, a multi-token native step (``CMD_MOE_NATIVE_MANY``: rows [n, 4H + 8] of float32
        MoE inputs, each with its expert id): the experts run through this rank's native decoder's
        multi-token scratch (``ManyStepper.expert_rows``) -> unweighted float32 outputs [n, H]."""
        if recv.shape[0] == 0:
            return torch.empty(0, self.hidden, dtype=torch.float32)
        x, e = unpack(recv, torch.float32)
        t0 = time.perf_counter()
        y = self.native.many_stepper().expert_rows(layer, provider, x, e, torch.get_num_threads())
        self.stats.compute_s += time.perf_counter() - t0
        return y

    def _head_rows(self, ex: Any, n: int) -> None:
        """Follower, ``CMD_HEAD_MANY``: this rank's vocabulary rows of the n normed rows in its shm
        buffer, into its output buffer, then an answer (:meth:`head_many`)."""
        from moetier.native import prefill

        H, nr, lib = self.hidden, ex.head_n[self.rank], ex.dec.lib
        prefill._declare(lib)  # mt_gemm
        x = self._tr.bulk_rows[0][:4 * n * H].view(torch.float32)
        y = self._tr.bulk_out[0][:4 * n * nr].view(torch.float32)
        t0 = time.perf_counter()
        lib.mt_gemm(ctypes.addressof(ex.head_mine), None, 0, x.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
        self.stats.compute_s += time.perf_counter() - t0
        if self._ans_buf is None:
            self._ans_buf = torch.zeros(self._answer_bytes(), dtype=torch.uint8)
        self._send_answer(self._ans_buf)
        self.stats.head_bytes += 4 * n * nr
        self.stats.meta_bytes += self.ctrl_bytes + self._answer_bytes()

    def _owner(self, layer: int, e: int) -> int:
        own = self._owners[e]
        if len(own) == 1:
            return own[0]
        # replicas: the j-th pair of (layer, e) ever routed goes to copy j mod copies (deterministic)
        j = self._rr.get((layer, e), 0)
        self._rr[(layer, e)] = j + 1
        return own[j % len(own)]

    # ----- rank 0 -----
    def _dispatch_one(self, x: torch.Tensor, ids: list[int], ws: list[float], layer: int, provider: Any,
                      glu: Any) -> torch.Tensor:
        """:meth:`dispatch` for one token (decode): the same bytes and sums, in a few torch ops.
        Per follower one control message (built with ``struct``: header, then the token's row
        and an expert id per pair) and, when it got pairs, one answer back into a receive posted
        ahead (:meth:`_post_answer`); rank 0's experts run like the single-process decode path
        while the followers compute theirs."""
        from moetier.layers.moe import expert_forward

        P, H, W, rb, k = self.world, x.shape[1], self.ctrl_bytes, self.row_bytes, len(ids)
        dest = [self._owner(layer, e) for e in ids]  # pair order
        xb = x.contiguous().view(torch.uint8)  # [1, H*bytes]
        hb = xb.shape[1]
        where: dict[int, tuple[int, int]] = {}  # pair -> (follower, its row of the answer)
        msgs, asked = [], []  # (follower, control message), followers that answer
        for r in range(1, P):
            pairs = sorted((j for j in range(k) if dest[j] == r), key=lambda j: (ids[j], j))  # by expert
            n = len(pairs)
            ba = bytearray(W)  # header, n rows (x's bytes + the expert id), zeros
            struct.pack_into("<3q", ba, 0, CMD_MOE_ONE, layer, n)
            for i, j in enumerate(pairs):
                struct.pack_into("<q", ba, HEADER + i * rb + hb, ids[j])
                where[j] = (r, i)
            buf = torch.frombuffer(ba, dtype=torch.uint8)  # [W]
            if n:
                buf[HEADER:HEADER + n * rb].view(n, rb)[:, :hb] = xb  # [n, H*bytes] <- [1, H*bytes]
                asked.append(r)
            msgs.append((r, buf))
        local = [j for j in range(k) if dest[j] == 0]
        with self._lock:  # the sends go out before rank 0 computes its share
            pending, answers = self._send_steps(msgs, asked)
            t0 = time.perf_counter()
            y: dict[int, torch.Tensor] = {}
            if local:
                provider.require(layer, sorted({ids[j] for j in local}))
                for j in local:  # [1, H] each, as the single-process decode path computes it
                    y[j] = expert_forward(x, provider.get(layer, ids[j]), glu)
            self.stats.compute_s += time.perf_counter() - t0
            self._tr.done(pending)
            got = {r: self._tr.answer(a) for r, a in answers.items()}
        back = {r: b[ANSWER_HEADER:].view(x.dtype).view(-1, H) for r, b in got.items()}  # [top-k, H]
        remote, row = len(where), H * x.element_size()
        s = self.stats
        s.meta_bytes += (P - 1) * W + remote * 8 - remote * row + len(asked) * self._answer_bytes() - \
            remote * row  # + the answers' headers and room
        s.dispatch_bytes_sent += remote * row
        s.combine_bytes_recv += remote * row
        s.remote_pairs += remote
        s.local_pairs += len(local)
        s.moe_calls += 1
        out = torch.zeros_like(x)
        for j, wj in enumerate(ws):  # the same sum, in the same order, as the single-process dispatch
            if j in y:
                out.add_(y[j], alpha=wj)
            else:
                r, i = where[j]
                out.add_(back[r][i:i + 1], alpha=wj)
        return out

    def native_one(self, dec: Any, layer: int, k: int, xp: int, provider: Any, nth: int) -> None:
        """Rank 0, native decode of one token (:meth:`ExpertParallelProvider.native_moe`, called by
        ``NativeDecoder.step`` after the native router): the messages of :meth:`_dispatch_one`
        with the float32 MoE input ``h`` as rows (``CMD_MOE_NATIVE``); rank 0 runs its own experts
        and the shared expert natively while the followers run theirs, then adds the k rows into
        the residual stream at ``xp`` with the routing weights in the single-process order
        (``mt_moe_add``): the bits of one native process."""
        P, W, h4 = self.world, self.ctrl_bytes, 4 * self.hidden
        rb = h4 + 8
        ids = dec.ids[:k]
        dest = [self._owner(layer, e) for e in ids]  # pair order
        where: dict[int, tuple[int, int]] = {}  # pair -> (follower, its row of the answer)
        msgs, asked = [], []  # (follower, control message), followers that answer
        now = time.monotonic()
        if not self._ctrl_bufs:  # one control message per follower, reused (its send is waited for below)
            bufs = {r: torch.zeros(W, dtype=torch.uint8) for r in range(1, P)}
            self._ctrl_bufs = {r: (b, b.numpy(), b.data_ptr()) for r, b in bufs.items()}
            self._told = dict.fromkeys(range(1, P), 0.0)
        for r in range(1, P):
            pairs = sorted((j for j in range(k) if dest[j] == r), key=lambda j: (ids[j], j))  # by expert
            n = len(pairs)
            if n == 0 and now - self._told[r] < self.timeout_s / 8:
                continue  # nothing for this follower (heard from rank 0 recently: no ping needed)
            self._told[r] = now
            buf, ba, base = self._ctrl_bufs[r]
            base += HEADER
            struct.pack_into("<3q", ba, 0, CMD_MOE_NATIVE, layer, n)  # header, n rows (h's bytes + the expert id)
            for i, j in enumerate(pairs):
                ctypes.memmove(base + i * rb, dec.h_ptr, h4)
                struct.pack_into("<q", ba, HEADER + i * rb + h4, ids[j])
                where[j] = (r, i)
            if n:
                asked.append(r)
            msgs.append((r, buf))
        local = [j for j in range(k) if dest[j] == 0]
        rows = dec.rows
        with self._lock:  # the sends go out before rank 0 computes its share
            pending, answers = self._send_steps(msgs, asked)
            t0 = time.perf_counter()
            dec.expert_rows(layer, provider, [ids[j] for j in local], True, nth)  # own share + shared expert
            self.stats.compute_s += time.perf_counter() - t0
            for s, j in enumerate(local):
                rows[j] = dec.down_ptr + s * h4
            self._tr.done(pending)
            got = {r: self._tr.answer(a) for r, a in answers.items()}
        for j, (r, i) in where.items():
            rows[j] = got[r].data_ptr() + ANSWER_HEADER + i * h4
        dec.add_rows(layer, xp, k)  # answers stay alive until here
        remote = len(where)
        s = self.stats
        s.meta_bytes += len(msgs) * W + remote * 8 - remote * h4 + len(asked) * self._answer_bytes() - remote * h4
        s.dispatch_bytes_sent += remote * h4
        s.combine_bytes_recv += remote * h4
        s.remote_pairs += remote
        s.local_pairs += len(local)
        s.moe_calls += 1

    def native_many(self, st: Any, layer: int, desc: int, d: Any, T: int, xp: int, ids: torch.Tensor,
                    w: torch.Tensor, provider: Any, nth: int) -> None:
        """Rank 0, a native multi-token step (:meth:`ExpertParallelProvider.native_many`, called by
        ``ManyStepper._experts`` after the native router; ``st`` the stepper, routing ``ids`` / ``w``
        [T, k]): each follower gets its pairs' float32 MoE inputs, each with its expert id
        (``CMD_MOE_NATIVE_MANY``, by expert then pair; :meth:`_many_send`), rank 0 runs its own
        experts natively (``mt_moe_many`` without the combine) while the followers run theirs
        (``mt_rows_many``), writes their rows into the scratch's slots, then the shared expert and
        the combine run as in one process: the bits of one native process."""
        P, k, H = self.world, ids.shape[1], self.hidden
        h4 = 4 * H
        h = st.buffers(T, k)[0]  # [T, H] the MoE inputs
        flat = ids.view(-1)  # [T*k]
        E = len(self._owners)
        if self._sole is None:  # each expert's rank when it has one copy (-1: replicas)
            self._sole = torch.tensor([o[0] if len(o) == 1 else -1 for o in self._owners], dtype=torch.long)
        dest = self._sole[flat]
        if bool((dest < 0).any()):  # replicas: the pair-order round robin of _owner
            dest = torch.tensor([self._owner(layer, e) for e in flat.tolist()], dtype=torch.long)
        order_t = torch.argsort(dest * E + flat, stable=True)  # pairs by rank, then expert, then pair
        counts = torch.bincount(dest, minlength=P).tolist()
        n0, remote = counts[0], T * k - counts[0]
        rem_t = order_t[n0:]
        send = pack(st.pair_inputs(layer, h, rem_t, k, w), flat[rem_t])  # [remote, 4H + 8], by destination rank
        y_rem = torch.empty(remote, H, dtype=torch.float32)  # the followers' outputs, by rank
        rows = [send[:0]] + list(torch.split(send, counts[1:]))
        outs = [y_rem[:0]] + list(torch.split(y_rem, counts[1:]))  # views [counts[r], H]
        mine = torch.unique(flat[order_t[:n0]]).tolist()
        per = self._many_rows_per_message()
        parts = {r: [(a, min(per, counts[r] - a)) for a in range(0, counts[r], per)] for r in range(1, P)}
        with self._lock:  # every follower's first message goes out before rank 0 computes its share
            waits = {r: self._many_send(r, layer, rows[r], outs[r], *parts[r][0]) for r in parts if parts[r]}
            t0 = time.perf_counter()
            st.local_experts(layer, provider, desc, d, T, xp, ids, w, mine, False, nth)
            self.stats.compute_s += time.perf_counter() - t0
            for r, wait in waits.items():
                for i, (a, n) in enumerate(parts[r]):
                    if i:  # a batch larger than the shared-memory buffer: one message at a time
                        wait = self._many_send(r, layer, rows[r], outs[r], a, n)
                    self._many_wait(r, wait, outs[r], a, n)
        if remote:  # into their slots of the scratch (the grouping the feed-forward call made)
            _, down, slot_of = st.buffers(T, k)
            down[slot_of[rem_t].long()] = y_rem
        st.finish_experts(layer, desc, T, xp, ids, w, nth)
        msgs = sum(len(v) for v in parts.values())
        inline = sum(n for v in parts.values() for _, n in v if n <= self.inline_rows)
        s = self.stats
        s.dispatch_bytes_sent += remote * h4
        s.combine_bytes_recv += remote * h4
        s.meta_bytes += msgs * self.ctrl_bytes + remote * 8 - inline * (h4 + 8)  # headers, ids, unused room
        s.remote_pairs += remote
        s.local_pairs += n0
        s.moe_calls += 1

    # A CMD_MOE_NATIVE_MANY message of n rows [4H + 8]: the rows travel in the control message when
    # n <= top-k, else in the follower's shared-memory buffer (shm with bulk_bytes > 0), else on
    # gloo (TAG_ROWS); the outputs [n, H] float32 come back in an answer (shm: in it when n <= top-k,
    # else in the follower's output buffer) or on gloo (TAG_COMBINE).
    def _many_rows_per_message(self) -> int:
        if self.transport == "shm" and self.bulk_bytes:
            return max(self.inline_rows, self.bulk_bytes // (4 * self.hidden + 8))
        return 1 << 62

    def _many_ways(self, n: int) -> tuple[str, str]:
        """(rows, outputs) of an n-row message: "inline" | "bulk" | "gloo" each (outputs: on gloo
        unless shm)."""
        shm = self.transport == "shm"
        way = "inline" if n <= self.inline_rows else "bulk" if shm and self.bulk_bytes else "gloo"
        return way, way if shm else "gloo"

    def _many_send(self, r: int, layer: int, rows: torch.Tensor, out: torch.Tensor, a: int, n: int) -> list[Any]:
        """Rank 0 (under ``_lock``): rows ``[a, a + n)`` of follower ``r``'s ``rows`` as one message;
        returns what :meth:`_many_wait` waits for."""
        way_in, way_out = self._many_ways(n)
        part = rows[a:a + n]
        if way_in == "bulk":  # before the control message, which publishes it
            self._tr.bulk_rows[r][:part.numel()].view(n, -1).copy_(part)
        msg = torch.zeros(self.ctrl_bytes, dtype=torch.uint8)
        struct.pack_into("<3q", msg.numpy(), 0, CMD_MOE_NATIVE_MANY, layer, n)
        if way_in == "inline":
            msg[HEADER:HEADER + part.numel()] = part.reshape(-1)
        pending = self._tr.send([(r, msg)])
        if way_in == "gloo":
            pending.append(self._p2p(part, r, TAG_ROWS, send=True, wait=False))
        if way_out == "gloo":
            pending.append(self._p2p(out[a:a + n], r, TAG_COMBINE, send=False, wait=False))
        return pending

    def _many_wait(self, r: int, pending: list[Any], out: torch.Tensor, a: int, n: int) -> None:
        """Rank 0: the outputs of follower ``r``'s message (rows ``[a, a + n)``) into ``out``."""
        for p in pending:
            self._wait(p)
        way = self._many_ways(n)[1]
        if way == "gloo":
            return
        ans = self._tr.answer(r)  # shm: the answer ring's next message
        src = ans[ANSWER_HEADER:ANSWER_HEADER + 4 * n * self.hidden] if way == "inline" else \
            self._tr.bulk_out[r][:4 * n * self.hidden]
        out[a:a + n].copy_(src.view(torch.float32).view(n, self.hidden))

    def head_many_rows(self) -> int:
        """Rows of a multi-token step's LM head per ``CMD_HEAD_MANY`` message (their normed rows and a
        follower's logits of them fit its shm buffers; 0: the head stays on rank 0)."""
        ex = self.native_exchange
        if ex is None or not self.bulk_bytes:
            return 0
        return self.bulk_bytes // (4 * max(max(ex.head_n[1:self.world]), self.hidden))

    def head_many(self, ex: Any, h: torch.Tensor, logits: torch.Tensor, nth: int) -> None:
        """Rank 0, a multi-token step's LM head split over the ranks (``ManyStepper._head``): the
        normed rows ``h`` [R, H] go to every follower's shm buffer (``CMD_HEAD_MANY``, at most
        :meth:`head_many_rows` per message), each rank computes its vocabulary rows of them
        (``mt_gemm`` on its slice: each logit one row kernel's sum, the bits of the whole head) and
        the followers' slices come back in their output buffers -> ``logits`` [R, V]."""
        R, H, P = h.shape[0], self.hidden, self.world
        lib, per = ex.dec.lib, self.head_many_rows()
        off, n = list(ex.head_off), list(ex.head_n)
        mine = torch.empty(min(per, R), n[0], dtype=torch.float32)
        with self._lock:
            for a in range(0, R, per):
                m = min(per, R - a)
                for r in range(1, P):  # the rows into the follower's buffer, then the message publishes them
                    self._tr.bulk_rows[r][:4 * m * H].view(torch.float32).view(m, H).copy_(h[a:a + m])
                    msg = torch.zeros(self.ctrl_bytes, dtype=torch.uint8)
                    struct.pack_into("<3q", msg.numpy(), 0, CMD_HEAD_MANY, 0, m)
                    self._tr.send([(r, msg)])
                t0 = time.perf_counter()
                lib.mt_gemm(ctypes.addressof(ex.head_mine), None, 0, h[a:a + m].data_ptr(), m, mine.data_ptr(), nth)
                logits[a:a + m, off[0]:off[0] + n[0]] = mine[:m]
                self.stats.compute_s += time.perf_counter() - t0
                for r in range(1, P):
                    self._tr.answer(r)
                    got = self._tr.bulk_out[r][:4 * m * n[r]].view(torch.float32).view(m, n[r])
                    logits[a:a + m, off[r]:off[r] + n[r]] = got
                self.stats.head_bytes += 4 * m * sum(n[1:])
                self.stats.meta_bytes += (P - 1) * (self.ctrl_bytes + self._answer_bytes())

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int,
                 provider: Any, glu: Any) -> torch.Tensor:
        """The expert-parallel twin of :func:`moetier.layers.moe.dispatch` (rank 0 only)."""
        if self.exchange == "replicated":
            return self._exchange(x, topk_ids, topk_weights, layer, provider, glu)
        T, k = topk_ids.shape
        if T == 1 and self.world > 1 and k <= self.inline_rows:
            return self._dispatch_one(x, topk_ids[0].tolist(), topk_weights[0].tolist(), layer, provider, glu)
        P, H = self.world, x.shape[1]
        flat = topk_ids.reshape(-1)  # [T*k]
        experts = flat.tolist()
        dest = [self._owner(layer, e) for e in experts]
        order = sorted(range(T * k), key=lambda i: (dest[i], experts[i], i))  # pairs by rank, then expert
        counts = [0] * P
        for d in dest:
            counts[d] += 1
        order_t = torch.tensor(order, dtype=torch.long)
        send = pack(x[order_t // k], flat[order_t])  # [T*k, row_bytes] uint8, by destination rank
        n0 = counts[0]
        by_rank = list(torch.split(send, counts))  # [counts[r], row_bytes] each
        inline = P == 1 or max(counts[1:]) <= self.inline_rows
        remote = T * k - n0
        y_rem = torch.empty(remote, H, dtype=x.dtype)  # [remote, H]: the followers' outputs, by rank
        with self._lock:  # sends go out and receives are posted while rank 0 computes its own share
            pending = self._send_ctrl(CMD_MOE_INLINE if inline else CMD_MOE, layer, counts,
                                      by_rank if inline else None, wait=False)
            followers = [r for r in range(1, P) if counts[r]]
            if not inline:
                pending += [self._p2p(by_rank[r], r, TAG_ROWS, send=True, wait=False) for r in followers]
            back = torch.split(y_rem, counts[1:])  # views [counts[r], H]
            pending += [self._p2p(back[r - 1], r, TAG_COMBINE, send=False, wait=False) for r in followers]
            y0 = self.compute(*unpack(by_rank[0], x.dtype), layer, provider, glu)  # [n0, H], own share
            for w in pending:
                self._wait(w)
        y_sent = torch.cat([y0, y_rem])  # [T*k, H] in send order
        row = H * x.element_size()
        s = self.stats
        s.dispatch_bytes_sent += remote * row
        s.combine_bytes_recv += remote * row
        s.meta_bytes += remote * 8 - (remote * row if inline else 0)  # ids; inline rows were counted in the control
        s.remote_pairs += remote
        s.local_pairs += n0
        s.moe_calls += 1
        y = torch.empty_like(y_sent)
        y[order_t] = y_sent  # [T*k, H] in pair order
        out = torch.zeros_like(x)
        w = topk_weights.reshape(-1)
        if T == 1:  # the same sum, in the same order, as the single-process dispatch
            for j, wj in enumerate(w.tolist()):
                out.add_(y[j : j + 1], alpha=wj)
            return out
        ref = flat.argsort(stable=True)  # single-process order: by expert, then pair
        out.index_add_(0, ref // k, y[ref] * w[ref, None])
        return out

    # ----- replicated exchange (every rank runs the model; one message per pair of ranks per MoE layer) -----
    def mirrored(self, model: Any) -> Any:
        """Rank 0: ``model.step`` that first tells every follower what to step (one control
        message: the sequences, their new tokens, the sequences gone since), so that each runs
        the same forward on its own copy of the always-on weights."""
        step = model.step

        def mirrored_step(items: Seq[tuple[Any, Any]], all_logits: bool = False) -> torch.Tensor:
            if self.world > 1:
                for _, toks in items:
                    model._ids(toks)  # bad ids: refused here, before the followers hear of the step
                self._send_step(items, all_logits)
            return step(items, all_logits)
        return mirrored_step

    def _send_step(self, items: Seq[tuple[Any, Any]], all_logits: bool) -> None:
        import weakref

        words: list[int] = []
        for seq, toks in items:
            ids = toks.reshape(-1).tolist() if isinstance(toks, torch.Tensor) else [int(t) for t in toks]
            sid = getattr(seq, "_ep_id", None)
            if sid is None:  # first seen: the followers make their copy; told when it is gone
                sid = seq._ep_id = self._next_seq
                self._next_seq += 1
                weakref.finalize(seq, self._gone, sid)
            words += [sid, seq.capacity, seq.length, len(ids), *ids]
        nf = len(self._freed)
        freed = self._freed[:nf]
        del self._freed[:nf]  # (a finalizer may append meanwhile: it stays for the next step)
        words = [nf, *freed, len(items), *words]
        n = len(words)
        msg = torch.zeros(self.ctrl_bytes, dtype=torch.uint8)
        body = torch.tensor(words, dtype=torch.long)
        msg[:HEADER] = torch.tensor([CMD_STEP, n, int(all_logits)], dtype=torch.long).view(torch.uint8)
        if n <= STEP_INLINE_WORDS:
            msg[HEADER:HEADER + 8 * n] = body.view(torch.uint8)
        with self._lock:
            works = self._tr.send([(r, msg) for r in range(1, self.world)])
            if n > STEP_INLINE_WORDS:
                works += [self._p2p(body, r, TAG_ROWS, send=True, wait=False) for r in range(1, self.world)]
            for w in works:
                self._wait(w)
        self.stats.meta_bytes += (self.world - 1) * (self.ctrl_bytes + (8 * n if n > STEP_INLINE_WORDS else 0))

    def _gone(self, sid: int) -> None:
        self._freed.append(sid)

    def _serve_replicated(self, model: Any) -> list[dict[str, Any]] | None:
        """Follower loop of the replicated exchange: run every step rank 0 runs, on copies of its
        sequences (its MoE layers exchange expert outputs with every rank)."""
        step = type(model).step.__get__(model)  # the plain step (rank 0's is mirrored)
        seqs = self._mirrors
        while True:
            cmd, n, all_logits, msg = self._recv_ctrl()
            if cmd == CMD_STOP:
                self._bye()
                return self._gather_stats()
            if cmd == CMD_PING:
                continue
            if cmd != CMD_STEP:
                raise DistributedError(f"rank {self.rank}: unexpected command {cmd} from rank 0")
            if n <= STEP_INLINE_WORDS:
                words = msg[HEADER:HEADER + 8 * n].clone().view(torch.long).tolist()
            else:
                body = torch.empty(n, dtype=torch.long)
                self._p2p(body, 0, TAG_ROWS, send=False)
                self.stats.meta_bytes += 8 * n
                words = body.tolist()
            nf = words[0]
            for sid in words[1:1 + nf]:
                seqs.pop(sid, None)
            i, items = 2 + nf, []
            for _ in range(words[1 + nf]):
                sid, cap, length, nt = words[i:i + 4]
                toks = words[i + 4:i + 4 + nt]
                i += 4 + nt
                seq = seqs.get(sid)
                if seq is None or (length == 0 and seq.length != 0):  # new, or freed and reused by rank 0
                    seq = seqs[sid] = model.new_sequence(capacity=cap)
                if seq.length != length:
                    raise DistributedError(f"rank {self.rank}: sequence {sid} has {seq.length} tokens here, "
                                           f"{length} on rank 0")
                items.append((seq, toks))
            try:
                step(items, all_logits=bool(all_logits))
            except _Enough:
                return None
            except DistributedError:
                raise
            except Exception as e:  # the same forward fails the same way on rank 0, which reports it
                print(f"moetier: rank {self.rank}: step failed as on rank 0: {_first_line(e)}", file=sys.stderr)

    def _slot_bytes(self) -> int:
        return SLOT_HEADER + self.inline_rows * self.hidden * torch.empty(0, dtype=self.dtype).element_size()

    def _post_slots(self) -> None:
        """Post the receive of every peer's next exchange message (fixed size: header + top-k rows).
        gloo holds a send until the receiver has announced its receive (NOTIFY_RECV_READY from
        the peer's loop thread); posted one exchange ahead, the announcement is always there
        when the peer sends (measured round trip ~130 us vs 0.4-3.7 ms posted when needed)."""
        W = self._slot_bytes()
        self._slots = {}
        for r in range(self.world):
            if r != self.rank:
                buf = torch.empty(W, dtype=torch.uint8)
                self._slots[r] = (buf, self._p2p(buf, r, TAG_EXCHANGE, send=False, wait=False))

    def _bye(self) -> None:
        """Replicated, at stop: answer every peer's posted slot (header n = -1) and take ours."""
        W = self._slot_bytes()
        msg = torch.zeros(W, dtype=torch.uint8)
        struct.pack_into("<2q", msg.numpy(), 0, -1, 0)
        with self._lock:
            sends = [self._p2p(msg, r, TAG_EXCHANGE, send=True, wait=False) for r in self._slots]
            for _, w in self._slots.values():
                self._wait(w)
            for w in sends:
                self._wait(w)
        self._slots = {}

    def _exchange(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int,
                  provider: Any, glu: Any) -> torch.Tensor:
        """Replicated MoE layer (every rank, same x and routing): run this rank's pairs, send
        their unweighted outputs to every other rank and receive theirs (one message each way
        per pair of ranks: a fixed-size slot of up to top-k rows, the rest of a larger batch's rows
        in a second message), then sum all pairs exactly like the single-process dispatch."""
        from moetier.layers.moe import expert_forward

        if self._calls_left is not None:
            if self._calls_left <= 0:
                raise _Enough
            self._calls_left -= 1
        T, k = topk_ids.shape
        P, me, H, cap = self.world, self.rank, x.shape[1], self.inline_rows
        experts = topk_ids.reshape(-1).tolist()  # [T*k], pair order
        dest = [self._owner(layer, e) for e in experts]  # identical on every rank (same routing, same counters)
        check = hash((T, *experts))  # the routing check: every rank must have routed alike
        if T == 1:  # decode: each rank's pairs in pair order
            pairs = [[j for j in range(k) if dest[j] == r] for r in range(P)]
        else:  # by expert, then pair: the single-process dispatch's row batches
            order = sorted(range(T * k), key=lambda i: (dest[i], experts[i], i))
            pairs, o = [], 0
            for r in range(P):
                n = dest.count(r)
                pairs.append(order[o:o + n])
                o += n
        mine, row = pairs[me], H * x.element_size()
        W = SLOT_HEADER + cap * row
        send = torch.empty(SLOT_HEADER + max(len(mine), cap) * row, dtype=torch.uint8)
        struct.pack_into("<2q", send.numpy(), 0, len(mine), check)
        ys = send[SLOT_HEADER:].view(x.dtype).view(-1, H)  # [max(mine, cap), H]: outputs written in place
        with self._lock:
            slots = self._slots
            self._post_slots()  # the next exchange's, before this one's sends go out
            more = {r: torch.empty((len(pairs[r]) - cap) * row, dtype=torch.uint8) for r in slots
                    if len(pairs[r]) > cap}  # a batch's rows beyond the slot: both sides know how many
            pending = [self._p2p(b, r, TAG_ROWS, send=False, wait=False) for r, b in more.items()]
            t0 = time.perf_counter()
            if mine:
                if T == 1:
                    provider.require(layer, sorted({experts[j] for j in mine}))
                    for i, j in enumerate(mine):  # [1, H] each, as the single-process decode path computes it
                        ys[i:i + 1] = expert_forward(x, provider.get(layer, experts[j]), glu)
                else:
                    idx = torch.tensor(mine, dtype=torch.long)
                    ys[:len(mine)] = _original_dispatch_k1(x[idx // k], topk_ids.reshape(-1)[idx], layer, provider,
                                                           glu)
            ys[len(mine):].zero_()  # the slot's unused rows
            self.stats.compute_s += time.perf_counter() - t0
            pending += [self._p2p(send[:W], r, TAG_EXCHANGE, send=True, wait=False) for r in slots]
            if len(mine) > cap:
                pending += [self._p2p(send[W:], r, TAG_ROWS, send=True, wait=False) for r in slots]
            for _, w in slots.values():
                self._wait(w)
            for w in pending:
                self._wait(w)
        rows = {me: ys[:len(mine)]}
        for r, (b, _) in slots.items():
            n, got = struct.unpack_from("<2q", b.numpy(), 0)
            if n != len(pairs[r]) or got != check:
                self.fault = (f"rank {self.rank}: rank {r} routed layer {layer} differently (its forward diverged: "
                              "start every rank with the same --threads and options)")
                raise DistributedError(self.fault)
            y = b[SLOT_HEADER:].view(x.dtype).view(cap, H)[:min(n, cap)]
            rows[r] = y if r not in more else torch.cat([y, more[r].view(x.dtype).view(-1, H)])
        s = self.stats
        s.combine_bytes_sent += len(slots) * len(mine) * row
        s.combine_bytes_recv += sum(rows[r].shape[0] for r in slots) * row
        s.meta_bytes += len(slots) * (W - min(len(mine), cap) * row)  # sent: headers and unused slot rows
        s.local_pairs += len(mine)
        s.remote_pairs += T * k - len(mine)
        s.moe_calls += 1
        out = torch.zeros_like(x)
        if T == 1:  # the same sum, in the same order, as the single-process decode
            at = {j: (r, i) for r in range(P) for i, j in enumerate(pairs[r])}
            for j, wj in enumerate(topk_weights[0].tolist()):
                r, i = at[j]
                out.add_(rows[r][i:i + 1], alpha=wj)
            return out
        y = torch.empty(T * k, H, dtype=x.dtype)
        y[torch.tensor([j for r in range(P) for j in pairs[r]], dtype=torch.long)] = torch.cat(
            [rows[r] for r in range(P)])  # [T*k, H] in pair order
        w = topk_weights.reshape(-1)
        ref = topk_ids.reshape(-1).argsort(stable=True)  # single-process order: by expert, then pair
        out.index_add_(0, ref // k, y[ref] * w[ref, None])
        return out

    def stop(self) -> list[dict[str, Any]]:
        """Rank 0: release the followers; returns every rank's stats (index = rank)."""
        self._stop_heartbeat()
        self._send_ctrl(CMD_STOP)
        if self._slots:
            self._bye()
        if self.exchange == "direct":  # every follower answers the stop
            self.stats.meta_bytes += self._tr.finish() * self._answer_bytes()
        return self._gather_stats()

    # ----- ranks 1..P-1 -----
    def serve(self, model: Any, max_calls: int | None = None) -> list[dict[str, Any]] | None:
        """Follower loop: serve rank 0's MoE layers until it says stop (then returns the
        gathered stats), or after ``max_calls`` layers (returns None)."""
        if self.exchange == "replicated":
            self._calls_left = max_calls
            return self._serve_replicated(model)
        blocks = model.net.moe_blocks()
        provider = model.provider.local if isinstance(model.provider, ExpertParallelProvider) else model.provider
        calls = 0
        first = min(blocks)
        ex = self.native_exchange
        while max_calls is None or calls < max_calls:
            if ex is not None:  # rank 0's native decode messages, answered in C until another kind arrives
                calls += ex.serve(-1 if max_calls is None else max_calls - calls, torch.get_num_threads())
                if max_calls is not None and calls >= max_calls:
                    break
            cmd, layer, n, msg = self._recv_ctrl(post_next=False)
            if cmd == CMD_STOP:  # the answer rank 0 has posted a receive for, then the figures
                self._send_answer(torch.zeros(self._answer_bytes(), dtype=torch.uint8))
                self.stats.meta_bytes += self._answer_bytes()
                return self._gather_stats()
            one = cmd in (CMD_MOE_ONE, CMD_MOE_NATIVE)  # decode of one token: an answer
            if not one or n == 0:  # (an answer goes out first: see below)
                self._post_ctrl()
            if cmd == CMD_PING:
                continue
            if cmd == CMD_HEAD_MANY and ex is not None and self.bulk_bytes:  # rows of a multi-token step's head
                self._head_rows(ex, n)
                continue
            if cmd not in (CMD_MOE, CMD_MOE_INLINE, CMD_MOE_ONE, CMD_MOE_NATIVE, CMD_MOE_NATIVE_MANY) or \
                    layer not in blocks or (cmd in (CMD_MOE_NATIVE, CMD_MOE_NATIVE_MANY) and self.native is None):
                raise DistributedError(f"rank {self.rank}: unexpected command {cmd} for layer {layer} from rank 0")
            if layer == first and hasattr(provider, "on_step"):  # a tiered provider counts steps (its policy)
                provider.on_step(n, decode=False)
            if cmd == CMD_MOE_NATIVE:  # one token's float32 row n times, each with another expert
                ans = self._compute_native(msg, n, layer, provider)
                row = 4 * self.hidden
            elif cmd == CMD_MOE_ONE:  # one token's row n times, each with another expert
                ans = self._compute_one(msg, n, layer, provider, blocks[layer].glu)  # the answer's bytes
                row = self.row_bytes - 8
            elif cmd == CMD_MOE_NATIVE_MANY:  # float32 rows, each with its expert (a multi-token native step)
                row = 4 * self.hidden
                way_in, way_out = self._many_ways(n)
                inline = way_in == "inline"
                if inline:
                    recv = msg[HEADER:HEADER + n * (row + 8)].view(n, row + 8)
                elif way_in == "bulk":
                    recv = self._tr.bulk_rows[0][:n * (row + 8)].view(n, row + 8)
                else:
                    recv = torch.empty(n, row + 8, dtype=torch.uint8)
                    if n:
                        self._p2p(recv, 0, TAG_ROWS, send=False)
                y = self._compute_native_many(recv, layer, provider)
                if n and way_out != "gloo":  # an answer on the ring (its rows in it, or in the output buffer)
                    if self._ans_buf is None:
                        self._ans_buf = torch.zeros(self._answer_bytes(), dtype=torch.uint8)
                    ans = self._ans_buf
                    dst = ans[ANSWER_HEADER:ANSWER_HEADER + n * row] if way_out == "inline" else \
                        self._tr.bulk_out[0][:n * row]
                    dst.view(torch.float32).view(n, self.hidden).copy_(y)
                    self._send_answer(ans)
            else:
                if cmd == CMD_MOE_INLINE:
                    recv = msg[HEADER:HEADER + n * self.row_bytes].view(n, self.row_bytes)
                else:
                    recv = torch.empty(n, self.row_bytes, dtype=torch.uint8)
                    if n:
                        self._p2p(recv, 0, TAG_ROWS, send=False)
                x, e = unpack(recv, self.dtype)
                with torch.inference_mode():
                    y = self.compute(x, e, layer, provider, blocks[layer].glu)
                row = self.row_bytes - 8
            if one and n:  # into the receive rank 0 posted ahead; then our next one
                self._send_answer(ans)
                self._post_ctrl()
            elif n and not (cmd == CMD_MOE_NATIVE_MANY and way_out != "gloo"):  # rank 0 posted a receive for these
                self._p2p(y.contiguous(), 0, TAG_COMBINE, send=True)
            s = self.stats
            s.dispatch_bytes_recv += n * row
            s.combine_bytes_sent += n * row
            counted = cmd in (CMD_MOE_INLINE, CMD_MOE_ONE, CMD_MOE_NATIVE) or (cmd == CMD_MOE_NATIVE_MANY and inline)
            s.meta_bytes += n * 8 - (n * row if counted else 0) + \
                (self._answer_bytes() - n * row) * (one and n > 0)  # the answer's header and room
            s.local_pairs += n
            s.moe_calls += 1
            calls += 1
        return None

    def _gather_stats(self) -> list[dict[str, Any]]:
        self.stats.cpu_s = time.process_time()
        mine = self.stats.vector()
        got = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            dist.all_gather(got, mine)
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {self.rank}: gathering the ranks' figures failed "
                                   f"({_first_line(e)})") from None
        return [EPStats.from_vector(g.tolist()) for g in got]


class ExpertParallelProvider:
    """A rank's ExpertProvider: its own experts (``local``) plus the group that reaches the
    others. Blocks holding it dispatch through :meth:`EPGroup.dispatch` (see :func:`install`)."""

    stable_gets = True

    def __init__(self, local: Any, group: EPGroup):
        self.local, self.group = local, group

    def require(self, layer: int, expert_ids: Seq[int]) -> None:
        self.local.require(layer, expert_ids)

    def get(self, layer: int, expert: int) -> Any:
        return self.local.get(layer, expert)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int,
                 glu: Any) -> torch.Tensor:
        return self.group.dispatch(x, topk_ids, topk_weights, layer, self.local, glu)

    def native_moe(self, dec: Any, layer: int, k: int, xp: int, nth: int) -> None:
        """``NativeDecoder.step``'s hook: this layer's routed experts (routing in ``dec.ids`` /
        ``dec.w``) and shared expert, added into the residual stream at ``xp`` (:meth:`EPGroup.native_one`)."""
        self.group.native_one(dec, layer, k, xp, self.local, nth)

    def native_many(self, st: Any, layer: int, desc: int, d: Any, T: int, xp: int, ids: torch.Tensor,
                    w: torch.Tensor, nth: int) -> None:
        """``ManyStepper._experts``'s hook (prefill, batched steps): this layer's routed experts and
        shared expert for the ``T`` tokens, added into the residual stream at ``xp`` (:meth:`EPGroup.native_many`)."""
        self.group.native_many(st, layer, desc, d, T, xp, ids, w, self.local, nth)

    @property
    def metrics(self) -> EPMetrics:
        """This rank's counters next to the planner's formula (the server's /metrics reads it)."""
        return EPMetrics(self.group)


@dataclass
class EPMetrics:
    group: EPGroup

    def to_dict(self) -> dict[str, Any]:
        from moetier.planner.cluster import direct_remote_pairs, ep_rows_per_token, pair_bytes

        g, s = self.group, self.group.stats
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(getattr(g, "dtype", None), "fp32")
        if getattr(g, "native", None) is not None:  # decode steps move the native float32 rows
            dt = "fp32"
        pairs = s.remote_pairs + s.local_pairs
        k = getattr(g, "inline_rows", 1)
        return {"expert_parallel": {
            **{f.name: getattr(s, f.name) for f in fields(s)}, "ranks": g.world, "rank": g.rank,
            "exchange": g.exchange, "replicated_exchange": int(g.exchange == "replicated"),
            "transport": g.transport, "shm_transport": int(g.transport == "shm"),
            "native_exchange": int(g.native_exchange is not None), "native_exchange_why": g.native_exchange_why,
            "planner_rows_per_token_total": ep_rows_per_token(g.exchange, k, g.world)["total"],
            "planner_pair_bytes": pair_bytes(getattr(g, "hidden", 0), dt),
            "planner_remote_pairs_per_token": direct_remote_pairs(k, g.world)[0],
            "measured_remote_pairs_per_token": s.remote_pairs * k / pairs if pairs else 0.0}}


def env_rank() -> tuple[int, int] | None:
    """(rank, world size) from torchrun's environment, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise DistributedError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r}: "
                               "expected integers (as set by torchrun)") from None


def cpu_slice(cpus: Seq[int], local_rank: int, local_world: int) -> list[int] | None:
    """The CPUs of local rank ``local_rank`` of ``local_world`` ranks sharing ``cpus``: disjoint,
    contiguous equal slices (the remainder to the last ranks' neighbours: none), or None when
    there are fewer CPUs than local ranks (then nobody is pinned)."""
    cpus = sorted(cpus)
    if local_world <= 1 or not 0 <= local_rank < local_world or len(cpus) < local_world:
        return None
    per = len(cpus) // local_world
    return cpus[local_rank * per:(local_rank + 1) * per]


def pin_local_rank() -> list[int] | None:
    """Pin this rank to its own slice of the CPUs it may use (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``,
    as torchrun and ``--ep P`` set them; ``MOETIER_EP_PIN=0``: no). Ranks on one machine then do not
    preempt each other's threads: each wake-up of a rank (a message arrived) otherwise lands on
    whichever core the scheduler picks, often the one the other rank is computing on (measured,
    bench/bench_ep.py loopback: 2-3x less wall time per decode step with 2 ranks on 2 cores)."""
    if os.environ.get("MOETIER_EP_PIN", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        lr, lw = int(os.environ.get("LOCAL_RANK", "")), int(os.environ.get("LOCAL_WORLD_SIZE", ""))
    except ValueError:
        return None
    global _pinned
    mine = cpu_slice(os.sched_getaffinity(0), lr, lw)
    if mine is not None:
        os.sched_setaffinity(0, mine)
        _pinned = mine
    return mine


_pinned: list[int] | None = None  # this rank's CPUs once :func:`pin_local_rank` pinned it


def pinned_cpus() -> list[int] | None:
    return _pinned


def init(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the gloo process group from the torchrun environment (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE), after pinning this rank to its share of the machine's CPUs (:func:`pin_local_rank`).
    ``timeout_s`` (default ``MOETIER_EP_START_TIMEOUT`` or 600 s) bounds the start-up
    collectives (joining, the hash check, waiting for every rank to load); the per-step
    messages have their own, shorter timeout (:class:`EPGroup`, ``MOETIER_EP_TIMEOUT``)."""
    rw = env_rank()
    if rw is None:
        raise DistributedError("--ep auto: RANK / WORLD_SIZE are not set (start with torchrun, or use --ep P "
                               "to spawn P local ranks)")
    t = timeout_s if timeout_s is not None else float(os.environ.get("MOETIER_EP_START_TIMEOUT",
                                                                      DEFAULT_START_TIMEOUT_S))
    pin_local_rank()  # before any compute thread starts (they inherit the mask)
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", rank=rw[0], world_size=rw[1], timeout=timedelta(seconds=t))
        except (RuntimeError, ValueError, dist.DistBackendError) as e:
            raise DistributedError(f"rank {rw[0]}: could not join the process group at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                                   f"({_first_line(e)})") from None
    return rw


def exit_after_fault(message: str, code: int = 2) -> None:
    """Print one line and leave at once: a process whose gloo group broke must not run the
    group's destructors (they abort on pending operations)."""
    import sys

    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(code)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
