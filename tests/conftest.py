"""Shared test fixtures: tiny random LLaMA-family models and the data directory."""
from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Kernel tests run in the Triton interpreter on CPU-only machines (CI). The variable must be set
    # before triton is first imported, and transformers (imported below) imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM

from qllm_core.adapters import ModelAdapter

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("QLLM_DATA_DIR", REPO.parent / "shared" / "data"))


def make_tiny_llama(hidden: int = 64, intermediate: int = 96, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    vocab: int = 128, seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    """A random LLaMA with GQA (defaults) in eval mode; pass other sizes for non-power-of-two dims."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.config.use_cache = False
    return model


@pytest.fixture
def tiny_llama():
    """Factory fixture: ``tiny_llama(hidden=..., ...) -> (model, adapter)``."""
    def factory(**kwargs):
        model = make_tiny_llama(**kwargs)
        return model, ModelAdapter(model)
    return factory


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"data directory {DATA_DIR} not found: set QLLM_DATA_DIR to the shared data folder")
    return DATA_DIR


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M (converted once, then cached)."""
    from qllm_core.models import load_model
    return load_model("embedded")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded):
    """A random tiny LLaMA (GQA) saved with the embedded model's real tokenizer: a loadable model dir."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(vocab=len(embedded.tokenizer)).save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return path
