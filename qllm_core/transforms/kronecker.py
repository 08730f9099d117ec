"""FlatQuant's Kronecker transform in its frozen (inference) form.

FlatQuant (Sun et al., ICML 2025, section 3.1; methods.md section 2) replaces one n x n affine
transform P by P1 ⊗ P2 (P1: n1 x n1, P2: n2 x n2, n1·n2 = n, the pair closest to sqrt(n), from
:func:`kernels.kronecker_factors`, the project's one definition). A row x is reshaped to
X (n1, n2) and x·(P1 ⊗ P2) = vec(P1ᵀ·X·P2): two small matmuls instead of an n x n one.

A linear layer y = x·Wᵀ keeps its output when the activation side is x·P and the weight side is
W·P⁻ᵀ, because (x·P)·(W·P⁻ᵀ)ᵀ = x·P·P⁻¹·Wᵀ. :class:`KroneckerTransform` is the materialised
transform of a calibrated layer: its buffers hold P1 and P2 (the activation side, applied online)
and :meth:`KroneckerTransform.transform_weight` computes the weight side by inverting the *stored*
factors in float64, so the FP model is exact to float64 round-off whatever rounding the learned
matrices went through. The per-channel scaling (``add_diag``) is merged into the preceding RMSNorm /
up_proj after calibration; ``merged_scale`` keeps a copy for analysis only (it is never applied
online).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import kronecker_factors


def inverse_transpose(matrix: torch.Tensor) -> torch.Tensor:
    """P⁻ᵀ in float64 (solve against the identity; a singular factor raises, naming its size)."""
    m = matrix.detach().double()
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    try:
        return torch.linalg.solve(m, eye).mT
    except RuntimeError as err:  # torch raises _LinAlgError (a RuntimeError) for singular input
        raise ValueError(f"transform factor of size {m.shape[0]} is singular and cannot be inverted") from err


def kron_apply(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
               sizes: tuple[int, int]) -> torch.Tensor:
    """x·(left ⊗ right) along the last dim (a missing factor is the identity), in ``x``'s dtype."""
    n1, n2 = sizes
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"input has {x.shape[-1]} features, the transform expects {n1} x {n2} = {n1 * n2}")
    xr = x.reshape(*x.shape[:-1], n1, n2)
    if left is not None:
        xr = left.to(x.dtype).mT @ xr
    if right is not None:
        xr = xr @ right.to(x.dtype)
    return xr.reshape(x.shape)


def factor_sizes(n: int) -> tuple[int, int]:
    """FlatQuant's (n1, n2) for a feature size n, with an error that names the size."""
    try:
        n1, n2 = kronecker_factors(n)
    except ValueError as err:
        raise ValueError(f"feature size {n} has no Kronecker factorisation for FlatQuant: {err}") from err
    if n1 * n2 != n:
        raise ValueError(f"Kronecker factors {n1} x {n2} do not multiply to {n}")
    return n1, n2


class KroneckerTransform(nn.Module):
    """Frozen x ↦ x·(P1 ⊗ P2) with float64-inverted weight side; identity until loaded.

    Args:
        n1, n2: factor sizes (n = n1·n2 features).
        online_right: False when the right factor is applied upstream (o_proj's input: the
            per-head V transform already rides on the values, methods.md section 2 (2)); then only
            P1 is applied online and the right factor's inverse is merged into the weight elsewhere.
        keep_scale: hold a ``merged_scale`` buffer (analysis only, see the module docstring).
    """

    def __init__(self, n1: int, n2: int, online_right: bool = True, keep_scale: bool = False):
        super().__init__()
        self.sizes = (n1, n2)
        self.register_buffer("left", torch.eye(n1))
        self.register_buffer("right", torch.eye(n2) if online_right else None)
        self.register_buffer("merged_scale", torch.ones(n1 * n2) if keep_scale else None)

    @classmethod
    def for_features(cls, n: int, **kwargs) -> "KroneckerTransform":
        return cls(*factor_sizes(n), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x, self.left, self.right, self.sizes)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W·(P1 ⊗ P2)⁻ᵀ computed in float64, returned in ``weight``'s dtype."""
        right = None if self.right is None else inverse_transpose(self.right)
        return kron_apply(weight.double(), inverse_transpose(self.left), right, self.sizes).to(weight.dtype)

    @torch.no_grad()
    def load_matrices(self, left: torch.Tensor, right: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None) -> None:
        """Store materialised factors (cast to the buffers' dtype/device)."""
        self.left.copy_(left)
        if (right is None) != (self.right is None):
            raise ValueError("right factor given for a transform without one (or missing for one with it)")
        if right is not None:
            self.right.copy_(right)
        if scale is not None and self.merged_scale is not None:
            self.merged_scale.copy_(scale)

    def extra_repr(self) -> str:
        n1, n2 = self.sizes
        return f"{n1} x {n2}" + ("" if self.right is not None else " (right factor upstream)")
