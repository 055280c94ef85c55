"""Runtime contracts and the generic decoder-only MoE language model.

Contracts (see docs/ARCHITECTURE.md):

* :class:`ExpertWeights` and :class:`ExpertProvider` (defined in :mod:`moetier.layers.experts`,
  re-exported here): one routed expert and where MoE blocks get them from.
  :class:`InMemoryExpertProvider` is the default (all experts in RAM).
* :class:`ExpertReader` - reads one expert from the checkpoint (per-expert tensors or one
  expert's slice of fused ``[E, ...]`` tensors). Tiered providers build on it.
* ``ExpertProviderFactory = (spec, reader) -> ExpertProvider`` is what ``moetier.load``
  accepts to plug another provider in; the always-on weights are loaded separately.

:class:`DecoderLM` is the generic pre-norm decoder (llama / mixtral / qwen2_moe / qwen3_moe /
olmoe differ only in flags read from ModelSpec, and in checkpoint names). Its
:meth:`DecoderLM.forward` takes a list of ``(Sequence, token ids)`` and runs all tokens as
one flat batch; attention is per sequence. Family files subclass it to change names or
blocks; ``registry.register`` makes them loadable.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from moetier.errors import WeightError
from moetier.layers.attention import Attention, Segments, Sequence
from moetier.layers.experts import ExpertProvider, ExpertWeights
from moetier.layers.linear import QLinear, linear
from moetier.layers.mlp import GatedMLP
from moetier.layers.moe import MoEBlock, RouterObserver, SoftmaxTopKRouter
from moetier.layers.norm import RMSNorm
from moetier.layers.rope import Rotary, rope_frequencies
from moetier.quant import QTensor
from moetier.quant import nbytes as q_nbytes
from moetier.spec import ModelSpec
from moetier.weights.safetensors_io import FLOAT_DTYPES, QInfo, SafetensorsIndex

__all__ = [
    "DecoderLM",
    "ExpertProvider",
    "ExpertProviderFactory",
    "ExpertReader",
    "ExpertWeights",
    "InMemoryExpertProvider",
    "Sequence",
]


# ---------------------------------------------------------------------------------------
# expert contracts


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. A float32 sum is ~40x faster than isfinite().all() on bf16; only
    when the sum is not finite (NaN/Inf, or a legitimate overflow) do the exact check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())



@dataclass(frozen=True)
class _ExpertTensors:
    """Where one layer's experts live in the checkpoint."""

    fused: bool
    # per-expert: name templates with {e}; fused: tensor names with leading [E] dim
    gate: str
    up: str
    down: str
    gate_up: str | None = None  # fused [E, 2I, H] (gate rows then up rows)


