"""Activation statistics gathered from a layer's calibration inputs.

SmoothQuant's migration scales, FlatQuant's ``add_diag`` initialisation and QLLM's outlier
thresholds all start from the per-channel maximum magnitude of a linear layer's *input* over the
calibration tokens; QLLM's pair scores also need the inputs themselves. Both come from running
the layer window by window with forward pre-hooks on the linears of interest — or, for the roles a
method names in ``fp_input_roles``, from the engine's own FP pass (:func:`qllm_core.engine.fp_pass`),
which already runs the FP layer over every window.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the engine gathers statistics with these helpers during its FP pass
    from .engine import LayerContext

WINDOWS_PER_PASS = 8


@contextlib.contextmanager
def observing(modules: dict[str, nn.Module], observe: Callable[[str, torch.Tensor], None]):
    """Within the block, call ``observe(name, x)`` with the input ``x`` of every forward of a module in
    ``modules`` (keyed by name). A module called again on the very tensor it just saw (an activation
    quantizer shared by q/k/v) reports it once."""
    last: dict[str, torch.Tensor] = {}  # kept referenced, so an id is never reused while compared

    def hook(name: str, x: torch.Tensor) -> None:
        if last.get(name) is not x:
            last[name] = x
            observe(name, x.detach())

    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0]))
               for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def observe_inputs(layer: nn.Module, ctx: LayerContext, modules: dict[str, nn.Module], inputs: torch.Tensor,
                   observe: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``layer`` on ``inputs`` (``WINDOWS_PER_PASS`` windows per forward) :func:`observing` ``modules``."""
    with observing(modules, observe):
        for i in range(0, inputs.shape[0], WINDOWS_PER_PASS):
            ctx.forward(layer, inputs[i : i + WINDOWS_PER_PASS].to(ctx.device))


class ChannelAbsmax:
    """Running per-channel max |x| of each observed name (an ``observe`` callback)."""

    def __init__(self):
        self.stats: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        channel_max = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        self.stats[name] = channel_max if name not in self.stats else torch.maximum(self.stats[name], channel_max)

    def result(self) -> dict[str, torch.Tensor]:
        """The maxima so far (float32, CPU)."""
        return {name: channel_max.cpu() for name, channel_max in self.stats.items()}


def input_channel_absmax(layer: nn.Module, ctx: LayerContext, modules: dict[str, nn.Module],
                         inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each module's input over all calibration tokens (float32, CPU).

    ``inputs`` defaults to the FP inputs of the layer (``ctx.fp_inputs``).
    """
    absmax = ChannelAbsmax()
    observe_inputs(layer, ctx, modules, ctx.fp_inputs if inputs is None else inputs, absmax)
    return absmax.result()


def capture_inputs(layer: nn.Module, ctx: LayerContext, modules: dict[str, nn.Module],
                   inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tensors ``(n, tokens, C)`` of ``modules`` for ``inputs`` (on the layer's device)."""
    seen: dict[str, list] = {name: [] for name in modules}
    observe_inputs(layer, ctx, modules, inputs, lambda name, x: seen[name].append(x))
    return {name: torch.cat(parts) for name, parts in seen.items()}
