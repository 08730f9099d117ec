"""Decode GEMV on the CUDA cores for 1-4 tokens: packed int4 weights read as 32-bit words (issue 12).

The tensor-core GEMV of :mod:`kernels.w4_matmul` pads one token to a 16-row tile and converts every
weight nibble into a tensor-core operand; at batch 1 it reads the weights at ~0.9-1.0 TB/s on the H100
(1.05-1.73x bf16, ``reports/kernels_notes.md``), where PyTorch's int4 kernel (tinygemm) reaches
~1.6 TB/s (2.5-2.7x) and the issue asks for 3x. Decode at 1-4 tokens is a stream of weight bytes
with a few multiply-adds per byte, so this kernel skips the tensor cores:

* weights are read as int32 words, eight codes each (the packing of qllm_core/quant/packing.py puts
  element 2j in the low nibble of byte j, so on a little-endian GPU nibble i of a word is element i of
  its eight), in (BLOCK_N rows x BLOCK_KW words) tiles: wide contiguous loads, no byte shuffles;
* ``products="fp32"``: a nibble becomes its signed value as a float built from 2**23's mantissa (no
  integer-to-float conversion, :func:`_nibbles`) and is multiplied with the activations in fp32 on the
  CUDA cores, the tokens (``BLOCK_M`` <= 4) sharing each weight tile; for W4A4, ``products="dp4a"``
  instead spreads a word's codes over the byte lanes of two int32s (even and odd elements, sign-extended
  to 8 bits by ``x | ((x & 0x08080808) * 30)``) and sums four products per PTX ``dp4a`` in int32;
  compiled for sm_90 the main loop issues 2.5-3.0 instructions per weight code with dp4a against
  6.1-8.6 with fp32 products (``scripts/decode_sass.py``, ``reports/bench/decode_sass_cpu.json``), where an
  H100 streaming the weights from HBM has room for about 5;
* partial sums stay per lane over the K loop and are reduced once at the end; one program per
  ``BLOCK_N`` output channels walks all of K: no split-K, so one launch, no output zeroing and a fixed
  summation order.

W4A4: the activation codes are int4 too (packed the same way, signed or 0..15 with a zero point);
every product and partial sum is an integer below 2**24, exact in fp32, and the epilogue is the
tensor-core kernel's (``(acc - zero_a * sum_k w) * scale_a * scale_w``), so the result equals
:func:`kernels.w4_matmul.w4a4_matmul_ref` bit for bit. W4A16: fp16/bf16 activations, fp32 sums in
this kernel's order (a stated tolerance against the reference).

Speed: ``eval.speedup``'s ``gemv`` phase times it as the ``w4a4_core`` / ``w4a4_core_dp4a`` / ``w4a16_core``
variants next to the tensor-core GEMV and tinygemm. On an H200 at batch 1 (stop 24, LLaMA-2-7B linears, vs bf16
in the same run) the dp4a products give 2.68-3.59x, the fp32 products 1.15-1.40x, tinygemm 1.77-2.00x; so
:func:`qllm_core.deploy.to_kernels` builds its W4A4 layers with ``decode_gemv="dp4a"``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4_matmul import A_FLOAT, A_INT4, store_epilogue, w4a4_operands, w4a16_operands

CORE_MAX_M = 4  # tokens up to which the CUDA-core GEMV applies (each token multiplies every weight again)


@triton.jit
def _nibbles(words, SIGNED: tl.constexpr):
    """int32 words (R, KW) -> their eight 4-bit codes each as float32 (R, KW * 8), in element order.

    No integer-to-float conversion (a quarter-rate instruction on the H100, one per code): the nibble (XOR 8
    for two's complement) is OR-ed into the mantissa of 2**23 (bits 0x4B000000), which makes the float
    2**23 + u exactly, and 2**23 (+ 8) is subtracted: a shift, one LOP3 and one FADD per code.
    """
    shifts = tl.arange(0, 8) * 4
    u = (words[:, :, None] >> shifts[None, None, :]) & 15
    if SIGNED:
        value = ((u ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    else:
        value = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return tl.reshape(value, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _byte_lanes(words, SIGNED: tl.constexpr):
    """int32 words of eight codes -> (even, odd): elements 0, 2, 4, 6 and 1, 3, 5, 7 of each word as its four
    bytes (byte j holds element 2j's nibble low, 2j+1's high), sign-extended from 4 to 8 bits when ``SIGNED``:
    a set bit 3 becomes 0xF0 in its byte (8 * 30 = 0xF0: no carry into the next byte)."""
    even = words & 0x0F0F0F0F
    odd = (words >> 4) & 0x0F0F0F0F
    if SIGNED:
        even = even | ((even & 0x08080808) * 30)
        odd = odd | ((odd & 0x08080808) * 30)
    return even, odd


@triton.jit
def _dp4a(x, y, acc, ASM: tl.constexpr):
    """``acc + Σ_i x_i·y_i`` over the four signed bytes of the int32s ``x`` and ``y`` (broadcast to ``acc``'s
    shape): one PTX ``dp4a.s32.s32`` per word on the GPU; the same sum by shifts where inline assembly cannot
    run (the Triton interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r",
                                         [tl.broadcast_to(x, acc.shape), tl.broadcast_to(y, acc.shape), acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            acc += ((x << (24 - 8 * i)) >> 24) * ((y << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _w4_gemv_kernel(
    a_ptr, a_scale_ptr, a_zero_ptr, w_ptr, w_scale_ptr, w_sum_ptr, c_ptr,
    M, N, KW, stride_am, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, A_MODE: tl.constexpr,
    DP4A: tl.constexpr, ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    kw = tl.arange(0, BLOCK_KW)
    ke = tl.arange(0, BLOCK_KW * 8)  # activation elements per step (A_FLOAT)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + kw[None, :]  # (BLOCK_N, BLOCK_KW) words
    # dp4a for one token: its activation words are loaded once per weight row (a zero row stride: the repeats come
    # from L1), so both operands of every dp4a come from loads of one tile shape and no layout conversion through
    # shared memory is needed (scripts/decode_sass.py). Otherwise (BLOCK_M, step) tiles broadcast against the rows
    # (for the fp32 products the per-row form measured more instructions per code there).
    PER_ROW: tl.constexpr = DP4A and BLOCK_M == 1
    if PER_ROW:
        a_rows, a_rows_ok = rn[:, None] * 0, n_ok
    else:
        a_rows, a_rows_ok = rm[:, None].to(tl.int64) * stride_am, m_ok
    a_ptrs = a_ptr + a_rows + (ke[None, :] if A_MODE == A_FLOAT else kw[None, :])  # values, or packed words
    # partial sums per lane, reduced over K once after the loop (a reduction per step costs shuffles and block
    # barriers every iteration)
    lane_width: tl.constexpr = BLOCK_KW if DP4A else BLOCK_KW * 8
    if PER_ROW:
        lanes = tl.zeros((BLOCK_N, lane_width), dtype=tl.int32)
    else:
        lanes = tl.zeros((BLOCK_M, BLOCK_N, lane_width), dtype=tl.int32 if DP4A else tl.float32)
    for k0 in range(0, tl.cdiv(KW, BLOCK_KW)):
        k_ok = k0 * BLOCK_KW + kw < KW
        words = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
        if A_MODE == A_FLOAT:
            a = tl.load(a_ptrs, mask=a_rows_ok[:, None] & (k0 * BLOCK_KW * 8 + ke < KW * 8)[None, :], other=0.0)
            a = a.to(tl.float32)
            a_ptrs += BLOCK_KW * 8
        else:
            a = tl.load(a_ptrs, mask=a_rows_ok[:, None] & k_ok[None, :], other=0)
            a_ptrs += BLOCK_KW
        if DP4A:  # integer activations: four products per instruction, no float per code
            w_even, w_odd = _byte_lanes(words, True)
            a_even, a_odd = _byte_lanes(a, A_MODE == A_INT4)
            if PER_ROW:
                lanes = _dp4a(a_odd, w_odd, _dp4a(a_even, w_even, lanes, ASM), ASM)
            else:
                lanes = _dp4a(a_odd[:, None, :], w_odd[None, :, :],
                              _dp4a(a_even[:, None, :], w_even[None, :, :], lanes, ASM), ASM)
        else:
            w = _nibbles(words, True)
            if A_MODE != A_FLOAT:
                a = _nibbles(a, A_MODE == A_INT4)
            lanes += a[:, None, :] * w[None, :, :]
        w_ptrs += BLOCK_KW
    # exact for integer codes either way: products of magnitude <= 120, |sums| < 2**24 for K < 2**17
    if PER_ROW:
        acc = tl.sum(lanes, axis=1)[None, :].to(tl.float32)
    else:
        acc = tl.sum(lanes, axis=2).to(tl.float32)
    # masked-out words read as code 0 (unsigned activations too): the zero-point term needs no padding correction
    store_epilogue(acc, rm, rn, m_ok, n_ok, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_sum_ptr, c_ptr, stride_cm, A_MODE)


# (BLOCK_N, BLOCK_KW, num_warps, num_stages): a few rows per program so that N = 4096 already gives
# 256-2048 programs (several per SM) with 1-4 KB of weights in flight each; chosen on the GPU by autotuning.
# The last two give the dp4a products 128-bit loads of four words per thread (scripts/decode_sass.py).
CONFIGS = [(4, 64, 4, 3), (8, 64, 4, 3), (4, 128, 4, 3), (2, 128, 4, 4), (8, 32, 2, 4), (16, 32, 4, 3),
           (8, 128, 4, 2), (4, 256, 8, 2)]
_TUNED = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w, num_stages=s) for bn, bkw, w, s in CONFIGS],
    key=["N", "KW", "BLOCK_M", "A_MODE", "DP4A"])(_w4_gemv_kernel)


def _words(packed: torch.Tensor, what: str) -> torch.Tensor:
    """A contiguous (rows, K/2) uint8 tensor of packed codes viewed as (rows, K/8) int32 words."""
    if packed.shape[-1] % 4:
        raise ValueError(f"{what}: K = {packed.shape[-1] * 2} is not a multiple of 8 (whole 32-bit words of codes)")
    return packed.contiguous().view(torch.int32)


PRODUCTS = ("dp4a", "fp32")  # how the W4A4 GEMV multiplies codes (w4a4_gemv's ``products``)


def _launch(a2, a_scale, a_zero, w_packed, w_scale, w_sum, a_mode, out_dtype, config, dp4a=False):
    m, n = a2.shape[0], w_packed.shape[0]
    if m > CORE_MAX_M:
        raise ValueError(f"the CUDA-core GEMV takes at most {CORE_MAX_M} tokens, got {m}; use kernels.w4_matmul")
    w_words = _words(w_packed, "weights")
    out = torch.empty((m, n), dtype=out_dtype, device=a2.device)
    if m == 0:
        return out
    a = a2 if a_mode == A_FLOAT.value else _words(a2, "activations")
    args = (a, a_scale if a_scale is not None else w_scale, a_zero if a_zero is not None else w_scale,
            w_words, w_scale, w_sum if w_sum is not None else w_scale, out,
            m, n, w_words.shape[1], a.stride(0), w_words.stride(0), out.stride(0))
    block_m = triton.next_power_of_2(m)
    flags = {"A_MODE": a_mode, "DP4A": dp4a, "ASM": a2.device.type == "cuda"}  # no inline PTX in the interpreter
    if config is None and a2.device.type != "cuda":  # Triton interpreter: no timing, the first config
        config = CONFIGS[0]
    if config is None:
        _TUNED[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, BLOCK_M=block_m, **flags)
    else:
        bn, bkw, warps, stages = config
        _w4_gemv_kernel[(triton.cdiv(n, bn),)](*args, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_KW=bkw, **flags,
                                                num_warps=warps, num_stages=stages)
    return out


def w4a4_gemv(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
              a_zero: torch.Tensor | None = None, w_sum: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, config: tuple | None = None,
              products: str = "fp32") -> torch.Tensor:
    """:func:`kernels.w4_matmul.w4a4_matmul`'s product for at most ``CORE_MAX_M`` tokens, on the CUDA cores.

    Same arguments and result (bit for bit); K must be a multiple of 8. ``config``: an explicit
    (BLOCK_N, BLOCK_KW, num_warps, num_stages), else autotuned. ``products``: ``"fp32"`` converts every
    code to float32 and multiply-adds (one conversion per code: at 16 per clock per SM that alone is ~12 us
    for a 12288 x 4096 weight on an H100, about what the kernel measures, reports/kernels_notes.md);
    ``"dp4a"`` spreads each word's codes over byte lanes with a few integer operations and sums four
    products per ``dp4a`` instruction in int32 (exact, so the same result).
    """
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    ops = w4a4_operands(a_packed, a_scale, w_packed, w_scale, a_zero, w_sum)
    out = _launch(ops.a, ops.a_scale, ops.a_zero, w_packed, w_scale, ops.w_sum, ops.a_mode, out_dtype, config,
                  dp4a=products == "dp4a")
    return out.reshape(*ops.lead, ops.n)


def w4a16_gemv(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
               out_dtype: torch.dtype | None = None, config: tuple | None = None) -> torch.Tensor:
    """Weight-only int4 for at most ``CORE_MAX_M`` tokens: ``x · dequant(W)ᵀ``, fp32 sums on the CUDA cores."""
    x2, _, n = w4a16_operands(x, w_packed, w_scale, "w4a16_gemv")
    out = _launch(x2, None, None, w_packed, w_scale, None, A_FLOAT.value, out_dtype or x.dtype, config)
    return out.reshape(*x.shape[:-1], n)
