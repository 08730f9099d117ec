"""Where a calibration step's time goes: wall vs device time per step, per method and execution mode.

    PYTHONPATH=. python eval/profile_calibration.py --label new --out reports/bench/calib_profile_new.json

Each case runs the real engine and method on a LLaMA-shaped random model (``qllm_core.shapes``) at
the paper's calibration size (128 x 2048 windows) twice, at 1 and 2 epochs, so that the difference is
exactly one epoch of training steps: seconds per step (wall) come from the two wall times, device
(kernel) time and kernel launches per step from two ``torch.profiler`` passes, and a method's
seconds per layer at its paper epochs = the fixed per-layer work + epochs x one epoch. ``--modes``
picks the step execution (``qllm_core.training.train_block``): ``eager`` (no graph, no compiled
quantizers), ``graph`` (CUDA graph), ``graph+compile`` (the default on a GPU). The script only uses
APIs that also existed before the fast trainer, so ``--label legacy`` with ``PYTHONPATH`` pointing at
an older checkout measures the old code on the same machine, in the same way.

``--count-ops`` needs no GPU: it counts the operators of one training step on the CPU
(:func:`count_step_ops`; ≈ the kernels a GPU step launches, less autocast's casts and with AdamW as
one fused kernel). A CUDA-graph replay still runs every kernel, each a few microseconds at least,
so for small blocks this count, not the arithmetic, sets the step time
(``reports/bench/step_ops_cpu.json``).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from qllm_core.adapters import ModelAdapter
from qllm_core.engine import BlockwiseEngine
from qllm_core.methods import QuantConfig, make_method
from qllm_core.shapes import shaped_llama

ASYM_W4A4 = QuantConfig(w_bits=4, a_bits=4, w_asym=True, a_asym=True)
# case: (method, bits, options, decoder layers in the model, windows per training step, paper epochs)
CASES = {
    "flatquant": ("flatquant", QuantConfig(w_bits=4, a_bits=4, kv_bits=4), {}, 1, 4, 15),
    "omniquant": ("omniquant", QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_asym=True, a_asym=True), {}, 1, 1, 20),
    "qllm": ("qllm", ASYM_W4A4, {}, 4, 1, 10),  # one 4-layer error-correction group
    "qllm-ec": ("qllm", ASYM_W4A4, {"reassembly": False}, 4, 1, 10),  # its error correction alone (no search)
    "qllm-search": ("qllm", ASYM_W4A4, {"error_correction": False}, 1, 0, 0),
}
TOP_KERNELS = 12  # kernels listed per profiled case, by device time per step
TRAINER = {"eager": {"graph": False, "compile_quantizers": False},
           "graph": {"graph": True, "compile_quantizers": False},
           "graph+compile": {"graph": True, "compile_quantizers": True}}


def _setup(case: str, epochs: int, mode: str, shape: str, nsamples: int, seqlen: int, device: str = "cuda"):
    """The case's engine, method and calibration ids (a random-weight LLaMA-shaped model)."""
    method_name, bits, options, layers, _, _ = CASES[case]
    if case != "qllm-search":
        options = {**options, "epochs": epochs}
    model = shaped_llama(shape, layers=layers, vocab_size=1024)
    ids = torch.randint(0, 1024, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    method = make_method(method_name, bits, **options)
    method.trainer = TRAINER[mode]  # an attribute the legacy code ignores
    return BlockwiseEngine(model, ModelAdapter(model), device, None, batch_size=8), method, ids


def run_case(case: str, epochs: int, mode: str, shape: str, nsamples: int, seqlen: int, profile: bool) -> dict:
    engine, method, ids = _setup(case, epochs, mode, shape, nsamples, seqlen)
    torch.cuda.synchronize()
    start = time.perf_counter()
    if not profile:
        engine.run(method, ids)
        torch.cuda.synchronize()
        stats = getattr(method, "train_stats", None)  # the (last) trained block's own wall time, if recorded
        return {"wall_s": time.perf_counter() - start, "train_s": getattr(stats, "wall_seconds", None)}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        engine.run(method, ids)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = Counter()
    for e in kernels:
        by_name[e.name] += e.time_range.elapsed_us() / 1e6
    return {"device_s": sum(by_name.values()), "kernels": len(kernels), "by_kernel": by_name}


# Operators that launch no kernel (views, metadata) are not counted.
_NO_KERNEL = {"view", "_unsafe_view", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "slice", "select",
              "as_strided", "alias", "detach", "reshape", "_reshape_alias", "split", "unbind", "narrow",
              "split_with_sizes", "view_as", "lift_fresh"}


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators that reach the kernels (after autograd: backward ones too), except inside
    an optimizer's step (on CUDA that is one fused AdamW kernel; the CPU runs AdamW op by op)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(case: str, shape: str, nsamples: int = 4, seqlen: int = 64) -> dict:
    """Operators (≈ kernels on a GPU) per training step of ``case``, on the CPU, eager: the difference
    between 2 and 1 epochs over the difference in steps (one trained block per case: see CASES)."""
    counts, steps = [], []
    for epochs in (1, 2):
        engine, method, ids = _setup(case, epochs, "eager", shape, nsamples, seqlen, device="cpu")
        counter = _OpCounter()
        pre = register_optimizer_step_pre_hook(lambda *_: setattr(counter, "paused", True))
        post = register_optimizer_step_post_hook(lambda *_: setattr(counter, "paused", False))
        try:
            with counter:
                engine.run(method, ids)
        finally:
            pre.remove()
            post.remove()
        counts.append(counter.ops)
        steps.append(method.train_stats.steps)  # the (last) trained block's steps
    per_step = Counter({op: (n - counts[0][op]) / (steps[1] - steps[0]) for op, n in counts[1].items()
                        if n > counts[0][op]})
    return {"case": case, "shape": shape, "ops_per_step": round(sum(per_step.values()), 1),
            "ops": {op: round(n, 1) for op, n in per_step.most_common()}}


def measure(case: str, mode: str, args) -> dict:
    *_, layers, windows_per_step, paper_epochs = CASES[case]
    epochs = (0,) if case == "qllm-search" else (1, 2)
    common = (args.shape, args.nsamples, args.seqlen)
    if "compile" in mode:  # compile every quantizer variant of the case before timing
        run_case(case, epochs[0], mode, args.shape, 8, args.seqlen, False)
    runs = [run_case(case, e, mode, *common, False) for e in epochs]
    walls = [r["wall_s"] for r in runs]
    row = {"case": case, "mode": mode, "layers": layers, "wall_s": [round(w, 3) for w in walls]}
    if case == "qllm-search":
        row["seconds_per_layer"] = round(walls[0] / layers, 3)
        return row
    try:
        profiles = [run_case(case, e, mode, *common, True) for e in epochs] if args.profile else None
    except RuntimeError as err:  # the profiler and CUDA graph capture do not always get along
        profiles, row["profile_error"] = None, repr(err)[:300]
    steps_per_epoch = args.nsamples // windows_per_step
    # one epoch = the difference of the training times where the trainer records them (the model builds and
    # layer passes of two separate runs differ by more than an epoch of small steps at 70B shapes), else walls
    trained = [r["train_s"] for r in runs]
    epoch_s = trained[1] - trained[0] if None not in trained else walls[1] - walls[0]
    fixed_s = walls[0] - epoch_s
    row.update(steps_per_epoch=steps_per_epoch, ms_per_step_wall=round(1e3 * epoch_s / steps_per_epoch, 3),
               seconds_per_layer_paper=round((fixed_s + paper_epochs * epoch_s) / layers, 2),
               paper_epochs=paper_epochs)
    if profiles:
        device_epoch = profiles[1]["device_s"] - profiles[0]["device_s"]
        row.update(ms_per_step_device=round(1e3 * device_epoch / steps_per_epoch, 3),
                   kernels_per_step=round((profiles[1]["kernels"] - profiles[0]["kernels"]) / steps_per_epoch),
                   device_share=round(device_epoch / epoch_s, 3), top_kernels_ms_per_step=top_kernels(*profiles, steps_per_epoch))
    return row


def top_kernels(one_epoch: dict, two_epochs: dict, steps: int) -> dict:
    """Device milliseconds per training step of the ``TOP_KERNELS`` costliest kernels (by name): the
    difference between the 2-epoch and the 1-epoch profile, over one epoch's steps."""
    per_step = Counter({name: 1e3 * (t - one_epoch["by_kernel"][name]) / steps
                        for name, t in two_epochs["by_kernel"].items()})
    return {name[:120]: round(ms, 3) for name, ms in per_step.most_common(TOP_KERNELS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="implementation label in the output (legacy, new)")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--modes", nargs="*", default=["graph+compile"], choices=list(TRAINER))
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--count-ops", action="store_true",
                        help="no GPU: count the operators per training step on the CPU (count_step_ops) instead")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.count_ops:
        rows = [count_step_ops(case, args.shape) for case in args.cases if case != "qllm-search"]
        Path(args.out).write_text(json.dumps({"meta": {"device": "cpu (operator counts, eager)", "torch": torch.__version__,
                                                       "shape": args.shape}, "rows": rows}, indent=1) + "\n")
        print(json.dumps(rows, indent=1))
        return
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "shape": args.shape, "nsamples": args.nsamples, "seqlen": args.seqlen}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    run_case(args.cases[0], 1, "eager", args.shape, 8, args.seqlen, False)  # warm-up: CUDA context, cuBLAS
    for case in args.cases:
        for mode in args.modes:
            try:
                row = {"impl": args.label, **measure(case, mode, args)}
            except Exception as err:  # record it and measure the rest
                row = {"impl": args.label, "case": case, "mode": mode, "error": repr(err)[:500]}
            print(json.dumps(row), flush=True)
            rows.append(row)
            out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # what is done survives a timeout


if __name__ == "__main__":
    main()
