"""W4A4 GEMM / decode GEMV (FP8 and int8 tensor-core paths) and W4A16 against PyTorch references.

Integer accumulation must be exact: with unit scales and fp32 output the result equals the
integer product (checked in float64), and with random scales the fp32 (and, on the GPU, bf16)
output equals the reference bit for bit (same fp32 epilogue order). W4A16: fp32 sums in another order, checked
to 1e-3 relative (fp16/bf16 output rounding dominates).
"""
import pytest
import torch

from qllm_core.quant.packing import pack_int4, pack_uint4

wm = pytest.importorskip("kernels.w4_matmul")

SMALL = (16, 32, 64, 1, 4, 2)  # an explicit tile, so the interpreter runs no autotuning


def _codes(shape, gen, lo=-8, hi=8):
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("dot", ["fp8", "int8", "fp16"])
@pytest.mark.parametrize("m,n,k", [(33, 40, 96), (1, 48, 64), (17, 32, 160)])
def test_w4a4_exact_integer_accumulation(device, dot, m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    a, w = _codes((m, k), gen), _codes((n, k), gen)
    ones_m, ones_n = torch.ones(m, device=device), torch.ones(n, device=device)
    out = wm.w4a4_matmul(pack_int4(a).to(device), ones_m, pack_int4(w).to(device), ones_n, dot=dot,
                         out_dtype=torch.float32, config=SMALL)
    exact = (a.double() @ w.double().T).float()
    assert torch.equal(out.cpu(), exact)


@pytest.mark.parametrize("dot", ["fp8", "int8", "fp16"])
@pytest.mark.parametrize("asym", [False, True])
def test_w4a4_scales_and_zero_points(device, dot, asym):
    gen = torch.Generator().manual_seed(5)
    m, n, k = 19, 72, 128
    a = _codes((2, m, k), gen, 0, 16) if asym else _codes((2, m, k), gen)
    w = _codes((n, k), gen)
    sa, sw = torch.rand(2, m, generator=gen) + 0.1, torch.rand(n, generator=gen) * 0.01
    za = torch.randint(0, 16, (2, m), generator=gen).float() if asym else None
    packed_a = (pack_uint4(a.to(torch.uint8)) if asym else pack_int4(a)).to(device)
    out_dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for out_dtype in out_dtypes:  # the interpreter rounds fp32 -> bf16 differently from the GPU
        out = wm.w4a4_matmul(packed_a, sa.to(device), pack_int4(w).to(device), sw.to(device),
                             a_zero=za.to(device) if asym else None,
                             w_sum=w.sum(1).float().to(device) if asym else None, dot=dot,
                             out_dtype=out_dtype, config=SMALL)
        ref = wm.w4a4_matmul_ref(a, sa, w, sw, a_zero=za, out_dtype=out_dtype)
        assert out.shape == (2, m, n) and out.dtype == out_dtype
        assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(5, 40, 96), (33, 64, 256)])
def test_w4a16(device, dtype, m, n, k):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (checked on 3.9); bf16 runs on the GPU")
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w, sw = _codes((n, k), gen), torch.rand(n, generator=gen) * 0.05
    out = wm.w4a16_matmul(x.to(device), pack_int4(w).to(device), sw.to(device), config=SMALL)
    ref = wm.w4a16_matmul_ref(x, w, sw)
    err = (out.cpu().float() - ref.float()).norm() / ref.float().norm()
    assert out.dtype == dtype and err.item() < 1e-2 if dtype == torch.bfloat16 else err.item() < 1e-3


def test_bad_inputs(device):
    a = torch.zeros(4, 32, dtype=torch.uint8, device=device)
    w = torch.zeros(8, 32, dtype=torch.uint8, device=device)
    s4, s8 = torch.ones(4, device=device), torch.ones(8, device=device)
    with pytest.raises(ValueError, match="dot"):
        wm.w4a4_matmul(a, s4, w, s8, dot="int4")
    with pytest.raises(ValueError, match="K = 32"):
        wm.w4a4_matmul(a[:, :16], s4, w, s8)
    with pytest.raises(TypeError):
        wm.w4a4_matmul(a.to(torch.int8), s4, w, s8)
    with pytest.raises(ValueError, match="w_scale"):
        wm.w4a4_matmul(a, s4, w, s4)
    with pytest.raises(ValueError, match="a_zero and w_sum"):
        wm.w4a4_matmul(a, s4, w, s8, a_zero=s4)
    with pytest.raises(TypeError):
        wm.w4a16_matmul(torch.ones(4, 64, device=device), w, s8)


@pytest.mark.parametrize("dot", ["fp8", "int8", "fp16"])
@pytest.mark.parametrize("m", [7, 64, 1000])
def test_gpu_autotuned_tiles_exact(cuda, dot, m):
    """Every tile family (GEMV m ≤ 16, small, prefill) at a LLaMA shape, with large sums:
    codes biased to 5..7 make |acc| ≈ 2**17 with odd products, where a tensor-core
    accumulator narrower than fp32 drops low bits. FP8 wgmma does (measured), so fp8 runs here
    with promotion to fp32 every 32 products (imprecise_k=32)."""
    gen = torch.Generator().manual_seed(m)
    n, k = 4096, 4096
    a = _codes((m, k), gen, 5, 8)
    w = _codes((n, k), gen, 5, 8)
    w[::3] = _codes((n // 3 + 1, k), gen)[: w[::3].shape[0]]
    ones_m, ones_n = torch.ones(m, device=cuda), torch.ones(n, device=cuda)
    out = wm.w4a4_matmul(pack_int4(a).to(cuda), ones_m, pack_int4(w).to(cuda), ones_n, dot=dot,
                         out_dtype=torch.float32, imprecise_k=32 if dot == "fp8" else None)
    exact = (a.to(cuda).double() @ w.to(cuda).double().T).float()
    assert torch.equal(out, exact)


def test_gpu_w4a16_llama_shape(cuda):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 11008, generator=gen).to(cuda, torch.bfloat16)
    w, sw = _codes((4096, 11008), gen), torch.rand(4096, generator=gen) * 0.01
    out = wm.w4a16_matmul(x, pack_int4(w).to(cuda), sw.to(cuda))
    ref = wm.w4a16_matmul_ref(x, w.to(cuda), sw.to(cuda))
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
