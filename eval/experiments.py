"""Run a grid of (method, bit widths) configurations and turn results into report rows.

This is the logic behind ``notebooks/perplexity.ipynb`` and the CLI: each quantized
configuration is stored as a run directory under ``run_root`` (so a re-run reuses finished
runs and resumes interrupted ones), then evaluated on each dataset.
"""
from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qllm_core.methods import QuantConfig
from qllm_core.models import load_model
from qllm_core.runs import CalibConfig, is_run_dir, load_run, quantize_to_run, read_run

from .perplexity import perplexity

FP_METHOD = "fp"


@dataclass(frozen=True)
class Experiment:
    """One row group of the report: a method at given bit widths (``method='fp'``: no quantization)."""

    method: str
    quant: QuantConfig = QuantConfig()
    options: dict = field(default_factory=dict)
    label: str | None = None  # report name of the method (default: ``method``)

    @property
    def report_method(self) -> str:
        return self.label or self.method

    def slug(self) -> str:
        opts = "-".join(f"{k}{v}" for k, v in sorted(self.options.items()))
        raw = f"{self.method}-{self.quant.label}-{'a' if self.quant.a_asym else 's'}{'-' + opts if opts else ''}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def device_label(device: str | torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def ensure_run(model_spec: str, exp: Experiment, run_dir: Path, calib: CalibConfig, device: str, data_dir=None,
               concurrent_jobs: int = 1) -> dict:
    """The record of ``exp``'s complete run in ``run_dir``, quantizing (or resuming) it first if needed
    (``concurrent_jobs``: runs sharing the device meanwhile, recorded with the timings)."""
    if not (is_run_dir(run_dir) and read_run(run_dir).get("status") == "complete"):
        quantize_to_run(model_spec, exp.method, exp.quant, run_dir, calib, device, data_dir, exp.options,
                        concurrent_jobs)
    return read_run(run_dir)


def build_model(model_spec: str, exp: Experiment, run_root: Path, calib: CalibConfig, device: str, data_dir=None):
    """``(model, run record)`` for ``exp``: FP (record None), or its finished (made if needed) run."""
    if exp.method == FP_METHOD:
        return load_model(model_spec), None
    ensure_run(model_spec, exp, run_root / exp.slug(), calib, device, data_dir)
    return load_run(run_root / exp.slug())


