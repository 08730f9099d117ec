"""SmoothQuant's migration scales (Xiao et al., ICML 2023, eq. 4).

Dividing input channel j of the activation by s_j and multiplying weight column j by s_j is exact
in FP; s_j = max|X_j|^α / max|W_:,j|^(1-α) moves quantization difficulty from activations to
weights (α = 0.5 is the paper's default for most models).
"""
from __future__ import annotations

import torch

_MIN = 1e-5  # SmoothQuant's clamp on both maxima (avoids 0^x and division by zero)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per input channel (both arguments per channel, same shape)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    if act_absmax.shape != weight_absmax.shape:
        raise ValueError(f"activation/weight maxima shapes differ: {tuple(act_absmax.shape)} vs "
                         f"{tuple(weight_absmax.shape)}")
    a = act_absmax.double().clamp(min=_MIN)
    w = weight_absmax.double().clamp(min=_MIN)
    return a.pow(alpha) / w.pow(1.0 - alpha)


def weight_column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max over the rows of several (out_i, in) weights of |W[:, j]| (float64)."""
    return torch.stack([w.detach().abs().amax(dim=0).double() for w in weights]).amax(dim=0)
