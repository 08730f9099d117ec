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
