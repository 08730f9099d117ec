"""Quantized run directories: quantize a model into one, resume it, load it back.

Layout::

    <run_dir>/run.json              # model spec, method + options, quant config, calibration, status
    <run_dir>/layers/NNN.safetensors  # each decoder layer's state after quantization

A run is rebuilt by loading the base model, re-applying the method's deterministic structure
(``prepare_model`` + ``build_layer``) and loading each layer's saved state, so a reviewer can
evaluate without recalibrating. The per-layer files double as the engine's resume checkpoints.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .data import calibration_windows, default_calibration_dataset
from .engine import BlockwiseEngine, load_layer_state
from .gpu_monitor import PeakMemory, UtilizationSampler
from .methods import QuantConfig, make_method
from .models import LoadedModel, load_model
from .training import trainer_label

RUN_FILE = "run.json"


@dataclass(frozen=True)
class CalibConfig:
    dataset: str | None = None  # None: WikiText-2 train if available, else PTB train (offline)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1
    matmul_precision: str = "highest"  # the engine's float32 matmul precision on a GPU (BlockwiseEngine)
    # layers calibrated at once where the method allows (BlockwiseEngine): same results, so not part of a run's
    # identity (a run may resume with another value); recorded with the run's timings
    concurrent_layers: int = 1
    # on a GPU, trained methods' fake quantizers compiled (qllm_core.training: ~40% fewer kernels per step);
    # how the steps run, not what they compute (the same function, to rounding: tests), so like
    # concurrent_layers not part of a run's identity; recorded as the run's trainer
    compile_quantizers: bool = False


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def quantize_to_run(
    model_spec: str, method: str, quant: QuantConfig, run_dir: str | Path, calib: CalibConfig = CalibConfig(),
    device: str = "cpu", data_dir=None, method_options: dict | None = None, concurrent_jobs: int = 1,
) -> LoadedModel:
    """Quantize ``model_spec`` with ``method`` into ``run_dir`` (resuming a partial run there).

    ``concurrent_jobs``: how many runs share the device meanwhile (recorded with the wall time).
    """
    run_dir = Path(run_dir)
    qmethod = make_method(method, quant, **(method_options or {}))
    loaded = load_model(model_spec)
    calib_ids, calib_record = None, None
    if qmethod.needs_calibration:
        dataset = calib.dataset or default_calibration_dataset(data_dir)
        calib = replace(calib, dataset=dataset)
        calib_ids = calibration_windows(loaded.tokenizer, dataset, calib.nsamples, calib.seqlen, calib.seed, data_dir)
        calib_record = asdict(calib)
        del calib_record["concurrent_layers"], calib_record["compile_quantizers"]
        if calib.matmul_precision == "highest":  # the default stays out of the record: earlier runs still resume
            del calib_record["matmul_precision"]
    record = {"model": model_spec, "model_name": loaded.name, **qmethod.config(), "calibration": calib_record}
    existing = run_dir / RUN_FILE
    if existing.is_file():
        previous = json.loads(existing.read_text())
        same = {k: previous.get(k) for k in record} == record
        if not same:
            raise ValueError(f"{run_dir} holds a different run ({previous.get('method')}, {previous.get('quant')}); "
                             "use another directory or delete it")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(existing, {**record, "status": "running"})
    on_gpu = torch.device(device).type == "cuda"
    compiled = on_gpu and calib.compile_quantizers  # there is nothing to compile on the CPU
    if compiled:
        qmethod.trainer = {"compile_quantizers": True}
    engine = BlockwiseEngine(loaded.model, loaded.adapter, device, run_dir / "layers", calib.batch_size,
                             calib.matmul_precision, calib.concurrent_layers)
    start = time.time()
    with UtilizationSampler(device) as busy, PeakMemory(device) as peak:
        engine.run(qmethod, calib_ids)
    stats = {"calib_seconds": round(time.time() - start, 2), "device": str(device), "concurrent_jobs": concurrent_jobs,
             "layers_per_group": qmethod.layers_per_group,
             "concurrent_layers": engine.layers_at_once,
             "trainer": trainer_label(qmethod.trains, on_gpu, compiled),
             "group_seconds": [round(t, 3) for t in engine.group_seconds], "resumed_layers": engine.resumed_layers,
             "phase_seconds": _rounded(engine.phase_seconds)}
    if getattr(qmethod, "phase_seconds", None):  # the method's own breakdown of its calibrate phase (FlatQuant)
        stats["method_phase_seconds"] = _rounded(qmethod.phase_seconds)
    if on_gpu:
        stats["peak_gpu_mem_gib"] = round(peak.peak / 2**30, 3)
        stats["peak_gpu_reserved_gib"] = round(peak.peak_reserved / 2**30, 3)
        stats["gpu_busy_share"] = None if busy.mean is None else round(busy.mean, 3)
    _write_json(existing, {**record, "status": "complete", "stats": stats})
    return loaded


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in seconds.items()}


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a run directory (no {RUN_FILE}): {run_dir}")
    return json.loads(path.read_text())


def load_run(run_dir: str | Path) -> tuple[LoadedModel, dict]:
    """Rebuild a quantized model from a complete run directory."""
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    if record.get("status") != "complete":
        raise ValueError(f"run {run_dir} is not complete (status {record.get('status')!r}); re-run quantize to resume")
    qmethod = make_method(record["method"], QuantConfig(**record["quant"]), **record["options"])
    loaded = load_model(record["model"])
    qmethod.prepare_model(loaded.model, loaded.adapter)
    for index, layer in enumerate(loaded.adapter.layers):
        qmethod.build_layer(index, layer, loaded.adapter)
        load_layer_state(layer, run_dir / "layers" / f"{index:03d}.safetensors")
    return loaded, record
