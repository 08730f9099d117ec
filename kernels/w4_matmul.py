"""Kernels 2 and 3: int4-weight GEMM (W4A4 and W4A16) for Hopper, prefill tiles and decode GEMV tiles.

The H100 has no int4 tensor cores. Int4 codes (-8..7, and 0..15 for asymmetric activations)
are exact in FP8 e4m3 and in int8, and their products sum exactly in fp32 while |sum| < 2**24,
so unpacking packed nibbles to FP8 in registers and running FP8 tensor cores gives an exact int4
GEMM at FP8 rate (issue 6; methods.md §2 "Kernel"). The int8 ``tl.dot`` path (int32 accumulator)
is kept as the alternative; reports/kernels_notes.md records which is faster.

No interleaving is needed: both operands use the packing convention of
qllm_core/quant/packing.py (element 2j low nibble, 2j+1 high nibble), and a dot product may
visit K in any order, so acc += A_low · W_lowᵀ + A_high · W_highᵀ on the raw byte tiles.

Epilogue: out[m, n] = (acc[m, n] − zero_a[m] · Σ_k w[n, k]) · scale_a[m] · scale_w[n] in fp32,
cast to the output dtype (bf16 by default). Decode (M ≤ 16) is the same kernel with GEMV tiles:
it is memory bound on the packed weights, which are 4x fewer bytes than bf16.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

A_INT4, A_UINT4, A_FLOAT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # activation modes
DOT_KINDS = ("fp8", "int8", "fp16")


@triton.jit
def _unpack_nibbles(b, SIGNED: tl.constexpr, DOT: tl.constexpr):
    """Packed uint8 bytes -> (low, high) nibble codes as tensor-core operands.

    int8: two's complement [-8, 7] (or unsigned [0, 15]) by shifts. fp16 / fp8: the codes are
    built in fp16 without an int->float conversion instruction: OR-ing a nibble u into the
    mantissa of 1024.0 (0x6400) gives 1024 + u exactly; XOR with 8 first maps a two's-complement
    nibble to u + 8, so subtracting 1032 gives the signed value (for the high nibble, sitting four
    bits up, the same with 1024 + 16u, scaled by 1/16 exactly). fp8 then converts fp16 pairs to
    e4m3 with one instruction; every value in [-8, 15] is exact in both formats.
    """
    if DOT == "int8":
        if SIGNED:
            s = b.to(tl.int8, bitcast=True)
            lo = (s << 4) >> 4
            hi = s >> 4
        else:
            lo = (b & 15).to(tl.int8)
            hi = (b >> 4).to(tl.int8)
    else:
        u = b.to(tl.uint16)
        if SIGNED:
            flip: tl.constexpr = 8
        else:
            flip: tl.constexpr = 0
        lo = ((u & 0x000F) ^ (0x6400 | flip)).to(tl.float16, bitcast=True) - (1024.0 + flip)
        hi = ((u & 0x00F0) ^ (0x6400 | (flip << 4))).to(tl.float16, bitcast=True) * 0.0625 - (64.0 + flip)
        if DOT == "fp8":
            lo = lo.to(tl.float8e4nv)
            hi = hi.to(tl.float8e4nv)
    return lo, hi


@triton.jit
def _w4_matmul_kernel(
    a_ptr, a_scale_ptr, a_zero_ptr, w_ptr, w_scale_ptr, w_sum_ptr, c_ptr,
    M, N, K, stride_am, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_MODE: tl.constexpr, DOT: tl.constexpr, IMPRECISE_K: tl.constexpr,
):
    KB: tl.constexpr = BLOCK_K // 2  # bytes of packed K per step
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # grouped order: GROUP_M row tiles share each weight tile in L2
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.arange(0, KB)
    m_ok = rm < M
    n_ok = rn < N
    kh = K // 2

    if A_MODE == A_FLOAT:
        AW: tl.constexpr = BLOCK_K  # activation columns per step: bf16 values, or packed bytes
        a_cols = K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        AW: tl.constexpr = KB
        a_cols = kh
        if DOT == "int8":
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ka = tl.arange(0, AW)
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + kb[:, None]  # (KB, BLOCK_N) view of Wᵀ
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + ka[None, :]

    # Register prefetch: step k+1's loads are issued before step k's unpacking and tensor-core
    # work. Triton's software pipeliner does not stage loads whose values are unpacked before
    # the dot, so without this every step waits for global memory.
    wb = tl.load(w_ptrs, mask=(kb < kh)[:, None] & n_ok[None, :], other=0)
    av = tl.load(a_ptrs, mask=m_ok[:, None] & (ka < a_cols)[None, :], other=0)
    for k0 in range(0, tl.cdiv(kh, KB)):
        w_ptrs += KB
        a_ptrs += AW
        wb_next = tl.load(w_ptrs, mask=((k0 + 1) * KB + kb < kh)[:, None] & n_ok[None, :], other=0)
        av_next = tl.load(a_ptrs, mask=m_ok[:, None] & ((k0 + 1) * AW + ka < a_cols)[None, :], other=0)
        if A_MODE == A_FLOAT:
            a_lo, a_hi = tl.split(tl.reshape(av, (BLOCK_M, KB, 2)))
            w_lo, w_hi = _unpack_nibbles(wb, True, "fp16")
            acc = tl.dot(a_lo, w_lo.to(av.dtype), acc)
            acc = tl.dot(a_hi, w_hi.to(av.dtype), acc)
        else:
            a_lo, a_hi = _unpack_nibbles(av, A_MODE == A_INT4, DOT)
            w_lo, w_hi = _unpack_nibbles(wb, True, DOT)
            acc = tl.dot(a_lo, w_lo, acc, max_num_imprecise_acc=IMPRECISE_K, out_dtype=acc.dtype)
            acc = tl.dot(a_hi, w_hi, acc, max_num_imprecise_acc=IMPRECISE_K, out_dtype=acc.dtype)
        wb = wb_next
        av = av_next

    store_epilogue(acc.to(tl.float32), rm, rn, m_ok, n_ok, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_sum_ptr, c_ptr,
                   stride_cm, A_MODE)


@triton.jit
def store_epilogue(acc, rm, rn, m_ok, n_ok, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_sum_ptr, c_ptr, stride_cm,
                   A_MODE: tl.constexpr):
    """``c = (acc - zero_a * sum_k w) * scale_a * scale_w`` in fp32, in this order (the references' order: the
    bit-exactness tests depend on it), stored in the output's dtype. Shared by the GEMM and the CUDA-core GEMV."""
    if A_MODE != A_FLOAT:
        if A_MODE == A_UINT4:
            zero = tl.load(a_zero_ptr + rm, mask=m_ok, other=0.0)
            w_sum = tl.load(w_sum_ptr + rn, mask=n_ok, other=0.0)
            acc = acc - zero[:, None] * w_sum[None, :]
        acc = acc * tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)[:, None]
    acc = acc * tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per regime; the H100 sweep that
