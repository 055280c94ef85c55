"""``moetier.load()`` and the :class:`Model` object: logits, step (flat batch), generate.

Loading is in two independent parts: the always-on weights (attention, embeddings, norms,
routers, dense and shared FFNs) are read into the model; routed experts are exposed through
an :class:`~moetier.models.base.ExpertReader` and served by an ``ExpertProvider`` built by
``expert_provider_factory(spec, reader)`` (default: every expert in RAM).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules import module as _nn_module

from moetier.errors import ConfigError, MoetierError, WeightError
from moetier.generation import GenerationResult, Sampler, SamplingParams, TextStream
from moetier.layers.attention import Sequence
from moetier.layers.moe import RouterObserver
from moetier.models.base import (
    DecoderLM,
    ExpertProvider,
    ExpertProviderFactory,
    ExpertReader,
    InMemoryExpertProvider,
    load_dense_weights,
)
from moetier.models.registry import model_class
from moetier.quant import QTensor
from moetier.spec import ModelSpec, load_spec
from moetier.tokenizer import Tokenizer
from moetier.weights.safetensors_io import SafetensorsIndex

EMBEDDED_DIR = Path(__file__).parent / "data" / "embedded"

STEP_KINDS = ("decode", "prefill", "batch")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _global_module_hooks() -> bool:
    """Forward hooks registered for every module (``torch.nn.modules.module.register_module_forward_*``):
    then ``Model.step`` calls the network as a module even for a native whole step."""
    return bool(_nn_module._global_forward_pre_hooks or _nn_module._global_forward_hooks)


def resolve_dtype(dtype: str | torch.dtype, spec: ModelSpec) -> torch.dtype:
    """'auto' = bfloat16 for bf16 checkpoints, float32 otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"dtype {dtype}: expected torch.float32 or torch.bfloat16")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if spec.torch_dtype == "bfloat16" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_context(context: int | None, spec: ModelSpec) -> int:
    """``context`` (None: the model's window) checked against the window; returns it."""
    window = int(spec.max_position_embeddings)
    if context is None:
        return window
    if isinstance(context, bool) or not 0 < int(context) <= window:
        raise ConfigError(f"--context {context}: expected 1..{window} tokens ({spec.name}'s context window, "
                          "max_position_embeddings)")
    return int(context)


def default_provider(spec: ModelSpec, reader: ExpertReader) -> ExpertProvider:
    return InMemoryExpertProvider.from_reader(spec, reader)


