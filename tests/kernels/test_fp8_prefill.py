"""FP8 prefill path (issue 12): kernel 1 writing e4m3 codes, FP8W4A4Linear on torch._scaled_mm.

CPU: kernel 1 in the Triton interpreter; torch._scaled_mm has a CPU kernel for float8 in the
torch used here (2.13), so the real call is tested on CPU too (skipped where a build lacks it).
That CPU kernel is exact with unit scales, but with row-wise scales it is not an integer product
with a scaled epilogue: its output equals, bit for bit, the fp32 GEMM of the scaled operands
(A·s_a)(W·s_w)ᵀ (checked), with relative errors ~3e-6 and nonzero outputs where the integer
product is 0, so CPU checks with scales allow 1e-5 of the output's magnitude. GPU (skipped without CUDA): cuBLAS, whose FP8
GEMM accumulates the products in fp32 and applies the scales in the epilogue, against the float64
integer product: bit for bit with unit scales, within one bf16 ulp (rtol 2^-7) with scales.
"""
import pytest
import torch

from qllm_core.quant.packing import pack_int4, unpack_int4

tq = pytest.importorskip("kernels.transform_quant")
fl = pytest.importorskip("kernels.fp8_linear")
ql = pytest.importorskip("kernels.qlinear")
ll = pytest.importorskip("kernels.llama_layer")


def _orth(n, gen, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].to(dtype)


def _scaled_mm_on(device: str) -> bool:
    a = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
    try:
        fl.fp8_scaled_mm(a, torch.ones(16, 1, device=device), a, torch.ones(1, 16, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.fixture
def scaled_mm_device(device):
    if not _scaled_mm_on(device):
        pytest.skip(f"torch._scaled_mm with float8 is not available on {device} in this torch build")
    return device


# ----------------------------------------------------------------------------- kernel 1, fp8 codes

@pytest.mark.parametrize("n", [64, 250, 4094])
def test_fp8_codes_equal_reference_without_transform(device, n):
    """No transform: e4m3 codes (as float) equal the reference int codes exactly; scale (M, 1)."""
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(2, 5, n, generator=gen) * 2).to(device, torch.bfloat16)
    x[0, 1, :3] *= 50  # an outlier token
    codes, scale = tq.transform_quant_fp8(x, clip_ratio=0.9)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (2, 5, n)
    assert scale.dtype == torch.float32 and scale.shape == (2, 5, 1)
    ref_codes, ref_scale, _ = tq.transform_quant_ref(x, clip_ratio=0.9)
    assert torch.equal(codes.cpu().float(), ref_codes.cpu().float())
    assert torch.equal(scale.cpu()[..., 0], ref_scale.cpu())
    # the same codes as the packed format, byte for byte
    packed, pscale, _ = tq.transform_quant(x, clip_ratio=0.9)
    assert torch.equal(unpack_int4(packed.cpu()).float(), codes.cpu().float())
    assert torch.equal(pscale.cpu(), scale.cpu()[..., 0])


@pytest.mark.parametrize("n1,n2", [(16, 16), (12, 20), (16, 160)])
def test_fp8_codes_equal_packed_codes_with_transform(device, n1, n2):
    """With a transform (fp32 factors, channel scale; n2 = 160 takes the chunked two-pass path):
    the fp8 codes are exactly the packed path's codes (same kernel, only the store differs),
    and match the reference up to rounding-boundary flips."""
    gen = torch.Generator().manual_seed(n1 * n2)
    p1, p2 = _orth(n1, gen).to(device), _orth(n2, gen).to(device)
    cs = (torch.rand(n1 * n2, generator=gen) + 0.5).to(device)
    x = (torch.randn(9, n1 * n2, generator=gen) * 3).to(device)
    codes, scale = tq.transform_quant_fp8(x, p1, p2, channel_scale=cs, clip_ratio=0.95)
    packed, pscale, _ = tq.transform_quant(x, p1, p2, channel_scale=cs, clip_ratio=0.95)
    assert torch.equal(unpack_int4(packed.cpu()).float(), codes.cpu().float())
    assert torch.equal(pscale.cpu(), scale.cpu()[:, 0])
    ref_codes, ref_scale, _ = tq.transform_quant_ref(x, p1, p2, channel_scale=cs, clip_ratio=0.95)
    diff = (codes.cpu().float() - ref_codes.cpu().float()).abs()
    assert diff.max().item() <= 1 and diff.mean().item() <= 5e-3
    torch.testing.assert_close(scale.cpu()[:, 0], ref_scale.cpu(), rtol=1e-5, atol=0)


def test_fp8_out_format_rejects_asymmetric_and_unknown(device):
    x = torch.randn(3, 64, device=device)
    with pytest.raises(ValueError, match="symmetric"):
        tq.transform_quant(x, asym=True, out_format="fp8")
    with pytest.raises(ValueError, match="out_format"):
        tq.transform_quant(x, out_format="int2")


# ----------------------------------------------------------------------------- the cuBLAS-facing GEMM

def _codes(shape, gen):
    return torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)


