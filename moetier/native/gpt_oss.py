"""Single-token decode through the native kernels for gpt-oss (``csrc/sinks.c``).

:class:`GptOssDecoder` runs one new token of one sequence through a ``GptOss`` decoder: per
layer one native call for the attention (norm, q/k/v with biases, rope, cache write, GQA
attention whose softmax includes the head's learned sink logit, the layer's sliding window or
none, o_proj with bias, residual, post-attention norm), one for the router (top-k of the
biased logits, softmax over those k), then the experts come from the provider as on the
torch path and one call runs them with their biases and the clamped SwiGLU (plain or MXFP4
weights through the ``mt_weight`` descriptors). The KV cache is the torch path's
(``[n_kv, L, D]`` per layer); prefill and batched steps (several tokens / sequences per call) run
through :meth:`ExtDecoder.step_many` (``native/ext_prefill.py``, ``csrc/ext_many.c``) with the
same per-token arithmetic (``csrc/ext.h``).

Numerics and hooks as in :mod:`moetier.native.decode`.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from moetier.errors import WeightError
from moetier.layers.attention import Sequence, cache_reserve
from moetier.layers.moe import MoEBlock
from moetier.layers.norm import RMSNorm
from moetier.native.decode import DT, MAX_TOPK, _ptr, _StepBase, _weight
from moetier.native.weights import MtWeight, describe

if TYPE_CHECKING:
    from moetier.models.base import DecoderLM


class OssDesc(ctypes.Structure):
    """Mirror of ``oss_desc`` in csrc/sinks.c (keep the field order in sync)."""

    _fields_ = [
        ("H", ctypes.c_long), ("nh", ctypes.c_long), ("nkv", ctypes.c_long), ("D", ctypes.c_long),
        ("window", ctypes.c_int), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("sinks", ctypes.c_void_p),
        ("q_w", ctypes.c_void_p), ("k_w", ctypes.c_void_p), ("v_w", ctypes.c_void_p), ("o_w", ctypes.c_void_p),
        ("q_b", ctypes.c_void_p), ("k_b", ctypes.c_void_p), ("v_b", ctypes.c_void_p), ("o_b", ctypes.c_void_p),
        ("E", ctypes.c_long), ("topk", ctypes.c_long), ("I", ctypes.c_long),
        ("limit", ctypes.c_float), ("alpha", ctypes.c_float),
        ("router_w", ctypes.c_void_p), ("router_b", ctypes.c_void_p),
        ("rope", ctypes.c_int), ("qk_l2", ctypes.c_int), ("chunk", ctypes.c_int),
        ("floor_scale", ctypes.c_float), ("attn_scale", ctypes.c_float),
        ("route", ctypes.c_int), ("act", ctypes.c_int), ("scale_input", ctypes.c_int),
        ("SI", ctypes.c_long), ("s_gate", ctypes.c_void_p), ("s_up", ctypes.c_void_p), ("s_down", ctypes.c_void_p),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for name, res, args in (
        ("mt_oss_scratch_new", P, [L, L, L, L, L, L]),
        ("mt_oss_scratch_free", None, [P]),
        ("mt_oss_attention", I, [P, P, I, P, P, P, L, L, P, P, I]),
        ("mt_oss_route", None, [P, P, I, P, P, I]),
        ("mt_oss_experts", None, [P, P, I, P, I, P, P, P, P, P, P, I]),
        ("mt_oss_rows", None, [P, P, I, I, P, P, P, P, P, P, I, P, I]),
        ("mt_oss_add", None, [P, P, I, P, P]),
        ("mt_oss_scale_h", None, [P, P, P]),
        ("mt_oss_mlp", None, [P, P, I, P, I]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


class OssScratchHead(ctypes.Structure):
    """The leading fields of ``oss_scratch`` in csrc/sinks.c (keep in sync): the MoE input ``h``
    [H] and the expert output rows ``down`` [top-k, H], float32 (expert parallelism moves them:
    distributed/executor.py)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("h", "q", "k", "v", "attn", "ao", "logits", "gu", "act", "down")]


