"""W4A4Linear and the benchmark decoder layer: composition of the kernels, merge of the transform."""
import pytest
import torch

from kernels.kronecker import kron_transform_ref

ql = pytest.importorskip("kernels.qlinear")
tq = pytest.importorskip("kernels.transform_quant")
wm = pytest.importorskip("kernels.w4_matmul")
ll = pytest.importorskip("kernels.llama_layer")


def _orth(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].float()


def test_merge_transform_preserves_the_product():
    gen = torch.Generator().manual_seed(0)
    p1, p2 = _orth(6, gen) + 0.1, _orth(10, gen)  # not orthogonal: the inverse must be a real inverse
    s = torch.rand(60, generator=gen, dtype=torch.float64) + 0.5
    w, x = torch.randn(7, 60, generator=gen, dtype=torch.float64), torch.randn(4, 60, generator=gen, dtype=torch.float64)
    merged = ql.merge_transform(w, p1.double(), p2.double(), s)
    torch.testing.assert_close(kron_transform_ref(x, p1, p2, s).double() @ merged.T, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_bits,asym", [(4, False), (4, True), (16, False)])
def test_w4a4_linear_matches_reference_pipeline(device, act_bits, asym):
    """Forward == transform_quant_ref → codes → w4a4_matmul_ref (W4A4) or transform → W4A16 ref;
    and it approximates the float layer x·Wᵀ within 4-bit error."""
    gen = torch.Generator().manual_seed(act_bits)
    n1, n2, out_f = 16, 24, 48
    p1, p2 = _orth(n1, gen), _orth(n2, gen)
    w = torch.randn(out_f, n1 * n2, generator=gen)
    x = torch.randn(2, 5, n1 * n2, generator=gen)
    dt = torch.float16  # interpreter-safe half type; bf16 is covered on the GPU
    layer = ql.W4A4Linear.from_float(ql.merge_transform(w, p1, p2), p1, p2, transform_dtype=dt,
                                     act_bits=act_bits, act_asym=asym, out_dtype=torch.float32).to(device)
    y = layer(x.to(device, dt)).cpu()
    assert y.shape == (2, 5, out_f)
    _, w_scale, w_codes = ql.quantize_weight(ql.merge_transform(w, p1, p2))
    if act_bits == 4:
        codes, scale, zero = tq.transform_quant_ref(x.to(dt), p1.to(dt), p2.to(dt), asym=asym)
        ref = wm.w4a4_matmul_ref(codes, scale, w_codes, w_scale, a_zero=zero, out_dtype=torch.float32)
        bound = 0.35
    else:
        xt = tq.transform_quant_ref(x.to(dt), p1.to(dt), p2.to(dt), quantize=False)
        ref = wm.w4a16_matmul_ref(xt, w_codes, w_scale).float()
        bound = 0.15
    assert ((y - ref).norm() / ref.norm()).item() < 2e-2  # a code may flip on a rounding boundary
    fp = x @ w.T
    assert ((y - fp).norm() / fp.norm()).item() < bound


def test_unfused_transform_equals_fused(device):
    gen = torch.Generator().manual_seed(2)
    p1, p2 = _orth(16, gen), _orth(16, gen)
    w = torch.randn(32, 256, generator=gen)
    x = torch.randn(7, 256, generator=gen).to(device)
    fused = ql.W4A4Linear.from_float(w, p1, p2, transform_dtype=torch.float32, out_dtype=torch.float32).to(device)
    unfused = ql.W4A4Linear.from_float(w, p1, p2, transform_dtype=torch.float32, out_dtype=torch.float32,
                                       fuse_transform=False).to(device)
    a, b = fused(x), unfused(x)
    assert ((a - b).norm() / a.norm()).item() < 1e-2


@pytest.mark.parametrize("products", ["dp4a", "fp32"])
@pytest.mark.parametrize("asym", [False, True])
def test_decode_through_the_cuda_core_gemv_is_bit_identical(device, products, asym):
    """decode_gemv: at most CORE_MAX_M tokens go through kernels/w4_gemv.py instead of the GEMM's GEMV tiles;
    both are exact integer products with the same epilogue, so the outputs are equal bit for bit. More
    tokens keep the GEMM."""
    gen = torch.Generator().manual_seed(7)
    p1, p2 = _orth(8, gen), _orth(16, gen)
    w = torch.randn(24, 128, generator=gen)
    kwargs = dict(transform_dtype=torch.float32, out_dtype=torch.float32, act_asym=asym)
    tiles = ql.W4A4Linear.from_float(w, p1, p2, **kwargs).to(device)
    core = ql.W4A4Linear.from_float(w, p1, p2, decode_gemv=products, **kwargs).to(device)
    for tokens in (1, 3, 4, 5):
        x = torch.randn(1, tokens, 128, generator=gen).to(device)
        assert torch.equal(core(x), tiles(x)), tokens
    assert "decode_gemv=" + products in repr(core)


def test_w4a4_linear_rejects_bad_config():
    w = torch.zeros(8, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="act_bits"):
        ql.W4A4Linear(w, torch.ones(8), act_bits=8)
    with pytest.raises(ValueError, match="do not match"):
        ql.W4A4Linear(w, torch.ones(8), torch.eye(4), torch.eye(4))
    with pytest.raises(ValueError, match="w_codes_sum"):
        ql.W4A4Linear(w, torch.ones(8), act_asym=True)
    with pytest.raises(ValueError, match="decode_gemv must be"):
        ql.W4A4Linear(w, torch.ones(8), decode_gemv="int8")
    with pytest.raises(ValueError, match="decode_gemv must be"):
        ql.W4A4Linear(w, torch.ones(8), act_bits=16, decode_gemv="dp4a")


TINY = ll.LlamaShape("tiny", hidden=64, inter=160, heads=2, kv_heads=1, head_dim=32)


@pytest.mark.parametrize("variant", ll.VARIANTS)
def test_decoder_layer_prefill_and_decode(cuda, variant):
    """Every variant runs prefill and one decode step on the GPU and gives finite output."""
    layer = ll.build_layer(TINY, variant, cuda)
    x = torch.randn(2, 9, TINY.hidden, device=cuda, dtype=torch.bfloat16)
    assert torch.isfinite(layer(x)).all()
    kc = torch.zeros(2, TINY.kv_heads, 12, TINY.head_dim, device=cuda, dtype=torch.bfloat16)
    out = layer(x[:, :1], (kc, kc.clone()), kv_len=9)
    assert out.shape == (2, 1, TINY.hidden) and torch.isfinite(out).all()
