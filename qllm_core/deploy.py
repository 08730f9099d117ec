"""Swap a quantized run's fake-quant linears for the Triton inference kernels (issue 6, item 4).

Calibration leaves every decoder linear as a :class:`~qllm_core.quant.QuantLinear` whose weight is
frozen on its int4 grid, already in the basis of its online input transform. :func:`to_kernels`
replaces each by a :class:`kernels.qlinear.W4A4Linear` (W4A4 decoding through the dp4a GEMV of
:mod:`kernels.w4_gemv`): the weight as packed int4 codes plus
per-output-channel scales (recovered *exactly* from the frozen weight, see
:func:`weight_codes`), the online transform's Kronecker factors (FlatQuant's P1, P2; QuaRot's
Hadamard factors at down_proj) handed to the fused transform + quantize kernel, and the activation
quantizer's (learned) clip ratio. The converted model computes the same function as the
fake-quant one up to the kernels' rounding (bf16/fp32 operands, fp32 accumulation).

What stays in PyTorch: norms, RoPE, attention and the KV-cache quantizer (fake-quant; no 4-bit
KV-cache attention kernel is built, reports/kernels_notes.md). What cannot be converted raises,
naming the layer: asymmetric or grouped weights (QLLM, OmniQuant: the GEMM takes symmetric
per-channel weight scales), QLLM's channel reassembly (an online gather the kernel does not fuse),
activation bit widths other than 4 or 16, and asymmetric activations with different min/max clips.
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import LINEAR_ROLES, ModelAdapter
from .algorithms.rotation import OnlineHadamard
from .quant import QuantLinear, Quantizer, pack_int4
from .transforms.kronecker import KroneckerTransform

_INT4_MIN, _INT4_MAX = -8, 7


def weight_codes(weight: torch.Tensor, tolerance: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4 codes (int8, in [-8, 7]) and per-row scales with ``codes * scale == weight`` per row.

    The frozen weight is ``q * s`` with ``s = clip * max|w| / 7``; the row maximum |w| maps to +7 or,
    with clipping, may clamp to -8, and with no clipping a row's extreme may be -7. So ``s`` is one of
    ``max/7``, ``-min/8``, ``-min/7``: the first candidate that reproduces the row (within
    ``tolerance`` of a code) is kept. A row on no symmetric int4 grid raises.
    """
    w = weight.detach().double()
    hi, lo = w.amax(dim=1), w.amin(dim=1)
    candidates = torch.stack([hi / 7, -lo / 8, -lo / 7], dim=1).clamp(min=1e-30)  # (out, 3)
    ratios = w[:, None, :] / candidates[:, :, None]  # (out, 3, in)
    codes = ratios.round()
    fits = ((ratios - codes).abs() <= tolerance).all(dim=2) & (codes >= _INT4_MIN).all(dim=2) & (
        codes <= _INT4_MAX).all(dim=2)
    zero_rows = w.abs().amax(dim=1) == 0
    fits[zero_rows, 0] = True  # an all-zero row: codes 0, any scale
    if not fits.any(dim=1).all():
        bad = (~fits.any(dim=1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"weight rows {bad} are not on a symmetric per-channel int4 grid")
    pick = fits.float().argmax(dim=1)
    rows = torch.arange(w.shape[0])
    return codes[rows, pick].to(torch.int8), candidates[rows, pick].float()


def _transform_factors(transform: nn.Module | None, name: str):
    """(p1, p2) of the linear's online transform, or (None, None) without one."""
    if transform is None:
        return None, None
    if isinstance(transform, KroneckerTransform):
        right = transform.right if transform.right is not None else torch.eye(transform.sizes[1])
        return transform.left, right.to(transform.left)
    if isinstance(transform, OnlineHadamard):
        return transform.left, transform.right
    raise NotImplementedError(f"{name}: online transform {type(transform).__name__} has no kernel "
                              "(supported: FlatQuant's Kronecker transform, QuaRot's online Hadamard)")


def _act_settings(quantizer: Quantizer, name: str) -> dict:
    if quantizer.bits not in (4, 16):
        raise NotImplementedError(f"{name}: the kernels quantize activations to 4 bits (or not at all), "
                                  f"not {quantizer.bits}")
    if quantizer.group_size is not None:
        raise NotImplementedError(f"{name}: grouped activation quantization has no kernel")
    cmax, cmin = quantizer.clip_factors()
    clip = float(cmax)
    if cmin is not None and abs(float(cmin) - clip) > 1e-6:
        raise NotImplementedError(f"{name}: asymmetric activations with different min/max clips "
                                  f"({float(cmin):.4f} vs {clip:.4f}) have no kernel")
    return {"act_bits": quantizer.bits, "act_asym": not quantizer.symmetric, "act_clip_ratio": clip}


@torch.no_grad()
def kernel_linear(qlinear: QuantLinear, name: str, out_dtype: torch.dtype) -> nn.Module:
    """The :class:`kernels.qlinear.W4A4Linear` computing what ``qlinear`` computes (frozen weights)."""
    from kernels.qlinear import W4A4Linear  # needs triton

    wq = qlinear.weight_quantizer
    if not qlinear.frozen:
        raise ValueError(f"{name}: the weight is not frozen (calibrate or load a complete run first)")
    if wq.bits != 4 or not wq.symmetric or wq.group_size is not None:
        raise NotImplementedError(f"{name}: the W4A4 GEMM takes symmetric per-channel int4 weights, this layer has "
                                  f"{wq.bits}-bit {'symmetric' if wq.symmetric else 'asymmetric'} weights"
                                  f"{'' if wq.group_size is None else f' in groups of {wq.group_size}'}")
    if qlinear.bias is not None:
        raise NotImplementedError(f"{name}: linear biases are not supported by the kernel epilogue")
    codes, scale = weight_codes(qlinear.weight)
    p1, p2 = _transform_factors(qlinear.input_transform, name)
    act = _act_settings(qlinear.act_quantizer, name)
    cast = (lambda t: None if t is None else t.to(out_dtype).contiguous())  # noqa: E731
    codes_sum = codes.sum(dim=1).float() if act["act_asym"] else None
    device = qlinear.weight.device
    # W4A4 decode (up to kernels.w4_gemv.CORE_MAX_M tokens) takes the CUDA-core dp4a GEMV: the same result bit for
    # bit, 2.7-3.6x bf16 at batch 1 on an H200 against 0.7-1.0x for the tensor-core tiles (reports/kernels_notes.md)
    decode_gemv = "dp4a" if act["act_bits"] == 4 else None
    return W4A4Linear(pack_int4(codes).to(device), scale.to(device), cast(p1), cast(p2), w_codes_sum=codes_sum,
                      out_dtype=out_dtype, decode_gemv=decode_gemv, **act)


def to_kernels(model: nn.Module, adapter: ModelAdapter, out_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every decoder QuantLinear of a quantized model by its kernel layer (in place)."""
    dtype = out_dtype or next(model.parameters()).dtype
    for index, layer in enumerate(adapter.layers):
        for role in LINEAR_ROLES:
            linear = adapter.linear(layer, role)
            if not isinstance(linear, QuantLinear):
                raise ValueError(f"layer {index} {role} is not quantized (load a run with qllm_core.runs.load_run)")
            adapter.set_linear(layer, role, kernel_linear(linear, f"layer {index} {role}", dtype))
    return model
