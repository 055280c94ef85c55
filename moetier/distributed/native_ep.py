"""The ``direct`` exchange inside the native decode step, over shared memory
(moetier/native/csrc/ep.c; docs/expert-parallel.md, "Native exchange").

With the shm transport, native decode and this rank's experts in RAM, rank 0's whole decode step
(``mt_step``) runs each MoE layer's exchange itself (``mt_ep_moe``: the followers' rows written
into their control rings, its own experts and the shared expert computed, the answers awaited,
the rows added in the single-process order), and a follower answers rank 0's decode messages
in a C loop (``mt_ep_serve``, rows computed straight into the answer's slot), returning to
:meth:`moetier.distributed.executor.EPGroup.serve` for any other message. The messages and
the ring protocol are those of the Python path (:meth:`EPGroup.native_one`,
:meth:`EPGroup._compute_native`, :mod:`moetier.distributed.shm`), and a ring's counters live in
one :class:`~moetier.distributed.shm.RingState` both ends use, so steps may alternate between
the two paths (a router observer sends rank 0 back to the Python path) and either end of a ring
may be Python or C. Same rows, same sums in the same order: bit-identical to one native process.

Waiting, liveness and the timeout follow :meth:`moetier.distributed.shm.Ring._await`: C polls
and sleeps on the futex, and every 20 ms calls back into Python (:meth:`NativeExchange._check`),
which checks the peer process and the step timeout. Counters (bytes, pairs, seconds) are kept in
the C state and folded into the group's :class:`~moetier.distributed.executor.EPStats` after each
call, with the same formulas as the Python path (the planner's byte count is asserted against
them). ``MOETIER_EP_NATIVE_EXCHANGE=0`` keeps the Python path (A/B in bench/bench_ep.py).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from moetier.distributed.shm import Ring, ShmError
from moetier.native.weights import describe, rows

E_SEQ, E_CHECK, E_EXPERT = 1, 2, 3  # csrc/ep.h: MT_EP_E_*
STEP_FAILED = -2000  # mt_step, mt_mla_layers, mt_ep_head: the exchange failed (csrc/ep.h: MT_EP_FAILED)
CHECK_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_double)

# EPState counter -> EPStats field (folded after every call)
FOLD = (("comm_s", "comm_s"), ("compute_s", "compute_s"), ("collectives", "collectives"),
        ("meta_bytes", "meta_bytes"), ("dispatch_sent", "dispatch_bytes_sent"),
        ("dispatch_recv", "dispatch_bytes_recv"), ("combine_sent", "combine_bytes_sent"),
        ("combine_recv", "combine_bytes_recv"), ("remote_pairs", "remote_pairs"), ("local_pairs", "local_pairs"),
        ("moe_calls", "moe_calls"), ("native_calls", "native_calls"), ("sleeps", "sleeps"),
        ("head_bytes", "head_bytes"))


class EPState(ctypes.Structure):
    """Mirror of ``mt_ep`` in moetier/native/csrc/ep.h (keep the field order in sync)."""

    _fields_ = [
        ("world", ctypes.c_int), ("rank", ctypes.c_int), ("H", ctypes.c_long), ("e_max", ctypes.c_long),
        ("ctrl_bytes", ctypes.c_long), ("answer_bytes", ctypes.c_long),
        ("ctrl", ctypes.c_void_p), ("ans", ctypes.c_void_p),
        ("own_n", ctypes.c_void_p), ("own", ctypes.c_void_p), ("rr", ctypes.c_void_p), ("told", ctypes.c_void_p),
        ("ping_s", ctypes.c_double), ("answers_sent", ctypes.c_int64), ("check", CHECK_FN),
        ("comm_s", ctypes.c_double), ("compute_s", ctypes.c_double),
        ("collectives", ctypes.c_int64), ("meta_bytes", ctypes.c_int64), ("dispatch_sent", ctypes.c_int64),
        ("dispatch_recv", ctypes.c_int64), ("combine_sent", ctypes.c_int64), ("combine_recv", ctypes.c_int64),
        ("remote_pairs", ctypes.c_int64), ("local_pairs", ctypes.c_int64), ("moe_calls", ctypes.c_int64),
        ("native_calls", ctypes.c_int64), ("sleeps", ctypes.c_int64),
        ("head_split", ctypes.c_int), ("head", ctypes.c_void_p), ("head_mine", ctypes.c_void_p),
        ("head_off", ctypes.c_void_p), ("head_n", ctypes.c_void_p), ("head_bytes", ctypes.c_int64),
        ("err", ctypes.c_int), ("err_ring", ctypes.c_int), ("err_a", ctypes.c_int64), ("err_b", ctypes.c_int64),
    ]


def unavailable(group: Any, dec: Any) -> str | None:
    """Why this rank's exchange cannot run natively (None: it can)."""
    from moetier.models.base import InMemoryExpertProvider

    if os.environ.get("MOETIER_EP_NATIVE_EXCHANGE", "1").strip() == "0":
        return "off (MOETIER_EP_NATIVE_EXCHANGE=0)"
    if dec is None:
        return "no native decode"
    if not hasattr(dec, "ffn_desc_array"):  # gpt-oss / Llama-4 (csrc/sinks.c): the Python-driven exchange
        return f"{type(dec).__name__} exchanges from Python (no C exchange for its experts yet)"
    if group.transport != "shm":
        return f"the {group.transport} transport (the native exchange runs on shared memory)"
    providers = {id(b.provider) for b in dec.blocks.values()}
    provider = next(iter(dec.blocks.values())).provider if dec.blocks else None
    local = getattr(provider, "local", None)
    if len(providers) != 1 or type(local) is not InMemoryExpertProvider:
        return "this rank's experts are not all in RAM (a weight hierarchy: the Python path)"
    return None


