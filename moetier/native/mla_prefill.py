"""Many tokens per native call for the DeepSeek MLA decoder (``csrc/mla_many.c``): prefill and
batched steps of :class:`~moetier.native.mla.MLADecoder` (DeepSeek-V2 / V3 / Kimi-K2).

The design of :mod:`moetier.native.prefill` for the generic families, with MLA attention: one
flat token batch (a prompt's T causal positions, one token of each of N sequences, or a mix)
runs layer by layer. Per layer one native call for the attention (``mt_mla_attention_many``:
norm; q (``q_proj``, or ``q_a_proj -> norm -> q_b_proj``) and ``kv_a_proj_with_mqa`` as
multi-token products; per token the latent norm, rope and the write of ``c_kv`` / ``k_rot``
into its own sequence's latent cache; then per run of one sequence's tokens the absorbed or the
plain form (below); o_proj as a multi-token product; residual and post-attention norm), one for
the grouped router (``mt_route_grouped_many``: a multi-token product, then the single-token top-k
selection per token), then the experts come from the provider (``require`` the layer's unique
experts, then ``get``) and ``mt_moe_many`` (prefill.c) runs them grouped by expert, plus the
shared expert or the dense MLP.

Two forms of the attention (``csrc/mla_many.c``):

- absorbed, the single-token step's: W_UK folded into the queries per (head, token block),
  latent attention per (token, 4 heads) over kv_lora_rank + rope dims per position, W_UV
  products. A single token (decode steps, alone or batched) always takes it.
- plain, DeepSeek's and vLLM's prefill: the context of a run of 2+ tokens decompressed from
  the latent cache with ``kv_b_proj`` (k_nope and v per head, float32 scratch, never kept), then
  attention per (head, 4 tokens) over qk_nope + rope and v_head dims: ~3x fewer multiply-adds
  per (token, head, position) for the price of decompressing the positions attended instead of
  absorbing the run's queries. Chosen per run when it costs fewer multiply-adds (a prompt, or a
  chunk over a context not much longer than itself); :data:`PLAIN` forces either form.

Exactness: in the absorbed form every token goes through the single-token step's code
(``csrc/mla.h``: the same post-projection, absorb, attention and top-k functions; the same row
kernels), so a prefill or a batch gives bit for bit the logits of stepping the same tokens one
at a time, whatever the thread count or the batch mates. The plain form rounds differently
(within float rounding of that: ``tests/native/test_mla_prefill.py``); its results still do not
depend on the thread count, the batch mates or how a batch is split into calls. Batches above
``prefill.MAX_CALL_TOKENS`` tokens run as consecutive calls; inside a call the absorbed form
holds latents ([heads, kv_lora_rank] per token) for 64 tokens at a time
(``csrc/mla_many.c: LATENT_CHUNK``).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from moetier.layers.attention import Sequence, cache_reserve
from moetier.layers.mlp import GatedMLP
from moetier.native import prefill
from moetier.native.prefill import ManyStepper

if TYPE_CHECKING:
    from moetier.native.mla import MLADecoder

PLAIN: bool | None = None  # the plain form: None chosen per run by cost, False never, True whenever allowed
PLAIN_MODES = {None: -1, False: 0, True: 1}


def _declare(lib: ctypes.CDLL) -> None:
    prefill._declare(lib)
    if getattr(lib, "_mla_many_declared", False):
        return
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for name, res, args in (
        ("mt_mla_many_new", P, [L, L, L, L, L, L, L]),
        ("mt_mla_many_free", None, [P]),
        ("mt_mla_attention_many", I, [P, P, P, I, L, P, P, P, P, P, P, P, I, I]),
        ("mt_route_grouped_many", I, [P, P, P, I, L, P, P, I]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    lib._mla_many_declared = True


class MLAManyStepper(ManyStepper):
    """Multi-token steps for one :class:`MLADecoder` (its descriptors, latent caches and rope)."""

    def __init__(self, dec: MLADecoder):  # not ManyStepper.__init__: that reads generic descriptors
        self.dec, self.lib = dec, dec.lib
        _declare(self.lib)
        mla, ffn = dec.mla, dec.ffn
        E = max([d.E for d in ffn] + [1])
        topk = max([d.topk for d in ffn] + [1])
        inter = max([d.I for d in ffn] + [1])
        shared = max([d.SI for d in ffn] + [1])
        self.m = self.lib.mt_many_new(dec.H, 1, 1, E, topk, inter, shared)
        self.a = self.lib.mt_mla_many_new(max(m.nh for m in mla), max(m.C for m in mla), max(m.dn for m in mla),
                                          max(m.dr for m in mla), max(m.dv for m in mla), max(m.Rq for m in mla), E)
        if not self.m or not self.a:
            raise MemoryError("native MLA prefill: could not allocate scratch buffers")
        self.ex_ids = (ctypes.c_int64 * E)()
        self.gu, self.up, self.dn = ((ctypes.c_void_p * E)() for _ in range(3))
        self.tables = (self.ex_ids, self.gu, self.up, self.dn)

    def __del__(self) -> None:
        lib, a = getattr(self, "lib", None), getattr(self, "a", None)
        if lib is not None and a:
            lib.mt_mla_many_free(a)
            self.a = None
        super().__del__()

    def _call(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool) -> torch.Tensor:
        """One native call per layer half for ``items`` (each sequence at most once, non-empty)."""
        dec, lib, net = self.dec, self.lib, self.dec.net
        dt, H, nth = dec.dt, dec.H, torch.get_num_threads()
        tokens, positions, seqs, last = self._flat(items)
        T, S = tokens.shape[0], len(items)
        cos, sin = dec.rotary.table(int(positions.max()) + 1, torch.float32)  # [top, dr]
        n_layers = len(dec.mla)
        # latent cache rows per (layer, sequence), reserved for every position of this batch
        ckv, kr = (ctypes.c_void_p * (n_layers * S))(), (ctypes.c_void_p * (n_layers * S))()
        for i in range(n_layers):
            for s, (seq, t) in enumerate(items):
                C, R = cache_reserve(seq, i, dec.kv_like[i], seq.length + t.shape[0], time_dim=0)  # [cap, C], [cap, dr]
                ckv[i * S + s], kr[i * S + s] = C.data_ptr(), R.data_ptr()
        x = torch.empty(T, H, dtype=torch.float32)  # residual stream [T, H]
        xp = x.data_ptr()
        lib.mt_embed_many(dec.emb, T, tokens.data_ptr(), xp)
        sz = ctypes.sizeof(ctypes.c_void_p)
        for i, layer in enumerate(net.layers):
            o = i * S * sz
            if lib.mt_mla_attention_many(dec.mla_ptrs[i], self.a, self.m, dt, T, xp, positions.data_ptr(),
                                         seqs.data_ptr(), ctypes.byref(ckv, o), ctypes.byref(kr, o), cos.data_ptr(),
                                         sin.data_ptr(), PLAIN_MODES[PLAIN], nth):
                raise MemoryError(f"native MLA prefill: out of memory in layer {i} attention ({T} tokens)")
            norm = layer.post_attention_layernorm
            if norm._forward_pre_hooks:
                h = x.to(net.dtype)
                for hook in list(norm._forward_pre_hooks.values()):
                    hook(norm, (h,))
            desc = dec.ffn_ptrs[i]
            if type(layer.mlp) is GatedMLP:
                if lib.mt_moe_many(desc, self.m, dt, T, xp, None, None, 0, None, None, None, None, 1, nth):
                    raise MemoryError(f"native MLA prefill: out of memory in layer {i} MLP ({T} tokens)")
                continue
            d = dec.ffn[i]
            ids = torch.empty(T, d.topk, dtype=torch.int64)
            w = torch.empty(T, d.topk, dtype=torch.float32)
            if lib.mt_route_grouped_many(dec.route_ptrs[i], self.a, self.m, dt, T, ids.data_ptr(), w.data_ptr(), nth):
                raise MemoryError(f"native MLA prefill: out of memory in layer {i} router ({T} tokens)")
            self._experts(i, layer.mlp, desc, d, T, xp, ids, w, nth)
        return self._finish(items, x, last, all_logits, nth)
