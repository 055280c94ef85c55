"""Single-token decode through the native kernels (``csrc/``, see ``csrc/mt.h``) for the generic decoder.

:class:`NativeDecoder` runs one new token of one sequence through a :class:`DecoderLM`
whose blocks are the generic ones (llama / mixtral / qwen2_moe / qwen3_moe / olmoe; see
:func:`unsupported`): per layer, one native call for attention (norm, q/k/v (fused or not), q/k norm,
rope, cache write, attention, o_proj, residual, post-attention norm), one for the softmax
top-k router, then the routed experts come from the model's ``ExpertProvider`` exactly as on
the torch path (``require`` then ``get``), and one native call runs all of them plus the
shared expert (one call per expert when the provider may recycle a slot on the next
``get``). A provider with a ``native_moe`` hook (expert parallelism) takes over that part:
it has the experts computed where they live (:meth:`NativeDecoder.expert_rows` on each rank,
rows exchanged) and combines them with :meth:`NativeDecoder.add_rows`, the same sum.
With every expert in RAM (``InMemoryExpertProvider``), no router observer and no
norm pre-hook, one native call runs the whole step -- embedding, all layers from a table of
expert descriptors, head -- from a step descriptor built once (:meth:`NativeDecoder.whole_step`;
the same functions in the same order: the same bits, minus ~10 us of Python per layer), and
``Model.step`` calls :meth:`NativeDecoder.step` directly (``direct_steps``).
Prefill and batched steps (several tokens / sequences per call) run through
:meth:`NativeDecoder.step_many` (``native/prefill.py``) with the same per-token arithmetic.

Weights: every matrix is read in its stored format through an ``MtWeight`` descriptor
(``native/weights.py``): plain float tensors, or QTensors (``QLinear.qweight`` for attention,
dense and shared-expert projections and the head; experts with a fused or split gate/up; the
formats in :data:`SUPPORTED_FORMATS`), dequantized in registers. Expert descriptors are
cached per ``ExpertWeights`` object.

Numerics: activations are float32 throughout (the KV cache, norms and biases stay in the model
dtype); a bfloat16 model's products round their input to bf16, as torch's bf16 matmul does
(``native/weights.py: describe``; on AVX512-BF16 CPUs ``vdpbf16ps`` runs them at twice the
float32 FMA's rate), and keep float32 sums and residual stream, so in bfloat16 a native step
is closer to a float32 reference than the torch bf16 path, and not bit-identical to it. Each
output element is computed by one thread in a fixed order: results do not depend on the thread
count or on which provider served the experts.

Hooks kept: the model's forward pre-hooks run (the native step is inside ``forward``);
forward pre-hooks on a layer's ``post_attention_layernorm`` (the hierarchy's router
prefetch) are called with the residual stream in the model dtype; router observers get
``topk_ids`` [1, k] int64 and ``topk_weights`` [1, k] like on the torch path.
"""

from __future__ import annotations

import ctypes
import operator
from typing import TYPE_CHECKING, Any

import torch

from moetier import native
from moetier.errors import MoetierError, WeightError
from moetier.layers.attention import Attention, Sequence, cache_reserve
from moetier.layers.mlp import GatedMLP
from moetier.layers.moe import MoEBlock, SoftmaxTopKRouter
from moetier.layers.norm import RMSNorm
from moetier.native.weights import CODES, MtWeight, describe
from moetier.quant import QTensor

if TYPE_CHECKING:
    from moetier.models.base import DecoderLM

DT = {torch.float32: 0, torch.bfloat16: 1}
MAX_TOPK = 64
SUPPORTED_FORMATS = frozenset(CODES)  # the stored (QTensor) formats the kernels read


