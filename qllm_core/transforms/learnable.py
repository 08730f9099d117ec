"""FlatQuant's learnable transforms, used while a decoder layer is calibrated.

Each factor is P = U·diag(σ)·Vᵀ with U, V orthogonal through PyTorch's Cayley orthogonal
parametrization (``torch.nn.utils.parametrizations.orthogonal``, the official code's default,
methods.md section 2), initialised to seeded random orthogonal matrices and σ = 1. Its weight
side needs no matrix inverse: P⁻ᵀ = U·diag(1/σ)·Vᵀ exactly (U, V orthogonal), which keeps the
gradient through the inverse well conditioned as long as σ stays away from 0. The ``direct_inv``
variant learns an unconstrained matrix and inverts it in float64 on every use.

After calibration the factors are materialised in float64 (:meth:`LearnableFactor.materialise`)
and written into a :class:`~qllm_core.transforms.kronecker.KroneckerTransform`, which recomputes
the weight side from the stored matrix itself (float64 solve), so rounding in the Cayley map never
breaks the FP equivalence of the frozen model.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from .kronecker import kron_apply


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal n x n matrix (QR of a Gaussian with the sign fix), float32."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _cayley_orthogonal(init: torch.Tensor) -> nn.Module:
    module = nn.Linear(init.shape[0], init.shape[0], bias=False)
    with torch.no_grad():
        module.weight.copy_(init)
    # use_trivialization (default): weight = base · cayley(A) with base = init and A = 0 at start.
    return orthogonal(module, orthogonal_map="cayley")


class LearnableFactor(nn.Module):
    """One learnable invertible n x n factor: U·diag(σ)·Vᵀ (default) or a free matrix (direct_inv)."""

    def __init__(self, n: int, generator: torch.Generator, direct_inv: bool = False):
        super().__init__()
        self.n = n
        self.direct_inv = direct_inv
        if direct_inv:
            self.matrix_param = nn.Parameter(random_orthogonal(n, generator))
        else:
            self.u = _cayley_orthogonal(random_orthogonal(n, generator))
            self.v = _cayley_orthogonal(random_orthogonal(n, generator))
            self.sigma = nn.Parameter(torch.ones(n))

    def matrix(self) -> torch.Tensor:
        """P (activation side)."""
        if self.direct_inv:
            return self.matrix_param
        return (self.u.weight * self.sigma) @ self.v.weight.mT

    def inverse_t(self) -> torch.Tensor:
        """P⁻ᵀ (weight side): U·diag(1/σ)·Vᵀ, or a float64 inverse for ``direct_inv``."""
        if self.direct_inv:
            m = self.matrix_param
            return torch.linalg.inv(m.double()).mT.to(m.dtype)
        return (self.u.weight / self.sigma) @ self.v.weight.mT

    @torch.no_grad()
    def materialise(self) -> torch.Tensor:
        """P in float64 (U, V, σ combined in float64)."""
        if self.direct_inv:
            return self.matrix_param.double()
        return (self.u.weight.double() * self.sigma.double()) @ self.v.weight.double().mT


class LearnableKronecker(nn.Module):
    """x ↦ (x / s)·(P1 ⊗ P2), weight side (W·diag(s))·(P1 ⊗ P2)⁻ᵀ (FlatQuant eq. 3-4 + add_diag).

    Args:
        left, right: the factors (P1 of size n1, P2 of size n2).
        scale_init: initial per-channel scale ``s`` (``add_diag``), or None for no scaling.
        online_right: False if the right factor is applied upstream (o_proj input, see
            :class:`~qllm_core.transforms.kronecker.KroneckerTransform`); its inverse still goes
            into the weight side.
    """

    def __init__(self, left: LearnableFactor, right: LearnableFactor, scale_init: torch.Tensor | None = None,
                 online_right: bool = True):
        super().__init__()
        self.left = left
        self.right = right
        self.online_right = online_right
        self.sizes = (left.n, right.n)
        self.scale = None if scale_init is None else nn.Parameter(scale_init.detach().float().clone())
        if self.scale is not None and self.scale.numel() != left.n * right.n:
            raise ValueError(f"scale has {self.scale.numel()} channels, transform has {left.n * right.n}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x / self.scale.to(x.dtype)
        return kron_apply(x, self.left.matrix(), self.right.matrix() if self.online_right else None, self.sizes)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            weight = weight * self.scale.to(weight.dtype)
        return kron_apply(weight, self.left.inverse_t(), self.right.inverse_t(), self.sizes)


class HeadOutputTransform(nn.Module):
    """v_proj's weight side: the input transform, then every output head rotated by P_v.

    v = x·Wᵀ per KV head h becomes v_h·P_v, i.e. rows W_h ← P_vᵀ·W_h (FlatQuant merges the V-cache
    transform into v_proj so the cache stores transformed, flatter values; methods.md section 2 (2)).
    The online side is the input transform's.
    """

    def __init__(self, input_transform: LearnableKronecker, head_factor: LearnableFactor):
        super().__init__()
        self.input_transform = input_transform
        self.head_factor = head_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_transform(x)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = self.input_transform.transform_weight(weight)
        d = self.head_factor.n
        heads = w.reshape(-1, d, w.shape[-1])
        return (self.head_factor.matrix().to(w.dtype).mT @ heads).reshape(w.shape)