class ExpertReader:
    """Reads single routed experts from a checkpoint, in the runtime dtype.

    Supported layouts per MoE layer (``P`` = the layer's MoE prefix, e.g.
    ``model.layers.3.mlp``): per-expert ``P.experts.{e}.{gate,up,down}_proj.weight`` (or
    Mixtral's ``w1/w3/w2``), fused ``P.experts.gate_up_proj [E, 2I, H]`` +
    ``P.experts.down_proj [E, H, I]``, or fused ``P.experts.{gate,up,down}_proj [E, ...]``.
    All names and shapes are validated from the headers at construction (no data read).
    Families with other layouts override :meth:`read`.
    """

    PER_EXPERT_NAMES: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("gate_proj", "up_proj", "down_proj"),
        ("w1", "w3", "w2"),
    )

    def __init__(self, index: SafetensorsIndex, spec: ModelSpec, dtype: torch.dtype,
                 prefixes: Callable[[int], Seq[str]]):
        self.index, self.spec, self.dtype = index, spec, dtype
        self.layers: dict[int, _ExpertTensors] = {}
        H, I, E = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
        for layer in spec.moe_layer_ids:
            self.layers[layer] = self._find(layer, list(prefixes(layer)))
        # experts in a quantized format are read as QTensors (stored bytes, see ExpertWeights)
        self.quantized = any(index.is_quantized(n.format(e=0)) for t in self.layers.values()
                             for n in (t.gate_up, t.gate, t.up, t.down) if n)
        # validate shapes from headers
        for t in self.layers.values():
            if t.fused:
                if t.gate_up is not None:
                    self._check(t.gate_up, (E, 2 * I, H))
                else:
                    self._check(t.gate, (E, I, H))
                    self._check(t.up, (E, I, H))
                self._check(t.down, (E, H, I))
            else:
                for e in range(E):
                    self._check(t.gate.format(e=e), (I, H))
                    self._check(t.up.format(e=e), (I, H))
                    self._check(t.down.format(e=e), (H, I))

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        info = self.index.info(name)
        if info.shape != shape:
            raise WeightError(
                f"{info.file}: tensor '{name}' has shape {list(info.shape)} but config.json implies "
                f"{list(shape)} (hidden_size={self.spec.hidden_size}, expert intermediate size="
                f"{self.spec.expert_intermediate_size}, experts={self.spec.num_experts})"
            )
        if not isinstance(info, QInfo) and info.dtype not in FLOAT_DTYPES:
            raise WeightError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, expected a float type"
                              + (" (FP8 weights need their weight_scale_inv)" if info.dtype.startswith("F8") else ""))

    def _find(self, layer: int, prefixes: list[str]) -> _ExpertTensors:
        idx = self.index
        for p in prefixes:
            for g, u, d in self.PER_EXPERT_NAMES:
                gate = f"{p}.experts.{{e}}.{g}.weight"
                if gate.format(e=0) in idx:
                    return _ExpertTensors(False, gate, f"{p}.experts.{{e}}.{u}.weight", f"{p}.experts.{{e}}.{d}.weight")
            if f"{p}.experts.gate_up_proj" in idx:
                return _ExpertTensors(True, "", "", f"{p}.experts.down_proj", gate_up=f"{p}.experts.gate_up_proj")
            if f"{p}.experts.gate_proj" in idx:
                return _ExpertTensors(True, f"{p}.experts.gate_proj", f"{p}.experts.up_proj", f"{p}.experts.down_proj")
        raise WeightError(
            f"{idx.dir}: no routed-expert tensors for MoE layer {layer} (looked for "
            f"{prefixes[0]}.experts.0.gate_proj.weight, {prefixes[0]}.experts.gate_up_proj, ...)"
        )

    def _finite(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not all_finite(t):
            raise WeightError(f"{self.index.info(name).file}: tensor '{name}' contains NaN or Inf values")
        return t

    def _get(self, name: str, expert: int | None = None) -> torch.Tensor | QTensor:
        """A QTensor in its stored format (scales checked finite), or a plain tensor in
        ``self.dtype`` checked finite; ``expert`` reads that row of a fused [E, ...] tensor."""
        idx = self.index
        t = idx.read_q(name, self.dtype) if expert is None else idx.read_rows_q(name, expert, self.dtype)
        return t if isinstance(t, QTensor) else self._finite(name, t)

    def read(self, layer: int, expert: int) -> ExpertWeights:
        """Read one expert (validated finite) in ``self.dtype``, or in its stored format."""
        t = self.layers.get(layer)
        if t is None or not 0 <= expert < self.spec.num_experts:
            raise WeightError(f"layer {layer} expert {expert}: no such routed expert")
        if self.quantized:
            if t.fused:
                down = self._get(t.down, expert)
                if t.gate_up is not None:
                    return ExpertWeights(self._get(t.gate_up, expert), down)
                return ExpertWeights.from_parts(self._get(t.gate, expert), self._get(t.up, expert), down)
            return ExpertWeights.from_parts(*(self._get(n.format(e=expert)) for n in (t.gate, t.up, t.down)))
        if t.fused:
            down = self._finite(t.down, self.index.read_rows(t.down, expert, self.dtype))
            if t.gate_up is not None:  # already [2I, H] = cat(gate, up)
                gu = self._finite(t.gate_up, self.index.read_rows(t.gate_up, expert, self.dtype))
                return ExpertWeights(gu, down)
            gate = self._finite(t.gate, self.index.read_rows(t.gate, expert, self.dtype))
            up = self._finite(t.up, self.index.read_rows(t.up, expert, self.dtype))
        else:
            g, u, d = t.gate.format(e=expert), t.up.format(e=expert), t.down.format(e=expert)
            gi, ui = self.index.info(g), self.index.info(u)
            if gi.torch_dtype == ui.torch_dtype == self.dtype:  # read both halves in place: no cat
                I = gi.shape[0]
                gu = torch.empty((2 * I, gi.shape[1]), dtype=self.dtype)
                self.index.read_into(g, gu[:I])
                self.index.read_into(u, gu[I:])
                self._finite(g, gu[:I])
                self._finite(u, gu[I:])
                down = self._finite(d, self.index.read(d, self.dtype))
                return ExpertWeights(gu, down)
            gate, up, down = (self._finite(n, self.index.read(n, self.dtype)) for n in (g, u, d))
        return ExpertWeights.from_parts(gate, up, down)

    def layer_structure(self, layer: int) -> tuple[Any, ...] | None:
        """What fixes the stored layout of ``layer``'s experts, from the headers: per expert
        tensor its format (or dtype) and shape; None when unknown. Layers with equal structures
        share a slot layout (``moetier.weights.store``)."""
        t = self.layers.get(layer)
        if t is None:
            return None
        out = []
        for n in (t.gate_up, t.gate, t.up, t.down):
            if n:
                info = self.index.info(n.format(e=0))
                out.append((getattr(info, "fmt", None) or info.dtype, tuple(info.shape)))
        return tuple(out)

    def expert_nbytes(self) -> int:
        """Bytes of one expert in the runtime dtype (quantized: its stored bytes)."""
        s = self.spec
        if self.quantized:
            t = self.layers[s.moe_layer_ids[0]]
            names = [n for n in (t.gate_up, t.gate, t.up, t.down) if n]
            if t.fused:
                return sum(self.index.info(n).nbytes // s.num_experts for n in names)
            return sum(self.index.info(n.format(e=0)).nbytes for n in names)
        return 3 * s.hidden_size * s.expert_intermediate_size * torch.empty(0, dtype=self.dtype).element_size()


class InMemoryExpertProvider:
    """Default provider: every routed expert read once at load and kept in RAM."""

    stable_gets = True  # every get() result stays valid

    def __init__(self, experts: dict[tuple[int, int], ExpertWeights]):
        self.experts = experts

    @classmethod
    def from_reader(cls, spec: ModelSpec, reader: ExpertReader) -> InMemoryExpertProvider:
        return cls({(layer, e): reader.read(layer, e) for layer in spec.moe_layer_ids
                    for e in range(spec.num_experts)})

    def require(self, layer: int, expert_ids: Seq[int]) -> None:
        pass

    def get(self, layer: int, expert: int) -> ExpertWeights:
        return self.experts[(layer, expert)]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.experts.values())


ExpertProviderFactory = Callable[[ModelSpec, ExpertReader], ExpertProvider]


# ---------------------------------------------------------------------------------------
# the generic decoder

SMALL_BATCH_NO_ONEDNN = 4  # flat batches up to this many tokens run bf16 matmuls without oneDNN


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments,
                layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """Pre-norm decoder LM. Module names mirror the HF checkpoints without the ``model.`` prefix.

    Subclasses customise :meth:`make_attention`, :meth:`make_mlp`, :meth:`make_router`,
    :meth:`checkpoint_names` (for renamed tensors) and :meth:`expert_prefixes`.
    Construct on the meta device; :func:`moetier.runtime.load` assigns the real tensors.
    """

    family: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        H = spec.hidden_size
        # an explicit empty weight skips nn.Embedding's random init, which on the meta device
        # imports torch._dynamo (+80 MB of RSS, sympy and all, charged to a --max-ram budget)
        self.embed_tokens = nn.Embedding(spec.vocab_size, H, _weight=torch.empty(spec.vocab_size, H))
        self.layers = nn.ModuleList(
            DecoderLayer(self.make_attention(i), self.make_mlp(i), H, spec.rms_norm_eps)
            for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(H, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(H, spec.vocab_size, bias=False)
        self.rotary = self.make_rotary()
        self.observers: list[RouterObserver] = []
        self.native: Any = None  # a moetier.native.decode.NativeDecoder, set by moetier.load

    # ----- construction hooks -----
    def make_rotary(self) -> Rotary:
        s = self.spec
        inv, factor = rope_frequencies(s.head_dim, s.rope_theta, s.rope_scaling, s.max_position_embeddings)
        return Rotary(inv, factor)

    def make_attention(self, layer: int) -> nn.Module:
        s = self.spec
        window = s.sliding_window if s.layer_types[layer] == "sliding_attention" else None
        clip = s.raw.get("clip_qkv")
        return Attention(
            s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim,
            qkv_bias=s.attention_bias, o_bias=s.o_proj_bias, qk_norm=s.qk_norm, eps=s.rms_norm_eps,
            sliding_window=window, clip_qkv=float(clip) if clip is not None else None,
        )

    def make_router(self, layer: int) -> nn.Module:
        s = self.spec
        return SoftmaxTopKRouter(s.hidden_size, s.num_experts, s.top_k, s.norm_topk_prob,
                                 s.routed_scaling_factor, bias=s.router_bias)

    def make_mlp(self, layer: int) -> nn.Module:
        s = self.spec
        if not s.moe_layers[layer]:
            return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act, bias=bool(s.raw.get("mlp_bias", False)))
        shared = gate = None
        if s.shared_expert_intermediate_size:
            shared = GatedMLP(s.hidden_size, s.shared_expert_intermediate_size, s.hidden_act)
            if s.shared_expert_gate:
                gate = nn.Linear(s.hidden_size, 1, bias=False)
        return MoEBlock(layer, self.make_router(layer), shared, gate, act=s.hidden_act)

    # ----- checkpoint naming hooks -----
    def checkpoint_names(self, name: str) -> list[str]:
        """Candidate checkpoint names of our parameter ``name`` (first one present wins)."""
        if name.startswith("lm_head."):
            return [name]
        return [f"model.{name}"]

    def expert_prefixes(self, layer: int) -> list[str]:
        """Checkpoint prefixes under which layer ``layer``'s experts may live."""
        return [f"model.layers.{layer}.mlp"]

    def make_expert_reader(self, index: SafetensorsIndex, dtype: torch.dtype) -> ExpertReader:
        return ExpertReader(index, self.spec, dtype, self.expert_prefixes)

    # ----- runtime -----
    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: layer.mlp for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoEBlock)}

    def attach(self, provider: ExpertProvider) -> None:
        for block in self.moe_blocks().values():
            block.provider = provider
            block.observers = self.observers  # shared list: add/remove applies everywhere

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, items: list[tuple[Sequence, torch.Tensor]], all_logits: bool = False) -> torch.Tensor:
        """Run new tokens of several sequences as one flat batch; advance their caches.

        items: [(sequence, token ids [n_i])]. Returns float32 logits: [sum n_i, V] if
        ``all_logits`` else [len(items), V] (the last new token of each sequence).
        One new token of one sequence goes through ``self.native`` when it is set, any other batch
        through its ``step_many`` when it has one (native/prefill.py).
        """
        if self.native is not None and len(items) == 1 and items[0][1].shape[0] == 1:
            seq, toks = items[0]
            return self.native.step(seq, int(toks[0]))
        if self.native is not None and hasattr(self.native, "step_many") and items:
            return self.native.step_many(items, all_logits)
        segments: Segments = []
        ids, pos, start, top = [], [], 0, 0
        for seq, toks in items:
            n = toks.shape[0]
            if n == 0:
                raise ValueError("each item needs at least one new token")
            segments.append((seq, start, n))
            ids.append(toks)
            pos.append(torch.arange(seq.length, seq.length + n))
            top = max(top, seq.length + n - 1)
            start += n
        if len({id(s) for s, _, _ in segments}) != len(segments):
            raise ValueError("a sequence appears twice in one forward")
        tokens = ids[0] if len(ids) == 1 else torch.cat(ids)  # [T]
        positions = pos[0] if len(pos) == 1 else torch.cat(pos)  # [T]
        x = self.embed_tokens(tokens)  # [T, H]
        cos, sin = self.rotary.cos_sin(positions, x.dtype, top)  # [T, D]
        # oneDNN's bf16 matmul is ~10x slower than ATen's own bf16 gemv for a handful of rows
        # (measured: 1x1024 @ 1024x6144 12 ms vs 1.8 ms); use ATen's for small batches.
        small_bf16 = x.dtype == torch.bfloat16 and x.shape[0] <= SMALL_BATCH_NO_ONEDNN
        prev = torch._C._get_mkldnn_enabled()
        if small_bf16 and prev:
            torch._C._set_mkldnn_enabled(False)
        try:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, segments, i)
        finally:
            if small_bf16 and prev:
                torch._C._set_mkldnn_enabled(True)
        for seq, _, n in segments:
            seq.length += n
        if not all_logits:
            last = [s + n - 1 for _, s, n in segments]
            x = x[last] if len(last) > 1 or last[0] != x.shape[0] - 1 else x[-1:]
        x = self.norm(x)
        if isinstance(self.lm_head, QLinear):  # a quantized head: dequantized per use, float32 product
            return linear(x.float(), self.lm_head.qweight)
        return torch.nn.functional.linear(x, self.output_weight()).float()

    def dense_bytes_per_token(self) -> int:
        """Always-on weight bytes read per decode token (everything but the embedding table,
        of which one row is read; the output matrix is read whole even when tied)."""
        n = sum(p.numel() * p.element_size() for name, p in self.named_parameters()
                if not name.startswith("embed_tokens"))
        n += sum(q_nbytes(m.qweight) for m in self.modules() if isinstance(m, QLinear))
        w = self.embed_tokens.weight
        if self.lm_head is None:
            n += w.numel() * w.element_size()
        return n + w.shape[1] * w.element_size()


