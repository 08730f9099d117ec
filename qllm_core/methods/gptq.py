"""GPTQ (Frantar et al., ICLR 2023) as a method: second-order weight quantization, layer by layer.

Typical use is weight-only (W4A16; GPTQ's own scripts use asymmetric per-channel or group-128
weights), but any activation/KV bits work: activations are then RTN per token as in the base
method. Hessians come from the inputs produced by the already-quantized previous layers
(``tracks_quant_inputs``), quantized in GPTQ's "true sequential" order inside each layer.
"""
from __future__ import annotations

from torch import nn

from ..algorithms.gptq import gptq_quantize_layer
from ..engine import LayerContext
from .base import QuantConfig, QuantMethod


class GPTQMethod(QuantMethod):
    """Options (GPTQ's defaults): ``blocksize`` 128, ``percdamp`` 0.01, ``act_order`` False,
    ``true_sequential`` True."""

    name = "gptq"
    needs_calibration = True
    tracks_quant_inputs = True

    def __init__(self, quant: QuantConfig, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                 true_sequential: bool = True):
        if blocksize < 1 or not 0.0 <= percdamp:
            raise ValueError(f"GPTQ needs blocksize >= 1 and percdamp >= 0, got {blocksize}, {percdamp}")
        super().__init__(quant, blocksize=blocksize, percdamp=percdamp, act_order=act_order,
                         true_sequential=true_sequential)

    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None:
        gptq_quantize_layer(layer, ctx, **self.options)