def load(
    path: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    expert_provider_factory: ExpertProviderFactory | None = None,
    tokenizer: bool = True,
    threads: int | str | None = None,
    check_finite: bool = True,
    native: bool | None = None,
    hugepages: bool = True,
    context: int | None = None,
    quantize: str | None = None,
    quantize_all: bool = False,
    quantize_group: int | None = None,
    quantize_keep_head: bool = False,
) -> Model:
    """Load a checkpoint directory or a GGUF file (``None`` = the embedded model) for inference.

    dtype: "auto" | "float32" | "bfloat16" (weights and activations).
    expert_provider_factory: ``(spec, reader) -> ExpertProvider``; default keeps all in RAM.
    tokenizer: False to skip tokenizer.json (ids-only use).
    threads: CPU threads for torch and the native kernels. ``None`` (default) or ``"auto"``: chosen
    from the cores this process may use (affinity, cgroup quota) minus those other work is
    using, and re-chosen while the model runs (:mod:`moetier.threads`): a busy machine costs
    what it takes, not 10-100x (a 2-thread step waiting for a core another process holds).
    An int fixes the count (the fastest on an idle machine is one per physical core).
    native: single-token decode steps run in the native kernels (``moetier.native``) when the
    model's blocks are supported; ``None`` = yes unless ``MOETIER_NATIVE=0``; ``False`` = the
    torch path for every step. ``Model.native_reason`` says why a model runs without them.
    hugepages: pack the always-on weights (and in-RAM experts) into one mapping advised for
    transparent huge pages (``moetier.weights.arena``; faster decode, same values).
    context: the longest sequence (prompt + completion) to allow, at most the model's window
    (``max_position_embeddings``, the default); with ``max_ram`` the budget reserves KV cache
    for it. Prompts beyond it are refused (:attr:`Model.context_limit`).
    quantize: "int4" | "int8" | "fp8": keep routed experts (with ``quantize_all``, every linear
    weight but embeddings / routers, and the LM head unless ``quantize_keep_head``: int8 g128
    under int4, a tied head as its own copy) quantized at load, ``quantize_group`` values per
    scale (``moetier.quant.atload``); weights stored quantized stay as stored.
    With weight-hierarchy options (``max_ram``, ``policy``, ``expert_cache``, ``prefetch``,
    ``plan``, ...) :func:`moetier.load` goes to :func:`moetier.weights.tiered.load` instead, which
    sizes a cache over the files and calls this with its expert provider.
    """
    auto = _thread_setting(threads)
    d = Path(path) if path is not None else EMBEDDED_DIR
    index: Any
    if d.suffix == ".gguf" and d.is_file():  # llama.cpp's format: spec, tokenizer and tensors from one file
        from moetier.gguf_tokenizer import gguf_tokenizer
        from moetier.weights.gguf_io import GGUFIndex

        index = GGUFIndex(d)
        spec = index.spec()
    elif not d.is_dir():
        if path is None:
            raise MoetierError(f"{d}: the embedded model is not installed (pass a model directory)")
        raise ConfigError(f"{d}: not a model directory (expected config.json, *.safetensors, tokenizer.json) "
                          "or a .gguf file")
    else:
        spec = load_spec(d)
        index = None
    window = check_context(context, spec)
    cls = model_class(spec)
    dt = resolve_dtype(dtype, spec)
    tok = None
    if tokenizer:
        eos = spec.raw.get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)]
        tok = gguf_tokenizer(index.meta, str(d), extra) if index is not None else Tokenizer(d, extra_eos_ids=extra)
    if index is None:
        index = SafetensorsIndex(d, quant=spec.quantization)
    with torch.device("meta"):
        net = cls(spec)
    reader = None
    if spec.is_moe:  # validates expert headers
        if isinstance(index, SafetensorsIndex):
            reader = net.make_expert_reader(index, dt)
        else:
            from moetier.weights.gguf_io import expert_reader

            reader = expert_reader(index, spec, dt)
    qdense = None
    if quantize is not None or quantize_all or quantize_keep_head:
        from moetier.quant import atload

        group = atload.check(quantize, quantize_group)
        assert quantize is not None
        if quantize_keep_head and not quantize_all:
            raise ConfigError("quantize_keep_head=True needs quantize_all=True (the LM head is quantized only with it)")
        if reader is not None:
            reader = atload.QuantizingExpertReader(reader, quantize, group)
        if quantize_all:
            qdense = atload.weight_quantizer(quantize, group, quantize_keep_head)
    load_dense_weights(net, index, dt, check_finite=check_finite, quantize=qdense)
    if qdense is not None and net.lm_head is None:  # tied: the head gets its own quantized copy
        atload.tied_head(net, quantize, group, quantize_keep_head)
    provider: ExpertProvider | None = None
    if reader is not None:
        provider = (expert_provider_factory or default_provider)(spec, reader)
        net.attach(provider)
    model = Model(spec, net, tok, provider, reader, d)
    model.context_limit = window
    if hugepages:
        from moetier.weights.arena import rehome

        model.arena = rehome(net, provider)  # before the native decoder takes weight addresses
    if native is False:
        model.native_reason = "turned off (native=False)"
    else:
        from moetier.native import decode as native_decode

        fmts = quantized_formats(net, reader)
        # the native decoder lists the stored formats it reads in SUPPORTED_FORMATS (kernels branch)
        missing = sorted(fmts - set(getattr(native_decode, "SUPPORTED_FORMATS", ())))
        if missing:
            model.native_reason = f"weights stored as {', '.join(missing)} (torch path: dequantized per use)"
        else:
            net.native, model.native_reason = native_decode.build(net)
    model.auto_threads = auto
    if auto is not None:
        auto.update()  # the first choice (the load itself was the sampling window)
    return model