def is_gpt_oss(net: DecoderLM) -> bool:
    from moetier.models.gpt_oss import GptOss

    return isinstance(net, GptOss)


def _glu_params(block: MoEBlock) -> tuple[float, float] | None:
    """(limit, alpha) of the block's clamped SwiGLU, read from its closure; checked by value."""
    cells = {name: c.cell_contents for name, c in zip(block.glu.__code__.co_freevars, block.glu.__closure__ or ())}
    limit, alpha = cells.get("limit"), cells.get("alpha")
    if not isinstance(limit, (int, float)) or not isinstance(alpha, (int, float)):
        return None
    g, u = torch.linspace(-12, 12, 25), torch.linspace(-9, 9, 25)
    want = (u.clamp(-limit, limit) + 1) * (g.clamp(max=limit) * torch.sigmoid(g.clamp(max=limit) * alpha))
    return (float(limit), float(alpha)) if torch.allclose(block.glu(g, u), want) else None


def unsupported(net: DecoderLM) -> str | None:
    """Why the gpt-oss decoder ``net`` cannot decode natively (``None`` if it can)."""
    from moetier.models.base import DecoderLayer
    from moetier.models.gpt_oss import GptOssRouter, SinkAttention

    if net.dtype not in DT:
        return f"dtype {net.dtype}"
    if net.rotary.interleaved:
        return "interleaved rope"
    for i, layer in enumerate(net.layers):
        if type(layer) is not DecoderLayer:
            return f"layer {i} is a {type(layer).__name__}"
        a, mlp = layer.self_attn, layer.mlp
        if type(a) is not SinkAttention or a.qk_norm != "none" or a.clip_qkv is not None:
            return f"layer {i}: attention is not gpt-oss sink attention"
        if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
            return f"layer {i}: norms are not RMSNorm"
        if not isinstance(mlp, MoEBlock) or type(mlp.gate) is not GptOssRouter or mlp.shared_expert is not None:
            return f"layer {i}: feed-forward is not the gpt-oss MoE block"
        if mlp.gate.top_k > MAX_TOPK:
            return f"layer {i}: top-k {mlp.gate.top_k} > {MAX_TOPK}"
        if _glu_params(mlp) is None:
            return f"layer {i}: expert activation is not the clamped SwiGLU"
    return None


class _OssExperts:
    """Descriptors (and bias addresses) of provider-served experts, cached per ``ExpertWeights``."""

    LIMIT = 1 << 16

    def __init__(self, x_f32: bool = False) -> None:
        self.cache: dict[int, tuple[Any, tuple[Any, ...], tuple[MtWeight | None, ...]]] = {}
        self.x_f32 = x_f32  # the decoder's x_f32

    def get(self, ew: Any, layer: int, expert: int, H: int, I: int, dtype: torch.dtype) -> tuple[Any, ...]:
        """(gate_up or gate, up or None, gate_up bias, down, down bias) addresses."""
        hit = self.cache.get(id(ew))
        if hit is not None and hit[0] is ew:
            return hit[1]
        where = f"layer {layer} expert {expert}"
        split = getattr(ew, "split", None)
        xf = self.x_f32
        dn = describe(ew.down, what=f"{where} down", x_f32=xf)
        if split is None:
            g, u = describe(ew.gate_up, what=f"{where} gate_up", x_f32=xf), None
            shapes = [(g.rows, g.cols, 2 * I, H)]
        else:
            g, u = describe(split[0], what=f"{where} gate", x_f32=xf), describe(split[1], what=f"{where} up", x_f32=xf)
            shapes = [(g.rows, g.cols, I, H), (u.rows, u.cols, I, H)]
        shapes.append((dn.rows, dn.cols, H, I))
        for rows, cols, want_r, want_c in shapes:
            if (rows, cols) != (want_r, want_c):
                raise WeightError(f"{where}: an expert weight is {rows}x{cols}, expected {want_r}x{want_c}")
        biases = []
        for b, n, name in ((ew.gate_up_bias, 2 * I, "gate_up bias"), (ew.down_bias, H, "down bias")):
            if b is not None and (b.dtype != dtype or b.numel() != n or not b.is_contiguous()):
                raise WeightError(f"{where}: {name} must be a contiguous [{n}] {dtype} tensor")
            biases.append(_ptr(b))
        if len(self.cache) >= self.LIMIT:
            self.cache.clear()
        addrs = (ctypes.addressof(g), None if u is None else ctypes.addressof(u), biases[0],
                 ctypes.addressof(dn), biases[1])
        self.cache[id(ew)] = (ew, addrs, (g, u, dn))
        return addrs


