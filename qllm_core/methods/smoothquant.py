"""SmoothQuant (Xiao et al., ICML 2023) in the block-wise harness, then RTN weights.

Per decoder layer, the per-channel input maxima max|X_j| are measured on the FP layer inputs
(all quantizers bypassed, as SmoothQuant calibrates on the FP model), the migration scale
s = max|X|^α / max|W|^(1-α) (eq. 4) is computed per smoothing site and folded (exact in FP):

* ``qkv``: input RMSNorm scale ÷ s, q/k/v columns × s (SmoothQuant's LLaMA recipe);
* ``gate_up``: post-attention RMSNorm scale ÷ s, gate/up columns × s (SmoothQuant's LLaMA recipe);
* ``down``: up_proj rows ÷ s (down's input is act(gate)·up, linear in up's output), down columns × s;
* ``o``: v_proj rows ÷ s, o_proj columns × s. With GQA a V channel feeds every query head of
  its group, so s is shared across the group (act and weight maxima taken over the group first).

The original SmoothQuant code smooths only ``qkv`` and ``gate_up`` for LLaMA (its targets were
W8A8, where down/o inputs quantize fine); at W4A4/W6A6 the down_proj input carries the largest
outliers, so all four sites are the default here and ``sites`` selects a subset
(``("qkv", "gate_up")`` = the original recipe). Weights are then RTN-quantized (per channel).
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..algorithms.smoothing import smoothing_scales, weight_column_absmax
from ..calib_stats import input_channel_absmax
from ..engine import LayerContext
from ..quant import quantizers_off
from .base import QuantConfig, QuantMethod

SITES = ("qkv", "gate_up", "down", "o")
# Sites that divide a linear's rows (o: v_proj, down: up_proj) go first, so the weight maxima of
# qkv / gate_up are taken on the final v_proj / up_proj weights and every site ends balanced.
_APPLY_ORDER = ("o", "down", "qkv", "gate_up")
# The linear whose input is measured at each site, and the linears that read that input.
_MEASURED = {"qkv": "q_proj", "gate_up": "gate_proj", "down": "down_proj", "o": "o_proj"}
_CONSUMERS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"),
              "down": ("down_proj",), "o": ("o_proj",)}


def _scale_columns(linears: list[nn.Module], s: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.data.copy_((lin.weight.double() * s[None, :]).to(lin.weight.dtype))


def _divide_rows(linear: nn.Module, s: torch.Tensor) -> None:
    linear.weight.data.copy_((linear.weight.double() / s[:, None]).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.data.copy_((linear.bias.double() / s).to(linear.bias.dtype))


def _divide_norm(norm: nn.Module, s: torch.Tensor) -> None:
    norm.weight.data.copy_((norm.weight.double() / s).to(norm.weight.dtype))


def _grouped_head_max(x: torch.Tensor, adapter: ModelAdapter) -> torch.Tensor:
    """(num_heads·head_dim,) → (num_kv_heads·head_dim,) max over the query heads sharing a KV head."""
    groups = adapter.num_heads // adapter.num_kv_heads
    return x.reshape(adapter.num_kv_heads, groups, adapter.head_dim).amax(dim=1).reshape(-1)


def _expand_to_heads(s: torch.Tensor, adapter: ModelAdapter) -> torch.Tensor:
    groups = adapter.num_heads // adapter.num_kv_heads
    return s.reshape(adapter.num_kv_heads, 1, adapter.head_dim).expand(-1, groups, -1).reshape(-1)


@torch.no_grad()
def smooth_layer(layer: nn.Module, adapter: ModelAdapter, act_max: dict[str, torch.Tensor], alpha: float,
                 sites: tuple[str, ...]) -> None:
    """Fold SmoothQuant scales into one decoder layer (``act_max[site]``: per-channel max|X|),
    site by site in the order given (see ``_APPLY_ORDER``)."""
    for site in sites:
        consumers = [adapter.linear(layer, r) for r in _CONSUMERS[site]]
        w_max = weight_column_absmax([lin.weight for lin in consumers])
        a_max = act_max[site].to(w_max.device).double()  # statistics are gathered on the CPU
        if site == "o":
            s_kv = smoothing_scales(_grouped_head_max(a_max, adapter), _grouped_head_max(w_max, adapter), alpha)
            _divide_rows(adapter.linear(layer, "v_proj"), s_kv)
            s = _expand_to_heads(s_kv, adapter)
        else:
            s = smoothing_scales(a_max, w_max, alpha)
            if site == "qkv":
                _divide_norm(adapter.input_norm(layer), s)
            elif site == "gate_up":
                _divide_norm(adapter.post_attention_norm(layer), s)
            else:
                _divide_rows(adapter.linear(layer, "up_proj"), s)
        _scale_columns(consumers, s)


class SmoothQuantMethod(QuantMethod):
    """SmoothQuant: per-layer migration scales folded into norms / previous linears, RTN weights.

    Options: ``alpha`` (0.5, the paper's default), ``sites`` (see module docstring).
    """

    name = "smoothquant"
    needs_calibration = True

    def __init__(self, quant: QuantConfig, alpha: float = 0.5, sites: tuple[str, ...] | list[str] = SITES):
        unknown = set(sites) - set(SITES)
        if unknown:
            raise ValueError(f"unknown SmoothQuant sites {sorted(unknown)}; choose from {SITES}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
        super().__init__(quant, alpha=alpha, sites=list(sites))
        self.alpha = alpha
        self.sites = tuple(s for s in _APPLY_ORDER if s in sites)

    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None:
        measured = {site: ctx.adapter.linear(layer, _MEASURED[site]) for site in self.sites}
        with quantizers_off(layer):
            act_max = input_channel_absmax(layer, ctx, measured)
        smooth_layer(layer, ctx.adapter, act_max, self.alpha, self.sites)
        super().calibrate_layer(layer, ctx)