def cached_json(path: Path, compute) -> dict:
    """The JSON result stored at ``path``, or ``compute()``'s, stored there first (a run's ``eval/`` cache)."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def lazy_model(model_spec: str, exp: Experiment, run_dir: Path):
    """A function returning ``exp``'s LoadedModel (FP or its run), loaded at most once and only when called,
    so a re-run whose results are all cached loads no model at all."""
    box = {}

    def model_fn():
        if "loaded" not in box:
            box["loaded"] = load_model(model_spec) if exp.method == FP_METHOD else load_run(run_dir)[0]
        return box["loaded"]
    return model_fn


def eval_windows_per_forward(device: str | torch.device) -> int:
    """Windows per forward when measuring perplexity: 4 on a GPU, 1 elsewhere.

    A fake-quantized model's forward is thousands of small kernels; on a GPU one window per forward
    (~140 ms per 2048-token window of the embedded model at W4A4KV4 on an H100, ~7 it/s in
    reports/bench/gpu_session_H100_stop23.json's alone run) is kernel-launch bound, so several windows share
    each launch (per-token quantizers: the same arithmetic, up to the matmuls' batch-dependent rounding).
    The CPU keeps one window per forward, so the smoke rows stay those already reported.
    """
    return 4 if torch.device(device).type == "cuda" else 1


def cached_perplexity(run_dir: Path, model_fn, dataset: str, seqlen: int, max_windows: int | None, device: str,
                      data_dir=None) -> dict:
    """Perplexity of a run (or FP) on ``dataset``, stored in ``<run_dir>/eval/`` and reused afterwards.

    ``model_fn()`` returns the LoadedModel; it is called only when the result is not stored yet, so
    a notebook re-run after ``eval.prequantize --evaluate`` loads no model at all.
    """
    def compute() -> dict:
        loaded = model_fn()
        result = perplexity(loaded.model, loaded.tokenizer, dataset, seqlen, max_windows,
                            eval_windows_per_forward(device), device, data_dir)
        return {**result, "device": device_label(device), "model": loaded.name}
    return cached_json(run_dir / "eval" / f"ppl-{dataset}-{seqlen}-{max_windows or 'all'}.json", compute)


def calibration_row(common: dict, record: dict | None) -> dict | None:
    """The calibration table's row of a finished run (wall time, per-layer time, GPU use), if calibrated.

    A run resumed from per-layer checkpoints has no whole-calibration wall time ("-"); its seconds per
    layer come from the layers it calibrated itself.
    """
    stats, calibration = (record or {}).get("stats"), (record or {}).get("calibration")
    if not stats or not calibration:
        return None
    groups = stats.get("group_seconds") or []
    # a timed group is a layer group or a window of layers calibrated at once (never both, qllm_core.engine)
    concurrent = stats.get("concurrent_layers", 1)
    per_layer = statistics.median(groups) / max(stats.get("layers_per_group", 1), concurrent) if groups else None
    busy = stats.get("gpu_busy_share")
    return {**common, "calib_seconds": "-" if stats.get("resumed_layers") else stats["calib_seconds"],
            "seconds_per_layer": "-" if per_layer is None else round(per_layer, 3),
            "gpu_busy_share": "-" if busy is None else busy, "peak_gpu_mem_gib": stats.get("peak_gpu_mem_gib", "-"),
            "peak_gpu_reserved_gib": stats.get("peak_gpu_reserved_gib", "-"),
            "jobs": stats.get("concurrent_jobs", 1), "concurrent_layers": concurrent,
            "trainer": stats.get("trainer", "-"),
            "device": device_label(stats["device"])}


def experiment_columns(exp: Experiment, record: dict | None, model_name: str, profile: str) -> dict:
    """The columns every report row of ``exp`` starts with (model, method, bits, calibration, profile)."""
    calibration = (record or {}).get("calibration") or {}
    return {"model": model_name, "method": exp.report_method, "w_bits": exp.quant.w_bits,
            "a_bits": exp.quant.a_bits, "kv_bits": exp.quant.kv_bits, "calib_data": calibration.get("dataset", "-"),
            "calib_samples": calibration.get("nsamples", 0), "calib_seqlen": calibration.get("seqlen", 0),
            "profile": profile}


def experiment_rows(model_spec: str, exp: Experiment, datasets: list[str], max_windows: int | None, calib: CalibConfig,
                    run_root: str | Path, device: str = "cpu", profile: str = "smoke", data_dir=None,
                    seqlen: int = 2048, concurrent_jobs: int = 1) -> tuple[list[dict], list[dict]]:
    """(perplexity rows, calibration rows) of one experiment, quantizing it first if needed."""
    run_dir = Path(run_root) / exp.slug()
    record = None if exp.method == FP_METHOD else ensure_run(model_spec, exp, run_dir, calib, device, data_dir,
                                                               concurrent_jobs)
    model_fn = lazy_model(model_spec, exp, run_dir)
    results = {d: cached_perplexity(run_dir, model_fn, d, seqlen, max_windows, device, data_dir) for d in datasets}
    common = experiment_columns(exp, record, record["model_name"] if record else next(iter(results.values()))["model"],
                                profile)
    ppl_rows = [{**common, "dataset": d, "windows": r["windows"], "ppl": r["ppl"], "device": r["device"]}
                for d, r in results.items()]
    calib_row = calibration_row(common, record)
    return ppl_rows, [calib_row] if calib_row else []


def perplexity_rows(model_spec: str, experiments: list[Experiment], datasets: list[str], max_windows: int | None,
                    calib: CalibConfig, run_root: str | Path, device: str = "cpu", profile: str = "smoke",
                    data_dir=None, seqlen: int = 2048) -> Iterator[tuple[list[dict], list[dict]]]:
    """Evaluate each experiment on every dataset, yielding (perplexity rows, calibration rows) per
    experiment, so callers can save results as they come (a crash keeps the finished ones)."""
    for exp in experiments:
        yield experiment_rows(model_spec, exp, datasets, max_windows, calib, run_root, device, profile, data_dir,
                              seqlen)