class LayerDesc(ctypes.Structure):
    """Mirror of ``layer_desc`` in csrc/mt.h (keep the field order in sync). Matrices are
    pointers to :class:`MtWeight` descriptors; norms and biases point at model-dtype vectors."""

    _fields_ = [
        ("H", ctypes.c_long), ("nh", ctypes.c_long), ("nkv", ctypes.c_long), ("D", ctypes.c_long),
        ("qk_norm", ctypes.c_int), ("window", ctypes.c_int), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("ln1", ctypes.c_void_p), ("qkv_w", ctypes.c_void_p), ("qkv_b", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("o_w", ctypes.c_void_p),
        ("o_b", ctypes.c_void_p), ("ln2", ctypes.c_void_p),
        ("mlp", ctypes.c_int), ("E", ctypes.c_long), ("topk", ctypes.c_long), ("I", ctypes.c_long),
        ("norm_topk", ctypes.c_int), ("route_scale", ctypes.c_float),
        ("router_w", ctypes.c_void_p), ("router_b", ctypes.c_void_p),
        ("SI", ctypes.c_long), ("s_gate", ctypes.c_void_p), ("s_up", ctypes.c_void_p),
        ("s_down", ctypes.c_void_p), ("s_gate_gate", ctypes.c_void_p),
        ("q_w", ctypes.c_void_p), ("k_w", ctypes.c_void_p), ("v_w", ctypes.c_void_p),
        ("q_b", ctypes.c_void_p), ("k_b", ctypes.c_void_p), ("v_b", ctypes.c_void_p),
    ]


class StepDesc(ctypes.Structure):
    """Mirror of ``step_desc`` in csrc/decode.c (keep the field order in sync): everything one
    whole decode step (``mt_step``) reads, built once; the KV and rope fields are rebound only
    when a sequence's cache buffers or the rope table change."""

    _fields_ = [
        ("L", ctypes.c_void_p), ("n_layers", ctypes.c_int), ("dt", ctypes.c_int),
        ("S", ctypes.c_void_p), ("x", ctypes.c_void_p),
        ("K", ctypes.c_void_p), ("V", ctypes.c_void_p), ("cap", ctypes.c_void_p),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("rope_rows", ctypes.c_long), ("rope_d", ctypes.c_long),
        ("gate_table", ctypes.c_void_p), ("up_table", ctypes.c_void_p), ("down_table", ctypes.c_void_p),
        ("e_max", ctypes.c_long), ("ids_out", ctypes.c_void_p),
        ("emb", ctypes.c_void_p), ("norm_w", ctypes.c_void_p), ("out_w", ctypes.c_void_p),
        ("norm_eps", ctypes.c_float), ("ep", ctypes.c_void_p),
    ]


class ScratchHead(ctypes.Structure):
    """The leading fields of ``scratch`` in csrc/mt.h (keep in sync): the MoE input ``h`` [H] and
    the routed experts' output rows ``down`` [top-k, H], both float32 (expert parallelism moves
    them between ranks: distributed/executor.py)."""

    _fields_ = [("n_scores", ctypes.c_long), ("h", ctypes.c_void_p), ("qkv", ctypes.c_void_p),
                ("attn", ctypes.c_void_p), ("ao", ctypes.c_void_p), ("gu", ctypes.c_void_p),
                ("act", ctypes.c_void_p), ("down", ctypes.c_void_p)]


def _silu_glu(block: MoEBlock) -> bool:
    """The block's GLU is the default SwiGLU with SiLU (checked by value on a probe input)."""
    g = torch.linspace(-4, 4, 9)
    u = torch.linspace(1, 2, 9)
    return torch.equal(block.glu(g, u), torch.nn.functional.silu(g) * u)


def unsupported(net: DecoderLM) -> str | None:
    """Why ``net`` cannot decode natively (``None`` if it can)."""
    from moetier.models.base import DecoderLayer

    if net.dtype not in DT:
        return f"dtype {net.dtype}"
    if net.rotary.interleaved:
        return "interleaved rope"
    for i, layer in enumerate(net.layers):
        if type(layer) is not DecoderLayer:
            return f"layer {i} is a {type(layer).__name__}"
        a, mlp = layer.self_attn, layer.mlp
        if type(a) is not Attention:
            return f"layer {i} attention is a {type(a).__name__}"
        qkv = [_weight(p) for p in (a.q_proj, a.k_proj, a.v_proj)]
        if a.qkv_weight is None and any(isinstance(w, torch.Tensor) and w.is_meta for w in qkv):
            return f"layer {i}: q/k/v projections not loaded"
        if a.clip_qkv is not None:
            return f"layer {i}: clip_qkv"
        if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
            return f"layer {i}: norms are not RMSNorm"
        if isinstance(mlp, MoEBlock):
            if type(mlp.gate) is not SoftmaxTopKRouter:
                return f"layer {i}: router {type(mlp.gate).__name__}"
            if mlp.gate.top_k > MAX_TOPK:
                return f"layer {i}: top-k {mlp.gate.top_k} > {MAX_TOPK}"
            if not _silu_glu(mlp):
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
    if net.spec.hidden_act not in ("silu", "swish"):
        return f"hidden_act {net.spec.hidden_act}"
    return None


def _weight(module: Any) -> torch.Tensor | QTensor:
    """The stored weight of a linear / embedding module: a ``QLinear``'s ``qweight`` (its
    ``.weight`` would be a dequantized copy), else ``.weight``."""
    q = getattr(module, "qweight", None)
    return q if isinstance(q, QTensor) else module.weight


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("native decode needs contiguous weights")
    return t.data_ptr()


class _ExpertDescs:
    """Descriptors of provider-served experts, cached per ``ExpertWeights`` object (frozen;
    providers hand out the same object per expert or per cache slot, so a step costs one dict
    lookup per expert). Entries hold their object, so an id is never reused while cached."""

    LIMIT = 1 << 16  # entries; cleared when exceeded (providers that build a new object per get)

    def __init__(self, x_f32: bool = False) -> None:
        self.cache: dict[int, tuple[Any, tuple[int, int | None, int], tuple[MtWeight, ...]]] = {}
        self.x_f32 = x_f32  # the decoder's x_f32

    def get(self, ew: Any, layer: int, expert: int, d: LayerDesc) -> tuple[int, int | None, int]:
        """(gate_up, up, down) descriptor addresses (up None: gate_up is fused [2I, H])."""
        hit = self.cache.get(id(ew))
        if hit is not None and hit[0] is ew:
            return hit[1]
        where = f"layer {layer} expert {expert}"
        if ew.gate_up_bias is not None or ew.down_bias is not None:
            raise MoetierError(f"{where}: native decode has no expert biases (load with native=False)")
        split = getattr(ew, "split", None)  # (gate, up) stored separately (quantized experts)
        xf = self.x_f32
        dn = describe(ew.down, what=f"{where} down", x_f32=xf)
        if split is None:
            g, u = describe(ew.gate_up, what=f"{where} gate_up", x_f32=xf), None
            shapes = [(g.rows, g.cols, 2 * d.I, d.H)]
        else:
            g, u = describe(split[0], what=f"{where} gate", x_f32=xf), describe(split[1], what=f"{where} up", x_f32=xf)
            shapes = [(g.rows, g.cols, d.I, d.H), (u.rows, u.cols, d.I, d.H)]
        shapes.append((dn.rows, dn.cols, d.H, d.I))
        for rows, cols, want_r, want_c in shapes:
            if (rows, cols) != (want_r, want_c):
                raise WeightError(f"{where}: an expert weight is {rows}x{cols}, expected {want_r}x{want_c}")
        if len(self.cache) >= self.LIMIT:
            self.cache.clear()
        addrs = (ctypes.addressof(g), None if u is None else ctypes.addressof(u), ctypes.addressof(dn))
        self.cache[id(ew)] = (ew, addrs, (g, u, dn))
        return addrs


class _StepBase:
    """What every native single-token decoder shares: weight descriptors kept alive with the
    decoder, and the start of a step (embedding row into ``self.x``, the rope row of ``pos``)."""

    # expert parallelism over shared memory: the exchange inside the whole step (a NativeExchange,
    # distributed/native_ep.py, set by bind_exchange); the expert tables then hold this rank's experts only
    exchange: Any = None

    def bind_exchange(self, ex: Any) -> None:
        """Run whole steps with ``ex`` (a ``NativeExchange``): its expert tables and state."""
        self.exchange, self.tables, self.table_for = ex, ex.tables, ex
        self._tables_bound()

    @property
    def x_f32(self) -> bool:
        """A float32 model: its bf16 weights (GGUF tensors read in place) keep float32
        activations (``describe``'s ``x_f32``); a bfloat16 model's round them to bf16."""
        return self.dt == DT[torch.float32]

    def _w(self, t: torch.Tensor | QTensor, what: str) -> int:
        """Address of a descriptor of weight ``t`` (kept alive with the decoder)."""
        d = describe(t, what=what, x_f32=self.x_f32)
        self.keep.append(d)
        return ctypes.addressof(d)

    def _begin(self, token: int, pos: int) -> tuple[int, int, int]:
        """Embed ``token`` into ``self.x``; returns (x address, cos row address, sin row address)."""
        xp = self.x.data_ptr()
        self.lib.mt_embed(self.emb, token, xp)
        cos, sin = self.rotary.table(pos + 1, torch.float32)
        D = cos.shape[1]
        return xp, cos.data_ptr() + 4 * D * pos, sin.data_ptr() + 4 * D * pos

    def _finish(self, seq: Sequence, pos: int, xp: int, nth: int) -> torch.Tensor:
        """Advance ``seq`` past ``pos``; the logits [1, V] of the residual stream at ``xp``."""
        seq.length = pos + 1
        logits = torch.empty(1, self.V, dtype=torch.float32)
        ex = self.exchange
        if ex is not None and ex.head_split:  # expert parallelism: the head's rows split over the ranks
            ex.head(self.norm_w, self.norm_eps, self.dt, self.scratch, xp, logits.data_ptr(), nth)
        else:
            self.lib.mt_head(self.norm_w, self.out_w, self.norm_eps, self.dt, self.scratch, xp, logits.data_ptr(), nth)
        return logits

    def expert_rows(self, layer: int, provider: Any, experts: list[int], shared: bool, nth: int) -> None:
        """Expert parallelism (distributed/executor.py): layer ``layer``'s routed ``experts`` (from
        ``provider``: ``require``, then ``get``) on the MoE input ``h`` (``h_ptr``), unweighted: expert
        s's output row [H] float32 at ``down_ptr + 4 H s``; with ``shared`` the layer's shared expert
        too (kept for :meth:`add_rows`). The same gemv rows as ``step`` runs for them
        (``mt_moe_rows``): the same bits."""
        lib, d, desc = self.lib, self.ffn_descs[layer], self.ffn_desc_ptrs[layer]
        gu, up, dn, get = self.gu, self.up, self.dn, self.experts.get
        if experts:
            provider.require(layer, sorted(set(experts)))
        if getattr(provider, "stable_gets", False):  # every get() stays valid: one call
            for s, e in enumerate(experts):
                gu[s], up[s], dn[s] = get(provider.get(layer, e), layer, e, d)
            lib.mt_moe_rows(desc, self.scratch, self.dt, len(experts), gu, up, dn, int(shared), None, nth)
            return
        for s, e in enumerate(experts):  # a get() may recycle the previous one's slot
            gu[0], up[0], dn[0] = get(provider.get(layer, e), layer, e, d)
            lib.mt_moe_rows(desc, self.scratch, self.dt, 1, gu, up, dn, 0, self.down_ptr + 4 * self.H * s, nth)
        if shared:
            lib.mt_moe_rows(desc, self.scratch, self.dt, 0, gu, up, dn, 1, None, nth)

    def add_rows(self, layer: int, xp: int, k: int) -> None:
        """The residual stream at ``xp`` += the routing weights ``w[j]`` x row ``rows[j]`` for j = 0..k-1
        in that order, then the shared expert (:meth:`expert_rows`): the single-process combine."""
        self.lib.mt_moe_add(self.ffn_desc_ptrs[layer], self.scratch, xp, k, self.rows, self.w, 1)

    def _routed(self, i: int, provider: Any, xp: int, nth: int) -> None:
        """A Python-driven step's MoE layer ``i`` after its router (``ids`` / ``w``): the router
        observers, then the routed experts and the shared expert added into the residual stream at
        ``xp``: through the provider's ``native_moe`` hook (expert parallelism), else ``require`` /
        ``get`` and ``mt_moe`` (one call when every ``get`` stays valid, else one expert at a
        time: the same bits)."""
        lib, dt, S, d, desc = self.lib, self.dt, self.scratch, self.ffn_descs[i], self.ffn_desc_ptrs[i]
        k = d.topk
        ids = self.ids[:k]
        if self.net.observers:
            ids_t = torch.tensor([ids], dtype=torch.int64)
            w_t = torch.tensor([self.w[:k]], dtype=torch.float32).to(self.net.dtype)
            for fn in self.net.observers:
                fn(i, ids_t, w_t)
        native_moe = getattr(provider, "native_moe", None)
        if native_moe is not None:  # the experts are computed elsewhere too (expert parallelism)
            native_moe(self, i, k, xp, nth)
            return
        provider.require(i, sorted(set(ids)))
        gu, up, dn, w, get = self.gu, self.up, self.dn, self.w, self.experts.get
        if getattr(provider, "stable_gets", False):  # every get() stays valid: one call
            for j, e in enumerate(ids):
                gu[j], up[j], dn[j] = get(provider.get(i, e), i, e, d)
            lib.mt_moe(desc, S, dt, xp, k, gu, up, dn, w, 1, nth)
        else:  # a get() may recycle the previous one's slot: one expert at a time (same bits)
            for j, e in enumerate(ids):
                gu[0], up[0], dn[0] = get(provider.get(i, e), i, e, d)
                lib.mt_moe(desc, S, dt, xp, 1, gu, up, dn, ctypes.byref(w, 4 * j), 0, nth)
            lib.mt_moe(desc, S, dt, xp, 0, gu, up, dn, w, 1, nth)

    def _table(self) -> bool:
        """Descriptor tables of every routed expert when the provider keeps them all in RAM
        (``InMemoryExpertProvider``); False when another provider is attached. For the whole-step
        calls (all layers in one native call); reads ``blocks`` (``net.moe_blocks()``), ``e_max``,
        ``ffn_descs`` (each layer's feed-forward ``LayerDesc``), ``experts``, ``table_for``."""
        t = self.table_for
        if t is not None:
            for b in self.blocks.values():
                if b.provider is not t:
                    break
            else:
                return True
        from moetier.models.base import InMemoryExpertProvider

        blocks = self.blocks
        providers = {id(b.provider) for b in blocks.values()}
        provider = next(iter(blocks.values())).provider if blocks else None
        if len(providers) > 1 or type(provider) is not InMemoryExpertProvider:
            return False
        if self.table_for is provider:
            return True
        tables = self.expert_tables(provider)
        if tables is None:
            return False
        self.tables, self.table_for = tables, provider
        self._tables_bound()
        return True

    def expert_tables(self, provider: Any, missing_ok: bool = False) -> Any:
        """(gate_up, up, down) descriptor tables [n_layers * e_max] (addresses) of the routed experts
        of an ``InMemoryExpertProvider``, or None when an expert has biases (the native MoE has none)
        or, unless ``missing_ok`` (expert parallelism: a rank's share; NULL entries), is missing."""
        n, E = len(self.net.layers), self.e_max
        gu, up, dn = ((ctypes.c_void_p * (n * E))() for _ in range(3))
        for i in self.blocks:
            for e in range(self.ffn_descs[i].E):
                ew = provider.experts.get((i, e))
                if ew is None and missing_ok:
                    continue
                if ew is None or ew.gate_up_bias is not None or ew.down_bias is not None:
                    return None
                k = i * E + e
                gu[k], up[k], dn[k] = self.experts.get(ew, i, e, self.ffn_descs[i])
        return gu, up, dn

    def _tables_bound(self) -> None:
        """Hook: the expert tables were (re)built (the generic decoder points its step descriptor at them)."""


class NativeDecoder(_StepBase):
    """Native single-token decode for one :class:`DecoderLM` (see the module docstring)."""

    # Model.step may call step() directly, outside torch.inference_mode and the module call (when
    # the network has no forward hooks): step enters inference mode itself where it runs torch ops
    direct_steps = True

    def __init__(self, net: DecoderLM, lib: ctypes.CDLL):
        self.net, self.lib = net, lib
        s = net.spec
        self.dt = DT[net.dtype]
        self.H, self.V = s.hidden_size, s.vocab_size
        self.keep: list[MtWeight] = []  # weight descriptors the layer descriptors point at
        self.descs: list[LayerDesc] = []
        self.layers: list[tuple[Any, ...]] = []
        gu_len, qkv_rows, attn_dim, E, topk = 1, 1, 1, 1, 1
        for i, layer in enumerate(net.layers):
            a, mlp = layer.self_attn, layer.mlp
            d = LayerDesc()
            d.H, d.nh, d.nkv, d.D = self.H, a.n_heads, a.n_kv, a.head_dim
            d.qk_norm = {"none": 0, "head": 1, "full": 2}[a.qk_norm]
            d.window = int(a.sliding_window or 0)
            d.eps, d.scale = layer.input_layernorm.eps, a.scale
            d.ln1, d.ln2 = _ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight)
            if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
                raise ValueError(f"layer {i}: input and post-attention norms use different eps")
            if a.qkv_weight is not None:  # fused [(nh + 2 nkv) D, H]
                d.qkv_w, d.qkv_b = self._w(a.qkv_weight, f"layer {i} qkv"), _ptr(a.qkv_bias)
            else:  # separate (quantized projections stay unfused)
                d.q_w, d.k_w, d.v_w = (self._w(_weight(p), f"layer {i} {n}")
                                       for p, n in ((a.q_proj, "q_proj"), (a.k_proj, "k_proj"), (a.v_proj, "v_proj")))
                d.q_b, d.k_b, d.v_b = _ptr(a.q_proj.bias), _ptr(a.k_proj.bias), _ptr(a.v_proj.bias)
            if a.qk_norm != "none":
                d.q_norm, d.k_norm = _ptr(a.q_norm.weight), _ptr(a.k_norm.weight)
                if a.q_norm.eps != layer.input_layernorm.eps:
                    raise ValueError(f"layer {i}: q/k norm eps differs from the layer norm eps")
            d.o_w, d.o_b = self._w(_weight(a.o_proj), f"layer {i} o_proj"), _ptr(a.o_proj.bias)
            qkv_rows = max(qkv_rows, (a.n_heads + 2 * a.n_kv) * a.head_dim)
            attn_dim = max(attn_dim, a.n_heads * a.head_dim)
            dense = mlp if isinstance(mlp, GatedMLP) else getattr(mlp, "shared_expert", None)
            if dense is not None:
                d.SI = _weight(dense.gate_proj).shape[0]
                d.s_gate, d.s_up, d.s_down = (self._w(_weight(dense.gate_proj), f"layer {i} mlp gate_proj"),
                                              self._w(_weight(dense.up_proj), f"layer {i} mlp up_proj"),
                                              self._w(_weight(dense.down_proj), f"layer {i} mlp down_proj"))
            if isinstance(mlp, MoEBlock):
                r = mlp.gate
                d.mlp, d.E, d.topk, d.I = 1, r.weight.shape[0], r.top_k, s.expert_intermediate_size
                d.norm_topk, d.route_scale = int(r.norm_topk_prob), float(r.scaling)
                d.router_w, d.router_b = self._w(r.weight, f"layer {i} router"), _ptr(r.bias)
                if mlp.shared_expert_gate is not None:
                    d.s_gate_gate = self._w(_weight(mlp.shared_expert_gate), f"layer {i} shared_expert_gate")
                    if mlp.shared_expert_gate.bias is not None:
                        raise ValueError(f"layer {i}: shared expert gate has a bias")
                E, topk = max(E, d.E), max(topk, d.topk)
                gu_len = max(gu_len, d.topk * 2 * d.I + 2 * d.SI)
            else:
                gu_len = max(gu_len, 2 * d.SI)
            self.descs.append(d)
        self.scratch = lib.mt_scratch_new(self.H, qkv_rows, attn_dim, gu_len, topk, E)
        if not self.scratch:
            raise MemoryError("native decode: could not allocate scratch buffers")
        self.x = torch.zeros(self.H, dtype=torch.float32)  # residual stream [H]
        head = ScratchHead.from_address(self.scratch)
        self.h_ptr, self.down_ptr = head.h, head.down  # the MoE input [H], expert output rows [top-k, H]
        self.rows = (ctypes.c_void_p * MAX_TOPK)()  # per pair: its output row (mt_moe_add)
        self.ids = (ctypes.c_int64 * MAX_TOPK)()
        self.w = (ctypes.c_float * MAX_TOPK)()
        # per-call expert descriptor addresses: gate_up (or gate), up (NULL when fused), down
        self.gu, self.up, self.dn = ((ctypes.c_void_p * MAX_TOPK)() for _ in range(3))
        self.experts = _ExpertDescs(self.x_f32)
        self.desc_ptrs = [ctypes.addressof(d) for d in self.descs]
        self.norm_w = _ptr(net.norm.weight)
        self.norm_eps = net.norm.eps
        head = net.embed_tokens if net.lm_head is None else net.lm_head
        self.head_weight = _weight(head)  # [V, H] (expert parallelism splits its rows: native_ep.py)
        self.out_w = self._w(self.head_weight, "output head")
        self.emb = self._w(_weight(net.embed_tokens), "embed_tokens")
        self.rotary = type(net.rotary)(net.rotary.inv_freq, net.rotary.attention_factor)  # own float32 tables
        self.kv_like = [(torch.empty(a.n_kv, 0, a.head_dim, dtype=net.dtype),) * 2
                        for a in (layer.self_attn for layer in net.layers)]
        # whole-step path (one native call for all layers) for in-RAM experts, see _table()
        n = len(net.layers)
        self.norms = [layer.post_attention_layernorm for layer in net.layers]
        self.blocks = net.moe_blocks()
        self.desc_array = self.ffn_desc_array = (ctypes.c_void_p * n)(*self.desc_ptrs)
        self.k_ptrs, self.v_ptrs, self.caps = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(), (ctypes.c_long * n)()
        self.ids_all = (ctypes.c_int64 * (n * MAX_TOPK))()
        self.e_max = max(E, 1)
        self.ffn_descs, self.ffn_desc_ptrs = self.descs, self.desc_ptrs  # each layer's feed-forward LayerDesc
        self.table_for: Any = None  # the provider the descriptor tables were built for
        self.tables: Any = None  # (gate_up, up, down) pointer tables and their descriptors
        self.many: Any = None  # the multi-token stepper (native/prefill.py), made on first use
        # the whole decode step in one call (mt_step, see whole_step): its descriptor, the KV
        # buffers it points at (held, so the pointers stay valid; rebound when a sequence's
        # buffers change) and the rope tables (held likewise)
        sd = self.sd = StepDesc()
        sd.L, sd.n_layers, sd.dt = ctypes.addressof(self.desc_array), n, self.dt
        sd.S, sd.x = self.scratch, self.x.data_ptr()
        sd.K, sd.V, sd.cap = (ctypes.addressof(a) for a in (self.k_ptrs, self.v_ptrs, self.caps))
        sd.e_max, sd.ids_out = self.e_max, ctypes.addressof(self.ids_all)
        sd.emb, sd.norm_w, sd.out_w, sd.norm_eps = self.emb, self.norm_w, self.out_w, self.norm_eps
        self.sd_addr = ctypes.addressof(sd)
        self.mt_step = lib.mt_step
        self.kv_bufs: list[Any] = []  # seq.layers entries the descriptor points at
        self.kv_cap = 0  # the smallest of their capacities
        self.rope_keep: Any = None  # the (cos, sin) tables the descriptor points at

    def _tables_bound(self) -> None:
        self.sd.gate_table, self.sd.up_table, self.sd.down_table = (ctypes.addressof(t) for t in self.tables)
        self.sd.ep = None if self.exchange is None else self.exchange.addr

    def _bind_kv(self, seq: Sequence, pos: int) -> None:
        """Point the step descriptor at ``seq``'s cache buffers (reserved for ``pos + 1`` tokens)."""
        for i in range(len(self.descs)):
            K, Vc = cache_reserve(seq, i, self.kv_like[i], pos + 1)
            self.k_ptrs[i], self.v_ptrs[i], self.caps[i] = K.data_ptr(), Vc.data_ptr(), K.shape[1]
        self.kv_bufs = list(seq.layers)
        self.kv_cap = min(self.caps)

    def _bind_rope(self, pos: int) -> None:
        """Point the step descriptor at rope tables of at least ``pos + 1`` rows."""
        cos, sin = self.rotary.table(pos + 1, torch.float32)
        self.rope_keep = (cos, sin)
        self.sd.cos, self.sd.sin = cos.data_ptr(), sin.data_ptr()
        self.sd.rope_rows, self.sd.rope_d = cos.shape[0], cos.shape[1]

    def whole_step(self, seq: Sequence, token: int) -> torch.Tensor | None:
        """The whole decode step of ``token`` (embedding, every layer, head) in one native call when
        every routed expert is in RAM (``InMemoryExpertProvider``) and no router observer or norm
        pre-hook is set: float32 logits [1, V], ``seq`` advanced. Otherwise ``None``, nothing done
        (``step`` then drives the layers from Python). Same functions, same order: the same bits."""
        ex = self.exchange
        if self.net.observers or (ex is None and not self._table()):
            return None
        for n in self.norms:
            if n._forward_pre_hooks:
                return None
        pos = seq.length
        if pos >= self.kv_cap or not all(map(operator.is_, seq.layers, self.kv_bufs)):
            self._bind_kv(seq, pos)
        if pos >= self.sd.rope_rows:
            self._bind_rope(pos)
        logits = torch.empty(1, self.V, dtype=torch.float32)
        if ex is None:
            rc = self.mt_step(self.sd_addr, token, pos, logits.data_ptr(), torch.get_num_threads())
        else:  # expert parallelism: the MoE layers exchange rows with the other ranks inside the call
            rc = ex.step(self.mt_step, self.sd_addr, token, pos, logits.data_ptr(), torch.get_num_threads())
        if rc == -1000:
            raise RuntimeError(f"native decode: position {pos} outside the bound KV cache or rope table")
        if rc:
            raise MemoryError(f"native decode: no memory for attention scores (layer {-1 - rc})")
        seq.length = pos + 1
        return logits

    def __del__(self) -> None:
        lib, s = getattr(self, "lib", None), getattr(self, "scratch", None)
        if lib is not None and s:
            lib.mt_scratch_free(s)
            self.scratch = None

    def step(self, seq: Sequence, token: int) -> torch.Tensor:
        """Feed one token to ``seq`` (advancing it); float32 logits [1, V]."""
        logits = self.whole_step(seq, token)  # every layer in one native call: same functions, same bits
        if logits is not None:
            return logits
        with torch.inference_mode():
            return self._step_layers(seq, token)

    def _step_layers(self, seq: Sequence, token: int) -> torch.Tensor:
        """A step with Python driving each layer (providers, observers, norm pre-hooks)."""
        net, lib, dt, H = self.net, self.lib, self.dt, self.H
        nth = torch.get_num_threads()
        pos = seq.length
        x = self.x
        xp, cp, sp = self._begin(token, pos)
        for i, layer in enumerate(net.layers):
            desc = self.desc_ptrs[i]
            K, Vc = cache_reserve(seq, i, self.kv_like[i], pos + 1)
            if lib.mt_attention(desc, self.scratch, dt, xp, K.data_ptr(), Vc.data_ptr(), K.shape[1], pos,
                                cp, sp, nth):
                raise MemoryError(f"native decode: no memory for attention scores ({K.shape[1]} positions)")
            mlp = layer.mlp
            norm = layer.post_attention_layernorm
            if norm._forward_pre_hooks:
                h = x.view(1, H).to(net.dtype)
                for hook in list(norm._forward_pre_hooks.values()):
                    hook(norm, (h,))
            if type(mlp) is GatedMLP:
                lib.mt_dense_mlp(desc, self.scratch, dt, xp, nth)
                continue
            lib.mt_route(desc, self.scratch, dt, self.ids, self.w, nth)
            self._routed(i, mlp.provider, xp, nth)
        return self._finish(seq, pos, xp, nth)

    def step_many(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool = False) -> torch.Tensor:
        """A flat batch of several tokens / sequences (prefill, batched steps): see
        ``native/prefill.py``. Float32 logits like ``DecoderLM.forward``."""
        return self.many_stepper().step(items, all_logits)

    def many_stepper(self) -> Any:
        """This decoder's :class:`~moetier.native.prefill.ManyStepper` (made on first use)."""
        if self.many is None:
            from moetier.native.prefill import ManyStepper

            self.many = ManyStepper(self)
        return self.many


def build(net: DecoderLM) -> tuple[Any, str | None]:
    """A native decoder for ``net``, or ``(None, reason)``."""
    from moetier.native import gpt_oss, llama4, mla

    if mla.is_mla(net):  # the DeepSeek MLA decoders: moetier/native/mla.py
        reason, make = mla.unsupported(net), mla.MLADecoder
    elif gpt_oss.is_gpt_oss(net):  # sinks, clamped SwiGLU with biases: moetier/native/gpt_oss.py
        reason, make = gpt_oss.unsupported(net), gpt_oss.GptOssDecoder
    elif llama4.is_llama4(net):  # NoPE / chunked layers, sigmoid router on the input: moetier/native/llama4.py
        reason, make = llama4.unsupported(net), llama4.Llama4Decoder
    else:
        reason, make = unsupported(net), NativeDecoder
    if reason is not None:
        return None, reason
    lib = native.library()
    if lib is None:
        return None, native.unavailable_reason()
    try:
        return make(net, lib), None
    except (ValueError, MemoryError, WeightError) as e:
        return None, str(e)
