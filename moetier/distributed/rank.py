"""One rank of an expert-parallel job: :func:`load` is ``moetier.load`` for one rank: the rank keeps only
the routed experts its placement gives it, and its MoE blocks dispatch through the group
(:mod:`moetier.distributed.executor`). Rank 0 runs the model; the other ranks call
``group.serve(model)`` until rank 0 calls ``group.stop()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moetier.distributed.executor import (
    DEFAULT_EXCHANGE,
    DistributedError,
    EPGroup,
    ExpertParallelProvider,
    model_digest,
)
from moetier.distributed.placement import EPPlacement, contiguous
from moetier.layers import moe as _moe

_original_dispatch = _moe.dispatch


def _ep_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int,
                 provider: Any, glu: Any) -> torch.Tensor:
    if isinstance(provider, ExpertParallelProvider):
        return provider.dispatch(x, topk_ids, topk_weights, layer, glu)
    return _original_dispatch(x, topk_ids, topk_weights, layer, provider, glu)


def install() -> None:
    """Route MoE blocks whose provider is an :class:`ExpertParallelProvider` through the group
    (other providers: unchanged). Idempotent."""
    from moetier.models import llama4

    _moe.dispatch = _ep_dispatch
    llama4.dispatch = _ep_dispatch  # type: ignore[attr-defined]


class ExpertParallelDecode:
    """``DecoderLM.native`` under expert parallelism: the native decoder's single-token ``step`` (its
    MoE layers exchange rows through the group: ``ExpertParallelProvider.native_moe``) and its
    multi-token ``step_many`` (prompts, batched steps: ``ManyStepper._experts`` hands each MoE
    layer's tokens to ``ExpertParallelProvider.native_many``), for every native decoder."""

    def __init__(self, dec: Any):
        self.dec = dec

    def step(self, seq: Any, token: int) -> torch.Tensor:
        return self.dec.step(seq, token)

    def step_many(self, items: Any, all_logits: bool = False) -> torch.Tensor:
        return self.dec.step_many(items, all_logits)


def _native_everywhere(mine: bool) -> bool:
    """True when every rank built a native decoder (a rank without one turns it off for all)."""
    import torch.distributed as dist

    t = torch.tensor([int(mine)], dtype=torch.long)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    except (RuntimeError, dist.DistBackendError) as e:
        raise DistributedError(f"native decode agreement with the other ranks failed ({e})") from None
    return bool(t.item())


def load(path: str | Path | None, rank: int, world: int, placement: EPPlacement | None = None,
         dtype: str | torch.dtype = "auto", timeout_s: float | None = None, exchange: str = DEFAULT_EXCHANGE,
         native: bool | None = None, **kw: Any) -> tuple[Any, EPGroup]:
    """Load one rank's share of an expert-parallel model (after :func:`init`).

    placement: default contiguous. Weight-hierarchy options in ``kw`` (``max_ram``, ``expert_cache``,
    ``policy``, ...) give the rank its own tiered provider over its share of the experts, sized by
    its own budget (prefetch off). Checks with the other ranks that all loaded the same model,
    dtype and placement (raises :class:`DistributedError` otherwise), and returns once every
    rank has loaded. ``timeout_s``: the step collectives' timeout (default ``MOETIER_EP_TIMEOUT``
    or 60 s). ``exchange``: ``"replicated"`` (every rank runs the always-on compute; rank 0's
    ``model.step`` tells the followers what to step) or ``"direct"`` (rank 0 alone runs it and sends
    rows to the experts' ranks). ``native`` (default: on with ``direct``, off with ``replicated``):
    decode steps run in the native kernels on every rank (:class:`ExpertParallelDecode`), the
    experts' float32 rows exchanged per MoE layer (bit-identical to one native process), when every
    rank can build the native decoder for the model (every family; Llama-4-style weighted expert
    inputs only with top-1; else the torch path everywhere, ``model.native_reason`` says why).
    Prompts and batched steps run natively too (:class:`ExpertParallelDecode`).
    """
    from moetier.models.base import InMemoryExpertProvider
    from moetier.runtime import EMBEDDED_DIR, resolve_dtype
    from moetier.runtime import load as load_model
    from moetier.spec import load_spec

    d = Path(path) if path is not None else EMBEDDED_DIR
    spec = load_spec(d)
    if not spec.is_moe:
        raise DistributedError(f"{d}: not a mixture-of-experts model (expert parallelism needs routed experts)")
    placement = placement or contiguous(spec.num_experts, world)
    if placement.ranks != world:
        raise DistributedError(f"placement has {placement.ranks} ranks, the job has {world}")
    if native is None:
        native = exchange == "direct"
    if native and exchange != "direct":
        raise DistributedError(f"native decode under expert parallelism needs --ep-exchange direct (not {exchange})")
    group = EPGroup(rank, world, placement, timeout_s=timeout_s, exchange=exchange)
    group.check_same(model_digest(d, resolve_dtype(dtype, spec), placement, exchange, native=native))
    install()
    mine = sorted(set(placement.device_experts[rank]))

    from moetier.weights import tiered

    if tiered.hierarchy_options_given(kw):  # this rank's own hierarchy over its share (--max-ram per rank)
        if kw.get("prefetch"):
            raise DistributedError("--prefetch under expert parallelism: not supported (rank 0's router guesses "
                                   "would read experts other ranks hold); use --no-prefetch")
        kw["prefetch"] = False
        model = tiered.load(d, dtype=dtype, native=None if native else False,
                            wrap=lambda local: ExpertParallelProvider(local, group),
                            experts_held=len(mine) * len(spec.moe_layer_ids), **kw)
    else:
        def factory(spec: Any, reader: Any) -> ExpertParallelProvider:
            local = InMemoryExpertProvider({(lyr, e): reader.read(lyr, e) for lyr in spec.moe_layer_ids
                                            for e in mine})
            return ExpertParallelProvider(local, group)

        model = load_model(d, dtype=dtype, expert_provider_factory=factory,
                           native=None if native else False, **kw)
    from moetier.native.decode import NativeDecoder
    from moetier.native.gpt_oss import ExtDecoder
    from moetier.native.mla import MLADecoder

    dec = model.net.native
    # their MoE layers call the provider's native_moe (gpt-oss / Llama-4: unless top-k > 1 on a weighted input)
    ok = type(dec) in (NativeDecoder, MLADecoder) or (isinstance(dec, ExtDecoder) and dec.ep_reason() is None)
    if native and not _native_everywhere(ok):
        ok = False
        model.native_reason = (model.native_reason if dec is None else
                               f"off under expert parallelism ({type(dec).__name__}: {dec.ep_reason()})"
                               if isinstance(dec, ExtDecoder) and dec.ep_reason() is not None else
                               "off: another rank could not build it")
    elif not native:
        model.native_reason = "off under expert parallelism (native=False, or --ep-exchange replicated)"
    model.net.native = ExpertParallelDecode(dec) if ok else None
    group.configure(spec.hidden_size, model.dtype, spec.top_k, native=dec if ok else None)
    if exchange == "replicated" and rank == 0:
        model.step = group.mirrored(model)  # every step is run by every rank
    group.ready()
    return model, group
