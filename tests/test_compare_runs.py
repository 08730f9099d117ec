"""eval.compare_runs: two runs made two ways compare equal; a changed method does not; bad input is named."""
from __future__ import annotations

import pytest
import torch

from eval.compare_runs import compare_runs, main
from qllm_core.engine import BlockwiseEngine
from qllm_core.methods import QuantConfig, make_method


def _run(tiny_llama, run_dir, concurrent_layers=1, epochs=2):
    model, adapter = tiny_llama(layers=3)
    method = make_method("flatquant", QuantConfig(w_bits=4, a_bits=4, kv_bits=4), epochs=epochs, batch_size=2)
    BlockwiseEngine(model, adapter, layer_dir=run_dir / "layers", concurrent_layers=concurrent_layers).run(
        method, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5)))


def test_runs_made_two_ways_compare_equal_and_a_changed_method_differs(tiny_llama, tmp_path, capsys):
    _run(tiny_llama, tmp_path / "one")
    _run(tiny_llama, tmp_path / "three", concurrent_layers=3)
    _run(tiny_llama, tmp_path / "longer", epochs=3)
    same = compare_runs(tmp_path / "one", tmp_path / "three")
    assert same["layers_compared"] == 3 and same["tensors_compared"] > 30
    assert same["differing_tensors"] == 0 and same["max_relative_diff"] == 0.0
    changed = compare_runs(tmp_path / "one", tmp_path / "longer")
    assert changed["differing_tensors"] > 0 and changed["max_relative_diff"] > 1e-4
    assert main([str(tmp_path / "one"), str(tmp_path / "longer"), "--out", str(tmp_path / "diff.json")]) == 0
    assert '"differing_tensors"' in (tmp_path / "diff.json").read_text() and "worst_tensor" in capsys.readouterr().out


def test_a_run_without_checkpoints_is_named(tmp_path):
    (tmp_path / "empty" / "layers").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no layer checkpoints in .*empty/layers"):
        compare_runs(tmp_path / "empty", tmp_path / "empty")
