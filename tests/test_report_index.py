"""reports/index.html from the committed tables: every link resolves; table files re-sort to themselves."""
from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest

from eval.report_index import REPO, build_index, perplexity_ratios
from eval.reports import CALIBRATION_COLUMNS, PERPLEXITY_COLUMNS, upsert_rows


def test_index_links_resolve_and_sections_render(tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(REPO / "reports" / "tables", reports / "tables")
    (reports / "perplexity.smoke.html").write_text("<html></html>")
    page = build_index(reports).read_text()
    for title in ("Perplexity", "Zero-shot", "Calibration time", "Speedups"):
        assert f"<h2>{title}</h2>" in page
    targets = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert "perplexity.smoke.html" in targets and any(t.endswith(".png") for t in targets)
    assert all((reports / t).is_file() for t in targets), [t for t in targets if not (reports / t).is_file()]
    assert page.count("<table") >= 4


def test_ratios_put_papers_and_ours_on_one_scale():
    paper = pd.DataFrame([{"paper": "QLLM", "table": "T", "model": "LLaMA-2-7B", "method": m, "w_bits": w, "a_bits": w,
                           "kv_bits": 16, "dataset": "wikitext2", "metric": "ppl", "value": v}
                          for m, w, v in (("fp", 16, "5.0"), ("qllm", 4, "10.0"))])
    ours = pd.DataFrame([{"model": "m", "method": m, "w_bits": w, "a_bits": w, "kv_bits": 16, "dataset": "wikitext2",
                          "ppl": p, "calib_data": "ptb", "profile": "smoke", "device": "cpu"}
                         for m, w, p in (("fp", 16, 20.0), ("qllm", 4, 30.0))])
    ratios = perplexity_ratios(ours, paper).set_index("source")["ppl / FP"]
    assert sorted(ratios.round(3)) == [1.5, 2.0]


def test_tables_are_stable_under_rewrites_and_row_order(tmp_path):
    """A re-run that merges the same rows in another order leaves the file byte for byte unchanged."""
    source = pd.read_csv(REPO / "reports" / "tables" / "perplexity.csv", keep_default_na=False, dtype=str)
    rows = source.to_dict("records")
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    upsert_rows(first, rows, PERPLEXITY_COLUMNS)
    upsert_rows(second, rows[::-1], PERPLEXITY_COLUMNS)
    upsert_rows(second, rows[: len(rows) // 2], PERPLEXITY_COLUMNS)  # re-running half of them
    assert first.read_text() == second.read_text() == (REPO / "reports" / "tables" / "perplexity.csv").read_text()


def test_calibration_rows_of_other_devices_or_sharing_are_kept(tmp_path):
    """A timing on another device, or with other runs sharing the GPU, is another measurement: kept beside;
    the same device and sharing replaces it."""
    from eval.reports import CALIBRATION_COLUMNS, CALIBRATION_KEYS

    row = {c: "x" for c in CALIBRATION_COLUMNS} | {"calib_seconds": 130.0, "jobs": 1, "device": "H200"}
    path = tmp_path / "calibration.csv"
    upsert_rows(path, [row], CALIBRATION_COLUMNS, keys=CALIBRATION_KEYS)
    upsert_rows(path, [row | {"device": "H100", "jobs": 2, "calib_seconds": 150.0}], CALIBRATION_COLUMNS,
                keys=CALIBRATION_KEYS)
    table = upsert_rows(path, [row | {"calib_seconds": 120.0}], CALIBRATION_COLUMNS, keys=CALIBRATION_KEYS)
    assert sorted(zip(table.device, table.calib_seconds)) == [("H100", "150.0000"), ("H200", "120.0000")]


def test_walkthrough_steps_on_a_real_layer(data_dir):
    """Disassembly is exact in FP, assembly restores the channel count; outliers are found (embedded model)."""
    from eval.walkthrough import disassembly_demo, outlier_table, study

    s = study(layer=2, nsamples=2, seqlen=128, data_dir=data_dir)
    assert outlier_table(s)["x median channel"].iloc[0] > 10
    steps = disassembly_demo(s).set_index("step")
    exact, kept = steps.iloc[0], steps.iloc[1]
    assert exact["relative FP output error"] < 1e-5 and exact["channels out"] == exact["channels in"] + exact["added sub-channels"]
    assert kept["channels out"] == kept["channels in"] and kept["relative FP output error"] > exact["relative FP output error"]
    assert exact["max |x| after"] < outlier_table(s)["max |x|"].iloc[0]


def test_merge_tables_brings_rows_home_by_key(tmp_path):
    """Rows from another reports dir replace the same measurement and leave the others."""
    from eval.merge_tables import merge_tables

    home, remote = tmp_path / "home", tmp_path / "remote" / "grid"
    base = {c: "x" for c in PERPLEXITY_COLUMNS} | {"ppl": 10.0, "device": "cpu"}
    upsert_rows(home / "tables" / "perplexity.csv", [base, base | {"dataset": "ptb", "ppl": 30.0}], PERPLEXITY_COLUMNS)
    upsert_rows(remote / "tables" / "perplexity.csv", [base | {"ppl": 12.0, "device": "H100"}], PERPLEXITY_COLUMNS)
    assert list(merge_tables(tmp_path / "remote", home).values()) == [1]
    table = pd.read_csv(home / "tables" / "perplexity.csv")
    assert sorted(zip(table.dataset, table.ppl, table.device)) == [("ptb", 30.0, "cpu"), ("x", 12.0, "H100")]
    # a calibration piece written before peak_gpu_reserved_gib existed: merged, the new column "-"
    older = [c for c in CALIBRATION_COLUMNS if c != "peak_gpu_reserved_gib"]
    pd.DataFrame([{c: "1" for c in older}]).to_csv(remote / "tables" / "calibration.csv", index=False)
    merge_tables(tmp_path / "remote", home)
    calibration = pd.read_csv(home / "tables" / "calibration.csv", keep_default_na=False, dtype=str)
    assert list(calibration.columns) == CALIBRATION_COLUMNS and calibration.peak_gpu_reserved_gib.tolist() == ["-"]


def test_zero_shot_averages_leave_out_what_fp_lacks_and_say_so():
    """FP without HellaSwag: QLLM's five-task average runs over the other four for FP and the method
    alike (named so); with every task present it is the paper's average."""
    from eval.report_index import our_average_drops

    def rows(method, bits, scores):
        return [{"model": "m", "method": method, "w_bits": bits, "a_bits": bits, "kv_bits": 16, "task": t,
                 "metric": "acc", "value": v, "limit": "all", "device": "cpu", "profile": "paper"}
                for t, v in scores.items()]
    four = {"piqa": 0.6, "arc_easy": 0.5, "arc_challenge": 0.3, "winogrande": 0.5}
    table = pd.DataFrame(rows("fp", 16, four) + rows("qllm", 4, {**{t: v - 0.1 for t, v in four.items()},
                                                                   "hellaswag": 0.9}))
    (drop,) = [r for r in our_average_drops(table, "paper") if r["average"].startswith("avg_qllm5")]
    assert drop["average"] == "avg_qllm5 without hellaswag (FP lacks it)"
    assert drop["points below FP"] == pytest.approx(10.0) and drop["bits"] == "W4A4"
    complete = pd.concat([table, pd.DataFrame(rows("fp", 16, {"hellaswag": 0.4}))])
    (drop,) = [r for r in our_average_drops(complete, "paper") if r["average"].startswith("avg_qllm5")]
    assert drop["average"] == "avg_qllm5" and drop["points below FP"] == pytest.approx(100 * (0.46 - 0.48))


def _add_rows(path: str, worker: int, count: int) -> None:
    from eval.reports import PERPLEXITY_COLUMNS, upsert_rows

    for i in range(count):
        row = {c: "x" for c in PERPLEXITY_COLUMNS} | {"dataset": f"w{worker}-{i}", "ppl": float(i)}
        upsert_rows(path, [row], PERPLEXITY_COLUMNS)


def test_concurrent_writers_lose_no_rows(tmp_path):
    """prequantize's workers merge rows into one table at once: the table lock keeps every row (without it,
    two read-merge-write cycles overlap and one writer's row is lost)."""
    import multiprocessing

    path, workers, count = tmp_path / "perplexity.csv", 4, 15
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_add_rows, args=(str(path), w, count)) for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    table = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert sorted(table.dataset) == sorted(f"w{w}-{i}" for w in range(workers) for i in range(count))
    assert path.with_suffix(".md").read_text().count("\n") == workers * count + 2
    assert not list(tmp_path.glob(".*.partial"))  # every write went through its temporary file and was moved
