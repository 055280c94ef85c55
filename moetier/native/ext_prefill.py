"""Many tokens per native call for the extended decoders (gpt-oss, Llama-4; ``csrc/ext_many.c``):
prefill and batched steps of :class:`~moetier.native.gpt_oss.ExtDecoder`, the design of
:mod:`moetier.native.prefill` on its ``OssDesc`` layers.

One flat token batch (a prompt's T causal positions, one new token of each of N sequences, or a
mix) runs layer by layer: the norm and the q / k / v products (with biases) for all the tokens at
once (``mt_gemm``), per token the rope / L2 norm / temperature and the KV write into its own
sequence's cache, attention per (token, head) with the head's sink and the layer's sliding window
or attention chunk, o_proj; the router per token, then the tokens grouped by expert (each expert's
weights, MXFP4 included, read once per call for all its tokens). Experts come from the model's
``ExpertProvider`` as on the torch path (``require`` the layer's unique experts, then ``get``; one
expert per native call when the provider may recycle a slot on the next ``get``).

Exactness: every token goes through the single-token step's arithmetic (``csrc/ext.h``: the same
row kernels, attention head, top-k and activation, the shared expert then the routed experts
added in top-k order), so a prefill or a batch gives bit for bit the logits of stepping the same
tokens one at a time, whatever the thread count or the batch mates.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from moetier.layers.attention import Sequence, cache_reserve
from moetier.native import prefill
from moetier.native.prefill import ManyStepper

if TYPE_CHECKING:
    from moetier.native.gpt_oss import ExtDecoder


def _declare(lib: ctypes.CDLL) -> None:
    prefill._declare(lib)  # mt_embed_many, mt_head_many, mt_many_new
    if getattr(lib, "_ext_many_declared", False):
        return
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    sigs = {
        "mt_ext_many_new": (P, [L, L, L, L, L, L, L]),
        "mt_ext_many_free": (None, [P]),
        "mt_ext_attention_many": (I, [P, P, I, L, P, P, P, P, P, P, P, P, I]),
        "mt_ext_route_many": (None, [P, P, I, L, P, P, I]),
        "mt_ext_moe_many": (I, [P, P, I, L, P, P, P, I, P, P, P, P, P, P, I, I]),
        "mt_ext_rows_many": (I, [P, P, I, L, P, P, I, P, P, P, P, P, P, P, I]),
        "mt_ext_many_bufs": (None, [P, P, P, P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib._ext_many_declared = True


class ExtManyStepper(ManyStepper):
    """Multi-token steps for one :class:`ExtDecoder` (its descriptors and rope); batching,
    splitting into calls of at most ``prefill.MAX_CALL_TOKENS`` tokens and the checks are
    :class:`ManyStepper`'s."""

    def __init__(self, dec: ExtDecoder):  # not ManyStepper.__init__ (LayerDesc sizes)
        self.dec, self.lib = dec, dec.lib
        _declare(self.lib)
        descs = dec.descs
        ldq = max((d.nh + 2 * d.nkv) * d.D for d in descs)
        qdim = max(d.nh * d.D for d in descs)
        E = max([d.E for d in descs] + [1])
        topk = max([d.topk for d in descs] + [1])
        inter = max([d.I for d in descs] + [1])
        shared = max([d.SI for d in descs] + [1])
        self.m = self.lib.mt_many_new(dec.H, 1, 1, 1, 1, 1, 1)  # the head's buffers (mt_head_many)
        self.x_m = self.lib.mt_ext_many_new(dec.H, ldq, qdim, E, topk, inter, shared)
        if not self.m or not self.x_m:
            raise MemoryError("native prefill: could not allocate scratch buffers")
        self.ex_ids = (ctypes.c_int64 * E)()
        self.gu, self.up, self.gb, self.dn, self.db = ((ctypes.c_void_p * E)() for _ in range(5))
        self.tables = (self.ex_ids, self.gu, self.up, self.gb, self.dn, self.db)

    def __del__(self) -> None:
        lib, xm = getattr(self, "lib", None), getattr(self, "x_m", None)
        if lib is not None and xm:
            lib.mt_ext_many_free(xm)
            self.x_m = None
        super().__del__()

    def _call(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool) -> torch.Tensor:
        """One native call per layer piece for ``items`` (each sequence at most once, non-empty)."""
        dec, lib = self.dec, self.lib
        H, nth = dec.H, torch.get_num_threads()
        toks, pos, seq_of, last = [], [], [], []
        start = 0
        for s, (seq, t) in enumerate(items):
            n = t.shape[0]
            toks.append(t)
            pos.append(torch.arange(seq.length, seq.length + n))
            seq_of.append(torch.full((n,), s, dtype=torch.int32))
            start += n
            last.append(start - 1)
        T, S = start, len(items)
        tokens = torch.cat(toks).to(torch.int64).contiguous()
        positions = torch.cat(pos).to(torch.int64).contiguous()  # C long
        seqs = torch.cat(seq_of).contiguous()
        cos, sin = dec.rotary.table(int(positions.max()) + 1, torch.float32)  # [top, D]
        x = torch.empty(T, H, dtype=torch.float32)  # residual stream [T, H]
        lib.mt_embed_many(dec.emb, T, tokens.data_ptr(), x.data_ptr())
        kp, vp, caps = (ctypes.c_void_p * S)(), (ctypes.c_void_p * S)(), (ctypes.c_long * S)()
        for i, layer in enumerate(dec.net.layers):
            for s, (seq, t) in enumerate(items):  # every position of this batch reserved
                K, V = cache_reserve(seq, i, dec.kv_like[i], seq.length + t.shape[0])
                kp[s], vp[s], caps[s] = K.data_ptr(), V.data_ptr(), K.shape[1]
            self._layer(i, layer, T, x, (positions.data_ptr(), seqs.data_ptr()), kp, vp, caps, cos, sin, nth)
        for seq, t in items:
            seq.length += t.shape[0]
        rows = torch.arange(T, dtype=torch.int32) if all_logits else torch.tensor(last, dtype=torch.int32)
        return self._head(rows, x, nth)

    def _layer(self, i: int, layer: Any, T: int, x: torch.Tensor, args: tuple[int, int], kp: Any, vp: Any,
               caps: Any, cos: torch.Tensor, sin: torch.Tensor, nth: int) -> None:
        """Layer ``i`` for the batch: attention, hooks, shared expert / dense MLP, router, experts."""
        dec, lib, net = self.dec, self.lib, self.dec.net
        dt, desc, d, M = dec.dt, dec.desc_ptrs[i], dec.descs[i], self.x_m
        xp = x.data_ptr()
        if lib.mt_ext_attention_many(desc, M, dt, T, xp, *args, kp, vp, caps, cos.data_ptr(), sin.data_ptr(), nth):
            raise MemoryError(f"native prefill: out of memory in layer {i} attention ({T} tokens)")
        norm = layer.post_attention_layernorm
        if norm._forward_pre_hooks:
            h = x.to(net.dtype)
            for hook in list(norm._forward_pre_hooks.values()):
                hook(norm, (h,))
        none = (None,) * 6  # experts, gate, up, gate_up bias, down, down bias
        if not d.E:  # a dense layer (Llama-4)
            if lib.mt_ext_moe_many(desc, M, dt, T, xp, None, None, 0, *none, 1, nth):
                raise MemoryError(f"native prefill: out of memory in layer {i} MLP ({T} tokens)")
            return
        k = d.topk
        ids = torch.empty(T, k, dtype=torch.int64)
        w = torch.empty(T, k, dtype=torch.float32)
        lib.mt_ext_route_many(desc, M, dt, T, ids.data_ptr(), w.data_ptr(), nth)
        self._experts(i, layer.mlp, desc, d, T, xp, ids, w, nth)

    # ManyStepper's expert calls over this stepper's ext_many scratch and oss descriptors
    def _fill(self, j: int, i: int, e: int, d: Any, provider: Any) -> None:
        dec = self.dec
        self.ex_ids[j] = e
        self.gu[j], self.up[j], self.gb[j], self.dn[j], self.db[j] = dec.experts.get(provider.get(i, e), i, e, dec.H,
                                                                                     d.I, dec.dtype)

    def _moe(self) -> tuple[Any, int]:
        return self.lib.mt_ext_moe_many, self.x_m

    def _rows(self) -> Any:
        return self.lib.mt_ext_rows_many

    def _bufs(self) -> Any:
        return self.lib.mt_ext_many_bufs

    def ffn_desc(self, i: int) -> tuple[int, Any]:
        return self.dec.desc_ptrs[i], self.dec.descs[i]

    def pair_inputs(self, i: int, h: torch.Tensor, pairs: torch.Tensor, k: int, w: torch.Tensor) -> torch.Tensor:
        """Llama-4 (the routing weight on the expert input): h[t] * w[t, j], the product
        ``mt_ext_moe_many`` forms for the slot; else the token's row."""
        x = h[pairs // k]
        return x * w.view(-1)[pairs, None] if self.dec.descs[i].scale_input else x
