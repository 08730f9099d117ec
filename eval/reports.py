"""Long-format report tables that reviewers can ``git diff``.

Every report is one CSV (plus a Markdown rendering) under ``reports/tables/``. Rows from every
method land in the same file; re-running a configuration replaces its row (matched on the key
columns), and rows are sorted stably, so a diff between commits shows only what changed.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

PERPLEXITY_COLUMNS = ["model", "method", "w_bits", "a_bits", "kv_bits", "dataset", "windows", "ppl",
                      "calib_data", "calib_samples", "calib_seqlen", "profile", "device"]
# calib_seconds: wall time of the whole calibration; seconds_per_layer: median wall time of a layer (a
# group's over its layers); gpu_busy_share: mean NVML utilization during it; peak_gpu_mem_gib / peak_gpu_reserved_gib:
# torch's peak allocated / peak reserved (held by the process's caching allocator, CUDA-graph pools included)
# memory during it ("-" where not recorded); jobs: runs sharing the GPU;
# trainer: how a trained method's steps ran (qllm_core.training.trainer_label; "-" where not recorded).
CALIBRATION_COLUMNS = ["model", "method", "w_bits", "a_bits", "kv_bits", "calib_data", "calib_samples",
                       "calib_seqlen", "calib_seconds", "seconds_per_layer", "gpu_busy_share", "peak_gpu_mem_gib",
                       "peak_gpu_reserved_gib", "jobs", "concurrent_layers", "trainer", "profile", "device"]
# A timing depends on the device, on the runs sharing it and on the layers calibrated at once: all are part of
# a calibration row's key.
CALIBRATION_KEYS = [c for c in CALIBRATION_COLUMNS if c not in ("calib_seconds", "seconds_per_layer", "gpu_busy_share",
                                                                "peak_gpu_mem_gib", "peak_gpu_reserved_gib")]
ZEROSHOT_COLUMNS = ["model", "method", "w_bits", "a_bits", "kv_bits", "task", "metric", "value", "stderr", "n", "limit",
                    "calib_data", "profile", "device"]
VALUE_COLUMNS = {"ppl", "device", "calib_seconds", "seconds_per_layer", "gpu_busy_share", "peak_gpu_mem_gib",
                 "peak_gpu_reserved_gib", "jobs", "concurrent_layers", "value", "stderr", "n"}


def key_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c not in VALUE_COLUMNS]


def upsert_rows(csv_path: str | Path, rows: list[dict], columns: list[str], float_digits: int = 4,
                keys: list[str] | None = None) -> pd.DataFrame:
    """Merge ``rows`` into the table at ``csv_path`` (replacing rows with the same key), write CSV + MD.

    ``keys``: the columns identifying a row (default: :func:`key_columns`, every non-value column).
    """
    csv_path = Path(csv_path)
    missing = [c for row in rows for c in columns if c not in row]
    if missing:
        raise KeyError(f"rows lack columns {sorted(set(missing))} for {csv_path.name}")
    new = pd.DataFrame([{c: row[c] for c in columns} for row in rows], columns=columns)
    keys = keys or key_columns(columns)
    with _locked(csv_path):
        return _merge_into(csv_path, new, columns, keys, float_digits)


@contextmanager
def _locked(csv_path: Path):
    """An exclusive lock on a table while it is read, merged and written: several processes (the workers
    of ``eval.prequantize``) add rows to one table as their results come."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path.with_name(f".{csv_path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _merge_into(csv_path: Path, new: pd.DataFrame, columns: list[str], keys: list[str], float_digits: int):
    if csv_path.is_file():
        old = pd.read_csv(csv_path, keep_default_na=False, dtype=str)
        for column in set(keys) - set(old.columns):  # a key column added since the table was written
            old[column] = "-"
        new_str = new.astype(str)
        merged_keys = old[keys].merge(new_str[keys].drop_duplicates(), on=keys, how="left", indicator=True)
        old = old[(merged_keys["_merge"] == "left_only").to_numpy()]
        table = pd.concat([old, new_str], ignore_index=True).fillna("-")  # columns older rows lack
        table = table[[c for c in columns if c in table.columns]]
    else:
        table = new.astype(str)
    table = _format(table, float_digits).sort_values(keys, kind="stable").reset_index(drop=True)
    _replace(csv_path, table.to_csv(index=False))
    _replace(csv_path.with_suffix(".md"), to_markdown(table))
    return table


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a killed writer never leaves half a table."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _format(table: pd.DataFrame, digits: int) -> pd.DataFrame:
    def fmt(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            return value
        if number.is_integer() and "." not in value:
            return value
        return f"{number:.{digits}f}"
    return table.apply(lambda col: col.map(fmt) if col.name in VALUE_COLUMNS else col)


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"