def head_rows(V: int, world: int) -> list[int]:
    """Rows of the LM head [V, H] each rank computes (rank 0 first): ceil(V / world) each, the last
    the rest. Even, not weighted by rank 0's other work: the head runs after the layers, when every
    rank is free (weighting it against rank 0's always-on reads measured slower:
    docs/expert-parallel.md, "The LM head split over the ranks")."""
    per = -(-V // world)
    return [min(V, (r + 1) * per) - min(V, r * per) for r in range(world)]


class NativeExchange:
    """One rank's native exchange: its rings' C view, the owner table, the expert tables of the
    experts it holds, and the counters (see the module docstring)."""

    def __init__(self, group: Any, dec: Any, tables: Any):
        self.group, self.dec, self.tables = group, dec, tables
        g, tr = group, group._tr
        P, E = g.world, dec.e_max
        self.error: BaseException | None = None
        self.rings: list[Ring] = []
        self.reads: list[bool] = []  # this rank reads the ring (else writes it)
        ctrl, ans, head = (ctypes.c_void_p * P)(), (ctypes.c_void_p * P)(), (ctypes.c_void_p * P)()
        for r in sorted(tr.ctrl):
            ends = [(ctrl, tr.ctrl[r], g.rank != 0), (ans, tr.ans[r], g.rank == 0)]
            if r in tr.head:
                ends.append((head, tr.head[r], g.rank == 0))
            for arr, ring, reads in ends:
                ring.st.id = len(self.rings)
                self.rings.append(ring)
                self.reads.append(reads)
                arr[r] = ctypes.addressof(ring.st)
        # the LM head's rows split over the ranks: rank r computes [off[r], off[r] + n[r]) (set_head_split)
        counts = head_rows(dec.V, P)
        self.head_n = (ctypes.c_long * P)(*counts)
        self.head_off = (ctypes.c_long * P)(*[sum(counts[:r]) for r in range(P)])
        mine = rows(dec.head_weight, self.head_off[g.rank], self.head_n[g.rank])
        self.head_mine = describe(mine, what="output head rows", x_f32=dec.x_f32)
        g.stats.head_rows = counts[g.rank]
        own_n, own = (ctypes.c_int32 * E)(), (ctypes.c_int32 * (E * P))()
        for e, ranks in enumerate(g._owners):
            own_n[e] = len(ranks)
            for c, r in enumerate(ranks):
                own[e * P + c] = r
        self.rr = (ctypes.c_int64 * (len(dec.ffn_descs) * E))()
        self.told = (ctypes.c_double * P)()
        self.keep = (ctrl, ans, head, own_n, own)
        self.check_cb = CHECK_FN(self._check)  # held: C calls it
        self.st = EPState(world=P, rank=g.rank, H=g.hidden, e_max=E, ctrl_bytes=g.ctrl_bytes,
                          answer_bytes=g._answer_bytes(), ctrl=ctypes.addressof(ctrl), ans=ctypes.addressof(ans),
                          own_n=ctypes.addressof(own_n), own=ctypes.addressof(own),
                          rr=ctypes.addressof(self.rr), told=ctypes.addressof(self.told), ping_s=g.timeout_s / 8,
                          check=self.check_cb, head=ctypes.addressof(head), head_mine=ctypes.addressof(self.head_mine),
                          head_off=ctypes.addressof(self.head_off), head_n=ctypes.addressof(self.head_n))
        self.addr = ctypes.addressof(self.st)
        lib = dec.lib
        self._serve, self._head = lib.mt_ep_serve, lib.mt_ep_head

    @property
    def head_split(self) -> bool:
        return bool(self.st.head_split)

    def set_head_split(self, on: bool) -> None:
        """Split the LM head's rows over the ranks (every rank's exchange agreed, and each has its
        head ring): rank 0's steps then send the normed hidden state with the last MoE layer's
        messages' ring and gather the followers' logits (``mt_ep_head``)."""
        self.st.head_split = int(bool(on) and bool(self.group._tr.head))

    @classmethod
    def make(cls, group: Any, dec: Any) -> tuple[NativeExchange | None, str]:
        """(the exchange, "native") or (None, why not) for this rank."""
        why = unavailable(group, dec)
        if why is not None:
            return None, why
        local = next(iter(dec.blocks.values())).provider.local
        tables = dec.expert_tables(local, missing_ok=True)
        if tables is None:
            return None, "an expert has biases (the native MoE has none)"
        return cls(group, dec, tables), "native"

    def _check(self, ring: int, waited_s: float) -> int:
        """C's call every 20 ms of waiting: 0 to go on, 1 to stop (the error kept in ``error``)."""
        try:
            r = self.rings[ring]
            r.peer.check()
            if waited_s >= r.timeout_s:
                raise ShmError(f"shm: Timed out after {r.timeout_s:g} s waiting for rank {r.peer.rank} "
                               f"({r.what}, {'message' if self.reads[ring] else 'room'})")
        except BaseException as e:
            self.error = e
            return 1
        return 0

    def _fold(self) -> None:
        st, s = self.st, self.group.stats
        for c, py in FOLD:
            v = getattr(st, c)
            if v:
                setattr(s, py, getattr(s, py) + v)
                setattr(st, c, 0)
        self.group._last = time.monotonic()

    def _fail(self) -> None:
        """The C call failed: the group's fault (every rank exits with one line), or a
        KeyboardInterrupt caught while waiting, raised again."""
        st, e = self.st, self.error
        self.error = None
        if e is not None and not isinstance(e, ShmError):
            raise e
        if e is None:
            if st.err == E_SEQ:
                r = self.rings[st.err_ring]
                e = ShmError(f"shm {r.what}: a slot holds message {st.err_a}, expected {st.err_b} (out of sequence)")
            elif st.err == E_EXPERT:
                e = ShmError(f"rank {self.group.rank} was asked for layer {st.err_a}'s expert {st.err_b}, "
                             "which it does not hold (placement mismatch)")
            else:
                e = ShmError(f"native exchange failed (code {st.err})")
        st.err = 0
        self.group._failed(e)

    def step(self, fn: Any, *args: Any) -> int:
        """Rank 0: the whole decode step ``fn(*args)`` (``mt_step``) with its exchange, holding the
        group's lock (the heartbeat's pings use the same rings); its return code, or raises the
        group's fault."""
        from moetier.distributed.executor import DistributedError

        g = self.group
        if g.fault is not None:
            raise DistributedError(g.fault)
        with g._lock:
            try:
                rc = fn(*args)
            finally:
                self._fold()
        if rc == STEP_FAILED:
            self._fail()
        return rc

    def head(self, norm_w: int, eps: float, dt: int, scratch: int, xp: int, logits: int, nth: int) -> None:
        """Rank 0, a Python-driven step's LM head split over the ranks (``mt_ep_head``)."""
        self.step(self._head, self.addr, norm_w, eps, dt, scratch, xp, logits, nth)

    def serve(self, limit: int, nth: int) -> int:
        """A follower: answer rank 0's native decode messages until another kind arrives (left for
        the Python loop) or ``limit`` were served (< 0: no limit); returns how many were served."""
        g, dec, st = self.group, self.dec, self.st
        if g.fault is not None:
            from moetier.distributed.executor import DistributedError

            raise DistributedError(g.fault)
        st.answers_sent = g._answers_sent
        t = self.tables
        try:
            n = self._serve(self.addr, ctypes.addressof(dec.ffn_desc_array), len(dec.ffn_descs), dec.scratch, dec.dt,
                            ctypes.addressof(t[0]), ctypes.addressof(t[1]), ctypes.addressof(t[2]), limit, nth)
        finally:
            g._answers_sent = st.answers_sent
            self._fold()
        if n < 0:
            self._fail()
        return n
