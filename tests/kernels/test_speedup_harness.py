"""eval.speedup without a GPU: it refuses to measure (no fake numbers); the report writer works."""
import pandas as pd
import pytest
import torch

sp = pytest.importorskip("eval.speedup")


def test_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        sp.main(["--quick", "--out", "unused"])


def test_writer_and_overhead_table(tmp_path):
    rows = []
    for variant, ms in [("w4a4", 1.0), ("flatquant", 1.05), ("quarot", 1.2)]:
        rows.append(dict(shape="s", phase="prefill", batch=1, seqlen=2048, kv_len=0, variant=variant, baseline="bf16",
                         baseline_ms=2.0, ms=ms, speedup=2.0 / ms, device="test", tflops=float("nan"),
                         gbps=float("nan")))
    df = pd.DataFrame(rows, columns=sp.COLUMNS)
    ov = sp.overhead_table(df)
    assert ov["flatquant_overhead"].item() == pytest.approx(0.05)
    assert ov["quarot_overhead"].item() == pytest.approx(0.2)
    sp.write_speedup_tables(df, tmp_path, note="unit test")
    assert pd.read_csv(tmp_path / "tables" / "speedup.csv").shape == (3, len(sp.COLUMNS))
    assert "flatquant_overhead" in (tmp_path / "tables" / "speedup.md").read_text()
    assert (tmp_path / "figures" / "speedup_prefill.png").exists()


def _row(**kw):
    row = dict(shape="s", phase="prefill", batch=1, seqlen=2048, kv_len=0, variant="w4a4", baseline="bf16",
               baseline_ms=2.0, ms=1.0, speedup=2.0, device="test", tflops=float("nan"), gbps=float("nan"),
               mem_gb=float("nan"), baseline_mem_gb=float("nan"))
    row.update(kw)
    return row


def test_memory_columns_are_appended_and_merge_keeps_old_rows(tmp_path):
    """Old csv files (without the memory columns) merge in with "-"; re-measured keys are replaced."""
    assert sp.COLUMNS[-2:] == sp.MEM_COLUMNS
    old_cols = sp.COLUMNS[:-2]
    (tmp_path / "tables").mkdir()
    old = pd.DataFrame([_row(), _row(variant="flatquant", ms=1.1), _row(phase="gemm", variant="w4a4_fp8", tflops=500.0)])[old_cols]
    old.to_csv(tmp_path / "tables" / "speedup.csv", index=False)
    new = pd.DataFrame([_row(ms=0.9, speedup=2.2),
                        _row(shape="llama2-7b-model", variant="flatquant-fp8", ms=1.5, speedup=1.33, mem_gb=12.5,
                             baseline_mem_gb=16.25),
                        _row(shape="llama2-7b-model", variant="w4a4-fp8", ms=1.4, speedup=1.43, mem_gb=12.0,
                             baseline_mem_gb=16.25)], columns=sp.COLUMNS)
    new.attrs["model_weights"] = [dict(shape="llama2-7b-model", layers=32, variant="bf16", weights_gb=12.9, device="t")]
    sp.write_speedup_tables(new, tmp_path, note="merge test", merge=True)
    out = pd.read_csv(tmp_path / "tables" / "speedup.csv", keep_default_na=False)
    assert list(out.columns) == sp.COLUMNS and len(out) == 5
    w4a4 = out[(out["shape"] == "s") & (out.variant == "w4a4")]
    assert len(w4a4) == 1 and w4a4.ms.item() == 0.9  # replaced, not duplicated
    assert set(out[out["shape"] == "s"].mem_gb) == {"-"} and set(out[out["shape"] == "s"].baseline_mem_gb) == {"-"}
    assert out[out.variant == "flatquant-fp8"].mem_gb.item() == "12.5"
    md = (tmp_path / "tables" / "speedup.md").read_text()
    assert "Whole model (32 decoder layers), prefill" in md and "weight memory" in md
    assert "flatquant-fp8_overhead" in md  # the fp8 pair has its own overhead column
    assert pd.read_csv(tmp_path / "tables" / "speedup_model_memory.csv").weights_gb.item() == 12.9
    # without merge the table holds this run only
    sp.write_speedup_tables(new, tmp_path, note="replace")
    assert len(pd.read_csv(tmp_path / "tables" / "speedup.csv")) == 3


def test_model_phase_is_a_cli_choice():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        sp.main(["--phases", "model", "--merge", "--model-kv-lens", "512", "--out", "unused"])
    with pytest.raises(SystemExit):
        sp.main(["--phases", "modell"])  # argparse refuses unknown phases


def test_bench_model_small_on_gpu(cuda):
    """The whole-model bench end to end with 2 layers (timings not checked, only the rows)."""
    rows = sp._Rows("gpu")
    sp.bench_model(rows, [1], [1], [64], variants=("w4a4-fp8",), n_layers=2)
    df = pd.DataFrame(rows.rows, columns=sp.COLUMNS)
    assert set(df.phase) == {"prefill", "decode"} and set(df["shape"]) == {"llama2-7b-model"}
    assert (df.mem_gb > 0).all() and (df.baseline_mem_gb > 0).all()
    assert {r["variant"] for r in rows.model_weights} == {"bf16", "w4a4-fp8"}


def test_bench_model_logic_on_cpu(device, monkeypatch):
    """bench_model's bookkeeping with the timers and memory probes stubbed (CPU, Triton interpreter):
    a 2-layer tiny stack, one prefill (24 tokens: the FP8 path) and one decode case per variant."""
    from kernels.llama_layer import LlamaShape
    from kernels import fp8_linear
    if device != "cpu":
        pytest.skip("the GPU runs test_bench_model_small_on_gpu")
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        fp8_linear.fp8_scaled_mm(a, torch.ones(16, 1), a, torch.ones(1, 16))
    except (RuntimeError, NotImplementedError):
        pytest.skip("no CPU torch._scaled_mm for float8 in this torch build")
    calls = []
    monkeypatch.setattr(sp, "_cuda", lambda: torch)
    monkeypatch.setattr(sp, "PREFILL_SEQ", 24)
    monkeypatch.setattr(sp, "_bench", lambda fn, graph=False: (calls.append(graph), fn(), 2.0 if graph else 4.0)[2])
    monkeypatch.setattr(sp, "_peak_gb", lambda fn: (fn(), 1.5)[1])
    monkeypatch.setattr(sp, "_allocated_gb", lambda: 0.0)
    rows = sp._Rows("cpu")
    tiny = LlamaShape("tiny", hidden=64, inter=160, heads=2, kv_heads=1, head_dim=32)
    sp.bench_model(rows, [1], [2], [8], variants=("w4a4-fp8",), n_layers=2, shape=tiny, device="cpu")
    df = pd.DataFrame(rows.rows, columns=sp.COLUMNS)
    assert calls == [False, True, False, True]  # prefill timed plainly, decode in a CUDA graph; bf16 then fp8
    assert list(df.phase) == ["prefill", "decode"] and set(df["shape"]) == {"tiny-model"}
    assert list(df.seqlen) == [24, 1] and list(df.kv_len) == [0, 8] and list(df.batch) == [1, 2]
    assert (df.speedup == 1.0).all() and (df.mem_gb == 1.5).all() and (df.baseline_mem_gb == 1.5).all()
    assert [r["variant"] for r in rows.model_weights] == ["bf16", "w4a4-fp8"]
