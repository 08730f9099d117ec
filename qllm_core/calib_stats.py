"""Activation statistics gathered from a layer's calibration inputs.

SmoothQuant's migration scales, FlatQuant's ``add_diag`` initialisation and QLLM's outlier
thresholds all start from the per-channel maximum magnitude of a linear layer's *input* over the
calibration tokens; this module computes it once with forward hooks.
"""
from __future__ import annotations

import torch
from torch import nn

from .engine import LayerContext


@torch.no_grad()
def input_channel_absmax(layer: nn.Module, ctx: LayerContext, modules: dict[str, nn.Module],
                         inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each module's input over all calibration tokens (float32, CPU).

    ``inputs`` defaults to the FP inputs of the layer (``ctx.fp_inputs``).
    """
    inputs = ctx.fp_inputs if inputs is None else inputs
    stats: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float().cpu()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    try:
        for i in range(inputs.shape[0]):
            ctx.forward(layer, inputs[i : i + 1].to(ctx.device))
    finally:
        for h in handles:
            h.remove()
    return stats