# chose them is in reports/kernels_notes.md. GEMV tiles are 16 rows (the smallest tensor-core M);
# narrow BLOCK_N gives N/BLOCK_N programs, enough to keep the weight stream in flight.
CONFIGS = {
    "gemv": [(16, 32, 256, 1, 2, 6), (16, 32, 512, 1, 4, 4), (16, 64, 256, 1, 4, 4)],
    "small": [(64, 128, 128, 8, 4, 4), (64, 64, 256, 8, 4, 4)],
    "large": [(128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3)],
}
# Tensor-core operand per regime, the fastest on the H100 sweep: fp8 e4m3 for prefill tiles,
# fp16 for GEMV tiles (mma.sync; fp16 needs no e4m3 conversion). All operand values are exact;
# fp8 wgmma however accumulates with fewer than fp32's bits and lost low bits at |sum| ~ 2**17
# (adversarial codes) — pass imprecise_k (e.g. 32) for a bit-exact fp8 GEMM at ~25% less speed,
# or dot="int8"/"fp16" (exact, slower here). See reports/kernels_notes.md.
DEFAULT_DOT = {"gemv": "fp16", "small": "fp8", "large": "fp8"}


GEMV_MAX_M = 16  # tokens up to which the GEMV tiles run (decode)


def regime(m: int) -> str:
    """Tile family for M tokens: decode GEMV (≤ GEMV_MAX_M), small batches (≤ 256), prefill."""
    return "gemv" if m <= GEMV_MAX_M else ("small" if m <= 256 else "large")


