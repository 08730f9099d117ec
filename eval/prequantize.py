"""Quantize (and evaluate) a profile's grid into its run directories, spread over the GPUs.

    python -m eval.prequantize --profile paper --grid all --gpus 4 --jobs-per-gpu 1 --evaluate --zeroshot

Each run lands in ``<run-root>/<slug>``, the directory the perplexity notebook looks for; with
``--evaluate`` each worker also measures the run's perplexity on the profile's datasets (stored in
the run directory, :func:`eval.experiments.cached_perplexity`) and merges the rows into
``reports/tables/perplexity.csv`` and ``calibration.csv`` itself (the tables are locked while
written), so a notebook run afterwards only renders. ``--zeroshot`` adds the zero-shot tasks
(:mod:`eval.zeroshot`, the profile's subset per task, cached in the run directory too), whose rows
go into ``reports/tables/zeroshot.csv`` after *each task*: a run stopped part-way (a GPU call's
deadline) keeps every task it finished. Finished runs are skipped and interrupted ones resume
(per-layer checkpoints).

Each worker gets an equal share of the CPU cores this process may run on (its affinity:
``taskset`` narrows it, as ``scripts/gpu_session.sh`` does for jobs sharing a machine) as torch
threads: more threads than cores starve the host side of every process (on a 32-core H200 host, 94
torch threads over four jobs are the likely cause of a several-fold slowdown of launch- and sync-bound
GPU work; ``reports/bench/gpu_session_2xH200.json``).

``--jobs-per-gpu`` runs share each GPU, and every run records that number (``jobs`` in the
calibration table), because the wall time of a run includes the sharing. Every run gets a fresh
process (its peak GPU memory is its own) that takes a free GPU slot and gives it back
(:mod:`eval.isolated`). With the fast training loop (qllm_core.training) a run keeps one GPU busy, so
``--jobs-per-gpu 1`` gives each run a GPU of its own and the timings of a run alone.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from qllm_core.gpu_monitor import cap_gpu_memory
from qllm_core.models import display_name
from qllm_core.runs import is_run_dir, read_run

from .experiments import FP_METHOD, Experiment, ensure_run, experiment_rows
from .isolated import run_isolated
from .profiles import get_profile
from .reports import CALIBRATION_COLUMNS, CALIBRATION_KEYS, PERPLEXITY_COLUMNS, ZEROSHOT_COLUMNS, upsert_rows
from .zeroshot import TASKS, experiment_zero_shot

REPORTS = Path(__file__).resolve().parents[1] / "reports"
# Start order, by report method: FP first (its rows are the reference of every table's averages and it needs no
# calibration), then the rest longest first, so the slowest runs start at once and the short ones fill the
# slots they free. The order follows the paper runs' calibration times on the H100 (reports/tables/
# calibration.csv): OmniQuant > QLLM with error correction > FlatQuant > QuaRot+GPTQ > GPTQ > QLLM's reassembly
# alone > QuaRot > SmoothQuant > RTN. (By method alone, QLLM's three short reassembly-only runs took slots
# before its error-correction runs: in the stop-23 grid those were still waiting at the deadline.)
_START_ORDER = [FP_METHOD, "omniquant", "qllm", "flatquant", "quarot-gptq", "gptq", "qllm-reassembly", "quarot",
                "smoothquant", "rtn", "rtn-asym"]
GPU_SHARE_USED = 0.9


def pending(experiments: list[Experiment], run_root: Path, evaluate: bool) -> list[Experiment]:
    """The experiments that still need a run (FP only when evaluating), longest first."""
    def done(e: Experiment) -> bool:
        run_dir = run_root / e.slug()
        return e.method == FP_METHOD or (is_run_dir(run_dir) and read_run(run_dir).get("status") == "complete")
    todo = [e for e in experiments if evaluate or not done(e)]
    rank = {method: position for position, method in enumerate(_START_ORDER)}
    return sorted(todo, key=lambda e: rank.get(e.report_method, len(rank)))


def _run(profile_name: str, model: str | None, device: str | None, exp: Experiment, run_root: str, data_dir,
         jobs: int, threads: int, evaluate: bool, zeroshot_batch: int | None, tables: Path,
         calib_overrides: dict | None = None):
    """Make (and evaluate) one run: ``(exp, took)``. Evaluating, the rows go into the ``tables`` as they
    come — perplexity and calibration when the perplexities are in, zero-shot after each task — so a
    run stopped part-way keeps what it finished. ``zeroshot_batch``: lm-eval's batch size, or None for
    no zero-shot evaluation. ``calib_overrides``: fields of the profile's CalibConfig to replace (how the
    calibration runs: concurrent_layers, compile_quantizers)."""
    import torch

    torch.set_num_threads(threads)
    profile = get_profile(profile_name, model=model, device=device)
    share_gpu(profile.device, jobs)
    if calib_overrides:
        profile = replace(profile, calib=replace(profile.calib, **calib_overrides))
    start = time.time()
    if not evaluate:
        ensure_run(profile.model, exp, Path(run_root) / exp.slug(), profile.calib, profile.device, data_dir, jobs)
        return exp, f"{time.time() - start:.0f} s"
    ppl_rows, calib_rows = experiment_rows(profile.model, exp, list(profile.datasets), profile.max_windows,
                                           profile.calib, run_root, profile.device, profile.name, data_dir,
                                           concurrent_jobs=jobs)
    upsert_rows(tables / "perplexity.csv", ppl_rows, PERPLEXITY_COLUMNS)
    if calib_rows:
        upsert_rows(tables / "calibration.csv", calib_rows, CALIBRATION_COLUMNS, keys=CALIBRATION_KEYS)
    if zeroshot_batch is not None:
        experiment_zero_shot(profile.model, exp, list(TASKS), profile.zeroshot_subset, profile.calib, run_root,
                             profile.device, profile.name, data_dir, zeroshot_batch, jobs,
                             on_task=lambda rows: upsert_rows(tables / "zeroshot.csv", rows, ZEROSHOT_COLUMNS))
    return exp, f"{time.time() - start:.0f} s"


def share_gpu(device: str, jobs: int) -> None:
    """With ``jobs`` runs on one GPU, cap each run's process at an equal share of its memory
    (:func:`qllm_core.gpu_monitor.cap_gpu_memory`: without it, cached blocks one run no longer used made the
    others run out). ``GPU_SHARE_USED`` of the memory is shared out; the rest stays for what the caps do not
    count (each process's CUDA context, an MPS server)."""
    if jobs > 1 and device.startswith("cuda"):
        cap_gpu_memory(device, GPU_SHARE_USED / jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.prequantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--grid", default="all", choices=["core", "extra", "all"])
    parser.add_argument("--only-methods", nargs="*", help="report method names to keep (default: all)")
    parser.add_argument("--only-runs", nargs="*", help="run names (slugs, e.g. flatquant-W4A4KV4-s) to keep")
    parser.add_argument("--model", help="override the profile's model")
    parser.add_argument("--device", help="override the profile's device")
    parser.add_argument("--run-root", default="runs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible; none on a CPU)")
    parser.add_argument("--jobs-per-gpu", type=int, default=1,
                        help="runs at once on each GPU (or on the CPU); on a GPU their kernels overlap only under "
                             "CUDA MPS (nvidia-cuda-mps-control -d; scripts/gpu_session.sh MPS=1), else they "
                             "time-slice it")
    parser.add_argument("--evaluate", action="store_true", help="also evaluate each run and merge the table rows")
    parser.add_argument("--zeroshot", action="store_true",
                        help="with --evaluate: also the zero-shot tasks (the profile's subset per task)")
    parser.add_argument("--zeroshot-batch-size", type=int, default=32, help="lm-eval batch size")
    parser.add_argument("--missing-only", action="store_true",
                        help="skip experiments whose rows (every dataset; every task with --zeroshot) are already "
                             "in the tables")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=JSON",
                        help="override a method option for this call's runs (their run directories differ), "
                             "e.g. qllm.epochs=1")
    parser.add_argument("--concurrent-layers", type=int, default=None,
                        help="layers a run calibrates at once where its method allows (FlatQuant with RTN weights; "
                             "default: the profile's); same results, in the calibration table's concurrent_layers column")
    parser.add_argument("--compile-quantizers", action=argparse.BooleanOptionalAction, default=None,
                        help="on a GPU, compile trained methods' fake quantizers (default: the profile's); "
                             "in the calibration table's trainer column")
    parser.add_argument("--reports-dir", default=str(REPORTS))
    args = parser.parse_args(argv)
    if args.jobs_per_gpu < 1 or (args.concurrent_layers is not None and args.concurrent_layers < 1):
        raise SystemExit("--jobs-per-gpu and --concurrent-layers must be >= 1")
    if args.zeroshot and not args.evaluate:
        raise SystemExit("--zeroshot needs --evaluate (it evaluates the runs)")
    profile = get_profile(args.profile, model=args.model, device=args.device)
    experiments = profile.grid(args.grid)
    if args.only_methods:
        experiments = [e for e in experiments if e.report_method in args.only_methods]
    if args.only_runs:
        unknown = sorted(set(args.only_runs) - {e.slug() for e in experiments})
        if unknown:
            raise SystemExit(f"--only-runs: no run {unknown} in the {args.grid} grid of profile {args.profile}")
        experiments = [e for e in experiments if e.slug() in args.only_runs]
    experiments = [with_options(e, args.set) for e in experiments]
    tables = Path(args.reports_dir) / "tables"
    if args.missing_only:
        experiments = [e for e in experiments if not (reported(tables / "perplexity.csv", profile, e) and (
            not args.zeroshot or zero_shot_reported(tables / "zeroshot.csv", profile, e)))]
    todo = pending(experiments, Path(args.run_root), args.evaluate)
    gpus = _gpu_count(profile.device) if args.gpus is None else args.gpus
    workers = max(gpus, 1) * args.jobs_per_gpu
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    print(f"{len(todo)} runs to make with {workers} workers on {gpus or 'no'} GPU(s) "
          f"({args.jobs_per_gpu} per device, {threads} CPU threads each)", flush=True)
    slots = gpu_slots(workers, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    overrides = {name: value for name, value in (("concurrent_layers", args.concurrent_layers),
                                                   ("compile_quantizers", args.compile_quantizers)) if value is not None}
    calls = [(args.profile, args.model, args.device, e, args.run_root, args.data_dir, args.jobs_per_gpu, threads,
              args.evaluate, args.zeroshot_batch_size if args.zeroshot else None, tables, overrides)
             for e in todo]
    failures = 0
    # a fresh process per run (CUDA cannot be shared with forked workers: spawn)
    for index, result, error in run_isolated(_run, calls, slots, multiprocessing.get_context("spawn")):
        if error is not None:  # report every failed run, keep the others going
            failures += 1
            print(f"{todo[index].slug()}: FAILED: {error!r}", file=sys.stderr, flush=True)
            continue
        exp, took = result
        print(f"{exp.slug()}: {took}", flush=True)
    return 1 if failures else 0


def with_options(exp: Experiment, settings: list[str]) -> Experiment:
    """``exp`` with the ``METHOD.OPTION=JSON`` settings of its method applied to its options."""
    options = dict(exp.options)
    for item in settings:
        target, sep, value = item.partition("=")
        method, dot, option = target.partition(".")
        if not (sep and dot and method and option):
            raise SystemExit(f"--set expects METHOD.OPTION=JSON, got {item!r}")
        if method == exp.method:
            options[option] = json.loads(value)
    return replace(exp, options=options)


def _rows_of(table_path: Path, profile, exp: Experiment) -> pd.DataFrame | None:
    """``exp``'s rows of ``profile`` in a report table (None when the table does not exist)."""
    if not table_path.is_file():
        return None
    table = pd.read_csv(table_path, keep_default_na=False, dtype=str)
    return table[(table.profile == profile.name) & (table.model == display_name(profile.model))
                 & (table.method == exp.report_method) & (table.w_bits == str(exp.quant.w_bits))
                 & (table.a_bits == str(exp.quant.a_bits)) & (table.kv_bits == str(exp.quant.kv_bits))]


def reported(table_path: Path, profile, exp: Experiment) -> bool:
    """Whether the perplexity table has ``exp``'s rows on every dataset of ``profile``."""
    rows = _rows_of(table_path, profile, exp)
    return rows is not None and set(profile.datasets) <= set(rows.dataset)


def zero_shot_reported(table_path: Path, profile, exp: Experiment) -> bool:
    """Whether the zero-shot table has ``exp``'s rows on every task at the profile's subset size."""
    rows = _rows_of(table_path, profile, exp)
    return rows is not None and set(TASKS) <= set(rows[rows.limit == str(profile.zeroshot_subset or "all")].task)


def gpu_slots(workers: int, gpus: int, visible: str | None) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each worker slot: ``workers`` slots spread round-robin over the
    first ``gpus`` devices *this* process sees. A worker's setting replaces its parent's list, so a slot
    names the device the parent's list names (``visible``), not its index in that list: with
    ``CUDA_VISIBLE_DEVICES=1,2`` slot 0 is device 1. (Naming the index put a job given GPUs 1 and 2 on
    GPUs 0 and 1, next to another job; reports/bench/gpu_session_4xH200.json.) None: no GPU."""
    if not gpus:
        return [None] * workers
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpus)]
    if len(devices) < gpus:
        raise ValueError(f"{gpus} GPUs asked for but CUDA_VISIBLE_DEVICES={visible!r} names {len(devices)}")
    return [devices[slot % gpus] for slot in range(workers)]


def _gpu_count(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
