"""FlatQuant's learnable transforms, used while a decoder layer is calibrated.

Each factor is P = U·diag(σ)·Vᵀ with U, V orthogonal through the Cayley map of PyTorch's orthogonal
parametrization (``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map="cayley")``, the
official code's default, methods.md section 2): U = U₀·(I − A/2)⁻¹(I + A/2) with A = X − Xᵀ from the
lower triangle of a trained matrix X (zero at start) and U₀ a seeded random orthogonal matrix;
σ starts at 1. Its weight side needs no matrix inverse: P⁻ᵀ = U·diag(1/σ)·Vᵀ exactly (U, V
orthogonal), which keeps the gradient through the inverse well conditioned as long as σ stays away
from 0. The ``direct_inv`` variant learns an unconstrained matrix and inverts it in float64 on every use.

Why the map is written out here rather than taken from ``parametrize``: speed, with the same
arithmetic (:func:`cayley` is tested against PyTorch's parametrization). ``torch.linalg.solve``
checks its result for singularity with a host sync, once per factor per use, which stalls a GPU
training step many times over and forbids capturing it in a CUDA graph; I − A/2 is never singular
for a skew-symmetric A (its eigenvalues are 1 − iλ/2), so :func:`cayley` solves without the check.
And :meth:`LayerFactors.cached` computes every factor of a layer once per training step, in one
batched solve per factor size, instead of one solve per factor use.

After calibration the factors are materialised in float64 (:meth:`LearnableFactor.materialise`)
and written into a :class:`~qllm_core.transforms.kronecker.KroneckerTransform`, which recomputes
the weight side from the stored matrix itself (float64 solve), so rounding in the Cayley map never
breaks the FP equivalence of the frozen model.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from .kronecker import kron_apply


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal n x n matrix (QR of a Gaussian with the sign fix), float32."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def cayley(x: torch.Tensor) -> torch.Tensor:
    """(I − A/2)⁻¹(I + A/2) with A = tril(X) − tril(X)ᵀ, batched over leading dims.

    The same operations as PyTorch's Cayley orthogonal map, solved without the singularity check
    (never needed here, see the module docstring), so no host sync.
    """
    lower = x.tril()
    a = lower - lower.mT
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(a)
    q, _ = torch.linalg.solve_ex(torch.add(eye, a, alpha=-0.5), torch.add(eye, a, alpha=0.5), check_errors=False)
    return q


class LearnableFactor(nn.Module):
    """One learnable invertible n x n factor: U·diag(σ)·Vᵀ (default) or a free matrix (direct_inv).

    U = ``u_base``·cayley(``u_skew``), V likewise (see the module docstring).
    """

    def __init__(self, n: int, generator: torch.Generator, direct_inv: bool = False):
        super().__init__()
        self.n = n
        self.direct_inv = direct_inv
        self._orthogonal: tuple[torch.Tensor, torch.Tensor] | None = None  # set by LayerFactors.cached
        self._products: dict[str, torch.Tensor] | None = None  # P, P⁻ᵀ of the step, inside LayerFactors.cached
        if direct_inv:
            self.matrix_param = nn.Parameter(random_orthogonal(n, generator))
        else:
            self.register_buffer("u_base", random_orthogonal(n, generator))
            self.u_skew = nn.Parameter(torch.zeros(n, n))
            self.register_buffer("v_base", random_orthogonal(n, generator))
            self.v_skew = nn.Parameter(torch.zeros(n, n))
            self.sigma = nn.Parameter(torch.ones(n))

    def orthogonal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V): this step's cached pair, or computed now."""
        if self._orthogonal is not None:
            return self._orthogonal
        return self.u_base @ cayley(self.u_skew), self.v_base @ cayley(self.v_skew)

    def _step_cached(self, name: str, compute) -> torch.Tensor:
        """``compute()``, once per training step inside :meth:`LayerFactors.cached` (q/k/v use P thrice)."""
        if self._products is None:
            return compute()
        if name not in self._products:
            self._products[name] = compute()
        return self._products[name]

    def matrix(self) -> torch.Tensor:
        """P (activation side)."""
        if self.direct_inv:
            return self.matrix_param

        def compute():
            u, v = self.orthogonal()
            return (u * self.sigma) @ v.mT
        return self._step_cached("matrix", compute)

    def inverse_t(self) -> torch.Tensor:
        """P⁻ᵀ (weight side): U·diag(1/σ)·Vᵀ, or a float64 inverse for ``direct_inv``."""
        if self.direct_inv:
            m = self.matrix_param
            inverse, _ = torch.linalg.inv_ex(m.double())  # no host sync; the frozen transform's float64
            # inverse of the materialised matrix raises on a singular factor
            return inverse.mT.to(m.dtype)

        def compute():
            u, v = self.orthogonal()
            return (u / self.sigma) @ v.mT
        return self._step_cached("inverse_t", compute)

    @torch.no_grad()
    def materialise(self) -> torch.Tensor:
        """P in float64 (U, V, σ combined in float64)."""
        if self.direct_inv:
            return self.matrix_param.double()
        u, v = self.orthogonal()
        return (u.double() * self.sigma.double()) @ v.double().mT


class LayerFactors:
    """All Cayley factors of one layer's transforms, computed together once per training step."""

    def __init__(self, module: nn.Module):
        factors = [m for m in module.modules() if isinstance(m, LearnableFactor) and not m.direct_inv]
        self.by_size: dict[int, list[LearnableFactor]] = defaultdict(list)
        for factor in factors:
            self.by_size[factor.n].append(factor)

    @contextlib.contextmanager
    def cached(self):
        """Within the block every factor's (U, V) comes from one batched solve per factor size, and
        P, P⁻ᵀ are computed once (only for a span in which the parameters do not change: a step)."""
        try:
            for group in self.by_size.values():
                skews = torch.stack([p for f in group for p in (f.u_skew, f.v_skew)])
                bases = torch.stack([b for f in group for b in (f.u_base, f.v_base)])
                pairs = (bases @ cayley(skews)).unbind(0)
                for i, factor in enumerate(group):
                    factor._orthogonal = (pairs[2 * i], pairs[2 * i + 1])
                    factor._products = {}
            yield
        finally:
            for group in self.by_size.values():
                for factor in group:
                    factor._orthogonal = factor._products = None


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

    @property
    def online(self) -> LearnableKronecker:
        """The activation side (shared with q/k_proj, see qllm_core.quant.qlinear.shared_inputs)."""
        return self.input_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_transform(x)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = self.input_transform.transform_weight(weight)
        d = self.head_factor.n
        heads = w.reshape(-1, d, w.shape[-1])
        return (self.head_factor.matrix().to(w.dtype).mT @ heads).reshape(w.shape)

