"""Are two quantized runs the same? Compare their saved layers tensor by tensor.

    python -m eval.compare_runs RUN_A RUN_B [--out diff.json]

For changes that must not change a method (issue 9: concurrent layers, CUDA graphs): two run directories
of the same experiment, made two ways, are compared layer checkpoint by layer checkpoint
(``layers/NNN.safetensors``): for every tensor the largest absolute difference relative to the largest
magnitude of RUN_B's tensor. Fake-quantized weights are stored dequantized, so one weight rounded to the
neighbouring level shows as a difference of one quantization step: ``differing_tensors`` says how many
tensors differ at all, ``max_relative_diff`` how much the worst one does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """The comparison of two run directories' layer checkpoints (module docstring); only layers both have."""
    layers_a, layers_b = (sorted((Path(r) / "layers").glob("*.safetensors")) for r in (run_a, run_b))
    if not layers_a or not layers_b:
        raise FileNotFoundError(f"no layer checkpoints in {run_a if not layers_a else run_b}/layers")
    names_b = {path.name for path in layers_b}
    common = [path for path in layers_a if path.name in names_b]
    worst, worst_name, differing, tensors = 0.0, None, 0, 0
    for path in common:
        a, b = load_file(str(path)), load_file(str(Path(run_b) / "layers" / path.name))
        if a.keys() != b.keys():
            raise ValueError(f"{path.name}: the runs' layers hold different tensors ({sorted(a.keys() ^ b.keys())})")
        for name, tensor in a.items():
            other = b[name]
            if tensor.shape != other.shape:
                raise ValueError(f"{path.name} {name}: shapes {tuple(tensor.shape)} and {tuple(other.shape)}")
            diff = (tensor.double() - other.double()).abs().max().item() if tensor.numel() else 0.0
            scale = other.double().abs().max().item() if other.numel() else 0.0
            relative = diff / scale if scale else diff
            tensors += 1
            differing += diff > 0
            if relative > worst:
                worst, worst_name = relative, f"{path.stem}/{name}"
    return {"layers_compared": len(common), "tensors_compared": tensors, "differing_tensors": int(differing),
            "max_relative_diff": worst, "worst_tensor": worst_name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.compare_runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--out", help="also write the comparison here (JSON)")
    args = parser.parse_args(argv)
    result = compare_runs(args.run_a, args.run_b)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
