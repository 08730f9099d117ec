"""LLaMA-shaped models from a config alone: random weights, real shapes, for cost measurements.

Calibration cost depends on the shapes, the token counts and the method's work, not on the weights'
values, so it can be measured honestly on a model with LLaMA's dimensions and random weights
(real LLaMA weights cannot be loaded on these machines). The model is a transformers
``LlamaForCausalLM``, so the same engine and methods run on it as on a real checkpoint; only the
first ``layers`` decoder layers need to exist for timing.

Random weights give activations without the outlier channels real LLMs have, which would leave
QLLM's threshold search little to do. ``outlier_channels`` input channels of every RMSNorm are
therefore scaled by ``outlier_scale`` (QLLM, Sec. 1: a few channels with magnitudes ~10-100x
the rest), so reassembly and its search do real work.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# transformers LlamaConfig fields of the published checkpoints (their config.json files).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30, vocab_size=49152, rope_theta=100000.0),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000, rope_theta=10000.0),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                       num_hidden_layers=40, vocab_size=32000, rope_theta=10000.0),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       num_hidden_layers=80, vocab_size=32000, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       num_hidden_layers=80, vocab_size=128256, rope_theta=500000.0),
}


def shape_config(shape: str, layers: int | None = None, vocab_size: int | None = None) -> LlamaConfig:
    """The ``LlamaConfig`` of ``shape`` with ``layers`` decoder layers (default: all of them).

    ``vocab_size`` may shrink the embedding (it is not part of any layer's calibration work).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; available: {sorted(SHAPES)}")
    fields = dict(SHAPES[shape])
    total = fields["num_hidden_layers"]
    if layers is not None:
        if not 1 <= layers <= total:
            raise ValueError(f"{shape} has {total} decoder layers; cannot build {layers}")
        fields["num_hidden_layers"] = layers
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    rope = {"rope_theta": fields.pop("rope_theta"), "rope_type": "default"}  # LLaMA-3's long-context scaling
    # changes nothing at 2048 tokens of calibration cost
    return LlamaConfig(**fields, rope_parameters=rope, head_dim=fields["hidden_size"] // fields["num_attention_heads"],
                       max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)


@torch.no_grad()
def shaped_llama(shape: str, layers: int | None = None, seed: int = 0, outlier_channels: int = 8,
                 outlier_scale: float = 30.0, vocab_size: int | None = None,
                 dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A random-weight ``LlamaForCausalLM`` of ``shape`` (eval mode, CPU) with planted outlier channels."""
    config = shape_config(shape, layers, vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            channels = torch.randperm(config.hidden_size, generator=generator)[:outlier_channels]
            norm.weight[channels] *= outlier_scale
    return model
