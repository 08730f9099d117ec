"""A linear layer with fake-quantized input activations and weights.

Every method in this repo replaces the decoder's ``nn.Linear`` modules with :class:`QuantLinear`:

    y = Q_a(T(x)) · Q_w(T_w(W))ᵀ + b

where ``T`` is an optional online input transform (FlatQuant's Kronecker affine transform,
QuaRot's Hadamard) and ``T_w`` its weight-side counterpart, so that in full precision
``T(x) · T_w(W)ᵀ == x · Wᵀ``. During calibration ``T_w(W)`` and ``Q_w`` are evaluated on every
call so gradients reach transforms and clipping; :meth:`QuantLinear.freeze_weight` then stores
the quantized effective weight once, which is what inference (and a saved run) uses.

The linears reading one tensor (q/k/v, gate/up) share their activation quantizer, and where they
have one, their input transform: the quantized input ``Q_a(T(x))`` is the same for all of them.
Inside :func:`shared_inputs` (a training step) it is computed once per tensor and reused; outside,
every linear computes it (nothing can go stale when a transform or a plan changes between calls).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from .quantizer import Quantizer


_MEMO: dict = {"inputs": None}


@contextlib.contextmanager
def shared_inputs():
    """Within the block, each (input tensor, transform, quantizer) is transformed and quantized once.

    Only for a span in which no parameter, buffer or plan changes (one forward pass).
    """
    previous = _MEMO["inputs"]
    _MEMO["inputs"] = {}
    try:
        yield
    finally:
        _MEMO["inputs"] = previous


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
        # Persisted flag: True once `weight` holds the quantized effective weight. `frozen` mirrors it
        # on the host, so a forward pass never reads a device tensor (a host sync in every call).
        self.register_buffer("weight_frozen", torch.tensor(False))
        self.frozen = False
        # A trainable update of the frozen weight, applied inside the GEMM: ``low_rank(x, weight, bias)``
        # (QLLM's error correction, :class:`~qllm_core.methods.qllm.LowRankDelta`); None otherwise.
        self.low_rank: nn.Module | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.frozen = bool(self.weight_frozen)

    def transformed_weight(self) -> torch.Tensor:
        """The weight transformed to match the online input transform, before weight quantization."""
        if self.frozen:
            raise RuntimeError("the weight is frozen (quantized): its unquantized value is gone")
        w = self.weight
        return w if self.input_transform is None else self.input_transform.transform_weight(w)

    def effective_weight(self) -> torch.Tensor:
        """The weight the GEMM uses: transformed to match the online input transform, quantized."""
        if self.frozen:
            return self.weight
        return self.weight_quantizer(self.transformed_weight())

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_a(T(x))``, reused inside :func:`shared_inputs` by the linears that share T and Q_a."""
        memo = _MEMO["inputs"]
        online = getattr(self.input_transform, "online", self.input_transform)  # the activation side
        key = (id(x), id(online), id(self.act_quantizer))
        if memo is not None and key in memo:
            return memo[key][1]
        out = self.act_quantizer(x if self.input_transform is None else self.input_transform(x))
        if memo is not None:
            memo[key] = (x, out)  # x stays referenced, so its id cannot be reused within the span
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        w = self.effective_weight()
        if self.low_rank is not None:
            return self.low_rank(x, w, self.bias)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """Replace ``weight`` by its transformed, quantized value (done once after calibration)."""
        if self.frozen:
            return
        self.set_frozen_weight(self.effective_weight().detach().clone())

    @torch.no_grad()
    def set_frozen_weight(self, weight: torch.Tensor) -> None:
        """Store ``weight`` as the quantized effective weight (used as is from now on)."""
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_frozen.fill_(True)
        self.frozen = True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, frozen={self.frozen}"
