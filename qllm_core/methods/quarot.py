"""QuaRot (Ashkboos et al., 2024): Hadamard rotations that remove outliers, then RTN or GPTQ weights.

``prepare_model`` (global, deterministic from ``seed``):
  1. untie lm_head from the embedding, fold every RMSNorm scale into the following linears;
  2. rotate the residual stream by the randomized Hadamard Q = diag(±1)·H/√hidden (seeded),
     merged into the embedding, all q/k/v/gate/up (input side), o/down (output side), lm_head;
  3. rotate V per head by H_head_dim (v_proj rows) and undo it in o_proj's columns.
``build_layer``: RTN-style QuantLinears, plus the online Hadamard of size ``intermediate`` before
down_proj (non-power-of-two sizes via the Hadamard-Kronecker construction, see
:mod:`qllm_core.algorithms.hadamard`) and, when the KV cache is quantized, H_head_dim on Q and K
after RoPE ahead of the KV quantizers (section 4 of the paper).
``calibrate_layer``: ``weight_quantizer="rtn"`` freezes RTN weights (no data needed);
``"gptq"`` runs GPTQ on the rotated weights with Hessians of the rotated inputs.

Differences from QuaRot's code, stated: QuaRot also applies an online Hadamard over the heads
before o_proj (H_num_heads ⊗ H_head_dim, with H_head_dim merged into v_proj); we merge only the
per-head H_head_dim (exact, no online cost), because head counts such as 9 (SmolLM2) have no
Hadamard matrix. QuaRot's RTN weights use a per-channel MSE clip search (``--w_clip``) and its
activation/K quantizers a 0.9/0.95 clip ratio; here the clip ratios come from ``QuantConfig``
(``w_clip_ratio``, ``a_clip_ratio``) and no search is done.
"""
from __future__ import annotations

from torch import nn

from ..adapters import ModelAdapter
from ..algorithms.gptq import gptq_quantize_layer
from ..algorithms.hadamard import hadamard_matrix, random_hadamard
from ..algorithms.rotation import (HadamardQKHook, OnlineHadamard, fold_rms_norms, rotate_residual, rotate_values,
                                   untie_embeddings)
from ..attention import HOOK_ATTR, set_attention_hook
from ..engine import LayerContext
from ..quant import OFF_BITS
from .base import QuantConfig, QuantMethod

WEIGHT_QUANTIZERS = ("rtn", "gptq")


class QuaRotMethod(QuantMethod):
    """Options: ``seed`` (0) of the random Hadamard signs, ``weight_quantizer`` ("rtn" | "gptq"),
    and GPTQ's ``blocksize`` (128), ``percdamp`` (0.01), ``act_order`` (False)."""

    name = "quarot"

    def __init__(self, quant: QuantConfig, seed: int = 0, weight_quantizer: str = "rtn", blocksize: int = 128,
                 percdamp: float = 0.01, act_order: bool = False):
        if weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"QuaRot weight_quantizer must be one of {WEIGHT_QUANTIZERS}, got {weight_quantizer!r}")
        super().__init__(quant, seed=seed, weight_quantizer=weight_quantizer, blocksize=blocksize,
                         percdamp=percdamp, act_order=act_order)
        self.needs_calibration = self.tracks_quant_inputs = weight_quantizer == "gptq"

    def prepare_model(self, model: nn.Module, adapter: ModelAdapter) -> None:
        super().prepare_model(model, adapter)
        untie_embeddings(model, adapter)
        fold_rms_norms(model, adapter)
        rotate_residual(model, adapter, random_hadamard(adapter.hidden_size, self.options["seed"]))
        head_rotation = hadamard_matrix(adapter.head_dim)
        for layer in adapter.layers:
            rotate_values(layer, adapter, head_rotation)

    def build_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None:
        super().build_layer(index, layer, adapter)
        adapter.linear(layer, "down_proj").input_transform = OnlineHadamard(adapter.intermediate_size)
        if self.quant.kv_bits != OFF_BITS:
            attention = adapter.attention(layer)
            set_attention_hook(attention, HadamardQKHook(adapter.head_dim, getattr(attention, HOOK_ATTR)))

    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None:
        if self.options["weight_quantizer"] == "gptq":
            gptq_quantize_layer(layer, ctx, self.options["blocksize"], self.options["percdamp"],
                                self.options["act_order"])
        else:
            super().calibrate_layer(layer, ctx)