def _scaled_atol(ref, device):
    """Absolute slack for outputs with row-wise scales: none beyond rtol on CUDA; on CPU, 1e-5 of
    the largest |output| (the CPU kernel's operand scaling, module docstring)."""
    return 1e-12 if device == "cuda" else 1e-5 * ref.abs().max().item()


def _check_scaled_mm(device, m, n, k, gen):
    a, w = _codes((m, k), gen), _codes((n, k), gen)
    a8, w8 = fl.codes_to_fp8(a).to(device), fl.codes_to_fp8(w).to(device)
    exact = a.double() @ w.double().T
    one_a, one_w = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
    # unit scales: the bf16 output is the exact integer product rounded once
    y = fl.fp8_scaled_mm(a8, one_a, w8, one_w, out_dtype=torch.bfloat16)
    assert torch.equal(y.cpu(), exact.to(torch.bfloat16))
    try:  # fp32 output (cuBLAS on sm90, CPU): the integer product itself, bit for bit
        y32 = fl.fp8_scaled_mm(a8, one_a, w8, one_w, out_dtype=torch.float32)
    except RuntimeError:
        y32 = None
    if y32 is not None:
        assert torch.equal(y32.cpu().double(), exact)
    # row-wise scales: fp32 epilogue, then bf16; within one bf16 ulp of the float64 value
    sa = (torch.rand(m, 1, generator=gen) * 1e-2 + 1e-3).to(device)
    sw = (torch.rand(1, n, generator=gen) * 1e-2 + 1e-3).to(device)
    y = fl.fp8_scaled_mm(a8, sa, w8, sw).cpu().double()
    ref = fl.fp8_scaled_mm_ref(a8.cpu(), sa.cpu(), w8.cpu(), sw.cpu())
    torch.testing.assert_close(y, ref, rtol=2 ** -7, atol=_scaled_atol(ref, device))


def test_scaled_mm_is_exact_int4_product_cpu(scaled_mm_device):
    _check_scaled_mm(scaled_mm_device, 37, 48, 256, torch.Generator().manual_seed(0))


def test_scaled_mm_is_exact_int4_product_gpu(cuda):
    """cuBLAS FP8 at a LLaMA-like K (|sum| up to 8·8·4096 = 2^18, well inside fp32's 2^24)."""
    gen = torch.Generator().manual_seed(1)
    _check_scaled_mm(cuda, 300, 512, 4096, gen)
    _check_scaled_mm(cuda, 2048, 1024, 11008, gen)


# ----------------------------------------------------------------------------- FP8W4A4Linear

def _layer(gen, n1=16, n2=24, out_f=48, transform=True, dtype=torch.float32, out_dtype=torch.float32):
    p1, p2 = (_orth(n1, gen), _orth(n2, gen)) if transform else (None, None)
    w = torch.randn(out_f, n1 * n2, generator=gen)
    if transform:
        w = ql.merge_transform(w, p1, p2)
    return fl.FP8W4A4Linear.from_float(w, p1, p2, transform_dtype=dtype, out_dtype=out_dtype), w