def _as_triton_configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
                          num_warps=w, num_stages=s) for bm, bn, bk, g, w, s in rows]


_TUNED = {name: triton.autotune(configs=_as_triton_configs(rows), key=["N", "K", "A_MODE", "DOT"])(_w4_matmul_kernel)
          for name, rows in CONFIGS.items()}


def _check_weight(w_packed: torch.Tensor, w_scale: torch.Tensor, k: int) -> int:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(f"packed weights must be a 2-D uint8 tensor, got {w_packed.dtype} {tuple(w_packed.shape)}")
    if w_packed.stride(-1) != 1:
        raise ValueError("packed weights must be contiguous along K")
    n = w_packed.shape[0]
    if w_packed.shape[1] * 2 != k:
        raise ValueError(f"activations have K = {k} but packed weights hold {w_packed.shape[1] * 2} columns")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"w_scale must be float32 of shape ({n},), got {w_scale.dtype} {tuple(w_scale.shape)}")
    return n


class W4A4Operands(NamedTuple):
    """A W4A4 product's checked operands, flattened to 2-D / 1-D as the kernels take them."""
    a: torch.Tensor  # (M, K/2) packed activation codes
    a_scale: torch.Tensor  # (M,) fp32
    a_zero: torch.Tensor | None  # (M,) fp32, asymmetric activations only
    w_sum: torch.Tensor | None  # (N,) fp32 sums of the weight codes, asymmetric activations only
    a_mode: int  # A_INT4 / A_UINT4
    k: int
    n: int
    lead: tuple  # the activations' leading dims (the output's)


