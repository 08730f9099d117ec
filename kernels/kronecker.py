"""Kronecker factorisation of a hidden size and the PyTorch reference of the online transform.

FlatQuant (methods.md §2, "Kronecker factors") replaces one n x n transform by P1 ⊗ P2 with
P1 of size n1 x n1 and P2 of size n2 x n2, n = n1 * n2, the pair closest to sqrt(n). Applying
it to a row x costs two small matmuls on the (n1, n2) view of the row: P1ᵀ · Xr · P2.
This module is the single definition of the factorisation (qllm_core imports it from here).
"""
from __future__ import annotations

import math

import torch


def kronecker_factors(n: int) -> tuple[int, int]:
    """Return (n1, n2) with n1 * n2 == n, n1 <= n2, found through n = a² − b².

    a starts at ceil(sqrt(n)) and grows until a² − n is a perfect square b²; then
    n1 = a − b, n2 = a + b (4096 → (64, 64), 11008 → (86, 128), 28672 → (128, 224)).
    The loop always ends: for odd n, a = (n + 1) / 2 gives b = (n − 1) / 2; for n ≡ 0 mod 4,
    a = n / 4 + 1 gives b = n / 4 − 1. n ≡ 2 (mod 4) has no such pair and is rejected.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"kronecker_factors needs a positive integer, got {n!r}")
    if n % 4 == 2:
        raise ValueError(f"n = {n} is 2 mod 4, so it is no difference of two squares")
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    while True:
        b = math.isqrt(a * a - n)
        if b * b == a * a - n:
            return a - b, a + b
        a += 1


def check_factors(n: int, p1: torch.Tensor, p2: torch.Tensor) -> tuple[int, int]:
    """Validate square factors whose sizes multiply to n; return (n1, n2)."""
    if p1.dim() != 2 or p1.shape[0] != p1.shape[1] or p2.dim() != 2 or p2.shape[0] != p2.shape[1]:
        raise ValueError(f"Kronecker factors must be square matrices, got {tuple(p1.shape)} and {tuple(p2.shape)}")
    n1, n2 = p1.shape[0], p2.shape[0]
    if n1 * n2 != n:
        raise ValueError(f"factor sizes {n1} x {n2} = {n1 * n2} do not match the feature size {n}")
    return n1, n2


def kron_transform_ref(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                       channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference X · (P1 ⊗ P2) in float32 (optionally X · diag(channel_scale) first).

    Works on (..., n) inputs through the (n1, n2) view of each row, never forming the n x n
    Kronecker product. Output is float32; callers cast as they need.
    """
    n1, n2 = check_factors(x.shape[-1], p1, p2)
    xf = x.float()
    if channel_scale is not None:
        xf = xf * channel_scale.float()
    xr = xf.reshape(*x.shape[:-1], n1, n2)
    y = p1.float().transpose(0, 1) @ xr @ p2.float()
    return y.reshape(x.shape)