@pytest.mark.parametrize("transform", [False, True])
def test_fp8_linear_prefill_matches_integer_reference(scaled_mm_device, transform):
    """M > 16: output == float64 integer product of kernel 1's codes and the weight codes, times
    the scales; and == the packed Triton W4A4 path's result (GEMM in the interpreter on CPU).
    fp32 output on CPU; bf16 (the deployment dtype) on CUDA, within one bf16 ulp."""
    dev = scaled_mm_device
    out_dtype, rtol = (torch.float32, 1e-5) if dev == "cpu" else (torch.bfloat16, 2 ** -7)
    gen = torch.Generator().manual_seed(int(transform))
    lin, _ = _layer(gen, transform=transform, out_dtype=out_dtype)
    lin = lin.to(dev)
    x = torch.randn(3, 7, lin.in_features, generator=gen).to(dev)  # 21 tokens: the FP8 path
    y = lin(x)
    assert y.shape == (3, 7, lin.out_features) and y.dtype == out_dtype
    codes, scale = tq.transform_quant_fp8(x, lin.p1, lin.p2)
    ref = fl.fp8_scaled_mm_ref(codes.reshape(21, -1).cpu(), scale.reshape(21, 1).cpu(), lin.w_fp8.cpu(),
                               lin.w_scale.cpu())
    torch.testing.assert_close(y.reshape(21, -1).cpu().double(), ref, rtol=rtol, atol=_scaled_atol(ref, dev))
    packed_path = ql.W4A4Linear.forward(lin, x)  # the parent's packed-int4 Triton GEMM, same layer
    torch.testing.assert_close(y.cpu().double(), packed_path.cpu().double(), rtol=rtol, atol=_scaled_atol(ref, dev))


def test_fp8_linear_decode_uses_packed_gemv(device, monkeypatch):
    """M ≤ 16 takes the packed-int4 path (W4A4Linear.forward): _scaled_mm is never called."""
    gen = torch.Generator().manual_seed(5)
    lin, _ = _layer(gen)
    lin = lin.to(device)
    x = torch.randn(2, 8, lin.in_features, generator=gen).to(device)  # 16 tokens
    monkeypatch.setattr(fl, "fp8_scaled_mm", lambda *a, **k: pytest.fail("FP8 GEMM used for decode"))
    torch.testing.assert_close(lin(x), ql.W4A4Linear.forward(lin, x), rtol=0, atol=0)


def test_fp8_linear_weights_and_memory():
    gen = torch.Generator().manual_seed(6)
    lin, _ = _layer(gen, out_f=32)
    assert lin.w_fp8.dtype == torch.float8_e4m3fn and lin.w_fp8.shape == (32, 384)
    assert torch.equal(pack_int4(lin.w_fp8.float().to(torch.int8)), lin.w_packed)
    b = lin.weight_bytes()
    assert b["fp8_codes"] == 2 * b["packed_int4"] == 32 * 384
    assert b["bf16_weight"] == 2 * b["fp8_codes"]
    assert b["scales"] == 32 * 4 and b["transform"] == (16 * 16 + 24 * 24) * 4
    assert b["total"] == b["packed_int4"] + b["fp8_codes"] + b["scales"] + b["transform"]
    again = fl.FP8W4A4Linear.from_w4a4(ql.W4A4Linear(lin.w_packed, lin.w_scale, lin.p1, lin.p2))
    assert torch.equal(again.w_fp8.float(), lin.w_fp8.float())


def test_fp8_linear_rejects_what_scaled_mm_cannot_do():
    w = torch.zeros(32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="symmetric"):
        fl.FP8W4A4Linear(w, torch.ones(32), act_asym=True, w_codes_sum=torch.zeros(32))
    with pytest.raises(ValueError, match="symmetric"):
        fl.FP8W4A4Linear(w, torch.ones(32), act_bits=16)
    with pytest.raises(ValueError, match="fuses"):
        fl.FP8W4A4Linear(w, torch.ones(32), fuse_transform=False)
    with pytest.raises(ValueError, match="multiples of 16"):
        fl.FP8W4A4Linear(torch.zeros(24, 32, dtype=torch.uint8), torch.ones(24))


