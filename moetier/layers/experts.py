"""The routed-expert contracts every MoE block and expert provider share.

* :class:`ExpertWeights` - one routed expert, normalised: ``gate [I, H]``, ``up [I, H]``,
  ``down [H, I]`` (+ optional biases). Stored as one ``gate_up [2I, H]`` tensor so every
  provider feeds the same fused matmul (bit-identical results between providers);
  ``gate``/``up`` are views of it.
* :class:`ExpertProvider` - ``require(layer, expert_ids)`` then ``get(layer, expert)``.

They live under ``layers/`` so that :mod:`moetier.layers.moe` and :mod:`moetier.models.base`
(which re-exports them, with the default in-RAM provider and the checkpoint reader) both
import them from here, one direction.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from moetier.errors import WeightError
from moetier.quant import QTensor


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """One routed expert. ``gate_up`` [2I, H] = cat(gate, up); ``down`` [H, I].

    Quantized experts (``moetier.quant``) hold :class:`~moetier.quant.QTensor` s in their
    stored format: ``down`` may be a QTensor, and ``gate_up`` one QTensor [2I, H], or ``None``
    with gate and up as two separate QTensors in ``split`` (each [I, H]; possibly strided row
    views of one stored tensor, e.g. gpt-oss's interleaved rows). Biases stay plain tensors.
    """

    gate_up: torch.Tensor | QTensor | None
    down: torch.Tensor | QTensor
    gate_up_bias: torch.Tensor | None = None  # [2I]
    down_bias: torch.Tensor | None = None  # [H]
    split: tuple[QTensor, QTensor] | None = None  # (gate [I, H], up [I, H]) when gate_up is None

    @classmethod
    def from_parts(
        cls,
        gate: torch.Tensor | QTensor,
        up: torch.Tensor | QTensor,
        down: torch.Tensor | QTensor,
        gate_bias: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> ExpertWeights:
        gu_bias = None
        if gate_bias is not None or up_bias is not None:
            like = gate_bias if gate_bias is not None else up_bias
            zeros = torch.zeros(gate.shape[0], dtype=like.dtype)
            gu_bias = torch.cat([gate_bias if gate_bias is not None else zeros,
                                 up_bias if up_bias is not None else zeros])
        if isinstance(down, torch.Tensor):
            down = down.contiguous()
        if isinstance(gate, QTensor) or isinstance(up, QTensor):
            if not (isinstance(gate, QTensor) and isinstance(up, QTensor)):
                raise WeightError("an expert's gate and up projections must both be quantized or both plain")
            return cls(None, down, gu_bias, down_bias, split=(gate, up))
        return cls(torch.cat([gate, up]).contiguous(), down, gu_bias, down_bias)

    @property
    def intermediate(self) -> int:
        return self.down.shape[1]

    @property
    def quantized(self) -> bool:
        return self.split is not None or isinstance(self.gate_up, QTensor) or isinstance(self.down, QTensor)

    def _half(self, i: int) -> torch.Tensor | QTensor:
        if self.split is not None:
            return self.split[i]
        gu, n = self.gate_up, self.intermediate
        assert gu is not None
        if isinstance(gu, QTensor):
            return gu.row_slice(i * n, (i + 1) * n)
        return gu[i * n : (i + 1) * n]

    @property
    def gate(self) -> torch.Tensor | QTensor:  # [I, H]
        return self._half(0)

    @property
    def up(self) -> torch.Tensor | QTensor:  # [I, H]
        return self._half(1)

    @property
    def gate_bias(self) -> torch.Tensor | None:
        return None if self.gate_up_bias is None else self.gate_up_bias[: self.intermediate]

    @property
    def up_bias(self) -> torch.Tensor | None:
        return None if self.gate_up_bias is None else self.gate_up_bias[self.intermediate :]

    @property
    def nbytes(self) -> int:
        """Bytes held (stored bytes for quantized parts)."""
        return sum(t.numel() * t.element_size() for _, t in self.leaves())

    # ----- storage leaves: the tensors that hold the bytes (slots, arena) -----
    _FIELDS: ClassVar[tuple[str, ...]] = ("gate_up", "down", "gate_up_bias", "down_bias")

    def _weights(self) -> list[tuple[str, torch.Tensor | QTensor | None]]:
        ws = [(f, getattr(self, f)) for f in self._FIELDS]
        if self.split is not None:
            ws += [("gate", self.split[0]), ("up", self.split[1])]
        return ws

    def leaves(self) -> list[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` of every storage tensor: plain weights and biases by field name,
        a QTensor's parts as ``field.data`` / ``field.scale`` / ``field.zero``."""
        out = []
        for f, w in self._weights():
            if isinstance(w, QTensor):
                out += [(f"{f}.{k}", t) for k, t in (("data", w.data), ("scale", w.scale), ("zero", w.zero))
                        if t is not None]
            elif w is not None:
                out.append((f, w))
        return out

    def with_leaves(self, new: dict[str, torch.Tensor]) -> ExpertWeights:
        """The same expert with its storage tensors replaced (same keys as :meth:`leaves`)."""
        from dataclasses import replace

        def sub(f: str, w: torch.Tensor | QTensor | None) -> torch.Tensor | QTensor | None:
            if isinstance(w, QTensor):
                return replace(w, **{k: new[f"{f}.{k}"] for k in ("data", "scale", "zero") if f"{f}.{k}" in new})
            return None if w is None else new[f]

        got = {f: sub(f, w) for f, w in self._weights()}
        split = (got["gate"], got["up"]) if self.split is not None else None
        return ExpertWeights(got["gate_up"], got["down"], got["gate_up_bias"], got["down_bias"], split=split)


@runtime_checkable
class ExpertProvider(Protocol):
    """Where MoE layers get routed-expert weights from."""

    def require(self, layer: int, expert_ids: Seq[int]) -> None:
        """Announce the unique experts this layer needs for the current step."""

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """Weights of one expert (must have been required in this step). They may be valid
        only until the next ``get``; a provider whose results stay valid for the whole step
        sets ``stable_gets = True`` (the native decode then runs all of a token's experts in
        one call)."""
        ...
