"""Evaluation and calibration text, local first (methods.md section 0).

Local files live under a data directory given by argument or ``QLLM_DATA_DIR`` (layout of
``shared/data``, see its PROVENANCE.md). The Hugging Face hub (``datasets``) is used only as a
fallback, and only when it is reachable. Offline, WikiText-2 *train* and C4 do not exist here,
so offline calibration defaults to PTB train (callers must label it) and C4 rows need the hub.

Protocol (GPTQ-style, shared by QLLM and FlatQuant):
* WikiText-2 raw test rows joined with ``"\\n\\n"``;
* PTB test sentences (lines, stripped) joined with ``" "`` (QLLM's datautils); calibration
  text from the train split, joined the same way;
* C4: the ``en`` validation shard 0 (GPTQ's "c4" variant) for evaluation, 256 random windows
  (seed 0) whose documents are longer than the window; train shard 0 for calibration;
* evaluation: non-overlapping ``seqlen`` windows of the tokenized text, remainder dropped;
* calibration: ``nsamples`` random windows of ``seqlen`` tokens, seeded.
"""
from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import torch

DATA_ENV = "QLLM_DATA_DIR"
EVAL_DATASETS = ("wikitext2", "ptb", "c4")
CALIB_DATASETS = ("wikitext2", "ptb", "c4")
OFFLINE_CALIB_DEFAULT = "ptb"

# Relative local paths, per (dataset, split).
LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext-2-raw-v1/test.jsonl",
    ("wikitext2", "train"): "wikitext-2-raw-v1/train.jsonl",
    ("ptb", "train"): "ptb/ptb.train.txt",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
}
C4_FILES = {
    "validation": "en/c4-validation.00000-of-00008.json.gz",
    "train": "en/c4-train.00000-of-01024.json.gz",
}
C4_EVAL_WINDOWS = 256


class DataUnavailableError(FileNotFoundError):
    """A dataset is neither on disk nor reachable on the hub; the message says where we looked."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data directory: the argument, else ``$QLLM_DATA_DIR``, else None."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    return Path(chosen) if chosen else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """True unless offline mode is set or huggingface.co cannot be connected to quickly."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_choice(name: str, allowed: tuple[str, ...], what: str) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; expected one of {allowed}")


def _read_local_rows(dataset: str, split: str, data_dir: Path) -> list[str]:
    path = data_dir / LOCAL_FILES[(dataset, split)]
    if dataset == "wikitext2":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]
    with path.open(encoding="utf-8") as f:  # ptb: one sentence a line, stripped like HF ptb_text_only
        return [line.strip() for line in f]


def _read_hub_rows(dataset: str, split: str) -> list[str]:
    import datasets  # imported lazily: slow, and only needed online

    if dataset == "wikitext2":
        return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    if dataset == "ptb":
        return datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
    ds = datasets.load_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)
    return ds["text"]


def load_rows(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows of ``dataset``/``split``: from the local data dir if the file is there, else the hub."""
    local_dir = resolve_data_dir(data_dir)
    relative = LOCAL_FILES.get((dataset, split))
    if local_dir is not None and relative is not None and (local_dir / relative).is_file():
        return _read_local_rows(dataset, split, local_dir)
    looked = (
        f"{local_dir / relative}" if local_dir is not None and relative else
        f"no local file for {dataset}/{split}" if relative is None else
        f"no data directory (pass data_dir or set {DATA_ENV}) for {relative}"
    )
    if not hub_reachable():
        raise DataUnavailableError(
            f"{dataset} {split} split is not available: local file missing ({looked}) and the "
            "Hugging Face hub is not reachable"
        )
    try:
        return _read_hub_rows(dataset, split)
    except Exception as err:  # the hub answered but could not serve it
        raise DataUnavailableError(f"{dataset} {split}: local file missing ({looked}); hub load failed: {err}") from err


def _joined_text(dataset: str, split: str, data_dir) -> str:
    rows = load_rows(dataset, split, data_dir)
    return ("\n\n" if dataset == "wikitext2" else " ").join(rows)


def eval_windows(tokenizer, dataset: str, seqlen: int = 2048, data_dir=None, max_windows: int | None = None) -> torch.Tensor:
    """Token windows ``(n, seqlen)`` for perplexity on ``dataset``'s test split (protocol above)."""
    _check_choice(dataset, EVAL_DATASETS, "evaluation dataset")
    if dataset == "c4":
        windows = _c4_eval_windows(tokenizer, seqlen, data_dir)
    else:
        ids = tokenizer(_joined_text(dataset, "test", data_dir), return_tensors="pt").input_ids[0]
        n = ids.numel() // seqlen
        if n == 0:
            raise ValueError(f"{dataset} test has {ids.numel()} tokens, fewer than one window of {seqlen}")
        windows = ids[: n * seqlen].view(n, seqlen)
    return windows if max_windows is None else windows[:max_windows]


def _c4_eval_windows(tokenizer, seqlen: int, data_dir) -> torch.Tensor:
    return _random_document_windows(tokenizer, load_rows("c4", "validation", data_dir), C4_EVAL_WINDOWS, seqlen,
                                    random.Random(0))


def _random_document_windows(tokenizer, docs: list[str], n: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """GPTQ's C4 sampling: a random document longer than ``seqlen`` tokens, a random window of it."""
    windows = []
    while len(windows) < n:
        ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def calibration_windows(tokenizer, dataset: str, nsamples: int, seqlen: int = 2048, seed: int = 0, data_dir=None) -> torch.Tensor:
    """``nsamples`` random ``seqlen``-token windows of ``dataset``'s train split, ``(n, seqlen)``."""
    _check_choice(dataset, CALIB_DATASETS, "calibration dataset")
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples}, {seqlen}")
    rng = random.Random(seed)
    if dataset == "c4":
        return _random_document_windows(tokenizer, load_rows("c4", "train", data_dir), nsamples, seqlen, rng)
    ids = tokenizer(_joined_text(dataset, "train", data_dir), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"{dataset} train has only {ids.numel()} tokens, need more than {seqlen}")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def default_calibration_dataset(data_dir=None) -> str:
    """WikiText-2 train (both papers' default) when available, else PTB train (offline)."""
    local_dir = resolve_data_dir(data_dir)
    if local_dir is not None and (local_dir / LOCAL_FILES[("wikitext2", "train")]).is_file():
        return "wikitext2"
    return "wikitext2" if hub_reachable() else OFFLINE_CALIB_DEFAULT
