"""Issue 12: a 4-bit KV cache and a split-KV (flash-decoding) attention kernel that reads it.

Quantization follows the fake-quant model exactly (qllm_core/attention.py ``KVQuantHook`` with
``QuantConfig.kv_quantizer()``): K after RoPE and V, shaped ``(batch, kv_heads, tokens, head_dim)``,
are quantized per token and per head over head_dim (one group = one head of one token), 4 bits,
asymmetric by default (``QuantConfig.kv_asym = True``: unsigned codes 0..15 with a zero point),
clip ratio 1. :func:`quantize_kv` calls the repo's own :func:`~qllm_core.quant.quantizer.quantize_to_codes`,
so the codes, scales and zeros are the ones the fake quantizer uses, and
``dequantize_kv(quantize_kv(x)).to(x.dtype) == Quantizer(4, symmetric)(x)`` bit for bit
(the product ``(code - zero) * scale`` is exact in fp32, so rounding it once to x's dtype is the
fake quantizer's single rounding).

Storage per (token, head): ``head_dim / 2`` bytes of codes (qllm_core/quant/packing.py order:
element 2j in the low nibble, 2j+1 in the high nibble of byte j), the scale in the input dtype
(bf16 in the layer) and, when asymmetric, the zero point as uint8 (an integer 0..15). For
head_dim 128 and bf16 that is 64 + 2 + 1 = 67 bytes instead of 256. Symmetric caches store
``code + 8`` and no zero (the kernel uses zero = 8), so one kernel reads both.

Kernel (:func:`kv4_decode_attention`): one program per (batch, kv head, KV chunk). All
``heads / kv_heads`` query heads of a GQA group share the program, so each packed K/V tile is
loaded once per group; the group rows are padded to 16 for ``tl.dot``. Nibbles are never
interleaved: q·k = q_even·k_low + q_odd·k_high, and the V product keeps even and odd output
columns in two accumulators. Online softmax in the exp2 domain, fp32 accumulation; each chunk
writes its normalised partial output and log-sum-exp, and a second small kernel combines the
chunks (split-KV, so batch 1 still spreads over the SMs). Dot operands are in q's dtype
(bf16/fp16, as flash attention does with P and V; fp32 q uses IEEE fp32 dots).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qllm_core.quant.packing import pack_uint4, unpack_uint4
from qllm_core.quant.quantizer import quantize_to_codes

KV_BITS = 4
SYM_ZERO = 8  # symmetric codes -8..7 are stored as code + 8


class KV4(NamedTuple):
    """Packed 4-bit K or V: ``packed`` uint8 (B, Hkv, L, D/2), ``scale`` (B, Hkv, L), ``zero``
    uint8 (B, Hkv, L) or None for a symmetric cache."""
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def quantize_kv(x: torch.Tensor, symmetric: bool = False, clip_ratio: float = 1.0) -> KV4:
    """4-bit per-(token, head) quantization of K (after RoPE) or V shaped (B, Hkv, L, head_dim).

    Same codes as the fake quantizer ``Quantizer(4, symmetric, clip_ratio=clip_ratio)``
    (default: asymmetric, the repo's ``QuantConfig`` KV setting)."""
    if x.dim() != 4:
        raise ValueError(f"quantize_kv expects (batch, kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"head_dim must be even to pack two 4-bit codes per byte, got {x.shape[-1]}")
    codes, scale, zero = quantize_to_codes(x, KV_BITS, symmetric=symmetric, clip_ratio=clip_ratio)
    scale = scale.squeeze(-1)
    if symmetric:
        codes = codes.to(torch.int16) + SYM_ZERO
    # codes are clamped to 0..15 already; a range check would sync the host inside a captured decode step
    packed = pack_uint4(codes, check_range=False)
    return KV4(packed, scale, None if symmetric else zero.squeeze(-1).to(torch.uint8))


def dequantize_kv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(code - zero) * scale, computed in fp32 (exact), returned in ``dtype``."""
    codes = unpack_uint4(packed).float()
    z = float(SYM_ZERO) if zero is None else zero.float()[..., None]
    return ((codes - z) * scale.float()[..., None]).to(dtype)


class KV4Cache:
    """A preallocated 4-bit K and V cache of ``max_len`` slots: (B, Hkv, max_len, D/2) codes."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device=None,
                 scale_dtype: torch.dtype = torch.bfloat16, symmetric: bool = False):
        if head_dim % 2:
            raise ValueError(f"head_dim must be even, got {head_dim}")
        self.symmetric = symmetric

        def one() -> KV4:
            return KV4(torch.zeros(batch, kv_heads, max_len, head_dim // 2, dtype=torch.uint8, device=device),
                       torch.zeros(batch, kv_heads, max_len, dtype=scale_dtype, device=device),
                       None if symmetric else torch.zeros(batch, kv_heads, max_len, dtype=torch.uint8, device=device))
        self.k, self.v = one(), one()

    def write(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize K (after RoPE) and V of tokens ``pos .. pos + t - 1`` into their slots."""
        t = k.shape[2]
        for cache, x in ((self.k, k), (self.v, v)):
            q = quantize_kv(x, self.symmetric)
            cache.packed[:, :, pos:pos + t] = q.packed
            cache.scale[:, :, pos:pos + t] = q.scale.to(cache.scale.dtype)
            if cache.zero is not None:
                cache.zero[:, :, pos:pos + t] = q.zero

    def dequantize(self, kv_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V of slots [0, kv_len) (tests and the prefill path)."""
        return tuple(dequantize_kv(c.packed[:, :, :kv_len], c.scale[:, :, :kv_len],
                                   None if c.zero is None else c.zero[:, :, :kv_len], dtype)
                     for c in (self.k, self.v))


@triton.jit
def _dequant_tile(P, S, Z, base, base_s, offs_n, offs_d, n_mask, d_mask, stride_n, stride_d, stride_sn,
                  SYMMETRIC: tl.constexpr, DT: tl.constexpr, WORDS: tl.constexpr, HALF: tl.constexpr,
                  HALF_PAD: tl.constexpr):
    """Load a (BLOCK_N, HALF) packed tile -> (low, high) dequantized operands in DT.

    ``WORDS``: ``P`` is the cache viewed as int32 (strides in words, four code bytes per word), so a row is
    read with wide loads and split into bytes by shifts; otherwise byte by byte (the compiled sm_90 loop then
    issues a one-byte load per code byte: reports/kernels_notes.md)."""
    if WORDS:
        offs_w = tl.arange(0, HALF_PAD // 4)
        words = tl.load(P + base + offs_n[:, None] * stride_n + offs_w[None, :],
                        mask=n_mask[:, None] & (offs_w < HALF // 4)[None, :], other=0)
        shifts = tl.arange(0, 4) * 8
        b = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 255, (offs_n.shape[0], HALF_PAD))
    else:
        b = tl.load(P + base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d,
                    mask=n_mask[:, None] & d_mask[None, :], other=0).to(tl.int32)
    s = tl.load(S + base_s + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = tl.zeros_like(s) + 8.0
    else:
        z = tl.load(Z + base_s + offs_n * stride_sn, mask=n_mask, other=0).to(tl.float32)
    # code - zero without an integer-to-float conversion (quarter rate on the H100, one per element): the code
    # OR-ed into 2**23's mantissa is the float 2**23 + code, and 2**23 + zero is exact too, so the difference is
    # the exact integer and the result equals ((float(code) - zero) * scale) bit for bit
    offset = 8388608.0 + z[:, None]
    lo = ((((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - offset) * s[:, None]).to(DT)
    hi = ((((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - offset) * s[:, None]).to(DT)
    return lo, hi


@triton.jit
def _kv4_split_kernel(Q, KP, KS, KZ, VP, VS, VZ, OP, LSE,
                      kv_len, chunk, qk_scale_log2, n_splits,
                      stride_qb, stride_qh, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_ksb, stride_ksh, stride_ksn,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_vsb, stride_vsh, stride_vsn,
                      KV_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                      HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      SYMMETRIC: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr, WORDS: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // KV_HEADS
    kvh = pid_bh % KV_HEADS
    offs_g = tl.arange(0, G_PAD)
    g_mask = offs_g < GROUP
    head = kvh * GROUP + offs_g
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    q_ptr = Q + b * stride_qb + head[:, None] * stride_qh + 2 * offs_d[None, :] * stride_qd
    qm = g_mask[:, None] & d_mask[None, :]
    q_even = tl.load(q_ptr, mask=qm, other=0.0).to(DT)
    q_odd = tl.load(q_ptr + stride_qd, mask=qm, other=0.0).to(DT)

    k_base = b.to(tl.int64) * stride_kb + kvh * stride_kh
    ks_base = b.to(tl.int64) * stride_ksb + kvh * stride_ksh
    v_base = b.to(tl.int64) * stride_vb + kvh * stride_vh
    vs_base = b.to(tl.int64) * stride_vsb + kvh * stride_vsh

    start = pid_s * chunk
    end = tl.minimum(start + chunk, kv_len)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc_e = tl.zeros([G_PAD, HALF_PAD], tl.float32)
    acc_o = tl.zeros([G_PAD, HALF_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        k_lo, k_hi = _dequant_tile(KP, KS, KZ, k_base, ks_base, offs_n, offs_d, n_mask, d_mask,
                                   stride_kn, stride_kd, stride_ksn, SYMMETRIC, DT, WORDS, HALF, HALF_PAD)
        s = tl.dot(q_even, tl.trans(k_lo), input_precision=PRECISION)
        s = tl.dot(q_odd, tl.trans(k_hi), s, input_precision=PRECISION)
        s = tl.where(n_mask[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_lo, v_hi = _dequant_tile(VP, VS, VZ, v_base, vs_base, offs_n, offs_d, n_mask, d_mask,
                                   stride_vn, stride_vd, stride_vsn, SYMMETRIC, DT, WORDS, HALF, HALF_PAD)
        p = p.to(DT)
        acc_e = tl.dot(p, v_lo, acc_e * alpha[:, None], input_precision=PRECISION)
        acc_o = tl.dot(p, v_hi, acc_o * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    row = (b * (KV_HEADS * GROUP) + head) * n_splits + pid_s  # (B*H, n_splits) row of this head
    o_ptr = OP + row[:, None] * (2 * HALF) + 2 * offs_d[None, :]
    inv_l = 1.0 / l_i
    tl.store(o_ptr, acc_e * inv_l[:, None], mask=qm)
    tl.store(o_ptr + 1, acc_o * inv_l[:, None], mask=qm)
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit
def _kv4_combine_kernel(OP, LSE, Out, n_splits, stride_ob, stride_oh, stride_od,
                        HEADS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    pid = tl.program_id(0)  # b * HEADS + h
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < n_splits
    lse = tl.load(LSE + pid * n_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_mask, tl.exp2(lse - m), 0.0)
    o = tl.load(OP + (pid * n_splits + offs_s[:, None]) * D + offs_d[None, :],
                mask=s_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    b = pid // HEADS
    h = pid % HEADS
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty),
             mask=offs_d < D)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _check(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, kv_len):
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (batch, heads, 1, head_dim) for decode, got shape {tuple(q.shape)}")
    if q.dtype not in _TL_DTYPES:
        raise TypeError(f"q must be bf16, fp16 or fp32, got {q.dtype}")
    batch, heads, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (two 4-bit codes per byte), got {head_dim}")
    for name, p in (("k_packed", k_packed), ("v_packed", v_packed)):
        if p.dtype != torch.uint8 or p.dim() != 4:
            raise ValueError(f"{name} must be uint8 (batch, kv_heads, max_len, head_dim/2), got "
                             f"{p.dtype} {tuple(p.shape)}")
    if v_packed.shape != k_packed.shape:
        raise ValueError(f"k_packed {tuple(k_packed.shape)} and v_packed {tuple(v_packed.shape)} differ")
    b2, kv_heads, max_len, half = k_packed.shape
    if b2 != batch or half * 2 != head_dim:
        raise ValueError(f"packed cache {tuple(k_packed.shape)} does not match q {tuple(q.shape)} "
                         f"(expected ({batch}, kv_heads, max_len, {head_dim // 2}))")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale), ("k_zero", k_zero), ("v_zero", v_zero)):
        if t is not None and tuple(t.shape) != (batch, kv_heads, max_len):
            raise ValueError(f"{name} must be (batch, kv_heads, max_len) = {(batch, kv_heads, max_len)}, "
                             f"got {tuple(t.shape)}")
    if (k_zero is None) != (v_zero is None):
        raise ValueError("k_zero and v_zero must both be given (asymmetric) or both be None (symmetric)")
    for name, z in (("k_zero", k_zero), ("v_zero", v_zero)):
        if z is not None and z.stride() != (k_scale if name == "k_zero" else v_scale).stride():
            raise ValueError(f"{name} must have the same strides as its scale")
    if not 1 <= kv_len <= max_len:
        raise ValueError(f"kv_len must lie in [1, {max_len}], got {kv_len}")
    return batch, heads, kv_heads, head_dim


def _as_words(packed: torch.Tensor) -> torch.Tensor | None:
    """The packed cache viewed as int32 (four code bytes per word), or None where its rows are not whole,
    4-byte-aligned words (head_dim not a multiple of 8, or a strided view)."""
    if (packed.shape[-1] % 4 or packed.stride(-1) != 1 or packed.storage_offset() % 4 or packed.data_ptr() % 4
            or any(st % 4 for st in packed.stride()[:-1])):
        return None
    return packed.view(torch.int32)


def default_splits(batch: int, kv_heads: int, kv_len: int, block_n: int, device) -> int:
    """Enough KV chunks for about two programs per SM (4 'SMs' on the CPU interpreter)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(kv_len, block_n), triton.cdiv(2 * sms, batch * kv_heads)))


def kv4_decode_attention(q: torch.Tensor, k_packed: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor | None,
                         v_packed: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor | None, kv_len: int,
                         sm_scale: float | None = None, num_splits: int | None = None, block_n: int = 64,
                         num_warps: int = 4, dot_dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(q·Kᵀ·sm_scale)·V over cache slots [0, kv_len) of a 4-bit cache; q (B, H, 1, D),
    GQA (head h reads kv head h // (H / Hkv)); returns (B, H, 1, D) in q's dtype.

    ``k_zero``/``v_zero`` None means a symmetric cache (codes stored + 8); see :func:`quantize_kv`.
    ``dot_dtype`` (default q's dtype) is the dtype of the dot operands; torch.float32 gives IEEE fp32
    dots (the Triton interpreter computes bf16 ``tl.dot`` wrongly, so CPU tests of bf16 use it)."""
    batch, heads, kv_heads, head_dim = _check(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, kv_len)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    group = heads // kv_heads
    dot_dtype = q.dtype if dot_dtype is None else dot_dtype
    if dot_dtype not in _TL_DTYPES:
        raise TypeError(f"dot_dtype must be bf16, fp16 or fp32, got {dot_dtype}")
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    if num_splits is None:
        num_splits = default_splits(batch, kv_heads, kv_len, block_n, q.device)
    n_blocks = triton.cdiv(kv_len, block_n)
    chunk = triton.cdiv(n_blocks, max(1, min(num_splits, n_blocks))) * block_n
    n_splits = triton.cdiv(kv_len, chunk)  # every chunk non-empty
    half = head_dim // 2
    o_part = torch.empty(batch * heads * n_splits, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch * heads * n_splits, device=q.device, dtype=torch.float32)
    symmetric = k_zero is None
    kz, vz = (k_scale, v_scale) if symmetric else (k_zero, v_zero)  # unused pointers when symmetric
    words = all(_as_words(p) is not None for p in (k_packed, v_packed))
    if words:  # rows of whole 32-bit words: read them as such
        k_packed, v_packed = _as_words(k_packed), _as_words(v_packed)
    _kv4_split_kernel[(batch * kv_heads, n_splits)](
        q, k_packed, k_scale, kz, v_packed, v_scale, vz, o_part, lse,
        kv_len, chunk, sm_scale * math.log2(math.e), n_splits,
        q.stride(0), q.stride(1), q.stride(3),
        *k_packed.stride(), *k_scale.stride(), *v_packed.stride(), *v_scale.stride(),
        KV_HEADS=kv_heads, GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)),
        HALF=half, HALF_PAD=max(16, triton.next_power_of_2(half)), BLOCK_N=block_n,
        SYMMETRIC=symmetric, DT=_TL_DTYPES[dot_dtype],
        PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", WORDS=words, num_warps=num_warps)
    out = torch.empty_like(q)
    _kv4_combine_kernel[(batch * heads,)](
        o_part, lse, out, n_splits, out.stride(0), out.stride(1), out.stride(3),
        HEADS=heads, D=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        S_PAD=max(2, triton.next_power_of_2(n_splits)), num_warps=num_warps)
    return out


def kv4_decode_attention_ref(q: torch.Tensor, k_packed: torch.Tensor, k_scale: torch.Tensor,
                             k_zero: torch.Tensor | None, v_packed: torch.Tensor, v_scale: torch.Tensor,
                             v_zero: torch.Tensor | None, kv_len: int, sm_scale: float | None = None) -> torch.Tensor:
    """Reference: dequantize slots [0, kv_len) and take an explicit fp32 softmax; q's dtype out."""
    _, heads, kv_heads, head_dim = _check(q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, kv_len)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    sl = slice(0, kv_len)
    k = dequantize_kv(k_packed[:, :, sl], k_scale[:, :, sl], None if k_zero is None else k_zero[:, :, sl])
    v = dequantize_kv(v_packed[:, :, sl], v_scale[:, :, sl], None if v_zero is None else v_zero[:, :, sl])
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * sm_scale
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)
