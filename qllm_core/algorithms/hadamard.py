"""Hadamard matrices of the sizes LLMs need, built from classical constructions.

QuaRot (Ashkboos et al., 2024, section 3 / appendix) rotates with Hadamard matrices; for a dimension
n that is not a power of two it uses ``H_m ⊗ H_{2^k}`` with n = m·2^k, where H_m is a "known"
Hadamard matrix (its code ships literal tables for m = 12, 20, 28, 36, 40, 52, 60, 108, 140, 156,
172). We build every factor here instead of pasting tables:

* Sylvester: H_{2^k} = H_2 ⊗ ... ⊗ H_2.
* Paley I: order q+1 for a prime power q ≡ 3 (mod 4) (12 = 11+1, 20, 24, 28, 44, 48, 60, 344...).
* Paley II: order 2(q+1) for a prime power q ≡ 1 (mod 4) (36 = 2·18 from q = 17, 52, 108...).

Both Paley constructions use the quadratic character of GF(q); q may be a prime power, so the
finite field GF(p^k) is implemented below (polynomial arithmetic modulo an irreducible polynomial).

Sizes of the models in this study: 64 / 128 (head_dim), 576 = 36·16 (Paley II, q = 17),
1536 = 12·128 (Paley I, q = 11), 4096, 11008 = 344·32 (Paley I over GF(7³), q = 343 ≡ 3 mod 4;
QuaRot uses 172·64 from a Williamson-type table, but no Paley construction gives 172: 171 = 9·19
and 85 = 5·17 are not prime powers), 13824 = 108·128 (Paley II, q = 53), 14336 = 28·512.
A size whose odd part admits none of these constructions raises :class:`HadamardSizeError`.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import torch


class HadamardSizeError(ValueError):
    """No Hadamard(-Kronecker) construction implemented here yields this size."""


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in itertools.count(2) if q % d == 0)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists are lowest degree first, f monic."""
    a = list(a)
    deg_f = len(f) - 1
    for top in range(len(a) - 1, deg_f - 1, -1):
        c = a[top] % p
        if c:
            for i in range(deg_f + 1):
                a[top - deg_f + i] = (a[top - deg_f + i] - c * f[i]) % p
    return [c % p for c in a[:deg_f]] + [0] * max(0, deg_f - len(a))


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (brute force over divisors)."""
    if k == 1:
        return [0, 1]
    for tail in itertools.product(range(p), repeat=k):
        f = list(tail) + [1]
        if f[0] == 0:
            continue
        has_factor = any(
            not any(_poly_mod(f, list(g) + [1], p))
            for d in range(1, k // 2 + 1) for g in itertools.product(range(p), repeat=d))
        if not has_factor:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # impossible


def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """χ(a) for the elements of GF(q) and the subtraction table ``sub[a, b] = a - b``.

    Elements are integers 0..q-1 whose base-p digits are polynomial coefficients.
    """
    p, k = _prime_power(q)
    f = _irreducible(p, k)
    digits = np.array([[(e // p**i) % p for i in range(k)] for e in range(q)])
    weights = p ** np.arange(k)
    sub = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for e in range(1, q):
        square = np.convolve(digits[e], digits[e]) % p
        chi[int(np.dot(_poly_mod(square.tolist(), f, p), weights))] = 1
    return chi, sub


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = χ(a - b) over GF(q)."""
    chi, sub = _quadratic_character(q)
    return chi[sub]


def _paley1(order: int) -> np.ndarray:
    """Paley construction I: order q + 1, q ≡ 3 (mod 4)."""
    q = order - 1
    jac = _jacobsthal(q)
    core = np.eye(order, dtype=np.int64)
    core[0, 1:], core[1:, 0] = 1, -1
    core[1:, 1:] += jac
    return core


def _paley2(order: int) -> np.ndarray:
    """Paley construction II: order 2(q + 1), q ≡ 1 (mod 4)."""
    q = order // 2 - 1
    conf = np.zeros((q + 1, q + 1), dtype=np.int64)
    conf[0, 1:], conf[1:, 0] = 1, 1
    conf[1:, 1:] = _jacobsthal(q)
    on_zero = np.array([[1, -1], [-1, -1]])  # replaces the conference matrix's zero diagonal
    on_pm1 = np.array([[1, 1], [1, -1]])
    return np.kron(conf, on_pm1) + np.kron(np.eye(q + 1, dtype=np.int64), on_zero)


def _construction(order: int):
    """The construction that yields a Hadamard matrix of ``order``, or None."""
    if order & (order - 1) == 0:
        return "sylvester"
    if order % 4:
        return None
    pp = _prime_power(order - 1)
    if pp and (order - 1) % 4 == 3:
        return "paley1"
    pp = _prime_power(order // 2 - 1)
    if order % 2 == 0 and pp and (order // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@functools.lru_cache(maxsize=None)
def _hadamard_int(order: int) -> np.ndarray:
    kind = _construction(order)
    if kind == "sylvester":
        h = np.ones((1, 1), dtype=np.int64)
        while h.shape[0] < order:
            h = np.block([[h, h], [h, -h]])
        return h
    if kind == "paley1":
        return _paley1(order)
    if kind == "paley2":
        return _paley2(order)
    raise HadamardSizeError(f"no Hadamard construction implemented for order {order}")


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k and H_m constructible, m as small as possible (m = 1 for 2^k)."""
    if n < 1:
        raise HadamardSizeError(f"Hadamard size must be positive, got {n}")
    m, pow2 = n, 1
    while m % 2 == 0:
        m //= 2
        pow2 *= 2
    while True:
        if _construction(m) is not None:
            return m, pow2
        if pow2 == 1:
            raise HadamardSizeError(
                f"no Hadamard-Kronecker construction for size {n}: none of the orders "
                f"{[n // d for d in _powers_of_two_dividing(n)]} with a power-of-two cofactor is a power of "
                "two or a Paley order (q+1, q ≡ 3 mod 4 or 2(q+1), q ≡ 1 mod 4, q a prime power)")
        m *= 2
        pow2 //= 2


def _powers_of_two_dividing(n: int) -> list[int]:
    out, d = [], 1
    while n % d == 0:
        out.append(d)
        d *= 2
    return out


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, normalized: bool = True) -> torch.Tensor:
    """An n×n Hadamard matrix H_m ⊗ H_{2^k} (orthogonal when ``normalized``: divided by √n)."""
    m, pow2 = hadamard_factors(n)
    h = torch.from_numpy(np.kron(_hadamard_int(m), _hadamard_int(pow2))).to(dtype)
    return h / n**0.5 if normalized else h


def hadamard_kronecker_factors(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized factors (A, B), A of order m, B of order 2^k, with A ⊗ B = hadamard_matrix(n)."""
    m, pow2 = hadamard_factors(n)
    return (torch.from_numpy(_hadamard_int(m)).to(dtype) / m**0.5,
            torch.from_numpy(_hadamard_int(pow2)).to(dtype) / pow2**0.5)


def apply_kronecker(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x · (left ⊗ right) along the last dim, without forming the Kronecker product.

    A row x reshaped (row-major) to X of shape (m, b) satisfies x·(A ⊗ B) = vec(Aᵀ·X·B).
    """
    m, b = left.shape[0], right.shape[0]
    xr = x.reshape(*x.shape[:-1], m, b)
    out = torch.matmul(left.to(x.dtype).T, torch.matmul(xr, right.to(x.dtype)))
    return out.reshape(x.shape)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomized Hadamard rotation diag(s)·H/√n with seeded random signs s ∈ {±1}."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
    return signs[:, None] * hadamard_matrix(n, dtype)
