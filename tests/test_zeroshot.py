"""Local zero-shot tasks: conversions, and the same requests as lm-eval's official tasks.

The official task of each benchmark is built from lm-eval's own yaml (``lm_eval/tasks/...``) with
its hub download replaced by the local documents in the hub dataset's fields; the local task is
built from ``eval/zeroshot_tasks``. On the first documents both must produce identical requests
(context and continuation of every instance, and the gold index). HellaSwag's official task
preprocesses raw ``ctx_a``/``ctx_b`` fields that the local file does not have, so there the
official doc_to_* are applied to the already preprocessed documents (process_docs dropped).
"""
from __future__ import annotations

from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from eval.zeroshot import AVERAGES, TASK_DIR, TASKS, average_rows, seeded_subset
from eval.zeroshot_tasks.local_data import FILES, convert, read_rows

OFFICIAL = Path(lm_eval.__file__).parent / "tasks"
OFFICIAL_YAML = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                 "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                 "lambada_openai": "lambada/lambada_openai.yaml"}
EXPECTED_SIZES = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
                  "lambada_openai": 5153}


def _task(config: dict, docs: list[dict], split: str) -> ConfigurableTask:
    import datasets

    config = {k: v for k, v in config.items() if k not in ("dataset_path", "dataset_name", "tag")}
    for key in ("training_split", "validation_split", "test_split"):  # splits the local copy does not have
        if config.get(key) not in (None, split):
            config[key] = None
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    return ConfigurableTask(config=config)


def _requests(task: ConfigurableTask, n: int) -> list[tuple]:
    task.build_all_requests(limit=n, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.arguments) for inst in task.instances]


@pytest.mark.parametrize("name", TASKS)
def test_local_task_builds_the_official_requests(name, data_dir):
    docs = read_rows(name, data_dir)[:12]
    split = FILES[name][1]
    official_cfg = load_yaml(OFFICIAL / OFFICIAL_YAML[name])
    if name == "hellaswag":
        official_cfg.pop("process_docs")
    official = _task(official_cfg, docs, split)
    local = _task(load_yaml(TASK_DIR / f"local_{name}.yaml"), docs, split)
    want, got = _requests(official, 12), _requests(local, 12)
    assert got == want and len(got) >= 12
    assert [local.doc_to_target(d) for d in docs] == [official.doc_to_target(d) for d in docs]
    assert [m["metric"] for m in local.config.metric_list] == [m["metric"] for m in official.config.metric_list]


def test_local_files_have_the_published_sizes(data_dir):
    assert {t: len(read_rows(t, data_dir)) for t in TASKS} == EXPECTED_SIZES


def test_conversions_to_hub_fields():
    assert convert("hellaswag", {"query": "q", "choices": ["a", "b", "c", "d"], "gold": 3}) == {
        "query": "q", "choices": ["a", "b", "c", "d"], "label": "3"}
    row = {"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B", "gold": 1}
    converted = convert("arc_easy", row)
    assert converted["choices"]["label"].index(converted["answerKey"]) == row["gold"] and "gold" not in converted


def test_missing_data_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="piqa/validation.hf.jsonl"):
        read_rows("piqa", tmp_path)


def test_seeded_subset_is_fixed_and_sorted():
    a, b = seeded_subset(50, 1838, seed=0), seeded_subset(50, 1838, seed=0)
    assert a == b == sorted(a) and len(set(a)) == 50 and seeded_subset(50, 1838, seed=1) != a
    assert seeded_subset(100, 30) == list(range(30))


def test_average_rows_follow_each_papers_metrics():
    rows = [{"task": t, "metric": m, "value": v, "n": 10} for t in TASKS for m, v in (("acc", 0.5), ("acc_norm", 0.7))]
    averages = {r["task"]: r["value"] for r in average_rows(rows)}
    assert averages["avg_qllm5"] == pytest.approx(0.5)
    flat = AVERAGES["avg_flatquant6"]
    assert averages["avg_flatquant6"] == pytest.approx(sum(0.7 if m == "acc_norm" else 0.5 for m in flat.values()) / 6)
    assert average_rows(rows[:4]) == []  # an average needs every one of its tasks


