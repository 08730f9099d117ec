"""Calibration cost at LLaMA scale: the projection arithmetic, the fits-one-GPU check, a real CPU measurement."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from eval.calibration_cost import (CALIBRATION_COST_COLUMNS, measure, projected_hours, run_profile, scale_epochs,
                                   seconds_per_layer, warm_up_surcharge)
from qllm_core.memory_budget import GIB, DoesNotFitError, check_fits_one_gpu, estimate_group_memory
from qllm_core.methods import QuantConfig, make_method
from qllm_core.shapes import shape_config

W4A4KV4 = QuantConfig(w_bits=4, a_bits=4, kv_bits=4)
QLLM_W4A4 = QuantConfig(w_bits=4, a_bits=4, w_asym=True, a_asym=True)


def test_median_after_the_warm_up_group():
    # the warm-up group (first) is slow and left out; groups of 4 layers, the last one short
    per_layer, note = seconds_per_layer([100.0, 8.0, 12.0, 3.0], [4, 4, 4, 1])
    assert per_layer == 3.0 and note == "3 after 1 warm-up"  # median of 2, 3, 3
    per_layer, note = seconds_per_layer([40.0, 8.0], [1, 1])
    assert per_layer == 8.0
    per_layer, note = seconds_per_layer([40.0], [4])  # one group only: used, and said so
    assert per_layer == 10.0 and "warm-up included" in note
    with pytest.raises(ValueError, match="one time per group"):
        seconds_per_layer([1.0, 2.0], [4])


def test_projection_and_epoch_scaling_arithmetic():
    assert projected_hours(90.0, 80, 0.0) == 2.0
    assert projected_hours(30.0, 80, 1200.0) == pytest.approx((2400 + 1200) / 3600)
    # 1 of 10 epochs measured: 6 s of a 10 s group trained -> 4 + 10 x 6 at the paper's epochs
    assert scale_epochs([10.0, 20.0], [6.0, 6.0], 1, 10) == [64.0, 74.0]
    assert scale_epochs([10.0], [6.0], 10, 10) == [10.0]  # measured at the paper's epochs: unchanged
    assert scale_epochs([10.0], [0.0], None, None) == [10.0]  # untrained method


def test_fits_check_refuses_a_70b_group_on_a_small_gpu_and_passes_7b_on_80gb():
    flat = make_method("flatquant", W4A4KV4)
    big = estimate_group_memory(shape_config("llama2-70b"), flat, 128, 2048, torch.float32, 24 * GIB, 8)
    with pytest.raises(DoesNotFitError) as err:
        check_fits_one_gpu("llama2-70b / flatquant W4A4KV4", big, 24 * GIB)
    message = str(err.value)
    assert "llama2-70b / flatquant" in message and "24.0 GiB" in message and "needs about" in message
    assert f"{(big.total + GIB) / GIB:.1f} GiB" in message
    qllm = make_method("qllm", QLLM_W4A4)
    small = estimate_group_memory(shape_config("llama2-7b"), qllm, 128, 2048, torch.float32, 80 * GIB, 8)
    check_fits_one_gpu("llama2-7b / qllm", small, 80 * GIB)  # no error
    assert small.layers_per_group == 4 and small.activations_on_gpu


def test_estimate_follows_the_engines_activation_rule():
    """QLLM's 6 activation copies of 70B (48 GiB) exceed half an 80 GB GPU: the engine keeps them on the
    host, so the estimate counts none on the GPU; FlatQuant's 2 copies (16 GiB) stay on the GPU."""
    config = shape_config("llama2-70b")
    qllm = estimate_group_memory(config, make_method("qllm", QLLM_W4A4), 128, 2048, torch.float32, 79 * GIB, 8)
    flat = estimate_group_memory(config, make_method("flatquant", W4A4KV4), 128, 2048, torch.float32, 79 * GIB, 8)
    assert not qllm.activations_on_gpu and qllm.activations == 0
    assert flat.activations_on_gpu and flat.activations == 3 * 8 * GIB  # 2 kept + 1 transient copy
    assert qllm.weights == 4 * flat.weights  # a 4-layer group
    assert qllm.total < 79 * GIB and flat.total < 79 * GIB


def test_host_memory_counts_qllms_merge_copy():
    """QLLM's error correction keeps one group's unquantized weights on the host for the merge
    (fuse_low_rank: Q_w(W + BA/r)); reassembly alone and other methods keep none."""
    from eval.calibration_cost import host_memory_gib
    from qllm_core.memory_budget import host_merge_bytes, layer_parameters

    config = shape_config("llama2-70b")
    qllm, plain = make_method("qllm", QLLM_W4A4), make_method("qllm", QLLM_W4A4, error_correction=False)
    assert host_merge_bytes(config, qllm, torch.float32) == 4 * layer_parameters(config) * 4
    assert host_merge_bytes(config, plain, torch.float32) == 0
    assert host_merge_bytes(config, make_method("flatquant", W4A4KV4), torch.float32) == 0
    args = (config, 80, 32000, torch.float32)
    extra = host_memory_gib(*args, qllm, 128, 2048, 80 * GIB) - host_memory_gib(*args, plain, 128, 2048, 80 * GIB)
    assert extra == pytest.approx(4 * layer_parameters(config) * 4 / GIB)


