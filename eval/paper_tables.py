"""The papers' reported numbers as data: ``shared/docs/paper-tables.md`` -> ``reports/tables/paper_reported.csv``.

    python -m eval.paper_tables [--source ../shared/docs/paper-tables.md]

The markdown holds QLLM's main table (LLaMA-1/2, W6A6 and W4A4, perplexity and five zero-shot
tasks) and FlatQuant's Tables 1-3 (W4A4KV4 LLaMA-2/3: WikiText-2 and C4 perplexity, six-task
zero-shot average), each under a heading with its source. They become long-format rows keyed like
the reproduced tables (``model, method, w_bits, a_bits, kv_bits, dataset``), method names mapped
to this repo's report names where the method is the same (SQ -> smoothquant, QuaRot with GPTQ
weights -> quarot-gptq, ...; ``omniquant*`` keeps the source's footnote: no LET on LLaMA-2-70B). The abstracts' headline claims stay in ``paper_claims.csv``. A test
regenerates the table from the markdown and compares it with the committed CSV, so they cannot drift.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from .reports import upsert_rows

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "docs" / "paper-tables.md"
COLUMNS = ["paper", "table", "model", "method", "w_bits", "a_bits", "kv_bits", "dataset", "metric", "value", "source"]
METHODS = {"FP16": "fp", "SQ": "smoothquant", "SmoothQuant": "smoothquant", "OmniQuant": "omniquant",
           "QLLM": "qllm", "QuaRot": "quarot", "FlatQuant": "flatquant"}
QLLM_COLUMNS = {"WikiText2": ("wikitext2", "ppl"), "C4": ("c4", "ppl"), "PIQA": ("piqa", "acc"),
                "ARC-e": ("arc_easy", "acc"), "ARC-c": ("arc_challenge", "acc"), "HellaSwag": ("hellaswag", "acc"),
                "WinoGrande": ("winogrande", "acc"), "acc avg": ("avg_qllm5", "acc")}
FLATQUANT_MODELS = {"2-7B": "LLaMA-2-7B", "2-13B": "LLaMA-2-13B", "2-70B": "LLaMA-2-70B", "3-8B": "LLaMA-3-8B",
                    "3-70B": "LLaMA-3-70B"}
FLATQUANT_TABLES = {"WikiText-2 perplexity:": ("Table 1", "wikitext2", "ppl"), "C4 perplexity:": ("Table 2", "c4", "ppl"),
                    "Zero-shot average accuracy (%), six tasks:": ("Table 3", "avg_flatquant6", "acc")}


def markdown_tables(text: str) -> list[tuple[str, str, str, list[dict]]]:
    """Every pipe table of ``text``: (section heading, the line before the table, section source, rows)."""
    tables, section, source, before, lines = [], "", "", "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section, source = line[3:].strip(), ""
        elif line.startswith("Source:"):  # its paragraph, up to the first closing parenthesis (repo, commit)
            end = next((j for j in range(i, len(lines)) if not lines[j].strip()), len(lines))
            paragraph = " ".join(lines[j].strip() for j in range(i, end)).removeprefix("Source:").strip()
            source = paragraph[: paragraph.find(")") + 1] if ")" in paragraph else paragraph
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|(\s*-+\s*\|)+$", lines[i + 1]):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            tables.append((section, before, source, rows))
            continue
        if line.strip():
            before = line.strip()
        i += 1
    return tables


def bits(label: str) -> tuple[int, int, int]:
    """``W4A4`` -> (4, 4, 16); ``W16A16`` -> (16, 16, 16)."""
    match = re.fullmatch(r"W(\d+)A(\d+)(?:KV(\d+))?", label)
    if not match:
        raise ValueError(f"cannot read bit widths from {label!r}")
    w, a, kv = match.groups()
    return int(w), int(a), int(kv or 16)


def paper_rows(text: str) -> list[dict]:
    """Long-format rows of every table of paper-tables.md (module docstring); '-' cells are skipped."""
    rows = []
    for section, before, source, table in markdown_tables(text):
        if section.startswith("QLLM"):
            for r in table:
                w, a, kv = bits(r["bits"])
                for column, (dataset, metric) in QLLM_COLUMNS.items():
                    if r[column] != "-":
                        rows.append({"paper": "QLLM", "table": "Tables 1-2", "model": r["model"],
                                     "method": METHODS.get(r["method"], r["method"].lower()), "w_bits": w, "a_bits": a,
                                     "kv_bits": kv, "dataset": dataset, "metric": metric, "value": r[column],
                                     "source": source})
        elif section.startswith("FlatQuant") and before in FLATQUANT_TABLES:
            number, dataset, metric = FLATQUANT_TABLES[before]
            for r in table:
                base = METHODS.get(r["method"], r["method"].lower())
                method = base if r["W quantizer"] in ("RTN", "-") else f"{base}-gptq"
                w, a, kv = (16, 16, 16) if base == "fp" else (4, 4, 4)
                for column, model in FLATQUANT_MODELS.items():
                    if r[column] != "-":
                        rows.append({"paper": "FlatQuant", "table": number, "model": model, "method": method,
                                     "w_bits": w, "a_bits": a, "kv_bits": kv, "dataset": dataset, "metric": metric,
                                     "value": r[column], "source": source})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.paper_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--out", default=str(REPO / "reports" / "tables" / "paper_reported.csv"))
    args = parser.parse_args(argv)
    rows = paper_rows(Path(args.source).read_text(encoding="utf-8"))
    out = Path(args.out)
    out.unlink(missing_ok=True)  # the markdown is the whole truth: no rows survive from an older file
    upsert_rows(out, rows, COLUMNS)
    print(f"{len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