def test_zero_shot_notebook_runs_with_papermill(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """FP and one quantized run of a tiny model on 4 seeded documents of two tasks, through lm-eval."""
    import pandas as pd

    from eval.reproduce import list_notebooks, run_notebook

    monkeypatch.setenv("QLLM_DATA_DIR", str(data_dir))
    reports = tmp_path / "reports"
    params = {"profile": "smoke", "model": str(tiny_model_dir), "only_methods": ["fp", "rtn"], "tasks": ["piqa", "winogrande"],
              "limit": 4, "run_root": str(tmp_path / "runs"), "reports_dir": str(reports)}
    html = run_notebook(list_notebooks(["zero_shot"])[0], params, reports)
    assert "Zero-shot accuracy" in html.read_text()
    table = pd.read_csv(reports / "tables" / "zeroshot.csv")
    per_task = table[table.task.isin(["piqa", "winogrande"])]
    assert set(per_task.method) == {"fp", "rtn"} and (per_task.n == 4).all() and (per_task.limit.astype(str) == "4").all()
    assert set(per_task.metric) == {"acc", "acc_norm"} and per_task.value.between(0, 1).all()
    assert not table.task.str.startswith("avg_").any()  # an average needs all of its tasks


def test_rows_reach_the_caller_after_each_task(tiny_model_dir, tmp_path, monkeypatch):
    """prequantize saves the rows each time on_task is called: a run stopped at its third task (a GPU
    call's deadline) keeps the first two tasks' rows; a paper's average comes once all its tasks are in."""
    import json

    import eval.zeroshot as zs
    from eval.experiments import Experiment
    from qllm_core.runs import CalibConfig

    run_dir = tmp_path / Experiment("fp").slug() / "eval"
    run_dir.mkdir(parents=True)
    for task, value in (("piqa", 0.6), ("arc_easy", 0.4)):
        stored = {"rows": [{"task": task, "metric": m, "value": value, "stderr": 0.01, "n": 10} for m in ("acc", "acc_norm")],
                  "device": "gpu"}
        (run_dir / f"zeroshot-{task}-10.json").write_text(json.dumps(stored))

    def deadline(*args, **kwargs):
        raise KeyboardInterrupt("stopped")
    monkeypatch.setattr(zs, "zero_shot", deadline)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        zs.experiment_zero_shot(str(tiny_model_dir), Experiment("fp"), list(TASKS), 10, CalibConfig(), tmp_path,
                                on_task=lambda rows: seen.append([(r["task"], r["value"], r["device"]) for r in rows
                                                                  if r["metric"] == "acc"]))
    assert seen == [[("piqa", 0.6, "gpu")], [("piqa", 0.6, "gpu"), ("arc_easy", 0.4, "gpu")]]

    for task in TASKS[2:]:
        stored = {"rows": [{"task": task, "metric": m, "value": 0.5, "stderr": 0.01, "n": 10} for m in ("acc", "acc_norm")],
                  "device": "gpu"}
        (run_dir / f"zeroshot-{task}-10.json").write_text(json.dumps(stored))
    seen.clear()
    rows = zs.experiment_zero_shot(str(tiny_model_dir), Experiment("fp"), list(TASKS), 10, CalibConfig(), tmp_path,
                                   on_task=lambda rows: seen.append({r["task"] for r in rows}))
    # QLLM's average as soon as its five tasks are in (LAMBADA, FlatQuant's sixth, comes last)
    assert [("avg_qllm5" in s, "avg_flatquant6" in s) for s in seen] == [(False, False)] * 4 + [(True, False),
                                                                                               (True, True)]
    assert [r["value"] for r in rows if r["task"] == "avg_qllm5"] == [pytest.approx((0.6 + 0.4 + 3 * 0.5) / 5)]


def test_bootstrap_in_process_gives_lm_evals_pool_result():
    """lm-eval's two bootstrap paths draw the same replicates (chunk i seeded with i), so evaluating with
    DISABLE_MULTIPROC changes no stderr, only where it is computed."""
    import statistics

    from lm_eval.api.metrics import bootstrap_stderr

    from eval.zeroshot import _bootstrap_in_process

    xs = [float(i % 7) for i in range(60)]
    pooled = bootstrap_stderr(statistics.fmean, xs, 2000)
    with _bootstrap_in_process():
        in_process = bootstrap_stderr(statistics.fmean, xs, 2000)
    assert in_process == pooled > 0


def test_lambada_stderr_needs_no_process_pool(tiny_model_dir, data_dir, monkeypatch):
    """LAMBADA's perplexity stderr is a bootstrap: it must not fork a pool from a process holding a GPU."""
    import multiprocessing

    from eval.zeroshot import zero_shot
    from qllm_core.models import load_model

    def no_pool(*args, **kwargs):
        raise AssertionError("zero_shot forked a multiprocessing pool")
    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    loaded = load_model(str(tiny_model_dir))
    rows = zero_shot(loaded.model, loaded.tokenizer, ["lambada_openai"], subset=4, data_dir=data_dir)
    perplexity = [r for r in rows if r["metric"] == "perplexity"]
    assert len(perplexity) == 1 and isinstance(perplexity[0]["stderr"], float)
