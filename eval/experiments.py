"""Run a grid of (method, bit widths) configurations and turn results into report rows.

This is the logic behind ``notebooks/perplexity.ipynb`` and the CLI: each quantized
configuration is stored as a run directory under ``run_root`` (so a re-run reuses finished
runs and resumes interrupted ones), then evaluated on each dataset.
"""
from __future__ import annotations

import re
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


def build_model(model_spec: str, exp: Experiment, run_root: Path, calib: CalibConfig, device: str, data_dir=None):
    """The model for ``exp``: FP, a finished run from ``run_root``, or a fresh (resumed) quantization."""
    if exp.method == FP_METHOD:
        return load_model(model_spec), None
    run_dir = run_root / exp.slug()
    if is_run_dir(run_dir) and read_run(run_dir).get("status") == "complete":
        return load_run(run_dir)
    quantize_to_run(model_spec, exp.method, exp.quant, run_dir, calib, device, data_dir, exp.options)
    return load_run(run_dir)


def perplexity_rows(model_spec: str, experiments: list[Experiment], datasets: list[str], max_windows: int | None,
                    calib: CalibConfig, run_root: str | Path, device: str = "cpu", profile: str = "smoke",
                    data_dir=None, seqlen: int = 2048, batch_size: int = 1) -> Iterator[tuple[list[dict], list[dict]]]:
    """Evaluate each experiment on every dataset, yielding (perplexity rows, calibration rows) per
    experiment, so callers can save results as they come (a crash keeps the finished ones)."""
    for exp in experiments:
        loaded, record = build_model(model_spec, exp, Path(run_root), calib, device, data_dir)
        calibration = (record or {}).get("calibration") or {}
        common = {
            "model": loaded.name, "method": exp.report_method, "w_bits": exp.quant.w_bits,
            "a_bits": exp.quant.a_bits, "kv_bits": exp.quant.kv_bits,
            "calib_data": calibration.get("dataset", "-"), "calib_samples": calibration.get("nsamples", 0),
            "calib_seqlen": calibration.get("seqlen", 0), "profile": profile, "device": device_label(device),
        }
        ppl_rows = []
        for dataset in datasets:
            result = perplexity(loaded.model, loaded.tokenizer, dataset, seqlen, max_windows, batch_size, device, data_dir)
            ppl_rows.append({**common, "dataset": dataset, "windows": result["windows"], "ppl": result["ppl"]})
        stats = (record or {}).get("stats")
        calib_rows = []
        if stats and calibration:
            calib_device = device_label(stats["device"])
            if stats.get("concurrent_jobs", 1) > 1:  # eval.prequantize: the wall time includes the sharing
                calib_device += f" (shared by {stats['concurrent_jobs']} runs)"
            calib_rows.append({**common, "calib_seconds": stats["calib_seconds"],
                               "peak_gpu_mem_gib": stats.get("peak_gpu_mem_gib", "-"), "device": calib_device})
        del loaded
        yield ppl_rows, calib_rows
