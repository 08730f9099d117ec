"""Real int4 storage: two signed 4-bit values per byte.

Convention (shared by `kernels/`): along the last dimension, element ``2j`` goes to the
low nibble and element ``2j+1`` to the high nibble of byte ``j``; each nibble holds the
two's-complement code of a value in [-8, 7]. Unsigned (asymmetric) codes in [0, 15] use
:func:`pack_uint4` with the same layout.
"""
from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7


def _check_even_last_dim(t: torch.Tensor) -> None:
    if t.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got shape {tuple(t.shape)}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack integer values in [-8, 7] (any integer dtype) into uint8, halving the last dim."""
    _check_even_last_dim(q)
    if q.is_floating_point():
        raise TypeError("pack_int4 expects an integer tensor of codes, not floats")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"int4 codes must lie in [{INT4_MIN}, {INT4_MAX}], got [{int(q.min())}, {int(q.max())}]")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., n/2) -> int8 (..., n) in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both)


def pack_uint4(q: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    """Pack unsigned codes in [0, 15] into uint8 (same nibble order as :func:`pack_int4`).

    ``check_range=False`` skips the range check, for codes already clamped to [0, 15] on a hot path:
    the check reads min/max on the host (a device sync, which a CUDA-graph capture does not allow).
    """
    _check_even_last_dim(q)
    if check_range and q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"uint4 codes must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`: uint8 (..., n/2) -> uint8 (..., n) in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_uint4 expects uint8, got {packed.dtype}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
