"""FlatQuant: Kronecker transforms, their inverses, FP equivalence, resume, and that it beats RTN.

Tolerances: float64 models are compared at 1e-10 absolute on logits of magnitude ~1 (the merged
transforms are exact up to float64 round-off); float32 factor inverses at 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from qllm_core.adapters import ModelAdapter
from qllm_core.quant import quantizers_off
from qllm_core.engine import BlockwiseEngine
from qllm_core.methods import QuantConfig, make_method
from qllm_core.transforms import KroneckerTransform, LearnableFactor, LearnableKronecker, kron_apply
from qllm_core.transforms.kronecker import factor_sizes

from .conftest import make_tiny_llama

FAST = {"epochs": 1, "batch_size": 2}


def _ids(n: int = 4, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _perturb(factor: LearnableFactor, seed: int) -> None:
    """Move a factor away from its initialisation (random σ, non-zero Cayley parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in factor.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if not factor.direct_inv:
            factor.sigma.copy_(torch.rand(factor.n, generator=g) * 1.5 + 0.5)


@pytest.mark.parametrize("n, sizes", [(4096, (64, 64)), (11008, (86, 128)), (14336, (112, 128)),
                                      (28672, (128, 224)), (576, (24, 24)), (1536, (32, 48))])
def test_factor_sizes_match_paper(n, sizes):
    assert factor_sizes(n) == sizes


def test_factor_sizes_reject_impossible_dims():
    with pytest.raises(ValueError, match="feature size 6"):
        factor_sizes(6)
    with pytest.raises(ValueError, match="expects 4 x 6"):
        KroneckerTransform(4, 6)(torch.zeros(3, 25))


@pytest.mark.parametrize("direct_inv", [False, True])
def test_learnable_factor_inverse_transpose(direct_inv):
    factor = LearnableFactor(24, torch.Generator().manual_seed(0), direct_inv)
    _perturb(factor, 1)
    eye = torch.eye(24)
    assert torch.allclose(factor.matrix() @ factor.inverse_t().mT, eye, atol=1e-5)
    if not direct_inv:  # the Cayley map keeps U, V orthogonal
        u, _ = factor.orthogonal()
        assert torch.allclose(u @ u.mT, eye, atol=1e-5)


def test_learnable_kronecker_preserves_linear_output():
    g = torch.Generator().manual_seed(0)
    left, right = LearnableFactor(8, g), LearnableFactor(12, g)
    _perturb(left, 2)
    _perturb(right, 3)
    kron = LearnableKronecker(left, right, torch.rand(96, generator=g) + 0.5)
    x, w = torch.randn(5, 96, generator=g), torch.randn(7, 96, generator=g)
    assert torch.allclose(kron(x) @ kron.transform_weight(w).mT, x @ w.mT, atol=1e-4, rtol=1e-4)


def test_frozen_transform_is_exact_in_float64():
    """Weight side = float64 inverse of the stored factors: exact to round-off even when ill-conditioned."""
    g = torch.Generator().manual_seed(0)
    t = KroneckerTransform(8, 12).double()
    left = torch.randn(8, 8, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-3, 0, 8, dtype=torch.float64))
    t.load_matrices(left, torch.randn(12, 12, generator=g, dtype=torch.float64))
    x, w = torch.randn(5, 96, generator=g, dtype=torch.float64), torch.randn(7, 96, generator=g, dtype=torch.float64)
    assert torch.allclose(t(x) @ t.transform_weight(w).mT, x @ w.mT, atol=1e-9)
    # two small matmuls == one multiplication by the explicit Kronecker product
    assert torch.allclose(t(x), x @ torch.kron(t.left, t.right), atol=1e-12)
    assert torch.allclose(kron_apply(x, t.left, None, (8, 12)), x @ torch.kron(t.left, torch.eye(12).double()))


