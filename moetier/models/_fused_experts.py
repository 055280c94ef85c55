"""Reader for fused, *transposed* expert tensors (gpt-oss, Llama-4).

transformers stores these families' routed experts as one tensor per layer, laid out for
``x @ W`` rather than ``nn.Linear``::

    P.gate_up_proj       [E, H, 2I]   gpt-oss: gate/up interleaved on the last dim
                                      (gate = [..., 0::2], up = [..., 1::2]);
                                      Llama-4: gate = [..., :I], up = [..., I:]
    P.gate_up_proj_bias  [E, 2I]      gpt-oss only, same interleaving
    P.down_proj          [E, I, H]
    P.down_proj_bias     [E, H]       gpt-oss only

:class:`TransposedFusedExpertReader` reads one expert's slice (``read_rows``: one pread per
tensor) and normalises it to :class:`~moetier.models.base.ExpertWeights` (``gate_up`` [2I, H]
= cat(gate, up), ``down`` [H, I]), so the providers, the cache and the dispatch see the same
layout as every other family.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from moetier.errors import WeightError
from moetier.models.base import ExpertReader, ExpertWeights
from moetier.spec import ModelSpec
from moetier.weights.safetensors_io import SafetensorsIndex


class TransposedFusedExpertReader(ExpertReader):
    """Experts under ``{prefix}.gate_up_proj`` / ``{prefix}.down_proj`` (+ ``_bias``).

    ``prefixes(layer)`` lists candidate prefixes of the experts themselves (e.g.
    ``model.layers.3.mlp.experts``); the first one holding ``gate_up_proj`` wins.
    """

    def __init__(self, index: SafetensorsIndex, spec: ModelSpec, dtype: torch.dtype,
                 prefixes: Callable[[int], Seq[str]], *, interleaved: bool, biases: bool):
        self.index, self.spec, self.dtype = index, spec, dtype
        self.interleaved, self.biases = interleaved, biases
        H, I, E = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
        self.prefix: dict[int, str] = {}
        for layer in spec.moe_layer_ids:
            cands = list(prefixes(layer))
            p = next((c for c in cands if f"{c}.gate_up_proj" in index), None)
            if p is None:
                raise WeightError(
                    f"{index.dir}: no routed-expert tensors for MoE layer {layer} "
                    f"(looked for {cands[0]}.gate_up_proj [E, H, 2I])"
                )
            self.prefix[layer] = p
            self._check(f"{p}.gate_up_proj", (E, H, 2 * I))
            self._check(f"{p}.down_proj", (E, I, H))
            if biases:
                self._check(f"{p}.gate_up_proj_bias", (E, 2 * I))
                self._check(f"{p}.down_proj_bias", (E, H))

    def _row(self, name: str, expert: int) -> torch.Tensor:
        return self._finite(name, self.index.read_rows(name, expert, self.dtype))

    def read(self, layer: int, expert: int) -> ExpertWeights:
        p = self.prefix.get(layer)
        if p is None or not 0 <= expert < self.spec.num_experts:
            raise WeightError(f"layer {layer} expert {expert}: no such routed expert")
        I = self.spec.expert_intermediate_size
        gu = self._row(f"{p}.gate_up_proj", expert).T  # [2I, H]
        down = self._row(f"{p}.down_proj", expert).T  # [H, I]
        gate, up = (gu[0::2], gu[1::2]) if self.interleaved else (gu[:I], gu[I:])
        gb = ub = db = None
        if self.biases:
            b = self._row(f"{p}.gate_up_proj_bias", expert)  # [2I]
            gb, ub = (b[0::2], b[1::2]) if self.interleaved else (b[:I], b[I:])
            db = self._row(f"{p}.down_proj_bias", expert).contiguous()  # [H]
        return ExpertWeights.from_parts(gate, up, down, gb, ub, db)

    def expert_nbytes(self) -> int:
        s = self.spec
        n = 3 * s.hidden_size * s.expert_intermediate_size
        if self.biases:
            n += 2 * s.expert_intermediate_size + s.hidden_size
        return n * torch.empty(0, dtype=self.dtype).element_size()
