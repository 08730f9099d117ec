"""QuaRot's computational invariance (Ashkboos et al., 2024, sections 3-4), as weight surgery.

* :func:`fold_rms_norms`: an RMSNorm's scale goes into the linears that read its output, the norm
  keeps only x/rms(x), which commutes with any orthogonal Q (rms(xQ) = rms(x)).
* :func:`rotate_residual`: the residual stream becomes x·Q: embeddings and every linear that reads
  the stream get ·Q on the input side, o_proj/down_proj (which write it) get Qᵀ· on the output side.
* :func:`rotate_values`: V rotated per head by H_d (v_proj rows), undone in o_proj's columns, so the
  V cache is quantized in the Hadamard basis.
* :class:`OnlineHadamard`: the online Hadamard before down_proj (activation side x·H, weight side
  W·H), applied as a Hadamard-Kronecker product without forming H.
* :class:`HadamardQKHook`: H_d on Q and K after RoPE (QKᵀ unchanged) before the K cache quantizer.

All merges happen in float64 and are cast back to the weight dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter
from .hadamard import apply_kronecker, hadamard_kronecker_factors

READS_RESIDUAL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITES_RESIDUAL = ("o_proj", "down_proj")


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


@torch.no_grad()
def untie_embeddings(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give lm_head its own weight when it shares the embedding's (tie_word_embeddings=True):
    after folding the final norm into lm_head the two matrices differ."""
    head, embed = adapter.lm_head, adapter.embed_tokens
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.double()
    for lin in linears:
        _assign(lin.weight, lin.weight.double() * g[None, :])
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def fold_rms_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Fold every RMSNorm scale into the following linears (exact in FP)."""
    for layer in adapter.layers:
        _fold_norm(adapter.input_norm(layer), [adapter.linear(layer, r) for r in ("q_proj", "k_proj", "v_proj")])
        _fold_norm(adapter.post_attention_norm(layer), [adapter.linear(layer, r) for r in ("gate_proj", "up_proj")])
    _fold_norm(adapter.final_norm, [adapter.lm_head])


@torch.no_grad()
def rotate_residual(model: nn.Module, adapter: ModelAdapter, rotation: torch.Tensor) -> None:
    """Rotate the residual stream by the orthogonal ``rotation`` (hidden × hidden, float64).

    Requires folded norms (a norm with a non-uniform scale does not commute with the rotation).
    """
    q = rotation.double()
    embed = adapter.embed_tokens
    _assign(embed.weight, embed.weight.double() @ q)
    for layer in adapter.layers:
        for role in READS_RESIDUAL:
            lin = adapter.linear(layer, role)
            _assign(lin.weight, lin.weight.double() @ q)
        for role in WRITES_RESIDUAL:
            lin = adapter.linear(layer, role)
            _assign(lin.weight, q.T @ lin.weight.double())
            if lin.bias is not None:
                _assign(lin.bias, lin.bias.double() @ q)
    _assign(adapter.lm_head.weight, adapter.lm_head.weight.double() @ q)


@torch.no_grad()
def rotate_values(layer: nn.Module, adapter: ModelAdapter, head_rotation: torch.Tensor) -> None:
    """v ← v·H per KV head (v_proj rows: Hᵀ·W_head), attention output ← ·H per head, undone in
    o_proj (W_o·blockdiag(H)); exact for GQA because every query head of a group reads the same V."""
    h = head_rotation.double()
    d = h.shape[0]
    v, o = adapter.linear(layer, "v_proj"), adapter.linear(layer, "o_proj")
    wv = v.weight.double().reshape(-1, d, v.in_features)
    _assign(v.weight, torch.einsum("de,kdn->ken", h, wv).reshape(v.weight.shape))
    if v.bias is not None:
        _assign(v.bias, (v.bias.double().reshape(-1, d) @ h).reshape(-1))
    wo = o.weight.double().reshape(o.out_features, -1, d)
    _assign(o.weight, (wo @ h).reshape(o.weight.shape))


class OnlineHadamard(nn.Module):
    """x ↦ x·H with H = A ⊗ B the normalized Hadamard(-Kronecker) matrix of size ``n``.

    Weight side W ↦ W·H (H orthogonal, so x·H·(W·H)ᵀ = x·Wᵀ). The factors are deterministic and kept
    as non-persistent buffers: they are rebuilt by ``build_layer`` and never stored in a run.
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        left, right = hadamard_kronecker_factors(n)
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_kronecker(x, self.left, self.right)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return apply_kronecker(weight, self.left, self.right)

    def extra_repr(self) -> str:
        return f"n={self.n}, factors={self.left.shape[0]}x{self.right.shape[0]}"


class HadamardQKHook(nn.Module):
    """Attention hook: Q and K (post-RoPE) rotated by H_d, then the inner hook (KV quantizers)."""

    def __init__(self, head_dim: int, inner: nn.Module | None = None):
        super().__init__()
        self.rotate = OnlineHadamard(head_dim)
        self.inner = inner

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        query, key = self.rotate(query), self.rotate(key)
        return (query, key, value) if self.inner is None else self.inner(query, key, value)
