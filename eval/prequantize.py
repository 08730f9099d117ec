"""Quantize a profile's grid into its run directories, several runs side by side.

    python -m eval.prequantize --profile paper --grid all --jobs 6 --run-root runs

Why: the embedded model's layers are small, so one calibration leaves an H100 mostly idle (each
training step is many small kernels, and their launches set the pace, not the arithmetic). Runs
in separate worker processes overlap on one GPU. Each run lands in ``<run-root>/<slug>``, the
directory the perplexity notebook looks for, so a notebook run afterwards only evaluates.
Finished runs are skipped and interrupted ones resume (per-layer checkpoints). Calibration times
measured this way include the sharing: every run records ``concurrent_jobs`` in its ``run.json``
stats and the calibration table says so.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from qllm_core.runs import is_run_dir, quantize_to_run, read_run

from .experiments import FP_METHOD, Experiment
from .profiles import get_profile

# Rough cost order (longest first), so the slowest runs start at once.
_COST = {"flatquant": 0, "omniquant": 1, "qllm": 2, "gptq": 3, "quarot": 4, "smoothquant": 5, "rtn": 6}


def pending(experiments: list[Experiment], run_root: Path) -> list[Experiment]:
    """The experiments that still need a run (FP needs none), longest first."""
    todo = [e for e in experiments if e.method != FP_METHOD and not (
        is_run_dir(run_root / e.slug()) and read_run(run_root / e.slug()).get("status") == "complete")]
    return sorted(todo, key=lambda e: _COST.get(e.method, len(_COST)))


def _quantize(model: str, exp: Experiment, run_root: str, calib, device: str, data_dir, jobs: int, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    start = time.time()
    quantize_to_run(model, exp.method, exp.quant, Path(run_root) / exp.slug(), calib, device, data_dir, exp.options,
                    concurrent_jobs=jobs)
    return f"{exp.slug()}: {time.time() - start:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.prequantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--grid", default="all", choices=["core", "extra", "all"])
    parser.add_argument("--only-methods", nargs="*", help="report method names to keep (default: all)")
    parser.add_argument("--model", help="override the profile's model")
    parser.add_argument("--device", help="override the profile's device")
    parser.add_argument("--run-root", default="runs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--jobs", type=int, default=4, help="runs at once (worker processes)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    profile = get_profile(args.profile, model=args.model, device=args.device)
    experiments = profile.grid(args.grid)
    if args.only_methods:
        experiments = [e for e in experiments if e.report_method in args.only_methods]
    todo = pending(experiments, Path(args.run_root))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(todo)} runs to make with {args.jobs} workers ({threads} CPU threads each)", flush=True)
    failures = 0
    context = multiprocessing.get_context("spawn")  # CUDA cannot be shared with forked workers
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(_quantize, profile.model, e, args.run_root, profile.calib, profile.device,
                               args.data_dir, args.jobs, threads): e for e in todo}
        for future in as_completed(futures):
            try:
                print(future.result(), flush=True)
            except Exception as err:  # report every failed run, keep the others going
                failures += 1
                print(f"{futures[future].slug()}: FAILED: {err!r}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
