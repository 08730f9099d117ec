"""CUDA-core decode GEMV (kernels/w4_gemv.py) against the references of kernels/w4_matmul.py.

W4A4 must equal the reference bit for bit (integer sums are exact in fp32, same epilogue order) for
1-4 tokens, symmetric and asymmetric activations, N and K not multiples of the tile; W4A16 sums in
fp32 in another order: 1e-3 relative (fp16 output rounding dominates).
"""
import pytest
import torch

from qllm_core.quant.packing import pack_int4, pack_uint4

gv = pytest.importorskip("kernels.w4_gemv")
wm = pytest.importorskip("kernels.w4_matmul")

SMALL = (4, 16, 1, 1)  # an explicit tile (BLOCK_N, BLOCK_KW words, warps, stages): no autotuning in the interpreter


def _codes(shape, gen, lo=-8, hi=8):
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("products", gv.PRODUCTS)
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 37, 200), (2, 8, 64), (3, 41, 136), (4, 16, 512)])
def test_w4a4_gemv_equals_the_reference_bit_for_bit(device, asym, m, n, k, products):
    gen = torch.Generator().manual_seed(m * n + k)
    a = _codes((m, k), gen, 0, 16) if asym else _codes((m, k), gen)
    w = _codes((n, k), gen)
    sa, sw = torch.rand(m, generator=gen) + 0.1, torch.rand(n, generator=gen) * 0.01
    za = torch.randint(0, 16, (m,), generator=gen).float() if asym else None
    packed_a = (pack_uint4(a.to(torch.uint8)) if asym else pack_int4(a)).to(device)
    for out_dtype in [torch.float32] + ([torch.bfloat16] if device == "cuda" else []):
        out = gv.w4a4_gemv(packed_a, sa.to(device), pack_int4(w).to(device), sw.to(device),
                           a_zero=za.to(device) if asym else None,
                           w_sum=w.sum(1).float().to(device) if asym else None, out_dtype=out_dtype, config=SMALL,
                           products=products)
        ref = wm.w4a4_matmul_ref(a, sa, w, sw, a_zero=za, out_dtype=out_dtype)
        assert out.shape == (m, n) and out.dtype == out_dtype
        assert torch.equal(out.cpu(), ref)


def test_w4a4_gemv_keeps_leading_dims_and_unit_scales_give_the_integer_product(device):
    gen = torch.Generator().manual_seed(1)
    a, w = _codes((2, 1, 96), gen), _codes((24, 96), gen)
    out = gv.w4a4_gemv(pack_int4(a).to(device), torch.ones(2, 1, device=device), pack_int4(w).to(device),
                       torch.ones(24, device=device), out_dtype=torch.float32, config=SMALL)
    assert out.shape == (2, 1, 24)
    assert torch.equal(out.cpu(), (a.double() @ w.double().T).float())


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (4, 33, 264)])
def test_w4a16_gemv(device, m, n, k):
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    w, sw = _codes((n, k), gen), torch.rand(n, generator=gen) * 0.05
    out = gv.w4a16_gemv(x.to(device), pack_int4(w).to(device), sw.to(device), config=SMALL)
    ref = wm.w4a16_matmul_ref(x, w, sw)
    assert out.dtype == torch.float16 and out.shape == (m, n)
    assert ((out.cpu().float() - ref.float()).norm() / ref.float().norm()).item() < 1e-3


def test_gemv_bad_inputs_are_named(device):
    w = torch.zeros(8, 6, dtype=torch.uint8, device=device)  # K = 12: not whole 32-bit words
    s8 = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="multiple of 8"):
        gv.w4a4_gemv(torch.zeros(1, 6, dtype=torch.uint8, device=device), torch.ones(1, device=device), w, s8)
    w = torch.zeros(8, 32, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        gv.w4a4_gemv(torch.zeros(5, 32, dtype=torch.uint8, device=device), torch.ones(5, device=device), w, s8)
    with pytest.raises(ValueError, match="a_zero and w_sum"):
        gv.w4a4_gemv(torch.zeros(1, 32, dtype=torch.uint8, device=device), torch.ones(1, device=device), w, s8,
                      a_zero=torch.zeros(1, device=device))
    with pytest.raises(TypeError, match="fp16/bf16"):
        gv.w4a16_gemv(torch.ones(1, 64, device=device), w, s8)
    with pytest.raises(ValueError, match="products must be one of"):
        gv.w4a4_gemv(torch.zeros(1, 32, dtype=torch.uint8, device=device), torch.ones(1, device=device), w, s8,
                     products="int8")


@pytest.mark.parametrize("products", gv.PRODUCTS)
@pytest.mark.parametrize("m", [1, 4])
def test_gpu_autotuned_gemv_exact_at_llama_shapes(cuda, m, products):
    """Autotuned tiles at LLaMA-2-7B decode shapes; codes biased to 5..7 give |sums| near 2**17, and codes at
    -8 (the sign extension's edge) give the largest negative products. dp4a: the PTX instruction itself."""
    gen = torch.Generator().manual_seed(m)
    for n, k in [(4096, 11008), (12288, 4096)]:
        for lo, hi in [(5, 8), (-8, -6)]:
            a, w = _codes((m, k), gen, lo, hi), _codes((n, k), gen, lo, hi)
            sa, sw = torch.rand(m, generator=gen) + 0.1, torch.rand(n, generator=gen) * 0.01
            out = gv.w4a4_gemv(pack_int4(a).to(cuda), sa.to(cuda), pack_int4(w).to(cuda), sw.to(cuda),
                               products=products)
            assert torch.equal(out.cpu(), wm.w4a4_matmul_ref(a, sa, w, sw))


def test_dp4a_loop_compiles_for_the_h100_without_conversions():
    """Ahead-of-time SASS for sm_90 (no GPU needed): the dp4a loop issues IDP.4A, has no shared-memory layout
    conversion (barriers) and costs under half the fp32 loop's instructions per code; neither loop converts
    integers to floats (I2FP, quarter rate: the fp32 products build floats from 2**23's mantissa instead).
    scripts/decode_sass.py; the timing itself is eval.speedup's gemv phase on a GPU. A subprocess: the compiler
    needs the kernels as compiled functions, which the interpreter (TRITON_INTERPRET=1) replaces."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import json; from scripts.decode_sass import gemv_loop; "
            "print(json.dumps([gemv_loop(p, 4, 128, 4, 3) for p in (True, False)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    dp4a, fp32 = json.loads(out.stdout.strip().splitlines()[-1])
    assert dp4a.count("IDP") == 8 and "BAR" not in dp4a and "STS" not in dp4a
    assert "I2FP" not in dp4a + fp32 and len(dp4a) < len(fp32) / 2
