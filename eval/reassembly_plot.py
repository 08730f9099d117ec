"""Per-channel activation magnitudes of one decoder layer's input before / after QLLM reassembly.

QLLM's Fig. 1/3 show that channel disassembly flattens the outlier channels an activation quantizer
has to cover. This module reproduces that view on one layer: the FP calibration inputs of layer
``layer_index`` are computed (engine helpers), QLLM's reassembly alone is calibrated on that layer,
and the per-channel max |x| of a site's input is measured before (the FP input) and after (the
reassembled input the activation quantizer sees, quantizers off). Logic behind
``notebooks/qllm_reassembly.ipynb``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qllm_core.calib_stats import capture_inputs
from qllm_core.data import calibration_windows
from qllm_core.engine import LayerContext, capture_layer0_inputs, run_layer_batched
from qllm_core.methods import QuantConfig, make_method
from qllm_core.methods.qllm import SITES
from qllm_core.models import load_model
from qllm_core.quant import quantizers_off


@dataclass
class Magnitudes:
    layer_index: int
    site: str
    before: torch.Tensor  # per-channel max |x| of the FP site input, (C,)
    after: torch.Tensor  # per-channel max |x| of the reassembled input, (C,)
    search: dict  # the search record of the site (theta, added channels, errors)


@torch.no_grad()
def reassembly_magnitudes(model_spec: str = "embedded", layer_index: int = 0, site: str = "down",
                          quant: QuantConfig = QuantConfig(w_bits=4, a_bits=4, w_asym=True, a_asym=True),
                          calib_dataset: str = "ptb", nsamples: int = 8, seqlen: int = 512, data_dir=None,
                          **options) -> Magnitudes:
    """Calibrate QLLM reassembly (no error correction) on one layer and measure its site input."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {sorted(SITES)}")
    loaded = load_model(model_spec)
    model, adapter = loaded.model, loaded.adapter
    if not 0 <= layer_index < len(adapter.layers):
        raise ValueError(f"layer_index {layer_index} outside 0..{len(adapter.layers) - 1}")
    device = torch.device("cpu")
    ids = calibration_windows(loaded.tokenizer, calib_dataset, nsamples, seqlen, data_dir=data_dir)
    method = make_method("qllm", quant, **{**options, "error_correction": False})
    method.prepare_model(model, adapter)
    stream = capture_layer0_inputs(model, adapter, ids, device)
    kwargs = stream.kwargs  # on the CPU, where this single-layer study runs
    hidden = stream.hidden
    for layer in list(adapter.layers)[:layer_index]:
        hidden = run_layer_batched(layer, hidden, kwargs, device, 1)
    layer = adapter.layers[layer_index]
    fp_outputs = run_layer_batched(layer, hidden, kwargs, device, 1)
    site_linear = adapter.linear(layer, SITES[site][0])
    before = capture_inputs(layer, _context(layer_index, hidden, fp_outputs, kwargs, adapter),
                            {site: site_linear}, hidden)[site]
    method.build_layer(layer_index, layer, adapter)
    method.calibrate_layer(layer, _context(layer_index, hidden, fp_outputs, kwargs, adapter))
    qlinear = adapter.linear(layer, SITES[site][0])
    with quantizers_off(layer):
        after = capture_inputs(layer, _context(layer_index, hidden, fp_outputs, kwargs, adapter),
                               {site: qlinear.act_quantizer}, hidden)[site]
    absmax = lambda t: t.abs().reshape(-1, t.shape[-1]).amax(dim=0).float()  # noqa: E731
    return Magnitudes(layer_index, site, absmax(before), absmax(after), method.search_log[site])


def _context(index, hidden, fp_outputs, kwargs, adapter) -> LayerContext:
    return LayerContext(index, hidden, fp_outputs, hidden, kwargs, torch.device("cpu"), adapter)


def plot_magnitudes(mags: Magnitudes, path=None):
    """Two panels (before / after) of per-channel max |x| on a shared y axis; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
    for ax, values, title in ((axes[0], mags.before, "before reassembly (FP input)"),
                              (axes[1], mags.after, "after reassembly")):
        ax.bar(range(values.numel()), values.numpy(), width=1.0)
        ax.axhline(values.max().item(), color="red", lw=0.8, ls="--", label=f"max {values.max().item():.2f}")
        ax.set_title(title)
        ax.set_xlabel("channel")
        ax.legend(loc="upper right")
    axes[0].set_ylabel("max |x| over calibration tokens")
    search = mags.search
    fig.suptitle(f"layer {mags.layer_index}, {mags.site} input: theta={search['theta']:.2f}, "
                 f"+{search['added']} sub-channels / merged pairs, "
                 f"site MSE {search['baseline_error']:.3g} -> {search['error']:.3g}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
