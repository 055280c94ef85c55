"""``QLinear``: an ``nn.Linear`` whose weight stays in its stored quantized format.

:func:`moetier.models.base.load_dense_weights` swaps every ``nn.Linear`` whose checkpoint
weight is quantized for a ``QLinear`` holding the :class:`~moetier.quant.QTensor`
(``qweight``: the stored bytes, not a parameter). The torch path dequantizes it per use
(``F.linear(x, qweight.dequantize(x.dtype), bias)``: one weight at a time, never a
whole-model copy); ``.weight`` is the same per-use dense copy, so code written for
``nn.Linear`` weights (e.g. MLA's absorbed ``kv_b_proj``) keeps working. The native
kernels read ``qweight``'s bytes directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetier.quant import QTensor


class QLinear(nn.Module):
    def __init__(self, qweight: QTensor, bias: nn.Parameter | None, dtype: torch.dtype):
        super().__init__()
        self.qweight = qweight  # [out, in] in its stored format
        self.out_features, self.in_features = qweight.shape
        self.bias = bias
        self.compute_dtype = dtype  # of .weight (the model's runtime dtype)

    @classmethod
    def replacing(cls, linear: nn.Linear, qweight: QTensor, dtype: torch.dtype) -> QLinear:
        if (linear.out_features, linear.in_features) != qweight.shape:
            raise ValueError(f"QLinear: weight {list(qweight.shape)} for a Linear({linear.in_features}, "
                             f"{linear.out_features})")
        return cls(qweight, linear.bias, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor per access; see the module docstring)."""
        return self.qweight.dequantize(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.qweight.fmt}"
