"""Perplexity protocol, the CLI's JSON contract, and a papermill run of the notebook."""
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from eval.perplexity import window_losses
from eval.profiles import get_profile
from eval.reproduce import list_notebooks, run_notebook
from tests.conftest import REPO, make_tiny_llama


def test_window_losses_match_hf_loss():
    model = make_tiny_llama()
    windows = torch.randint(0, 128, (3, 40))
    ours = window_losses(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        ref = torch.stack([model(w[None], labels=w[None]).loss for w in windows]).double()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_fake_quant_window_losses_do_not_depend_on_windows_per_forward(tiny_llama):
    """The GPU measures perplexity 4 windows per forward (eval_windows_per_forward), the CPU 1: a W4A4KV4
    model's per-token activation and KV quantizers see the same tokens either way (1e-6 relative: the
    matmuls' batch-dependent float32 rounding)."""
    from eval.experiments import eval_windows_per_forward
    from qllm_core.engine import BlockwiseEngine
    from qllm_core.methods import QuantConfig, make_method

    model, adapter = tiny_llama(layers=2)
    BlockwiseEngine(model, adapter).run(make_method("rtn", QuantConfig(w_bits=4, a_bits=4, kv_bits=4)))
    windows = torch.randint(0, 128, (5, 48), generator=torch.Generator().manual_seed(3))
    one = window_losses(model, windows, batch_size=1, progress=False)
    four = window_losses(model, windows, batch_size=4, progress=False)
    torch.testing.assert_close(four, one, rtol=1e-6, atol=0)
    assert eval_windows_per_forward("cpu") == 1 and eval_windows_per_forward("cuda:0") == 4


def _cli(*args, env_data_dir):
    env = {**os.environ, "QLLM_DATA_DIR": str(env_data_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_cli_ppl_json_last_line(tiny_model_dir, data_dir):
    out = _cli("ppl", "--model", str(tiny_model_dir), "--dataset", "wikitext2", "--max-windows", "2", "--json",
               env_data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["windows"] == 2 and math.isfinite(result["ppl"]) and result["ppl"] > 1


def test_cli_rejects_bad_bits(tmp_path, data_dir):
    out = _cli("quantize", "--model", "embedded", "--method", "rtn", "--w-bits", "9", "--out", str(tmp_path),
               env_data_dir=data_dir)
    assert out.returncode != 0 and "w_bits must be an integer in 2..8" in out.stderr


def test_perplexity_notebook_runs_with_papermill(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_DATA_DIR", str(data_dir))
    reports = tmp_path / "reports"
    params = {"profile": "smoke", "model": str(tiny_model_dir), "method": "rtn", "w_bits": 4, "a_bits": 4,
              "kv_bits": 4, "datasets": ["wikitext2"], "max_windows": 1, "run_root": str(tmp_path / "runs"),
              "reports_dir": str(reports)}
    html = run_notebook(list_notebooks(["perplexity"])[0], params, reports)
    assert html.is_file() and "Perplexity of quantized models" in html.read_text()
    table = pd.read_csv(reports / "tables" / "perplexity.csv")
    assert sorted(table["method"]) == ["fp", "rtn"] and (table["windows"] == 1).all()
    assert table.loc[table.method == "rtn", "ppl"].item() != table.loc[table.method == "fp", "ppl"].item()


def test_profile_grids_split_core_and_extra_without_overlap():
    smoke = get_profile("smoke")
    core, extra = smoke.grid("core"), smoke.grid("extra")
    slugs = [e.slug() for e in core + extra]
    assert len(slugs) == len(set(slugs)) and core and extra
    assert [e.slug() for e in smoke.grid("all")] == slugs
    assert {e.slug() for e in get_profile("paper").grid("all")} >= {e.slug() for e in core if e.method in ("fp", "rtn")}
    with pytest.raises(ValueError, match="unknown grid"):
        smoke.grid("everything")


def test_prequantize_makes_the_runs_the_notebook_reuses(tiny_model_dir, data_dir, tmp_path):
    from qllm_core.runs import read_run

    env = {**os.environ, "QLLM_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "eval.prequantize", "--profile", "smoke", "--grid", "core", "--model",
            str(tiny_model_dir), "--only-methods", "rtn", "--jobs-per-gpu", "2", "--run-root", str(tmp_path)]
    first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    expected = [e for e in get_profile("smoke").grid("core") if e.report_method == "rtn"]
    assert first.stdout.startswith(f"{len(expected)} runs to make with 2 workers on no GPU(s)")
    for exp in expected:
        record = read_run(tmp_path / exp.slug())
        assert record["status"] == "complete" and record["stats"]["concurrent_jobs"] == 2
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.startswith("0 runs to make")
    one = subprocess.run(args + ["--evaluate", "--only-runs", expected[0].slug(), "--reports-dir", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert one.returncode == 0 and one.stdout.startswith("1 runs to make"), one.stderr
    unknown = subprocess.run(args + ["--only-runs", "rtn-W3A3-x"], cwd=REPO, env=env, capture_output=True, text=True)
    assert unknown.returncode != 0 and "no run ['rtn-W3A3-x'] in the core grid" in unknown.stderr
    none_at_once = subprocess.run(args + ["--concurrent-layers", "0"], cwd=REPO, env=env, capture_output=True, text=True)
    assert none_at_once.returncode != 0 and "--concurrent-layers must be >= 1" in none_at_once.stderr

    # --evaluate: every run evaluated (stored in the run directories), rows merged into the tables
    reports = tmp_path / "reports"
    evaluate = args + ["--evaluate", "--reports-dir", str(reports)]
    done = subprocess.run(evaluate, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(reports / "tables" / "perplexity.csv")
    assert len(table) == 2 * len(expected) and set(table.method) == {"rtn"}
    assert table.windows.eq(8).all() and table.ppl.gt(1).all()
    assert not (reports / "tables" / "calibration.csv").exists()  # RTN needs no calibration data
    stored = sorted(p.name for p in (tmp_path / expected[0].slug() / "eval").iterdir())
    assert stored == ["ppl-ptb-2048-8.json", "ppl-wikitext2-2048-8.json"]


def test_prequantize_zeroshot_evaluates_each_run_once(tiny_model_dir, data_dir, tmp_path):
    """--zeroshot: every task of the profile's subset, cached in the run directory, rows with the averages;
    --missing-only then finds nothing to do."""
    from eval.zeroshot import TASKS

    env = {**os.environ, "QLLM_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    reports = tmp_path / "reports"
    args = [sys.executable, "-m", "eval.prequantize", "--profile", "smoke", "--grid", "core", "--model",
            str(tiny_model_dir), "--only-methods", "fp", "--run-root", str(tmp_path / "runs"), "--evaluate",
            "--zeroshot", "--reports-dir", str(reports), "--missing-only"]
    assert subprocess.run(args[:-5] + ["--zeroshot"], cwd=REPO, env=env, capture_output=True,
                          text=True).returncode != 0  # --zeroshot without --evaluate is refused
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(reports / "tables" / "zeroshot.csv")
    assert set(table.method) == {"fp"} and set(TASKS) | {"avg_qllm5", "avg_flatquant6"} == set(table.task)
    per_task = table[table.task.isin(TASKS)]
    assert (per_task.n == 10).all() and (per_task.limit.astype(str) == "10").all()
    assert per_task[per_task.metric.isin(["acc", "acc_norm"])].value.between(0, 1).all()
    cached = sorted(p.name for p in (tmp_path / "runs" / "fp-W16A16-s" / "eval").glob("zeroshot-*.json"))
    assert cached == sorted(f"zeroshot-{t}-10.json" for t in TASKS)
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.startswith("0 runs to make"), again.stdout


def test_cached_zero_shot_loads_no_model_once_stored(tmp_path):
    import json

    from eval.zeroshot import cached_zero_shot

    stored = {"rows": [{"task": "piqa", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 4}], "device": "cpu"}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "zeroshot-piqa-4.json").write_text(json.dumps(stored))

    def no_model():
        raise AssertionError("a stored result must not load the model")
    assert cached_zero_shot(tmp_path, no_model, "piqa", 4, "cpu") == stored


def test_calibration_row_reports_per_layer_time_and_sharing():
    from eval.experiments import calibration_row

    record = {"calibration": {"dataset": "ptb"}, "stats": {
        "calib_seconds": 100.0, "device": "cpu", "concurrent_jobs": 3, "layers_per_group": 4,
        "group_seconds": [8.0, 12.0, 40.0], "gpu_busy_share": None}}
    row = calibration_row({"method": "qllm"}, record)
    assert row["seconds_per_layer"] == 3.0 and row["jobs"] == 3 and row["gpu_busy_share"] == "-"
    assert row["calib_seconds"] == 100.0 and row["device"] == "cpu"
    assert calibration_row({}, {"stats": None}) is None  # RTN: nothing calibrated
    resumed = {**record, "stats": {**record["stats"], "resumed_layers": 8}}
    assert calibration_row({}, resumed)["calib_seconds"] == "-"  # only part of the calibration ran here
    assert row["concurrent_layers"] == 1  # records written before the option
    windows = {**record, "stats": {**record["stats"], "layers_per_group": 1, "concurrent_layers": 4}}
    assert calibration_row({}, windows)["seconds_per_layer"] == 3.0  # a timed group: a window of 4 layers
    assert calibration_row({}, windows)["concurrent_layers"] == 4


def test_prequantize_set_overrides_one_methods_option():
    from eval.experiments import Experiment
    from eval.prequantize import with_options

    flat = Experiment("flatquant", options={"epochs": 15})
    assert with_options(flat, ["flatquant.epochs=2"]).options == {"epochs": 2}
    assert with_options(flat, ["flatquant.epochs=2"]).slug() != flat.slug()  # its own run directory
    assert with_options(Experiment("qllm"), ["flatquant.epochs=2"]).options == {}
    with pytest.raises(SystemExit, match="METHOD.OPTION=JSON"):
        with_options(flat, ["epochs=2"])


def test_prequantize_gpu_slots_name_the_parents_devices():
    from eval.prequantize import gpu_slots

    # a job given GPUs 1 and 2 keeps its workers there (slot index 0 is device "1", not device "0")
    assert gpu_slots(4, 2, "1,2") == ["1", "2", "1", "2"]
    assert gpu_slots(3, 3, None) == ["0", "1", "2"]
    assert gpu_slots(2, 1, "GPU-abc, GPU-def") == ["GPU-abc", "GPU-abc"]  # UUIDs pass through; first device only
    assert gpu_slots(2, 0, "0") == [None, None]  # CPU
    with pytest.raises(ValueError, match="names 1"):
        gpu_slots(2, 2, "3")


def test_prequantize_starts_the_longest_runs_first(tmp_path):
    """QLLM's error-correction runs start before its short reassembly-only runs (in the stop-23 grid the
    reassembly-only runs took the slots and two error-correction runs never started), FP before everything."""
    from eval.prequantize import pending

    order = [e.report_method for e in pending(get_profile("paper").grid("all"), tmp_path, evaluate=True)]
    assert order[0] == "fp" and order[-1].startswith("rtn")
    assert order.index("qllm-reassembly") > max(i for i, method in enumerate(order) if method == "qllm")
    assert order.index("flatquant") > order.index("omniquant")


def test_prequantize_caps_each_run_sharing_a_gpu(monkeypatch):
    """Runs sharing a GPU each get an equal share of its memory (none on the CPU or alone on the GPU)."""
    import eval.prequantize as prequantize

    caps = []
    monkeypatch.setattr(prequantize, "cap_gpu_memory", lambda device, share: caps.append((device, share)))
    prequantize.share_gpu("cuda", 1)
    prequantize.share_gpu("cpu", 4)
    assert caps == []
    prequantize.share_gpu("cuda", 4)
    assert caps == [("cuda", pytest.approx(prequantize.GPU_SHARE_USED / 4))]


def test_capped_room_counts_what_the_process_holds(monkeypatch):
    """Under a cap, free_gpu_bytes reports the smaller of the driver's free memory and the cap less what this
    process reserved: a CUDA-graph capture must not be started on memory its process may not take."""
    import qllm_core.gpu_monitor as gpu_monitor

    gib = 2**30
    state = {"reserved": 6 * gib}
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, index: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 80 * gib}))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.update(reserved=2 * gib))
    monkeypatch.setattr(gpu_monitor, "_CAPS", {})
    assert gpu_monitor.free_gpu_bytes("cuda:0", enough=gib) == 40 * gib  # no cap: the driver's figure
    gpu_monitor.cap_gpu_memory("cuda:0", 0.125)  # 10 GiB
    assert gpu_monitor.free_gpu_bytes("cuda:0", enough=gib) == 4 * gib  # 10 - 6 reserved, no clean-up
    assert gpu_monitor.free_gpu_bytes("cuda:0", enough=5 * gib) == 8 * gib  # cache handed back: 10 - 2
    with pytest.raises(ValueError, match="share"):
        gpu_monitor.cap_gpu_memory("cuda:0", 1.5)