@pytest.mark.parametrize("sizes", [dict(hidden=64, intermediate=96, heads=4, kv_heads=2),   # GQA, 8x8
                                   dict(hidden=96, intermediate=160, heads=4, kv_heads=2),  # 8x12, 10x16
                                   dict(hidden=48, intermediate=80, heads=3, kv_heads=1)])  # 6x8, MQA
def test_fused_model_equals_fp_with_quantizers_off(sizes):
    """Calibrate with 4-bit activations/KV (so transforms and scales move), then switch every
    quantizer off: the fused model (scales in the norms, P_v in v/o_proj, P⁻ᵀ in the weights, K
    transform in attention) must reproduce the FP logits."""
    ref = make_tiny_llama(**sizes, dtype=torch.float64)
    model = make_tiny_llama(**sizes, dtype=torch.float64)
    ids = _ids()
    method = make_method("flatquant", QuantConfig(w_bits=16, a_bits=4, kv_bits=4), **FAST)
    BlockwiseEngine(model, ModelAdapter(model)).run(method, ids)
    layer = model.model.layers[0]
    assert not torch.allclose(layer.self_attn.o_proj.input_transform.left, torch.eye(sizes["heads"]).double())
    assert not torch.allclose(layer.input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)
    assert not torch.allclose(layer.self_attn.qllm_qkv_hook.key_matrix, torch.eye(sizes["hidden"] // sizes["heads"]).double())
    with torch.no_grad(), quantizers_off(model):
        got = model(ids).logits
    with torch.no_grad():
        want = ref(ids).logits
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_resume_after_interruption_equals_single_run(tmp_path):
    ids = _ids()
    quant = QuantConfig(w_bits=4, a_bits=4, kv_bits=4)
    single = make_tiny_llama()
    BlockwiseEngine(single, ModelAdapter(single), layer_dir=tmp_path / "single").run(make_method("flatquant", quant, **FAST), ids)

    resumed_dir = tmp_path / "resumed"
    first = make_tiny_llama()
    BlockwiseEngine(first, ModelAdapter(first), layer_dir=resumed_dir).run(make_method("flatquant", quant, **FAST), ids)
    (resumed_dir / "001.safetensors").unlink()  # the run was "killed" after layer 0
    resumed = make_tiny_llama()
    BlockwiseEngine(resumed, ModelAdapter(resumed), layer_dir=resumed_dir).run(make_method("flatquant", quant, **FAST), ids)

    want, got = single.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    with torch.no_grad():
        assert torch.equal(single(ids).logits, resumed(ids).logits)


def _outlier_llama():
    """A tiny LLaMA with a few massive activation channels (what breaks RTN at A4 in real LLMs)."""
    model = make_tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40.0
            layer.post_attention_layernorm.weight[[5, 40]] *= 40.0
    return model


def _logit_mse(method: str, quant: QuantConfig, ids: torch.Tensor, **options) -> float:
    ref, model = _outlier_llama(), _outlier_llama()
    BlockwiseEngine(model, ModelAdapter(model)).run(make_method(method, quant, **options), ids)
    with torch.no_grad():
        return torch.mean((model(ids).logits - ref(ids).logits) ** 2).item()


def test_flatquant_beats_rtn_at_w4a4kv4():
    ids = _ids()
    quant = QuantConfig(w_bits=4, a_bits=4, kv_bits=4)
    flat = _logit_mse("flatquant", quant, ids, **FAST)
    rtn = _logit_mse("rtn", quant, ids)
    assert flat < 0.5 * rtn, (flat, rtn)


def test_gptq_weight_quantizer_and_direct_inv_run():
    ids = _ids()
    quant = QuantConfig(w_bits=4, a_bits=4, kv_bits=4)
    for options in ({"weight_quantizer": "gptq"}, {"direct_inv": True, "add_diag": False, "lwc": False, "lac": False}):
        mse = _logit_mse("flatquant", quant, ids, **FAST, **options)
        assert 0.0 < mse < 1.0, options


def test_bad_options_and_biased_v_proj_are_rejected():
    with pytest.raises(ValueError, match="unknown FlatQuant option"):
        make_method("flatquant", QuantConfig(), epoch=3)
    with pytest.raises(ValueError, match="weight_quantizer"):
        make_method("flatquant", QuantConfig(), weight_quantizer="awq")
    model = make_tiny_llama()
    adapter = ModelAdapter(model)
    layer = adapter.layers[0]
    v = adapter.linear(layer, "v_proj")
    v.bias = torch.nn.Parameter(torch.zeros(v.out_features))
    with pytest.raises(NotImplementedError, match="v_proj"):
        make_method("flatquant", QuantConfig(w_bits=4)).build_layer(0, layer, adapter)


def test_flatness_curves_flatten_outliers():
    from eval.flatness import flatness_ratio, site_flatness

    fp, model, ids = _outlier_llama(), _outlier_llama(), _ids()
    BlockwiseEngine(model, ModelAdapter(model)).run(
        make_method("flatquant", QuantConfig(w_bits=4, a_bits=4), epochs=0), ids)
    curves = site_flatness(fp, ModelAdapter(fp), ModelAdapter(model), 0, "qkv", ids)
    assert curves["act_before"].shape == (64,) and torch.all(curves["act_before"][:-1] >= curves["act_before"][1:])
    assert flatness_ratio(curves["act_after"]) < 0.5 * flatness_ratio(curves["act_before"])


@pytest.mark.parametrize("engine_batch", [8, 1])
def test_add_diag_statistics_come_from_the_engines_fp_pass(engine_batch):
    """The engine records max|X| of the linears' inputs during its FP pass (fp_input_roles); they equal what a
    separate pass of the built layer with its quantizers off gives (add_diag's old source): bit for bit with the
    same windows per forward, to float32 rounding (1e-6 relative) with another batching."""
    from qllm_core.calib_stats import input_channel_absmax
    from qllm_core.methods.flatquant import FlatQuantMethod

    seen = []

    class Checked(FlatQuantMethod):
        def calibrate_layer(self, layer, ctx):
            linears = {role: ctx.adapter.linear(layer, role) for role in self.fp_input_roles}
            with quantizers_off(layer):
                seen.append((ctx.fp_input_absmax, input_channel_absmax(layer, ctx, linears)))
            super().calibrate_layer(layer, ctx)

    model = make_tiny_llama(layers=2)
    method = Checked(QuantConfig(w_bits=4, a_bits=4, kv_bits=4), **FAST)
    BlockwiseEngine(model, ModelAdapter(model), batch_size=engine_batch).run(method, _ids(n=8))
    assert len(seen) == 2 and set(method.fp_input_roles) == {"q_proj", "gate_proj", "down_proj"}
    for recorded, separate in seen:
        assert recorded.keys() == separate.keys() == set(method.fp_input_roles)
        for role in recorded:
            if engine_batch == 8:
                assert torch.equal(recorded[role], separate[role]), role
            else:
                torch.testing.assert_close(recorded[role], separate[role], rtol=1e-6, atol=0)


def test_add_diag_without_engine_statistics_is_rejected():
    """A context built without the engine's FP-pass statistics gets a clear error, not scales from nothing."""
    from qllm_core.engine import LayerContext, capture_layer0_inputs, run_layer_batched

    model = make_tiny_llama(layers=1)
    adapter = ModelAdapter(model)
    method = make_method("flatquant", QuantConfig(w_bits=4, a_bits=4), **FAST)
    stream = capture_layer0_inputs(model, adapter, _ids(), torch.device("cpu"), batch_size=4)
    layer = adapter.layers[0]
    outputs = run_layer_batched(layer, stream.hidden, stream.kwargs, "cpu", 4)
    method.build_layer(0, layer, adapter)
    ctx = LayerContext(0, stream.hidden, outputs, None, stream.kwargs, torch.device("cpu"), adapter)
    with pytest.raises(ValueError, match="FP input maxima"):
        method.calibrate_layer(layer, ctx)
