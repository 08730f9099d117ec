"""Kernel 1: fused online Kronecker transform + per-token int4 quantization (one launch).

FlatQuant's key kernel (methods.md §2 "Kernel"; FlatQuant paper §3.3 / deploy/kernels/kron_matmul.py):
for activations X (tokens x n) compute Y = X · diag(s) · (P1 ⊗ P2) as the two small matmuls
P1ᵀ · Xr · P2 on the (n1, n2) view of each row, then quantize each token to int4 and write
packed bytes (two codes per byte, element 2j in the low nibble, qllm_core/quant/packing.py)
plus one fp32 scale (and zero point) per token. The transformed row never leaves the chip.

One program handles ROWS_PER_PROG tokens, loading P1ᵀ / P2 once. Factor sizes that are not
powers of two (86, 112, 224, 24, ...) are padded to the next power of two with masked loads:
padded rows/columns of X and of the factors are zero, so the padded part of Y is zero and does
not disturb the row statistics. When P2 is too large to keep on chip whole (n2 > 128), the
output columns are produced in chunks of 64 and the row is processed in two passes (statistics,
then quantize), recomputing the cheap small matmuls instead of spilling Y to memory.

The same kernel without factors is the plain per-token quantizer (RTN/QLLM W4A4, QuaRot's
quantizer after a separate Hadamard), and with QUANTIZE=False it writes the transformed
activations in the input dtype (used by the W4A16 path and by the unfused comparison).

Output formats of the codes (issue 12): ``"packed"`` (two int4 codes per byte, for the Triton
W4A4 GEMM/GEMV) or ``"fp8"`` — symmetric codes -8..7 written one per byte as float8 e4m3, which
holds them exactly, with the scale shaped (..., 1): the operands of ``torch._scaled_mm`` (cuBLAS
FP8 GEMM with row-wise scales, kernels/fp8_linear.py). The fp8 store is fused (no int8 detour).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kronecker import check_factors, kronecker_factors

SCALE_EPS = 1e-8  # floor for per-token scales, so all-zero tokens give scale 1e-8 and codes 0
_EPS = tl.constexpr(SCALE_EPS)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds fp32 |v| < 2**22 half-to-even


@triton.jit
def _round_half_even(v):
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _transform_chunk(x, p1t, p2_ptr, c: tl.constexpr, N2: tl.constexpr, B2: tl.constexpr,
                     BC: tl.constexpr, DOT_PREC: tl.constexpr):
    """Columns [c*BC, (c+1)*BC) of P1ᵀ · X · P2 for one (B1, B2) row tile, fp32."""
    rk = tl.arange(0, B2)
    cols = c * BC + tl.arange(0, BC)
    p2 = tl.load(p2_ptr + rk[:, None] * N2 + cols[None, :],
                 mask=(rk[:, None] < N2) & (cols[None, :] < N2), other=0.0)
    t = tl.dot(x, p2, input_precision=DOT_PREC)
    return tl.dot(p1t, t.to(p1t.dtype), input_precision=DOT_PREC)


@triton.jit
def _row_tile(x, p1t, p2_ptr, c: tl.constexpr, N2: tl.constexpr, B2: tl.constexpr, BC: tl.constexpr,
              HAS_TRANSFORM: tl.constexpr, DOT_PREC: tl.constexpr):
    if HAS_TRANSFORM:
        y = _transform_chunk(x, p1t, p2_ptr, c, N2, B2, BC, DOT_PREC)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _store_tile(vals, out_row_ptr, c: tl.constexpr, row_ok, N1: tl.constexpr, N2: tl.constexpr,
                B1: tl.constexpr, BC: tl.constexpr):
    """Store a (B1, BC) tile (columns [c*BC, (c+1)*BC) of the (n1, n2) row view) unpacked, one
    element per output slot, converted to the output's dtype."""
    i = tl.arange(0, B1)
    cols = c * BC + tl.arange(0, BC)
    mask = (i[:, None] < N1) & (cols[None, :] < N2) & row_ok
    tl.store(out_row_ptr + i[:, None] * N2 + cols[None, :], vals.to(out_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_codes(y, scale, zero, out_row_ptr, c: tl.constexpr, row_ok, N1: tl.constexpr,
                 N2: tl.constexpr, B1: tl.constexpr, BC: tl.constexpr, ASYM: tl.constexpr,
                 FP8_OUT: tl.constexpr):
    """Quantize a (B1, BC) tile with the token's scale/zero and store it as packed int4, or with
    FP8_OUT as one e4m3 value per code (integers -8..7 are exact in e4m3)."""
    v = tl.math.div_rn(y, scale)
    if ASYM:
        q = _round_half_even(tl.minimum(tl.maximum(v, -zero), 15.0 - zero)) + zero
    else:
        q = _round_half_even(tl.minimum(tl.maximum(v, -8.0), 7.0))
    if FP8_OUT:  # via fp16 (exact for -8..7): fp16 -> e4m3 is the conversion kernels/w4_matmul.py uses on sm90
        _store_tile(q.to(tl.float16), out_row_ptr, c, row_ok, N1, N2, B1, BC)
    else:
        q = q.to(tl.int32)
        even, odd = tl.split(tl.reshape(q, (B1, BC // 2, 2)))
        packed = ((even & 15) | ((odd & 15) << 4)).to(tl.uint8)
        i = tl.arange(0, B1)
        jj = c * (BC // 2) + tl.arange(0, BC // 2)
        mask = (i[:, None] < N1) & (jj[None, :] < N2 // 2) & row_ok
        tl.store(out_row_ptr + i[:, None] * (N2 // 2) + jj[None, :], packed, mask=mask)


@triton.jit
def _transform_quant_kernel(
    x_ptr, p1_ptr, p2_ptr, cs_ptr, out_ptr, scale_ptr, zero_ptr,
    M, stride_xm, stride_om, clip_ratio,
    N1: tl.constexpr, N2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, BC: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HAS_CHANNEL_SCALE: tl.constexpr,
    QUANTIZE: tl.constexpr, ASYM: tl.constexpr, FP8_OUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    NUM_CHUNKS: tl.constexpr = B2 // BC
    pid = tl.program_id(0)
    i = tl.arange(0, B1)
    j = tl.arange(0, B2)
    in_tile = (i[:, None] < N1) & (j[None, :] < N2)
    offs = i[:, None] * N2 + j[None, :]
    p1t = None
    if HAS_TRANSFORM:
        # coalesced load of P1, transposed on chip (a strided P1ᵀ load cost 16x the L2 traffic)
        p1t = tl.trans(tl.load(p1_ptr + i[:, None] * N1 + i[None, :],
                               mask=(i[:, None] < N1) & (i[None, :] < N1), other=0.0))
    if HAS_CHANNEL_SCALE:
        cs = tl.load(cs_ptr + offs, mask=in_tile, other=0.0).to(tl.float32)
    for r in range(ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + r
        row_ok = row < M
        # the row predicate as a (B1, 1) tensor: the interpreter cannot & a scalar into a tensor mask
        row_ok_col = (i[:, None] * 0 + row) < M
        x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=in_tile & row_ok_col, other=0.0)
        if HAS_CHANNEL_SCALE:
            x = x.to(tl.float32) * cs
        if HAS_TRANSFORM:
            x = x.to(p1t.dtype)
        out_row = out_ptr + row.to(tl.int64) * stride_om
        if QUANTIZE:
            # pass 1: row statistics (padded entries of the tile are exactly zero)
            y = _row_tile(x, p1t, p2_ptr, 0, N2, B2, BC, HAS_TRANSFORM, DOT_PREC)
            hi = tl.max(tl.max(y, axis=1), axis=0)
            lo = tl.min(tl.min(y, axis=1), axis=0)
            for c in tl.static_range(1, NUM_CHUNKS):
                yc = _row_tile(x, p1t, p2_ptr, c, N2, B2, BC, HAS_TRANSFORM, DOT_PREC)
                hi = tl.maximum(hi, tl.max(tl.max(yc, axis=1), axis=0))
                lo = tl.minimum(lo, tl.min(tl.min(yc, axis=1), axis=0))
            if ASYM:
                hi = tl.maximum(hi, 0.0) * clip_ratio
                lo = tl.minimum(lo, 0.0) * clip_ratio
                scale = tl.maximum(tl.math.div_rn(hi - lo, 15.0), _EPS)
                zero = _round_half_even(tl.math.div_rn(-lo, scale))
                tl.store(zero_ptr + row, zero, mask=row_ok)
            else:
                amax = tl.maximum(hi, -lo) * clip_ratio
                scale = tl.maximum(tl.math.div_rn(amax, 7.0), _EPS)
                zero = 0.0
            tl.store(scale_ptr + row, scale, mask=row_ok)
            # pass 2: quantize and pack; the first chunk is still on chip
            _store_codes(y, scale, zero, out_row, 0, row_ok_col, N1, N2, B1, BC, ASYM, FP8_OUT)
            for c in tl.static_range(1, NUM_CHUNKS):
                yc = _row_tile(x, p1t, p2_ptr, c, N2, B2, BC, HAS_TRANSFORM, DOT_PREC)
                _store_codes(yc, scale, zero, out_row, c, row_ok_col, N1, N2, B1, BC, ASYM, FP8_OUT)
        else:
            for c in tl.static_range(NUM_CHUNKS):
                yc = _row_tile(x, p1t, p2_ptr, c, N2, B2, BC, HAS_TRANSFORM, DOT_PREC)
                _store_tile(yc, out_row, c, row_ok_col, N1, N2, B1, BC)


def _pow2(v: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(v))


def _num_warps(tile: int) -> int:
    """More warps for larger row tiles (H100 sweep in reports/kernels_notes.md)."""
    return 4 if tile <= 4096 else 8


OUT_FORMATS = ("packed", "fp8")


def transform_quant(x: torch.Tensor, p1: torch.Tensor | None = None, p2: torch.Tensor | None = None,
                    channel_scale: torch.Tensor | None = None, clip_ratio: float = 1.0,
                    asym: bool = False, quantize: bool = True, rows_per_prog: int | None = None,
                    num_warps: int | None = None, out_format: str = "packed"):
    """Y = X · diag(channel_scale) · (P1 ⊗ P2), then per-token int4 quantization, in one launch.

    x: (..., n) float16/bfloat16/float32, last dim contiguous. p1 (n1, n1), p2 (n2, n2) with
    n1 * n2 == n, both or neither; their dtype is the matmul operand dtype (bf16/fp16 on the
    tensor cores, float32 computed in IEEE fp32). channel_scale: optional (n,) multiplier.
    Returns, with quantize=True and out_format="packed": (packed uint8 (..., n/2), scale fp32
    (...), zero fp32 (...) or None); symmetric codes are int4 in [-8, 7], asymmetric ones uint4
    in [0, 15] with the range widened to include 0. out_format="fp8" (symmetric only): (codes as
    torch.float8_e4m3fn (..., n), one per byte, exact; scale fp32 (..., 1); None) — the operands
    of torch._scaled_mm with row-wise scales. With quantize=False: Y in x's dtype.
    """
    n = x.shape[-1]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"transform_quant expects a float tensor, got {x.dtype}")
    if (p1 is None) != (p2 is None):
        raise ValueError("pass both Kronecker factors p1 and p2, or neither")
    if n % 2:
        raise ValueError(f"int4 packing needs an even feature size, got {n}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio}")
    if out_format not in OUT_FORMATS:
        raise ValueError(f"out_format must be one of {OUT_FORMATS}, got {out_format!r}")
    fp8_out = quantize and out_format == "fp8"
    if fp8_out and asym:
        raise ValueError("out_format='fp8' writes symmetric int4 codes (-8..7) for torch._scaled_mm, which has "
                         "no zero-point term; asymmetric activations need out_format='packed' (w4a4_matmul)")
    has_transform = p1 is not None
    if has_transform:
        n1, n2 = check_factors(n, p1, p2)
        if p1.dtype != p2.dtype or p1.device != x.device or p2.device != x.device:
            raise ValueError("p1 and p2 must share one dtype and live on x's device")
        p1, p2 = p1.contiguous(), p2.contiguous()
        b1, b2 = _pow2(n1, 16), _pow2(n2, 16)
    else:
        n1, n2 = kronecker_factors(n) if n % 4 != 2 else (1, n)  # any tiling with even n2
        b1, b2 = _pow2(n1, 1), _pow2(n2, 2)
    if channel_scale is not None and channel_scale.shape != (n,):
        raise ValueError(f"channel_scale must have shape ({n},), got {tuple(channel_scale.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if fp8_out:
        out = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=x.device)
    elif quantize:
        out = torch.empty((m, n // 2), dtype=torch.uint8, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device) if quantize else None
    zero = torch.empty((m,), dtype=torch.float32, device=x.device) if quantize and asym else None
    bc = b2 if (not has_transform or b2 <= 128) else 64
    rows = rows_per_prog or 1  # one token per program measured fastest (notes); >1 amortizes factor loads
    if m:
        _transform_quant_kernel[(triton.cdiv(m, rows),)](
            x2, p1 if has_transform else x2, p2 if has_transform else x2,
            channel_scale.contiguous() if channel_scale is not None else x2,
            out, scale if quantize else out, zero if zero is not None else out,
            m, x2.stride(0), out.stride(0), float(clip_ratio),
            N1=n1, N2=n2, B1=b1, B2=b2, BC=bc, ROWS_PER_PROG=rows,
            HAS_TRANSFORM=has_transform, HAS_CHANNEL_SCALE=channel_scale is not None,
            QUANTIZE=quantize, ASYM=asym, FP8_OUT=fp8_out,
            DOT_PREC="ieee" if has_transform and p1.dtype == torch.float32 else "tf32",
            num_warps=num_warps or _num_warps(b1 * b2), num_stages=1)
    if not quantize:
        return out.reshape(*lead, n)
    if fp8_out:
        return out.reshape(*lead, n), scale.reshape(*lead, 1), None
    return (out.reshape(*lead, n // 2), scale.reshape(lead),
            zero.reshape(lead) if zero is not None else None)


def transform_quant_fp8(x: torch.Tensor, p1: torch.Tensor | None = None, p2: torch.Tensor | None = None,
                        channel_scale: torch.Tensor | None = None, clip_ratio: float = 1.0, **launch):
    """Kernel 1 for the FP8 prefill path: (codes float8_e4m3fn (..., n), scale fp32 (..., 1)).

    Symmetric per-token int4 codes -8..7 stored exactly in e4m3, one per byte (see
    :func:`transform_quant` with out_format="fp8"); launch: rows_per_prog / num_warps."""
    codes, scale, _ = transform_quant(x, p1, p2, channel_scale, clip_ratio, out_format="fp8", **launch)
    return codes, scale


# ----------------------------------------------------------------------------- references

def _true_div(t: torch.Tensor, d: float) -> torch.Tensor:
    """t / d rounded as IEEE division (on CUDA, PyTorch turns division by a Python scalar into a
    multiplication by its reciprocal, which can differ from the kernel's division by one ulp)."""
    return t / torch.full_like(t, d)


def quantize_per_token_ref(y: torch.Tensor, clip_ratio: float = 1.0, asym: bool = False):
    """Reference per-token int4 quantization of float y (..., n), in float32.

    Symmetric: scale = clip · max|y| / 7, q = clamp(round(y / scale), -8, 7) (int8 codes).
    Asymmetric: range [min(y, 0), max(y, 0)] · clip, scale = range / 15, zero = round(-min / scale),
    q = clamp(round(y / scale) + zero, 0, 15) (uint8 codes). Scales are floored at SCALE_EPS.
    Returns (codes, scale, zero or None); torch.round rounds half to even, like the kernel.
    """
    y = y.float()
    if asym:
        hi = y.amax(-1).clamp_min(0) * clip_ratio
        lo = y.amin(-1).clamp_max(0) * clip_ratio
        scale = _true_div(hi - lo, 15.0).clamp_min(SCALE_EPS)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(y / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8)
        return q, scale, zero
    amax = torch.maximum(y.amax(-1), -y.amin(-1)) * clip_ratio
    scale = _true_div(amax, 7.0).clamp_min(SCALE_EPS)
    q = torch.clamp(torch.round(y / scale[..., None]), -8, 7).to(torch.int8)
    return q, scale, None


def transform_quant_ref(x: torch.Tensor, p1: torch.Tensor | None = None, p2: torch.Tensor | None = None,
                        channel_scale: torch.Tensor | None = None, clip_ratio: float = 1.0,
                        asym: bool = False, quantize: bool = True):
    """PyTorch reference of :func:`transform_quant`, rounding where the kernel rounds.

    The kernel feeds the tensor cores in the factors' dtype: X (after the channel scale) and
    the intermediate X·P2 are rounded to that dtype, products accumulate in fp32. Returns
    unpacked codes (not packed bytes) with quantize=True: (codes, scale, zero or None).
    """
    y = x.float()
    if channel_scale is not None:
        y = y * channel_scale.float()
    if p1 is not None:
        n1, n2 = check_factors(x.shape[-1], p1, p2)
        dt = p1.dtype
        xr = y.to(dt).float().reshape(*x.shape[:-1], n1, n2)
        t = (xr @ p2.float()).to(dt).float()
        y = (p1.float().transpose(0, 1) @ t).reshape(x.shape)
    if not quantize:
        return y.to(x.dtype)
    return quantize_per_token_ref(y, clip_ratio, asym)