def quantized_formats(net: DecoderLM, reader: ExpertReader | None) -> set[str]:
    """The ``moetier.quant`` formats the model's weights are stored in (empty: all plain)."""
    from moetier.layers.linear import QLinear

    fmts = {m.qweight.fmt for m in net.modules() if isinstance(m, QLinear)}
    if reader is not None and getattr(reader, "quantized", False):
        layer = net.spec.moe_layer_ids[0]
        w = reader.read(layer, 0)
        fmts |= {x.fmt for x in (w.gate_up, w.down, *(w.split or ())) if isinstance(x, QTensor)}
    return fmts


def _thread_setting(threads: int | str | None) -> Any:
    """Apply a fixed ``threads``; for ``None``/``"auto"`` return the process's AutoThreads."""
    from moetier import threads as mt_threads

    if threads is None or threads == "auto":
        return mt_threads.auto()  # starts sampling the load now
    try:
        n = int(threads)
    except (TypeError, ValueError):
        n = 0
    if isinstance(threads, bool) or n < 1:
        raise ConfigError(f"threads: expected a positive int or 'auto', got {threads!r}")
    torch.set_num_threads(n)
    return None


class Model:
    """A loaded model. Thread-unsafe; one forward at a time."""

    def __init__(self, spec: ModelSpec, net: DecoderLM, tokenizer: Tokenizer | None,
                 provider: ExpertProvider | None, reader: ExpertReader | None, path: Path):
        self.spec, self.net, self._tokenizer = spec, net, tokenizer
        self.provider, self.expert_reader, self.path = provider, reader, path
        self.native_reason: str | None = None  # why decode steps do not run natively (None: they do)
        self.arena: Any = None  # the huge-page mapping holding the weights, if any
        # positions a sequence may reach: the model's window, or the KV a --max-ram budget reserved
        self.context_limit = int(spec.max_position_embeddings)
        self.auto_threads: Any = None  # moetier.threads.AutoThreads when threads follow the load
        self.step_counts = dict.fromkeys(STEP_KINDS, 0)  # forward steps by kind, see compute_paths()

    # ----- basics -----
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise MoetierError(f"{self.path}: model was loaded with tokenizer=False")
        return self._tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    def new_sequence(self, capacity: int = 0) -> Sequence:
        return Sequence(self.spec.num_layers, capacity=capacity)

    def _ids(self, token_ids: Seq[int] | torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Validated ids as a tensor and as a list (checked in Python: no tensor reductions)."""
        if isinstance(token_ids, torch.Tensor):
            ids = token_ids.reshape(-1).tolist()
        else:
            ids = [int(i) for i in token_ids]
        if ids and (min(ids) < 0 or max(ids) >= self.spec.vocab_size):
            raise MoetierError(f"token ids must be in [0, {self.spec.vocab_size}); got {min(ids)}..{max(ids)}")
        return torch.tensor(ids, dtype=torch.long), ids

    def step(self, items: Seq[tuple[Sequence, Seq[int] | torch.Tensor]], all_logits: bool = False) -> torch.Tensor:
        """One forward of a flat batch: [(sequence, new token ids)] -> float32 logits.

        Returns [len(items), V] (last new token per sequence) or, with ``all_logits``,
        [total new tokens, V] in item order.
        """
        if self.auto_threads is not None:
            self.auto_threads.update()  # re-chosen at most every threads.INTERVAL seconds
        if len(items) == 1:  # one token (a list of one int) of one sequence: straight to the native decoder
            seq, toks = items[0]
            if type(toks) is list and len(toks) == 1 and type(toks[0]) is int and 0 <= toks[0] < self.spec.vocab_size:
                net = self.net
                native = net.native
                if getattr(native, "direct_steps", False) and not (
                        net._forward_pre_hooks or net._forward_hooks or _global_module_hooks()):
                    seq.tokens.append(toks[0])
                    self.step_counts["decode"] += 1
                    return native.step(seq, toks[0])  # what net.forward would call, minus ~10 us of Python
        return self._step(items, all_logits)

    @torch.inference_mode()
    def _step(self, items: Seq[tuple[Sequence, Seq[int] | torch.Tensor]], all_logits: bool) -> torch.Tensor:
        batch = []
        for seq, toks in items:
            t, ids = self._ids(toks)
            batch.append((seq, t))
            seq.tokens.extend(ids)
        kind = "batch" if len(batch) > 1 else "decode" if batch and batch[0][1].shape[0] == 1 else "prefill"
        self.step_counts[kind] += 1
        return self.net(batch, all_logits=all_logits)

    def compute_paths(self) -> dict[str, dict[str, Any]]:
        """Per kind of step -- ``decode`` (one token of one sequence), ``prefill`` (several tokens of
        one sequence), ``batch`` (several sequences) -- the path it runs on (``native``/``torch``),
        why not native (``None`` when native), and how many such steps ran."""
        dec = self.net.native
        why_not = None if dec is not None else (self.native_reason or "no native decoder")
        many = None if hasattr(dec, "step_many") else (
            f"native multi-token steps cover the generic, MLA, gpt-oss and Llama-4 families; "
            f"{type(dec).__name__} decodes natively one token at a time (torch path)")
        reasons = {
            "decode": why_not,
            "prefill": why_not or many,
            "batch": why_not or many,
        }
        return {k: {"path": "native" if reasons[k] is None else "torch", "reason": reasons[k],
                    "steps": self.step_counts[k]} for k in STEP_KINDS}

    def thread_setting(self) -> dict[str, Any]:
        """How the thread count is chosen (``auto`` with the measured load, or fixed) and its value."""
        if self.auto_threads is not None:
            return self.auto_threads.describe()
        return {"mode": "fixed", "threads": torch.get_num_threads()}

    def warmup(self) -> None:
        """One throwaway single-token forward (first-call allocations / kernel setup), so that
        timings of the next generation measure steady state."""
        self.step([(self.new_sequence(capacity=2), [0])])

    def logits(self, token_ids: Seq[int] | torch.Tensor) -> torch.Tensor:
        """Full prefill of a fresh sequence: [len, vocab] float32."""
        seq = self.new_sequence(capacity=len(token_ids))
        return self.step([(seq, token_ids)], all_logits=True)

    # ----- routing hooks -----
    def add_router_observer(self, fn: RouterObserver) -> None:
        """``fn(layer, topk_ids [T, k], topk_weights [T, k])`` after every MoE routing."""
        self.net.observers.append(fn)

    def remove_router_observer(self, fn: RouterObserver) -> None:
        self.net.observers.remove(fn)

    @torch.inference_mode()
    def route(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply layer ``layer``'s router to ``hidden`` [T, H] (normed input of that layer's FFN)."""
        block = self.net.moe_blocks().get(layer)
        if block is None:
            raise MoetierError(f"layer {layer} is not an MoE layer (MoE layers: {list(self.spec.moe_layer_ids)})")
        return block.route(hidden.to(self.dtype))

    # ----- generation -----
    def encode_prompt(self, prompt: str | Seq[Mapping[str, Any]], chat: bool = False) -> list[int]:
        tok = self.tokenizer
        if not isinstance(prompt, str):  # control tokens only from the template (content is text)
            return tok.encode_chat(prompt)
        if chat:
            return tok.encode_chat([{"role": "user", "content": prompt}])
        return tok.encode(prompt)

    def context_message(self, n: int) -> str:
        if self.context_limit < self.spec.max_position_embeddings:
            why = f"the --context {self.context_limit} tokens" + (
                " the --max-ram budget reserved KV cache for" if getattr(self, "memory_budget", None) else "")
        else:
            why = f"the model's context window of {self.context_limit} tokens (max_position_embeddings)"
        return f"the prompt is {n} tokens, longer than {why}; shorten it"

    @torch.inference_mode()
    def generate_ids(
        self,
        prompt_ids: Seq[int],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Seq[str] | None = None,
        stop_ids: Seq[int] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_token: Callable[[int], None] | None = None,
        sequence: Sequence | None = None,
    ) -> GenerationResult:
        """Decode up to ``max_tokens`` after ``prompt_ids``.

        Stops on an eos id (``tokenizer.eos_token_ids`` + ``stop_ids``), a stop string
        (requires the tokenizer; the text is cut before it), ``max_tokens``, or when the
        sequence fills :attr:`context_limit` (finish "length"). A prompt longer than the
        context limit is refused, naming both numbers.
        """
        if max_tokens < 0:
            raise MoetierError(f"--max-tokens must be >= 0, got {max_tokens}")
        if not len(prompt_ids) and sequence is None:
            raise MoetierError("the prompt is empty (no tokens)")
        start = (sequence.length if sequence is not None else 0) + len(prompt_ids)
        if start > self.context_limit:
            raise MoetierError(self.context_message(start))
        max_tokens = min(max_tokens, self.context_limit - start)
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed))
        eos = set(stop_ids or ())
        if self._tokenizer is not None:
            eos |= set(self._tokenizer.eos_token_ids)
        stream = TextStream(self._tokenizer.decode, stop or ()) if self._tokenizer is not None else None
        seq = sequence or self.new_sequence(capacity=len(prompt_ids) + max_tokens)
        out: list[int] = []
        finish = "length"
        t0 = time.perf_counter()
        prefill_s, decode_s, steps = 0.0, 0.0, 0
        if len(prompt_ids) or max_tokens > 0:  # the prefill runs (and is timed) even for --max-tokens 0
            logits = self.step([(seq, prompt_ids)])
            prefill_s = time.perf_counter() - t0
        if max_tokens > 0:
            t1 = time.perf_counter()
            while True:
                tok = int(sampler(logits)[0])
                if tok in eos:
                    finish = "eos"
                    break
                out.append(tok)
                if on_token is not None:
                    on_token(tok)
                if stream is not None:
                    piece = stream.push(tok)
                    if piece and on_text is not None:
                        on_text(piece)
                    if stream.stopped:
                        finish = "stop"
                        break
                if len(out) >= max_tokens:
                    break
                logits = self.step([(seq, [tok])])
                steps += 1
            decode_s = time.perf_counter() - t1
        text = ""
        if stream is not None:
            if finish != "stop":
                rest = stream.flush()
                if rest and on_text is not None:
                    on_text(rest)
            text = stream.text
        timings = {"prefill_s": prefill_s, "decode_s": decode_s, "total_s": time.perf_counter() - t0}
        return GenerationResult(list(prompt_ids), out, text, finish, prefill_s, decode_s, steps, timings)

    def generate(
        self,
        prompt: str | Seq[Mapping[str, Any]],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Seq[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        chat: bool = False,
    ) -> str:
        """Generate text after ``prompt`` (a string, or chat messages rendered by the template)."""
        ids = self.encode_prompt(prompt, chat=chat)
        return self.generate_ids(ids, max_tokens, temperature, top_k, top_p, seed, stop=stop,
                                 on_text=on_text).text


__all__ = ["EMBEDDED_DIR", "Model", "WeightError", "load"]
