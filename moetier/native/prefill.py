"""Many tokens per native call (``csrc/prefill.c``, ``csrc/gemm.c``): prefill and batched steps
for the generic decoder (the families :class:`~moetier.native.decode.NativeDecoder` covers).

One flat token batch -- a prompt (one sequence, T causal positions), one new token of each of
N sequences, or a mix -- runs layer by layer: norms and projections as multi-token products
(each weight-row block read once for all the tokens), per token the rope and the KV write in
place into its own sequence's cache, attention per (token, head) over that cache, the router
per token, then the tokens grouped by expert (each expert's weights read once per call for all
the tokens routed to it). Experts come from the model's ``ExpertProvider`` as on the torch
path (``require`` the layer's unique experts, then ``get``; one expert per native call when
the provider may recycle a slot on the next ``get``); with every expert in RAM and no hooks,
one native call runs all layers from the decoder's descriptor tables.

Exactness: every token goes through the single-token step's arithmetic (the same row kernels,
attention head, top-k and combine order), so a prefill or a batch gives bit for bit the logits
of stepping the same tokens one at a time, whatever the thread count or the batch mates.

Kernel choice, measured (2026-12-01, Zen 4, one thread, ``mt_gemm`` vs ``torch.nn.functional.linear``
on the same weights, 16-512 rows): the own products (then 2x2 register tiles for bf16 / f32 on
AVX-512; now 2 rows x 3 tokens) run 31-39 GMAC/s; torch's oneDNN bf16 GEMM 50-108 GMAC/s but on activations rounded to
bf16 (a different result from the single-token step), its f32 GEMM 31-48 GMAC/s with a
thread-count-dependent reduction order (and an f32 copy of bf16 weights). The own kernels keep the
bits above; the cost is compute-bound prefill of long prompts in bf16 (512 tokens: 0.5-0.9x the
torch path, ``bench/bench_prefill.py``), while short prompts and batched decode gain 2x or more.
2026-12-03: a bfloat16 model's products now round x to bf16 as torch's and llama.cpp's do
(``native/weights.py: describe``), in decode and here alike, so the bits above still hold; on
AVX512-BF16 CPUs (Zen 4, Sapphire Rapids; ISA ``avx512bf16``) the row kernel and a 2-row x 4-token
tile run ``vdpbf16ps``: ``mt_gemm`` on 1408 x 2048, 1 thread, 36 -> 74 GMAC/s at 64-512 tokens, with
the tile's next-block prefetch into L2 (``bench/README.md``, the MLA BF16 row). Later that day the
tile took up to 6 tokens where they fit L1 with its rows, its prefetch spread between row pairs,
tokens per pass counted on the bf16 x it reads, x rounded by vector code (``gemm.c: tile_use``):
75-80 GMAC/s at 48-512 tokens, 2048 x 1408 at 6 tokens 34 -> 55, 2048 x 10944 at 128 tokens 31 -> 48.
Quantized GGUF formats (q4_k, q6_k, q8_0: the Q4_K_M and Q8_0 files) have their own tiles next to
their row kernels (``mt_fmt.tiles``, AVX2 and AVX-512): one row for up to 4 tokens, each (row,
token) summed exactly as the row kernel sums it (factored scales included), the nibbles / codes
unpacked and converted once per 4 tokens instead of once per token. Measured (2026-12-02, Zen 4,
one thread, ``mt_gemm`` on a random 768 x 2048 matrix, T = 64 / 512), GMAC/s per token before ->
after, AVX-512: q4_k 31 / 30 -> 57 / 52, q6_k 19 / 19 -> 51 / 47, q8_0 37 / 35 -> 63 / 55; AVX2:
q4_k 20 / 20 -> 36 / 35, q6_k 11 / 12 -> 32 / 31, q8_0 23 / 22 -> 41 / 37. End to end (llama.cpp's
own files of the 2.5 GB synthetic Qwen3-MoE, one thread, best of 3, two interleaved rounds),
prefill 512 tokens: Q4_K_M 128-132 -> 184-190 tok/s, Q8_0 146-158 -> 237-240 tok/s. (8 tokens
per tile instead of 4 measured within the noise.) 2026-12-02 (issue 16, the DeepSeek-V2-Lite-shaped
GGUFs; one thread, ``mt_gemm``, CPU time, old and new library alternating in one process, load
average 11-33 from other jobs): the tile path software-prefetches the next row block (64 experts of
1408 x 2048 with ~6 tokens each were waiting on memory: q8_0 24-27 -> 46-50 GMAC/s, q4_k 44 -> 50);
q8_0 / q5_0 tiles take 2 rows per pass (each x vector loaded once for both: q8_0 1408 x 2048, 64 /
512 tokens 55 / 52 -> 65 / 66 GMAC/s); q5_0 has tiles (Q4_K_M files store 1408- and 10944-wide
``ffn_down`` as q5_0: 13-18 -> 36-45 GMAC/s); the tokens per pass are bounded so their x rows stay in
L2 (the dense layer's 10944-wide down projection: 35-37 -> 48-50 GMAC/s); a unit's tokens are split
into passes of equal size (5 tokens: 3 + 2, not 4 + a row-kernel call). The other quantized formats
still run their row kernel once per token. 2026-12-02 (branch q4kpf; ``mt_gemm``, 1 thread, best of 15
alternating with the previous library, load average 15-30 from other jobs): the blk32 digit kernels
(q5_0, mxfp4, ggml_mxfp4) take x's digits biased by 128 against the codes' signed values, the bias
share once per row chunk (6 digit vectors per chunk instead of 9): q5_0 2048 x 1408, 48 / 6 tokens
47-50 -> 54-55 GMAC/s, mxfp4 +3-5%; q4_k joins digits 2 and 3 in integer (+0-5%, within the noise).
The q4_k avx512vnni tile (~60 GMAC/s) is bound by its 18 VNNI ops per super-block and token (12
vpdpbusd for three digits, 6 vpdpwssd for the sub-block scales): without the 6 scale ops it would
run 75 (a measurement with wrong sums), and an int16 main digit against int16 scaled weights (14 VNNI
ops) measured 0.94-0.98x once the weights' scaling (vpmullw) is paid. llama.cpp's repacked q4_K x
q8_K (one int8 digit) does a third of the integer work; float32-grade activations keep this gap.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from moetier.layers.attention import Sequence, cache_reserve
from moetier.layers.mlp import GatedMLP

if TYPE_CHECKING:
    from moetier.native.decode import NativeDecoder

MAX_E = 1024  # experts per layer of the whole-step call (csrc/prefill.c: MT_MANY_MAX_E)
MAX_CALL_TOKENS = 512  # tokens per native call (longer batches: consecutive calls, same bits)
ROUTE_STRIDE = 64  # ids / weights per token and layer in the whole-step call's output (MAX_TOPK)


def _declare(lib: ctypes.CDLL) -> None:
    if getattr(lib, "_many_declared", False):
        return
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    sigs = {
        "mt_many_new": (P, [L, L, L, L, L, L, L]),
        "mt_many_free": (None, [P]),
        "mt_attention_many": (I, [P, P, I, L, P, P, P, P, P, P, P, P, I]),
        "mt_route_many": (None, [P, P, I, L, P, P, I]),
        "mt_moe_many": (I, [P, P, I, L, P, P, P, I, P, P, P, P, I, I]),
        "mt_embed_many": (None, [P, L, P, P]),
        "mt_head_many": (I, [P, P, F, I, P, L, P, P, P, I]),
        "mt_norm_many": (I, [P, F, I, P, L, P, P]),
        "mt_gemm": (None, [P, P, I, P, L, P, I]),
        "mt_layers_many": (I, [P, I, P, I, L, P, P, P, L, P, P, P, P, P, P, P, P, L, P, P, I]),
        "mt_rows_many": (I, [P, P, I, L, P, P, I, P, P, P, P, P, I]),
        "mt_many_bufs": (None, [P, P, P, P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib._many_declared = True


class ManyStepper:
    """Multi-token steps for one :class:`NativeDecoder` (its descriptors, tables and rope)."""

    def __init__(self, dec: NativeDecoder):
        self.dec, self.lib = dec, dec.lib
        _declare(self.lib)
        descs = dec.descs
        qkv_rows = max((d.nh + 2 * d.nkv) * d.D for d in descs)
        attn_dim = max(d.nh * d.D for d in descs)
        E = max([d.E for d in descs] + [1])
        topk = max([d.topk for d in descs] + [1])
        inter = max([d.I for d in descs] + [1])
        shared = max([d.SI for d in descs] + [1])
        self.m = self.lib.mt_many_new(dec.H, qkv_rows, attn_dim, E, topk, inter, shared)
        if not self.m:
            raise MemoryError("native prefill: could not allocate scratch buffers")
        self.ex_ids = (ctypes.c_int64 * E)()
        self.gu, self.up, self.dn = ((ctypes.c_void_p * E)() for _ in range(3))
        self.tables = (self.ex_ids, self.gu, self.up, self.dn)  # the feed-forward call's expert tables

    def __del__(self) -> None:
        lib, m = getattr(self, "lib", None), getattr(self, "m", None)
        if lib is not None and m:
            lib.mt_many_free(m)
            self.m = None

    def step(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool) -> torch.Tensor:
        """Run the flat batch ``items`` [(sequence, new token ids [n_i])]; advance the sequences.
        Float32 logits [sum n_i, V] with ``all_logits``, else [len(items), V] (each item's last).
        Batches of more than :data:`MAX_CALL_TOKENS` tokens run as consecutive calls of at most
        that many (each sequence's tokens in order; the same bits), bounding the scratch memory."""
        if any(t.shape[0] == 0 for _, t in items):
            raise ValueError("each item needs at least one new token")
        if len({id(seq) for seq, _ in items}) != len(items):
            raise ValueError("a sequence appears twice in one forward")
        if sum(t.shape[0] for _, t in items) <= MAX_CALL_TOKENS:
            return self._call(items, all_logits)
        out: list[torch.Tensor] = []
        piece: list[tuple[Sequence, torch.Tensor]] = []
        ends: list[bool] = []  # per piece item: it holds its item's last token
        room = MAX_CALL_TOKENS
        for seq, t in items:
            done = 0
            while done < t.shape[0]:
                n = min(room, t.shape[0] - done)
                piece.append((seq, t[done:done + n]))
                done += n
                ends.append(done == t.shape[0])
                room -= n
                if room == 0:
                    out.append(self._pick(self._call(piece, all_logits), ends, all_logits))
                    piece, ends, room = [], [], MAX_CALL_TOKENS
        if piece:
            out.append(self._pick(self._call(piece, all_logits), ends, all_logits))
        return torch.cat(out)

    @staticmethod
    def _pick(logits: torch.Tensor, ends: list[bool], all_logits: bool) -> torch.Tensor:
        """The rows of one piece the caller returns: all, or the last of each finished item."""
        return logits if all_logits else logits[[i for i, e in enumerate(ends) if e]]

    def _call(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool) -> torch.Tensor:
        """One native call for ``items`` (each sequence at most once, every item non-empty)."""
        dec, lib, net = self.dec, self.lib, self.dec.net
        dt, H, nth = dec.dt, dec.H, torch.get_num_threads()
        tokens, positions, seqs, last = self._flat(items)
        T, S = tokens.shape[0], len(items)
        top = int(positions.max()) + 1
        cos, sin = dec.rotary.table(top, torch.float32)  # [top, D]
        n_layers = len(dec.descs)
        # K / V buffers per (layer, sequence), reserved for every position of this batch
        kp, vp = (ctypes.c_void_p * (n_layers * S))(), (ctypes.c_void_p * (n_layers * S))()
        caps = (ctypes.c_long * (n_layers * S))()
        for i in range(n_layers):
            for s, (seq, t) in enumerate(items):
                K, V = cache_reserve(seq, i, dec.kv_like[i], seq.length + t.shape[0])
                kp[i * S + s], vp[i * S + s], caps[i * S + s] = K.data_ptr(), V.data_ptr(), K.shape[1]
        x = torch.empty(T, H, dtype=torch.float32)
        xp = x.data_ptr()
        lib.mt_embed_many(dec.emb, T, tokens.data_ptr(), xp)
        args = (positions.data_ptr(), seqs.data_ptr())
        observers = net.observers
        if not observers and not any(nm._forward_pre_hooks for nm in dec.norms) and dec._table() \
                and max(d.E for d in dec.descs) <= MAX_E:
            ids = torch.empty(n_layers * T * ROUTE_STRIDE, dtype=torch.int64)
            w = torch.empty(n_layers * T * ROUTE_STRIDE, dtype=torch.float32)
            gu, up, dn = dec.tables
            rc = lib.mt_layers_many(dec.desc_array, n_layers, self.m, dt, T, xp, *args, S, kp, vp, caps,
                                    cos.data_ptr(), sin.data_ptr(), gu, up, dn, dec.e_max, ids.data_ptr(),
                                    w.data_ptr(), nth)
            if rc:
                raise MemoryError(f"native prefill: out of memory (layer {-1 - rc}, {T} tokens)")
        else:
            for i, layer in enumerate(net.layers):
                self._layer(i, layer, T, x, args, S, kp, vp, caps, cos, sin, nth)
        return self._finish(items, x, last, all_logits, nth)

    @staticmethod
    def _flat(items: list[tuple[Sequence, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """The flat batch: token ids [T] int64, positions [T] int64 (C long), each token's item
        index [T] int32, and each item's last token index (a list)."""
        toks, pos, seq_of, last = [], [], [], []
        start = 0
        for s, (seq, t) in enumerate(items):
            n = t.shape[0]
            toks.append(t)
            pos.append(torch.arange(seq.length, seq.length + n))
            seq_of.append(torch.full((n,), s, dtype=torch.int32))
            start += n
            last.append(start - 1)
        return (torch.cat(toks).to(torch.int64).contiguous(), torch.cat(pos).to(torch.int64).contiguous(),
                torch.cat(seq_of).contiguous(), last)

    def _finish(self, items: list[tuple[Sequence, torch.Tensor]], x: torch.Tensor, last: list[int],
                all_logits: bool, nth: int) -> torch.Tensor:
        """Advance the sequences; the logits of every token or of each item's last."""
        for seq, t in items:
            seq.length += t.shape[0]
        rows = torch.arange(x.shape[0], dtype=torch.int32) if all_logits else torch.tensor(last, dtype=torch.int32)
        return self._head(rows, x, nth)

    def _head(self, rows: torch.Tensor, x: torch.Tensor, nth: int) -> torch.Tensor:
        """Float32 logits [R, V] of the residual stream's ``rows`` (int32) of ``x`` [T, H]. Under
        expert parallelism with the LM head split over the ranks (``distributed/native_ep.py``) each
        rank computes its vocabulary rows of the normed rows (``EPGroup.head_many``): the same bits."""
        dec, lib, R = self.dec, self.lib, rows.shape[0]
        logits = torch.empty(R, dec.V, dtype=torch.float32)
        ex = getattr(dec, "exchange", None)
        if ex is not None and ex.head_split and ex.group.head_many_rows():
            if lib.mt_norm_many(dec.norm_w, dec.norm_eps, dec.dt, self.m, R, rows.data_ptr(), x.data_ptr()):
                raise MemoryError(f"native prefill: out of memory for {R} logit rows")
            ex.group.head_many(ex, _scratch_views(lib.mt_many_bufs, self.m, dec.H, R, 0)[0], logits, nth)
        elif lib.mt_head_many(dec.norm_w, dec.out_w, dec.norm_eps, dec.dt, self.m, R, rows.data_ptr(), x.data_ptr(),
                              logits.data_ptr(), nth):
            raise MemoryError(f"native prefill: out of memory for {R} logit rows")
        return logits

    def _layer(self, i: int, layer: Any, T: int, x: torch.Tensor, args: tuple[int, int], S: int, kp: Any, vp: Any,
               caps: Any, cos: torch.Tensor, sin: torch.Tensor, nth: int) -> None:
        """Layer ``i`` for the batch, driven from Python (hooks, observers, any provider)."""
        dec, lib, net = self.dec, self.lib, self.dec.net
        dt, desc, d = dec.dt, dec.desc_ptrs[i], dec.descs[i]
        xp, o = x.data_ptr(), i * S
        sz = ctypes.sizeof(ctypes.c_void_p)
        if lib.mt_attention_many(desc, self.m, dt, T, xp, *args, ctypes.byref(kp, o * sz), ctypes.byref(vp, o * sz),
                                 ctypes.byref(caps, o * ctypes.sizeof(ctypes.c_long)), cos.data_ptr(),
                                 sin.data_ptr(), nth):
            raise MemoryError(f"native prefill: out of memory in layer {i} attention ({T} tokens)")
        norm = layer.post_attention_layernorm
        if norm._forward_pre_hooks:
            h = x.to(net.dtype)
            for hook in list(norm._forward_pre_hooks.values()):
                hook(norm, (h,))
        mlp = layer.mlp
        if type(mlp) is GatedMLP:
            if lib.mt_moe_many(desc, self.m, dt, T, xp, None, None, 0, None, None, None, None, 1, nth):
                raise MemoryError(f"native prefill: out of memory in layer {i} MLP ({T} tokens)")
            return
        k = d.topk
        ids = torch.empty(T, k, dtype=torch.int64)
        w = torch.empty(T, k, dtype=torch.float32)
        lib.mt_route_many(desc, self.m, dt, T, ids.data_ptr(), w.data_ptr(), nth)
        self._experts(i, mlp, desc, d, T, xp, ids, w, nth)

    def _experts(self, i: int, mlp: Any, desc: int, d: Any, T: int, xp: int, ids: torch.Tensor, w: torch.Tensor,
                 nth: int) -> None:
        """Layer ``i``'s routed experts (routing ``ids`` / ``w`` [T, k]) through the provider, the
        shared expert and the combine into ``x`` (``mt_moe_many`` on the layer's descriptor ``desc``).
        A provider with a ``native_many`` hook (expert parallelism) computes them across ranks."""
        net = self.dec.net
        for fn in net.observers:
            fn(i, ids.clone(), w.to(net.dtype))
        provider = mlp.provider
        native_many = getattr(provider, "native_many", None)
        if native_many is not None:
            native_many(self, i, desc, d, T, xp, ids, w, nth)
            return
        self.local_experts(i, provider, desc, d, T, xp, ids, w, sorted(set(ids.view(-1).tolist())), True, nth)

    # ----- the feed-forward's expert calls (also expert parallelism's interface: local_experts,
    # finish_experts, buffers, ffn_desc, pair_inputs, expert_rows); ExtManyStepper overrides
    # the per-stepper pieces (_fill, _moe, _rows, _bufs, ffn_desc, pair_inputs)
    def _fill(self, j: int, i: int, e: int, d: Any, provider: Any) -> None:
        """Entry ``j`` of the expert tables (``self.tables``: ids, then descriptors) = expert ``e`` of layer ``i``."""
        self.ex_ids[j] = e
        self.gu[j], self.up[j], self.dn[j] = self.dec.experts.get(provider.get(i, e), i, e, d)

    def _moe(self) -> tuple[Any, int]:
        """(the multi-token feed-forward call, its scratch)."""
        return self.lib.mt_moe_many, self.m

    def _rows(self) -> Any:
        return self.lib.mt_rows_many

    def _bufs(self) -> Any:
        return self.lib.mt_many_bufs

    def _calls(self, i: int, provider: Any, experts: list[int], d: Any, call: Any) -> int:
        """``call(n)`` with the first n table entries filled for ``experts`` of layer ``i`` (``require``,
        then ``get``): once for all when every ``get`` stays valid, else once per expert (a ``get``
        may recycle the previous one's slot; the same bits). The first nonzero return, or 0."""
        provider.require(i, experts)
        if getattr(provider, "stable_gets", False):
            for j, e in enumerate(experts):
                self._fill(j, i, e, d, provider)
            return call(len(experts))
        rc = 0
        for e in experts:
            self._fill(0, i, e, d, provider)
            rc = rc or call(1)
        return rc

    def local_experts(self, i: int, provider: Any, desc: int, d: Any, T: int, xp: int, ids: torch.Tensor,
                      w: torch.Tensor, experts: list[int], finish: bool, nth: int) -> None:
        """The feed-forward call for ``experts`` of layer ``i`` (from ``provider``), then with ``finish``
        the shared expert and the combine into ``x``. Without ``finish`` the other pairs' output rows
        may be written into the scratch (:meth:`buffers`) before :meth:`finish_experts`."""
        fn, scratch = self._moe()
        common = (desc, scratch, self.dec.dt, T, xp, ids.data_ptr(), w.data_ptr())
        if self._calls(i, provider, experts, d, lambda n: fn(*common, n, *self.tables, 0, nth)):
            raise MemoryError(f"native prefill: out of memory in layer {i} experts ({T} tokens)")
        if finish:
            self.finish_experts(i, desc, T, xp, ids, w, nth)

    def finish_experts(self, i: int, desc: int, T: int, xp: int, ids: torch.Tensor, w: torch.Tensor, nth: int) -> None:
        """The shared expert and the combine of layer ``i``'s pairs into ``x`` (every pair's output row
        in the scratch: :meth:`local_experts` without ``finish``, the rest written in)."""
        fn, scratch = self._moe()
        if fn(desc, scratch, self.dec.dt, T, xp, ids.data_ptr(), w.data_ptr(), 0, *(None,) * len(self.tables), 1,
              nth):
            raise MemoryError(f"native prefill: out of memory in layer {i} experts ({T} tokens)")

    def buffers(self, T: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the scratch after a layer's router: the MoE inputs ``h`` [T, H] float32, and after
        a feed-forward call the expert output rows [T * k, H] float32 by slot and each (token, j)'s
        slot [T * k] int32 (its grouping: experts ascending, tokens ascending within one)."""
        return _scratch_views(self._bufs(), self._moe()[1], self.dec.H, T, k)

    def ffn_desc(self, i: int) -> tuple[int, Any]:
        """Layer ``i``'s feed-forward descriptor: (its address, the ``LayerDesc``)."""
        return self.dec.ffn_desc_ptrs[i], self.dec.ffn_descs[i]

    def pair_inputs(self, i: int, h: torch.Tensor, pairs: torch.Tensor, k: int, w: torch.Tensor) -> torch.Tensor:
        """Expert parallelism: the expert input rows of layer ``i``'s (token, j) ``pairs`` (flat
        indices t * k + j) from the MoE inputs ``h`` [T, H]: the token's row."""
        return h[pairs // k]

    def expert_rows(self, i: int, provider: Any, x: torch.Tensor, ids: torch.Tensor, nth: int) -> torch.Tensor:
        """Expert parallelism's follower: rows ``x`` [n, H] float32, row r for expert ``ids[r]`` of
        layer ``i`` (held by ``provider``) -> their unweighted outputs [n, H] float32, each the bits
        rank 0's single-process call gives that (token, expert) (``mt_rows_many``)."""
        desc, d = self.ffn_desc(i)
        n = x.shape[0]
        out = torch.empty(n, self.dec.H, dtype=torch.float32)
        fn, scratch = self._rows(), self._moe()[1]
        common = (desc, scratch, self.dec.dt, n, x.data_ptr(), ids.data_ptr())
        if self._calls(i, provider, sorted(set(ids.tolist())), d,
                       lambda m: fn(*common, m, *self.tables, out.data_ptr(), nth)):
            raise MemoryError(f"native prefill: out of memory in layer {i} experts ({n} rows)")
        return out


def _scratch_views(bufs: Any, scratch: int, H: int, T: int, k: int) -> tuple[torch.Tensor, ...]:
    """``bufs`` (``mt_many_bufs`` / ``mt_ext_many_bufs``) of ``scratch`` as tensors, no copies: h [T, H]
    float32, down [T * k, H] float32, slot_of [T * k] int32."""
    h, dn, so = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    bufs(scratch, ctypes.byref(h), ctypes.byref(dn), ctypes.byref(so))

    def view(addr: int | None, n: int, ct: Any, dt: torch.dtype) -> torch.Tensor:
        return torch.frombuffer((ct * n).from_address(addr), dtype=dt) if n else torch.empty(0, dtype=dt)

    return (view(h.value, T * H, ctypes.c_float, torch.float32).view(T, H),
            view(dn.value, T * k * H, ctypes.c_float, torch.float32).view(T * k, H),
            view(so.value, T * k, ctypes.c_int32, torch.int32))
