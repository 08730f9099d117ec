"""W4A4 linear on the FP8 tensor cores through cuBLAS (issue 12, "Kernels to the Hopper ceiling").

Int4 codes -8..7 are exact in float8 e4m3, and cuBLAS's FP8 GEMM accumulates in fp32, so
``torch._scaled_mm(a_codes_e4m3, w_codes_e4m3.T, scale_a=(M, 1) fp32, scale_b=(1, N) fp32)`` is
an exact int4 x int4 product with the per-token x per-channel scales applied in the epilogue
(/work/shared/docs/hopper-ceiling.md measured it bit for bit against float64 and at 1.55-1.94x
bf16 cuBLAS on the LLaMA-2-7B linears). The prefill path of :class:`FP8W4A4Linear` is therefore
kernel 1 writing e4m3 codes (``transform_quant_fp8``) followed by that one cuBLAS call.

Decode (M ≤ 16 tokens) is memory bound on the weights: there the module keeps using the packed
int4 weights and the Triton GEMV of :class:`kernels.qlinear.W4A4Linear` (4x fewer weight bytes than
bf16). So the module holds both weight forms: packed int4 (N, K/2) bytes and e4m3 codes (N, K)
bytes, 1.5 bytes per weight in all (0.75x bf16) — :meth:`FP8W4A4Linear.weight_bytes` reports each.
"""
from __future__ import annotations

import torch

from qllm_core.quant.packing import unpack_int4

from .qlinear import W4A4Linear
from .transform_quant import transform_quant_fp8
from .w4_matmul import GEMV_MAX_M


def codes_to_fp8(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in [-8, 7] (any integer dtype) as float8_e4m3fn, exactly."""
    return codes.to(torch.float16).to(torch.float8_e4m3fn)


def fp8_scaled_mm(a_codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out = (A · Wᵀ) · a_scale · w_scale with e4m3 codes A (M, K), W (N, K) and fp32 scales
    (M, 1) and (1, N), by ``torch._scaled_mm`` (cuBLAS on CUDA; PyTorch's CPU kernel elsewhere).
    cuBLAS wants the second operand column-major: W is stored row-major (N, K), so W.t() is."""
    return torch._scaled_mm(a_codes, w_codes.t(), scale_a=a_scale, scale_b=w_scale, out_dtype=out_dtype)


def fp8_scaled_mm_ref(a_codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference: the integer product in float64 (exact), times the scales in float64."""
    acc = a_codes.double() @ w_codes.double().transpose(0, 1)
    return (acc * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)).to(out_dtype)


class FP8W4A4Linear(W4A4Linear):
    """W4A4Linear whose prefill GEMM runs on cuBLAS FP8 (``torch._scaled_mm``), exact.

    Same constructor as :class:`W4A4Linear` (packed int4 weights, per-channel fp32 scales,
    optional FlatQuant factors and channel scale); symmetric 4-bit activations and the fused
    transform only. M ≤ ``gemv_max_tokens`` tokens take the parent's packed-int4 path (kernel 1
    packed + Triton GEMV); more tokens take kernel 1 with e4m3 output + ``fp8_scaled_mm``.
    """

    def __init__(self, w_packed: torch.Tensor, w_scale: torch.Tensor, p1: torch.Tensor | None = None,
                 p2: torch.Tensor | None = None, channel_scale: torch.Tensor | None = None,
                 act_clip_ratio: float = 1.0, gemv_max_tokens: int = GEMV_MAX_M, **kwargs):
        if kwargs.get("act_bits", 4) != 4 or kwargs.get("act_asym", False):
            raise ValueError("FP8W4A4Linear needs symmetric 4-bit activations (act_bits=4, act_asym=False): "
                             "torch._scaled_mm has no zero-point term; use W4A4Linear for the others")
        if not kwargs.get("fuse_transform", True):
            raise ValueError("FP8W4A4Linear always fuses the online transform into kernel 1")
        super().__init__(w_packed, w_scale, p1, p2, channel_scale, act_clip_ratio, **kwargs)
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"cuBLAS FP8 GEMM needs K and N multiples of 16, got K={self.in_features}, "
                             f"N={self.out_features}")
        self.gemv_max_tokens = gemv_max_tokens
        self.register_buffer("w_fp8", codes_to_fp8(unpack_int4(w_packed)))

    @classmethod
    def from_w4a4(cls, lin: W4A4Linear, **kwargs) -> "FP8W4A4Linear":
        """The same layer (weights, transform, clip, output dtype) with the FP8 prefill path."""
        return cls(lin.w_packed, lin.w_scale, lin.p1, lin.p2, lin.channel_scale, lin.act_clip_ratio,
                   dot=lin.dot, out_dtype=lin.out_dtype, decode_gemv=lin.decode_gemv, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        m = x.numel() // k
        if m <= self.gemv_max_tokens:
            return super().forward(x)
        codes, scale = transform_quant_fp8(x.reshape(m, k), self.p1, self.p2, self.channel_scale,
                                           clip_ratio=self.act_clip_ratio)
        out = fp8_scaled_mm(codes, scale, self.w_fp8, self.w_scale.view(1, -1), out_dtype=self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes held per weight form: packed int4 (decode), e4m3 codes (prefill), scales, online
        transform (factors + channel scale), their total, and a bf16 weight of the same shape."""
        nbytes = lambda t: t.numel() * t.element_size() if t is not None else 0  # noqa: E731
        out = dict(packed_int4=nbytes(self.w_packed), fp8_codes=nbytes(self.w_fp8), scales=nbytes(self.w_scale),
                   transform=nbytes(self.p1) + nbytes(self.p2) + nbytes(self.channel_scale))
        out["total"] = sum(out.values())
        out["bf16_weight"] = self.in_features * self.out_features * 2
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prefill=fp8 cuBLAS (M > {self.gemv_max_tokens})"
