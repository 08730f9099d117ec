"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness itself, on any model the harness builds.

The model (FP, a fake-quant run, a run on the Triton kernels) is wrapped in lm-eval's ``HFLM`` and
scored by ``lm_eval.simple_evaluate``. Tasks: the five of QLLM's tables (PIQA, ARC-e, ARC-c,
HellaSwag, WinoGrande) and LAMBADA (OpenAI) for FlatQuant's. Offline they are the ``local_*``
tasks of ``eval/zeroshot_tasks`` (lm-eval's definitions over ``shared/data``); without local data
the official task names are used, where the hub is reachable.

A *subset* evaluates a fixed, seeded random sample of ``subset`` documents per task (lm-eval's
``samples`` argument), the same documents for every model, so smoke rows of different methods
compare on equal footing; ``subset=None`` is the full set.

The papers' averages (methods.md section 0): QLLM averages ``acc`` over its five tasks (as
OmniQuant, on which its code is built, reports); FlatQuant averages six tasks with ``acc_norm``
where lm-eval provides it (ARC, HellaSwag, PIQA) and ``acc`` otherwise (WinoGrande, LAMBADA).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from unittest import mock

from qllm_core.data import resolve_data_dir

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai")
TASK_DIR = Path(__file__).with_name("zeroshot_tasks")
AVERAGES: dict[str, dict[str, str]] = {
    "avg_qllm5": {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc", "hellaswag": "acc", "winogrande": "acc"},
    "avg_flatquant6": {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                       "hellaswag": "acc_norm", "winogrande": "acc", "lambada_openai": "acc"},
}


def _local_sizes(tasks: list[str], data_dir) -> dict[str, int] | None:
    """Document count of each task's local file, or None when any is missing (then: the hub)."""
    from .zeroshot_tasks.local_data import FILES

    root = resolve_data_dir(data_dir)
    paths = [None if root is None else root / FILES[t][0] for t in tasks]
    if any(p is None or not p.is_file() for p in paths):
        return None
    return {t: sum(1 for line in p.open(encoding="utf-8") if line.strip()) for t, p in zip(tasks, paths)}


def seeded_subset(size: int, n_docs: int, seed: int = 0) -> list[int]:
    """``size`` document indices out of ``n_docs``, sorted, the same for every model."""
    return sorted(random.Random(seed).sample(range(n_docs), min(size, n_docs)))


def _bootstrap_in_process():
    """lm-eval's bootstrap stderr (LAMBADA's perplexity) in this process, not in a ``multiprocessing.Pool``
    of ``cpu_count()`` processes forked from one that holds a CUDA context and torch's threads (a fork
    hazard, and 32 processes per run on the GPU machine). Same replicates: both of lm-eval's paths seed
    chunk ``i`` with ``random.Random(i)`` (``DISABLE_MULTIPROC``, lm_eval.api.metrics.bootstrap_stderr)."""
    return mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"})


def zero_shot(model, tokenizer, tasks: list[str] = TASKS, subset: int | None = None, seed: int = 0,
              batch_size: int = 16, data_dir=None) -> list[dict]:
    """lm-eval scores of ``model`` (already on its device): ``{task, metric, value, stderr, n}`` rows."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; available: {list(TASKS)}")
    sizes = _local_sizes(list(tasks), data_dir)
    names = {t: (f"local_{t}" if sizes else t) for t in tasks}
    samples = None
    if subset is not None and sizes:
        samples = {names[t]: seeded_subset(subset, sizes[t], seed) for t in tasks}
    # lm-eval's own tasks are indexed only when they are used (the hub): indexing them reads ~14k YAML
    # files, ~10 s per call on a 2-core machine, once per task and run.
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=not sizes,
                          metadata={"data_dir": str(resolve_data_dir(data_dir) or "")})
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _bootstrap_in_process():
        output = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), task_manager=manager,
                                         samples=samples, limit=None if samples or subset is None else subset,
                                         bootstrap_iters=1000, log_samples=False, random_seed=seed,
                                         numpy_random_seed=seed, torch_random_seed=seed)
    rows = []
    for task, name in names.items():
        result = output["results"][name]
        n = output["n-samples"][name]["effective"]
        for key, value in result.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or metric == "alias":
                continue
            stderr = result.get(f"{metric}_stderr,none")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": "-" if stderr in (None, "N/A") else float(stderr), "n": n})
    return rows


def average_rows(rows: list[dict]) -> list[dict]:
    """The papers' average rows (:data:`AVERAGES`) from per-task rows, where every task is present."""
    found = {(r["task"], r["metric"]): r for r in rows}
    averages = []
    for name, metrics in AVERAGES.items():
        picked = [found.get(item) for item in metrics.items()]
        if all(picked):
            averages.append({"task": name, "metric": "+".join(sorted(set(metrics.values()))),
                             "value": sum(r["value"] for r in picked) / len(picked), "stderr": "-",
                             "n": sum(r["n"] for r in picked)})
    return averages


def cached_zero_shot(run_dir: Path, model_fn, task: str, subset: int | None, device: str, data_dir=None,
                     batch_size: int = 16) -> dict:
    """``{"rows", "device"}`` of one task for a run (or FP), stored in ``<run_dir>/eval/`` and reused after.

    ``model_fn()`` returns the LoadedModel (see :func:`eval.experiments.lazy_model`); it is called
    only when the task is not evaluated yet.
    """
    from .experiments import cached_json, device_label

    def compute() -> dict:
        loaded = model_fn()
        loaded.model.to(device)
        rows = zero_shot(loaded.model, loaded.tokenizer, [task], subset, batch_size=batch_size, data_dir=data_dir)
        return {"rows": rows, "device": device_label(device)}
    return cached_json(Path(run_dir) / "eval" / f"zeroshot-{task}-{subset or 'all'}.json", compute)


def experiment_zero_shot(model_spec: str, exp, tasks: list[str], subset: int | None, calib, run_root,
                         device: str = "cpu", profile: str = "smoke", data_dir=None, batch_size: int = 16,
                         concurrent_jobs: int = 1, on_task=None) -> list[dict]:
    """The long-format zero-shot rows (each task + the papers' averages) of one experiment.

    Uses the experiment's run in ``run_root`` (the perplexity notebook's; quantized first if missing)
    and the task results cached in it. ``on_task(rows)``, if given, receives the rows so far after
    each task (a paper's average once all of its tasks are in), so a caller can save them before the next.
    """
    from qllm_core.models import display_name

    from .experiments import FP_METHOD, ensure_run, experiment_columns, lazy_model

    run_dir = Path(run_root) / exp.slug()
    record = None if exp.method == FP_METHOD else ensure_run(model_spec, exp, run_dir, calib, device, data_dir,
                                                               concurrent_jobs)
    model_fn = lazy_model(model_spec, exp, run_dir)
    common = {**experiment_columns(exp, record, record["model_name"] if record else display_name(model_spec),
                                   profile), "limit": subset or "all"}
    rows, done = [], []
    for task in tasks:
        result = cached_zero_shot(run_dir, model_fn, task, subset, device, data_dir, batch_size)
        rows += [{**common, **row, "device": result["device"]} for row in result["rows"]]
        done = rows + [{**common, **row, "device": rows[0]["device"]} for row in average_rows(rows)]
        if on_task is not None:
            on_task(done)
    return done


def zero_shot_rows(model_spec: str, experiments: list, tasks: list[str], subset: int | None, calib, run_root,
                   device: str = "cpu", profile: str = "smoke", data_dir=None, batch_size: int = 16):
    """Per experiment (with a progress bar), its :func:`experiment_zero_shot` rows."""
    from tqdm import tqdm

    for exp in tqdm(experiments, desc="zero-shot models"):
        yield experiment_zero_shot(model_spec, exp, tasks, subset, calib, run_root, device, profile, data_dir,
                                   batch_size)


def main(argv: list[str] | None = None) -> int:
    """``python -m eval.zeroshot``: one model (FP or a run directory), task by task, rows merged as each ends."""
    import argparse

    from qllm_core.models import load_model
    from qllm_core.runs import is_run_dir, load_run

    from .experiments import device_label
    from .reports import ZEROSHOT_COLUMNS, upsert_rows

    parser = argparse.ArgumentParser(prog="python -m eval.zeroshot", description=main.__doc__)
    parser.add_argument("--model", default="embedded", help="model spec or a quantized run directory")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--subset", type=int, default=None, help="documents per task (seeded); default: all")
    parser.add_argument("--profile", default="paper", help="the profile column of the rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--table", default=str(Path(__file__).resolve().parents[1] / "reports/tables/zeroshot.csv"))
    args = parser.parse_args(argv)
    if is_run_dir(args.model):
        loaded, record = load_run(args.model)
        quant, method = record["quant"], record["method"]
    else:
        loaded, record, quant, method = load_model(args.model), None, {}, "fp"
    loaded.model.to(args.device)
    calibration = (record or {}).get("calibration") or {}
    common = {"model": loaded.name, "method": method, "w_bits": quant.get("w_bits", 16),
              "a_bits": quant.get("a_bits", 16), "kv_bits": quant.get("kv_bits", 16), "limit": args.subset or "all",
              "calib_data": calibration.get("dataset", "-"), "profile": args.profile,
              "device": device_label(args.device)}
    done = []
    for task in args.tasks:
        rows = zero_shot(loaded.model, loaded.tokenizer, [task], args.subset, batch_size=args.batch_size,
                         data_dir=args.data_dir)
        done += rows
        upsert_rows(args.table, [{**common, **r} for r in rows + average_rows(done)], ZEROSHOT_COLUMNS)
        print(task, [(r["metric"], round(r["value"], 4)) for r in rows], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
