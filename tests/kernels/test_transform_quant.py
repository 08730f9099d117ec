"""Kernel 1 (fused Kronecker transform + per-token int4 quantization) against its PyTorch reference.

Tolerances: without a transform nothing is accumulated, so codes and scales must be equal.
With a transform the kernel and the reference sum the small matmuls in different orders, so a
code may flip by one where x/scale sits on a rounding boundary: we require |Δcode| ≤ 1 on every
element, ≤ 0.5 % flipped, and scales within rtol 1e-5 (fp32 factors) / 1e-3 (bf16 factors).
"""
import pytest
import torch

from qllm_core.quant.packing import unpack_int4, unpack_uint4

tq = pytest.importorskip("kernels.transform_quant")


def _factors(n1, n2, dtype, device, gen):
    q1, _ = torch.linalg.qr(torch.randn(n1, n1, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(n2, n2, generator=gen))
    return q1.to(device, dtype), q2.to(device, dtype)


def _check_codes(packed, scale, zero, ref, asym, scale_rtol):
    ref_codes, ref_scale, ref_zero = ref
    codes = (unpack_uint4 if asym else unpack_int4)(packed.cpu()).to(torch.int32)
    diff = (codes - ref_codes.cpu().to(torch.int32)).abs()
    assert int(diff.max()) <= 1
    assert diff.float().mean().item() <= 5e-3
    torch.testing.assert_close(scale.cpu(), ref_scale.cpu(), rtol=scale_rtol, atol=0)
    if asym:
        assert (zero.cpu() - ref_zero.cpu()).abs().max().item() <= 1


@pytest.mark.parametrize("m,n1,n2,rows", [(7, 16, 16, None), (37, 24, 24, 4), (5, 12, 20, None), (3, 16, 160, None)])
@pytest.mark.parametrize("asym", [False, True])
def test_fused_transform_quant_fp32_factors(device, m, n1, n2, rows, asym):
    gen = torch.Generator().manual_seed(m * 100 + n1)
    p1, p2 = _factors(n1, n2, torch.float32, device, gen)
    x = (torch.randn(m, n1 * n2, generator=gen) * 3).to(device)
    x[1, :5] *= 40  # an outlier token
    cs = (torch.rand(n1 * n2, generator=gen) + 0.5).to(device)
    packed, scale, zero = tq.transform_quant(x, p1, p2, channel_scale=cs, clip_ratio=0.9, asym=asym,
                                             rows_per_prog=rows)
    assert packed.shape == (m, n1 * n2 // 2) and packed.dtype == torch.uint8 and scale.shape == (m,)
    ref = tq.transform_quant_ref(x, p1, p2, channel_scale=cs, clip_ratio=0.9, asym=asym)
    _check_codes(packed, scale, zero, ref, asym, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n1,n2", [(86, 128), (24, 48)])
def test_fused_transform_quant_half_factors(device, n1, n2, dtype):
    """Half-precision factors (the deployment setting): X and X·P2 rounded as in the reference."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (checked on 3.9); bf16 runs on the GPU")
    gen = torch.Generator().manual_seed(n1)
    p1, p2 = _factors(n1, n2, dtype, device, gen)
    x = torch.randn(3, 2, n1 * n2, generator=gen).to(device, dtype)
    packed, scale, _ = tq.transform_quant(x, p1, p2)
    assert packed.shape == (3, 2, n1 * n2 // 2) and scale.shape == (3, 2)
    codes, ref_scale, _ = tq.transform_quant_ref(x, p1, p2)
    _check_codes(packed.reshape(6, -1), scale.reshape(6), None,
                 (codes.reshape(6, -1), ref_scale.reshape(6), None), False, 1e-3)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("n", [64, 4094, 250])
def test_quantize_only_is_exact(device, n, asym):
    """No transform: nothing is accumulated, codes and scales equal the reference bit for bit."""
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(9, n, generator=gen) * 2).to(device, torch.bfloat16)
    packed, scale, zero = tq.transform_quant(x, asym=asym)
    codes, ref_scale, ref_zero = tq.transform_quant_ref(x, asym=asym)
    assert torch.equal((unpack_uint4 if asym else unpack_int4)(packed.cpu()), codes.cpu())
    assert torch.equal(scale.cpu(), ref_scale.cpu())
    if asym:
        assert torch.equal(zero.cpu(), ref_zero.cpu())


@pytest.mark.parametrize("asym", [False, True])
def test_all_zero_tokens(device, asym):
    gen = torch.Generator().manual_seed(1)
    p1, p2 = _factors(16, 32, torch.float32, device, gen)
    x = torch.randn(4, 512, generator=gen).to(device)
    x[2] = 0
    packed, scale, zero = tq.transform_quant(x, p1, p2, asym=asym)
    assert scale[2].item() == pytest.approx(tq.SCALE_EPS)
    assert torch.all(packed[2] == 0)
    if asym:
        assert zero[2].item() == 0
    assert torch.all(torch.isfinite(scale)) and torch.all(scale[[0, 1, 3]] > 1e-3)


@pytest.mark.parametrize("n1,n2", [(16, 16), (12, 20), (16, 160)])
def test_transform_only_output(device, n1, n2):
    gen = torch.Generator().manual_seed(7)
    p1, p2 = _factors(n1, n2, torch.float32, device, gen)
    x = torch.randn(5, n1 * n2, generator=gen).to(device)
    y = tq.transform_quant(x, p1, p2, quantize=False)
    ref = tq.transform_quant_ref(x, p1, p2, quantize=False)
    assert y.dtype == x.dtype
    err = (y.cpu() - ref.cpu()).norm() / ref.norm()
    assert err.item() < 1e-5


def test_bad_inputs(device):
    x = torch.randn(2, 64, device=device)
    eye = torch.eye(8, device=device)
    with pytest.raises(ValueError, match="do not match"):
        tq.transform_quant(x, eye, torch.eye(4, device=device))
    with pytest.raises(ValueError, match="both"):
        tq.transform_quant(x, eye, None)
    with pytest.raises(TypeError):
        tq.transform_quant(x.to(torch.int32))
    with pytest.raises(ValueError, match="even"):
        tq.transform_quant(torch.randn(2, 63, device=device))
    with pytest.raises(ValueError, match="clip_ratio"):
        tq.transform_quant(x, clip_ratio=0.0)
    with pytest.raises(ValueError, match="channel_scale"):
        tq.transform_quant(x, channel_scale=torch.ones(32, device=device))


def test_gpu_llama_sizes(cuda):
    """Real factor sizes on the GPU (bf16): 4096 = 64², 11008 = 86·128, 28672 = 128·224 (chunked)."""
    gen = torch.Generator().manual_seed(3)
    for n1, n2 in [(64, 64), (86, 128), (112, 128), (128, 224)]:
        p1, p2 = _factors(n1, n2, torch.bfloat16, cuda, gen)
        x = torch.randn(301, n1 * n2, generator=gen).to(cuda, torch.bfloat16)
        packed, scale, _ = tq.transform_quant(x, p1, p2)
        _check_codes(packed, scale, None, tq.transform_quant_ref(x, p1, p2), False, 1e-3)
