"""Does QLLM's error correction survive being merged into 4-bit weights? A CPU probe on real layers.

    python -m eval.qllm_ec_probe --layers 4 --nsamples 16 --seqlen 512 --out reports/bench/qllm_ec_probe.json

The paper-profile rows show QLLM W4A4 *with* error correction far worse than reassembly alone
(issue 9). This probe takes the first ``--layers`` decoder layers of the embedded model (one
error-correction group), quantizes them W4A4 with QLLM three times — reassembly only; reassembly +
error correction with the low-rank update merged but *not* re-quantized (weights no longer on a
4-bit grid: a diagnostic, not a deployable model); and the method as specified, the update merged
into the FP weight and quantized, ``Q_w(W + B A / r)`` — and reports the mean squared error of the group's output against the FP group, on
the calibration windows and on held-out PTB windows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from qllm_core.adapters import ModelAdapter
from qllm_core.data import calibration_windows
from qllm_core.engine import BlockwiseEngine
from qllm_core.methods import QuantConfig, make_method
from qllm_core.models import load_model

W4A4_ASYM = QuantConfig(w_bits=4, a_bits=4, w_asym=True, a_asym=True)
VARIANTS = {"reassembly only": {"error_correction": False},
            "EC, merged, not re-quantized (diagnostic)": {"requantize": False},
            "EC, merged and re-quantized (QLLM)": {}}


@torch.no_grad()
def group_output(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(ids[i:i + 1], output_hidden_states=True).hidden_states[-1] for i in range(len(ids))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fp = load_model("embedded", layers=args.layers)
    calib = calibration_windows(fp.tokenizer, "ptb", args.nsamples, args.seqlen, 0)
    held_out = calibration_windows(fp.tokenizer, "ptb", args.nsamples, args.seqlen, 1)
    reference = {"calibration": group_output(fp.model, calib), "held-out": group_output(fp.model, held_out)}
    rows = []
    for name, options in VARIANTS.items():
        loaded = load_model("embedded", layers=args.layers)
        method = make_method("qllm", W4A4_ASYM, num_layer=args.layers, epochs=args.epochs, max_candidates=12,
                             **options)
        BlockwiseEngine(loaded.model, ModelAdapter(loaded.model), "cpu", batch_size=4).run(method, calib)
        row = {"variant": name, **{f"mse_{split}": F.mse_loss(group_output(loaded.model, ids), reference[split]).item()
                                   for split, ids in (("calibration", calib), ("held-out", held_out))}}
        if getattr(method, "train_log", None):
            row["ec_epoch_losses"] = [round(x, 4) for x in method.train_log]
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "device": "cpu", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
