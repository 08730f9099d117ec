"""Fake quantization (quantize -> dequantize) with a straight-through estimator.

One primitive serves weights, activations and the KV cache: values are grouped along the
last dimension (the whole last dim, or contiguous groups of ``group_size``) and each group gets
its own scale (and zero point when asymmetric). So

* weights ``(out, in)``: per output channel (group = whole row) or per group of ``in``;
* activations ``(..., hidden)``: dynamic per token;
* KV states ``(batch, heads, tokens, head_dim)``: per token and head (FlatQuant's
  ``k_groupsize = 128`` equals one head for head_dim 128; here the group is always one head).

Rounding uses the straight-through estimator (STE), so learnable clipping (FlatQuant's LWC/LAC,
OmniQuant's LWC; methods.md section 1) receives gradients through the scale.
The asymmetric range always contains zero (GPTQ convention), which makes all-zero and constant
groups exact instead of dividing by a zero range.

Inside :func:`compiled_fake_quant` (the calibration trainer on a GPU) a quantizer's whole forward
(clip factors, scale, round, clamp, dequantize) and its backward run as one compiled
(``torch.compile``/inductor) function: about 25 elementwise and reduction kernels per quantizer
and step become 3-4. The arithmetic is the same function; ``emulate_precision_casts`` makes the
fused kernels round half-precision intermediates where eager PyTorch does.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

OFF_BITS = 16
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, OFF_BITS)
_EPS = 1e-8


def _scale_floor(dtype: torch.dtype) -> float:
    """The smallest scale: 1e-8, or float16's smallest subnormal (2^-24) where 1e-8 would round to 0
    in float16 (a zero scale turned an all-zero group into NaN)."""
    return 2.0**-24 if dtype == torch.float16 else _EPS


def check_bits(bits: int, what: str = "bit width") -> int:
    """Validate a bit width: 2..8 quantize, 16 means 'off'."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"{what} must be an integer in 2..8, or 16 for 'off'; got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if group_size is None or group_size >= x.shape[-1]:
        return x
    if x.shape[-1] % group_size:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by group_size {group_size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def quant_params(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip_max: torch.Tensor | float = 1.0,
    clip_min: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale, zero point and integer range for groups along the last dim of ``x``.

    ``clip_max``/``clip_min`` multiply the group max/min (clip ratio, or sigmoid of a learned
    logit); for symmetric quantizers only ``clip_max`` is used.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = x.abs().amax(dim=-1, keepdim=True) * clip_max
        scale = (absmax / qmax).clamp(min=_scale_floor(x.dtype))
        return scale, torch.zeros_like(scale), -(qmax + 1), qmax
    qmax = 2**bits - 1
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip_max
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * (clip_max if clip_min is None else clip_min)
    scale = ((xmax - xmin) / qmax).clamp(min=_scale_floor(x.dtype))
    zero = torch.round(-xmin / scale).detach()
    return scale, zero, 0, qmax


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    group_size: int | None = None,
    clip_max: torch.Tensor | float = 1.0,
    clip_min: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Quantize then dequantize ``x`` per group along its last dim (STE gradients)."""
    check_bits(bits)
    if bits == OFF_BITS:
        return x
    g = _grouped(x, group_size)
    scale, zero, qmin, qmax = quant_params(g, bits, symmetric, clip_max, clip_min)
    q = torch.clamp(round_ste(g / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).reshape(x.shape)


def quantize_to_codes(
    x: torch.Tensor, bits: int, symmetric: bool = True, group_size: int | None = None, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (int8 for symmetric, uint8 for asymmetric), scales and zero points.

    ``fake_quantize(x) == (codes - zero) * scale`` group-wise; used for real int4 storage.
    """
    check_bits(bits)
    if bits == OFF_BITS:
        raise ValueError("quantize_to_codes needs a bit width in 2..8, not 16 (off)")
    g = _grouped(x.detach(), group_size)
    scale, zero, qmin, qmax = quant_params(g, bits, symmetric, clip_ratio)
    codes = torch.clamp(torch.round(g / scale) + zero, qmin, qmax)
    dtype = torch.int8 if symmetric else torch.uint8
    return codes.to(dtype).reshape(x.shape), scale, zero


def clip_factors(clip_ratio: float, clip_max_logit: torch.Tensor | None, clip_min_logit: torch.Tensor | None,
                 ) -> tuple[torch.Tensor | float, torch.Tensor | float | None]:
    """Multipliers of the group max / min: ``clip_ratio``, times ``sigmoid(logit)`` when clipping is learned."""
    if clip_max_logit is None:
        return clip_ratio, None
    cmin = None if clip_min_logit is None else clip_ratio * torch.sigmoid(clip_min_logit)
    return clip_ratio * torch.sigmoid(clip_max_logit), cmin


def quantize_with_clip(
    x: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, clip_ratio: float,
    clip_max_logit: torch.Tensor | None, clip_min_logit: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`fake_quantize` with the clip factors of :func:`clip_factors` (a Quantizer's forward)."""
    cmax, cmin = clip_factors(clip_ratio, clip_max_logit, clip_min_logit)
    return fake_quantize(x, bits, symmetric, group_size, cmax, cmin)


_COMPILE = {"active": False}


@functools.cache
def _compiled_quantize_with_clip():
    import torch._dynamo

    # One compiled variant per (shape, dtype, bits, symmetry, clip) combination a calibration meets.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(quantize_with_clip, dynamic=False, fullgraph=True,
                         options={"emulate_precision_casts": True})


@contextlib.contextmanager
def compiled_fake_quant(enabled: bool = True):
    """Within the block, quantizers on CUDA tensors run compiled (module docstring)."""
    previous = _COMPILE["active"]
    _COMPILE["active"] = enabled
    try:
        yield
    finally:
        _COMPILE["active"] = previous


class Quantizer(nn.Module):
    """A fake quantizer module with optional learnable clipping.

    Args:
        bits: 2..8, or 16 for pass-through.
        symmetric: symmetric (signed) or asymmetric (unsigned + zero point).
        group_size: group along the last dim (None: the whole last dim).
        clip_ratio: fixed multiplier of the group max/min (<= 1 clips).
        learnable_clip_shape: shape of learnable clipping logits (e.g. ``(out_features, 1)`` for
            per-channel weight clipping, ``()`` for a per-tensor activation clip). The effective
            clip is ``clip_ratio * sigmoid(logit)``; logits start at ``clip_init`` (4.0 gives
            sigmoid = 0.982, FlatQuant's initialisation). Asymmetric quantizers learn separate
            max and min logits.
    """

    def __init__(
        self,
        bits: int = OFF_BITS,
        symmetric: bool = True,
        group_size: int | None = None,
        clip_ratio: float = 1.0,
        learnable_clip_shape: tuple[int, ...] | None = None,
        clip_init: float = 4.0,
    ):
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.group_size = group_size
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio}")
        self.clip_ratio = clip_ratio
        self.clip_max_logit: nn.Parameter | None = None
        self.clip_min_logit: nn.Parameter | None = None
        if learnable_clip_shape is not None and self.enabled:
            self.clip_max_logit = nn.Parameter(torch.full(learnable_clip_shape, float(clip_init)))
            if not symmetric:
                self.clip_min_logit = nn.Parameter(torch.full(learnable_clip_shape, float(clip_init)))

    @property
    def enabled(self) -> bool:
        return self.bits != OFF_BITS

    def clip_factors(self) -> tuple[torch.Tensor | float, torch.Tensor | float | None]:
        return clip_factors(self.clip_ratio, self.clip_max_logit, self.clip_min_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        compiled = _COMPILE["active"] and x.is_cuda
        quantize = _compiled_quantize_with_clip() if compiled else quantize_with_clip
        return quantize(x, self.bits, self.symmetric, self.group_size, self.clip_ratio, self.clip_max_logit,
                        self.clip_min_logit)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        group = f", group={self.group_size}" if self.group_size else ""
        learn = ", learnable_clip" if self.clip_max_logit is not None else ""
        return f"bits={self.bits}, {kind}{group}, clip={self.clip_ratio}{learn}"


@contextlib.contextmanager
def quantizers_off(module: nn.Module):
    """Temporarily pass every :class:`Quantizer` inside ``module`` through (FP statistics)."""
    quantizers = [m for m in module.modules() if isinstance(m, Quantizer)]
    saved = [q.bits for q in quantizers]
    for q in quantizers:
        q.bits = OFF_BITS
    try:
        yield
    finally:
        for q, bits in zip(quantizers, saved):
            q.bits = bits
