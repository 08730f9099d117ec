"""kronecker_factors table (methods.md §2) and the reference transform against an explicit P1 ⊗ P2."""
import pytest
import torch

from kernels.kronecker import check_factors, kron_transform_ref, kronecker_factors

TABLE = {4096: (64, 64), 11008: (86, 128), 14336: (112, 128), 28672: (128, 224), 8192: (64, 128),
         5120: (64, 80), 576: (24, 24), 1536: (32, 48)}


@pytest.mark.parametrize("n,expected", sorted(TABLE.items()))
def test_factor_table(n, expected):
    assert kronecker_factors(n) == expected


@pytest.mark.parametrize("n", [1, 3, 12, 60, 13824, 4097])
def test_factors_multiply_back(n):
    n1, n2 = kronecker_factors(n)
    assert n1 * n2 == n and n1 <= n2


@pytest.mark.parametrize("n", [2, 6, 4098, 0, -4])
def test_factors_reject_bad_sizes(n):
    with pytest.raises(ValueError):
        kronecker_factors(n)


def test_reference_matches_explicit_kron():
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(10, 10, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 60, generator=g, dtype=torch.float64)
    s = torch.rand(60, generator=g, dtype=torch.float64) + 0.5
    ref = (x * s) @ torch.kron(p1, p2)
    torch.testing.assert_close(kron_transform_ref(x, p1, p2, s).double(), ref, rtol=1e-5, atol=1e-5)


def test_check_factors_rejects_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        check_factors(64, torch.eye(4), torch.eye(8))
    with pytest.raises(ValueError, match="square"):
        check_factors(32, torch.eye(4)[:3], torch.eye(8))
