"""paper_reported.csv is exactly what eval.paper_tables makes of shared/docs/paper-tables.md."""
from __future__ import annotations

import pandas as pd
import pytest

from eval.paper_tables import COLUMNS, DEFAULT_SOURCE, REPO, bits, main, markdown_tables, paper_rows


def test_committed_table_matches_the_markdown(tmp_path):
    if not DEFAULT_SOURCE.is_file():
        pytest.fail(f"{DEFAULT_SOURCE} not found: the shared folder must sit beside the checkout")
    main(["--out", str(tmp_path / "paper_reported.csv")])
    fresh = (tmp_path / "paper_reported.csv").read_text()
    assert fresh == (REPO / "reports" / "tables" / "paper_reported.csv").read_text()


def test_rows_carry_the_papers_numbers():
    table = pd.DataFrame(paper_rows(DEFAULT_SOURCE.read_text()), columns=COLUMNS)
    qllm = table[(table.paper == "QLLM") & (table.model == "LLaMA-2-70B") & (table.method == "qllm")
                 & (table.w_bits == 4) & (table.dataset == "wikitext2")]
    assert qllm.value.tolist() == ["7.00"]
    flat = table[(table.paper == "FlatQuant") & (table.method == "flatquant-gptq") & (table.model == "LLaMA-3-70B")]
    assert dict(zip(flat.dataset, flat.value)) == {"wikitext2": "3.77", "c4": "7.93", "avg_flatquant6": "78.58"}
    assert not (table.value == "-").any() and set(table.kv_bits[table.paper == "FlatQuant"]) <= {4, 16}


def test_markdown_tables_and_bits():
    text = "## S\nSource: x (repo, commit 1). More.\n\ncaption:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert markdown_tables(text) == [("S", "caption:", "x (repo, commit 1)", [{"a": "1", "b": "2"}])]
    assert bits("W4A4") == (4, 4, 16) and bits("W4A4KV4") == (4, 4, 4)
    with pytest.raises(ValueError, match="bit widths"):
        bits("INT4")
