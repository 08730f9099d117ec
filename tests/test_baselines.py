"""Baselines: Hadamard constructions, QuaRot invariance, GPTQ vs RTN, SmoothQuant exactness, OmniQuant LWC."""
from __future__ import annotations

import pytest
import torch

from qllm_core.adapters import ModelAdapter
from qllm_core.algorithms.gptq import HessianAccumulator, gptq_quantize_weight
from qllm_core.algorithms.hadamard import (HadamardSizeError, apply_kronecker, hadamard_factors,
                                           hadamard_kronecker_factors, hadamard_matrix, random_hadamard)
from qllm_core.algorithms.rotation import HadamardQKHook
from qllm_core.quant import quantizers_off
from qllm_core.attention import set_attention_hook
from qllm_core.calib_stats import input_channel_absmax
from qllm_core.engine import BlockwiseEngine, LayerContext, capture_layer0_inputs, load_layer_state
from qllm_core.methods import QuantConfig, make_method
from qllm_core.methods.omniquant import clip_parameters
from qllm_core.quant import Quantizer

from tests.conftest import make_tiny_llama

torch.set_num_threads(1)
W4A4KV4 = QuantConfig(w_bits=4, a_bits=4, kv_bits=4)


def _ids(n=4, tokens=24, seed=1):
    return torch.randint(0, 128, (n, tokens), generator=torch.Generator().manual_seed(seed))


def _quantize(model, method, calib=None, layer_dir=None):
    BlockwiseEngine(model, ModelAdapter(model), layer_dir=layer_dir).run(method, calib)
    return model


# -- Hadamard matrices --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 20, 28, 36, 44, 52, 108, 344, 96, 576, 1536])
def test_hadamard_orthogonal_pm1(n):
    h = hadamard_matrix(n, normalized=False)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))  # integer-exact in float64


def test_hadamard_sizes_of_real_models():
    assert hadamard_factors(576) == (36, 16)  # Paley II, q = 17
    assert hadamard_factors(1536) == (12, 128)  # Paley I, q = 11
    assert hadamard_factors(11008) == (344, 32)  # Paley I over GF(7^3)
    assert hadamard_factors(4096) == (1, 4096)
    with pytest.raises(HadamardSizeError, match="172"):
        hadamard_matrix(172)  # needs a Williamson-type matrix, not constructed here


def test_kronecker_application_matches_full_matrix():
    x = torch.randn(3, 5, 96, dtype=torch.float64)
    left, right = hadamard_kronecker_factors(96)
    torch.testing.assert_close(apply_kronecker(x, left, right), x @ hadamard_matrix(96), rtol=0, atol=1e-12)


def test_random_hadamard_is_seeded_orthogonal():
    q = random_hadamard(576, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(576, dtype=q.dtype), rtol=0, atol=1e-12)
    assert torch.equal(q, random_hadamard(576, seed=3)) and not torch.equal(q, random_hadamard(576, seed=4))


# -- QuaRot -------------------------------------------------------------------------------------
# LlamaRMSNorm normalises in float32 even for float64 models, so rotated and unrotated models
# differ by float32 rounding of the norm (~1e-7); everything else is float64.
ROT_ATOL = 1e-6


@pytest.mark.parametrize("sizes", [dict(hidden=64, intermediate=96), dict(hidden=80, intermediate=144)])
@pytest.mark.parametrize("tied", [False, True])
def test_quarot_fp_invariance(sizes, tied):
    """hidden 80 → head_dim 20 (Paley I), intermediate 96 = 12·8 and 144 = 36·4 (Paley II)."""
    ref_model = make_tiny_llama(dtype=torch.float64, **sizes)
    model = make_tiny_llama(dtype=torch.float64, **sizes)
    if tied:
        for m in (ref_model, model):
            m.lm_head.weight = m.model.embed_tokens.weight
            m.config.tie_word_embeddings = True
    ids = _ids()
    ref = ref_model(ids).logits
    _quantize(model, make_method("quarot", QuantConfig()))
    adapter = ModelAdapter(model)
    assert not torch.equal(adapter.embed_tokens.weight, ref_model.model.embed_tokens.weight)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=ROT_ATOL)
    for layer in adapter.layers:  # the K-cache rotation is also exact
        set_attention_hook(adapter.attention(layer), HadamardQKHook(adapter.head_dim))
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=ROT_ATOL)


def _reload(method_name, quant, options, layer_dir, **sizes):
    """Rebuild a saved run as runs.load_run does: prepare_model, build_layer, load each layer."""
    model = make_tiny_llama(**sizes)
    adapter = ModelAdapter(model)
    method = make_method(method_name, quant, **options)
    method.prepare_model(model, adapter)
    for i, layer in enumerate(adapter.layers):
        method.build_layer(i, layer, adapter)
        load_layer_state(layer, layer_dir / f"{i:03d}.safetensors")
    return model