def test_fp8_linear_gpu_bf16(cuda):
    """Real sizes on the GPU, bf16 factors (the deployment setting): output vs the float64 integer
    product of the module's own codes, bf16 output within one bf16 ulp."""
    gen = torch.Generator().manual_seed(7)
    lin, _ = _layer(gen, n1=64, n2=64, out_f=1024, dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    lin = lin.to(cuda)
    x = torch.randn(2, 300, 4096, generator=gen).to(cuda, torch.bfloat16)
    y = lin(x).reshape(600, -1)
    codes, scale = tq.transform_quant_fp8(x, lin.p1, lin.p2)
    ref = fl.fp8_scaled_mm_ref(codes.reshape(600, -1), scale.reshape(600, 1), lin.w_fp8, lin.w_scale)
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -7, atol=1e-12)


# ----------------------------------------------------------------------------- layer and stack

TINY = ll.LlamaShape("tiny", hidden=64, inter=160, heads=2, kv_heads=1, head_dim=32)


@pytest.mark.parametrize("variant", ["w4a4-fp8", "flatquant-fp8"])
def test_fp8_variants_use_fp8_linears(variant):
    layer = ll.build_layer(TINY, variant, "cpu")
    plain = ll.build_layer(TINY, variant.removesuffix("-fp8"), "cpu")
    for name in ("qkv", "o", "gate_up", "down"):
        a, b = getattr(layer, name), getattr(plain, name)
        assert isinstance(a, fl.FP8W4A4Linear)
        assert torch.equal(a.w_packed, b.w_packed)  # same seed, same weights as the packed variant
        assert (a.p1 is None) == (b.p1 is None)


@pytest.mark.parametrize("base", ["w4a4-fp8", "flatquant-fp8"])
def test_dp4a_variant_decodes_like_its_base(device, base):
    """'-dp4a' layers: the same weights, and a decode step through the CUDA-core dp4a GEMV equal to the base's
    (the GEMM's GEMV tiles) bit for bit: both are exact integer products with the same epilogue."""
    plain, dp4a = ll.build_layer(TINY, base, device), ll.build_layer(TINY, base + "-dp4a", device)
    assert torch.equal(plain.qkv.w_packed, dp4a.qkv.w_packed) and dp4a.down.decode_gemv == "dp4a"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, TINY.hidden, generator=gen).to(device, torch.bfloat16)
    cache = [torch.randn(2, 1, 12, 32, generator=gen).to(device, torch.bfloat16) for _ in range(2)]
    outs = [layer(x, tuple(c.clone() for c in cache), kv_len=9) for layer in (plain, dp4a)]
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_stack_shares_rope_tables_and_runs_decode_step(scaled_mm_device):
    """A two-layer fp8 stack on CPU: prefill (FP8 path) and a decode step (GEMV path), finite."""
    device = scaled_mm_device
    stack = ll.build_stack(TINY, "w4a4-fp8", device, n_layers=2)
    assert len(stack.layers) == 2 and stack.layers[1].cos is stack.layers[0].cos
    assert stack.layers[0].qkv.w_packed is not stack.layers[1].qkv.w_packed
    x = torch.randn(2, 9, TINY.hidden, device=device, dtype=torch.bfloat16)
    assert torch.isfinite(stack(x)).all()
    caches = [(torch.zeros(2, 1, 12, 32, device=device, dtype=torch.bfloat16),
               torch.zeros(2, 1, 12, 32, device=device, dtype=torch.bfloat16)) for _ in range(2)]
    out = stack(x[:, :1], caches, kv_len=9)
    assert out.shape == (2, 1, TINY.hidden) and torch.isfinite(out).all()
