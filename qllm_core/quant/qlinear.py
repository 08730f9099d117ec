"""A linear layer with fake-quantized input activations and weights.

Every method in this repo replaces the decoder's ``nn.Linear`` modules with :class:`QuantLinear`:

    y = Q_a(T(x)) · Q_w(T_w(W))ᵀ + b

where ``T`` is an optional online input transform (FlatQuant's Kronecker affine transform,
QuaRot's Hadamard) and ``T_w`` its weight-side counterpart, so that in full precision
``T(x) · T_w(W)ᵀ == x · Wᵀ``. During calibration ``T_w(W)`` and ``Q_w`` are evaluated on every
call so gradients reach transforms and clipping; :meth:`QuantLinear.freeze_weight` then stores
the quantized effective weight once, which is what inference (and a saved run) uses.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .quantizer import Quantizer


class QuantLinear(nn.Module):
    """``nn.Linear`` replacement: online input transform -> activation quantizer -> quantized GEMM."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: Quantizer,
        act_quantizer: Quantizer,
        input_transform: nn.Module | None = None,
    ):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.input_transform = input_transform
        # Persisted flag: True once `weight` holds the quantized effective weight.
        self.register_buffer("weight_frozen", torch.tensor(False))

    def effective_weight(self) -> torch.Tensor:
        """The weight the GEMM uses: transformed to match the online input transform, quantized."""
        if bool(self.weight_frozen):
            return self.weight
        w = self.weight
        if self.input_transform is not None:
            w = self.input_transform.transform_weight(w)
        return self.weight_quantizer(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        x = self.act_quantizer(x)
        w = self.effective_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """Replace ``weight`` by its transformed, quantized value (done once after calibration)."""
        if bool(self.weight_frozen):
            return
        self.weight = nn.Parameter(self.effective_weight().detach().clone(), requires_grad=False)
        self.weight_frozen.fill_(True)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, frozen={bool(self.weight_frozen)}"