@pytest.mark.parametrize("method_name,options", [
    ("quarot", {"weight_quantizer": "gptq"}), ("gptq", {}), ("smoothquant", {}), ("omniquant", {"epochs": 2}),
])
def test_run_reload_and_resume_match(tmp_path, method_name, options):
    """A saved run reloads to identical logits; resuming after losing layer 1 equals the full run."""
    quant = QuantConfig(w_bits=4, a_bits=8, kv_bits=4, w_asym=method_name == "omniquant")
    calib, ids = _ids(4, 24, seed=2), _ids()
    model = _quantize(make_tiny_llama(), make_method(method_name, quant, **options), calib, tmp_path)
    ref = model(ids).logits
    torch.testing.assert_close(_reload(method_name, quant, options, tmp_path)(ids).logits, ref, rtol=0, atol=0)
    (tmp_path / "001.safetensors").unlink()
    _quantize(make_tiny_llama(), make_method(method_name, quant, **options), calib, tmp_path)
    torch.testing.assert_close(_reload(method_name, quant, options, tmp_path)(ids).logits, ref, rtol=0, atol=1e-6)


def test_quarot_beats_rtn_on_activation_outliers():
    """Massive residual channels (the LLM outlier pattern, here in the embeddings) ruin per-token
    A4; the rotation spreads them. Weights stay FP: random Gaussian weights have no outliers."""
    def outlier_model():
        m = make_tiny_llama(hidden=64, intermediate=96)
        with torch.no_grad():
            m.model.embed_tokens.weight[:, :3] *= 40.0
        return m
    ids, quant = _ids(), QuantConfig(a_bits=4)
    ref = outlier_model()(ids).logits
    err = {name: (_quantize(outlier_model(), make_method(name, quant))(ids).logits - ref).pow(2).mean().item()
           for name in ("rtn", "quarot")}
    assert err["quarot"] < 0.5 * err["rtn"], err


