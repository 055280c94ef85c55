"""Single-token decode through the native kernels for the DeepSeek decoder (V2 / V3 / Kimi-K2).

:class:`MLADecoder` runs one new token of one sequence through a ``DeepseekV2``-style
:class:`~moetier.models.base.DecoderLM` (MLA attention, dense-first layers, grouped
top-k routing, shared experts): per layer one native call for the attention
(``csrc/mla.c: mt_mla_attention``: norm, q (``q_proj``, or ``q_a_proj -> norm -> q_b_proj``),
the latent ``c_kv`` and rotary key written into the sequence's latent cache, attention in the
latent space with W_UK folded into the query and W_UV applied to the attended latent, o_proj,
residual, post-attention norm), one for the router (``mt_route_grouped``: softmax or sigmoid
scores, greedy / group_limited_greedy / noaux_tc with the correction bias, norm_topk_prob,
routed_scaling_factor), then the routed experts come from the provider as on the torch path
and one call (``mt_moe``, shared with the generic decoder) runs them plus the shared experts;
dense layers run ``mt_dense_mlp``. The latent cache is the one the torch path keeps
(``layers/mla.py``: ``c_kv`` [L, C], ``k_rot`` [L, dr]); no step decompresses it. The absorbed
attention reads ``kv_b_proj`` as plain model-dtype rows, except a GGUF's block-type ``attn_k_b`` /
``attn_v_b`` (``layers/mla.py: SplitKVB``), whose per-head rows the absorb and W_UV read as stored
through the formats' products (no copy); another ``kv_b_proj`` stored quantized (FP8
releases, ``--quantize-all``) is dequantized once at build, exactly as the torch
path dequantizes it per use (:func:`plain_kv_b`; the ``--max-ram`` budget charges the copy). With
every expert in RAM (``InMemoryExpertProvider``), no router observer and no norm pre-hook, one
native call runs all layers (``mt_mla_layers``: the same functions in the same order, the same
bits). Prefill and batched steps (several tokens / sequences per call) run through
:meth:`MLADecoder.step_many` (``native/mla_prefill.py``, ``csrc/mla_many.c``): single tokens with
the same per-token arithmetic, a prompt's tokens in the plain (decompressed) form.

Numerics and hooks as in :mod:`moetier.native.decode` (float32 activations, one thread per
output element, router observers and post-attention-norm pre-hooks kept).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from moetier.layers.attention import Sequence, cache_reserve
from moetier.layers.mla import MLAAttention, SplitKVB
from moetier.layers.mlp import GatedMLP
from moetier.layers.moe import MoEBlock
from moetier.layers.norm import RMSNorm
from moetier.layers.routing import GroupedTopKRouter
from moetier.native.decode import (
    DT,
    MAX_TOPK,
    LayerDesc,
    ScratchHead,
    _ExpertDescs,
    _ptr,
    _silu_glu,
    _StepBase,
    _weight,
)
from moetier.native.weights import MtWeight, describe, rows
from moetier.quant import QTensor

if TYPE_CHECKING:
    from moetier.models.base import DecoderLM

METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}
MAX_GROUPS = 1024
MAX_ROPE_DIM = 512


class MlaDesc(ctypes.Structure):
    """Mirror of ``mla_desc`` in csrc/mla.h (keep the field order in sync)."""

    _fields_ = [
        ("H", ctypes.c_long), ("nh", ctypes.c_long), ("C", ctypes.c_long), ("dn", ctypes.c_long),
        ("dr", ctypes.c_long), ("dv", ctypes.c_long), ("Rq", ctypes.c_long),
        ("eps", ctypes.c_float), ("eps_lat", ctypes.c_float), ("scale", ctypes.c_float),
        ("interleaved", ctypes.c_int),
        ("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p),
        ("q_w", ctypes.c_void_p), ("qa_w", ctypes.c_void_p), ("qa_b", ctypes.c_void_p), ("qa_norm", ctypes.c_void_p),
        ("kva_w", ctypes.c_void_p), ("kva_b", ctypes.c_void_p), ("kva_norm", ctypes.c_void_p),
        ("kvb", ctypes.c_void_p), ("uv", ctypes.c_void_p), ("o_w", ctypes.c_void_p), ("o_b", ctypes.c_void_p),
        ("kvb_w", ctypes.c_void_p), ("uk", ctypes.c_void_p),
    ]


class RouteDesc(ctypes.Structure):
    """Mirror of ``route_desc`` in csrc/mla.h (keep the field order in sync)."""

    _fields_ = [
        ("E", ctypes.c_long), ("topk", ctypes.c_long), ("n_group", ctypes.c_long), ("topk_group", ctypes.c_long),
        ("sigmoid", ctypes.c_int), ("method", ctypes.c_int), ("norm_topk", ctypes.c_int),
        ("scale_after_norm", ctypes.c_int), ("scaling", ctypes.c_float),
        ("w", ctypes.c_void_p), ("corr", ctypes.c_void_p),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for name, res, args in (
        ("mt_mla_scratch_new", P, [L, L, L, L, L, L]),
        ("mt_mla_scratch_free", None, [P]),
        ("mt_mla_attention", I, [P, P, P, I, P, P, P, L, P, P, I]),
        ("mt_route_grouped", None, [P, P, I, P, P, P, P, I]),
        ("mt_mla_layers", I, [P, P, P, I, P, P, I, P, P, P, L, P, P, P, P, P, P, P, L, P, P, I]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def is_mla(net: DecoderLM) -> bool:
    return any(isinstance(layer.self_attn, MLAAttention) for layer in net.layers)


def unsupported(net: DecoderLM) -> str | None:
    """Why the MLA decoder ``net`` cannot decode natively (``None`` if it can)."""
    from moetier.models.base import DecoderLayer

    if net.dtype not in DT:
        return f"dtype {net.dtype}"
    if net.spec.hidden_act not in ("silu", "swish"):
        return f"hidden_act {net.spec.hidden_act}"
    for i, layer in enumerate(net.layers):
        if type(layer) is not DecoderLayer:
            return f"layer {i} is a {type(layer).__name__}"
        a, mlp = layer.self_attn, layer.mlp
        if type(a) is not MLAAttention:
            return f"layer {i} attention is a {type(a).__name__}"
        if a.shape.qk_rope_head_dim > MAX_ROPE_DIM or a.shape.qk_rope_head_dim % 2:
            return f"layer {i}: qk_rope_head_dim {a.shape.qk_rope_head_dim}"
        kvb = _weight(a.kv_b_proj) if not isinstance(a.kv_b_proj, SplitKVB) else None  # SplitKVB: read as stored
        if kvb is not None and not isinstance(kvb, QTensor) and kvb.dtype != net.dtype:  # QTensor: plain_kv_b
            return f"layer {i}: kv_b_proj is stored as {kvb.dtype}, not the model dtype {net.dtype}"
        if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
            return f"layer {i}: norms are not RMSNorm"
        if isinstance(mlp, MoEBlock):
            r = mlp.gate
            if type(r) is not GroupedTopKRouter:
                return f"layer {i}: router {type(r).__name__}"
            if r.top_k > MAX_TOPK:
                return f"layer {i}: top-k {r.top_k} > {MAX_TOPK}"
            if r.topk_method not in METHODS or r.scoring_func not in ("softmax", "sigmoid"):
                return f"layer {i}: routing {r.scoring_func}/{r.topk_method}"
            if r.n_group > MAX_GROUPS:
                return f"layer {i}: {r.n_group} expert groups > {MAX_GROUPS}"
            E = r.weight.shape[0]
            if r.topk_method != "greedy" and r.n_group > 1 and r.topk_group * (E // r.n_group) < r.top_k:
                # top-k then picks among masked experts, whose order torch.topk leaves unspecified
                return f"layer {i}: the {r.topk_group} kept expert groups hold fewer than top-k {r.top_k} experts"
            if not _silu_glu(mlp) or mlp.shared_expert_gate is not None:
                return f"layer {i}: expert activation is not SiLU-gated"
            sh = mlp.shared_expert
            if sh is not None and (type(sh) is not GatedMLP or sh.act is not torch.nn.functional.silu
                                   or sh.gate_proj.bias is not None):
                return f"layer {i}: shared expert is not a bias-free SiLU GatedMLP"
        elif type(mlp) is GatedMLP:
            if mlp.act is not torch.nn.functional.silu or mlp.gate_proj.bias is not None:
                return f"layer {i}: dense MLP is not a bias-free SiLU GatedMLP"
        else:
            return f"layer {i}: feed-forward is a {type(mlp).__name__}"
    return None


def plain_kv_b(attn: MLAAttention, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``kv_b_proj`` [nh (dn + dv), C] in ``dtype`` as the torch path reads it
    (``MLAAttention.weights``), and the bytes of any copy made for it.

    The absorbed attention splits it per head into W_UK / W_UV and reads plain rows
    (``csrc/mla.c``). A plain weight is used in place (0 bytes). A quantized one (``QLinear``:
    FP8 block, int4 / int8 group, MXFP4, GGUF block types) is dequantized ONCE here through
    ``QLinear.weight`` -- the format's reference dequantizer the torch path calls per use -- so
    both paths read the same values; the copy lives as long as the decoder. Its bytes are
    charged by the ``--max-ram`` budget before loading (``weights/budget.py: native_bytes``,
    :func:`plain_copy_bytes`)."""
    if isinstance(_weight(attn.kv_b_proj), QTensor):
        w = attn.kv_b_proj.weight  # QLinear.weight: qweight.dequantize(model dtype), a new tensor
        w = (w if w.dtype == dtype else w.to(dtype)).contiguous()
        return w, w.numel() * w.element_size()
    return attn.kv_b_proj.weight, 0