def test_the_check_runs_before_anything_is_built():
    with pytest.raises(DoesNotFitError, match="llama2-70b / qllm W4A4"):  # would take minutes to build
        measure("llama2-70b", "qllm", nsamples=128, seqlen=2048, gpu_memory_gib=8)


def test_unknown_shape_or_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model shape 'llama9-1b'"):
        measure("llama9-1b", "qllm")
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        measure("llama2-7b", "awq")
    with pytest.raises(ValueError, match="unknown model shape"):
        run_profile("smoke", shapes=["nope"], table=tmp_path / "t.csv")
    with pytest.raises(ValueError, match="unknown profile"):
        run_profile("huge", table=tmp_path / "t.csv")


def test_a_real_tiny_measurement_through_the_engine(tmp_path):
    table = tmp_path / "calibration_cost.csv"
    rows = run_profile("smoke", methods=["flatquant"], layers=2, epochs=1, table=table)
    row = rows[0]
    assert list(row) == CALIBRATION_COST_COLUMNS
    assert row["seconds_per_layer"] > 0 and row["projected_hours"] > 0
    assert row["layers_total"] == 30 and row["layers_measured"] == 2 and row["epochs"] == "1/15"
    assert row["peak_gpu_mem_gib"] == "-" and row["device"] == "cpu" and row["timed_groups"] == "1 after 1 warm-up"
    assert row["trainer"] == "eager" and row["matmul_precision"] == "-"
    # 30 layers x seconds per layer + fixed costs, in hours
    assert row["projected_hours"] == pytest.approx((30 * row["seconds_per_layer"] + row["fixed_seconds"]) / 3600,
                                                   abs=1e-3)
    saved = pd.read_csv(table, keep_default_na=False)
    assert list(saved.columns) == CALIBRATION_COST_COLUMNS and len(saved) == 1
    assert table.with_suffix(".md").is_file()


def test_notebook_renders_the_table_with_papermill(tmp_path):
    """evaluate=False: the notebook only renders rows already in the table (here one made up)."""
    from eval.calibration_cost import save_row
    from eval.reproduce import list_notebooks, run_notebook

    reports = tmp_path / "reports"
    row = {c: "-" for c in CALIBRATION_COST_COLUMNS} | {
        "shape": "llama2-70b", "method": "qllm", "bits": "W4A4", "layers_measured": 8, "layers_total": 80,
        "seconds_per_layer": 90.0, "projected_hours": 2.0, "calib_samples": 128, "calib_seqlen": 2048,
        "device": "NVIDIA H100 80GB HBM3", "profile": "smoke"}
    save_row(reports / "tables" / "calibration_cost.csv", row)
    html = run_notebook(list_notebooks(["calibration_cost"])[0], {"profile": "smoke", "reports_dir": str(reports),
                                                                  "evaluate": False}, reports)
    page = html.read_text()
    assert "Calibration cost at LLaMA scale" in page and "9.05 h" in page and "<img" in page


def test_report_index_shows_the_calibration_cost_rows(tmp_path):
    """reports/index.html gets a calibration-cost section with our projection beside the papers' claim.

    (Here rather than in tests/test_report_index.py, which another change is editing at the same time.)"""
    from eval.calibration_cost import save_row
    from eval.report_index import build_index

    reports = tmp_path / "reports"
    reports.mkdir()
    assert "no rows yet" in build_index(reports).read_text()
    row = {c: "-" for c in CALIBRATION_COST_COLUMNS} | {
        "shape": "llama2-70b", "method": "qllm", "bits": "W4A4", "layers_measured": 8, "layers_total": 80,
        "seconds_per_layer": 90.0, "projected_hours": 2.25, "calib_samples": 128, "calib_seqlen": 2048,
        "device": "NVIDIA H100 80GB HBM3", "profile": "paper", "paper_claim": "9.05 h, 1x A100-80G"}
    save_row(reports / "tables" / "calibration_cost.csv", row)
    save_row(reports / "tables" / "calibration_cost.csv", row | {"profile": "smoke", "projected_hours": 0.5})
    page = build_index(reports).read_text()
    assert "<h2>Calibration cost at LLaMA scale</h2>" in page
    section = page.split("<h2>Calibration cost at LLaMA scale</h2>")[1].split("<h2>")[0]
    assert "2.25" in section and "9.05 h, 1x A100-80G" in section and ">smoke<" not in section


def test_compiled_quantizers_need_a_gpu():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        measure("smollm2-135m", "flatquant", layers=1, nsamples=2, seqlen=16, device="cpu", compile_quantizers=True)


def test_the_warm_up_groups_one_time_cost_is_counted_once():
    """Two groups of 4 layers, the first 40 s slower (compilation): per layer from the second, +40 s fixed."""
    groups, sizes = [240.0, 200.0], [4, 4]
    per_layer, _ = seconds_per_layer(groups, sizes)
    assert per_layer == 50.0 and warm_up_surcharge(groups, sizes, per_layer) == 40.0
    assert warm_up_surcharge([200.0], [4], 50.0) == 0.0  # one group: its time is the per-layer figure already
    assert warm_up_surcharge([180.0, 200.0], [4, 4], 50.0) == 0.0  # a faster warm-up adds nothing