# -- GPTQ ---------------------------------------------------------------------------------------
def _correlated_inputs(n=1024, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("kw", [dict(symmetric=True), dict(symmetric=False),
                                dict(symmetric=True, group_size=16), dict(symmetric=False, group_size=16)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_below_rtn(kw, act_order):
    x = _correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    quantizer = Quantizer(bits=4, **kw)
    hessian = 2.0 * x.T @ x / x.shape[0]
    q_gptq = gptq_quantize_weight(w, hessian, quantizer, blocksize=16, act_order=act_order)
    err_gptq = (x @ (w - q_gptq).T).pow(2).mean()
    err_rtn = (x @ (w - quantizer(w)).T).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    # Every GPTQ column lies on its quantization grid: re-quantizing with the same params is a no-op
    # for per-channel symmetric scales computed from the original weight.
    if kw == dict(symmetric=True):
        scale = w.abs().amax(dim=1, keepdim=True) / 7
        torch.testing.assert_close(torch.round(q_gptq / scale) * scale, q_gptq, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_block_graph_equals_the_eager_loop(monkeypatch, symmetric):
    """On a GPU the per-channel block loop replays a CUDA graph: the same weights, bit for bit, as the eager loop
    on the same GPU, for full and partial blocks (576 = 4 x 128 + 64 columns) and for a second weight of the same
    shape (a replay of the graphs the first captured)."""
    from qllm_core.algorithms import gptq

    quantizer = Quantizer(bits=4, symmetric=symmetric)
    for seed in (0, 1):
        x = _correlated_inputs(n=2048, d=576, seed=seed).cuda()
        w = torch.randn(192, 576, generator=torch.Generator().manual_seed(seed)).cuda()
        hessian = 2.0 * x.T @ x / x.shape[0]
        graphed = gptq_quantize_weight(w, hessian, quantizer)
        with monkeypatch.context() as patch:
            patch.setattr(gptq, "_quantize_block", gptq._quantize_block_eagerly)
            reference = gptq_quantize_weight(w, hessian, quantizer)
        assert torch.equal(graphed, reference)
    assert any(key[1:3] == (192, 64) for key in gptq._BLOCK_GRAPHS)  # the partial block has a graph of its own


def test_hessian_accumulator_is_running_mean():
    lin = torch.nn.Linear(8, 4)
    xs = [torch.randn(2, 5, 8), torch.randn(1, 3, 8)]
    with HessianAccumulator({"lin": lin}) as acc:
        for x in xs:
            lin(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(acc.hessians["lin"], 2.0 * flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-6)
    assert lin._forward_pre_hooks == {}


def test_gptq_bad_hessian_and_off_bits():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_weight(w, torch.eye(4), Quantizer(4))
    assert torch.equal(gptq_quantize_weight(w, torch.eye(8), Quantizer(16)), w)


def test_gptq_method_beats_rtn_w4a16():
    calib, ids = _ids(8, 32, seed=5), _ids()
    ref = make_tiny_llama()(ids).logits
    quant = QuantConfig(w_bits=3)
    err = {name: (_quantize(make_tiny_llama(), make_method(name, quant), calib)(ids).logits - ref).pow(2).mean()
           for name in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"], err


# -- SmoothQuant --------------------------------------------------------------------------------
def test_smoothquant_fold_is_exact_and_balances_maxima():
    """Quantization off: logits unchanged (float64); with α = 0.5 every smoothed site has
    max|X'_j| == max over its weights of |W'_:,j| (the definition of the migration scale)."""
    ref_model, model = make_tiny_llama(dtype=torch.float64), make_tiny_llama(dtype=torch.float64)
    calib, ids = _ids(4, 24, seed=3), _ids()
    method = make_method("smoothquant", QuantConfig(), alpha=0.5)
    _quantize(model, method, calib)
    torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=0, atol=1e-10)
    adapter = ModelAdapter(model)
    assert not torch.equal(adapter.linear(adapter.layers[0], "v_proj").weight,
                           ref_model.model.layers[0].self_attn.v_proj.weight)
    # Maxima after smoothing, layer 0 (its inputs are the embeddings of the calibration ids).
    stream = capture_layer0_inputs(model, adapter, calib, torch.device("cpu"))
    layer = adapter.layers[0]
    ctx = LayerContext(0, stream.hidden, None, None, stream.kwargs, torch.device("cpu"), adapter)
    sites = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
             "down_proj": ("down_proj",)}
    act = input_channel_absmax(layer, ctx, {r: adapter.linear(layer, r) for r in sites})
    for role, consumers in sites.items():
        wmax = torch.stack([adapter.linear(layer, c).weight.abs().amax(0) for c in consumers]).amax(0)
        torch.testing.assert_close(act[role].double(), wmax, rtol=1e-5, atol=1e-7, msg=role)


def test_smoothquant_o_site_shared_across_gqa_group():
    """The o_proj scale is folded into v_proj rows, so it must be identical for query heads that share
    a KV head: checked through FP exactness with GQA (4 heads, 2 KV heads) and the o site only."""
    ref_model, model = make_tiny_llama(dtype=torch.float64), make_tiny_llama(dtype=torch.float64)
    _quantize(model, make_method("smoothquant", QuantConfig(), sites=["o"]), _ids(4, 24, seed=3))
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=0, atol=1e-10)


def test_smoothquant_rejects_bad_options():
    with pytest.raises(ValueError, match="sites"):
        make_method("smoothquant", QuantConfig(), sites=["attn"])
    with pytest.raises(ValueError, match="alpha"):
        make_method("smoothquant", QuantConfig(), alpha=1.5)


def test_quantizers_off_restores_bits():
    model = _quantize(make_tiny_llama(), make_method("rtn", W4A4KV4))
    bits = [q.bits for q in model.modules() if isinstance(q, Quantizer)]
    with quantizers_off(model):
        assert all(q.bits == 16 for q in model.modules() if isinstance(q, Quantizer))
    assert [q.bits for q in model.modules() if isinstance(q, Quantizer)] == bits


# -- OmniQuant LWC ------------------------------------------------------------------------------
def test_omniquant_lwc_learns_clipping_and_beats_rtn():
    quant = QuantConfig(w_bits=3, a_bits=16, w_asym=True)
    calib, ids = _ids(4, 32, seed=4), _ids()
    ref = make_tiny_llama()(ids).logits
    model = _quantize(make_tiny_llama(), make_method("omniquant", quant, epochs=10), calib)
    logits = clip_parameters(model.model.layers[0])
    assert logits and all(p.shape[1] == 1 for p in logits)
    assert any((p != 4.0).any() for p in logits)  # trained away from the initial value
    err_omni = (model(ids).logits - ref).pow(2).mean()
    err_rtn = (_quantize(make_tiny_llama(), make_method("rtn", quant))(ids).logits - ref).pow(2).mean()
    assert err_omni < err_rtn, (err_omni, err_rtn)


def test_hessian_of_a_shared_quantizer_counts_each_tensor_once():
    """q/k/v share one activation quantizer: one Hessian for the three names, x counted once per forward."""
    shared, x = torch.nn.Identity(), torch.randn(2, 5, 6)
    with HessianAccumulator({"q": shared, "k": shared, "v": shared}) as acc:
        for _ in range(3):  # q, k and v each call the quantizer on the same tensor
            shared(x)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(acc.hessians["q"], 2.0 / 10 * flat.T @ flat)
    assert acc.counts == {"q": 10, "k": 10, "v": 10} and acc.hessians["k"] is acc.hessians["v"]
