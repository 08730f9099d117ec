"""Local-first data loading: real files, the evaluation protocol, and errors that name the file."""
import pytest
import torch

from qllm_core import data
from qllm_core.data import DataUnavailableError


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)


def test_wikitext2_protocol_windows(embedded, data_dir):
    windows = data.eval_windows(embedded.tokenizer, "wikitext2", 2048, data_dir)
    assert windows.shape == (148, 2048)  # 304,986 tokens (gpu-machine.md reference)
    assert data.eval_windows(embedded.tokenizer, "wikitext2", 2048, data_dir, max_windows=8).shape == (8, 2048)


def test_ptb_calibration_is_seeded(embedded, data_dir):
    a = data.calibration_windows(embedded.tokenizer, "ptb", 4, 64, seed=0, data_dir=data_dir)
    b = data.calibration_windows(embedded.tokenizer, "ptb", 4, 64, seed=0, data_dir=data_dir)
    c = data.calibration_windows(embedded.tokenizer, "ptb", 4, 64, seed=1, data_dir=data_dir)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_missing_file_error_names_file_and_dir(tmp_path, offline):
    with pytest.raises(DataUnavailableError, match=r"ptb/ptb\.test\.txt") as err:
        data.load_rows("ptb", "test", tmp_path)
    assert str(tmp_path) in str(err.value) and "not reachable" in str(err.value)


def test_offline_without_local_wikitext_train_or_c4(data_dir, offline):
    with pytest.raises(DataUnavailableError, match="wikitext2 train"):
        data.load_rows("wikitext2", "train", data_dir)
    with pytest.raises(DataUnavailableError, match="c4 validation"):
        data.load_rows("c4", "validation", data_dir)
    assert data.default_calibration_dataset(data_dir) == "ptb"


def test_no_data_dir_is_explained(monkeypatch, offline):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(DataUnavailableError, match="QLLM_DATA_DIR"):
        data.load_rows("wikitext2", "test")


def test_unknown_dataset_rejected(embedded):
    with pytest.raises(ValueError, match="unknown evaluation dataset 'wiki'"):
        data.eval_windows(embedded.tokenizer, "wiki")