class ExtDecoder(_StepBase):
    """Native single-token decode on ``csrc/sinks.c``'s extended attention / MoE step; subclasses
    fill one :class:`OssDesc` per layer (:meth:`describe_layer`)."""

    def __init__(self, net: DecoderLM, lib: ctypes.CDLL):
        _declare(lib)
        self.net, self.lib = net, lib
        s = net.spec
        self.dtype, self.dt = net.dtype, DT[net.dtype]
        self.H = H = s.hidden_size
        self.V = s.vocab_size
        self.keep: list[Any] = []
        self.descs: list[OssDesc] = []
        qdim, kvdim, E, topk, inter = 1, 1, 1, 1, 1
        for i, layer in enumerate(net.layers):
            a = layer.self_attn
            if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
                raise ValueError(f"layer {i}: input and post-attention norms use different eps")
            d = OssDesc()
            d.H, d.nh, d.nkv, d.D = H, a.n_heads, a.n_kv, a.head_dim
            d.window, d.eps, d.scale = int(a.sliding_window or 0), layer.input_layernorm.eps, a.scale
            d.ln1, d.ln2 = _ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight)
            d.q_w, d.k_w, d.v_w, d.o_w = (self._w(_weight(p), f"layer {i} {n}") for p, n in (
                (a.q_proj, "q_proj"), (a.k_proj, "k_proj"), (a.v_proj, "v_proj"), (a.o_proj, "o_proj")))
            d.q_b, d.k_b, d.v_b, d.o_b = (_ptr(p.bias) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
            self.describe_layer(i, layer, d)
            qdim, kvdim = max(qdim, a.n_heads * a.head_dim), max(kvdim, a.n_kv * a.head_dim)
            E, topk = max(E, d.E), max(topk, d.topk)
            inter = max(inter, d.topk * d.I, d.SI)
            self.descs.append(d)
        I = inter
        self.scratch = lib.mt_oss_scratch_new(H, qdim, kvdim, E, topk, I)
        if not self.scratch:
            raise MemoryError("native decode: could not allocate scratch buffers")
        self.x = torch.zeros(H, dtype=torch.float32)  # residual stream [H]
        head = OssScratchHead.from_address(self.scratch)
        self.h_ptr, self.down_ptr = head.h, head.down  # the MoE input [H], expert output rows [top-k, H]
        self.rows = (ctypes.c_void_p * MAX_TOPK)()
        self.ids = (ctypes.c_int64 * MAX_TOPK)()
        self.w = (ctypes.c_float * MAX_TOPK)()
        self.g, self.u, self.gb, self.dn, self.db = ((ctypes.c_void_p * MAX_TOPK)() for _ in range(5))
        self.experts = _OssExperts(self.x_f32)
        self.desc_ptrs = [ctypes.addressof(d) for d in self.descs]
        self.norm_w, self.norm_eps = _ptr(net.norm.weight), net.norm.eps
        head = net.embed_tokens if net.lm_head is None else net.lm_head
        self.out_w = self._w(_weight(head), "output head")
        self.emb = self._w(_weight(net.embed_tokens), "embed_tokens")
        # the head runs on the generic scratch (its h buffer) of mt_head
        self.head_scratch = lib.mt_scratch_new(H, 1, 1, 1, 1, 1)
        if not self.head_scratch:
            raise MemoryError("native decode: could not allocate scratch buffers")
        self.rotary = type(net.rotary)(net.rotary.inv_freq, net.rotary.attention_factor)  # own float32 tables
        self.kv_like = [(torch.empty(d.nkv, 0, d.D, dtype=net.dtype),) * 2 for d in self.descs]
        self.many: Any = None  # the multi-token stepper (native/ext_prefill.py), made on first use

    def describe_layer(self, i: int, layer: Any, d: OssDesc) -> None:
        raise NotImplementedError

    def step_many(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool = False) -> torch.Tensor:
        """A flat batch of several tokens / sequences (prefill, batched steps): see
        ``native/ext_prefill.py``. Float32 logits like ``DecoderLM.forward``."""
        return self.many_stepper().step(items, all_logits)

    def many_stepper(self) -> Any:
        """This decoder's :class:`~moetier.native.ext_prefill.ExtManyStepper` (made on first use)."""
        if self.many is None:
            from moetier.native.ext_prefill import ExtManyStepper

            self.many = ExtManyStepper(self)
        return self.many

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        if getattr(self, "scratch", None):
            lib.mt_oss_scratch_free(self.scratch)
            self.scratch = None
        if getattr(self, "head_scratch", None):
            lib.mt_scratch_free(self.head_scratch)
            self.head_scratch = None

    def ep_reason(self) -> str | None:
        """Why expert parallelism cannot run this decoder's MoE layers natively (None: it can): a
        pair's input row must be the token's one row, or (Llama-4's weighted input) top-1."""
        for i, d in enumerate(self.descs):
            if d.E and d.scale_input and d.topk != 1:
                return f"layer {i}: top-{d.topk} with the routing weight on the expert input"
        return None

    def expert_rows(self, layer: int, provider: Any, experts: list[int], shared: bool, nth: int) -> None:
        """Expert parallelism: layer ``layer``'s routed ``experts`` on the MoE input at ``h_ptr`` (a
        Llama-4 pair's already scaled: ``mt_oss_scale_h``), unweighted, expert s's row at ``down_ptr
        + 4 H s`` (``mt_oss_rows``: the single-process gemv rows, the same bits). The shared expert /
        dense MLP ran before the router (``mt_oss_mlp``): ``shared`` adds nothing here."""
        lib, d, desc, H = self.lib, self.descs[layer], self.desc_ptrs[layer], self.H
        g, u, gb, dn, db, get = self.g, self.u, self.gb, self.dn, self.db, self.experts.get
        if not experts:
            return
        provider.require(layer, sorted(set(experts)))
        if getattr(provider, "stable_gets", False):
            for s, e in enumerate(experts):
                g[s], u[s], gb[s], dn[s], db[s] = get(provider.get(layer, e), layer, e, H, d.I, self.dtype)
            lib.mt_oss_rows(desc, self.scratch, self.dt, len(experts), g, u, gb, dn, db, self.w, 0, None, nth)
            return
        for s, e in enumerate(experts):  # a get() may recycle the previous one's slot
            g[0], u[0], gb[0], dn[0], db[0] = get(provider.get(layer, e), layer, e, H, d.I, self.dtype)
            lib.mt_oss_rows(desc, self.scratch, self.dt, 1, g, u, gb, dn, db, self.w, 0, self.down_ptr + 4 * H * s,
                            nth)

    def add_rows(self, layer: int, xp: int, k: int) -> None:
        """The residual stream at ``xp`` += the k rows ``rows[j]`` with the routing weights (1 for a
        weighted input) in pair order (``mt_oss_add``): the single-process combine."""
        self.lib.mt_oss_add(self.desc_ptrs[layer], xp, k, self.rows, self.w)

    def step(self, seq: Sequence, token: int) -> torch.Tensor:
        """Feed one token to ``seq`` (advancing it); float32 logits [1, V]."""
        net, lib, dt, H = self.net, self.lib, self.dt, self.H
        nth = torch.get_num_threads()
        pos = seq.length
        x = self.x
        xp, cp, sp = self._begin(token, pos)
        observers, S = net.observers, self.scratch
        g, u, gb, dn, db, w = self.g, self.u, self.gb, self.dn, self.db, self.w
        for i, layer in enumerate(net.layers):
            d, desc = self.descs[i], self.desc_ptrs[i]
            K, Vc = cache_reserve(seq, i, self.kv_like[i], pos + 1)
            if lib.mt_oss_attention(desc, S, dt, xp, K.data_ptr(), Vc.data_ptr(), K.shape[1], pos, cp, sp, nth):
                raise MemoryError(f"native decode: no memory for attention scores ({K.shape[1]} positions)")
            norm = layer.post_attention_layernorm
            if norm._forward_pre_hooks:
                h = x.view(1, H).to(net.dtype)
                for hook in list(norm._forward_pre_hooks.values()):
                    hook(norm, (h,))
            if d.SI:  # Llama-4's shared expert, or a dense layer
                lib.mt_oss_mlp(desc, S, dt, xp, nth)
            if not d.E:
                continue
            k = d.topk
            lib.mt_oss_route(desc, S, dt, self.ids, w, nth)
            ids = self.ids[:k]
            if observers:
                ids_t = torch.tensor([ids], dtype=torch.int64)
                w_t = torch.tensor([w[:k]], dtype=torch.float32).to(net.dtype)
                for fn in observers:
                    fn(i, ids_t, w_t)
            provider = layer.mlp.provider
            native_moe = getattr(provider, "native_moe", None)
            if native_moe is not None:  # expert parallelism: each pair's input row goes to its expert's rank
                if d.scale_input:  # Llama-4 (top-1): the weight goes into the input, as mt_oss_rows forms it
                    lib.mt_oss_scale_h(desc, S, w)
                native_moe(self, i, k, xp, nth)
                continue
            provider.require(i, sorted(set(ids)))
            get = self.experts.get
            if getattr(provider, "stable_gets", False):
                for j, e in enumerate(ids):
                    g[j], u[j], gb[j], dn[j], db[j] = get(provider.get(i, e), i, e, H, d.I, self.dtype)
                lib.mt_oss_experts(desc, S, dt, xp, k, g, u, gb, dn, db, w, nth)
            else:  # a get() may recycle the previous one's slot: one expert at a time (same bits)
                for j, e in enumerate(ids):
                    g[0], u[0], gb[0], dn[0], db[0] = get(provider.get(i, e), i, e, H, d.I, self.dtype)
                    lib.mt_oss_experts(desc, S, dt, xp, 1, g, u, gb, dn, db, ctypes.byref(w, 4 * j), nth)
        seq.length = pos + 1
        logits = torch.empty(1, self.V, dtype=torch.float32)
        lib.mt_head(self.norm_w, self.out_w, self.norm_eps, dt, self.head_scratch, xp, logits.data_ptr(), nth)
        return logits


class GptOssDecoder(ExtDecoder):
    """gpt-oss: sinks, rotate-half rope, top-k-then-softmax router, clamped SwiGLU with biases."""

    def describe_layer(self, i: int, layer: Any, d: OssDesc) -> None:
        a, mlp, r = layer.self_attn, layer.mlp, layer.mlp.gate
        d.sinks, d.rope, d.route, d.act = _ptr(a.sinks), 1, 0, 0
        d.E, d.topk, d.I = r.weight.shape[0], r.top_k, self.net.spec.expert_intermediate_size
        d.limit, d.alpha = _glu_params(mlp)
        d.router_w, d.router_b = self._w(r.weight, f"layer {i} router"), _ptr(r.bias)
