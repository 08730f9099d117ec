"""Flatness of weights and activations before/after FlatQuant's transform (paper Figures 1 and 4).

FlatQuant's argument is that the learned affine transform makes the per-channel magnitude
distribution of both the activations X and the weights W *flat*, so one per-token / per-channel
scale fits all channels. We measure it as the paper plots it: for one linear-layer input site of
one decoder layer, the per-channel maximum magnitude (activations: max over calibration tokens;
weights: max over output rows), sorted in decreasing order, before and after the transform.

"After" uses the calibrated frozen transform from a run on the *FP* tensors: activations
T(x / s) and weights (W·diag(s))·P⁻ᵀ, with s the add_diag scale kept in ``merged_scale``; so the
curves show the transform's effect and not the quantization noise.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .experiments import build_model
from .profiles import W4A4KV4, get_profile

SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def profile_flatquant_run(profile: str, run_root: str | Path = "runs", data_dir=None):
    """``(quantized model, run record)`` of the profile's FlatQuant W4A4KV4 experiment.

    The same run directory the perplexity notebook evaluates (made here if missing, reused there).
    """
    settings = get_profile(profile)
    exp = next(e for e in settings.grid("all") if e.method == "flatquant" and e.quant == W4A4KV4)
    return build_model(settings.model, exp, Path(run_root), settings.calib, settings.device, data_dir)


def sorted_channel_magnitudes(x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """Per-channel max |x| along ``channel_dim`` (all other dims reduced), sorted descending."""
    moved = x.detach().float().abs().movedim(channel_dim, -1)
    return moved.reshape(-1, moved.shape[-1]).amax(dim=0).sort(descending=True).values


@torch.no_grad()
def capture_input(model: nn.Module, module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The input of ``module`` for ``input_ids`` (tokens x features), from one forward of ``model``."""
    box = []
    handle = module.register_forward_pre_hook(lambda _m, args: box.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        model(input_ids, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(box)


@torch.no_grad()
def site_flatness(fp_model: nn.Module, fp_adapter, quant_adapter, layer_index: int, site: str,
                  input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sorted channel magnitudes at ``site`` of decoder layer ``layer_index``.

    Returns ``{"act_before", "act_after", "weight_before", "weight_after"}`` (1-D, descending).
    ``quant_adapter`` belongs to a model loaded from a FlatQuant run (its linears hold the frozen
    :class:`~qllm_core.transforms.KroneckerTransform`).
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {sorted(SITES)}")
    roles = SITES[site]
    fp_layer = fp_adapter.layers[layer_index]
    transform = quant_adapter.linear(quant_adapter.layers[layer_index], roles[0]).input_transform
    if transform is None or not hasattr(transform, "merged_scale"):
        raise ValueError(f"layer {layer_index} {roles[0]} has no FlatQuant Kronecker transform")
    scale = transform.merged_scale if transform.merged_scale is not None else torch.ones(1)
    x = capture_input(fp_model, fp_adapter.linear(fp_layer, roles[0]), input_ids).to(transform.left.dtype)
    w = torch.cat([fp_adapter.linear(fp_layer, r).weight for r in roles]).to(transform.left.dtype)
    return {
        "act_before": sorted_channel_magnitudes(x),
        "act_after": sorted_channel_magnitudes(transform(x / scale)),
        "weight_before": sorted_channel_magnitudes(w),
        "weight_after": sorted_channel_magnitudes(transform.transform_weight(w * scale)),
    }


def flatness_ratio(magnitudes: torch.Tensor) -> float:
    """max / mean of sorted channel magnitudes (1 = perfectly flat); a one-number summary."""
    return (magnitudes.max() / magnitudes.mean()).item()


def plot_flatness(curves: dict[str, torch.Tensor], title: str = ""):
    """Two panels (weights, activations), before vs after, channel index on x (matplotlib figure)."""
    import matplotlib.pyplot as plt  # plotting only; keeps the module importable without it

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, kind in zip(axes, ("weight", "act")):
        for when, style in (("before", "-"), ("after", "--")):
            mags = curves[f"{kind}_{when}"]
            ax.plot(mags.numpy(), style, label=f"{when} (max/mean {flatness_ratio(mags):.1f})")
        ax.set_title(f"{'weights' if kind == 'weight' else 'activations'}: sorted channel max |·|")
        ax.set_xlabel("channel (sorted)")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
