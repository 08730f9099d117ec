"""The methods on one real layer, step by step (logic behind ``notebooks/walkthrough.ipynb``).

On decoder layer ``layer`` (default 2) of the embedded model, at one input site (default: down_proj's input,
where SmolLM2's largest outlier channels live), with calibration windows of PTB train:

1. :func:`outlier_table`: the channels with the largest max |x|, as multiples of the median channel.
2. :func:`disassembly_demo`: QLLM's channel disassembly of the largest outlier (QLLM Eq. 2-3: T
   sub-channels of x_c / T, the weight column repeated) is exact in FP; assembly (Eq. 4-5) merges
   as many similar pairs and costs a small, measured error.
3. :func:`method_errors`: the error of the layer's output against FP at W4A4 for RTN, QLLM's
   reassembly (adaptive threshold), and FlatQuant's learned Kronecker transform — each method
   calibrated through the engine on the first ``layer + 1`` layers (smoke settings).
4. FlatQuant's flatness on the same site (:func:`eval.flatness.site_flatness`), before and after.

Everything runs on the CPU in a couple of minutes.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch.nn import functional as F

from qllm_core.data import calibration_windows
from qllm_core.engine import BlockwiseEngine, call_layer, capture_layer0_inputs
from qllm_core.methods import QuantConfig, make_method
from qllm_core.models import LoadedModel, load_model
from qllm_core.reassembly import (
    ChannelReassembly, disassembly_counts, disassembly_plan, pair_scores, reassembly_plan,
)

from .flatness import SITES, capture_input

W4A4_ASYM = QuantConfig(w_bits=4, a_bits=4, w_asym=True, a_asym=True)  # QLLM's setting
W4A4_SYM = QuantConfig(w_bits=4, a_bits=4)  # FlatQuant's setting
SMOKE = {"flatquant": {"epochs": 2}, "qllm": {"error_correction": False, "max_candidates": 12}}


@dataclass
class Study:
    """The FP model cut after ``layer``, its calibration windows and the site's FP input/weights."""

    loaded: LoadedModel
    layer: int
    site: str
    ids: torch.Tensor
    x: torch.Tensor  # site input, (tokens, C)
    weight: torch.Tensor  # the site's concatenated weights, (out, C)


def study(layer: int = 2, site: str = "down", nsamples: int = 8, seqlen: int = 512, data_dir=None) -> Study:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {sorted(SITES)}")
    loaded = load_model("embedded", layers=layer + 1)
    ids = calibration_windows(loaded.tokenizer, "ptb", nsamples, seqlen, 0, data_dir)
    block = loaded.adapter.layers[layer]
    linears = [loaded.adapter.linear(block, role) for role in SITES[site]]
    x = capture_input(loaded.model, linears[0], ids)
    return Study(loaded, layer, site, ids, x, torch.cat([lin.weight for lin in linears]).detach())


def outlier_table(s: Study, top: int = 5) -> pd.DataFrame:
    magnitude = s.x.abs().amax(dim=0)
    median = magnitude.median()
    values, channels = magnitude.topk(top)
    return pd.DataFrame({"channel": channels.tolist(), "max |x|": values.tolist(),
                         "x median channel": (values / median).tolist()})


@torch.no_grad()
def disassembly_demo(s: Study, channel_ratio: float = 0.05) -> pd.DataFrame:
    """Disassemble at theta = the largest channel max / 4 (or the ratio's budget), then assemble."""
    magnitude = s.x.abs().amax(dim=0)
    theta = magnitude.max().item() / 4
    counts = disassembly_counts(magnitude, theta)
    budget = int(channel_ratio * magnitude.numel())
    while int((counts - 1).sum()) > budget:  # raise theta until the added channels fit the budget
        theta *= 1.1
        counts = disassembly_counts(magnitude, theta)
    reference = s.x @ s.weight.T
    rows = []
    for name, plan in (("disassembly only (exact in FP)", disassembly_plan(counts)),
                       ("disassembly + assembly (channel count kept)",
                        reassembly_plan(counts, pair_scores(s.x, s.weight)))):
        transform = ChannelReassembly(plan.num_channels)
        transform.set_plan(plan)
        out = transform(s.x) @ transform.transform_weight(s.weight).T
        rows.append({"step": name, "theta": theta, "channels in": magnitude.numel(), "channels out": transform(
            s.x[:1]).shape[-1], "added sub-channels": plan.num_added, "max |x| after": transform(s.x).abs().max().item(),
            "relative FP output error": ((out - reference).norm() / reference.norm()).item()})
    return pd.DataFrame(rows)


@torch.no_grad()
def layer_output_error(s: Study, quantized: LoadedModel) -> float:
    """Relative error of layer ``s.layer``'s output vs FP, both fed the FP inputs of that layer."""
    stream = capture_layer0_inputs(s.loaded.model, s.loaded.adapter, s.ids, torch.device("cpu"))
    fp_in = s.loaded.model(s.ids, output_hidden_states=True).hidden_states[s.layer]
    fp_out = torch.cat([call_layer(s.loaded.adapter.layers[s.layer], fp_in[i:i + 1], stream.kwargs)
                        for i in range(len(fp_in))])
    q_out = torch.cat([call_layer(quantized.adapter.layers[s.layer], fp_in[i:i + 1], stream.kwargs)
                       for i in range(len(fp_in))])
    return (F.mse_loss(q_out, fp_out) / fp_out.pow(2).mean()).item()


def quantized_copy(s: Study, method: str, quant: QuantConfig) -> tuple[LoadedModel, object]:
    loaded = load_model("embedded", layers=s.layer + 1)
    qmethod = make_method(method, quant, **SMOKE.get(method, {}))
    BlockwiseEngine(loaded.model, loaded.adapter, "cpu").run(qmethod, s.ids if qmethod.needs_calibration else None)
    return loaded, qmethod


def method_errors(s: Study) -> tuple[pd.DataFrame, LoadedModel]:
    """Layer-output error at W4A4 per method (and the FlatQuant copy, for the flatness plot)."""
    rows, flatquant = [], None
    for label, method, quant in (("RTN (asymmetric, QLLM's baseline)", "rtn", W4A4_ASYM),
                                 ("QLLM reassembly (adaptive theta)", "qllm", W4A4_ASYM),
                                 ("RTN (symmetric, FlatQuant's baseline)", "rtn", W4A4_SYM),
                                 ("FlatQuant transform (2 epochs)", "flatquant", W4A4_SYM)):
        loaded, qmethod = quantized_copy(s, method, quant)
        rows.append({"method": label, "relative output MSE of the layer": layer_output_error(s, loaded)})
        if method == "qllm":
            search = qmethod.search_log[s.site]
            rows[-1]["note"] = f"theta {search['theta']:.2f}, +{search['added']} sub-channels at the {s.site} input"
        if method == "flatquant":
            flatquant = loaded
    return pd.DataFrame(rows), flatquant
