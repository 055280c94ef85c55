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

gpt-oss's MXFP4 release stores ``gate_up_proj`` / ``down_proj`` as ``*_blocks`` + ``*_scales``
with rows = output features (``[E, 2I, H]`` / ``[E, H, I]`` logically, the ``nn.Linear``
layout, not transposed); those experts stay MXFP4 QTensors: gate and up are the strided
row views ``[0::2]`` / ``[1::2]`` of the expert's ``gate_up`` blocks (no copy).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import replace

import torch

from moetier.errors import WeightError
from moetier.models.base import ExpertReader, ExpertWeights
from moetier.quant import QTensor
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
            q = index.is_quantized(f"{p}.gate_up_proj")  # stored [E, out, in] (nn.Linear layout)
            self._check(f"{p}.gate_up_proj", (E, 2 * I, H) if q else (E, H, 2 * I))
            self._check(f"{p}.down_proj", (E, H, I) if index.is_quantized(f"{p}.down_proj") else (E, I, H))
            if biases:
                self._check(f"{p}.gate_up_proj_bias", (E, 2 * I))
                self._check(f"{p}.down_proj_bias", (E, H))

        self.quantized = any(index.is_quantized(f"{p}.{n}") for p in self.prefix.values()
                             for n in ("gate_up_proj", "down_proj"))

    def _row(self, name: str, expert: int) -> torch.Tensor:
        return self._finite(name, self.index.read_rows(name, expert, self.dtype))

    def _weight(self, name: str, expert: int) -> torch.Tensor | QTensor:
        """[out, in]: a QTensor as stored, or the transpose of the stored [in, out] tensor."""
        w = self._get(name, expert)
        return w if isinstance(w, QTensor) else w.T

    @staticmethod
    def _rows(w: torch.Tensor | QTensor, start: int, step: int, n: int) -> torch.Tensor | QTensor:
        if not isinstance(w, QTensor):
            return w[start : start + step * n : step]
        if step == 1:
            return w.row_slice(start, start + n)
        # strided row view (block rows == 1 for MXFP4 / int groups): no copy
        assert w.block[0] == 1 and w.scale is not None
        return replace(w, shape=(n, w.cols), data=w.data[start::step], scale=w.scale[start::step],
                       zero=None if w.zero is None else w.zero[start::step])

    def read(self, layer: int, expert: int) -> ExpertWeights:
        p = self.prefix.get(layer)
        if p is None or not 0 <= expert < self.spec.num_experts:
            raise WeightError(f"layer {layer} expert {expert}: no such routed expert")
        I = self.spec.expert_intermediate_size
        gu = self._weight(f"{p}.gate_up_proj", expert)  # [2I, H]
        down = self._weight(f"{p}.down_proj", expert)  # [H, I]
        gate, up = ((self._rows(gu, 0, 2, I), self._rows(gu, 1, 2, I)) if self.interleaved
                    else (self._rows(gu, 0, 1, I), self._rows(gu, I, 1, I)))
        gb = ub = db = None
        if self.biases:
            b = self._row(f"{p}.gate_up_proj_bias", expert)  # [2I]
            gb, ub = (b[0::2], b[1::2]) if self.interleaved else (b[:I], b[I:])
            db = self._row(f"{p}.down_proj_bias", expert).contiguous()  # [H]
        return ExpertWeights.from_parts(gate, up, down, gb, ub, db)

    def expert_nbytes(self) -> int:
        s = self.spec
        if self.quantized:
            p = self.prefix[s.moe_layer_ids[0]]
            names = ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"] if self.biases else [])
            return sum(self.index.info(f"{p}.{n}").nbytes // s.num_experts for n in names)
        n = 3 * s.hidden_size * s.expert_intermediate_size
        if self.biases:
            n += 2 * s.expert_intermediate_size + s.hidden_size
        return n * torch.empty(0, dtype=self.dtype).element_size()
