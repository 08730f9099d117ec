"""Inference-side quantized linear layer built on kernels 1-3 (issue 6, item 4).

`W4A4Linear` holds packed int4 weights (per-output-channel symmetric scales) and, optionally,
FlatQuant's online transform: a per-channel scale vector and Kronecker factors P1, P2 applied to
the input (methods.md §2). Its forward runs kernel 1 (transform + per-token int4 quantization)
then the W4A4 GEMM; M ≤ 16 tokens (decode) takes the GEMV tiles of the same GEMM kernel, or, with
``decode_gemv`` set, at most ``CORE_MAX_M`` tokens take the CUDA-core GEMV of :mod:`kernels.w4_gemv`
with those products ("dp4a" / "fp32"; the same result, bit for bit). Methods
without an online transform (RTN, QLLM) pass no factors; act_bits=16 gives weight-only W4A16.
The weight must already be in the transformed basis (FlatQuant merges the inverse transpose of
the transform into the weight after calibration); :func:`merge_transform` does that for a plain one.
"""
from __future__ import annotations

import torch
from torch import nn

from qllm_core.quant.packing import pack_int4

from .kronecker import check_factors
from .transform_quant import quantize_per_token_ref, transform_quant
from .w4_gemv import CORE_MAX_M, PRODUCTS, w4a4_gemv
from .w4_matmul import w4a4_matmul, w4a16_matmul


def merge_transform(weight: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                    channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W' = W · T⁻ᵀ for T = diag(s) · (P1 ⊗ P2), so that (x T) W'ᵀ = x Wᵀ. Computed in float64."""
    out_f, n = weight.shape
    n1, n2 = check_factors(n, p1, p2)
    inv1 = torch.linalg.inv(p1.double()).transpose(0, 1)
    inv2 = torch.linalg.inv(p2.double()).transpose(0, 1)
    # rows w of W map to w · (P1⁻ᵀ ⊗ P2⁻ᵀ) = P1⁻¹ · Wr · P2⁻ᵀ on the (n1, n2) view
    w = weight.double()
    if channel_scale is not None:  # T⁻ᵀ = diag(1/s) · (P1 ⊗ P2)⁻ᵀ: divide first
        w = w / channel_scale.double()
    w = inv1.transpose(0, 1) @ w.reshape(out_f, n1, n2) @ inv2
    return w.reshape(out_f, n).to(weight.dtype)


def quantize_weight(weight: torch.Tensor, clip_ratio: float = 1.0):
    """Symmetric per-output-channel RTN to int4: (packed uint8 (N, K/2), scale fp32 (N,), codes int8)."""
    codes, scale, _ = quantize_per_token_ref(weight, clip_ratio=clip_ratio, asym=False)
    return pack_int4(codes), scale.contiguous(), codes


class W4A4Linear(nn.Module):
    """y = Q4(x · T) · Q4(W')ᵀ with T = diag(channel_scale) · (P1 ⊗ P2) applied online (or none)."""

    def __init__(self, w_packed: torch.Tensor, w_scale: torch.Tensor, p1: torch.Tensor | None = None,
                 p2: torch.Tensor | None = None, channel_scale: torch.Tensor | None = None,
                 act_clip_ratio: float = 1.0, act_bits: int = 4, act_asym: bool = False,
                 w_codes_sum: torch.Tensor | None = None, dot: str | None = None,
                 out_dtype: torch.dtype = torch.bfloat16, fuse_transform: bool = True,
                 decode_gemv: str | None = None):
        super().__init__()
        if act_bits not in (4, 16):
            raise ValueError(f"act_bits must be 4 (W4A4) or 16 (W4A16), got {act_bits}")
        if decode_gemv is not None and (decode_gemv not in PRODUCTS or act_bits != 4):
            raise ValueError(f"decode_gemv must be None or one of {PRODUCTS} (W4A4 only), got {decode_gemv!r} "
                             f"with act_bits={act_bits}")
        if act_asym and act_bits == 4 and w_codes_sum is None:
            raise ValueError("asymmetric activations need w_codes_sum (Σ_k weight codes per output channel)")
        self.out_features, self.in_features = w_packed.shape[0], w_packed.shape[1] * 2
        if p1 is not None:
            check_factors(self.in_features, p1, p2)
        self.register_buffer("w_packed", w_packed)
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("p1", p1)
        self.register_buffer("p2", p2)
        self.register_buffer("channel_scale", channel_scale)
        self.register_buffer("w_codes_sum", w_codes_sum.float() if w_codes_sum is not None else None)
        self.act_clip_ratio, self.act_bits, self.act_asym = act_clip_ratio, act_bits, act_asym
        self.dot, self.out_dtype = dot, out_dtype
        self.fuse_transform = fuse_transform  # False: QuaRot-style separate transform and quantizer launches
        self.decode_gemv = decode_gemv

    @classmethod
    def from_float(cls, weight: torch.Tensor, p1: torch.Tensor | None = None, p2: torch.Tensor | None = None,
                   channel_scale: torch.Tensor | None = None, w_clip_ratio: float = 1.0,
                   transform_dtype: torch.dtype = torch.bfloat16, **kwargs) -> "W4A4Linear":
        """Quantize a float weight already in the transformed basis (see :func:`merge_transform`)."""
        packed, scale, codes = quantize_weight(weight, w_clip_ratio)
        cast = (lambda t: t.to(transform_dtype).contiguous() if t is not None else None)  # noqa: E731
        codes_sum = codes.sum(1).float() if kwargs.get("act_asym") else None
        return cls(packed, scale, cast(p1), cast(p2), channel_scale.float() if channel_scale is not None else None,
                   w_codes_sum=codes_sum, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits == 16:
            if self.p1 is not None or self.channel_scale is not None:
                x = transform_quant(x, self.p1, self.p2, self.channel_scale, quantize=False)
            if x.dtype == torch.float32:  # the weight-only GEMM feeds fp16/bf16 tensor cores
                x = x.to(torch.float16)
            return w4a16_matmul(x, self.w_packed, self.w_scale, out_dtype=self.out_dtype)
        p1, p2, cs = self.p1, self.p2, self.channel_scale
        if not self.fuse_transform and (p1 is not None or cs is not None):
            x = transform_quant(x, p1, p2, cs, quantize=False)
            p1 = p2 = cs = None
        q, scale, zero = transform_quant(x, p1, p2, cs, clip_ratio=self.act_clip_ratio, asym=self.act_asym)
        w_sum = self.w_codes_sum if self.act_asym else None
        if self.decode_gemv is not None and x.numel() // self.in_features <= CORE_MAX_M:
            return w4a4_gemv(q, scale, self.w_packed, self.w_scale, a_zero=zero, w_sum=w_sum,
                             out_dtype=self.out_dtype, products=self.decode_gemv)
        return w4a4_matmul(q, scale, self.w_packed, self.w_scale, a_zero=zero,
                           w_sum=w_sum, dot=self.dot,
                           out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        t = f"kron {self.p1.shape[0]}x{self.p2.shape[0]}" if self.p1 is not None else "none"
        return (f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}, "
                f"asym={self.act_asym}, transform={t}, dot={self.dot or 'default'}"
                + (f", decode_gemv={self.decode_gemv}" if self.decode_gemv else ""))
