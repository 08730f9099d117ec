"""Merge the report tables written elsewhere (a GPU machine's ``--reports-dir``) into ``reports/tables``.

    python -m eval.merge_tables /path/to/other/reports [--into reports]

GPU runs write their rows into a reports directory of their own (the repo's copy on that machine is
replaced at every call); this brings them home row by row with each table's own key, so rows
measured here before stay unless the same measurement was made again (same key), and the
files keep their stable order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .calibration_cost import CALIBRATION_COST_COLUMNS, CALIBRATION_COST_KEYS
from .reports import (CALIBRATION_COLUMNS, CALIBRATION_KEYS, PERPLEXITY_COLUMNS, ZEROSHOT_COLUMNS, key_columns,
                      upsert_rows)

REPORTS = Path(__file__).resolve().parents[1] / "reports"
# table file -> (file name pattern of the pieces to merge, columns, key columns)
TABLES: dict[str, tuple[str, list[str], list[str]]] = {
    "perplexity.csv": ("perplexity.csv", PERPLEXITY_COLUMNS, key_columns(PERPLEXITY_COLUMNS)),
    "calibration.csv": ("calibration.csv", CALIBRATION_COLUMNS, CALIBRATION_KEYS),
    "zeroshot.csv": ("zeroshot.csv", ZEROSHOT_COLUMNS, key_columns(ZEROSHOT_COLUMNS)),
    "calibration_cost.csv": ("calibration_cost*.csv", CALIBRATION_COST_COLUMNS, CALIBRATION_COST_KEYS),
}


def merge_tables(source: Path, into: Path = REPORTS) -> dict[str, int]:
    """Upsert every known table found under ``source`` (searched recursively, in sorted path order)
    into ``into/tables``; returns the number of rows merged per file."""
    merged: dict[str, int] = {}
    for name, (pattern, columns, keys) in TABLES.items():
        for path in sorted(Path(source).rglob(pattern)):
            # a piece written before a column existed (an older checkout on the GPU machine) gets "-" there
            rows = [{c: row.get(c, "-") for c in columns}
                    for row in pd.read_csv(path, keep_default_na=False, dtype=str).to_dict("records")]
            if rows:
                upsert_rows(into / "tables" / name, rows, columns, keys=keys)
                merged[str(path)] = len(rows)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.merge_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--into", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    if not args.source.exists():
        raise SystemExit(f"no such directory: {args.source}")
    for path, count in merge_tables(args.source, args.into).items():
        print(f"{path}: {count} rows", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