def w4a4_operands(a_packed, a_scale, w_packed, w_scale, a_zero, w_sum) -> W4A4Operands:
    """Check a W4A4 product's arguments (a clear error for each mistake) and flatten them."""
    if a_packed.dtype != torch.uint8:
        raise TypeError(f"packed activations must be uint8, got {a_packed.dtype}")
    if (a_zero is None) != (w_sum is None):
        raise ValueError("asymmetric activations need both a_zero and w_sum")
    k = a_packed.shape[-1] * 2
    n = _check_weight(w_packed, w_scale, k)
    lead = tuple(a_packed.shape[:-1])
    if a_scale.shape != lead or a_scale.dtype != torch.float32:
        raise ValueError(f"a_scale must be float32 of shape {lead}, got {a_scale.dtype} {tuple(a_scale.shape)}")
    return W4A4Operands(a_packed.reshape(-1, k // 2).contiguous(), a_scale.reshape(-1).contiguous(),
                        a_zero.reshape(-1).float().contiguous() if a_zero is not None else None,
                        w_sum.float().contiguous() if w_sum is not None else None,
                        (A_UINT4 if a_zero is not None else A_INT4).value, k, n, lead)


def w4a16_operands(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, caller: str):
    """``(x as (M, K) with unit stride, K, N)`` for a weight-only product, its arguments checked."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{caller} expects fp16/bf16 activations, got {x.dtype}")
    k = x.shape[-1]
    n = _check_weight(w_packed, w_scale, k)
    x2 = x.reshape(-1, k)
    return (x2 if x2.stride(-1) == 1 else x2.contiguous()), k, n


def _launch(a2, a_scale, a_zero, w_packed, w_scale, w_sum, k, a_mode, dot, out_dtype, config, imprecise_k):
    m, n = a2.shape[0], w_packed.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a2.device)
    if m == 0:
        return out
    args = (a2, a_scale if a_scale is not None else w_scale, a_zero if a_zero is not None else w_scale,
            w_packed, w_scale, w_sum if w_sum is not None else w_scale, out,
            m, n, k, a2.stride(0), w_packed.stride(0), out.stride(0))
    consts = dict(A_MODE=a_mode, DOT=dot, IMPRECISE_K=imprecise_k)
    if config is None and a2.device.type != "cuda":  # Triton interpreter: no timing, first tile of the family
        config = CONFIGS[regime(m)][0]
    if config is None:
        kernel = _TUNED[regime(m)]
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*args, **consts)
    else:
        bm, bn, bk, g, warps, stages = config
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _w4_matmul_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, **consts,
                                num_warps=warps, num_stages=stages)
    return out


def w4a4_matmul(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                a_zero: torch.Tensor | None = None, w_sum: torch.Tensor | None = None, dot: str | None = None,
                out_dtype: torch.dtype = torch.bfloat16, config: tuple | None = None,
                imprecise_k: int | None = None) -> torch.Tensor:
    """out = dequant(A) · dequant(W)ᵀ for packed int4 activations (..., K/2) and weights (N, K/2).

    a_scale (...,) fp32 per token; a_zero (...,) fp32 zero points for asymmetric (uint4)
    activations, which then need w_sum (N,) fp32 = Σ_k weight codes. w_scale (N,) fp32 per
    output channel. dot: "fp8" (e4m3), "int8" (int32 accumulation) or "fp16" tensor cores;
    None takes DEFAULT_DOT for the regime of M. config:
    explicit (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), else autotuned per
    regime. imprecise_k: Triton's max_num_imprecise_acc for fp8 (None = compiler default).
    """
    if dot is None:
        dot = DEFAULT_DOT[regime(a_packed.numel() // max(a_packed.shape[-1], 1))]
    if dot not in DOT_KINDS:
        raise ValueError(f"dot must be one of {DOT_KINDS}, got {dot!r}")
    ops = w4a4_operands(a_packed, a_scale, w_packed, w_scale, a_zero, w_sum)
    out = _launch(ops.a, ops.a_scale, ops.a_zero, w_packed, w_scale, ops.w_sum, ops.k, ops.a_mode, dot, out_dtype,
                  config, imprecise_k)
    return out.reshape(*ops.lead, ops.n)


def w4a16_matmul(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                 out_dtype: torch.dtype | None = None, config: tuple | None = None) -> torch.Tensor:
    """Weight-only int4: out = x · dequant(W)ᵀ with x (..., K) fp16/bf16, codes converted exactly."""
    x2, k, n = w4a16_operands(x, w_packed, w_scale, "w4a16_matmul")
    out = _launch(x2, None, None, w_packed, w_scale, None, k, A_FLOAT.value, "fp16", out_dtype or x.dtype, config, None)
    return out.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- references

def w4a4_matmul_ref(a_codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                    a_zero: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference on unpacked codes: integer accumulation (float64, exact), then the same fp32 epilogue."""
    acc = a_codes.double() @ w_codes.double().transpose(0, 1)
    if a_zero is not None:
        acc = acc - a_zero.double()[..., None] * w_codes.double().sum(1)
    out = acc.float() * a_scale.float()[..., None] * w_scale.float()
    return out.to(out_dtype)


def w4a16_matmul_ref(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Reference weight-only int4 product in float32, output in x's dtype."""
    return ((x.float() @ w_codes.float().transpose(0, 1)) * w_scale.float()).to(x.dtype)
