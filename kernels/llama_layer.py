"""A LLaMA decoder layer for speed benchmarks, bf16 or assembled from quantized linears.

Layer shapes only (weights random; values do not change cost). Structure: input RMSNorm,
fused q/k/v projection with GQA, RoPE, attention through torch SDPA, o_proj, residual,
post-attention RMSNorm, fused gate/up, SiLU·up, down_proj, residual.

What stays in bf16 in every variant (said so in reports/kernels_notes.md): RMSNorm, RoPE,
SiLU, residuals, and attention itself over a bf16 KV cache — except in the ``-kv4`` variants.

Variants (methods.md §2 "Placement"; QuaRot for the comparison of issue 6 (d)):
- ``bf16``: cuBLAS linears.
- ``w4a4``: per-token int4 activations, no online transform (RTN / QLLM style).
- ``flatquant``: fused Kronecker transform + quantize at the four linear inputs: q/k/v and
  gate/up (hidden factors), o_proj (heads x head_dim), down_proj (intermediate factors).
- ``quarot``: online Hadamard only where QuaRot needs one (o_proj over heads x head_dim,
  down_proj), run as its own launch before the quantizer, like QuaRot's separate Hadamard
  kernel. Walsh-Hadamard factors where the size is a power of two; a random orthogonal
  stand-in otherwise (QuaRot's H_172 has no Sylvester form; the cost depends on sizes only).
- ``w4a4-fp8`` / ``flatquant-fp8`` (issue 12): as ``w4a4`` / ``flatquant``, but the linears are
  :class:`kernels.fp8_linear.FP8W4A4Linear`: prefill GEMMs on cuBLAS FP8 (kernel 1 writes e4m3
  codes, ``torch._scaled_mm`` multiplies them exactly), decode on the packed-int4 Triton GEMV.
- ``<variant>-kv4`` (issue 12; :data:`KV4_VARIANTS` are the ones benchmarked): the same linears,
  but decode keeps K (after RoPE) and V in a 4-bit :class:`kernels.kv4_attention.KV4Cache`
  (per token and head, asymmetric, as the fake-quant model's ``KVQuantHook``; make one with
  :func:`new_kv4_cache`) and attends with the split-KV Triton kernel ``kv4_decode_attention``.
  Prefill is the base variant's (bf16 SDPA, no cache written).
- ``<quantized variant>-dp4a`` (issue 12; :data:`DP4A_VARIANTS` are the ones benchmarked, decode rows
  only): the same linears decoding through the CUDA-core dp4a GEMV of :mod:`kernels.w4_gemv`
  (``W4A4Linear(decode_gemv="dp4a")``, the same result bit for bit); combinable with ``-kv4``
  (``flatquant-fp8-dp4a-kv4``).

:func:`build_stack` stacks ``n_layers`` independent decoder layers (whole-model benchmarks; no
embedding or LM head, they are the same bf16 matrices in every variant).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_linear import FP8W4A4Linear
from .kv4_attention import KV4Cache, kv4_decode_attention
from .kronecker import kronecker_factors
from .qlinear import W4A4Linear

VARIANTS = ("bf16", "w4a4", "flatquant", "quarot", "w4a4-fp8", "flatquant-fp8")
KV4_SUFFIX = "-kv4"
KV4_VARIANTS = ("bf16-kv4", "flatquant-fp8-kv4")  # decode-only rows of eval.speedup --phases layers
DP4A_SUFFIX = "-dp4a"
DP4A_VARIANTS = ("w4a4-fp8-dp4a", "flatquant-fp8-dp4a", "flatquant-fp8-dp4a-kv4")  # decode-only rows too


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int = 128

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


LLAMA_SHAPES = {s.name: s for s in (
    LlamaShape("llama2-7b", 4096, 11008, 32, 32),
    LlamaShape("llama2-13b", 5120, 13824, 40, 40),
    LlamaShape("llama2-70b", 8192, 28672, 64, 8),
    LlamaShape("llama3-8b", 4096, 14336, 32, 8),
)}


def hadamard(n: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-Walsh-Hadamard matrix of a power-of-two size n."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().to(device)


def _factor(n: int, kind: str, gen: torch.Generator, device) -> torch.Tensor:
    if kind == "hadamard" and not n & (n - 1):
        return hadamard(n, device)
    return random_orthogonal(n, gen, device)


def _quant_linear(out_f: int, in_f: int, factors: tuple[int, int] | None, kind: str, fuse: bool,
                  gen: torch.Generator, device, cls: type = W4A4Linear, decode_gemv: str | None = None) -> W4A4Linear:
    packed = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, device=device)
    scale = torch.rand(out_f, device=device) * 1e-2 + 1e-3
    p1 = p2 = None
    if factors is not None:
        p1 = _factor(factors[0], kind, gen, device).to(torch.bfloat16)
        p2 = _factor(factors[1], kind, gen, device).to(torch.bfloat16)
    return cls(packed, scale, p1, p2, fuse_transform=fuse, decode_gemv=decode_gemv)


def _bf16_linear(out_f: int, in_f: int, device) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0.0, 1.0 / math.sqrt(in_f))
    return lin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class DecoderLayer(nn.Module):
    """LLaMA decoder layer around four linear modules (bf16 nn.Linear or W4A4Linear)."""

    def __init__(self, shape: LlamaShape, qkv: nn.Module, o: nn.Module, gate_up: nn.Module, down: nn.Module,
                 device=None, max_positions: int = 8192, eps: float = 1e-5, kv4: bool = False):
        super().__init__()
        self.shape, self.eps = shape, eps
        self.kv4 = kv4  # decode from a KV4Cache with the 4-bit attention kernel
        self.kv4_dot_dtype: torch.dtype | None = None  # kernel dot operands (None: bf16); fp32 in CPU tests
        self.kv_fake_quant: nn.Module | None = None  # optional fake quantizer of K/V before a bf16 cache write
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.norm1 = nn.Parameter(torch.ones(shape.hidden, device=device, dtype=torch.bfloat16))
        self.norm2 = nn.Parameter(torch.ones(shape.hidden, device=device, dtype=torch.bfloat16))
        inv = 1.0 / (10000 ** (torch.arange(0, shape.head_dim, 2, device=device).float() / shape.head_dim))
        ang = torch.arange(max_positions, device=device).float()[:, None] * inv[None, :]
        ang = torch.cat((ang, ang), -1)
        self.register_buffer("cos", ang.cos().to(torch.bfloat16))
        self.register_buffer("sin", ang.sin().to(torch.bfloat16))

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x * self.cos[pos] + _rotate_half(x) * self.sin[pos]

    def forward(self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | KV4Cache | None = None,
                kv_len: int = 0) -> torch.Tensor:
        """Prefill when kv_cache is None (causal over x's tokens); else decode one token per
        sequence, writing its K/V at slot kv_len of the preallocated bf16 cache (B, Hkv, L, D)
        (a :class:`KV4Cache` for a kv4 layer) and attending over slots [0, kv_len]."""
        s = self.shape
        b, t, _ = x.shape
        h = F.rms_norm(x, (s.hidden,), self.norm1, self.eps)
        qkv = self.qkv(h).view(b, t, s.heads + 2 * s.kv_heads, s.head_dim).transpose(1, 2)
        q, k, v = qkv.split((s.heads, s.kv_heads, s.kv_heads), dim=1)
        pos = torch.arange(kv_len, kv_len + t, device=x.device)
        q, k = self._rope(q, pos), self._rope(k, pos)
        if kv_cache is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif isinstance(kv_cache, KV4Cache):
            if not self.kv4:
                raise TypeError("a KV4Cache needs a '-kv4' layer variant")
            if t != 1:
                raise ValueError(f"the kv4 decode path takes one token per sequence, got {t}")
            kv_cache.write(kv_len, k, v)
            attn = kv4_decode_attention(q, *kv_cache.k, *kv_cache.v, kv_len + 1, dot_dtype=self.kv4_dot_dtype)
        else:
            if self.kv4:
                raise TypeError("a '-kv4' layer decodes from a KV4Cache (new_kv4_cache), not a bf16 cache")
            if self.kv_fake_quant is not None:
                k, v = self.kv_fake_quant(k), self.kv_fake_quant(v)
            kc, vc = kv_cache
            kc[:, :, kv_len:kv_len + t] = k
            vc[:, :, kv_len:kv_len + t] = v
            attn = F.scaled_dot_product_attention(q, kc[:, :, :kv_len + t], vc[:, :, :kv_len + t], enable_gqa=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))
        h = F.rms_norm(x, (s.hidden,), self.norm2, self.eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def build_layer(shape: LlamaShape, variant: str, device, seed: int = 0) -> DecoderLayer:
    """One decoder layer of `shape` in one of VARIANTS (a quantized one optionally + '-dp4a', any optionally +
    '-kv4'), random weights (layer shapes only; a suffixed layer has its base variant's weights for the same
    seed)."""
    requested = variant
    kv4 = variant.endswith(KV4_SUFFIX)
    variant = variant.removesuffix(KV4_SUFFIX)
    dp4a = variant.endswith(DP4A_SUFFIX)
    variant = variant.removesuffix(DP4A_SUFFIX)
    if variant not in VARIANTS or (dp4a and variant == "bf16"):
        raise ValueError(f"variant must be one of {VARIANTS} (a quantized one optionally + {DP4A_SUFFIX!r}), "
                         f"optionally + {KV4_SUFFIX!r}, got {requested!r}")
    torch.manual_seed(seed)  # large weights are drawn on `device`; small factors from `gen` on the CPU
    gen = torch.Generator().manual_seed(seed)
    dims = dict(qkv=(shape.qkv_out, shape.hidden), o=(shape.hidden, shape.heads * shape.head_dim),
                gate_up=(2 * shape.inter, shape.hidden), down=(shape.hidden, shape.inter))
    if variant == "bf16":
        lins = {name: _bf16_linear(o, i, device) for name, (o, i) in dims.items()}
    else:
        kron_h, kron_i = kronecker_factors(shape.hidden), kronecker_factors(shape.inter)
        heads = (shape.heads, shape.head_dim)
        method, _, path = variant.partition("-")
        factors = {
            "w4a4": dict(qkv=None, o=None, gate_up=None, down=None),
            "flatquant": dict(qkv=kron_h, o=heads, gate_up=kron_h, down=kron_i),
            "quarot": dict(qkv=None, o=heads, gate_up=None, down=kron_i),
        }[method]
        kind = "hadamard" if method == "quarot" else "orthogonal"
        cls = FP8W4A4Linear if path == "fp8" else W4A4Linear
        lins = {name: _quant_linear(o, i, factors[name], kind, method != "quarot", gen, device, cls,
                                    "dp4a" if dp4a else None)
                for name, (o, i) in dims.items()}
    return DecoderLayer(shape, device=device, kv4=kv4, **lins)


def new_kv4_cache(shape: LlamaShape, batch: int, max_len: int, device) -> KV4Cache:
    """An empty 4-bit K/V cache of ``max_len`` slots for one '-kv4' layer (bf16 scales, asymmetric)."""
    return KV4Cache(batch, shape.kv_heads, max_len, shape.head_dim, device=device)


class DecoderStack(nn.Module):
    """n decoder layers applied in turn (a model without embedding and LM head)."""

    def __init__(self, layers: list[DecoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                kv_len: int = 0) -> torch.Tensor:
        """Prefill (kv_caches None) or one decode step with one preallocated KV cache per layer."""
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_caches[i] if kv_caches is not None else None, kv_len=kv_len)
        return x


def build_stack(shape: LlamaShape, variant: str, device, n_layers: int, seed: int = 0) -> DecoderStack:
    """n_layers independent random layers of `shape` in `variant` (each its own weights, so the
    weight memory and traffic are a real model's); the RoPE tables are shared between layers."""
    layers = [build_layer(shape, variant, device, seed=seed + i) for i in range(n_layers)]
    for layer in layers[1:]:
        layer.cos, layer.sin = layers[0].cos, layers[0].sin
    return DecoderStack(layers)