# ---------------------------------------------------------------------------------------
# loading the always-on weights


def _swap(net: nn.Module, owner: str, module: nn.Module) -> None:
    parent, _, child = owner.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def load_dense_weights(net: DecoderLM, index: SafetensorsIndex, dtype: torch.dtype,
                       check_finite: bool = True,
                       quantize: Callable[[str, torch.Tensor], QTensor | None] | None = None) -> None:
    """Read every always-on parameter of ``net`` (built on meta) from ``index`` and assign it.

    A linear weight stored quantized stays in its stored format: its ``nn.Linear`` becomes a
    :class:`~moetier.layers.linear.QLinear` holding the QTensor (other weights: ``dtype``).
    ``quantize(checkpoint name, weight)`` may turn a plain linear weight into a QTensor the
    same way (quantize at load); it returns None for weights to keep."""
    state: dict[str, torch.Tensor] = {}
    for name, p in list(net.state_dict(keep_vars=True).items()):
        cands = net.checkpoint_names(name)
        ck = next((c for c in cands if c in index), None)
        if ck is None:
            raise WeightError(
                f"{index.dir}: tensor '{cands[0]}' is missing from the checkpoint "
                f"(needed for {net.spec.architecture or net.spec.family})"
            )
        info = index.info(ck)
        if info.shape != tuple(p.shape):
            raise WeightError(
                f"{info.file}: tensor '{ck}' has shape {list(info.shape)} but config.json implies {list(p.shape)}"
            )
        owner, _, leaf = name.rpartition(".")
        mod = net.get_submodule(owner)
        split = getattr(index, "kv_b_split", None)  # GGUF MLA: attn_k_b / attn_v_b kept as stored
        parts = split(ck) if split is not None and leaf == "weight" else None
        if parts is not None:
            from moetier.layers.mla import SplitKVB

            _swap(net, owner, SplitKVB(*parts, num_heads=net.get_submodule(owner.rpartition(".")[0]).shape.num_heads,
                                       dtype=dtype))
            continue
        if isinstance(info, QInfo):
            if leaf != "weight" or not isinstance(mod, nn.Linear):
                raise WeightError(f"{info.where}: '{ck}' is stored as {info.fmt}, which moetier reads for linear "
                                  "layer weights only")
            q = index.read_q(ck)
            assert isinstance(q, QTensor)
            _swap(net, owner, QLinear.replacing(mod, q, dtype))
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise WeightError(f"{info.file}: tensor '{ck}' has dtype {info.dtype}, expected a float type")
        t = index.read(ck)
        if check_finite and not all_finite(t):
            raise WeightError(f"{info.file}: tensor '{ck}' contains NaN or Inf values")
        if quantize is not None and leaf == "weight" and type(mod) is nn.Linear:
            q = quantize(ck, t)
            if q is not None:
                _swap(net, owner, QLinear.replacing(mod, q, dtype))
                continue
        state[name] = t.to(dtype)
    net.load_state_dict(state, assign=True, strict=True)
    net.requires_grad_(False)
    net.eval()
    for m in net.modules():
        if isinstance(m, Attention):
            m.fuse_projections()

