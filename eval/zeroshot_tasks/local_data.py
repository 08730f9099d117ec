"""Local copies of the zero-shot sets, in the fields of the hub datasets lm-eval's tasks read.

Every ``*.yaml`` beside this file is lm-eval's own task definition (prompt, choices, target,
metrics) with one change: ``custom_dataset`` points here instead of at the hub. The data directory
comes from the task metadata (``data_dir``) or ``$QLLM_DATA_DIR`` (layout and provenance:
``shared/data/PROVENANCE.md``). Where a local file's fields differ from the hub dataset's, the
conversion is here and tested (tests/test_zeroshot.py).

WinoGrande's partial scoring uses lm-eval's own functions (imported, not re-written).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import datasets
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401  (referenced by winogrande yaml)
    doc_to_choice as winogrande_choice, doc_to_target as winogrande_target, doc_to_text as winogrande_text,
)

from qllm_core.data import DataUnavailableError, resolve_data_dir

FILES = {  # task -> (file under the data directory, split name in lm-eval's task)
    "piqa": ("piqa/validation.hf.jsonl", "validation"),
    "arc_easy": ("arc_easy/test.hf_like.jsonl", "test"),
    "arc_challenge": ("arc_challenge/test.hf.jsonl", "test"),
    "hellaswag": ("hellaswag/validation.preprocessed.jsonl", "validation"),
    "winogrande": ("winogrande/dev.jsonl", "validation"),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl", "test"),
}


def read_rows(task: str, data_dir=None) -> list[dict]:
    """The local file of ``task`` as dicts in the hub dataset's fields."""
    root = resolve_data_dir(data_dir)
    path = None if root is None else root / FILES[task][0]
    if path is None or not path.is_file():
        raise DataUnavailableError(f"zero-shot data for {task!r} not found: expected {FILES[task][0]} under the "
                                   f"data directory ({root or 'unset: pass data_dir or set QLLM_DATA_DIR'})")
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [convert(task, row) for row in rows]


def convert(task: str, row: dict) -> dict:
    """One local row in the hub dataset's fields (see PROVENANCE.md for each file)."""
    if task == "hellaswag":
        # Already preprocessed (query, choices, gold): lm-eval's process_docs output, whose target field
        # is the hub's string ``label``. The raw ctx_a / ctx_b fields are not available offline.
        return {"query": row["query"], "choices": list(row["choices"]), "label": str(row["gold"])}
    if task == "arc_easy":  # parsed from an instruction format; labels synthesised A, B, ...
        return {"question": row["question"], "choices": row["choices"], "answerKey": row["answerKey"]}
    return row


def _dataset(task: str, data_dir=None, **_metadata) -> datasets.DatasetDict:
    return datasets.DatasetDict({FILES[task][1]: datasets.Dataset.from_list(read_rows(task, data_dir))})


# The ``custom_dataset`` callables named in the yaml files.
piqa = functools.partial(_dataset, "piqa")
arc_easy = functools.partial(_dataset, "arc_easy")
arc_challenge = functools.partial(_dataset, "arc_challenge")
hellaswag = functools.partial(_dataset, "hellaswag")
winogrande = functools.partial(_dataset, "winogrande")
lambada_openai = functools.partial(_dataset, "lambada_openai")