def plain_copy_bytes(spec: Any, itemsize: int, layers: int | None = None) -> int:
    """The RAM :class:`MLADecoder` adds when ``layers`` (default: all) layers store ``kv_b_proj``
    quantized: one plain ``[nh (dn + dv), C]`` copy each at ``itemsize`` bytes per value
    (DeepSeek-V3: 61 x 32768 x 512 x 2 B = 2.0 GB in bf16, against ~700 GB of weights)."""
    if spec.attention != "mla":
        return 0
    rows = spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim)
    return (spec.num_layers if layers is None else layers) * rows * spec.kv_lora_rank * itemsize


class MLADecoder(_StepBase):
    """Native single-token decode for one MLA :class:`DecoderLM` (see the module docstring)."""

    def __init__(self, net: DecoderLM, lib: ctypes.CDLL):
        _declare(lib)
        self.net, self.lib = net, lib
        s = net.spec
        self.dt = DT[net.dtype]
        self.H = H = s.hidden_size
        self.V = s.vocab_size
        self.keep: list[Any] = []  # descriptors and arrays the layer descriptors point at
        self.copy_bytes = 0  # plain copies of quantized kv_b_proj weights held in self.keep (plain_kv_b)
        self.mla: list[MlaDesc] = []
        self.ffn: list[LayerDesc] = []
        self.routes: list[RouteDesc | None] = []
        gu_len, E, topk, nh_max, C_max, dn_max, dr_max, dv_max, Rq_max = 1, 1, 1, 1, 1, 1, 2, 1, 0
        for i, layer in enumerate(net.layers):
            a, mlp, sh = layer.self_attn, layer.mlp, layer.self_attn.shape
            if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
                raise ValueError(f"layer {i}: input and post-attention norms use different eps")
            m = MlaDesc()
            m.H, m.nh, m.C = H, sh.num_heads, sh.kv_lora_rank
            m.dn, m.dr, m.dv = sh.qk_nope_head_dim, sh.qk_rope_head_dim, sh.v_head_dim
            m.Rq = a.q_lora_rank or 0
            m.eps, m.eps_lat, m.scale = layer.input_layernorm.eps, sh.eps, sh.softmax_scale
            m.interleaved = int(sh.interleaved_rope)
            m.ln1, m.ln2 = _ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight)
            if m.Rq:
                m.qa_w = self._w(_weight(a.q_a_proj), f"layer {i} q_a_proj")
                m.qa_b, m.qa_norm = _ptr(a.q_a_proj.bias), _ptr(a.q_a_layernorm.weight)
                m.q_w = self._w(_weight(a.q_b_proj), f"layer {i} q_b_proj")
            else:
                m.q_w = self._w(_weight(a.q_proj), f"layer {i} q_proj")
            m.kva_w = self._w(_weight(a.kv_a_proj_with_mqa), f"layer {i} kv_a_proj_with_mqa")
            m.kva_b, m.kva_norm = _ptr(a.kv_a_proj_with_mqa.bias), _ptr(a.kv_a_layernorm.weight)
            uv = (MtWeight * m.nh)()
            xf = self.x_f32
            if isinstance(a.kv_b_proj, SplitKVB):  # GGUF attn_k_b / attn_v_b as stored: products per head
                uk, kb, vb = (MtWeight * m.nh)(), a.kv_b_proj.k_b, a.kv_b_proj.v_b  # [nh C, dn], [nh dv, C]
                for h in range(m.nh):
                    describe(rows(kb, h * m.C, m.C), out=uk[h], what=f"layer {i} attn_k_b head {h}", x_f32=xf)
                    describe(rows(vb, h * m.dv, m.dv), out=uv[h], what=f"layer {i} attn_v_b head {h}", x_f32=xf)
                self.keep += [uk, kb, vb]
                m.uk = ctypes.addressof(uk)  # m.kvb, m.kvb_w stay NULL: prefill runs the absorbed form
            else:
                kvb, copied = plain_kv_b(a, net.dtype)  # [nh (dn + dv), C], plain (a copy if stored quantized)
                if copied:
                    self.keep.append(kvb)
                    self.copy_bytes += copied
                m.kvb, m.kvb_w = _ptr(kvb), self._w(kvb, f"layer {i} kv_b_proj")
                blocks = kvb.view(m.nh, m.dn + m.dv, m.C)
                for h in range(m.nh):
                    describe(blocks[h, m.dn:], out=uv[h], what=f"layer {i} kv_b_proj (W_UV head {h})", x_f32=xf)
            self.keep.append(uv)
            m.uv = ctypes.addressof(uv)
            m.o_w, m.o_b = self._w(_weight(a.o_proj), f"layer {i} o_proj"), _ptr(a.o_proj.bias)
            nh_max, C_max, Rq_max = max(nh_max, m.nh), max(C_max, m.C), max(Rq_max, m.Rq)
            dn_max, dr_max, dv_max = max(dn_max, m.dn), max(dr_max, m.dr), max(dv_max, m.dv)
            self.mla.append(m)

            d = LayerDesc()  # the feed-forward half, run by the generic mt_moe / mt_dense_mlp
            d.H, d.eps = H, layer.input_layernorm.eps
            dense = mlp if isinstance(mlp, GatedMLP) else getattr(mlp, "shared_expert", None)
            if dense is not None:
                d.SI = _weight(dense.gate_proj).shape[0]
                d.s_gate, d.s_up, d.s_down = (self._w(_weight(dense.gate_proj), f"layer {i} mlp gate_proj"),
                                              self._w(_weight(dense.up_proj), f"layer {i} mlp up_proj"),
                                              self._w(_weight(dense.down_proj), f"layer {i} mlp down_proj"))
            route = None
            if isinstance(mlp, MoEBlock):
                r = mlp.gate
                d.mlp, d.E, d.topk, d.I = 1, r.weight.shape[0], r.top_k, s.expert_intermediate_size
                route = RouteDesc()
                route.E, route.topk, route.n_group, route.topk_group = d.E, r.top_k, r.n_group, r.topk_group
                route.sigmoid = int(r.scoring_func == "sigmoid")
                route.method = METHODS[r.topk_method]
                route.norm_topk, route.scale_after_norm = int(r.norm_topk_prob), int(r.scale_after_norm)
                route.scaling = float(r.scaling)
                route.w = self._w(r.weight, f"layer {i} router")
                route.corr = _ptr(r.e_score_correction_bias)
                if r.n_group > 1 and d.E % r.n_group:
                    raise ValueError(f"layer {i}: n_group {r.n_group} does not divide {d.E} experts")
                E, topk = max(E, d.E), max(topk, d.topk)
                gu_len = max(gu_len, d.topk * 2 * d.I + 2 * d.SI)
            else:
                gu_len = max(gu_len, 2 * d.SI)
            self.ffn.append(d)
            self.routes.append(route)
        self.scratch = lib.mt_scratch_new(H, 1, 1, gu_len, topk, E)
        self.mscratch = lib.mt_mla_scratch_new(nh_max, C_max, dn_max, dr_max, dv_max, Rq_max)
        if not self.scratch or not self.mscratch:
            raise MemoryError("native decode: could not allocate scratch buffers")
        head = ScratchHead.from_address(self.scratch)
        self.h_ptr, self.down_ptr = head.h, head.down  # the MoE input [H], expert output rows [top-k, H]
        self.rows = (ctypes.c_void_p * MAX_TOPK)()  # per pair: its output row (mt_moe_add; expert parallelism)
        self.x = torch.zeros(H, dtype=torch.float32)  # residual stream [H]
        self.scores = torch.zeros(E, dtype=torch.float32)
        self.choice = torch.zeros(E, dtype=torch.float32)
        self.ids = (ctypes.c_int64 * MAX_TOPK)()
        self.w = (ctypes.c_float * MAX_TOPK)()
        self.gu, self.up, self.dn = ((ctypes.c_void_p * MAX_TOPK)() for _ in range(3))
        self.experts = _ExpertDescs(self.x_f32)
        self.mla_ptrs = [ctypes.addressof(m) for m in self.mla]
        self.ffn_ptrs = [ctypes.addressof(d) for d in self.ffn]
        self.route_ptrs = [None if r is None else ctypes.addressof(r) for r in self.routes]
        self.norm_w, self.norm_eps = _ptr(net.norm.weight), net.norm.eps
        head = net.embed_tokens if net.lm_head is None else net.lm_head
        self.head_weight = _weight(head)  # [V, H] (expert parallelism splits its rows: native_ep.py)
        self.out_w = self._w(self.head_weight, "output head")
        self.emb = self._w(_weight(net.embed_tokens), "embed_tokens")
        self.rotary = type(net.rotary)(net.rotary.inv_freq, net.rotary.attention_factor)  # own float32 tables
        self.kv_like = [(torch.empty(0, m.C, dtype=net.dtype), torch.empty(0, m.dr, dtype=net.dtype))
                        for m in self.mla]
        # whole-step path (one native call for all layers) for in-RAM experts, see _StepBase._table()
        n = len(net.layers)
        self.norms = [layer.post_attention_layernorm for layer in net.layers]
        self.blocks = net.moe_blocks()
        self.ffn_descs, self.ffn_desc_ptrs, self.e_max = self.ffn, self.ffn_ptrs, max(E, 1)
        self.mla_array = (ctypes.c_void_p * n)(*self.mla_ptrs)
        self.ffn_array = self.ffn_desc_array = (ctypes.c_void_p * n)(*self.ffn_ptrs)
        self.route_array = (ctypes.c_void_p * n)(*self.route_ptrs)
        self.c_ptrs, self.r_ptrs = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)()
        self.ids_all = (ctypes.c_int64 * (n * MAX_TOPK))()
        self.table_for: Any = None  # the provider the descriptor tables were built for
        self.tables: Any = None
        self.many: Any = None  # the multi-token stepper (native/mla_prefill.py), made on first use

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        if getattr(self, "scratch", None):
            lib.mt_scratch_free(self.scratch)
            self.scratch = None
        if getattr(self, "mscratch", None):
            lib.mt_mla_scratch_free(self.mscratch)
            self.mscratch = None

    def step_many(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool = False) -> torch.Tensor:
        """A flat batch of several tokens / sequences (prefill, batched steps): see
        ``native/mla_prefill.py``. Float32 logits like ``DecoderLM.forward``."""
        return self.many_stepper().step(items, all_logits)

    def many_stepper(self) -> Any:
        """This decoder's :class:`~moetier.native.mla_prefill.MLAManyStepper` (made on first use)."""
        if self.many is None:
            from moetier.native.mla_prefill import MLAManyStepper

            self.many = MLAManyStepper(self)
        return self.many

    def step(self, seq: Sequence, token: int) -> torch.Tensor:
        """Feed one token to ``seq`` (advancing it); float32 logits [1, V]."""
        net, lib, dt, H = self.net, self.lib, self.dt, self.H
        nth = torch.get_num_threads()
        pos = seq.length
        x = self.x
        xp, cp, sp = self._begin(token, pos)
        observers = net.observers
        sp_ = self.scratch
        ex = self.exchange  # expert parallelism: the MoE layers exchange rows inside the call (native_ep.py)
        if not observers and not any(n._forward_pre_hooks for n in self.norms) and (ex is not None or self._table()):
            # every layer in one native call: same functions, same order, same bits
            for i in range(len(self.mla)):
                C, R = cache_reserve(seq, i, self.kv_like[i], pos + 1, time_dim=0)
                self.c_ptrs[i], self.r_ptrs[i] = C.data_ptr(), R.data_ptr()
            gu, up, dn = self.tables
            args = (self.mla_array, self.ffn_array, self.route_array, len(self.mla), self.mscratch, sp_, dt, xp,
                    self.c_ptrs, self.r_ptrs, pos, cp, sp, self.scores.data_ptr(), self.choice.data_ptr(), gu, up, dn,
                    self.e_max, self.ids_all)
            if ex is None:
                rc = lib.mt_mla_layers(*args, None, nth)
            else:
                rc = ex.step(lib.mt_mla_layers, *args, ex.addr, nth)
            if rc:
                raise MemoryError(f"native decode: no memory for attention scores (layer {-1 - rc})")
            return self._finish(seq, pos, xp, nth)
        for i, layer in enumerate(net.layers):
            C, R = cache_reserve(seq, i, self.kv_like[i], pos + 1, time_dim=0)  # [cap, C], [cap, dr]
            if lib.mt_mla_attention(self.mla_ptrs[i], self.mscratch, sp_, dt, xp, C.data_ptr(), R.data_ptr(), pos,
                                    cp, sp, nth):
                raise MemoryError(f"native decode: no memory for attention scores ({pos + 1} positions)")
            mlp, norm, desc = layer.mlp, layer.post_attention_layernorm, self.ffn_ptrs[i]
            if norm._forward_pre_hooks:
                h = x.view(1, H).to(net.dtype)
                for hook in list(norm._forward_pre_hooks.values()):
                    hook(norm, (h,))
            if type(mlp) is GatedMLP:
                lib.mt_dense_mlp(desc, sp_, dt, xp, nth)
                continue
            lib.mt_route_grouped(self.route_ptrs[i], self.h_ptr, dt, self.scores.data_ptr(),
                                 self.choice.data_ptr(), self.ids, self.w, nth)
            self._routed(i, mlp.provider, xp, nth)
        return self._finish(seq, pos, xp, nth)
