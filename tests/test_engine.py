"""Block-wise engine: layer-by-layer equals the full forward; FP pass-through is exact; resume."""
import pytest
import torch

from qllm_core.engine import BlockwiseEngine, capture_layer0_inputs, float32_matmul_precision, run_layer_batched
from qllm_core.methods import QuantConfig, make_method
from qllm_core.methods.base import QuantMethod, quant_linears
from qllm_core.quant import QuantLinear


def _last_layer_output(model, adapter, ids):
    box = {}
    handle = adapter.layers[-1].register_forward_hook(lambda m, a, out: box.update(out=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return box["out"]


def test_layer_by_layer_equals_full_forward(tiny_llama):
    model, adapter = tiny_llama(layers=3)
    ids = torch.randint(0, 128, (3, 24))
    stream = capture_layer0_inputs(model, adapter, ids, torch.device("cpu"), batch_size=2)
    hidden = stream.hidden
    for layer in adapter.layers:
        hidden = run_layer_batched(layer, hidden, stream.kwargs, "cpu", batch_size=2)
    torch.testing.assert_close(hidden, _last_layer_output(model, adapter, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_bits16_passthrough_is_exact(family):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    from qllm_core.adapters import ModelAdapter
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    BlockwiseEngine(model, adapter).run(make_method("rtn", QuantConfig()))
    assert all(isinstance(m, QuantLinear) for m in adapter.linears(adapter.layers[0]).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_rtn_w4a4kv4_changes_outputs_and_quantizes_weights(tiny_llama):
    model, adapter = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    BlockwiseEngine(model, adapter).run(make_method("rtn", QuantConfig(4, 4, 4)))
    q = adapter.linear(adapter.layers[0], "q_proj")
    assert bool(q.weight_frozen)
    assert max(torch.unique(row).numel() for row in q.weight) <= 16
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(after, before, atol=1e-3)


class _RecordingMethod(QuantMethod):
    """Calibrating test method: clip ratio learned from the quantized stream, so results depend
    on every earlier layer (a wrong resume would change them)."""
    name = "recording"
    needs_calibration = True
    tracks_quant_inputs = True
    fail_at: int | None = None

    def build_layer(self, index, layer, adapter):
        super().build_layer(index, layer, adapter)
        layer.register_buffer("seen_mean", torch.zeros(()))

    def calibrate_layer(self, layer, ctx):
        if ctx.index == self.fail_at:
            raise RuntimeError("simulated crash")
        layer.seen_mean.fill_(ctx.quant_inputs.mean())
        super().calibrate_layer(layer, ctx)


def test_resume_after_crash_matches_single_run(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (2, 16))
    quant = QuantConfig(4, 8)

    engines = []

    def run(layer_dir, fail_at=None):
        model, adapter = tiny_llama(layers=4)
        method = _RecordingMethod(quant)
        method.fail_at = fail_at
        engines.append(BlockwiseEngine(model, adapter, layer_dir=layer_dir))
        engines[-1].run(method, ids)
        return model, adapter

    single, _ = run(tmp_path / "single")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed", fail_at=2)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["000.safetensors", "001.safetensors"]
    resumed, adapter = run(tmp_path / "resumed")
    assert engines[0].resumed_layers == 0 and engines[-1].resumed_layers == 2  # timings say what ran here
    assert len(engines[-1].group_seconds) == 2
    for a, b in zip(single.state_dict().items(), resumed.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    assert float(adapter.layers[3].seen_mean) != 0.0


class _PairMethod(_RecordingMethod):
    """Joint step over pairs of layers: every member is stamped with its group's quantized-input mean."""
    layers_per_group = 2

    def __init__(self, quant):
        super().__init__(quant)
        self.groups, self.layer_io = [], {}

    def build_layer(self, index, layer, adapter):
        super().build_layer(index, layer, adapter)
        layer.register_buffer("group_mean", torch.zeros(()))

    def calibrate_layer(self, layer, ctx):
        self.layer_io[ctx.index] = (ctx.fp_inputs, ctx.fp_outputs, ctx.quant_inputs)
        super().calibrate_layer(layer, ctx)

    def calibrate_group(self, group, ctx):
        last = ctx.index + len(group.layers) - 1
        assert ctx.fp_inputs is self.layer_io[ctx.index][0] and ctx.quant_inputs is self.layer_io[ctx.index][2]
        assert ctx.fp_outputs is self.layer_io[last][1]  # the FP output of the group's last layer
        self.groups.append((ctx.index, len(group.layers)))
        for layer in group.layers:
            layer.group_mean.fill_(ctx.quant_inputs.mean())


def test_layer_groups_get_a_joint_step_and_resume_as_a_whole(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (2, 16))

    def run(layer_dir, fail_at=None):
        model, adapter = tiny_llama(layers=5)
        method = _PairMethod(QuantConfig(4, 8))
        method.fail_at = fail_at
        BlockwiseEngine(model, adapter, layer_dir=layer_dir).run(method, ids)
        return model, method

    single, method = run(tmp_path / "single")
    assert method.groups == [(0, 2), (2, 2), (4, 1)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed", fail_at=3)  # inside the second group: none of it is saved
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["000.safetensors", "001.safetensors"]
    resumed, method = run(tmp_path / "resumed")
    assert method.groups == [(2, 2), (4, 1)]  # the first group was loaded, not recalibrated
    for a, b in zip(single.state_dict().items(), resumed.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]


def test_calibrating_method_without_data_is_rejected(tiny_llama):
    model, adapter = tiny_llama()
    with pytest.raises(ValueError, match="needs calibration data"):
        BlockwiseEngine(model, adapter).run(_RecordingMethod(QuantConfig()))


def test_quant_linears_lists_all_projections(tiny_llama):
    model, adapter = tiny_llama()
    BlockwiseEngine(model, adapter).run(make_method("rtn", QuantConfig(w_bits=8)))
    assert len(quant_linears(adapter.layers[1])) == 7


def test_activation_storage_uses_the_accelerator_only_when_activations_fit():
    from qllm_core.engine import activation_storage

    gpu = torch.device("cuda", 0)
    assert activation_storage(gpu, need_bytes=10, free_bytes=100) == gpu
    assert activation_storage(gpu, need_bytes=60, free_bytes=100).type == "cpu"  # over half the free memory
    assert activation_storage(torch.device("cpu"), need_bytes=1, free_bytes=None).type == "cpu"


def test_matmul_precision_is_checked_and_restored(tiny_llama):
    """The engine's float32 matmul precision: a name torch knows, set only within the block (None: untouched)."""
    model, adapter = tiny_llama()
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        BlockwiseEngine(model, adapter, "cpu", matmul_precision="tf32")
    before = torch.get_float32_matmul_precision()
    with float32_matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
    with float32_matmul_precision(None):
        assert torch.get_float32_matmul_precision() == before
    assert torch.get_float32_matmul_precision() == before


def _flatquant_run(tiny_llama, concurrent_layers, layer_dir=None, gptq=False):
    model, adapter = tiny_llama(layers=3)
    options = {"epochs": 2, "batch_size": 2, **({"weight_quantizer": "gptq"} if gptq else {})}
    method = make_method("flatquant", QuantConfig(w_bits=4, a_bits=4, kv_bits=4), **options)
    engine = BlockwiseEngine(model, adapter, layer_dir=layer_dir, concurrent_layers=concurrent_layers)
    engine.run(method, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5)))
    return model, engine


def test_concurrent_layers_calibrate_as_one_at_a_time(tiny_llama, tmp_path):
    """FlatQuant's layers trained two at a time (train_blocks, steps alternating) end bit-identical to one
    at a time: each block trains on its own FP inputs. A half-saved window resumes layer by layer."""
    single, single_engine = _flatquant_run(tiny_llama, 1)
    paired, paired_engine = _flatquant_run(tiny_llama, 2, tmp_path / "paired")
    assert len(single_engine.group_seconds) == 3 and len(paired_engine.group_seconds) == 2  # windows [0, 1], [2]
    for (name, a), (_, b) in zip(single.state_dict().items(), paired.state_dict().items()):
        assert torch.equal(a, b), name
    (tmp_path / "paired" / "001.safetensors").unlink()  # as if the run had stopped inside the first window
    resumed, resumed_engine = _flatquant_run(tiny_llama, 2, tmp_path / "paired")
    assert resumed_engine.resumed_layers == 2 and len(resumed_engine.group_seconds) == 1
    for (name, a), (_, b) in zip(single.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_concurrent_layers_only_where_layers_are_independent(tiny_llama):
    from qllm_core.engine import activation_copies, concurrent_window

    flat = make_method("flatquant", QuantConfig(w_bits=4, a_bits=4))
    assert concurrent_window(flat, 4) == 4 and activation_copies(flat, 4) == 5
    # GPTQ weights read the quantized stream; QLLM trains groups of layers jointly: one layer (group) at a time
    assert concurrent_window(make_method("flatquant", QuantConfig(w_bits=4, a_bits=4), weight_quantizer="gptq"), 4) == 1
    assert concurrent_window(make_method("qllm", QuantConfig(w_bits=4, a_bits=4)), 4) == 1
    _, engine = _flatquant_run(tiny_llama, 2, gptq=True)
    assert len(engine.group_seconds) == 3
    model, adapter = tiny_llama()
    with pytest.raises(ValueError, match="concurrent_layers must be >= 1"):
        BlockwiseEngine(model, adapter, concurrent_layers=0)


def test_phase_seconds_say_where_the_time_went(tiny_llama, tmp_path):
    """The engine's wall-time breakdown: every phase a FlatQuant run goes through, the calibration inside it,
    and nothing counted twice (the phases add up to no more than the run)."""
    import time

    start = time.perf_counter()
    _, engine = _flatquant_run(tiny_llama, 2, tmp_path)
    wall = time.perf_counter() - start
    phases = engine.phase_seconds
    assert set(phases) == {"layer0_inputs", "to_device", "fp_outputs", "build", "calibrate", "save", "to_host"}
    assert phases["calibrate"] == max(phases.values()) and sum(phases.values()) <= wall
