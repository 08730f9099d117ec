"""Model loading, family adapters, and quantized run directories (save, reload, resume guard)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qllm_core.adapters import ModelAdapter, UnsupportedModelError
from qllm_core.methods import QuantConfig, make_method
from qllm_core.models import ModelNotFoundError, load_model
from qllm_core.runs import CalibConfig, load_run, quantize_to_run


def test_unknown_family_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        ModelAdapter(model)


def test_adapter_reports_gqa_shapes(tiny_llama):
    _, adapter = tiny_llama(hidden=64, heads=4, kv_heads=2)
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.linear(adapter.layers[0], "k_proj").out_features == 32
    with pytest.raises(KeyError, match="unknown linear role"):
        adapter.linear(adapter.layers[0], "qkv_proj")


def test_missing_model_paths_raise_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_method_and_bits():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_method("nope", QuantConfig())
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(w_bits=1)


def test_run_directory_round_trip(tiny_model_dir, tmp_path):
    quant = QuantConfig(4, 4, 4)
    loaded = quantize_to_run(str(tiny_model_dir), "rtn", quant, tmp_path / "run")
    ids = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        expected = loaded.model(ids).logits
        reloaded, record = load_run(tmp_path / "run")
        assert record["status"] == "complete" and record["quant"]["w_bits"] == 4
        assert torch.equal(reloaded.model(ids).logits, expected)
    with pytest.raises(ValueError, match="holds a different run"):
        quantize_to_run(str(tiny_model_dir), "rtn", QuantConfig(8, 8), tmp_path / "run", CalibConfig())


def test_embedded_model_is_llama(embedded):
    assert embedded.adapter.family == "llama" and len(embedded.adapter.layers) == 30
    assert embedded.adapter.num_kv_heads == 3 and embedded.name == "SmolLM2-135M-Instruct"


def test_a_non_default_matmul_precision_is_part_of_the_run(tiny_model_dir, data_dir, tmp_path):
    """TF32 passes ("high") are recorded in run.json, so the run cannot be resumed as an IEEE float32 one;
    the default stays out of the record (runs written before the option still resume)."""
    calib = CalibConfig("ptb", nsamples=2, seqlen=16, matmul_precision="high")
    quantize_to_run(str(tiny_model_dir), "smoothquant", QuantConfig(8, 8), tmp_path / "tf32", calib, data_dir=data_dir)
    assert load_run(tmp_path / "tf32")[1]["calibration"]["matmul_precision"] == "high"
    with pytest.raises(ValueError, match="holds a different run"):
        quantize_to_run(str(tiny_model_dir), "smoothquant", QuantConfig(8, 8), tmp_path / "tf32",
                        CalibConfig("ptb", nsamples=2, seqlen=16), data_dir=data_dir)
    quantize_to_run(str(tiny_model_dir), "smoothquant", QuantConfig(8, 8), tmp_path / "ieee",
                    CalibConfig("ptb", nsamples=2, seqlen=16), data_dir=data_dir)
    assert "matmul_precision" not in load_run(tmp_path / "ieee")[1]["calibration"]


def test_concurrent_layers_are_a_timing_not_part_of_the_run(tiny_model_dir, data_dir, tmp_path):
    """Layers calibrated at once give the same run (tests/test_engine.py): a run made with one value resumes
    with another, and the timings record the value the engine used (1 for a method that walks groups)."""
    calib = CalibConfig("ptb", nsamples=2, seqlen=16, concurrent_layers=2)
    quantize_to_run(str(tiny_model_dir), "flatquant", QuantConfig(4, 4), tmp_path / "flat", calib, data_dir=data_dir,
                    method_options={"epochs": 1, "batch_size": 1})
    record = load_run(tmp_path / "flat")[1]
    assert "concurrent_layers" not in record["calibration"] and record["stats"]["concurrent_layers"] == 2
    assert record["stats"]["phase_seconds"]["calibrate"] > 0  # the engine's breakdown, kept with the run
    method_phases = record["stats"]["method_phase_seconds"]  # and FlatQuant's of its calibrate phase
    assert set(method_phases) == {"setup", "train", "capture", "finish"} and method_phases["capture"] == 0  # CPU
    assert sum(method_phases.values()) <= record["stats"]["phase_seconds"]["calibrate"] + 1e-3
    quantize_to_run(str(tiny_model_dir), "flatquant", QuantConfig(4, 4), tmp_path / "flat",
                    CalibConfig("ptb", nsamples=2, seqlen=16), data_dir=data_dir,
                    method_options={"epochs": 1, "batch_size": 1})  # the same run: no "holds a different run"
    quantize_to_run(str(tiny_model_dir), "smoothquant", QuantConfig(8, 8), tmp_path / "smooth", calib,
                    data_dir=data_dir)
    assert load_run(tmp_path / "smooth")[1]["stats"]["concurrent_layers"] == 1


def test_compiled_quantizers_are_how_a_run_trains_not_part_of_it(tiny_model_dir, data_dir, tmp_path):
    """compile_quantizers changes how a trained method's steps run (on a GPU), not the run: it stays out of the
    run's identity, and the stats say how the steps ran ("eager" on the CPU, where there is nothing to compile;
    "-" for a method that trains nothing)."""
    calib = CalibConfig("ptb", nsamples=2, seqlen=16, compile_quantizers=True)
    options = {"epochs": 1, "batch_size": 1}
    quantize_to_run(str(tiny_model_dir), "flatquant", QuantConfig(4, 4), tmp_path / "flat", calib, data_dir=data_dir,
                    method_options=options)
    record = load_run(tmp_path / "flat")[1]
    assert "compile_quantizers" not in record["calibration"] and record["stats"]["trainer"] == "eager"
    quantize_to_run(str(tiny_model_dir), "flatquant", QuantConfig(4, 4), tmp_path / "flat",
                    CalibConfig("ptb", nsamples=2, seqlen=16), data_dir=data_dir, method_options=options)
    quantize_to_run(str(tiny_model_dir), "smoothquant", QuantConfig(8, 8), tmp_path / "smooth", calib,
                    data_dir=data_dir)
    assert load_run(tmp_path / "smooth")[1]["stats"]["trainer"] == "-"
